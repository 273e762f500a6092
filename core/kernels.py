"""Bernoulli sampling on the CPU in one compiled loop (numba): random bits, comparison, sample.

Why: after its five matrix products, the largest cost of a CD-1 step of 100 MNIST images on a CPU
is drawing its ~90,000 Bernoulli samples. numpy's SFC64 makes one 64-bit word at a time, and torch's
CPU generator (a Mersenne twister) runs serially too; in torch, turning the bits into uniforms and
comparing them with p are two more passes through memory. Here 64 SFC64 generators step side by
side, so the compiler puts them in vector registers, and one loop turns bits and p into samples.
The benchmark (`python -m tests.bench`) times the trainer with and without the compiled code in
the same rounds; it stays only while it makes CD-1 epochs at least 1.15x faster. numba compiles these
functions for the machine at first use and caches the result next to this file (in the user's
cache where that is read-only); they run on the calling thread (no thread pool of numba's own).
Tensors on other devices take torch's ops instead (`core.sampling.FastBernoulli`).

The samplers take flat numpy views of contiguous CPU tensors (`flat`) and allocate nothing. They
serve the Binarizer's redraws, the up-down and greedy samples and the annealing chains; the CD step
itself is one C++ call with its own copy of this sampler (`core.cpu_cd`; the tests check the two
draw the same samples from the same state).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

# u = (s + 0.5) / 65536 for a 16-bit integer s: exact in float32 (17 significant bits)
_HALF = np.float32(0.5)
_TWO_TO_MINUS_16 = np.float32(2.0**-16)
_ONE, _ZERO = np.float32(1.0), np.float32(0.0)


def flat(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor: writes through it land in the tensor."""
    if not t.is_contiguous():
        raise ValueError("the fused CPU kernels need contiguous tensors")
    # called several times a training step: detach only where needed, it costs as much as the view
    return (t.detach() if t.requires_grad else t).numpy().reshape(-1)


LANES = 64
"""Independent SFC64 generators stepped side by side: the loop over them runs in vector registers."""


def sfc64_lanes(seed: int | np.random.SeedSequence) -> np.ndarray:
    """The [4, LANES] uint64 state (a, b, c, counter) of LANES SFC64 generators.

    Each lane is seeded exactly as numpy seeds `np.random.SFC64(child)` for the children of
    `SeedSequence(seed).spawn(LANES)` (or `seed.spawn(LANES)`), numpy's recipe for independent
    parallel streams; a lane's outputs are that generator's `random_raw()` stream, word for word
    (the tests check this).
    """
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    children = sequence.spawn(LANES)
    return np.array([np.random.SFC64(child).state["state"]["state"] for child in children], dtype=np.uint64).T.copy()


@numba.njit(cache=True, nogil=True, boundscheck=False)
def sfc64_fill(state: np.ndarray, out: np.ndarray) -> None:
    """out[k, lane] = the k-th next 64-bit output of each lane's SFC64; `state` moves on.

    SFC64 (Chris Doty-Humphrey's Small Fast Chaotic PRNG), as in numpy's sfc64.h:
    tmp = a + b + counter++;  a = b ^ (b >> 11);  b = c + (c << 3);  c = rotl(c, 24) + tmp.
    """
    a, b, c, counter = state[0], state[1], state[2], state[3]
    for k in range(out.shape[0]):
        for lane in range(a.shape[0]):
            tmp = a[lane] + b[lane] + counter[lane]
            counter[lane] += np.uint64(1)
            a[lane] = b[lane] ^ (b[lane] >> np.uint64(11))
            old_c = c[lane]
            b[lane] = old_c + (old_c << np.uint64(3))
            c[lane] = ((old_c << np.uint64(24)) | (old_c >> np.uint64(40))) + tmp
            out[k, lane] = tmp


BLOCK_ROWS = 16
"""Rows of random words made at a time (16 x LANES words, 8 KB): they are read back while still in
the fastest cache, instead of a whole call's words being written out and read back from memory."""


def words_needed(n: int) -> int:
    """Rows of `sfc64_fill` output that n samples take (four per 64-bit word)."""
    return -(-n // (4 * LANES))


def scratch_rows(n: int) -> int:
    """Rows of scratch the samplers below need for n samples: at most one block's."""
    return min(words_needed(n), BLOCK_ROWS)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _fresh_bits(n: int, state: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """n fresh 16-bit integers: the quarters of new words written into `scratch`."""
    words = scratch[: -(-n // (4 * state.shape[1]))]
    sfc64_fill(state, words)
    return words.reshape(-1).view(np.uint16)


@numba.njit(cache=True, nogil=True)
def _block(state: np.ndarray, scratch: np.ndarray) -> int:
    """Samples per block: whole rows of words, as many as `scratch` holds (at most BLOCK_ROWS)."""
    return 4 * state.shape[1] * max(1, min(scratch.shape[0], BLOCK_ROWS))


@numba.njit(cache=True, nogil=True)
def _uniform(s: np.uint16) -> np.float32:
    """u = (s + 0.5) / 65536."""
    return (np.float32(s) + _HALF) * _TWO_TO_MINUS_16


@numba.njit(cache=True, nogil=True, boundscheck=False)
def bernoulli(p: np.ndarray, state: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> None:
    """out[i] = 1 if u_i < p[i] else 0, u_i = (s_i + 0.5) / 65536 for fresh 16-bit integers s_i.

    The s_i are the 16-bit quarters of `sfc64_fill` words, in order, made a block at a time into
    `scratch` (at least `scratch_rows(len(p))` rows); the last word's leftover quarters are dropped.
    The blocks are whole rows, so the samples are those of all the words made at once.
    """
    n, block = p.shape[0], _block(state, scratch)
    for start in range(0, n, block):
        stop = min(start + block, n)
        bits = _fresh_bits(stop - start, state, scratch)
        p_part, out_part = p[start:stop], out[start:stop]
        for i in range(stop - start):
            out_part[i] = _ONE if _uniform(bits[i]) < p_part[i] else _ZERO


@numba.njit(cache=True, nogil=True, boundscheck=False)
def bernoulli_scatter(
    p: np.ndarray, index: np.ndarray, state: np.ndarray, scratch: np.ndarray, out: np.ndarray
) -> None:
    """out[index[i]] = 1 if u_i < p[i] else 0: `bernoulli`, each sample written where it belongs."""
    n, block = p.shape[0], _block(state, scratch)
    for start in range(0, n, block):
        stop = min(start + block, n)
        bits = _fresh_bits(stop - start, state, scratch)
        p_part, index_part = p[start:stop], index[start:stop]
        for i in range(stop - start):
            out[index_part[i]] = 1 if _uniform(bits[i]) < p_part[i] else 0


# reassoc lets the sum run in vector lanes; NaNs still propagate (no "nnan")
@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "contract"})
def bernoulli_and_squared_error(
    p: np.ndarray, v: np.ndarray, state: np.ndarray, scratch: np.ndarray, out: np.ndarray
) -> float:
    """`bernoulli(p, ...)`, returning sum((p - v)^2) (in float64) from the same pass over p.

    A CD step samples the chain from its reconstruction p(v|h0) and reports the reconstruction's
    squared error against the data v: one read of p does both.
    """
    n, block = p.shape[0], _block(state, scratch)
    total = 0.0
    for start in range(0, n, block):
        stop = min(start + block, n)
        bits = _fresh_bits(stop - start, state, scratch)
        p_part, v_part, out_part = p[start:stop], v[start:stop], out[start:stop]
        for i in range(stop - start):
            out_part[i] = _ONE if _uniform(bits[i]) < p_part[i] else _ZERO
            d = p_part[i] - v_part[i]
            total += d * d
    return total
