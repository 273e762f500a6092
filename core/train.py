"""Training an RBM with CD-k or PCD-k, and a DBN greedily, one RBM on top of the other.

CD-k on a minibatch of binary data v0 with N rows (LAB.md, task 1):

    ph0 = p(h|v0);  h ~ ph0
    k times:  v ~ p(v|h);  ph = p(h|v);  h ~ ph        -> the last v, ph are vk, phk
    dW = (v0' ph0 - vk' phk) / N;   da = mean(v0 - vk);   db = mean(ph0 - phk)

Hidden statistics use probabilities (lower variance), the chain is driven by samples. PCD-k
(Tieleman 2008) starts the negative chain from where the previous minibatch left it instead of
from the data. Momentum and L2 weight decay follow Hinton's practical guide: the velocity
accumulates lr * (gradient - weight_decay * W); both are off in the lab's settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.data import minibatches
from core.rbm import RBM, bernoulli_fast

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
    W: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor

    @classmethod
    def zeros_like(cls, rbm: RBM) -> _Velocity:
        return cls(torch.zeros_like(rbm.W), torch.zeros_like(rbm.a), torch.zeros_like(rbm.b))


@dataclass
class CDTrainer:
    """The state of one CD/PCD run: the model, the settings, momentum and the persistent chain."""

    rbm: RBM
    settings: CDSettings
    generator: torch.Generator
    velocity: _Velocity | None = None
    chain: torch.Tensor | None = None  # PCD: the negative chain's visible states
    last_negative: torch.Tensor | None = None  # vk of the last step (up-down's sleep pass starts there)
    _grad_W: torch.Tensor | None = field(default=None, repr=False)

    def step(self, v0: torch.Tensor) -> float:
        """One CD-k / PCD-k update from a binary minibatch; returns its reconstruction error.

        The error is the summed squared difference between v0 and p(v|h0), per image, the usual
        cheap (and not very informative) training signal.
        """
        return float(self._step(v0))

    def _step(self, v0: torch.Tensor) -> torch.Tensor:
        """`step` without the host sync: the reconstruction error stays a 0-dim tensor on the device.

        The chain is sampled with `bernoulli_fast` (16-bit uniforms, bias <= 2^-17 per unit), which
        on the CPU roughly halves the time of a CD-1 step: the random numbers, not the matmuls,
        were its biggest cost.
        """
        rbm, s, g = self.rbm, self.settings, self.generator
        n = v0.shape[0]
        ph0 = rbm.p_h(v0)
        pv = rbm.p_v(bernoulli_fast(ph0, g))  # p(v|h0): the reconstruction ...
        recon_error = torch.nn.functional.mse_loss(pv, v0, reduction="sum") / n

        if s.persistent:
            if self.chain is None or self.chain.shape != v0.shape:
                self.chain = v0.clone()
            pv = rbm.p_v(bernoulli_fast(rbm.p_h(self.chain), g))
        # ... and, in plain CD, also the first Gibbs step's p(v|h0), so it is computed once
        for i in range(s.cd_k):
            vk = bernoulli_fast(pv, g)
            phk = rbm.p_h(vk)
            if i + 1 < s.cd_k:  # the update uses phk, so a hidden sample after the last step is waste
                pv = rbm.p_v(bernoulli_fast(phk, g))
        self.last_negative = vk
        if s.persistent:
            self.chain = vk

        # dW = (v0' ph0 - vk' phk) / N as two GEMMs into one buffer, no temporaries
        if self._grad_W is None:
            self._grad_W = torch.empty_like(rbm.W)
        grad_W = torch.mm(v0.T, ph0, out=self._grad_W).addmm_(vk.T, phk, alpha=-1.0)
        grad_a = (v0 - vk).sum(dim=0)
        grad_b = (ph0 - phk).sum(dim=0)
        scale = s.learning_rate / n
        if s.weight_decay:
            grad_W.add_(rbm.W, alpha=-s.weight_decay * n)
        if s.momentum:
            if self.velocity is None:
                self.velocity = _Velocity.zeros_like(rbm)
            vel = self.velocity
            vel.W.mul_(s.momentum).add_(grad_W, alpha=scale)
            vel.a.mul_(s.momentum).add_(grad_a, alpha=scale)
            vel.b.mul_(s.momentum).add_(grad_b, alpha=scale)
            rbm.W.add_(vel.W)
            rbm.a.add_(vel.a)
            rbm.b.add_(vel.b)
        else:
            rbm.W.add_(grad_W, alpha=scale)
            rbm.a.add_(grad_a, alpha=scale)
            rbm.b.add_(grad_b, alpha=scale)
        return recon_error

    def epoch(self, data: torch.Tensor, encode: Encoder | None = None) -> dict[str, float]:
        """One pass over grey-valued `data` in shuffled, freshly binarised minibatches.

        `encode` maps each binary minibatch to this RBM's visible states (a DBN's upper layer
        trains on samples of the layer below's hidden units).
        """
        start = time.perf_counter()
        total, batches = torch.zeros((), device=data.device), 0
        for v0 in minibatches(data, self.settings.batch_size, self.generator):
            total += self._step(v0 if encode is None else encode(v0))  # no per-step host sync
            batches += 1
        total = float(total)
        if not torch.isfinite(self.rbm.W).all():
            raise FloatingPointError("training diverged: the weights hold NaN or inf (lower the learning rate)")
        return {"train_recon_error": total / max(batches, 1), "seconds": time.perf_counter() - start}


def train_rbm(
    rbm: RBM,
    data: torch.Tensor,
    settings: CDSettings,
    generator: torch.Generator,
    on_epoch: EpochCallback | None = None,
    epoch_metrics: Callable[[RBM], dict[str, float]] | None = None,
    encode: Encoder | None = None,
) -> RBM:
    """Train `rbm` in place on grey-valued `data` for `settings.epochs` epochs.

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
