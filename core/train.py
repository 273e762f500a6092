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

On the CPU, for float32 models and binary visible states (the data, a DBN's hidden samples), a
step is one compiled call (`core.cpu_cd`): every product with a binary matrix a sum of the rows
its ones pick, the minibatch in two parts side by side. Elsewhere (a GPU, float64, states that are
not binary, or no C++ compiler) the same step is torch's operations. How many threads a step uses
is chosen as training goes (`AdaptiveThreads`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rbm_study.core import cpu_cd
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

    @classmethod
    def for_batch(cls, rbm: RBM, n: int) -> _Workspace:
        def new(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=rbm.W.dtype, device=rbm.W.device)

        H, V = rbm.n_hidden, rbm.n_visible
        return cls(new(2 * n, H), new(n, H), new(n, V))

    @property
    def ph0(self) -> torch.Tensor:
        return self.ph[: self.h.shape[0]]

    @property
    def phk(self) -> torch.Tensor:
        return self.ph[self.h.shape[0] :]

    def fits(self, rbm: RBM, n: int) -> bool:
        same_layout = self.pv.dtype == rbm.W.dtype and self.pv.device == rbm.W.device
        return same_layout and self.pv.shape == (n, rbm.n_visible) and self.h.shape == (n, rbm.n_hidden)


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
    _sample: FastBernoulli | None = field(default=None, repr=False)  # the chain's sampler (torch's path)
    _compiled: cpu_cd.CPUStep | None = field(default=None, repr=False)  # the compiled step's state (CPU)
    _data: Binarizer | None = field(default=None, repr=False)  # the training data, kept across epochs

    def step(self, v0: torch.Tensor) -> float:
        """One CD-k / PCD-k update from a binary minibatch; returns its reconstruction error.

        The error is the summed squared difference between v0 and p(v|h0), per image, the usual
        cheap (and not very informative) training signal.
        """
        return float(self.update(v0))

    def update(self, v0: torch.Tensor) -> torch.Tensor:
        """`step` without the host sync: the reconstruction error stays a 0-dim tensor on the device.

        On the CPU (float32, binary states, `FastBernoulli.compiled` on) the step is one compiled
        call (`core.cpu_cd`); elsewhere torch's operations, sampled with `FastBernoulli` (16-bit
        uniforms, bias <= 2^-17 per unit, as the compiled step's): with torch's own sampling the
        random numbers, not the matmuls, are the biggest cost of a step on the CPU.
        """
        if self._compiled_step_serves():
            recon_error = self._compiled_update(v0)
            if recon_error is not None:
                return recon_error
        return self._torch_update(v0)

    def _compiled_step_serves(self) -> bool:
        """Whether the compiled step can take this trainer's steps (its state made at the first)."""
        if not (FastBernoulli.compiled and cpu_cd.fits(self.rbm.W)):
            return False
        if self._compiled is None or self._compiled.generator is not self.generator:
            self._compiled = cpu_cd.CPUStep(self.generator)
        return True

    def _compiled_update(self, v0: torch.Tensor) -> torch.Tensor | None:
        """The compiled step, the update rule's targets set here (`_targets`); None where v0 or the
        chain is not binary (then nothing was changed)."""
        rbm, s, n = self.rbm, self.settings, v0.shape[0]
        chain = None
        if s.persistent:
            if self.chain is None or self.chain.shape != v0.shape:
                self.chain = v0.clone()
            chain = self.chain
        targets, beta, bias_beta = self._targets()
        result = self._compiled(v0, rbm.W, rbm.a, rbm.b, targets, s.cd_k, chain, beta, bias_beta, s.learning_rate / n)
        if result is None:
            return None
        vk, squared_error = result
        self.last_negative = vk
        if s.persistent:
            self.chain = vk
        self._apply_velocity()
        return squared_error / n

    def _torch_update(self, v0: torch.Tensor) -> torch.Tensor:
        rbm, s, n = self.rbm, self.settings, v0.shape[0]
        if self._sample is None or self._sample.generator is not self.generator:
            self._sample = FastBernoulli(self.generator)
        if self._work is None or not self._work.fits(rbm, n):
            self._work = _Workspace.for_batch(rbm, n)
        sample, work = self._sample, self._work

        ph0 = _conditional(rbm.b, v0, rbm.W, out=work.ph0)
        pv = _conditional(rbm.a, sample(ph0, out=work.h), rbm.W.T, out=work.pv)  # the reconstruction
        # the chain's visible samples are new tensors: they outlive the step (last_negative, PCD chain)
        if s.persistent:  # the chain goes on from its last state
            recon_error = torch.nn.functional.mse_loss(pv, v0, reduction="sum") / n
            if self.chain is None or self.chain.shape != v0.shape:
                self.chain = v0.clone()
            ph = _conditional(rbm.b, self.chain, rbm.W, out=work.phk)
            vk = sample(_conditional(rbm.a, sample(ph, out=work.h), rbm.W.T, out=work.pv))
        else:  # the reconstruction is also the first Gibbs step's p(v|h): one pass samples and scores it
            vk, squared_error = sample.with_squared_error(pv, v0)
            recon_error = squared_error / n
        for i in range(s.cd_k):
            phk = _conditional(rbm.b, vk, rbm.W, out=work.phk)
            if i + 1 < s.cd_k:  # the update uses phk, so a hidden sample after the last step is waste
                vk = sample(_conditional(rbm.a, sample(phk, out=work.h), rbm.W.T, out=work.pv))
        self.last_negative = vk
        if s.persistent:
            self.chain = vk
        self._descend(v0, vk)
        return recon_error

    def _targets(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float, float]:
        """Where the update rule sums each parameter's step, and by what each target is scaled first.

        velocity <- m velocity + lr (g - wd theta);  theta += velocity, for theta = W, a, b.
        The rule once, for every m: each parameter's step is summed into a target. With momentum
        the target is the velocity, scaled by m first and kept from step to step, then added to
        the parameter (`_apply_velocity`, which also subtracts lr wd W). Without, the velocity is
        this step alone, so the target is the parameter itself: no buffer, one pass over W fewer,
        and the decay folds into the scaling of the target (theta <- (1 - lr wd) theta + lr g,
        W only). Returns ((W's, a's, b's target), W's scaling, the biases' scaling).
        """
        rbm, s = self.rbm, self.settings
        m, decay = s.momentum, s.learning_rate * s.weight_decay
        if not m:
            return (rbm.W, rbm.a, rbm.b), 1.0 - decay, 1.0
        if self.velocity is None or not self.velocity.fits(rbm):
            self.velocity = _Velocity.zeros_like(rbm)
        vel = self.velocity
        return (vel.W, vel.a, vel.b), m, m

    def _apply_velocity(self) -> None:
        """With momentum, after the step is in the velocity: its decay term, then theta += velocity."""
        rbm, s = self.rbm, self.settings
        m, decay = s.momentum, s.learning_rate * s.weight_decay
        if not m:
            return
        vel = self.velocity
        if decay:
            vel.W.add_(rbm.W, alpha=-decay)
        rbm.W.add_(vel.W)
        rbm.a.add_(vel.a)
        rbm.b.add_(vel.b)

    def _descend(self, v0: torch.Tensor, vk: torch.Tensor) -> None:
        """The update rule (`_targets`) with torch's products: lr g = lr/N (v0' ph0 - vk' phk) for W,
        two dense products into the target; the biases' steps from column sums of each side."""
        work, n = self._work, v0.shape[0]
        scale = self.settings.learning_rate / n
        (W_to, a_to, b_to), beta, bias_beta = self._targets()
        ph0, phk = work.ph0, work.phk
        if bias_beta != 1.0:
            a_to.mul_(bias_beta)
            b_to.mul_(bias_beta)
        W_to.addmm_(v0.T, ph0, beta=beta, alpha=scale).addmm_(vk.T, phk, alpha=-scale)
        # the bias steps from column sums of each side, half the cost of (v0 - vk).sum
        a_to.add_(v0.sum(dim=0), alpha=scale).add_(vk.sum(dim=0), alpha=-scale)
        b_to.add_(ph0.sum(dim=0), alpha=scale).add_(phk.sum(dim=0), alpha=-scale)
        self._apply_velocity()

    def _set_step_threads(self, count: int) -> None:
        self._compiled.threads = count

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
        # the compiled step runs its parts on the count chosen, torch's operations on one thread:
        # a second thread pool waking for them would contend with the step's own threads
        compiled = self._compiled_step_serves()
        apply = self._set_step_threads if compiled else None
        with self.threads.running(enabled=self.rbm.W.device.type == "cpu", apply=apply) as threads:
            for v0 in self._data.minibatches(self.settings.batch_size, self.generator):
                errors.append(self.update(v0 if encode is None else encode(v0)))
                threads.step()
        if compiled:
            self._compiled.threads = 1  # steps outside an epoch (up-down's top RBM) run on the caller's thread
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
