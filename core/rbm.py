"""Bernoulli restricted Boltzmann machine: the model, its conditionals and its free energy.

Energy of a joint state of binary visible units v (V of them) and hidden units h (H of them):

    E(v, h) = -v'Wh - b'h - a'v          W: [V, H], a: visible bias [V], b: hidden bias [H]

which gives factorial conditionals

    p(h_j = 1 | v) = sigmoid(b_j + sum_i v_i W_ij)
    p(v_i = 1 | h) = sigmoid(a_i + sum_j W_ij h_j)

and, summing the hidden units out, the free energy whose exp(-F) is the unnormalised p(v):

    F(v) = -a'v - sum_j softplus(b_j + v'W_j)

The names follow LAB.md (W, a, b); scikit-learn's BernoulliRBM calls them components_ (W.T),
intercept_visible_ and intercept_hidden_. Training lives in `core.train`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from rbm_study.core import kernels


class RBM:
    """Parameters of a Bernoulli RBM plus the operations every algorithm here is built from."""

    def __init__(self, W: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        if W.dim() != 2 or a.shape != (W.shape[0],) or b.shape != (W.shape[1],):
            raise ValueError(
                f"RBM shapes do not fit: W {tuple(W.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
            )
        self.W, self.a, self.b = W, a, b

    @classmethod
    def init(
        cls,
        n_visible: int,
        n_hidden: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        weight_std: float = 0.01,
        visible_bias: torch.Tensor | None = None,
    ) -> RBM:
        """Small random weights, zero hidden bias, visible bias zero or as given.

        Hinton's practical guide suggests visible biases log(p/(1-p)) of the data's pixel means;
        pass them as `visible_bias` (see `visible_bias_from_means`).
        """
        # draw where the generator lives (a CUDA generator cannot fill a CPU tensor)
        where = generator.device if generator is not None else device
        W = torch.randn(n_visible, n_hidden, generator=generator, dtype=dtype, device=where) * weight_std
        a = torch.zeros(n_visible, dtype=dtype) if visible_bias is None else visible_bias.to(dtype)
        b = torch.zeros(n_hidden, dtype=dtype)
        return cls(W.to(device), a.to(device).clone(), b.to(device))

    @property
    def n_visible(self) -> int:
        return self.W.shape[0]

    @property
    def n_hidden(self) -> int:
        return self.W.shape[1]

    @property
    def device(self) -> torch.device:
        return self.W.device

    def to(self, device: torch.device | str) -> RBM:
        return RBM(self.W.to(device), self.a.to(device), self.b.to(device))

    def clone(self) -> RBM:
        return RBM(self.W.clone(), self.a.clone(), self.b.clone())

    # --- conditionals -------------------------------------------------------------------------
    def p_h(self, v: torch.Tensor) -> torch.Tensor:
        """p(h = 1 | v), one row per row of v."""
        return torch.sigmoid(torch.addmm(self.b, v, self.W))

    def p_v(self, h: torch.Tensor) -> torch.Tensor:
        """p(v = 1 | h), one row per row of h."""
        return torch.sigmoid(torch.addmm(self.a, h, self.W.T))

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) per row; exp(-F(v)) / Z = p(v)."""
        return -(v @ self.a) - F.softplus(torch.addmm(self.b, v, self.W)).sum(dim=1)

    def hidden_free_energy(self, h: torch.Tensor) -> torch.Tensor:
        """F(h) per row, the visible units summed out; exp(-F(h)) / Z = p(h)."""
        return -(h @ self.b) - F.softplus(torch.addmm(self.a, h, self.W.T)).sum(dim=1)

    # --- sampling ------------------------------------------------------------------------------
    def gibbs_from_hidden(
        self, h: torch.Tensor, steps: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`steps` rounds of v ~ p(v|h), h ~ p(h|v) from a hidden state.

        Returns (v sample, p(v|h) that produced it, hidden sample) of the last round.
        """
        if steps < 1:
            raise ValueError(f"gibbs steps must be >= 1, got {steps}")
        for _ in range(steps):
            pv = self.p_v(h)
            v = bernoulli(pv, generator)
            h = bernoulli(self.p_h(v), generator)
        return v, pv, h

    def reconstruct(self, v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """p(v = 1 | h) with h ~ p(h | v): the lab's reconstruction, shown as probabilities."""
        return self.p_v(bernoulli(self.p_h(v), generator))

    def generate(
        self, h: torch.Tensor, steps: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visible probabilities after `steps` Gibbs rounds started from a hidden state h.

        Returns (p(v=1|h) of the final hidden state, that final hidden state).
        """
        _, _, h = self.gibbs_from_hidden(h, steps, generator)
        return self.p_v(h), h


def bernoulli(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary samples with P(1) = p, as floats: the exact path, for evaluation and figures.

    u ~ U[0, 1) from `torch.rand` carries 24 random bits, as many as a float32 mantissa, so
    P(u < p) = p to float32 precision. `rand` then a comparison runs vectorised on the CPU, where
    `torch.bernoulli` draws element by element, and writing the comparison's 0/1 straight into the
    float buffer skips a bool tensor and its cast. Same draws, same samples as
    `(torch.rand(p.shape, generator=generator) < p).float()`.
    """
    u = torch.empty_like(p, memory_format=torch.contiguous_format).uniform_(generator=generator)
    return torch.lt(u, p, out=u)


class FastBernoulli:
    """Bernoulli samples for training, from 16-bit uniforms: four to a 64-bit random word.

    Why: on the CPU, `torch.rand` runs the Mersenne twister serially, one 32-bit draw per uniform,
    and a CD-1 step of 100 MNIST images needs ~90,000 samples: with it they cost more than the
    step's matmuls (`torch.bernoulli` is slower still). Here each 64-bit random word is cut into
    four 16-bit integers s, each standing for the uniform

        u = (s + 0.5) / 65536,   s uniform on {0, ..., 65535},

    and a sample is the comparison u < p. On the CPU the words come from 64 SFC64 generators (numpy's
    algorithm and seeding, stepped side by side), seeded from one draw of `generator`, and one
    compiled loop makes the words and compares (`core.kernels`, which says why). On other devices,
    and on the CPU with `compiled` off, the words come from `generator` itself, into a pool of float
    uniforms made in large blocks, and the comparison is torch's.

    Precision: P(u < p) is p rounded to a multiple of 2^-16 (to the nearest, ties aside), so the
    bias is at most 2^-17 per unit; p < 2^-17 never fires and p > 1 - 2^-17 always does, p = 0
    never and p = 1 always. That is far below the noise of a minibatch gradient, but it is not
    exact: evaluation code uses `bernoulli` (24-bit uniforms from `torch.rand`).

    Reproducibility: everything follows from `generator`'s state when the sampler is made, in a
    fixed order, so the same seed gives the same samples. Random bits are never reused: each sample
    takes fresh ones (a call's leftover bits, and a block's leftover uniforms, are dropped).
    """

    compiled: ClassVar[bool] = True
    """Whether samplers made from now on draw CPU samples with the compiled loop. Off, they take the
    other devices' path (words from `generator`, torch's comparison): what `tests/bench.py` times
    the loop against."""

    def __init__(self, generator: torch.Generator, block: int = 1 << 18):
        self.generator = generator
        self.block = block  # uniforms per refill of the pool (the torch path)
        self._lanes: np.ndarray | None = None  # compiled path: the SFC64 generators' states
        self._scratch = np.empty((0, kernels.LANES), dtype=np.uint64)  # compiled path: their latest words
        if generator.device.type == "cpu" and self.compiled:
            self._lanes = kernels.sfc64_lanes(int(torch.randint(2**62, (), generator=generator)))
        self._pool: torch.Tensor | None = None  # float32 uniforms
        self._next = 0  # first unused uniform of the pool

    def __call__(self, p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Binary samples with P(1) = p (to 2^-17), in p's shape and dtype (or into `out`)."""
        out = torch.empty_like(p, memory_format=torch.contiguous_format) if out is None else out
        if self._lanes is not None:
            kernels.bernoulli(kernels.flat(p.contiguous()), self._lanes, self._scratch_for(p), kernels.flat(out))
            return out
        u = self._uniforms(p.numel()).view(p.shape)
        return torch.lt(u, p, out=out)  # 0/1 in out's dtype

    def with_squared_error(self, p: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples of p as `__call__` makes them, and sum((p - v)^2) as a 0-dim tensor.

        A CD step's reconstruction p(v|h0) both starts its chain and is compared with the data v;
        on the CPU one compiled pass over p does both, instead of a second pass through memory.
        """
        if self._lanes is None:
            return self(p), torch.nn.functional.mse_loss(p, v, reduction="sum")
        out = torch.empty_like(p, memory_format=torch.contiguous_format)
        p_flat, v_flat, out_flat = kernels.flat(p.contiguous()), kernels.flat(v.contiguous()), kernels.flat(out)
        total = kernels.bernoulli_and_squared_error(p_flat, v_flat, self._lanes, self._scratch_for(p), out_flat)
        return out, torch.scalar_tensor(total, dtype=p.dtype)

    def scatter(self, p: torch.Tensor, index: torch.Tensor, out: torch.Tensor, chunk: int = 1 << 20) -> None:
        """out.view(-1)[index] = samples of p (flat), as `__call__` makes them, in chunks of `chunk`.

        A `Binarizer`'s redraw of its uncertain pixels: on the CPU one compiled pass writes each
        sample where it belongs, instead of sampling into a buffer and then `index_copy_`.
        """
        flat_out = out.view(-1)
        for start in range(0, p.numel(), chunk):
            p_part, where = p[start : start + chunk], index[start : start + chunk]
            if self._lanes is not None:
                p_np, where_np, out_np = kernels.flat(p_part), kernels.flat(where), kernels.flat(flat_out)
                kernels.bernoulli_scatter(p_np, where_np, self._lanes, self._scratch_for(p_part), out_np)
            else:
                samples = torch.empty(p_part.shape, dtype=out.dtype, device=out.device)
                flat_out.index_copy_(0, where, self(p_part, out=samples))

    def _scratch_for(self, p: torch.Tensor) -> np.ndarray:
        """Room for the random words of p's samples (CPU): grown when needed, then reused."""
        if self._scratch.shape[0] < kernels.scratch_rows(p.numel()):
            self._scratch = np.empty((kernels.scratch_rows(p.numel()), kernels.LANES), dtype=np.uint64)
        return self._scratch

    def _uniforms(self, n: int) -> torch.Tensor:
        """n fresh uniforms: a view into the pool, valid until the next call."""
        if self._pool is None or self._next + n > self._pool.numel():
            self._refill(n)
        u = self._pool[self._next : self._next + n]
        self._next += n
        return u

    def _refill(self, n: int) -> None:
        if self._pool is None or self._pool.numel() < n:
            size = max(self.block, -(-n // 4) * 4)  # four 16-bit uniforms per 64-bit word
            self._pool = torch.empty(size, dtype=torch.float32, device=self.generator.device)
        words = self._pool.numel() // 4
        # random_(-2**63, None) asks for the full 64-bit range: the default random_() on int64
        # draws in [0, 2**63), whose always-zero top bit would bias every fourth int16
        bits = torch.empty(words, dtype=torch.int64, device=self._pool.device)
        bits.random_(-(2**63), None, generator=self.generator)
        signed = bits.view(torch.int16)  # s - 32768, uniform on {-32768, ..., 32767}
        # u = (s + 0.5) / 65536 = 0.5 + 2^-17 + (s - 32768) / 65536, in one pass; exact in float32
        offset = torch.tensor(0.5 + 2.0**-17, device=self._pool.device)
        torch.add(offset, signed, alpha=2.0**-16, out=self._pool)
        self._next = 0


def visible_bias_from_means(means: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """log(p / (1 - p)) of the pixel means, clipped away from 0 and 1: the base-rate bias."""
    p = means.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)
