"""Quantitative evaluation of Bernoulli RBMs and two-layer DBNs (LAB.md, "Measuring a generative model").

An RBM (see `core.models`) with visible bias a, hidden bias b and weights W defines

    p(v) = exp(-F(v)) / Z,      F(v) = -a'v - sum_j softplus(b_j + v'W_j)
    p(h) = exp(-F(h)) / Z,      F(h) = -b'h - sum_i softplus(a_i + W_i h)
    Z    = sum_v exp(-F(v)) = sum_h exp(-F(h))

Partition function
------------------
Exact: enumerate the smaller layer, 2^min(V, H) terms,

    log Z = logsumexp_h [b'h + sum_i softplus(a_i + W_i h)]      (H <= V)
    log Z = logsumexp_v [a'v + sum_j softplus(b_j + v'W_j)]      (V < H)

Annealed importance sampling (Salakhutdinov & Murray, "On the quantitative analysis of deep
belief networks", ICML 2008): anneal from the base-rate model A (W = 0, b = 0, visible bias a_A,
usually log(m / (1 - m)) of the training pixel means m, so that Z_A is known in closed form,
log Z_A = H log 2 + sum_i softplus(a_A_i)) to the model B through the unnormalised marginals

    p*_k(v) = exp((1 - β_k) a_A'v + β_k a_B'v) prod_j (1 + exp(β_k (b_j + v'W_j))),
    0 = β_0 < β_1 < ... < β_K = 1.

Each of M chains starts from an exact sample v_0 ~ p_A and moves with one Gibbs step at β_k,

    h ~ sigmoid(β_k (b + v W)),    v ~ sigmoid((1 - β_k) a_A + β_k (a_B + W h)),

which leaves p_k invariant. The importance weight of a chain is

    w = prod_{k=1..K} p*_k(v_{k-1}) / p*_{k-1}(v_{k-1})

and E[w] = Z_B / Z_A, so log Z_B ≈ log Z_A + log mean(w). AIS tends to underestimate log Z (hence
to overestimate log-likelihood) when the schedule or the number of chains is too small. The
reported spread is the paper's, log(mean(w) ∓ 3 std(w) / sqrt(M)) + log Z_A, with one rigorous
floor under its lower end. mean(w) is unbiased for Z_B / Z_A at any schedule and any M, so by
Markov's inequality P(log mean(w) > log(Z_B / Z_A) + t) <= e^-t: with probability at least 95%,

    log Z_B >= log Z_A + log mean(w) - ln 20,

however heavy the weights' tail. On sharp models the 3-sigma lower end is often -inf (the sample
std is dominated by one chain); the floor keeps the log-likelihood's upper end finite, at most
ln 20 = 3.0 nats above the estimate. The upper end of log Z has no such partner (AIS cannot bound
log Z from above); RAISE gives the log-likelihood's conservative side instead.

RAISE: the other direction
--------------------------
Reverse AIS estimation (Burda, Grosse & Salakhutdinov, "Accurate and conservative estimates of MRF
log-likelihood using reverse annealing", AISTATS 2015). AIS's chains, v_0 ~ p_A and
v_k ~ T_k(. | v_{k-1}) for k = 1..K with T_k the Gibbs step at β_k (h ~ p_k(h|v), v' ~ p_k(v|h)),
end in a distribution of their own, the *annealed model*

    p_ann(v) = sum_{v_0..v_{K-1}} p_A(v_0) prod_{k=1..K} T_k(v_k | v_{k-1}),   v_K = v,

which tends to the RBM as the schedule lengthens. RAISE runs that chain backwards from an image:
v_K = v, then v_{k-1} ~ T_k(. | v_k) for k = K, ..., 1. The first move is a Gibbs step of the RBM
itself, so it starts from a hidden state drawn from the image's exact posterior p(h | v). Each
T_k is reversible with respect to p_k (p_k(v) T_k(v'|v) = sum_h p_k(h) p_k(v|h) p_k(v'|h) is
symmetric in v and v'), so the ratio of the forward path's probability to the reverse one's is

    w = p*_K(v) / Z_A · prod_{k=0..K-1} p*_k(v_k) / p*_{k+1}(v_k)          (p*_0 / Z_A = p_A)

with the same unnormalised p*_k as AIS, and E[w] = p_ann(v) exactly. Z_A is known in closed form,
so nothing is estimated but w: log mean_m w_m over M chains is a stochastic lower bound on
log p_ann(v) (below it in expectation by Jensen, and above it by t nats with probability at most
e^-t by Markov). It is conservative for the RBM only when p_ann is close to the RBM: with a short
schedule p_ann is a smoother model, which can score test images higher than the RBM does, so the
schedule must be long (the defaults are validated on enumerable 784-20 RBMs, where RAISE lies
within a nat of exact and moves toward it as the schedule lengthens: tests/core/test_raise.py).
More chains per image move the estimate up toward log p_ann, which on those models lay above
exact: one chain per image is the more conservative, and the cheaper, choice. The images x chains
rows run side by side; the chains in the model's dtype, log w in float64. AIS leans the other way
(log Z low, log-likelihood high). Neither is a guaranteed bound at finite settings (on sharp
models both came out above exact), so their disagreement is reported as what it is: uncertainty.

DBN: per chain draw h1 ~ Q(h1 | v) and take w = p(v | h1) ŵ_top(h1) / Q(h1 | v), ŵ_top(h1) the
RAISE weight of the top RBM started at its visible state h1 (base-rate model on h1, as for AIS).
Then E[w] = sum_h1 p(v | h1) p_ann_top(h1), the probability of v under the DBN whose top RBM is
replaced by its annealed model; log mean_m w_m is a stochastic lower bound on it. It does not use
log Z_top at all, and with M > 1 it is an importance-weighted bound, at least as tight in
expectation as the single-sample variational bound below in its Q part (Burda, Grosse &
Salakhutdinov 2016).

Uncertainty
-----------
A mean log-likelihood over N images, mean_n(-F(v_n)) - log Z, carries two errors. log Z's
interval [log Z_low, log Z_high] (AIS's 3 sigma, floored by Markov's bound) gives

    LL_low = mean(-F(v)) - log Z_high,     LL_high = mean(-F(v)) - log Z_low,

and the images are a sample of the digits' distribution: stderr = std_n(log p(v_n)) / sqrt(N).
AIS may be repeated (independent runs, with different random numbers): the estimate then pools all
repeats x chains weights (one AIS run with that many chains), and the standard deviation of the
runs' own log Z says how far a single run of `chains` chains can be trusted (the pooled estimate's
is about that over sqrt(repeats)).

Log-likelihood and cheap signals
--------------------------------
    mean log p(v)       = mean(-F(v)) - log Z
    reconstruction err  = mean over images of sum_i (v_i - p(v_i = 1 | h))^2,   h ~ p(h|v)
    pseudo-log-lik.     = V log sigmoid(F(ṽ) - F(v)),  ṽ = v with one random unit flipped
                          (the estimator of scikit-learn's BernoulliRBM.score_samples)
    free-energy gap     = mean F(validation) - mean F(training), on equally many rows; positive
                          and growing means overfitting (Hinton's practical guide, section 6)

Two-layer DBN
-------------
Generative model: p(h1) is the top RBM's marginal over its visible layer h1 (hidden layer h2),
p(v | h1) = prod_i Bernoulli(sigmoid(h1 G + a)_i). Recognition: the factorial
Q(h1 | v) = prod_j Bernoulli(sigmoid(v R + b_up)_j). For any Q (Salakhutdinov & Murray, section 4)

    log p(v) >= sum_h1 Q(h1|v) [log p(v|h1) + log p*_top(h1)] - log Z_top + H(Q(.|v)),

with log p*_top(h1) = -F_top(h1) and H the entropy of Q. The expectation is taken by enumerating
h1 when H1 is small, otherwise by Monte Carlo with samples from Q; H(Q) is always exact. For a
DBN of two greedily trained RBMs (task 2) R = W1, G = W1', b_up = the first RBM's hidden bias and
a = its visible bias; for the fine-tuned DBN (task 3) R = R1, G = G1 and b_up = the recognition
bias. Everything that sums many terms or takes log-sum-exp runs in float64; the AIS chains and the
reconstructions run in the model's dtype, the annealing chains (AIS, RAISE) with the exact samples
of `AnnealingSampler`. All work happens on the tensors' device.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rbm_study.core.models import RBM, UpDownDBN
from rbm_study.core.sampling import AnnealingSampler, bernoulli, reconstruct
from rbm_study.core.threads import AdaptiveThreads

MAX_EXACT_UNITS = 24
"""Largest layer `exact_log_z` will enumerate (2^24 states)."""
AUTO_EXACT_UNITS = 20
"""`log_z(method="auto")` is exact up to this many units in the smaller layer."""
AUTO_EXACT_DBN_UNITS = 16
"""`dbn_lower_bound(exact=None)` enumerates h1 up to this many units."""
AUTO_EXACT_DBN_PAIRS = 2**24
"""... and while rows x 2^H1 stays below this (the enumeration costs rows x 2^H1 x V)."""
MAX_EXACT_DBN_UNITS = 20
PAPER_SEGMENTS = ((0.0, 0.5, 500), (0.5, 0.9, 4000), (0.9, 1.0, 10000))
"""(start, end, inverse temperatures) of Salakhutdinov & Murray's 14,500-step AIS schedule."""
# The same paper's Table 2: MNIST test log-probability (nats) of RBMs with PAPER_HIDDEN hidden
# units, by the k of their CD-k training, from AIS with that schedule and 100 chains (LAB.md).
PAPER_HIDDEN = 500
PAPER_TEST_LL = {1: -125.5, 3: -105.5, 25: -86.3}


@dataclass(frozen=True)
class LogZEstimate:
    """A log partition function and its spread; for the exact method low = high = log_z."""

    log_z: float
    low: float
    high: float
    method: str  # "exact" | "ais"
    chains: int  # AIS chains (per repeat), 0 for exact
    betas: int  # AIS inverse temperatures, 0 for exact
    repeat_log_z: tuple[float, ...] = ()  # each AIS run's own log Z when it was repeated (`ais_repeats`)

    @property
    def repeat_sd(self) -> float:
        """Standard deviation of log Z over the AIS repeats; 0 for one run or the exact method."""
        return statistics.stdev(self.repeat_log_z) if len(self.repeat_log_z) > 1 else 0.0


# --- helpers ---------------------------------------------------------------------------------------
def _float64(rbm: RBM) -> RBM:
    return RBM(rbm.W.double(), rbm.a.double(), rbm.b.double())


def _binary_states(start: int, stop: int, n_units: int, device: torch.device) -> torch.Tensor:
    """Rows start..stop-1 of the 2^n_units binary states (bit j of the row number is unit j)."""
    index = torch.arange(start, stop, device=device)
    bits = torch.arange(n_units, device=device)
    return ((index[:, None] >> bits) & 1).double()


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _like(x: torch.Tensor, rbm: RBM) -> torch.Tensor:
    return x.to(device=rbm.device, dtype=rbm.W.dtype)


# --- partition function ----------------------------------------------------------------------------
@torch.no_grad()
def exact_log_z(rbm: RBM, chunk: int = 2**14) -> float:
    """log Z by enumerating the smaller layer, `chunk` states at a time, in float64."""
    n_units = min(rbm.n_visible, rbm.n_hidden)
    if n_units > MAX_EXACT_UNITS:
        raise ValueError(f"exact log Z enumerates 2^{n_units} states; {MAX_EXACT_UNITS} units at most, use AIS")
    model = _float64(rbm)
    # -F of the enumerated layer is its unnormalised log-probability.
    free_energy = model.hidden_free_energy if rbm.n_hidden <= rbm.n_visible else model.free_energy
    parts = _chunks(2**n_units, chunk)
    partial = torch.empty(len(parts), dtype=torch.float64, device=rbm.device)
    for i, (start, stop) in enumerate(parts):
        states = _binary_states(start, stop, n_units, rbm.device)
        partial[i] = torch.logsumexp(-free_energy(states), dim=0)
    return torch.logsumexp(partial, dim=0).item()


def ais_betas(n: int = 14500) -> torch.Tensor:
    """Inverse temperatures 0 = β_0 < ... < β_{n-1} = 1, float64, shaped like the paper's schedule.

    For n = 14500: 500 values uniformly spaced in [0, 0.5), 4000 in [0.5, 0.9) and 10000 in
    (0.9, 1] (steps 1e-3, 1e-4, 1e-5). Other n scale the three counts by n / 14500, at least one each.
    """
    if n < 3:
        raise ValueError(f"an AIS schedule needs at least 3 inverse temperatures, got {n}")
    reference = sum(count for _, _, count in PAPER_SEGMENTS)
    first, second = (max(1, round(count * n / reference)) for _, _, count in PAPER_SEGMENTS[:2])
    counts = (first, second, n - first - second)
    (s0, e0, _), (s1, e1, _), (s2, e2, _) = PAPER_SEGMENTS
    return torch.cat(
        [
            torch.linspace(s0, e0, counts[0] + 1, dtype=torch.float64)[:-1],
            torch.linspace(s1, e1, counts[1] + 1, dtype=torch.float64)[:-1],
            torch.linspace(s2, e2, counts[2] + 1, dtype=torch.float64)[1:],
        ]
    )


def _schedule(betas: int | torch.Tensor) -> list[float]:
    """A count for `ais_betas` or an explicit schedule, checked, as python floats (no device syncs)."""
    schedule = ais_betas(betas) if isinstance(betas, int) else betas.detach().double().cpu()
    if schedule.dim() != 1 or len(schedule) < 2 or schedule[0] != 0 or schedule[-1] != 1:
        raise ValueError("the annealing schedule must be 1-D, start at 0 and end at 1")
    if not bool((schedule.diff() > 0).all()):
        raise ValueError("the annealing schedule must increase")
    return schedule.tolist()


def _base_bias(rbm: RBM, base_visible_bias: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(rbm.a) if base_visible_bias is None else _like(base_visible_bias, rbm)


def base_log_z(rbm: RBM, base_visible_bias: torch.Tensor | None = None) -> float:
    """log Z_A = H log 2 + sum_i softplus(a_A_i) of the base-rate model (W = 0, b = 0, a = a_A)."""
    a_A = _base_bias(rbm, base_visible_bias)
    return rbm.n_hidden * math.log(2) + F.softplus(a_A.double()).sum().item()


class _TemperedChains:
    """Chains of the tempered family p*_k (module docstring), one per row, for AIS and RAISE.

    Both estimators alternate two moves at β_k: the Gibbs step T_k, and the log ratio
    log p*_k(v) - log p*_{k-1}(v) at the chains' states,

        (β_k - β_{k-1}) (a_B - a_A)'v + sum_j softplus(β_k x_j) - softplus(β_{k-1} x_j),   x = b + vW.

    With tens of chains the matrix products are small and each torch operation's fixed cost, not
    its arithmetic, sets the pace, so a step is a few operations on buffers made once: both
    temperatures' softplus come from one operation on [rows, 2, H] (float64: their difference is
    tiny beside them), its sum with signs from one matrix-vector product, and the Bernoulli draws
    go straight into their buffers. The chains run in the model's dtype, the log ratios in float64.
    """

    def __init__(self, rbm: RBM, a_A: torch.Tensor, v: torch.Tensor, beta: list[float], sample: AnnealingSampler):
        rows, H = v.shape[0], rbm.n_hidden
        self.rbm, self.a_A, self.a_diff, self.beta = rbm, a_A, rbm.a - a_A, beta
        self.v = v.clone(memory_format=torch.contiguous_format)  # the chains' visible states
        self.x = torch.addmm(rbm.b, self.v, rbm.W)  # b + vW at those states
        self.p_h, self.h = (torch.empty(rows, H, dtype=v.dtype, device=v.device) for _ in range(2))
        self.p_v = torch.empty_like(self.v)
        self.linear = torch.empty(rows, dtype=v.dtype, device=v.device)  # (a_B - a_A)'v
        self.sample_h, self.sample_v = sample.into(self.p_h, self.h), sample.into(self.p_v, self.v)
        # (β_k, β_{k-1}) as a float64 column for each k >= 1, and +1 / -1 to sum their softplus' difference
        b64 = torch.tensor(beta, dtype=torch.float64, device=v.device)
        self.pairs = torch.stack([b64[1:], b64[:-1]], dim=1).unsqueeze(-1).unbind(0)
        self.signs = torch.cat([b64.new_ones(H), -b64.new_ones(H)])

    def add_log_ratio(self, log_w: torch.Tensor, k: int, sign: float = 1.0) -> None:
        """log_w += sign (log p*_k(v) - log p*_{k-1}(v)) at the chains' current states."""
        both = F.softplus(self.x.unsqueeze(1) * self.pairs[k - 1])  # [rows, 2, H], float64
        log_w.addmv_(both.view(both.shape[0], -1), self.signs, alpha=sign)
        torch.mv(self.v, self.a_diff, out=self.linear)
        log_w.add_(self.linear, alpha=sign * (self.beta[k] - self.beta[k - 1]))

    def gibbs(self, k: int) -> None:
        """One Gibbs step at β_k: h ~ sigmoid(β_k x), v ~ sigmoid((1 - β_k) a_A + β_k (a_B + W h))."""
        beta, rbm = self.beta[k], self.rbm
        torch.mul(self.x, beta, out=self.p_h).sigmoid_()
        self.sample_h()
        visible_bias = torch.lerp(self.a_A, rbm.a, beta)
        torch.addmm(visible_bias, self.h, rbm.W.T, alpha=beta, out=self.p_v).sigmoid_()
        self.sample_v()
        torch.addmm(rbm.b, self.v, rbm.W, out=self.x)


@torch.no_grad()
def ais_log_weights(
    rbm: RBM,
    base_visible_bias: torch.Tensor | None = None,
    chains: int = 100,
    betas: int | torch.Tensor = 14500,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """log w of `chains` AIS chains (float64, on the model's device); E[w] = Z_B / Z_A."""
    beta = _schedule(betas)
    a_A = _base_bias(rbm, base_visible_bias)
    sample = AnnealingSampler(generator, rbm.device, rbm.W.dtype)
    run = _TemperedChains(rbm, a_A, sample(torch.sigmoid(a_A).expand(chains, -1)), beta, sample)
    log_w = torch.zeros(chains, dtype=torch.float64, device=rbm.device)
    with AdaptiveThreads().running(enabled=rbm.device.type == "cpu") as threads:
        for k in range(1, len(beta)):
            run.add_log_ratio(log_w, k)
            if k < len(beta) - 1:  # one Gibbs step that leaves p_k invariant
                run.gibbs(k)
            threads.step()
    return log_w


MARKOV_NATS = math.log(20.0)
"""How far below log mean(w) a log-mean of unbiased weights can lie at 95%: Markov's inequality."""


def _log_mean_exp_interval(log_w: torch.Tensor) -> tuple[float, float, float]:
    """log mean(w) and log(mean(w) -/+ 3 std(w) / sqrt(M)), computed relative to the largest weight.

    The lower end is never below log mean(w) - ln 20 (Markov's bound, module docstring), which
    is where it lies when mean(w) - 3 std(w) / sqrt(M) is not positive.
    """
    count = log_w.numel()
    top = log_w.max()
    w = torch.exp(log_w - top)
    mean = w.mean()
    half_width = 3 * (w.std() if count > 1 else torch.zeros_like(mean)) / math.sqrt(count)
    estimate, high = (top + torch.log(mean)).item(), (top + torch.log(mean + half_width)).item()
    low_w = mean - half_width
    low = (top + torch.log(low_w)).item() if low_w.item() > 0 else -math.inf
    return estimate, max(low, estimate - MARKOV_NATS), high


@torch.no_grad()
def ais_log_z(
    rbm: RBM,
    base_visible_bias: torch.Tensor | None = None,
    chains: int = 100,
    betas: int | torch.Tensor = 14500,
    generator: torch.Generator | None = None,
    repeats: int = 1,
) -> LogZEstimate:
    """AIS estimate of log Z from the base-rate model (module docstring).

    `base_visible_bias`: a_A, e.g. `visible_bias_from_means(train.mean(0))`; zeros when None.
    `betas`: a count for `ais_betas` or an increasing schedule from 0 to 1. `generator` must live on
    the model's device. The chains run in the model's dtype, the log weights accumulate in float64.

    `repeats` > 1 makes that many independent AIS runs of `chains` chains each. AIS's chains never
    interact, so the runs go side by side as one batch of repeats x chains rows (the matrix products
    are more efficient so): the estimate and its interval use all repeats x chains weights (one run
    with that many chains, the unbiased estimate of Z with the most data), and `repeat_log_z` keeps
    each run's own log Z, whose spread says how far one run of `chains` chains can be trusted.
    """
    if repeats < 1:
        raise ValueError(f"AIS repeats must be >= 1, got {repeats}")
    log_w = ais_log_weights(rbm, base_visible_bias, chains * repeats, betas, generator)
    betas_count = betas if isinstance(betas, int) else len(betas)
    return log_z_from_log_weights(list(log_w.view(repeats, chains)), base_log_z(rbm, base_visible_bias), betas_count)


def log_z_from_log_weights(runs: list[torch.Tensor], log_z_base: float, betas: int) -> LogZEstimate:
    """AIS's estimate from the log weights of one or more runs of equally many chains.

    log Z = log Z_A + log mean(w) over all the runs' weights, with the interval of the module
    docstring; each run's own log Z goes to `repeat_log_z` when there are several.
    """
    chains = runs[0].numel()
    estimate, low, high = _log_mean_exp_interval(torch.cat(runs))
    per_run = tuple(log_z_base + torch.logsumexp(w, dim=0).item() - math.log(w.numel()) for w in runs)
    return LogZEstimate(log_z_base + estimate, log_z_base + low, log_z_base + high, "ais", chains, betas,
                        per_run if len(runs) > 1 else ())


def log_z(rbm: RBM, method: str = "auto", **ais_kwargs: Any) -> LogZEstimate:
    """log Z by "exact" enumeration, "ais", or "auto" (exact when min(V, H) <= 20).

    `ais_kwargs` go to `ais_log_z` and are ignored when the exact method is used.
    """
    if method == "auto":
        method = "exact" if min(rbm.n_visible, rbm.n_hidden) <= AUTO_EXACT_UNITS else "ais"
    if method == "exact":
        value = exact_log_z(rbm)
        return LogZEstimate(value, value, value, "exact", 0, 0)
    if method == "ais":
        return ais_log_z(rbm, **ais_kwargs)
    raise ValueError(f"unknown log Z method {method!r}; use 'exact', 'ais' or 'auto'")


# --- RBM scores ------------------------------------------------------------------------------------
@torch.no_grad()
def unnormalised_log_p(rbm: RBM, v: torch.Tensor) -> torch.Tensor:
    """-F(v) = log p(v) + log Z for each row of binary v, float64, on the model's device."""
    return -_float64(rbm).free_energy(v.to(device=rbm.device, dtype=torch.float64))


@dataclass(frozen=True)
class LogLikelihood:
    """A mean log-likelihood with its two uncertainties (module docstring, "Uncertainty").

    `low` and `high` carry log Z's interval through (the lower end of log Z gives the upper end of
    the log-likelihood); `stderr` is the standard deviation over images / sqrt(images), the error
    of scoring a sample of images rather than their whole distribution.
    """

    mean: float
    low: float
    high: float
    stderr: float
    images: int

    @classmethod
    def from_scores(cls, scores: torch.Tensor, log_z: LogZEstimate) -> LogLikelihood:
        """From per-image log p(v) + log Z (`unnormalised_log_p`, `dbn_lower_bound_per_image`)."""
        centre = scores.double().mean().item()
        return cls(centre - log_z.log_z, centre - log_z.high, centre - log_z.low, standard_error(scores),
                   scores.numel())


@torch.no_grad()
def mean_log_likelihood(rbm: RBM, v: torch.Tensor, log_z: float | LogZEstimate) -> float:
    """Mean over the rows of binary v of log p(v) = -F(v) - log Z, in float64."""
    value = log_z.log_z if isinstance(log_z, LogZEstimate) else log_z
    return unnormalised_log_p(rbm, v).mean().item() - value


@torch.no_grad()
def reconstruction_error(rbm: RBM, v: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """Mean over images of sum_i (v_i - p(v_i = 1 | h))^2 with h ~ p(h | v)."""
    v = _like(v, rbm)
    return ((v - reconstruct(rbm, v, 1, generator)[0]) ** 2).sum(dim=1).mean().item()


@torch.no_grad()
def pseudo_log_likelihood(
    rbm: RBM,
    v: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    flip: torch.Tensor | None = None,
) -> float:
    """Mean over rows of V log sigmoid(F(ṽ) - F(v)), ṽ = v with unit `flip[n]` of row n flipped.

    `flip` is drawn uniformly (one unit per row) when None; scikit-learn's
    BernoulliRBM.score_samples computes the same per-row estimator.
    """
    model = _float64(rbm)
    v = v.to(device=rbm.device, dtype=torch.float64)
    rows = torch.arange(v.shape[0], device=rbm.device)
    if flip is None:
        flip = torch.randint(rbm.n_visible, (v.shape[0],), generator=generator, device=rbm.device)
    flip = flip.to(rbm.device)
    flipped = v.clone()
    flipped[rows, flip] = 1 - flipped[rows, flip]
    delta = model.free_energy(flipped) - model.free_energy(v)
    return (rbm.n_visible * F.logsigmoid(delta)).mean().item()


@torch.no_grad()
def free_energy_gap(rbm: RBM, train_v: torch.Tensor, val_v: torch.Tensor) -> float:
    """mean F(validation) - mean F(training) over the first min(N_train, N_val) rows of each."""
    n = min(train_v.shape[0], val_v.shape[0])
    model = _float64(rbm)
    train_f = model.free_energy(train_v[:n].to(device=rbm.device, dtype=torch.float64))
    val_f = model.free_energy(val_v[:n].to(device=rbm.device, dtype=torch.float64))
    return (val_f.mean() - train_f.mean()).item()


# --- RAISE: reverse annealing from the data -------------------------------------------------------
@dataclass(frozen=True)
class RaiseEstimate:
    """RAISE's log-likelihood estimates of the scored images (module docstring, "RAISE").

    Each per-image value is a stochastic lower bound on log p_ann(v), the annealed model's
    log-probability of that image; `log_likelihood` is their mean and `stderr` their standard
    deviation over images / sqrt(images), the sampling error of scoring a subset of the test set.
    """

    log_likelihood: float
    per_image: torch.Tensor  # float64, on the CPU
    stderr: float
    images: int
    chains: int  # reverse chains per image
    betas: int  # inverse temperatures of the schedule


# RAISE's defaults, validated against exact log-likelihoods of 784-20 RBMs trained on
# MNIST with CD-1, CD-10, CD-25 and PCD-1 (tests/core/test_raise.py): one reverse chain per image
# and 50,000 inverse temperatures put RAISE within a nat of exact on all of them, where 14,500 (AIS's
# schedule) left it up to 1.7 nats above exact on a CD-1 model trained for 30 epochs, and more
# chains per image move it up, not down (toward the annealed model, which lies above the RBM).
RAISE_IMAGES = 50
RAISE_CHAINS = 1
RAISE_BETAS = 50_000
RAISE_ROWS = 1024
"""Rows (images x chains) annealed side by side: enough for efficient matrix products, small
enough for the CPU's caches."""


@torch.no_grad()
def raise_log_weights(
    rbm: RBM,
    v: torch.Tensor,
    base_visible_bias: torch.Tensor | None = None,
    betas: int | torch.Tensor = RAISE_BETAS,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """log w of one reverse chain per row of binary v (float64, on the model's device).

    E[w] = p_ann(v) (module docstring). Each row anneals from its image back to the base-rate
    model: the first move is a Gibbs step of the RBM itself, h ~ p(h | v) (the image's exact
    posterior), then v ~ p(v | h); the k-th move is a Gibbs step at β_k, for k = K, ..., 1.
    The chains run in the model's dtype, the log weights accumulate in float64.
    """
    beta = _schedule(betas)
    a_A = _base_bias(rbm, base_visible_bias)
    v = _like(v, rbm)
    log_w = unnormalised_log_p(rbm, v) - base_log_z(rbm, base_visible_bias)  # log p*_K(v) - log Z_A
    run = _TemperedChains(rbm, a_A, v, beta, AnnealingSampler(generator, rbm.device, rbm.W.dtype))
    with AdaptiveThreads().running(enabled=rbm.device.type == "cpu") as threads:
        for k in range(len(beta) - 1, 0, -1):
            run.gibbs(k)  # the move T_k: a Gibbs step that leaves p_k invariant (and is its own reversal)
            run.add_log_ratio(log_w, k, sign=-1.0)  # log p*_{k-1}(v_{k-1}) - log p*_k(v_{k-1})
            threads.step()
    return log_w


@torch.no_grad()
def raise_log_likelihood(
    rbm: RBM,
    v: torch.Tensor,
    base_visible_bias: torch.Tensor | None = None,
    chains: int = RAISE_CHAINS,
    betas: int | torch.Tensor = RAISE_BETAS,
    generator: torch.Generator | None = None,
    rows: int = RAISE_ROWS,
) -> RaiseEstimate:
    """RAISE (Burda, Grosse & Salakhutdinov 2015) for every row of binary v, `chains` chains each.

    Per image, log mean_m w_m over its chains: a stochastic lower bound on log p_ann(v) (module
    docstring). The images x chains rows run in batches of about `rows`.
    """
    return _raise_per_image(
        v, chains, betas, rows, lambda batch: raise_log_weights(rbm, batch, base_visible_bias, betas, generator)
    )


@torch.no_grad()
def dbn_raise_log_likelihood(
    v: torch.Tensor,
    R: torch.Tensor,
    b_up: torch.Tensor,
    G: torch.Tensor,
    a: torch.Tensor,
    top: RBM,
    base_visible_bias: torch.Tensor | None = None,
    chains: int = RAISE_CHAINS,
    betas: int | torch.Tensor = RAISE_BETAS,
    generator: torch.Generator | None = None,
    rows: int = RAISE_ROWS,
) -> RaiseEstimate:
    """RAISE for a two-layer DBN (module docstring): per chain h1 ~ Q(h1 | v), then reverse annealing
    of the top RBM from h1 to its base-rate model (visible bias `base_visible_bias` on h1).

    Per image, log mean_m [p(v | h1_m) ŵ_top(h1_m) / Q(h1_m | v)]: a stochastic lower bound on the
    annealed DBN's log p(v). R, b_up, G, a and `top` as in `dbn_lower_bound`.
    """
    _check_dbn(v, G, a, top)
    top = top.to(G.device)
    R64, b64, G64, a64 = R.double(), b_up.double(), G.double(), a.double()

    def log_weights(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device=G.device, dtype=torch.float64)
        logits = torch.addmm(b64, batch, R64)  # Q(h1_j = 1 | v) = σ(logits_j)
        h1 = bernoulli(torch.sigmoid(logits), generator)
        log_q = (h1 * F.logsigmoid(logits) + (1 - h1) * F.logsigmoid(-logits)).sum(dim=1)
        z = torch.addmm(a64, h1, G64)
        log_p_v_given_h1 = (batch * z).sum(dim=1) - F.softplus(z).sum(dim=1)
        log_w_top = raise_log_weights(top, h1, base_visible_bias, betas, generator)
        return log_p_v_given_h1 - log_q + log_w_top

    return _raise_per_image(v, chains, betas, rows, log_weights)


def _raise_per_image(
    v: torch.Tensor,
    chains: int,
    betas: int | torch.Tensor,
    rows: int,
    log_weights: Callable[[torch.Tensor], torch.Tensor],
) -> RaiseEstimate:
    """log mean_m w_m per image, each image's `chains` rows side by side, about `rows` rows a batch."""
    if chains < 1:
        raise ValueError(f"RAISE needs at least one chain per image, got {chains}")
    images = v.shape[0]
    if images < 1:
        raise ValueError("RAISE needs at least one image")
    per_image = []
    for start, stop in _chunks(images, max(1, rows // chains)):
        batch = v[start:stop].repeat_interleave(chains, dim=0)  # image n's chains: rows n*M .. n*M + M-1
        log_w = log_weights(batch).view(stop - start, chains)
        per_image.append(torch.logsumexp(log_w, dim=1) - math.log(chains))
    values = torch.cat(per_image).cpu()
    betas_count = betas if isinstance(betas, int) else len(betas)
    return RaiseEstimate(values.mean().item(), values, standard_error(values), images, chains, betas_count)


def standard_error(values: torch.Tensor) -> float:
    """std(values) / sqrt(n) (0 for a single value): the sampling error of their mean."""
    n = values.numel()
    return values.double().std().item() / math.sqrt(n) if n > 1 else 0.0


# --- two-layer DBN ---------------------------------------------------------------------------------
def _check_dbn(v: torch.Tensor, G: torch.Tensor, a: torch.Tensor, top: RBM) -> None:
    H1, V = G.shape
    if v.shape[1] != V or a.shape != (V,) or top.n_visible != H1:
        raise ValueError(
            f"DBN shapes do not fit: v {tuple(v.shape)}, G {tuple(G.shape)}, a {tuple(a.shape)}, "
            f"top RBM visible {top.n_visible}"
        )


def _log_joint(v: torch.Tensor, h1: torch.Tensor, G: torch.Tensor, a: torch.Tensor, top: RBM) -> torch.Tensor:
    """log p(v | h1) + log p*_top(h1) for every pair of rows: [N, S] from v [N, V] and h1 [S, H1].

    log p(v|h1) = sum_i v_i log σ(z_i) + (1 - v_i) log σ(-z_i) = v'z - sum_i softplus(z_i),
    z = h1 G + a.
    """
    z = torch.addmm(a, h1, G)
    return v @ z.T - F.softplus(z).sum(dim=1) - top.free_energy(h1)


def _log_joint_paired(v: torch.Tensor, h1: torch.Tensor, G: torch.Tensor, a: torch.Tensor, top: RBM) -> torch.Tensor:
    """log p(v_n | h1_n) + log p*_top(h1_n), row by row: [N] from v [N, V] and h1 [N, H1]."""
    z = torch.addmm(a, h1, G)
    return (v * z).sum(dim=1) - F.softplus(z).sum(dim=1) - top.free_energy(h1)


def _states_per_chunk(v: torch.Tensor) -> int:
    """Enumerated h1 states per step so that the [rows, states] matrices stay near 2^22 entries."""
    return max(1, 2**22 // v.shape[0])


def _dbn_inputs(
    v: torch.Tensor, G: torch.Tensor, a: torch.Tensor, top: RBM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RBM]:
    _check_dbn(v, G, a, top)
    device = G.device
    return (
        v.to(device=device, dtype=torch.float64),
        G.double(),
        a.to(device=device, dtype=torch.float64),
        _float64(top.to(device)),
    )


@torch.no_grad()
def dbn_lower_bound_per_image(
    v: torch.Tensor,
    R: torch.Tensor,
    b_up: torch.Tensor,
    G: torch.Tensor,
    a: torch.Tensor,
    top: RBM,
    samples: int = 10,
    generator: torch.Generator | None = None,
    exact: bool | None = None,
) -> torch.Tensor:
    """Per row, the variational lower bound on log p(v) + log Z_top of a two-layer DBN (float64).

    The bound of `dbn_lower_bound` before the top RBM's log partition function is subtracted, one
    value per row (for the standard error over images and for comparisons image by image).

    R [V, H1] and b_up [H1] define Q(h1 | v) = prod sigmoid(v R + b_up); G [H1, V] and a [V] define
    p(v | h1); `top` is the RBM over (h1, h2). The expectation under Q is exact by enumerating h1
    (`exact`; None means H1 <= 16), otherwise a Monte Carlo average over `samples` draws per row
    (`generator` on G's device).
    """
    v, G, a, top = _dbn_inputs(v, G, a, top)
    H1 = G.shape[0]
    if R.shape != (v.shape[1], H1) or b_up.shape != (H1,):
        raise ValueError(f"recognition shapes do not fit: R {tuple(R.shape)}, b_up {tuple(b_up.shape)}")
    if exact is None:
        exact = H1 <= AUTO_EXACT_DBN_UNITS and v.shape[0] * 2**H1 <= AUTO_EXACT_DBN_PAIRS
    if exact and H1 > MAX_EXACT_DBN_UNITS:
        raise ValueError(f"enumerating 2^{H1} states of h1; at most {MAX_EXACT_DBN_UNITS} units")

    logits = torch.addmm(b_up.double(), v, R.double())  # Q(h1_j = 1 | v) = σ(logits_j)
    q = torch.sigmoid(logits)
    log_q1, log_q0 = F.logsigmoid(logits), F.logsigmoid(-logits)
    entropy = -(q * log_q1 + (1 - q) * log_q0).sum(dim=1)

    expected = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
    if exact:
        for start, stop in _chunks(2**H1, _states_per_chunk(v)):
            h1 = _binary_states(start, stop, H1, v.device)
            log_q = log_q1 @ h1.T + log_q0 @ (1 - h1).T  # [N, S] log Q(h1 | v)
            expected += (torch.exp(log_q) * _log_joint(v, h1, G, a, top)).sum(dim=1)
    else:
        for _ in range(samples):
            h1 = bernoulli(q, generator)
            expected += _log_joint_paired(v, h1, G, a, top)
        expected /= samples
    return expected + entropy


@torch.no_grad()
def dbn_lower_bound(
    v: torch.Tensor,
    R: torch.Tensor,
    b_up: torch.Tensor,
    G: torch.Tensor,
    a: torch.Tensor,
    top: RBM,
    top_log_z: float,
    samples: int = 10,
    generator: torch.Generator | None = None,
    exact: bool | None = None,
) -> float:
    """Mean over rows of the variational lower bound on log p(v) of a two-layer DBN (module docstring).

    `top_log_z` is the top RBM's log partition function; the rest as `dbn_lower_bound_per_image`.
    """
    rows = dbn_lower_bound_per_image(v, R, b_up, G, a, top, samples, generator, exact)
    return rows.mean().item() - top_log_z


@torch.no_grad()
def dbn_exact_log_likelihood(v: torch.Tensor, G: torch.Tensor, a: torch.Tensor, top: RBM, top_log_z: float) -> float:
    """Mean over rows of log sum_h1 p(v | h1) p_top(h1), p_top(h1) = exp(-F_top(h1) - log Z_top).

    Enumerates h1, so only for tiny models (H1 <= 20).
    """
    v, G, a, top = _dbn_inputs(v, G, a, top)
    H1 = G.shape[0]
    if H1 > MAX_EXACT_DBN_UNITS:
        raise ValueError(f"enumerating 2^{H1} states of h1; at most {MAX_EXACT_DBN_UNITS} units")
    log_p = torch.full((v.shape[0],), -math.inf, dtype=torch.float64, device=v.device)
    for start, stop in _chunks(2**H1, _states_per_chunk(v)):
        h1 = _binary_states(start, stop, H1, v.device)
        log_p = torch.logaddexp(log_p, torch.logsumexp(_log_joint(v, h1, G, a, top), dim=1))
    return log_p.mean().item() - top_log_z


@torch.no_grad()
def dbn_reconstruction_error(
    v: torch.Tensor,
    R: torch.Tensor,
    b_up: torch.Tensor,
    G: torch.Tensor,
    a: torch.Tensor,
    top: RBM,
    gibbs_steps: int = 1,
    generator: torch.Generator | None = None,
) -> float:
    """Mean over images of sum_i (v_i - p̂_i)^2 for the DBN's reconstruction p̂ (LAB.md, task 2).

    Up pass h1 ~ Q(h1 | v) = σ(v R + b_up); `gibbs_steps` (>= 1) rounds in the top RBM, each
    h2 ~ p(h2 | h1) then h1 ~ p(h1 | h2); down pass p̂ = σ(h1 G + a), shown as probabilities.
    This is `UpDownDBN.reconstruct`; a task-2 DBN is R = W1, G = W1', b_up = h1_up.
    """
    _check_dbn(v, G, a, top)
    v = v.to(device=G.device, dtype=G.dtype)
    reconstruction, _ = reconstruct(UpDownDBN(R, b_up, G, a, top), v, gibbs_steps, generator)
    return ((v - reconstruction) ** 2).sum(dim=1).mean().item()
