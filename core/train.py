"""Training an RBM with CD-k or PCD-k, and a DBN greedily, one RBM on top of the other.

CD-k on a minibatch of binary data v0 with N rows (LAB.md, task 1):

    ph0 = p(h|v0);  h ~ ph0
    k times:  v ~ p(v|h);  ph = p(h|v);  h ~ ph        -> the last v, ph are vk, phk
    dW = (v0' ph0 - vk' phk) / N;   da = mean(v0 - vk);   db = mean(ph0 - phk)

Hidden statistics use probabilities (lower variance), the chain is driven by samples. PCD-k
(Tieleman 2008) starts the negative chain from where the previous minibatch left it instead of
from the data. Momentum m and L2 weight decay wd follow Hinton's practical guide, for each
parameter theta with gradient estimate g:

    velocity <- m velocity + lr (g - wd theta);   theta <- theta + velocity

(wd on W only); both are off in the lab's settings, where the step is just lr g.

On the CPU the visible states v0 and vk are binary and mostly zeros on MNIST, so the four products
with them (p(h|v0), p(h|vk) and the two of dW) are sums of the rows their ones pick
(`core.binary`), where they are sparse enough; the product with the hidden sample, and every
product elsewhere, is dense. Besides torch's operations the only compiled code is the Bernoulli
sampler's loop and the lists of where the ones are (`core.kernels`). How many threads the
operations use is chosen as training goes (`AdaptiveThreads`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rbm_study.core.binary import BinaryProducts
from rbm_study.core.data import Binarizer
from rbm_study.core.models import RBM
from rbm_study.core.sampling import FastBernoulli
from rbm_study.core.threads import AdaptiveThreads

EpochCallback = Callable[[int, dict[str, float]], None]
"""Called after each epoch with (epoch number from 1, metrics of that epoch)."""
Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CDSettings:
    cd_k: int = 1
    persistent: bool = False
    learning_rate: float = 0.1
    epochs: int = 100
    batch_size: int = 100
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class _Velocity:
    """The running velocity of each parameter (momentum only)."""

    W: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor

    @classmethod
    def zeros_like(cls, rbm: RBM) -> _Velocity:
        return cls(torch.zeros_like(rbm.W), torch.zeros_like(rbm.a), torch.zeros_like(rbm.b))

    def fits(self, rbm: RBM) -> bool:
        return self.W.shape == rbm.W.shape and self.W.dtype == rbm.W.dtype and self.W.device == rbm.W.device


@dataclass
class _Workspace:
    """The buffers a CD step writes its intermediates into, so the loop allocates almost nothing."""

    ph: torch.Tensor  # [p(h|v0); p(h|v) of the latest Gibbs step], stacked for the sums of rows
    h: torch.Tensor  # the latest hidden sample
    pv: torch.Tensor  # p(v|h) of the latest Gibbs step
    binary: BinaryProducts | None  # the sums of rows' buffers (CPU, with FastBernoulli.compiled on)

    @classmethod
    def for_batch(cls, rbm: RBM, n: int, sums_of_rows: bool) -> _Workspace:
        def new(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=rbm.W.dtype, device=rbm.W.device)

        H, V = rbm.n_hidden, rbm.n_visible
        binary = BinaryProducts(n, V, rbm.W.dtype) if sums_of_rows else None
        return cls(new(2 * n, H), new(n, H), new(n, V), binary)

    @property
    def ph0(self) -> torch.Tensor:
        return self.ph[: self.h.shape[0]]

    @property
    def phk(self) -> torch.Tensor:
        return self.ph[self.h.shape[0] :]

    def fits(self, rbm: RBM, n: int, sums_of_rows: bool) -> bool:
        same_layout = self.pv.dtype == rbm.W.dtype and self.pv.device == rbm.W.device
        return same_layout and self.pv.shape == (n, rbm.n_visible) and self.h.shape == (n, rbm.n_hidden) and (
            (self.binary is not None) == sums_of_rows
        )


def _conditional(bias: torch.Tensor, x: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sigmoid(bias + x W) into `out`: RBM.p_h (W) and RBM.p_v (W.T) without allocating."""
    return torch.addmm(bias, x, W, out=out).sigmoid_()


@dataclass
class CDTrainer:
    """The state of one CD/PCD run: the model, the settings, the velocities and the persistent chain."""

    rbm: RBM
    settings: CDSettings
    generator: torch.Generator
    velocity: _Velocity | None = None
    chain: torch.Tensor | None = None  # PCD: the negative chain's visible states
    last_negative: torch.Tensor | None = None  # vk of the last step (up-down's sleep pass starts there)
    threads: AdaptiveThreads = field(default_factory=AdaptiveThreads, repr=False)  # epochs' thread count
    _work: _Workspace | None = field(default=None, repr=False)
    _sample: FastBernoulli | None = field(default=None, repr=False)  # the chain's sampler
    _data: Binarizer | None = field(default=None, repr=False)  # the training data, kept across epochs

    def step(self, v0: torch.Tensor) -> float:
        """One CD-k / PCD-k update from a binary minibatch; returns its reconstruction error.

        The error is the summed squared difference between v0 and p(v|h0), per image, the usual
        cheap (and not very informative) training signal.
        """
        return float(self.update(v0))

    def update(self, v0: torch.Tensor) -> torch.Tensor:
        """`step` without the host sync: the reconstruction error stays a 0-dim tensor on the device.

        The chain is sampled with `FastBernoulli` (16-bit uniforms, bias <= 2^-17 per unit): with
        torch's own sampling the random numbers, not the matmuls, are the biggest cost of a step
        on the CPU. There, with `FastBernoulli.compiled` on, the products with sparse binary
        visible states are sums of rows (`core.binary`).
        """
        rbm, s, n = self.rbm, self.settings, v0.shape[0]
        if self._sample is None or self._sample.generator is not self.generator:
            self._sample = FastBernoulli(self.generator)
        sums_of_rows = FastBernoulli.compiled and rbm.W.device.type == "cpu"
        if self._work is None or not self._work.fits(rbm, n, sums_of_rows):
            self._work = _Workspace.for_batch(rbm, n, sums_of_rows)
        sample, work = self._sample, self._work

        ph0, sparse0 = self._p_h(v0, 0, work.ph0)
        pv = _conditional(rbm.a, sample(ph0, out=work.h), rbm.W.T, out=work.pv)  # the reconstruction
        # the chain's visible samples are new tensors: they outlive the step (last_negative, PCD chain)
        if s.persistent:  # the chain goes on from its last state
            recon_error = torch.nn.functional.mse_loss(pv, v0, reduction="sum") / n
            if self.chain is None or self.chain.shape != v0.shape:
                self.chain = v0.clone()
            ph, _ = self._p_h(self.chain, 1, work.phk)
            vk = sample(_conditional(rbm.a, sample(ph, out=work.h), rbm.W.T, out=work.pv))
        else:  # the reconstruction is also the first Gibbs step's p(v|h): one pass samples and scores it
            vk, squared_error = sample.with_squared_error(pv, v0)
            recon_error = squared_error / n
        for i in range(s.cd_k):
            phk, sparsek = self._p_h(vk, 1, work.phk)
            if i + 1 < s.cd_k:  # the update uses phk, so a hidden sample after the last step is waste
                vk = sample(_conditional(rbm.a, sample(phk, out=work.h), rbm.W.T, out=work.pv))
        self.last_negative = vk
        if s.persistent:
            self.chain = vk
        self._descend(v0, vk, sums_of_rows=sparse0 and sparsek)
        return recon_error

    def _p_h(self, v: torch.Tensor, slot: int, out: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """p(h|v) into `out` for binary v, and whether it was summed from rows (v sparse enough).

        The sums of rows keep where v's ones are in `slot` (0: the data, 1: the chain) for the
        weight update.
        """
        rbm, binary = self.rbm, self._work.binary
        if binary is not None and binary.locate(slot, v):
            return binary.times(slot, rbm.W, rbm.b, out=out).sigmoid_(), True
        return _conditional(rbm.b, v, rbm.W, out=out), False

    def _descend(self, v0: torch.Tensor, vk: torch.Tensor, sums_of_rows: bool) -> None:
        """velocity <- m velocity + lr (g - wd theta);  theta += velocity, for theta = W, a, b.

        The rule once, for every m: each parameter's step is summed into a target. With momentum
        the target is the velocity, scaled by m first and kept from step to step, then added to
        the parameter. Without, the velocity is this step alone, so the target is the parameter
        itself: no buffer, one pass over W fewer, and the decay folds into the scaling of the
        target (theta <- (1 - lr wd) theta + lr g). With g summed over the N rows,
        lr g = lr/N (v0' ph0 - vk' phk) for W: two dense products into the target, or, where v0
        and vk were both sparse, one call of sums of rows (`BinaryProducts.outer`) that also
        gives the biases' steps.
        """
        rbm, s, n, work = self.rbm, self.settings, v0.shape[0], self._work
        m, scale, decay = s.momentum, s.learning_rate / n, s.learning_rate * s.weight_decay
        if m:
            if self.velocity is None or not self.velocity.fits(rbm):
                self.velocity = _Velocity.zeros_like(rbm)
            vel = self.velocity
            W_to, a_to, b_to = vel.W, vel.a, vel.b
            a_to.mul_(m)
            b_to.mul_(m)
        else:
            W_to, a_to, b_to = rbm.W, rbm.a, rbm.b
        beta = m if m else 1.0 - decay
        if sums_of_rows:
            step = work.binary.outer(work.ph, scale)  # [V + 1, H]: W's step, then b's
            if beta != 1.0:
                W_to.mul_(beta)
            W_to.add_(step[:-1])
            a_to.add_(work.binary.visible_step)
            b_to.add_(step[-1])
        else:
            ph0, phk = work.ph0, work.phk
            W_to.addmm_(v0.T, ph0, beta=beta, alpha=scale).addmm_(vk.T, phk, alpha=-scale)
            # the bias steps from column sums of each side, half the cost of (v0 - vk).sum
            a_to.add_(v0.sum(dim=0), alpha=scale).add_(vk.sum(dim=0), alpha=-scale)
            b_to.add_(ph0.sum(dim=0), alpha=scale).add_(phk.sum(dim=0), alpha=-scale)
        if m and decay:
            W_to.add_(rbm.W, alpha=-decay)
        if m:
            rbm.W.add_(vel.W)
            rbm.a.add_(vel.a)
            rbm.b.add_(vel.b)

    def epoch(self, data: torch.Tensor | Binarizer, encode: Encoder | None = None) -> dict[str, float]:
        """One pass over grey-valued `data` in shuffled, freshly binarised minibatches.

        `encode` maps each binary minibatch to this RBM's visible states (a DBN's upper layer
        trains on samples of the layer below's hidden units). The `Binarizer` made for grey
        `data` is kept for the next epoch over the same tensor. On the CPU the steps run on as
        many threads as torch has, or on one where that is faster (`AdaptiveThreads`).
        """
        start = time.perf_counter()
        if isinstance(data, Binarizer):
            self._data = data
        elif self._data is None or self._data.grey is not data:
            self._data = Binarizer(data)
        errors = []  # 0-dim tensors, summed once at the end: no per-step host sync (CUDA)
        with self.threads.running(enabled=self.rbm.W.device.type == "cpu") as threads:
            for v0 in self._data.minibatches(self.settings.batch_size, self.generator):
                errors.append(self.update(v0 if encode is None else encode(v0)))
                threads.step()
        batches = len(errors)
        total = float(torch.stack(errors).sum()) if errors else 0.0
        if not torch.isfinite(self.rbm.W).all():
            raise FloatingPointError("training diverged: the weights hold NaN or inf (lower the learning rate)")
        return {"train_recon_error": total / max(batches, 1), "seconds": time.perf_counter() - start}


def train_rbm(
    rbm: RBM,
    data: torch.Tensor | Binarizer,
    settings: CDSettings,
    generator: torch.Generator,
    on_epoch: EpochCallback | None = None,
    epoch_metrics: Callable[[RBM], dict[str, float]] | None = None,
    encode: Encoder | None = None,
) -> RBM:
    """Train `rbm` in place on grey-valued `data` (or its `Binarizer`) for `settings.epochs` epochs.

    `epoch_metrics(rbm)` adds validation metrics to what `on_epoch` receives; `encode` is
    passed to `CDTrainer.epoch`.
    """
    trainer = CDTrainer(rbm, settings, generator)
    for epoch in range(1, settings.epochs + 1):
        metrics = trainer.epoch(data, encode)
        if epoch_metrics is not None:
            metrics.update(epoch_metrics(rbm))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return rbm
