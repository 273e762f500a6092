"""Sums of rows (core.binary, core.kernels' index lists) against dense products and numpy."""

import numpy as np
import pytest
import torch

from rbm_study.core import binary, kernels
from rbm_study.core.binary import BinaryProducts


def sparse_states(n: int, V: int, density: float, seed: int) -> torch.Tensor:
    return (torch.rand(n, V, generator=torch.Generator().manual_seed(seed)) < density).float()


def test_ones_by_row_lists_each_rows_ones_in_order():
    v = sparse_states(37, 50, 0.2, seed=0)
    v[3] = 0  # an empty row
    v[5] = 1  # a full one
    v[7] = 0
    v[7, -1] = 1  # a row with one one, in the last column
    columns, starts = np.full(v.numel(), -1, dtype=np.int64), np.empty(38, dtype=np.int64)
    count = kernels.ones_by_row(v.numpy(), columns, starts, v.numel())
    rows, cols = np.nonzero(v.numpy())
    assert count == len(cols)
    np.testing.assert_array_equal(columns[:count], cols)
    np.testing.assert_array_equal(starts, np.searchsorted(rows, np.arange(38)))
    # past the limit it stops at the end of the row that crossed it
    crossing = int(np.searchsorted(np.cumsum(v.sum(1).numpy()), 100, side="right"))
    assert kernels.ones_by_row(v.numpy(), columns, starts, 100) == int(v[: crossing + 1].sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_of_rows_are_the_dense_products(dtype: torch.dtype):
    n, V, H = 40, 60, 7
    g = torch.Generator().manual_seed(1)
    v0, vk = sparse_states(n, V, 0.15, seed=2).to(dtype), sparse_states(n, V, 0.12, seed=3).to(dtype)
    v0[0] = 0
    W, b = torch.randn(V, H, generator=g, dtype=dtype), torch.randn(H, generator=g, dtype=dtype)
    P = torch.rand(2 * n, H, generator=g, dtype=dtype)
    products = BinaryProducts(n, V, dtype)
    assert products.locate(0, v0) and products.locate(1, vk)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for slot, v in ((0, v0), (1, vk)):
        out = torch.empty(n, H, dtype=dtype)
        assert products.times(slot, W, b, out=out) is out
        torch.testing.assert_close(out, b + v @ W, **tol)
    step = products.outer(P, 0.3)
    torch.testing.assert_close(step[:V], 0.3 * (v0.T @ P[:n] - vk.T @ P[n:]), **tol)
    torch.testing.assert_close(step[V], 0.3 * (P[:n].sum(0) - P[n:].sum(0)), **tol)  # the hidden bias's step
    torch.testing.assert_close(products.visible_step, 0.3 * (v0.sum(0) - vk.sum(0)), **tol)


def test_dense_states_are_left_to_the_dense_products():
    n, V = 20, 30
    products = BinaryProducts(n, V, torch.float32)
    assert not products.locate(0, sparse_states(n, V, 0.6, seed=0))
    assert products.locate(0, sparse_states(n, V, binary.MAX_DENSITY / 2, seed=0))
