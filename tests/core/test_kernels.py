"""The compiled CPU loops against independent references: numpy's SFC64, numpy arithmetic, torch."""

import numpy as np
import pytest
import torch

from rbm_study.core import kernels


def test_every_lane_is_numpys_sfc64_word_for_word():
    """Lane l's outputs are numpy's SFC64 seeded with child l of SeedSequence(seed), across calls."""
    seed = 12345
    state = kernels.sfc64_lanes(seed)
    first = np.empty((37, kernels.LANES), dtype=np.uint64)
    second = np.empty((5, kernels.LANES), dtype=np.uint64)
    kernels.sfc64_fill(state, first)
    kernels.sfc64_fill(state, second)  # the state moved on: the streams continue
    ours = np.concatenate([first, second])
    children = np.random.SeedSequence(seed).spawn(kernels.LANES)
    for lane, child in enumerate(children):
        np.testing.assert_array_equal(ours[:, lane], np.random.SFC64(child).random_raw(42))
    assert len(np.unique(ours)) == ours.size  # 64-bit words: a repeat would mean shared streams


@pytest.mark.parametrize(("n", "extra_rows"), [(1000, 2), (10_001, 0)])
def test_bernoulli_compares_each_16_bit_quarter_with_p(n: int, extra_rows: int):
    """out[i] = (s_i + 0.5) / 65536 < p[i], the s_i read from the words in order, in numpy.

    n is not a multiple of 4 * LANES: the last word's leftover quarters are dropped. 10,001 samples
    take three blocks of words in the least scratch (the last one partial); roomier scratch is fine.
    """
    p = np.random.default_rng(0).random(n, dtype=np.float32)
    state = kernels.sfc64_lanes(7)
    reference_state = state.copy()
    scratch = np.empty((kernels.scratch_rows(n) + extra_rows, kernels.LANES), dtype=np.uint64)
    out = np.full(n, 7.0, dtype=np.float32)
    kernels.bernoulli(p, state, scratch, out)

    words = np.empty((kernels.words_needed(n), kernels.LANES), dtype=np.uint64)
    kernels.sfc64_fill(reference_state, words)
    s = words.reshape(-1).view(np.uint16)[:n].astype(np.float64)
    np.testing.assert_array_equal(out, ((s + 0.5) / 65536 < p).astype(np.float32))
    np.testing.assert_array_equal(state, reference_state)  # it took exactly the words it needed


def test_bernoulli_scatter_writes_bernoullis_samples_at_the_index():
    g = np.random.default_rng(2)
    p = g.random(9000, dtype=np.float32)  # three blocks of words
    index = g.permutation(20_000)[:9000]
    scratch = np.empty((kernels.scratch_rows(len(p)), kernels.LANES), dtype=np.uint64)
    state, reference_state = kernels.sfc64_lanes(4), kernels.sfc64_lanes(4)
    out = np.full(20_000, 7, dtype=np.uint8)  # the training copy's dtype; untouched places keep their 7
    kernels.bernoulli_scatter(p, index, state, scratch, out)
    samples = np.empty_like(p)
    kernels.bernoulli(p, reference_state, scratch, samples)
    expected = np.full(20_000, 7, dtype=np.uint8)
    expected[index] = samples
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(state, reference_state)


def test_bernoulli_and_squared_error_is_bernoulli_plus_the_error_and_keeps_nans():
    g = np.random.default_rng(1)
    p, v = g.random(9000, dtype=np.float32), (g.random(9000) < 0.3).astype(np.float32)
    scratch = np.empty((kernels.scratch_rows(len(p)), kernels.LANES), dtype=np.uint64)
    state, reference_state = kernels.sfc64_lanes(3), kernels.sfc64_lanes(3)
    out, reference = np.empty_like(p), np.empty_like(p)
    total = kernels.bernoulli_and_squared_error(p, v, state, scratch, out)
    kernels.bernoulli(p, reference_state, scratch, reference)
    np.testing.assert_array_equal(out, reference)
    np.testing.assert_array_equal(state, reference_state)
    assert total == pytest.approx(((p.astype(np.float64) - v) ** 2).sum(), rel=1e-9)
    p[17] = np.nan  # a diverged model must not report a finite error
    assert np.isnan(kernels.bernoulli_and_squared_error(p, v, state, scratch, out))


def test_flat_is_a_writable_view_and_refuses_strided_tensors():
    t = torch.zeros(3, 4)
    kernels.flat(t)[5] = 1.0
    assert t[1, 1] == 1.0
    with pytest.raises(ValueError, match="contiguous"):
        kernels.flat(t.T)
