"""RAISE and AIS against exact answers.

Tiny models: the expectation of RAISE's weight is the annealed model's probability, computed here
by multiplying the annealing's transition matrices over every state. 784-20 RBMs trained on MNIST
the way studies train them (CD-1, CD-25, PCD-1 at learning rate 0.1): exact log-likelihoods by
enumeration against AIS's interval and RAISE at its default settings. Each tolerance is also shown
to fail a deliberately broken estimator (a flipped weight ratio, too few inverse temperatures).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rbm_study.core import evaluate
from rbm_study.core.data import TEST_BINARIZE_SEED, binarize_once, load_mnist
from rbm_study.core.evaluate import RAISE_BETAS, RAISE_CHAINS
from rbm_study.core.models import RBM, visible_bias_from_means
from rbm_study.core.sampling import AnnealingSampler
from rbm_study.core.train import CDSettings, train_rbm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/core/conftest.py


# --- tiny models: what RAISE's weights average to, exactly -----------------------------------------
def random_rbm(n_visible: int, n_hidden: int, seed: int, std: float = 1.0) -> RBM:
    g = torch.Generator().manual_seed(seed)
    return RBM(*(torch.randn(*shape, generator=g, dtype=torch.float64) * std
                 for shape in ((n_visible, n_hidden), (n_visible,), (n_hidden,))))


def all_states(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def factorial(p: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """[rows of p, states]: prod_i p_i^s_i (1 - p_i)^(1 - s_i)."""
    return torch.prod(p[:, None, :] ** states[None] * (1 - p[:, None, :]) ** (1 - states[None]), dim=-1)


def annealed_marginal(rbm: RBM, base: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """p_ann over every visible state: p_A T_1 T_2 ... T_K, T_k the Gibbs step v -> h -> v' at β_k."""
    v, h = all_states(rbm.n_visible), all_states(rbm.n_hidden)
    p = factorial(torch.sigmoid(base)[None], v)[0]
    for beta in betas[1:].tolist():
        h_given_v = factorial(torch.sigmoid(beta * (rbm.b + v @ rbm.W)), h)
        v_given_h = factorial(torch.sigmoid((1 - beta) * base + beta * (rbm.a + h @ rbm.W.T)), v)
        p = p @ (h_given_v @ v_given_h)
    return p


def log_mean_exp(log_w: torch.Tensor) -> float:
    return torch.logsumexp(log_w, dim=0).item() - math.log(log_w.numel())


TINY_BETAS = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
MONTE_CARLO_TOLERANCE = 0.02  # nats; 200,000 weights per image, observed errors below 0.007


def flipped_raise_log_weights(rbm: RBM, v: torch.Tensor, base: torch.Tensor, betas: torch.Tensor,
                              generator: torch.Generator) -> torch.Tensor:
    """A broken RAISE: each ratio p*_{k-1}/p*_k turned upside down (the sign of every increment).

    RAISE's log w is log p*_K(v) - log Z_A minus the sum of the increments, so the flipped
    estimator's weight is 2 (log p*_K(v) - log Z_A) - log w.
    """
    log_w = evaluate.raise_log_weights(rbm, v, base, betas, generator)
    head = evaluate.unnormalised_log_p(rbm, v) - evaluate.base_log_z(rbm, base)
    return 2 * head - log_w


def test_raise_weights_average_to_the_annealed_model_and_a_flipped_ratio_does_not() -> None:
    rbm = random_rbm(6, 3, seed=1, std=1.5)
    base = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.5
    p_ann = annealed_marginal(rbm, base, TINY_BETAS)
    exact_model = evaluate.unnormalised_log_p(rbm, all_states(6)) - evaluate.exact_log_z(rbm)
    images = (5, 17, 40, 63)
    for index in images:
        v = all_states(6)[index].repeat(200_000, 1)
        g = torch.Generator().manual_seed(index)
        estimate = log_mean_exp(evaluate.raise_log_weights(rbm, v, base, TINY_BETAS, g))
        assert estimate == pytest.approx(math.log(p_ann[index]), abs=MONTE_CARLO_TOLERANCE)
        broken = log_mean_exp(flipped_raise_log_weights(rbm, v, base, TINY_BETAS, g))
        assert abs(broken - math.log(p_ann[index])) > 10 * MONTE_CARLO_TOLERANCE
    # with three intermediate temperatures the annealed model is not the RBM: the check can tell them apart
    gaps = [abs(math.log(p_ann[index]) - exact_model[index].item()) for index in images]
    assert max(gaps) > 10 * MONTE_CARLO_TOLERANCE, gaps


def test_annealed_model_becomes_the_rbm_as_the_schedule_lengthens() -> None:
    rbm = random_rbm(6, 3, seed=3, std=1.5)
    base = torch.zeros(6, dtype=torch.float64)
    exact = evaluate.unnormalised_log_p(rbm, all_states(6)) - evaluate.exact_log_z(rbm)
    errors = [(annealed_marginal(rbm, base, evaluate.ais_betas(n)).log() - exact).abs().max().item()
              for n in (4, 30, 300)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01, errors


def test_raise_is_exact_for_the_base_model_and_keeps_each_images_chains_together() -> None:
    """W = 0, b = 0, a = a_A: every weight is p_A(v) exactly, so any mix-up of rows shows."""
    base = torch.linspace(-2, 2, 9, dtype=torch.float64)
    rbm = RBM(torch.zeros(9, 4, dtype=torch.float64), base.clone(), torch.zeros(4, dtype=torch.float64))
    v = all_states(9)[::37]
    expected = (v @ base - torch.nn.functional.softplus(base).sum()).tolist()
    result = evaluate.raise_log_likelihood(rbm, v, base, chains=3, betas=20, rows=7,
                                           generator=torch.Generator().manual_seed(0))
    assert result.per_image.tolist() == pytest.approx(expected, abs=1e-12)
    assert (result.images, result.chains, result.betas) == (len(v), 3, 20)
    assert result.log_likelihood == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert result.stderr == pytest.approx(torch.tensor(expected).std().item() / math.sqrt(len(v)))


def test_dbn_raise_weights_average_to_the_annealed_dbn() -> None:
    """E[p(v|h1) ŵ_top(h1) / Q(h1|v)] = sum_h1 p(v|h1) p_ann_top(h1), for any factorial Q."""
    g = torch.Generator().manual_seed(4)
    top = random_rbm(4, 3, seed=5, std=1.5)
    G = torch.randn(4, 5, generator=g, dtype=torch.float64)
    a = torch.randn(5, generator=g, dtype=torch.float64)
    R = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b_up = torch.randn(4, generator=g, dtype=torch.float64)
    base = torch.randn(4, generator=g, dtype=torch.float64) * 0.5
    h1, v = all_states(4), all_states(5)
    p_ann_top = annealed_marginal(top, base, TINY_BETAS)
    p_v = factorial(torch.sigmoid(a + h1 @ G), v).T @ p_ann_top  # [2^5]
    for index in (3, 22):
        images = v[index].repeat(100_000, 1)
        result = evaluate.dbn_raise_log_likelihood(images[:1], R, b_up, G, a, top, base, chains=200_000,
                                                   betas=TINY_BETAS, rows=200_000,
                                                   generator=torch.Generator().manual_seed(index))
        assert result.log_likelihood == pytest.approx(math.log(p_v[index]), abs=MONTE_CARLO_TOLERANCE)


def test_annealing_sampler_is_exact_at_the_ends_reproducible_and_unbiased() -> None:
    p = torch.tensor([0.0, 1.0, 1e-9, 0.25, 0.5, 0.9], dtype=torch.float32).repeat(200_000, 1)
    first = AnnealingSampler(torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)(p)
    again = AnnealingSampler(torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)(p)
    assert torch.equal(first, again) and first.dtype == torch.float32
    frequency = first.double().mean(dim=0)
    assert frequency[0] == 0 and frequency[1] == 1 and frequency[2] == 0
    assert frequency[3:].tolist() == pytest.approx([0.25, 0.5, 0.9], abs=0.004)  # 4 sigma at 200,000 draws
    sixty_four = AnnealingSampler(torch.Generator().manual_seed(1), torch.device("cpu"), torch.float64)
    assert sixty_four(p.double()).dtype == torch.float64


def test_annealing_sampler_into_a_buffer_draws_what_a_call_draws() -> None:
    p = torch.rand(50, 30, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.float16):  # the compiled loop, and torch's path
        called = AnnealingSampler(torch.Generator().manual_seed(0), torch.device("cpu"), dtype)
        into = AnnealingSampler(torch.Generator().manual_seed(0), torch.device("cpu"), dtype)
        probabilities, out = p.to(dtype), torch.empty(50, 30, dtype=dtype)
        redraw = into.into(probabilities, out)
        for _ in range(3):
            redraw()
            assert torch.equal(out, called(probabilities))


def plain_log_weights(
    rbm: RBM, a_A: torch.Tensor, v: torch.Tensor | None, beta: list[float], seed: int, chains: int = 0
) -> torch.Tensor:
    """AIS (v None) or RAISE (from v) from base rates a_A, step by step from the module docstring's formulas."""
    sample = AnnealingSampler(torch.Generator().manual_seed(seed), rbm.device, rbm.W.dtype)

    def log_p_star(k: int, v: torch.Tensor) -> torch.Tensor:
        x = (rbm.b + v @ rbm.W).double()
        return ((1 - beta[k]) * a_A + beta[k] * rbm.a).double() @ v.double().T + F.softplus(beta[k] * x).sum(1)

    def gibbs(k: int, v: torch.Tensor) -> torch.Tensor:
        h = sample(torch.sigmoid(beta[k] * (rbm.b + v @ rbm.W)))
        return sample(torch.sigmoid((1 - beta[k]) * a_A + beta[k] * (rbm.a + h @ rbm.W.T)))

    K = len(beta) - 1
    if v is None:
        v = sample(torch.sigmoid(a_A).expand(chains, -1))
        log_w = torch.zeros(chains, dtype=torch.float64)
        for k in range(1, K + 1):
            log_w += log_p_star(k, v) - log_p_star(k - 1, v)
            if k < K:
                v = gibbs(k, v)
        return log_w
    log_w = log_p_star(K, v) - evaluate.base_log_z(rbm, a_A)
    for k in range(K, 0, -1):
        v = gibbs(k, v)
        log_w += log_p_star(k - 1, v) - log_p_star(k, v)
    return log_w


def test_ais_and_raise_weights_are_the_formulas_written_out() -> None:
    """The annealing loops' fused steps against the formulas, with the same random numbers."""
    model = random_rbm(30, 8, seed=9, std=0.7)
    rbm = RBM(model.W.float(), model.a.float(), model.b.float())
    a_A = torch.linspace(-2.0, 1.0, 30)  # base rates of their own, as studies anneal from the pixel means
    beta = evaluate.ais_betas(60).tolist()
    ais = evaluate.ais_log_weights(rbm, a_A, chains=7, betas=60, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(ais, plain_log_weights(rbm, a_A, None, beta, seed=4, chains=7), rtol=0, atol=1e-4)
    v = (torch.rand(5, 30, generator=torch.Generator().manual_seed(5)) < 0.5).float()
    reverse = evaluate.raise_log_weights(rbm, v, a_A, betas=60, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(reverse, plain_log_weights(rbm, a_A, v, beta, seed=6), rtol=0, atol=1e-4)


def test_ais_repeats_pool_their_weights_and_report_the_spread() -> None:
    rbm = random_rbm(12, 6, seed=6, std=0.5)
    one = evaluate.ais_log_z(rbm, chains=20, betas=100, generator=torch.Generator().manual_seed(0))
    assert one.repeat_log_z == () and one.repeat_sd == 0.0
    three = evaluate.ais_log_z(rbm, chains=20, betas=100, repeats=3, generator=torch.Generator().manual_seed(0))
    assert len(three.repeat_log_z) == 3 and three.repeat_sd > 0 and three.chains == 20
    # the pooled estimate and its interval: one run of 60 chains (the same draws), its runs' log Z around it
    pooled = evaluate.ais_log_z(rbm, chains=60, betas=100, generator=torch.Generator().manual_seed(0))
    assert (three.log_z, three.low, three.high) == pytest.approx((pooled.log_z, pooled.low, pooled.high), abs=1e-9)
    assert min(three.repeat_log_z) <= three.log_z <= max(three.repeat_log_z)
    assert abs(three.log_z - evaluate.exact_log_z(rbm)) < 0.1
    assert len(set(three.repeat_log_z)) == 3  # different random numbers in each run


def test_log_likelihood_carries_the_log_z_interval_and_the_images_standard_error() -> None:
    scores = torch.tensor([-100.0, -110.0, -120.0, -130.0], dtype=torch.float64)
    log_z = evaluate.LogZEstimate(50.0, 49.0, 50.5, "ais", 10, 100)
    ll = evaluate.LogLikelihood.from_scores(scores, log_z)
    assert (ll.mean, ll.low, ll.high, ll.images) == (-165.0, -165.5, -164.0, 4)
    assert ll.stderr == pytest.approx(scores.std().item() / 2)
    unbounded = evaluate.LogLikelihood.from_scores(scores, evaluate.LogZEstimate(50.0, -math.inf, 51.0, "ais", 1, 3))
    assert unbounded.high == math.inf and unbounded.low == -166.0


# --- 784-20 RBMs trained on MNIST as studies train them --------------------------------------------
RAISE_TOLERANCE = 1.0  # nats: RAISE at its default settings against the exact mean log-likelihood
MONTE_CARLO_SLACK = 0.1  # nats: "closer with more betas" where both are already within this of exact
SCORED_IMAGES = 50  # the first test images (RAISE's cost grows with them; the gap is paired per image)
FEW_BETAS = 1000  # a too-short schedule: on CD-1 models RAISE's annealed model is then far from the RBM
# AIS settings and how far outside its 3-sigma interval exact may lie. At the full settings exact was
# inside the bare interval for six 784-20 RBMs trained on all of MNIST (CD-1 10 and 30 epochs, CD-10,
# CD-25 10 and 30 epochs, PCD-1) x 3 seeds, 18 of 18; at the quick study's settings only 14 of 18:
# the interval reflects the weights' spread, not the bias of a short schedule, and missed by up to
# 2.9 nats (CD-25, 30 epochs). So the quick settings are held to a nat beyond their interval here,
# and the report should not read their interval as a guarantee.
AIS_SETTINGS = {"quick": (32, 5000, 1.0), "full": (100, 14_500, 0.0)}  # chains, betas, margin (nats)
# name: (CD steps, persistent, epochs, training images); learning rate 0.1, minibatches of 100. CD-1
# for 30 epochs is the hardest case for RAISE (AIS's schedule of 14,500 leaves it 1.7 nats above
# exact there); CD-25 trains on a fifth of the images to keep the test in seconds.
MODELS = {
    "cd1": (1, False, 10, None),
    "cd1_30_epochs": (1, False, 30, None),
    "cd25": (25, False, 10, 10_000),
    "pcd1": (1, True, 10, None),
}
SHORT_SCHEDULE_BREAKS = ("cd1", "cd1_30_epochs")  # where 1,000 betas put RAISE more than a nat off


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_mnist(mnist_dir)


@pytest.fixture(scope="module")
def test_images(mnist) -> torch.Tensor:
    return binarize_once(mnist.test[:SCORED_IMAGES], seed=TEST_BINARIZE_SEED)


@pytest.fixture(scope="module")
def base_bias(mnist) -> torch.Tensor:
    return visible_bias_from_means(mnist.train.mean(dim=0))


_trained: dict[str, RBM] = {}
_exact_log_z: dict[int, float] = {}


def trained(name: str, mnist, base_bias: torch.Tensor) -> RBM:
    """A 784-20 RBM trained on MNIST (made once per test session)."""
    if name not in _trained:
        k, persistent, epochs, images = MODELS[name]
        g = torch.Generator().manual_seed(0)
        rbm = RBM.init(784, 20, generator=g, visible_bias=base_bias)
        settings = CDSettings(cd_k=k, persistent=persistent, learning_rate=0.1, epochs=epochs)
        _trained[name] = train_rbm(rbm, mnist.train[:images], settings, g)
    return _trained[name]


def exact_log_z(rbm: RBM) -> float:
    """Enumerated once per model (2^20 hidden states)."""
    if id(rbm) not in _exact_log_z:
        _exact_log_z[id(rbm)] = evaluate.exact_log_z(rbm)
    return _exact_log_z[id(rbm)]


def exact_per_image(rbm: RBM, v: torch.Tensor) -> torch.Tensor:
    return evaluate.unnormalised_log_p(rbm, v) - exact_log_z(rbm)


def ais_holds_exact(estimate: evaluate.LogZEstimate, exact_log_z: float, margin: float = 0.0) -> bool:
    """The tolerance for AIS: exact log Z inside its interval (so exact LL inside the LL interval),
    or within `margin` nats of the estimate."""
    low, high = min(estimate.low, estimate.log_z - margin), max(estimate.high, estimate.log_z + margin)
    return low <= exact_log_z <= high


def raise_error(rbm: RBM, v: torch.Tensor, base_bias: torch.Tensor, betas: int) -> float:
    """RAISE at the default chains per image minus the exact mean log-likelihood, in nats."""
    result = evaluate.raise_log_likelihood(rbm, v, base_bias, chains=RAISE_CHAINS, betas=betas,
                                           generator=torch.Generator().manual_seed(1))
    return result.log_likelihood - exact_per_image(rbm, v).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("settings", AIS_SETTINGS)
@pytest.mark.parametrize("name", MODELS)
def test_exact_log_likelihood_is_inside_the_ais_interval(name, settings, mnist, base_bias, test_images):
    rbm = trained(name, mnist, base_bias)
    exact = exact_log_z(rbm)
    chains, betas, margin = AIS_SETTINGS[settings]
    runs = [evaluate.ais_log_weights(rbm, base_bias, chains, betas, torch.Generator().manual_seed(0))]
    estimate = evaluate.log_z_from_log_weights(runs, evaluate.base_log_z(rbm, base_bias), betas)
    assert ais_holds_exact(estimate, exact, margin), (estimate, exact)
    ll = evaluate.LogLikelihood.from_scores(evaluate.unnormalised_log_p(rbm, test_images), estimate)
    exact_ll = exact_per_image(rbm, test_images).mean().item()
    assert min(ll.low, ll.mean - margin) <= exact_ll <= max(ll.high, ll.mean + margin)
    # broken: every ratio p*_k / p*_{k-1} turned upside down; the same check fails it
    flipped = evaluate.log_z_from_log_weights([-runs[0]], evaluate.base_log_z(rbm, base_bias), betas)
    assert not ais_holds_exact(flipped, exact, margin), (flipped, exact)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_raise_at_its_defaults_is_within_a_nat_of_exact_and_closer_than_with_few_betas(
    name, mnist, base_bias, test_images
):
    rbm = trained(name, mnist, base_bias)
    errors = {betas: raise_error(rbm, test_images, base_bias, betas) for betas in (FEW_BETAS, RAISE_BETAS)}
    assert abs(errors[RAISE_BETAS]) < RAISE_TOLERANCE, errors
    assert abs(errors[RAISE_BETAS]) < abs(errors[FEW_BETAS]) + MONTE_CARLO_SLACK, errors
    if name in SHORT_SCHEDULE_BREAKS:
        # broken: the too-short schedule fails the same tolerance (its annealed model is too smooth)
        assert errors[FEW_BETAS] > RAISE_TOLERANCE, errors
