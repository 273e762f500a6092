"""core.evaluate against brute force over every state of tiny models, and against scikit-learn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.neural_network import BernoulliRBM

from rbm_study.core.evaluate import (
    MARKOV_NATS,
    LogZEstimate,
    ais_betas,
    ais_log_weights,
    ais_log_z,
    base_log_z,
    dbn_exact_log_likelihood,
    dbn_lower_bound,
    dbn_reconstruction_error,
    exact_log_z,
    free_energy_gap,
    log_z,
    log_z_from_log_weights,
    mean_log_likelihood,
    pseudo_log_likelihood,
    reconstruction_error,
)
from rbm_study.core.models import RBM

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/core/conftest.py


def random_rbm(n_visible: int, n_hidden: int, seed: int, std: float = 0.5, dtype: torch.dtype = torch.float64) -> RBM:
    g = torch.Generator().manual_seed(seed)
    return RBM(
        torch.randn(n_visible, n_hidden, generator=g, dtype=dtype) * std,
        torch.randn(n_visible, generator=g, dtype=dtype) * std,
        torch.randn(n_hidden, generator=g, dtype=dtype) * std,
    )


def all_states(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def brute_force_log_z(rbm: RBM) -> float:
    """logsumexp over every (v, h) pair of -E(v, h) = v'Wh + a'v + b'h."""
    v, h = all_states(rbm.n_visible), all_states(rbm.n_hidden)
    neg_energy = v @ rbm.W @ h.T + (v @ rbm.a)[:, None] + (h @ rbm.b)[None, :]
    return torch.logsumexp(neg_energy.flatten(), dim=0).item()


def binary_data(n: int, n_visible: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, n_visible, generator=g, dtype=torch.float64) < 0.4).double()


# --- partition function ----------------------------------------------------------------------------
@pytest.mark.parametrize(("n_visible", "n_hidden"), [(6, 4), (3, 7), (5, 5)])
def test_exact_log_z_matches_brute_force_over_both_layers(n_visible: int, n_hidden: int) -> None:
    rbm = random_rbm(n_visible, n_hidden, seed=n_visible * 10 + n_hidden, std=1.0)
    assert exact_log_z(rbm) == pytest.approx(brute_force_log_z(rbm), abs=1e-10)
    # chunking must not change the sum
    assert exact_log_z(rbm, chunk=3) == pytest.approx(brute_force_log_z(rbm), abs=1e-10)


def test_exact_log_z_float32_model_is_summed_in_float64() -> None:
    rbm64 = random_rbm(12, 9, seed=1, std=1.0)
    rbm32 = RBM(rbm64.W.float(), rbm64.a.float(), rbm64.b.float())
    assert exact_log_z(rbm32) == pytest.approx(exact_log_z(rbm64), abs=1e-4)


def test_exact_log_z_refuses_large_layers() -> None:
    rbm = RBM(torch.zeros(30, 25), torch.zeros(30), torch.zeros(25))
    with pytest.raises(ValueError, match="AIS"):
        exact_log_z(rbm)


@pytest.mark.parametrize(("n_visible", "n_hidden"), [(6, 4), (4, 9)])
def test_mean_log_likelihood_probabilities_sum_to_one(n_visible: int, n_hidden: int) -> None:
    rbm = random_rbm(n_visible, n_hidden, seed=3, std=1.0)
    z = exact_log_z(rbm)
    states = all_states(n_visible)
    probs = [math.exp(mean_log_likelihood(rbm, state[None, :], z)) for state in states]
    assert sum(probs) == pytest.approx(1.0, abs=1e-10)
    # the mean over rows is the mean of the per-row values
    mean = mean_log_likelihood(rbm, states, LogZEstimate(z, z, z, "exact", 0, 0))
    assert mean == pytest.approx(float(np.mean(np.log(probs))), abs=1e-10)


def test_ais_betas_default_is_the_papers_schedule() -> None:
    betas = ais_betas()
    assert betas.dtype == torch.float64
    assert len(betas) == 14500
    assert betas[0].item() == 0.0 and betas[-1].item() == 1.0
    assert bool((betas.diff() > 0).all())
    assert int((betas < 0.5).sum()) == 500
    assert int(((betas >= 0.5) & (betas < 0.9)).sum()) == 4000
    assert int((betas >= 0.9).sum()) == 10000
    steps = betas.diff()
    assert steps[:499].mean().item() == pytest.approx(1e-3)
    assert steps[-9999:].mean().item() == pytest.approx(1e-5)


@pytest.mark.parametrize("n", [3, 4, 100, 1000, 20000])
def test_ais_betas_scaled_keeps_the_shape(n: int) -> None:
    betas = ais_betas(n)
    assert len(betas) == n
    assert betas[0].item() == 0.0 and betas[-1].item() == 1.0
    assert bool((betas.diff() > 0).all())
    counts = [int((betas < 0.5).sum()), int(((betas >= 0.5) & (betas < 0.9)).sum())]
    assert min(counts) >= 1 and int((betas >= 0.9).sum()) >= 1
    if n >= 1000:
        assert counts[0] == pytest.approx(500 * n / 14500, abs=1)
        assert counts[1] == pytest.approx(4000 * n / 14500, abs=1)


def test_ais_betas_needs_three() -> None:
    with pytest.raises(ValueError):
        ais_betas(2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ais_is_close_to_exact_and_its_interval_holds_it(seed: int) -> None:
    rbm = random_rbm(20, 10, seed=seed, std=0.5, dtype=torch.float32)
    exact = exact_log_z(rbm)
    est = ais_log_z(rbm, chains=100, betas=1000, generator=torch.Generator().manual_seed(100 + seed))
    assert est.method == "ais" and est.chains == 100 and est.betas == 1000
    assert abs(est.log_z - exact) < 0.1  # observed |error| <= 0.06 over 16 seeds
    assert est.low <= exact <= est.high
    assert est.low < est.log_z < est.high


def test_ais_log_z_lower_end_is_markovs_floor_where_three_sigma_fails() -> None:
    """500 short AIS runs (2 chains x 20 betas) on a sharp enumerable model: the weights are so
    heavy-tailed that log(mean - 3 std) is -inf in most runs, yet exact log Z lies below the
    reported lower end in at most 5% of them, as Markov's inequality promises (observed 2%). A
    floor 0.5 nats under the estimate instead of ln 20 is above exact in 13% of these runs."""
    rbm = random_rbm(20, 10, seed=3, std=1.0)
    exact, runs, chains, betas = exact_log_z(rbm), 500, 2, 20
    log_w = ais_log_weights(rbm, None, runs * chains, betas, torch.Generator().manual_seed(1)).view(runs, chains)
    estimates = [log_z_from_log_weights([w], base_log_z(rbm), betas) for w in log_w]
    w = torch.exp(log_w - log_w.max(dim=1, keepdim=True).values)
    three_sigma_unbounded = (w.mean(dim=1) - 3 * w.std(dim=1) / math.sqrt(chains) <= 0).double().mean()
    assert three_sigma_unbounded > 0.5
    assert all(math.isfinite(e.low) and e.log_z - MARKOV_NATS - 1e-9 <= e.low < e.log_z for e in estimates)
    assert sum(e.low > exact for e in estimates) / runs <= 0.05
    assert sum(e.log_z - 0.5 > exact for e in estimates) / runs > 0.05


def test_ais_with_a_base_rate_bias() -> None:
    rbm = random_rbm(24, 12, seed=5, std=0.5, dtype=torch.float32)
    means = binary_data(500, 24, seed=6).float().mean(dim=0)
    base = torch.log(means) - torch.log1p(-means)
    est = ais_log_z(rbm, base_visible_bias=base, chains=100, betas=1000, generator=torch.Generator().manual_seed(7))
    assert abs(est.log_z - exact_log_z(rbm)) < 0.1


def test_ais_is_exact_when_the_model_is_the_base_model() -> None:
    a = torch.linspace(-2, 2, 15, dtype=torch.float64)
    rbm = RBM(torch.zeros(15, 6, dtype=torch.float64), a, torch.zeros(6, dtype=torch.float64))
    est = ais_log_z(rbm, base_visible_bias=a, chains=10, betas=50, generator=torch.Generator().manual_seed(0))
    assert est.log_z == pytest.approx(exact_log_z(rbm), abs=1e-12)
    assert est.low == pytest.approx(est.log_z) and est.high == pytest.approx(est.log_z)


def test_ais_accepts_an_explicit_schedule() -> None:
    rbm = random_rbm(10, 6, seed=8, std=0.5)
    schedule = torch.linspace(0, 1, 400, dtype=torch.float64)
    est = ais_log_z(rbm, chains=50, betas=schedule, generator=torch.Generator().manual_seed(0))
    assert est.betas == 400
    assert abs(est.log_z - exact_log_z(rbm)) < 0.1
    with pytest.raises(ValueError):
        ais_log_z(rbm, betas=torch.linspace(0.1, 1, 10))


def test_log_z_picks_the_method() -> None:
    small = random_rbm(30, 8, seed=9)
    exact = log_z(small)
    assert exact.method == "exact" and exact.low == exact.high == exact.log_z
    assert exact.chains == exact.betas == 0
    assert exact.log_z == pytest.approx(exact_log_z(small))
    assert log_z(small, "ais", chains=7, betas=30, generator=torch.Generator().manual_seed(0)).method == "ais"
    large = random_rbm(30, 21, seed=9, std=0.05)
    est = log_z(large, chains=7, betas=30, generator=torch.Generator().manual_seed(0))
    assert est.method == "ais" and est.chains == 7 and est.betas == 30
    with pytest.raises(ValueError):
        log_z(small, "guess")


# --- cheap signals ---------------------------------------------------------------------------------
def sklearn_rbm(rbm: RBM, seed: int) -> BernoulliRBM:
    model = BernoulliRBM(n_components=rbm.n_hidden, random_state=seed)
    model.components_ = rbm.W.T.numpy()
    model.intercept_hidden_ = rbm.b.numpy()
    model.intercept_visible_ = rbm.a.numpy()
    return model


def test_pseudo_log_likelihood_matches_sklearn_with_the_same_flips() -> None:
    rbm = random_rbm(12, 7, seed=10, std=1.0)
    v = binary_data(300, 12, seed=11)
    expected = sklearn_rbm(rbm, seed=12).score_samples(v.numpy()).mean()
    # sklearn flips unit RandomState(seed).randint(0, V, N)[n] of row n
    flip = torch.from_numpy(np.random.RandomState(12).randint(0, 12, 300))
    assert pseudo_log_likelihood(rbm, v, flip=flip) == pytest.approx(expected, abs=1e-10)


def test_pseudo_log_likelihood_matches_sklearn_on_average() -> None:
    rbm = random_rbm(16, 8, seed=13, std=1.0)
    v = binary_data(20000, 16, seed=14)
    ours = pseudo_log_likelihood(rbm, v, torch.Generator().manual_seed(15))
    theirs = sklearn_rbm(rbm, seed=16).score_samples(v.numpy()).mean()
    assert ours == pytest.approx(theirs, abs=0.15)  # both estimate the same mean, std error ~0.04


def test_reconstruction_error_limits() -> None:
    v = binary_data(50, 10, seed=17)
    # W = 0: p(v|h) = sigmoid(a) whatever h; with a = 0 every pixel errs by exactly 1/2
    flat = RBM(torch.zeros(10, 4), torch.zeros(10), torch.zeros(4))
    assert reconstruction_error(flat, v.float()) == pytest.approx(10 * 0.25)
    # strong identity-like weights reconstruct almost perfectly
    eye = RBM(torch.eye(10) * 40, torch.full((10,), -20.0), torch.full((10,), -20.0))
    assert reconstruction_error(eye, v.float(), torch.Generator().manual_seed(0)) < 1e-6


def test_free_energy_gap() -> None:
    rbm = random_rbm(10, 5, seed=18)
    big, small = binary_data(40, 10, seed=19), binary_data(30, 10, seed=20)

    def mean_f(v: torch.Tensor) -> float:
        return rbm.free_energy(v).mean().item()

    # equally many rows: the first min(N_train, N_val) of each, whichever set is larger
    assert free_energy_gap(rbm, big, small) == pytest.approx(mean_f(small) - mean_f(big[:30]), abs=1e-12)
    assert free_energy_gap(rbm, small, big) == pytest.approx(mean_f(big[:30]) - mean_f(small), abs=1e-12)
    assert free_energy_gap(rbm, big, big) == 0.0


# --- DBN -------------------------------------------------------------------------------------------
def tiny_dbn(seed: int, tied: bool) -> dict[str, torch.Tensor | RBM]:
    """V=8, H1=5, H2=4; tied: task 2 (R = W1, G = W1', b_up = rbm1.b, a = rbm1.a)."""
    rbm1, top = random_rbm(8, 5, seed=seed, std=1.0), random_rbm(5, 4, seed=seed + 1, std=1.0)
    if tied:
        return {"R": rbm1.W, "b_up": rbm1.b, "G": rbm1.W.T, "a": rbm1.a, "top": top}
    g = torch.Generator().manual_seed(seed + 2)
    R, G = (
        torch.randn(8, 5, generator=g, dtype=torch.float64),
        torch.randn(5, 8, generator=g, dtype=torch.float64),
    )
    return {"R": R, "b_up": torch.randn(5, generator=g, dtype=torch.float64), "G": G, "a": rbm1.a, "top": top}


def brute_force_dbn_log_p(v: torch.Tensor, G: torch.Tensor, a: torch.Tensor, top: RBM) -> torch.Tensor:
    """log p(v) per row, summing p(v|h1) p(h1, h2) over every (h1, h2) pair."""
    h1, h2 = all_states(top.n_visible), all_states(top.n_hidden)
    log_top = h1 @ top.W @ h2.T + (h1 @ top.a)[:, None] + (h2 @ top.b)[None, :]
    log_p_h1 = torch.logsumexp(log_top, dim=1) - torch.logsumexp(log_top.flatten(), dim=0)
    p_v = torch.sigmoid(h1 @ G + a)  # [S, V]
    log_p_v_given_h1 = v @ torch.log(p_v).T + (1 - v) @ torch.log1p(-p_v).T  # [N, S]
    return torch.logsumexp(log_p_v_given_h1 + log_p_h1, dim=1)


@pytest.mark.parametrize("tied", [False, True])
def test_dbn_exact_log_likelihood_matches_brute_force_and_normalises(tied: bool) -> None:
    m = tiny_dbn(seed=21, tied=tied)
    top = m["top"]
    z_top = exact_log_z(top)
    states = all_states(8)
    per_row = [dbn_exact_log_likelihood(s[None, :], m["G"], m["a"], top, z_top) for s in states]
    assert sum(math.exp(x) for x in per_row) == pytest.approx(1.0, abs=1e-10)
    expected = brute_force_dbn_log_p(states, m["G"], m["a"], top).mean().item()
    assert dbn_exact_log_likelihood(states, m["G"], m["a"], top, z_top) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("seed", [22, 23, 24])
@pytest.mark.parametrize("tied", [False, True])
def test_dbn_lower_bound_is_below_the_exact_log_likelihood(tied: bool, seed: int) -> None:
    m = tiny_dbn(seed=seed, tied=tied)
    top = m["top"]
    z_top = exact_log_z(top)
    v = binary_data(64, 8, seed=seed + 100)
    exact = dbn_exact_log_likelihood(v, m["G"], m["a"], top, z_top)
    bound = dbn_lower_bound(v, m["R"], m["b_up"], m["G"], m["a"], top, z_top)
    assert bound <= exact
    # row by row too (the bound holds for every v, not only on average)
    for row in v[:8]:
        row_bound = dbn_lower_bound(row[None, :], m["R"], m["b_up"], m["G"], m["a"], top, z_top, exact=True)
        assert row_bound <= dbn_exact_log_likelihood(row[None, :], m["G"], m["a"], top, z_top) + 1e-12
    assert exact - bound < (1.5 if tied else 6.0)  # a loose Q costs nats, not tens of nats


def test_dbn_lower_bound_is_tight_when_q_is_the_posterior() -> None:
    # a single-unit h1 with G = 0: the posterior is the prior, and R = 0, b_up = prior logit matches it
    top = RBM(
        torch.zeros(1, 3, dtype=torch.float64),
        torch.tensor([0.7], dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
    )
    v = binary_data(10, 4, seed=25)
    G, a = torch.zeros(1, 4, dtype=torch.float64), torch.linspace(-1, 1, 4, dtype=torch.float64)
    bound = dbn_lower_bound(v, torch.zeros(4, 1, dtype=torch.float64), top.a, G, a, top, exact_log_z(top))
    assert bound == pytest.approx(dbn_exact_log_likelihood(v, G, a, top, exact_log_z(top)), abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_dbn_monte_carlo_bound_agrees_with_the_enumerated_one(tied: bool) -> None:
    m = tiny_dbn(seed=26, tied=tied)
    top = m["top"]
    z_top = exact_log_z(top)
    v = binary_data(200, 8, seed=27)
    args = (v, m["R"], m["b_up"], m["G"], m["a"], top, z_top)
    enumerated = dbn_lower_bound(*args, exact=None)  # H1 = 5: auto means enumerate
    assert enumerated == pytest.approx(dbn_lower_bound(*args, exact=True), abs=1e-12)
    sampled = dbn_lower_bound(*args, samples=200, generator=torch.Generator().manual_seed(28), exact=False)
    assert sampled == pytest.approx(enumerated, abs=0.05)
    assert sampled != enumerated


def test_dbn_shapes_are_checked() -> None:
    m = tiny_dbn(seed=29, tied=True)
    with pytest.raises(ValueError):
        dbn_lower_bound(binary_data(3, 7, seed=0), m["R"], m["b_up"], m["G"], m["a"], m["top"], 0.0)
    with pytest.raises(ValueError):
        dbn_lower_bound(binary_data(3, 8, seed=0), m["R"][:, :4], m["b_up"], m["G"], m["a"], m["top"], 0.0)


def test_dbn_reconstruction_error() -> None:
    v = binary_data(40, 8, seed=30)
    m = tiny_dbn(seed=31, tied=True)
    args = (v, m["R"], m["b_up"], m["G"], m["a"], m["top"])
    errors = [
        dbn_reconstruction_error(*args, gibbs_steps=k, generator=torch.Generator().manual_seed(0)) for k in (1, 2, 5)
    ]
    assert all(0.0 <= e <= 8.0 for e in errors)
    # G = 0 and a = 0: every pixel is predicted 1/2
    flat = (
        v,
        m["R"],
        m["b_up"],
        torch.zeros(5, 8, dtype=torch.float64),
        torch.zeros(8, dtype=torch.float64),
        m["top"],
    )
    assert dbn_reconstruction_error(*flat) == pytest.approx(8 * 0.25)
    # a near-deterministic identity DBN reconstructs exactly
    eye = torch.eye(8, dtype=torch.float64) * 40
    top = RBM(eye, torch.full((8,), -20.0, dtype=torch.float64), torch.full((8,), -20.0, dtype=torch.float64))
    bias = torch.full((8,), -20.0, dtype=torch.float64)
    assert dbn_reconstruction_error(v, eye, bias, eye, bias, top, gibbs_steps=3) < 1e-6
    with pytest.raises(ValueError):
        dbn_reconstruction_error(*args, gibbs_steps=0)


def test_dbn_reconstruction_samples_h1_in_the_down_pass() -> None:
    # top RBM with p(h1_j = 1 | h2) = 1/2; the down pass sees h1_1 - h1_2 through G = 10 (e_1 - e_2)'1.
    # Sampled h1 predicts pixels ~0, 1/2 or ~1 (expected error 3 per image); the mean h1 would
    # predict 1/2 everywhere (error exactly 2).
    v = binary_data(400, 8, seed=32)
    zeros = torch.zeros(5, dtype=torch.float64)
    top = RBM(torch.zeros(5, 3, dtype=torch.float64), zeros, torch.zeros(3, dtype=torch.float64))
    G = torch.zeros(5, 8, dtype=torch.float64)
    G[0], G[1] = 10.0, -10.0
    R = torch.zeros(8, 5, dtype=torch.float64)
    error = dbn_reconstruction_error(
        v, R, zeros, G, torch.zeros(8, dtype=torch.float64), top, generator=torch.Generator().manual_seed(0)
    )
    assert error > 2.5
