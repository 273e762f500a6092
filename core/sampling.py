"""Random states of the models in `core.models`: Bernoulli samplers, Gibbs chains, reconstructions.

Three samplers, one per need:
- `bernoulli`: exact to float32 (24-bit uniforms from `torch.rand`), for evaluation sets and figures;
- `FastBernoulli`: 16-bit uniforms from a compiled loop, for training's millions of samples a second;
- `AnnealingSampler`: 32-bit uniforms from the same compiled generators, for AIS's and RAISE's long
  chains, which must not inherit training's rounding.

A Gibbs round in an RBM is h ~ p(h | v), then v ~ p(v | h). The DBNs' reconstructions follow LAB.md
(task 2 and 3): an up pass of sampled states to the top RBM's visible layer, Gibbs rounds in the top
RBM, a down pass of sampled states, and p(v = 1 | ...) at the bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numba
import numpy as np
import torch

from rbm_study.core import kernels
from rbm_study.core.models import DBN, RBM, UpDownDBN

Model = RBM | DBN | UpDownDBN


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
    """Whether samplers made from now on draw CPU samples with the compiled loop, and CD steps on the
    CPU are the compiled step (`core.cpu_cd`). Off, samplers take the other devices' path (words
    from `generator`, torch's comparison) and CD steps torch's operations: what `tests/bench.py`
    times the compiled code against."""

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


def _words32(n: int) -> int:
    """Rows of SFC64 words (`kernels.LANES` each) that n samples of `_bernoulli32` take: two a word."""
    return -(-n // (2 * kernels.LANES))


def _scratch32(n: int) -> np.ndarray:
    """Room for the random words of n samples of `_bernoulli32`."""
    return np.empty((_words32(n), kernels.LANES), dtype=np.uint64)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _bernoulli32(p: np.ndarray, state: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> None:
    """out[i] = 1 if (s_i + 0.5) 2^-32 < p[i] else 0, s_i fresh 32-bit halves of SFC64 words.

    p[i] 2^32 is exact in float64 for float32 and float64 p, so P(out[i] = 1) is p[i] to 2^-33.
    """
    n = p.shape[0]
    words = scratch[: -(-n // (2 * state.shape[1]))]
    kernels.sfc64_fill(state, words)
    bits = words.reshape(-1).view(np.uint32)
    for i in range(n):
        out[i] = 1.0 if np.float64(bits[i]) + 0.5 < np.float64(p[i]) * 4294967296.0 else 0.0


class AnnealingSampler:
    """Bernoulli samples for AIS and RAISE, exact to float precision, made fast on the CPU.

    An annealing run draws one uniform per unit per step: millions per image for RAISE. `torch.rand`
    on the CPU makes them one at a time with the Mersenne twister, which for a small hidden layer
    costs more than the step's matrix products; here the 64 side-by-side SFC64 generators of
    `core.kernels` (seeded from one draw of `generator`) give two 32-bit uniforms per 64-bit word
    in one compiled loop, and P(sample = 1) is p to 2^-33, finer than a float32 p itself (the
    training sampler, `FastBernoulli`, rounds p to 2^-16, which a long annealing run should not
    inherit). Other devices, and float16 or bfloat16 models, use `bernoulli`.
    """

    def __init__(self, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype):
        self.generator = generator
        self._lanes: np.ndarray | None = None
        self._scratch = np.empty((0, kernels.LANES), dtype=np.uint64)
        if device.type == "cpu" and dtype in (torch.float32, torch.float64):
            seed = int(torch.randint(2**62, (), generator=generator))
            self._lanes = kernels.sfc64_lanes(seed)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        """Binary samples with P(1) = p, in p's shape and dtype."""
        if self._lanes is None:
            return bernoulli(p, self.generator)
        p = p.contiguous()
        out = torch.empty_like(p)
        if self._scratch.shape[0] < _words32(p.numel()):
            self._scratch = _scratch32(p.numel())
        _bernoulli32(kernels.flat(p), self._lanes, self._scratch, kernels.flat(out))
        return out

    def into(self, p: torch.Tensor, out: torch.Tensor) -> Callable[[], None]:
        """A call that redraws `out` ~ Bernoulli(p) in place, for buffers an annealing loop reuses.

        The draws are those `__call__` would make; the call skips its per-call allocations and
        conversions, which at tens of chains cost about as much as the sampling itself.
        """
        if self._lanes is None:
            return lambda: out.copy_(bernoulli(p, self.generator))
        if not (p.is_contiguous() and out.is_contiguous() and p.shape == out.shape):
            raise ValueError("AnnealingSampler.into needs contiguous tensors of one shape")
        lanes, p_np, out_np = self._lanes, kernels.flat(p), kernels.flat(out)
        scratch = _scratch32(p.numel())
        return lambda: _bernoulli32(p_np, lanes, scratch, out_np)


# --- chains ------------------------------------------------------------------------------------------
def gibbs_from_hidden(
    rbm: RBM, h: torch.Tensor, steps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`steps` rounds of v ~ p(v|h), h ~ p(h|v) from a hidden state.

    Returns (v sample, p(v|h) that produced it, hidden sample) of the last round.
    """
    if steps < 1:
        raise ValueError(f"gibbs steps must be >= 1, got {steps}")
    for _ in range(steps):
        pv = rbm.p_v(h)
        v = bernoulli(pv, generator)
        h = bernoulli(rbm.p_h(v), generator)
    return v, pv, h


def up(dbn: DBN, v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sampled states of the top RBM's visible layer (h_{L-1}) of a DBN, given binary data v."""
    h = v
    for layer in dbn.layers[:-1]:
        h = bernoulli(layer.p_h(h), generator)
    return h


def reconstruct(
    model: Model, v: torch.Tensor, gibbs_steps: int = 1, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lab's reconstruction: up to the top RBM's hidden layer, `gibbs_steps` (>= 1) rounds there
    in all (the first is the up pass's own step to the top), then down to p(v = 1 | ...).

    An RBM: h ~ p(h | v), `gibbs_steps - 1` more rounds, p(v | h). A DBN: the up pass with the
    layers' recognition weights and hidden biases; an UpDownDBN: with R and the recognition bias.
    Returns (visible probabilities, the final top hidden state).
    """
    if gibbs_steps < 1:
        raise ValueError(f"gibbs_steps must be >= 1, got {gibbs_steps}")
    if isinstance(model, RBM):
        h_top = bernoulli(model.p_h(v), generator)
    elif isinstance(model, DBN):
        h_top = bernoulli(model.top.p_h(up(model, v, generator)), generator)
    else:
        h_top = bernoulli(model.top.p_h(bernoulli(model.p_h1(v), generator)), generator)
    return generate(model, h_top, gibbs_steps - 1, generator)


def generate(
    model: Model, h_top: torch.Tensor, gibbs_steps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gibbs_steps` (>= 0) Gibbs rounds in the (top) RBM from its hidden state h_top, then down.

    Returns (p(v = 1 | ...) at the bottom, the final top hidden state).
    """
    top = model if isinstance(model, RBM) else model.top
    if gibbs_steps > 0:
        _, _, h_top = gibbs_from_hidden(top, h_top, gibbs_steps, generator)
    if isinstance(model, RBM):
        return model.p_v(h_top), h_top
    h = bernoulli(top.p_v(h_top), generator)
    if isinstance(model, UpDownDBN):
        return model.p_v(h), h_top
    for layer in reversed(model.layers[1:-1]):
        h = bernoulli(layer.p_v(h), generator)
    return model.layers[0].p_v(h), h_top
