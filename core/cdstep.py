"""One CD-k step on the CPU in one compiled call, the model cut across the cores by visible units.

Why: a CD-1 step of 100 MNIST images on a 784-100 RBM is five small matrix products and about
twenty small element-wise operations. Run as torch operations, each one is split across all the
threads and dispatched from Python on its own, so the threads meet ~25 times a step, and each
product's operands (W above all) are read by both cores. Here the visible units are cut into
`PARTS` column blocks [c_p, c_p+1): part p owns rows c_p..c_p+1 of W, those entries of the visible
bias a and those columns of the minibatch and of the chain, and the parts meet four times a step,
to add up the partial products S_p = v_p W_p of the hidden units' inputs:

    1. [parts]  S_p = v0_p W_p
    2. [rows]   ph0 = sigmoid(b + sum_p S_p);  h ~ ph0
    k times:
    3. [parts]  pv_p = sigmoid(a_p + h W_p');  vk_p ~ pv_p;  S_p = vk_p W_p
                (the first time also sum (pv_p - v0_p)^2: the reconstruction error)
    4. [rows]   phk = sigmoid(b + sum_p S_p);  h ~ phk  (not after the last step)
    5. [parts]  W_p <- decay W_p + lr/N (v0_p' ph0 - vk_p' phk)
                a_p += lr/N colsum(v0_p - vk_p);  b_p += lr/N colsum(ph0 - phk)  (b's own block)

With momentum m the step goes through the velocities (U, c, d) instead, as the torch path does:

    5. [parts]  U_p <- m U_p + lr/N (v0_p' ph0 - vk_p' phk) - lr wd W_p;  W_p += U_p
                c_p <- m c_p + lr/N colsum(v0_p - vk_p);  a_p += c_p  (d and b likewise)

which is the update of `core.train` (CD-k with probabilities for the hidden statistics, samples
driving the chain), computed in a different order. [parts] and [rows] are loops over the parts that
numba runs in parallel; in [rows] each part takes a block of the minibatch's rows (the hidden side
is N x H, small). The matrix products are MKL's sgemm, the copy that torch's CPU build
carries (found by name in libtorch_cpu; where it is missing, `available()` is False and training
keeps its torch path), run on one thread per part; the sigmoid is a compiled loop of its own.

Measured with `python -m core.bench` (interleaved rounds, medians of the ratios): a CD-1 epoch is
1.08-1.15x faster than on the torch path on an Intel AVX-512 2-core machine (ten runs), 1.12-1.41x
on an AMD EPYC 2-core machine (five runs), both with the exponential written out (see
`_sigmoid_row`), and was 1.06-1.24x on an older Intel 2-core machine with MKL's vsExp. On the AMD
machine the step runs 1.2-1.8x faster on two threads than on one, swinging from minute to minute,
and a pure arithmetic loop scales by 1.6x: two threads of these VMs are not quite two cores, and a
host's busy spells slow the two-thread step most.

Samples: as `core.rbm.FastBernoulli` draws them (16-bit uniforms, bias <= 2^-17), each part from
SFC64 lanes of its own, so the result depends on the seed and on `PARTS`, not on how many threads
run the parts or in which order.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llvmlite.binding
import numba
import numpy as np
import torch
from numba import prange, types
from rbm_study.core import kernels

PARTS = 2
"""Column blocks of the visible units: fixed, so that the same seed gives the same weights anywhere."""

_LIBRARY = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
_SYMBOLS = ("sgemm_", "MKL_Set_Num_Threads_Local")


def available() -> bool:
    """True where torch's CPU library carries MKL's sgemm (x86 Linux builds do)."""
    return _AVAILABLE


def _load() -> bool:
    try:
        library = ctypes.CDLL(str(_LIBRARY))
        if not all(hasattr(library, name) for name in _SYMBOLS):
            return False
        llvmlite.binding.load_library_permanently(str(_LIBRARY))  # compiled code finds them by name
    except OSError:
        return False
    return True


_AVAILABLE = _load()

# Pointers are passed as pointer-sized integers (`array.ctypes.data`): the same registers on x86-64.
_sgemm = types.ExternalFunction("sgemm_", types.void(*([types.intp] * 13)))  # Fortran: all by reference
_set_mkl_threads = types.ExternalFunction("MKL_Set_Num_Threads_Local", types.int32(types.int32))


# Every array below is a flat (1-D, C-contiguous) view of a row-major matrix, indexed by hand:
# numba vectorises loops over contiguous 1-D arrays, and not over 2-D slices of unknown strides.


@numba.njit(cache=True, nogil=True)
def _address(x: np.ndarray, offset: int) -> int:
    return x.ctypes.data + offset * x.itemsize


@numba.njit(cache=True, nogil=True)
def _gemm(
    trans_a: bool, trans_b: bool, m: int, n: int, k: int, alpha: float,
    A: int, lda: int, B: int, ldb: int, beta: float, C: int, ldc: int,
) -> None:  # fmt: skip
    """C <- alpha op(A) op(B) + beta C, row-major, given addresses and row strides (sgemm's names).

    Fortran's column-major sgemm sees a row-major matrix as its transpose, so it is asked for
    C' = op(B)' op(A)'.
    """
    ints = np.array([n, m, k, ldb, lda, ldc], dtype=np.int32)
    scalars = np.array([alpha, beta], dtype=np.float32)
    flags = np.array([ord("T") if trans_b else ord("N"), ord("T") if trans_a else ord("N")], dtype=np.uint8)
    _sgemm(
        _address(flags, 0), _address(flags, 1), _address(ints, 0), _address(ints, 1), _address(ints, 2),
        _address(scalars, 0), B, _address(ints, 3), A, _address(ints, 4), _address(scalars, 1), C, _address(ints, 5),
    )  # fmt: skip


# Cephes' expf: exp(t) = 2^n exp(r), n = round(t log2 e), r = t - n ln 2 (ln 2 in two parts, so
# that r is exact), exp(r) by a degree-7 polynomial on |r| <= ln2 / 2. The sigmoid built on it
# is within 2 ulp of the exact one rounded to float32, as torch's is (tests/core/test_cdstep.py).
_LOG2_E = np.float32(1.44269504088896341)
_LN2_HIGH, _LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                          4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))  # fmt: skip
# |t| <= 87: 2^n stays a normal float and so does sigmoid(-87) = 1.6e-38 (no slow denormals);
# beyond it the sigmoid is 0 or 1 to far below a 16-bit uniform's resolution (2^-17)
_EXP_LIMIT = np.float32(87.0)
_ONE, _HALF = kernels._ONE, kernels._HALF  # float32 1 and 0.5: numba keeps the loop in float32


# Inner loops run over 1-D slices indexed from 0: an index like `base + j` makes numba check for
# negative indices, and that check keeps the loop from vectorising. error_model="numpy" drops the
# ZeroDivisionError check of a division, for the same reason. "contract" lets the compiler fuse the
# polynomial's multiply-adds (1.3x faster here; the same result on every run of one machine).
@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
def _sigmoid_row(x: np.ndarray, bias: np.ndarray, mantissa: np.ndarray, exponent: np.ndarray) -> None:
    """x <- sigmoid(x + bias) = 1 / (1 + exp(-(x + bias))), the exponential written out (above).

    Why not MKL's vsExp, or numba's np.exp: on an AMD EPYC machine vsExp took 3.7 ns an
    element and np.exp calls libm's scalar expf; this loop vectorises (~0.9 ns an element, the
    whole sigmoid): there the compiled CD-1 epoch went from 1.05x faster than the torch path
    to 1.12-1.41x (`core.bench`). `mantissa` and `exponent` are scratch rows as long as x:
    exp(r), and 2^n built in its bits (read back as float32).
    """
    p0, p1, p2, p3, p4, p5 = _EXP_POLY
    power_of_two = exponent.view(np.float32)
    for j in range(x.shape[0]):
        t = -(x[j] + bias[j])
        t = _EXP_LIMIT if t > _EXP_LIMIT else t
        t = -_EXP_LIMIT if t < -_EXP_LIMIT else t  # NaN passes both and stays NaN in mantissa
        n = np.floor(t * _LOG2_E + _HALF)
        r = t - n * _LN2_HIGH - n * _LN2_LOW
        poly = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
        mantissa[j] = poly * r * r + r + _ONE
        exponent[j] = (np.int32(n) + np.int32(127)) << 23
    for j in range(x.shape[0]):
        x[j] = _ONE / (_ONE + mantissa[j] * power_of_two[j])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _sigmoid_block(
    x: np.ndarray, ld: int, r0: int, r1: int, c0: int, c1: int, bias: np.ndarray, work: np.ndarray
) -> None:
    """x[r, c] <- sigmoid(x[r, c] + bias[c]) on rows r0..r1, columns c0..c1 (work: 2 (c1 - c0) floats)."""
    width = c1 - c0
    mantissa, exponent = work[:width], work[width : 2 * width].view(np.int32)
    bias_part = bias[c0:c1]
    for r in range(r0, r1):
        _sigmoid_row(x[r * ld + c0 : r * ld + c1], bias_part, mantissa, exponent)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _sample_block(
    p: np.ndarray, out: np.ndarray, ld: int, r0: int, r1: int, c0: int, c1: int, state: np.ndarray, scratch: np.ndarray
) -> None:
    """out ~ bernoulli(p) on rows r0..r1, columns c0..c1, as `kernels.bernoulli` draws them."""
    width = c1 - c0
    bits = kernels._fresh_bits((r1 - r0) * width, state, scratch)
    for r in range(r0, r1):
        p_row, out_row = p[r * ld + c0 : r * ld + c1], out[r * ld + c0 : r * ld + c1]
        bits_row = bits[(r - r0) * width : (r - r0 + 1) * width]
        for j in range(width):
            out_row[j] = kernels._ONE if kernels._uniform(bits_row[j]) < p_row[j] else kernels._ZERO


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "contract"})
def _squared_error(p: np.ndarray, v: np.ndarray, ld: int, rows: int, c0: int, c1: int) -> float:
    """sum((p - v)^2) over columns c0..c1 of all rows (in float64; NaNs propagate)."""
    total = 0.0
    for r in range(rows):
        p_row, v_row = p[r * ld + c0 : r * ld + c1], v[r * ld + c0 : r * ld + c1]
        for j in range(c1 - c0):
            d = p_row[j] - v_row[j]
            total += d * d
    return total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _column_step(
    x: np.ndarray, y: np.ndarray, ld: int, rows: int, c0: int, c1: int, scale: float, out: np.ndarray,
    momentum: float, velocity: np.ndarray,
) -> None:  # fmt: skip
    """A bias update for c in c0..c1 from g[c] = sum_r (x[r, c] - y[r, c]):

    out[c] += scale g[c], or with momentum: velocity[c] <- momentum velocity[c] + scale g[c];
    out[c] += velocity[c].
    """
    total = np.zeros(c1 - c0, dtype=np.float32)
    for r in range(rows):
        x_row, y_row = x[r * ld + c0 : r * ld + c1], y[r * ld + c0 : r * ld + c1]
        for j in range(c1 - c0):
            total[j] += x_row[j] - y_row[j]
    part = out[c0:c1]
    if momentum == 0.0:
        for j in range(c1 - c0):
            part[j] += scale * total[j]
        return
    m, speed = np.float32(momentum), velocity[c0:c1]
    for j in range(c1 - c0):
        speed[j] = m * speed[j] + scale * total[j]
        part[j] += speed[j]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _apply_velocity(W: np.ndarray, velocity: np.ndarray, shrink: float) -> None:
    """velocity -= shrink W (weight decay, shrink = lr wd), then W += velocity: a block of rows of W."""
    s = np.float32(shrink)
    for j in range(W.shape[0]):
        velocity[j] -= s * W[j]
        W[j] += velocity[j]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _hidden_inputs(partial: np.ndarray, parts: int, size: int, r0: int, r1: int, H: int, out: np.ndarray) -> None:
    """out[r] = sum_p partial[p][r] on rows r0..r1, added in a fixed order (`size` = N * H per part)."""
    rows = out[r0 * H : r1 * H]
    rows[:] = partial[r0 * H : r1 * H]
    for q in range(1, parts):
        part = partial[q * size + r0 * H : q * size + r1 * H]
        for i in range(rows.shape[0]):
            rows[i] += part[i]


@numba.njit(cache=True, nogil=True)
def _cut(size: int, p: int, parts: int) -> tuple[int, int]:
    """Part p's block [lo, hi) of range(size) cut into `parts` nearly equal blocks."""
    return size * p // parts, size * (p + 1) // parts


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _hidden_rows(
    partial: np.ndarray, b: np.ndarray, n: int, p: int, parts: int, ph: np.ndarray, sample: bool,
    h: np.ndarray, state: np.ndarray, scratch: np.ndarray, work: np.ndarray,
) -> None:  # fmt: skip
    """Part p's block of rows of the hidden side: ph = sigmoid(b + sum_q S_q), and h ~ ph if `sample`."""
    H = b.shape[0]
    r0, r1 = _cut(n, p, parts)
    _hidden_inputs(partial, parts, n * H, r0, r1, H, ph)
    _sigmoid_block(ph, H, r0, r1, 0, H, b, work)
    if sample:
        _sample_block(ph, h, H, r0, r1, 0, H, state, scratch)


@numba.njit(cache=True, nogil=True, parallel=True, boundscheck=False)
def cd_step(
    v0: np.ndarray,
    W: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    n: int,
    k: int,
    scale: float,
    decay: float,
    ph0: np.ndarray,
    phk: np.ndarray,
    h: np.ndarray,
    pv: np.ndarray,
    vk: np.ndarray,
    partial: np.ndarray,
    lanes: np.ndarray,
    scratch: np.ndarray,
    work: np.ndarray,
    momentum: float,
    velocity_W: np.ndarray,
    velocity_a: np.ndarray,
    velocity_b: np.ndarray,
) -> float:
    """One CD-k update of (W, a, b) in place from the binary minibatch v0 [n, V] (module docstring).

    All matrices are flat row-major: v0, pv, vk [n, V], W [V, H], ph0, phk, h [n, H]. scale = lr / n,
    decay = 1 - lr * weight_decay. Writes ph0 and phk (p(h|v0), p(h|vk)), h (the last hidden
    sample), pv (p(v|h) of the last Gibbs step) and vk (its sample); `partial` [parts, n, H] holds
    the S_p, `lanes` [parts, 4, LANES], `scratch` [parts, words, LANES] and `work` [parts, 2 width]
    each part's random state, random words and sigmoid scratch rows. With momentum > 0 the
    velocities (shaped as W, a and b) are updated and added instead; without, they are not read.
    Returns the summed squared reconstruction error, sum((p(v|h0) - v0)^2).
    """
    parts = lanes.shape[0]
    V, H = a.shape[0], b.shape[0]
    size = n * H
    squared_error = np.zeros(parts)
    for p in prange(parts):  # 1
        previous = _set_mkl_threads(1)
        c0, c1 = _cut(V, p, parts)
        W_p, S_p = _address(W, c0 * H), _address(partial, p * size)
        _gemm(False, False, n, H, c1 - c0, 1.0, _address(v0, c0), V, W_p, H, 0.0, S_p, H)
        _set_mkl_threads(previous)
    for p in prange(parts):  # 2
        _hidden_rows(partial, b, n, p, parts, ph0, True, h, lanes[p], scratch[p], work[p])
    for step in range(k):
        for p in prange(parts):  # 3
            previous = _set_mkl_threads(1)
            c0, c1 = _cut(V, p, parts)
            W_p, S_p = _address(W, c0 * H), _address(partial, p * size)
            _gemm(False, True, n, c1 - c0, H, 1.0, _address(h, 0), H, W_p, H, 0.0, _address(pv, c0), V)
            _sigmoid_block(pv, V, 0, n, c0, c1, a, work[p])
            if step == 0:
                squared_error[p] = _squared_error(pv, v0, V, n, c0, c1)
            _sample_block(pv, vk, V, 0, n, c0, c1, lanes[p], scratch[p])
            _gemm(False, False, n, H, c1 - c0, 1.0, _address(vk, c0), V, W_p, H, 0.0, S_p, H)
            _set_mkl_threads(previous)
        for p in prange(parts):  # 4
            _hidden_rows(partial, b, n, p, parts, phk, step + 1 < k, h, lanes[p], scratch[p], work[p])
    for p in prange(parts):  # 5
        previous = _set_mkl_threads(1)
        c0, c1 = _cut(V, p, parts)
        if momentum == 0.0:  # straight into W: W_p <- decay W_p + scale (v0_p' ph0 - vk_p' phk)
            target, keep = _address(W, c0 * H), decay
        else:  # into the velocity: U_p <- momentum U_p + scale (...), then decay and W_p += U_p below
            target, keep = _address(velocity_W, c0 * H), momentum
        _gemm(True, False, c1 - c0, H, n, scale, _address(v0, c0), V, _address(ph0, 0), H, keep, target, H)
        _gemm(True, False, c1 - c0, H, n, -scale, _address(vk, c0), V, _address(phk, 0), H, 1.0, target, H)
        _set_mkl_threads(previous)
        if momentum != 0.0:
            _apply_velocity(W[c0 * H : c1 * H], velocity_W[c0 * H : c1 * H], 1.0 - decay)
        _column_step(v0, vk, V, n, c0, c1, scale, a, momentum, velocity_a)
        _column_step(ph0, phk, H, n, *_cut(H, p, parts), scale, b, momentum, velocity_b)
    return squared_error.sum()


_NO_VELOCITY = np.empty(0, dtype=np.float32)  # without momentum the step reads no velocity


def _start_numba_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count.

    Starting it (once a process, at the first parallel call) sets OpenMP's thread count to
    NUMBA_NUM_THREADS, which torch reads as its own: a Ray trial given one CPU went on with two
    torch threads after its first compiled step.
    """
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool, if not yet started
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class CDStep:
    """The buffers and random state of `cd_step` for one model: made once per training run."""

    def __init__(self, generator: torch.Generator, parts: int = PARTS):
        _start_numba_threads()
        seeds = np.random.SeedSequence(int(torch.randint(2**62, (), generator=generator))).generate_state(parts)
        self.lanes = np.stack([kernels.sfc64_lanes(int(seed)) for seed in seeds])
        self.generator = generator  # where the lanes were seeded from
        self.parts = parts
        self._shape: tuple[int, int, int] | None = None

    def _buffers(self, n: int, V: int, H: int) -> None:
        if self._shape == (n, V, H):
            return
        self._shape = (n, V, H)
        self.ph0, self.phk, self.h = (torch.empty(n, H) for _ in range(3))
        self.pv = torch.empty(n, V)
        self.partial = np.empty(self.parts * n * H, dtype=np.float32)
        width = max(-(-V // self.parts), H)  # the widest block of columns one part samples or squashes
        self.scratch = np.empty((self.parts, kernels.words_needed(n * width), kernels.LANES), dtype=np.uint64)
        self.work = np.empty((self.parts, 2 * width), dtype=np.float32)
        self._flat_buffers = tuple(kernels.flat(t) for t in (self.ph0, self.phk, self.h, self.pv))

    def __call__(
        self, v0: torch.Tensor, W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int, lr: float, decay: float,
        momentum: float = 0.0, velocity: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, float]:  # fmt: skip
        """CD-k on (W, a, b) in place at learning rate lr and weight decay `decay`.

        With `momentum` > 0, `velocity` holds the velocities of (W, a, b), updated in place.
        Returns (vk, the summed squared reconstruction error); p(h|v0), p(h|vk), the last hidden
        sample and p(v|h) stay in `ph0`, `phk`, `h` and `pv` until the next call.
        """
        if momentum and velocity is None:
            raise ValueError("momentum needs the velocities of W, a and b")
        n, (V, H) = v0.shape[0], W.shape
        self._buffers(n, V, H)
        vk = torch.empty(n, V)  # a new tensor: it outlives the step (the trainer's last_negative)
        numba.set_num_threads(max(1, min(self.parts, torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        flat = kernels.flat
        speeds = tuple(flat(t) for t in velocity) if momentum else (_NO_VELOCITY,) * 3
        error = cd_step(
            flat(v0), flat(W), flat(a), flat(b), n, k, lr / n, 1.0 - lr * decay, *self._flat_buffers, flat(vk),
            self.partial, self.lanes, self.scratch, self.work, momentum, *speeds,
        )  # fmt: skip
        return vk, error
