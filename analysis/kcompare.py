"""The k-comparison: what changes when k in CD-k grows, saying only what the data shows.

`write_section` turns the completed trials of a study into a few sentences, one table per k, one
figure with the three models on one axis, the likelihood curves per k and a table per trial. The
rules every sentence follows (issue 15):

- Seeds are distinct config seeds, not trials: trials with the same k and seed are averaged first,
  so a study that ran seed 0 three times has one seed, and no interval.
- A test log-likelihood's interval at one k joins two kinds of uncertainty: the seeds' (a 95%
  Student-t half-width of the mean over seeds) and the estimators' own (each trial's AIS interval
  from its log Z interval, whose upper end is at most ln 20 above the estimate by Markov's
  inequality, the RAISE estimate from the other direction, and `Z_SE` test-set standard errors
  either side). The interval runs from the seeds' mean of the estimators' lower ends minus
  the half-width to the mean of the upper ends plus it: deliberately conservative.
- A difference between two values of k is claimed only where their intervals are disjoint; where
  they overlap the text says NO_DIFFERENCE. With one seed at a k there is no interval and no claim.
- A trend is judged across all k, never from the two ends: Spearman's rank correlation of k with
  the per-(k, seed) values, with a bootstrap interval that resamples seeds; it is claimed only where
  that interval excludes 0 and at least one pair of k is separated.
- Where other searched parameters vary too (a TPE study over hidden size and learning rate), k is
  compared only among trials with matched settings of them, or no claim about k is made.
- Seconds per epoch are summarised by the median and range; a stalled trial (more than
  STALL_FACTOR times the median of the other trials at its k) is named and left out of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy import stats

from rbm_study.analysis import figures
from rbm_study.analysis.figures import FigureFile
from rbm_study.analysis.html import Document
from rbm_study.core import evaluate
from rbm_study.core.config import get_dotted
from rbm_study.core.metrics import CURVE_METRIC, STAGE_TITLES

NO_DIFFERENCE = "no difference measured at this size"
Z_SE = 2.0  # standard errors either side of an estimate: about a 95% interval for the test-set mean
STALL_FACTOR = 3.0  # seconds per epoch above this multiple of the other trials' median at that k: stalled
BOOTSTRAP_SAMPLES = 2000
TREND_SEEDS = 3  # fewer seeds give a bootstrap of a handful of distinct resamples: no interval
BOOTSTRAP_SEED = 0  # the report is reproducible: the same database gives the same intervals
STAGES = STAGE_TITLES  # stage -> how the report names it
# what each stage's test number is, in the sentences
QUANTITY = {"rbm": "the RBM's test log-likelihood", "dbn": "the greedy DBN's test bound",
            "finetune": "the fine-tuned DBN's test bound"}
RECON = "rbm.test.recon_error"
SECONDS = "rbm.seconds_per_epoch"
# Salakhutdinov & Murray's (2008) published test log-likelihoods, by k, of RBMs of one size
PUBLISHED_HIDDEN, PUBLISHED_LL = evaluate.PAPER_HIDDEN, evaluate.PAPER_TEST_LL
CURVES = [  # (stage, per-epoch metric) drawn as learning curves
    ("rbm", "train_recon_error"),
    ("rbm", "val_recon_error"),
    ("rbm", "val_pseudo_log_likelihood"),
    ("rbm", "free_energy_gap"),
    ("dbn", "train_recon_error"),
    ("finetune", "train_recon_error"),
    ("finetune", "sleep_recognition_error"),
]


def fmt(x: float | None, digits: int = 2) -> str:
    """The one number format of the report (tests compare report text with it)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def t_interval(values: pd.Series | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean; (nan, nan) with fewer than two values."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return (float("nan"), float("nan"))
    mean = x.mean()
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return (float(mean - half), float(mean + half))


def _errorbar(values: pd.Series) -> tuple[float, float]:
    low, high = t_interval(values)
    if math.isnan(low):
        m = float(np.mean(values))
        return (m, m)
    return (low, high)


def default_label(row: pd.Series) -> str:
    """How a trial is named to users: its `number` column as stored."""
    return f"trial {int(row['number'])}" if "number" in row and pd.notna(row["number"]) else \
        f"trial id {int(row['trial_id'])}"


def _column(trials: pd.DataFrame, name: str) -> pd.Series:
    """A final metric as floats; all NaN when the database has no such metric."""
    if name in trials:
        return pd.to_numeric(trials[name], errors="coerce").astype(float)
    return pd.Series(np.nan, index=trials.index, dtype=float)


def _has(trials: pd.DataFrame, name: str) -> bool:
    return name in trials and pd.to_numeric(trials[name], errors="coerce").notna().any()


def _ks(ks: list[int] | set[int]) -> str:
    return ", ".join(str(k) for k in sorted(ks))


# --- per trial: the estimates and their own uncertainty -------------------------------------------
def trial_estimates(trials: pd.DataFrame, stage: str, split: str = "test") -> pd.DataFrame:
    """One row per trial with a `{stage}.{split}.log_likelihood`: the AIS estimate (`est`), AIS's
    interval widened by the standard error (`ais_lo`, `ais_hi`), RAISE (`raise`, `raise_lo`,
    `raise_hi`), their gap, and the envelope of both (`lo`, `hi`) that claims are judged by."""
    base = f"{stage}.{split}.log_likelihood"
    est = _column(trials, base)
    se = _column(trials, f"{base}_stderr").fillna(0.0)
    raise_ = _column(trials, f"{base}_raise")
    raise_se = _column(trials, f"{base}_raise_stderr").fillna(0.0)
    # RAISE scores only the first eval.raise_images images, AIS all of them: their levels differ by
    # the images as well as the estimators. The pipeline's paired gap (RAISE minus AIS, image by
    # image, on RAISE's images) is the estimators' disagreement alone, so RAISE's side of the
    # interval is the AIS estimate moved by that gap; without it, the RAISE estimate as it is.
    paired = _column(trials, f"{base}_raise_gap")
    paired_se = _column(trials, f"{base}_raise_gap_stderr").fillna(0.0)
    side = (est + paired).fillna(raise_)
    side_se = np.sqrt(se**2 + paired_se**2).where(paired.notna(), raise_se)
    # A missing AIS interval (exact log Z, or an older database) leaves the point estimate. The
    # upper end is at most ln 20 above the estimate (Markov's floor under AIS's log Z, in
    # `core.evaluate`); databases written before that floor hold +inf where 3 sigma gave none.
    ais_lo = _column(trials, f"{base}_low").fillna(est) - Z_SE * se
    ais_hi = np.fmin(_column(trials, f"{base}_high").fillna(est), est + evaluate.MARKOV_NATS) + Z_SE * se
    frame = pd.DataFrame({
        "trial_id": trials["trial_id"], "number": trials.get("number", trials["trial_id"]),
        "k": trials["k"].astype(int), "seed": trials["seed"].fillna(-1),
        "est": est, "se": _column(trials, f"{base}_stderr"), "ais_lo": ais_lo, "ais_hi": ais_hi,
        "raise": raise_, "raise_se": _column(trials, f"{base}_raise_stderr"),
        "raise_lo": raise_ - Z_SE * raise_se, "raise_hi": raise_ + Z_SE * raise_se,
        "gap": (-paired).fillna(est - raise_), "paired": paired.notna(),  # gap: AIS minus RAISE
        # fmin/fmax skip NaN: without RAISE the envelope is AIS's interval alone
        "lo": np.fmin(ais_lo, side - Z_SE * side_se), "hi": np.fmax(ais_hi, side + Z_SE * side_se),
    })
    return frame[frame["est"].notna()].reset_index(drop=True)


def plain_values(trials: pd.DataFrame, name: str) -> pd.DataFrame:
    """The same shape as `trial_estimates` for a metric without an estimator interval (recon error)."""
    value = _column(trials, name)
    frame = pd.DataFrame({"trial_id": trials["trial_id"], "k": trials["k"].astype(int),
                          "seed": trials["seed"].fillna(-1), "est": value, "lo": value, "hi": value})
    return frame[frame["est"].notna()].reset_index(drop=True)


# --- per k ----------------------------------------------------------------------------------------
@dataclass
class KStat:
    """One quantity at one k, over seeds."""

    k: int
    seeds: int
    trials: int
    mean: float
    ci_low: float  # 95% t-interval of the mean over seeds (NaN with one seed)
    ci_high: float
    low: float  # ... widened by the estimators' own uncertainty: what claims are judged by
    high: float

    def cell(self) -> str:
        if math.isnan(self.low):
            return f"{fmt(self.mean)} (one seed, no interval)"
        return f"{fmt(self.mean)} [{fmt(self.low)}, {fmt(self.high)}]"


def seed_cells(rows: pd.DataFrame, value: str = "est") -> pd.DataFrame:
    """Per (k, seed): the mean over that seed's trials of `value`, `lo`, `hi` (a seed is one sample)."""
    columns = [c for c in dict.fromkeys([value, "lo", "hi"]) if c in rows]
    cells = rows.dropna(subset=[value]).groupby(["k", "seed"], as_index=False)[columns].mean()
    return cells.rename(columns={value: "value"})


def per_k(rows: pd.DataFrame, value: str = "est", lo: str = "lo", hi: str = "hi") -> dict[int, KStat]:
    """KStat per k of `rows` (from `trial_estimates` or `plain_values`)."""
    out = {}
    picked = rows.dropna(subset=[value]).rename(columns={value: "_v", lo: "_lo", hi: "_hi"})
    for k, group in picked.groupby("k", sort=True):
        by_seed = group.groupby("seed")[["_v", "_lo", "_hi"]].mean()
        ci_low, ci_high = t_interval(by_seed["_v"])
        mean = float(by_seed["_v"].mean())
        # the seeds' interval moved out by the estimators' own reach below and above the estimate:
        # added to the ends themselves, so that no reach leaves an end where it was, to the last bit
        below, above = mean - float(by_seed["_lo"].mean()), float(by_seed["_hi"].mean()) - mean
        out[int(k)] = KStat(int(k), len(by_seed), len(group), mean, ci_low, ci_high, ci_low - below, ci_high + above)
    return out


def separated(a: KStat, b: KStat) -> bool:
    """Disjoint intervals; an interval that is missing (one seed) separates from nothing."""
    return bool(a.high < b.low or b.high < a.low)


# --- the verdict on one quantity ------------------------------------------------------------------
def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def rank_trend(cells: pd.DataFrame) -> tuple[float, float, float, int]:
    """(rho, low, high, seeds): Spearman's rho of k with the per-(k, seed) values, and a 95%
    percentile bootstrap interval that resamples whole seeds (a seed's trials move together)."""
    rho = _spearman(cells["k"].to_numpy(float), cells["value"].to_numpy(float))
    seeds = list(cells["seed"].unique())
    if len(seeds) < TREND_SEEDS:
        return rho, float("nan"), float("nan"), len(seeds)
    parts = [(g["k"].to_numpy(float), g["value"].to_numpy(float)) for _, g in cells.groupby("seed")]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws = []
    for _ in range(BOOTSTRAP_SAMPLES):
        pick = rng.integers(0, len(parts), len(parts))
        r = _spearman(np.concatenate([parts[i][0] for i in pick]), np.concatenate([parts[i][1] for i in pick]))
        if not math.isnan(r):
            draws.append(r)
    if not draws:
        return rho, float("nan"), float("nan"), len(seeds)
    low, high = np.percentile(draws, [2.5, 97.5])
    return rho, float(low), float(high), len(seeds)


@dataclass
class Verdict:
    """What the data says about one quantity across k."""

    stats: dict[int, KStat]
    better: str  # "higher" or "lower"
    best: list[int]  # the k of the best mean and every k whose interval overlaps it
    top: int  # the k of the best mean
    pairs: list[tuple[int, int]]  # separated pairs (k, k')
    rho: float
    rho_low: float
    rho_high: float
    seeds: int

    @property
    def any_separated(self) -> bool:
        return bool(self.pairs)

    def spread(self) -> tuple[float, int, int]:
        """(largest minus smallest mean, k of the smallest, k of the largest)."""
        means = {k: s.mean for k, s in self.stats.items()}
        lo, hi = min(means, key=means.get), max(means, key=means.get)
        return means[hi] - means[lo], lo, hi

    def leaning(self) -> int:
        """+1 where the rank correlation's interval lies above 0, -1 below, 0 where it includes 0."""
        if math.isnan(self.rho_low):
            return 0
        return 1 if self.rho_low > 0 else -1 if self.rho_high < 0 else 0

    def reversals(self, direction: int) -> list[tuple[int, int]]:
        """Separated pairs (k < k') whose means go against `direction` (+1: rising with k)."""
        return [(a, b) for a, b in self.pairs if (self.stats[b].mean - self.stats[a].mean) * direction < 0]

    def trend_claimed(self) -> int:
        """+1 rises with k, -1 falls, 0 no trend claimed: the ranks must lean one way, some pair of k
        must be separated, and no separated pair may go the other way (a monotone trend, judged
        over all k rather than from the two ends)."""
        direction = self.leaning()
        if not direction or not self.pairs or self.reversals(direction):
            return 0
        return direction


def judge(rows: pd.DataFrame, better: str = "higher") -> Verdict | None:
    """The verdict on a quantity from its per-trial rows; None with fewer than two k."""
    per = per_k(rows)
    if len(per) < 2:
        return None
    top = max(per, key=lambda k: per[k].mean) if better == "higher" else min(per, key=lambda k: per[k].mean)
    best = [k for k in per if k == top or not separated(per[k], per[top])]
    ks = sorted(per)
    pairs = [(a, b) for i, a in enumerate(ks) for b in ks[i + 1:] if separated(per[a], per[b])]
    rho, low, high, seeds = rank_trend(seed_cells(rows))
    return Verdict(per, better, sorted(best), top, pairs, rho, low, high, seeds)


def order_text(v: Verdict) -> str:
    """Which k is best, and which are not told apart from it."""
    if all(s.seeds < 2 for s in v.stats.values()):
        return f"{NO_DIFFERENCE}: with one seed per k there is no interval to judge a difference by"
    if not v.any_separated:
        return f"{NO_DIFFERENCE} between any two of k = {_ks(v.stats)} (every pair of intervals overlaps)"
    word, worse = ("highest", "lower") if v.better == "higher" else ("lowest", "higher")
    rest = [k for k in v.stats if k not in v.best]
    if len(v.best) == 1:
        text = f"{word} at k={v.top} ({fmt(v.stats[v.top].mean)}), separated from every other k"
    else:
        others = [k for k in v.best if k != v.top]
        text = (f"{word} mean at k={v.top} ({fmt(v.stats[v.top].mean)}), but k={_ks(others)} "
                f"{'is' if len(others) == 1 else 'are'} within its interval ({NO_DIFFERENCE})")
        if rest:
            text += f"; k={_ks(rest)} {'is' if len(rest) == 1 else 'are'} {worse}, with intervals separated from it"
    return text


def trend_text(v: Verdict) -> str:
    """The trend across all k, with its interval, or why none is claimed."""
    rho = f"Spearman ρ = {fmt(v.rho)}"
    if math.isnan(v.rho_low):
        seeds = "one seed" if v.seeds == 1 else f"{v.seeds} seeds"
        return f"with {seeds} there is no interval for a trend across k ({rho}), so none is claimed"
    interval = f"{rho}, 95% bootstrap interval over {v.seeds} seeds [{fmt(v.rho_low)}, {fmt(v.rho_high)}]"
    claimed, leaning = v.trend_claimed(), v.leaning()
    if claimed:
        return f"across all k it {'rises' if claimed > 0 else 'falls'} with k ({interval})"
    if leaning and not v.pairs:
        return f"the ranks lean one way ({interval}) but no two k are separated, so no trend is claimed"
    if leaning:
        word = "above" if leaning > 0 else "below"
        against = "; ".join(f"k={a} is {word} k={b}" for a, b in v.reversals(leaning)[:3])
        return (f"the ranks lean {'upward' if leaning > 0 else 'downward'} ({interval}) but not monotonically "
                f"({against}, with separated intervals), so no trend is claimed")
    return f"no monotone trend across k ({interval} includes 0)"


# --- which trials can be compared --------------------------------------------------------------
def _hashable(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "unset"
    return json.dumps(value, sort_keys=True, default=str)


def matched_trials(done: pd.DataFrame, sampler: str | None = None) -> tuple[pd.DataFrame, str | None, bool]:
    """(the trials k is compared among, a caveat or None, whether any claim about k may be made).

    Other searched parameters that vary between the trials (anything in the trials' params but k
    and the seed) would mix their effect with k's: k is then compared only among trials that share
    one setting of them (the setting with the most k, then seeds), or, where no setting was tried
    with two k, not at all."""
    params = [c for c in done.columns if c.startswith("param:") and c not in ("param:rbm.cd_k", "param:seed")]
    varying = [c for c in params if done[c].map(_hashable).nunique() > 1]
    if not varying:
        return done, None, True
    names = ", ".join(c[6:] for c in varying)
    how = f" (search sampler: {sampler})" if sampler else ""
    key = done[varying].apply(lambda r: tuple(_hashable(v) for v in r), axis=1)
    groups = [g for _, g in done.groupby(key, sort=False) if g["k"].nunique() >= 2]
    if not groups:
        return done, (
            f"other searched parameters vary with k{how}: {names}. No two values of k were tried at the same "
            "setting of them, so this study cannot separate k's effect from theirs: **no claim about k is made**; "
            "the table and figures below describe the trials, not k."
        ), False
    chosen = max(groups, key=lambda g: (g["k"].nunique(), g["seed"].nunique(), len(g)))
    setting = ", ".join(f"{c[6:]}={chosen[c].iloc[0]}" for c in varying)
    return chosen, (
        f"other searched parameters vary between the trials{how}: {names}. k is compared only among trials "
        f"with matched settings: the {len(chosen)} at {setting}; {len(done) - len(chosen)} other trials are left out "
        "of the comparison."
    ), True


# --- seconds per epoch ----------------------------------------------------------------------------
def seconds_summary(trials: pd.DataFrame, name: str = SECONDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per k: median, min, max, n over the trials kept; the stalled trials with their factor).

    A trial is stalled when its seconds exceed STALL_FACTOR times the median of the *other* trials
    at its k: leaving it out of its own reference median lets two trials at one k catch a stall."""
    data = trials.assign(_s=_column(trials, name)).dropna(subset=["_s"])
    kept_rows, stalled = [], []
    for _, group in data.groupby("k", sort=True):
        for index, row in group.iterrows():
            others = group["_s"].drop(index)
            reference = float(others.median()) if not others.empty else float("nan")
            if reference > 0 and row["_s"] > STALL_FACTOR * reference:
                stalled.append({**row.to_dict(), "factor": row["_s"] / reference, "reference": reference})
            else:
                kept_rows.append(row)
    kept = pd.DataFrame(kept_rows)
    summary = pd.DataFrame(columns=["k", "median", "min", "max", "n"])
    if not kept.empty:
        summary = (kept.groupby("k")["_s"].agg(["median", "min", "max", "count"])
                   .rename(columns={"count": "n"}).reset_index())
    return summary, pd.DataFrame(stalled)


# --- settings and cost ------------------------------------------------------------------------------
def _setting(trials: pd.DataFrame, configs: dict[int, dict], name: str) -> pd.Series:
    """A setting per trial: the final metric of that name, else the trial config's dotted key."""
    if _has(trials, name):
        return _column(trials, name).dropna()
    values = []
    for tid in trials["trial_id"]:
        value = get_dotted(configs.get(int(tid), {}), name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(float(value))
    return pd.Series(values, dtype=float)


def _amount(values: pd.Series) -> str | None:
    """'100', or '50-100 (varies between trials)'; None when unknown."""
    if values.empty:
        return None
    low, high = values.min(), values.max()
    as_text = (lambda x: f"{int(x):,}") if all(float(v).is_integer() for v in values) else fmt
    return as_text(low) if low == high else f"{as_text(low)}-{as_text(high)} (varies between trials)"


def settings_text(trials: pd.DataFrame, configs: dict[int, dict]) -> str:
    """Which estimator settings produced the numbers, and what evaluating cost."""
    get = lambda name: _amount(_setting(trials, configs, name))  # noqa: E731
    parts = []
    chains, betas = get("eval.ais_chains"), get("eval.ais_betas")
    if chains or betas:
        ais = f"AIS with {chains or '?'} chains x {betas or '?'} inverse temperatures"
        repeats = get("eval.ais_repeats")
        if repeats:
            spread = _column(trials, "rbm.log_z_sd").dropna()
            ais += f", {repeats} repeat{'s' if repeats != '1' else ''}"
            if not spread.empty and repeats != "1":
                ais += f" (RBM log Z spread between repeats: median sd {fmt(float(spread.median()), 3)} nats)"
        parts.append(ais)
    else:
        parts.append("AIS settings not recorded")
    if _has(trials, "rbm.log_z_exact"):
        exact = int((_column(trials, "rbm.log_z_exact") == 1.0).sum())
        if exact:
            parts.append(f"the RBM's log Z exact (enumerated) in {exact} of {len(trials)} trials")
    r_chains, r_betas, r_images = get("eval.raise_chains"), get("eval.raise_betas"), get("eval.raise_images")
    if _has(trials, "rbm.test.log_likelihood_raise"):
        where = f" on the first {r_images} test images" if r_images else ""
        chain_word = "chain" if r_chains == "1" else "chains"
        parts.append(f"RAISE with {r_chains or '?'} {chain_word} per image x {r_betas or '?'} inverse temperatures"
                     f"{where}")
    every = get("eval.curve_every")
    if every and every != "0":
        curve = "likelihood curves every " + ("epoch" if every == "1" else f"{every} epochs")
        drawn = {tuple(get_dotted(configs.get(int(t), {}), "eval.curve_stages", STAGES)) for t in trials["trial_id"]}
        if len(drawn) == 1 and set(stages := next(iter(drawn))) != set(STAGES):
            curve += " of the " + " and the ".join(STAGES[s] for s in STAGES if s in stages) + " only"
        c_chains, c_betas, c_images = get("eval.curve_chains"), get("eval.curve_betas"), get("eval.curve_images")
        if c_chains or c_betas:
            curve += (f" (AIS with {c_chains or '?'} chains x {c_betas or '?'} inverse temperatures"
                      + (f" on the first {c_images} validation images)" if c_images else ")"))
        parts.append(curve)
    text = "Estimator settings behind these numbers: " + "; ".join(parts) + "."
    costs = []
    for name, what in (("ais_seconds", "AIS"), ("raise_seconds", "RAISE"), ("curve_seconds", "curves")):
        total = sum(_column(trials, f"{stage}.{name}").fillna(0.0) for stage in STAGES)
        if total.gt(0).any():  # a switched-off estimator records 0 s
            costs.append((what, total))
    if costs:
        spent = sum(total for _, total in costs)
        if any(_has(trials, f"{stage}.eval_seconds") for stage in STAGES):
            # all the measuring, the final scores and bounds and the per-epoch signals included
            everything = sum(_column(trials, f"{stage}.eval_seconds").fillna(0.0) for stage in STAGES)
            costs.append(("the rest (scores, bounds, per-epoch signals)", everything - spent))
            spent = everything
        text += " Evaluation per trial (median; each over all three models): " + ", ".join(
            f"{what} {fmt(float(total.median()), 1)} s" for what, total in costs)
        if "seconds" in trials and _column(trials, "seconds").gt(0).any():
            share = (spent / _column(trials, "seconds")).replace([np.inf, -np.inf], np.nan).dropna()
            # more evaluation than the trial's wall time means the timestamps do not cover it (a resumed trial)
            if not share.empty and share.median() <= 1:
                text += f", {fmt(100 * float(share.median()), 0)}% of a trial's time"
        text += "."
    return text


def missing_text(trials: pd.DataFrame) -> list[str]:
    """What the database lacks that the comparison would use, said plainly."""
    out = []
    n = len(trials)
    raise_rbm = int(_column(trials, "rbm.test.log_likelihood_raise").notna().sum())
    if _has(trials, "rbm.test.log_likelihood") and raise_rbm < n:
        which = "any trial" if raise_rbm == 0 else f"{n - raise_rbm} of {n} trials"
        out.append(f"RAISE, the estimate from the other direction, is missing for {which}: there the RBM's "
                   "intervals carry AIS's uncertainty and the seeds' only.")
    dbn_stages = [s for s in ("dbn", "finetune") if _has(trials, f"{s}.test.log_likelihood")]
    if dbn_stages and not any(_has(trials, f"{s}.test.log_likelihood_raise") for s in dbn_stages):
        out.append("For the DBN bounds only AIS's side exists: no estimate from the other direction was stored, "
                   "so their intervals are AIS's and the seeds'.")
    lacking = [STAGES[s] for s in STAGES if _has(trials, f"{s}.test.log_likelihood")
               and not _has(trials, f"{s}.test.log_likelihood_low")]
    if lacking:
        out.append(f"AIS intervals (log Z interval) are not recorded for the {', '.join(lacking)}: "
                   "those intervals are the seeds' alone.")
    no_se = [STAGES[s] for s in STAGES if _has(trials, f"{s}.test.log_likelihood")
             and not _has(trials, f"{s}.test.log_likelihood_stderr")]
    if no_se:
        out.append(f"Test-set standard errors are not recorded for the {', '.join(no_se)}.")
    return out


# --- sentences ------------------------------------------------------------------------------------
def _effect(v: Verdict) -> str:
    size, lo, hi = v.spread()
    return (f"{fmt(size)} nats ({fmt(v.stats[lo].mean)} at k={lo}, {fmt(v.stats[hi].mean)} at k={hi}; "
            + ("intervals separate" if v.any_separated else NO_DIFFERENCE) + ")")


def lead_text(verdicts: dict[str, Verdict]) -> str | None:
    """The sentence connecting the models: k's effect on the RBM against its effect on the DBN bounds."""
    if not verdicts:
        return None
    effects = ", ".join(f"{QUANTITY[s]} by {_effect(v)}" for s, v in verdicts.items())
    text = f"Across k = {_ks(next(iter(verdicts.values())).stats)}, k moves {effects}. "
    rbm = verdicts.get("rbm")
    bounds = {s: v for s, v in verdicts.items() if s != "rbm"}
    moved = [s for s, v in bounds.items() if v.any_separated]
    if rbm is None or not bounds:
        return text.rstrip()
    if rbm.any_separated and not moved:
        text += ("The second layer erases k's effect: what k buys the RBM does not show in the DBN bounds "
                 "(as far as a lower bound can show it).")
    elif rbm.any_separated and len(moved) == len(bounds):
        text += (f"k's effect carries through the second layer, {fmt(rbm.spread()[0])} nats on the RBM against "
                 + " and ".join(f"{fmt(bounds[s].spread()[0])} on the {STAGES[s]}" for s in moved) + ".")
    elif rbm.any_separated:
        kept = " and ".join(STAGES[s] for s in moved)
        lost = " and ".join(STAGES[s] for s in bounds if s not in moved)
        text += f"k's effect on the RBM shows in the {kept}'s bound but not in the {lost}'s."
    elif moved:
        text += (f"k makes no measured difference to the RBM, but it does to the "
                 f"{' and '.join(STAGES[s] for s in moved)}'s bound.")
    else:
        text += "For none of the three models is a difference between values of k measured at this size."
    return text


def model_text(stage: str, v: Verdict) -> str:
    name = QUANTITY[stage]
    return f"{name[0].upper()}{name[1:]}: {order_text(v)}; {trend_text(v)}."


def recon_text(ll: Verdict | None, rec: Verdict | None) -> str | None:
    """Reconstruction error against likelihood, with the numbers, agreeing or not."""
    if ll is None or rec is None:
        return None
    means = [s.mean for s in rec.stats.values()]
    rec_range = fmt(min(means)) if fmt(min(means)) == fmt(max(means)) else f"{fmt(min(means))}-{fmt(max(means))}"
    why = ("; reconstruction error measures one Gibbs step away from the data, not the probability the model "
           "gives the data, so it is the likelihood that says which k trains the better generative model")
    if ll.any_separated and not rec.any_separated:
        return (f"Reconstruction error and likelihood disagree: the test reconstruction error is {rec_range} "
                f"across k ({NO_DIFFERENCE}) while the RBM's test log-likelihood moves by {_effect(ll)}{why}.")
    if rec.any_separated and not ll.any_separated:
        return (f"Reconstruction error and likelihood disagree: the test reconstruction error is lowest at "
                f"k={_ks(rec.best)} ({rec.stats[rec.top].cell()}; range {rec_range}) while the RBM's test "
                f"log-likelihood shows {NO_DIFFERENCE}{why}.")
    if rec.any_separated and ll.any_separated:
        if set(ll.best) & set(rec.best):
            return (f"Reconstruction error and likelihood agree: the log-likelihood is highest at k={_ks(ll.best)}, "
                    f"the reconstruction error lowest at k={_ks(rec.best)} ({rec.stats[rec.top].cell()}).")
        return (f"Reconstruction error and likelihood disagree about the best k: the log-likelihood is highest at "
                f"k={_ks(ll.best)} ({fmt(ll.stats[ll.top].mean)} nats), the reconstruction error lowest at "
                f"k={_ks(rec.best)} ({rec.stats[rec.top].cell()}){why}.")
    return (f"Neither the RBM's test log-likelihood nor its test reconstruction error ({rec_range}) differs "
            "measurably between values of k.")


def gap_text(rows: dict[str, pd.DataFrame]) -> str | None:
    """AIS against RAISE, per trial and model: the disagreement is uncertainty, and is counted as such."""
    parts = []
    for stage, frame in rows.items():
        gap = frame["gap"].dropna()
        if gap.empty:
            continue
        side = "above" if (gap > 0).all() else "below" if (gap < 0).all() else "on either side of"
        parts.append(f"by a median of {fmt(float(gap.abs().median()))} nats per trial for the {STAGES[stage]} "
                     f"(AIS minus RAISE from {fmt(float(gap.min()))} to {fmt(float(gap.max()))}, AIS {side} RAISE)")
    if not parts:
        return None
    paired = all(bool(f["paired"][f["gap"].notna()].all()) for f in rows.values())
    how = ("measured image by image on the images RAISE scored" if paired else
           "between RAISE on its images and AIS on all test images, so the images' difference is in it too")
    return ("AIS and RAISE disagree " + "; ".join(parts) + f" ({how}); the intervals that claims are judged by "
            "span both estimates.")


def seconds_text(summary: pd.DataFrame, stalled: pd.DataFrame, label: Callable[[pd.Series], str]) -> str | None:
    if summary.empty:
        return None
    first, last = summary.iloc[0], summary.iloc[-1]
    text = (f"Time: an RBM epoch took a median of {fmt(first['median'])} s at k={int(first['k'])} and "
            f"{fmt(last['median'])} s at k={int(last['k'])}")
    if first["median"] > 0 and len(summary) > 1:
        text += f" ({fmt(last['median'] / first['median'])} times as long)"
    text += "; medians and ranges per k are in the table."
    for _, row in stalled.iterrows():
        text += (f" {label(row)[0].upper()}{label(row)[1:]} (k={int(row['k'])}, seed {_seed(row['seed'])}) "
                 f"took {fmt(row['_s'])} s per epoch, {fmt(row['factor'], 1)} times the median of the other "
                 f"trials at its k ({fmt(row['reference'])} s): a stalled trial, left out of the seconds (its "
                 "likelihoods are kept).")
    return text


def _seed(value: Any) -> str:
    return "unknown" if value is None or (isinstance(value, float) and math.isnan(value)) or value == -1 \
        else str(int(value))


def curves_text(epochs: pd.DataFrame, trials: pd.DataFrame) -> str | None:
    """What the likelihood curves show: per k, where the validation log-likelihood peaks and
    whether it measurably falls after the peak (the drop judged per seed, with its t-interval)."""
    data = _curve_data(epochs, trials)
    data = data[data["stage"] == "rbm"]
    if data.empty:
        return None
    falls, holds, single = [], [], []
    for k, group in data.groupby("k", sort=True):
        by_seed = group.groupby(["seed", "epoch"])["value"].mean().unstack("epoch")
        mean = by_seed.mean()
        peak, last = int(mean.idxmax()), int(mean.index.max())
        if peak == last:
            holds.append(k)
            continue
        drop = (by_seed[last] - by_seed[peak]).dropna()
        low, high = t_interval(drop)
        if math.isnan(low):
            single.append(k)
        elif high < 0:
            falls.append(f"at k={k} it peaks at epoch {peak} ({fmt(mean[peak])}) and ends {fmt(-float(drop.mean()))} "
                         f"nats lower at epoch {last} (interval of the fall over {len(drop)} seeds "
                         f"[{fmt(-high)}, {fmt(-low)}])")
        else:
            holds.append(k)
    text = "Validation log-likelihood while training (the cheap AIS curves): "
    parts = falls[:]
    if holds:
        parts.append(f"no fall after the peak is measured at k={_ks(holds)}")
    if single:
        parts.append(f"k={_ks(single)} {'has' if len(single) == 1 else 'have'} one seed, not judged")
    return text + "; ".join(parts) + "."


# --- tables ---------------------------------------------------------------------------------------
def k_table(
    rows: dict[str, pd.DataFrame], recon: pd.DataFrame, seconds: pd.DataFrame, stalled: pd.DataFrame,
    trials: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the per-k table of the report, its long CSV form)."""
    ks = sorted(int(k) for k in trials["k"].unique())
    stat = {stage: per_k(r) for stage, r in rows.items()}
    rbm = rows.get("rbm", pd.DataFrame())
    ais = per_k(rbm, lo="ais_lo", hi="ais_hi") if not rbm.empty else {}
    has_raise = not rbm.empty and rbm["raise"].notna().any()
    raise_ = per_k(rbm, value="raise", lo="raise_lo", hi="raise_hi") if has_raise else {}
    gaps = seed_cells(rbm, "gap") if has_raise else pd.DataFrame()
    rec = per_k(recon)
    sec = seconds.set_index("k") if not seconds.empty else pd.DataFrame()
    published = "hidden" in trials and (trials["hidden"] == PUBLISHED_HIDDEN).all()
    table, long = [], []
    for k in ks:
        at = trials[trials["k"] == k]
        seeds = at["seed"].fillna(-1).nunique()
        row = {"k": k, "seeds": str(seeds) if seeds == len(at) else f"{seeds} ({len(at)} trials)"}
        row["RBM test LL, AIS"] = ais[k].cell() if k in ais else "not recorded"
        row["RBM test LL, RAISE"] = raise_[k].cell() if k in raise_ else "not recorded"
        gap = gaps[gaps["k"] == k]["value"].dropna() if has_raise else pd.Series(dtype=float)
        row["AIS - RAISE (RBM)"] = fmt(float(gap.mean())) if not gap.empty else "n/a"
        for stage, name in (("dbn", "DBN bound"), ("finetune", "fine-tuned DBN bound")):
            row[name] = stat[stage][k].cell() if stage in stat and k in stat[stage] else "not recorded"
        row["recon error"] = rec[k].cell() if k in rec else "not recorded"
        if k in sec.index:
            s = sec.loc[k]
            cell = f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"
            n_stalled = int((stalled["k"] == k).sum()) if not stalled.empty else 0
            row["s / RBM epoch, median (range)"] = cell + (f", {n_stalled} stalled left out" if n_stalled else "")
        else:
            row["s / RBM epoch, median (range)"] = "not recorded"
        if published:
            row[f"published, {PUBLISHED_HIDDEN} hidden (S&M 2008)"] = (
                fmt(PUBLISHED_LL[k], 1) if k in PUBLISHED_LL else "")
        table.append(row)
    for metric, per in [*((f"{s}.test.log_likelihood", stat[s]) for s in stat),
                        ("rbm.test.log_likelihood (AIS only)", ais), ("rbm.test.log_likelihood_raise", raise_),
                        (RECON, rec)]:
        long += [{"k": k, "metric": metric, "n": s.seeds, "trials": s.trials, "mean": s.mean,
                  "ci_low": s.ci_low, "ci_high": s.ci_high, "low": s.low, "high": s.high} for k, s in per.items()]
    return pd.DataFrame(table), pd.DataFrame(long)


def trial_table(rows: dict[str, pd.DataFrame], trials: pd.DataFrame, stalled: pd.DataFrame,
                label: Callable[[pd.Series], str]) -> pd.DataFrame:
    """Per trial: both estimates, their gap, and the intervals."""
    def interval(r: pd.Series | None) -> str:
        if r is None:
            return "not recorded"
        text = f"{fmt(r['est'])} [{fmt(r['ais_lo'])}, {fmt(r['ais_hi'])}]"
        return text + (f" ± {fmt(r['se'])}" if pd.notna(r["se"]) else "")

    by_stage = {s: r.set_index("trial_id") for s, r in rows.items()}
    stalled_ids = set(stalled["trial_id"]) if not stalled.empty else set()
    out = []
    for _, t in trials.sort_values(["k", "seed"]).iterrows():
        tid = t["trial_id"]
        mine = {s: r.loc[tid] for s, r in by_stage.items() if tid in r.index}
        rbm = mine.get("rbm")
        sec = _column(trials.loc[[t.name]], SECONDS).iloc[0]
        out.append({
            "trial": label(t), "k": int(t["k"]), "seed": _seed(t["seed"]),
            "RBM AIS [interval] ± se": interval(rbm),
            "RBM RAISE ± se": "not recorded" if rbm is None or pd.isna(rbm["raise"]) else
            f"{fmt(rbm['raise'])}" + (f" ± {fmt(rbm['raise_se'])}" if pd.notna(rbm["raise_se"]) else ""),
            "AIS - RAISE": fmt(rbm["gap"]) if rbm is not None else "n/a",
            "RBM log Z sd": fmt(_column(trials.loc[[t.name]], "rbm.log_z_sd").iloc[0], 3),
            "DBN bound": interval(mine.get("dbn")),
            "fine-tuned bound": interval(mine.get("finetune")),
            "s / RBM epoch": fmt(sec) + (" (stalled)" if tid in stalled_ids else ""),
        })
    return pd.DataFrame(out)


# --- figures --------------------------------------------------------------------------------------
def models_figure(rows: dict[str, pd.DataFrame], trials: pd.DataFrame, out: Path) -> FigureFile | None:
    """The three models on one axis: x = k, y = test log-likelihood (RBM) or bound (DBNs), each
    with its interval (the one claims are judged by) and every seed as a dot; RAISE as open squares."""
    series = [(s, per_k(r), seed_cells(r)) for s, r in rows.items() if not r.empty]
    if not series:
        return None
    rbm = rows.get("rbm")
    if rbm is not None and rbm["raise"].notna().any():
        series.append(("raise", per_k(rbm, value="raise", lo="raise_lo", hi="raise_hi"), seed_cells(rbm, "raise")))
    finite = np.array([x for _, per, _ in series for s in per.values() for x in (s.mean, s.low, s.high)
                       if np.isfinite(x)])
    margin = 0.08 * (finite.max() - finite.min()) if finite.size and np.ptp(finite) > 0 else 1.0
    bottom, top = finite.min() - margin, finite.max() + margin
    fig, ax = plt.subplots(figsize=(8.5, 5.4))
    names = {**{s: f"{name} ({'log-likelihood, AIS' if s == 'rbm' else 'lower bound'})"
                for s, name in STAGES.items()}, "raise": "RBM (log-likelihood, RAISE)"}
    colours = {"rbm": "C0", "raise": "C0", "dbn": "C1", "finetune": "C2"}
    shift = {"rbm": 0.97, "raise": 1.03, "dbn": 1.0, "finetune": 1.0}  # RAISE beside AIS, not on top of it
    for stage, per, cells in series:
        ks = sorted(per)
        x = np.array(ks, dtype=float) * shift[stage]
        mean = np.array([per[k].mean for k in ks])
        # an unbounded end is drawn to the edge of the axis; a missing one (one seed) not at all
        low, high = np.array([per[k].low for k in ks]), np.array([per[k].high for k in ks])
        low = np.where(np.isnan(low), mean, np.maximum(low, bottom))
        high = np.where(np.isnan(high), mean, np.minimum(high, top))
        open_marker = stage == "raise"
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="s" if open_marker else "o-", capsize=4,
                    color=colours[stage], mfc="white" if open_marker else colours[stage], label=names[stage], lw=1.6)
        ax.scatter(cells["k"] * shift[stage], cells["value"], s=12, color=colours[stage], alpha=0.35, zorder=3)
    if "hidden" in trials and (trials["hidden"] == PUBLISHED_HIDDEN).all():
        pub = [k for k in PUBLISHED_LL if k in set(trials["k"])]
        if pub:
            ax.scatter(pub, [PUBLISHED_LL[k] for k in pub], marker="x", s=60, color="black",
                       label=f"S&M 2008, RBM {PUBLISHED_HIDDEN} hidden", zorder=4)
    all_k = sorted(int(k) for k in trials["k"].unique())
    ax.set_xscale("log")
    ax.set_xticks(all_k)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(k) for k in all_k]))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylim(bottom, top)
    ax.set_xlabel("k in CD-k (the first RBM's training)")
    ax.set_ylabel("test log-likelihood or its lower bound (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    ax.set_title("The three models against k: mean over seeds and the interval claims are judged by", fontsize=11)
    path = out / "k_metrics.png"
    figures.save(fig, path)
    return FigureFile(path, "The three models against k", (
        "Each point: the mean over seeds at that k; bars: the seeds' 95% t-interval widened by the estimators' own "
        "uncertainty (AIS's interval, RAISE, 2 standard errors); dots: single seeds. Bars reaching the edge "
        "continue beyond it. A difference between k is claimed only where bars do not overlap."))


def _curve_data(epochs: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    if epochs.empty:
        return pd.DataFrame(columns=["stage", "epoch", "value", "k", "seed"])
    data = epochs[epochs["name"] == CURVE_METRIC].merge(trials[["trial_id", "k", "seed"]], on="trial_id")
    return data.assign(seed=data["seed"].fillna(-1), k=data["k"].astype(int))


def likelihood_curves(epochs: pd.DataFrame, trials: pd.DataFrame, out: Path) -> FigureFile | None:
    """val_log_likelihood over epochs, one line per k (mean over seeds, band: the seeds' range)."""
    data = _curve_data(epochs, trials)
    if data.empty:
        return None
    stages = [s for s in STAGES if s in set(data["stage"])]
    ks = sorted(data["k"].unique())
    colours = dict(zip(ks, plt.get_cmap("viridis")(np.linspace(0, 0.9, len(ks))), strict=True))
    fig, axes = plt.subplots(1, len(stages), figsize=(6.5 * len(stages), 4.3), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        part = data[data["stage"] == stage]
        for k, group in part.groupby("k", sort=True):
            by_seed = group.groupby(["seed", "epoch"])["value"].mean().unstack("epoch")
            epochs_ = by_seed.columns.to_numpy()
            ax.plot(epochs_, by_seed.mean(), marker="o", ms=3, color=colours[k], label=f"k={k}")
            if len(by_seed) > 1:
                ax.fill_between(epochs_, by_seed.min(), by_seed.max(), color=colours[k], alpha=0.15)
        ax.set_title(f"{STAGES[stage]}: validation log-likelihood (cheap AIS)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = out / "k_likelihood_curves.png"
    figures.save(fig, path)
    return FigureFile(path, "Likelihood curves per k",
                      "Mean over seeds per k; band: the range over seeds. The curves use their own cheap AIS "
                      "settings, so their level is rougher than the final numbers'.")


def learning_curves(epochs: pd.DataFrame, trials: pd.DataFrame, out: Path) -> FigureFile | None:
    """Per-epoch metrics of the completed trials, one line per k (mean and 95% band over seeds)."""
    if epochs.empty:
        return None
    data = epochs.merge(trials[["trial_id", "k"]], on="trial_id")
    wanted = {f"{stage}: {name}" for stage, name in CURVES}
    data = data.assign(metric=data["stage"] + ": " + data["name"])
    data = data[data["metric"].isin(wanted)]
    if data.empty:
        return None
    present = [f"{s}: {n}" for s, n in CURVES if f"{s}: {n}" in set(data["metric"])]
    data = data.assign(k=data["k"].map(lambda k: f"k={k}"))
    hue_order = [f"k={k}" for k in sorted(trials["k"].unique())]
    sns.set_theme(style="whitegrid", context="notebook")
    grid = sns.relplot(
        data=data, x="epoch", y="value", hue="k", hue_order=hue_order, col="metric", col_order=present,
        col_wrap=min(3, len(present)), kind="line", errorbar=_errorbar, marker="o",
        facet_kws={"sharey": False, "sharex": False}, height=3.2, aspect=1.35, palette="viridis",
    )
    grid.set_titles("{col_name}")
    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    grid.figure.suptitle("Learning curves per k: mean over seeds, band = 95% t-interval", y=1.02)
    path = out / "k_learning_curves.png"
    figures.save(grid.figure, path)
    sns.reset_orig()
    return FigureFile(path, "Learning curves per k")


# --- the section ------------------------------------------------------------------------------------
def write_section(
    doc: Document, done: pd.DataFrame, epochs: pd.DataFrame, out: Path, configs: dict[int, dict] | None = None,
    sampler: str | None = None, label: Callable[[pd.Series], str] = default_label,
) -> None:
    """The k-comparison into `doc`: sentences first, then the per-k table, the figures, the per-trial
    table; `k_comparison.csv` and `k_trials.csv` into `out`. `done`: the completed trials as
    `overview.trials_table` gives them (k as int); `epochs`: their per-epoch metrics; `configs`: trial
    id -> trial config (for settings not stored as metrics); `label`: how a trial is named."""
    configs = configs or {}
    ks = sorted(int(k) for k in done["k"].unique())
    doc.text(_intro(done, ks))
    compared, caveat, may_claim = matched_trials(done, sampler)
    if caveat:
        doc.note(caveat, label="Caveat")

    rows = {s: trial_estimates(compared, s) for s in STAGES if _has(compared, f"{s}.test.log_likelihood")}
    recon = plain_values(compared, RECON)
    summary, stalled = seconds_summary(compared)
    if may_claim:
        verdicts = {s: v for s, r in rows.items() if (v := judge(r)) is not None}
        for sentence in (lead_text(verdicts),
                         *(model_text(s, v) for s, v in verdicts.items() if s == "rbm" or v.any_separated),
                         recon_text(verdicts.get("rbm"), judge(recon, "lower")),
                         curves_text(epochs, compared)):
            if sentence:
                doc.text(sentence)
        if not verdicts:
            doc.note("no test log-likelihoods recorded at two or more values of k, so there is nothing to compare.")
    for sentence in (gap_text(rows), *missing_text(compared),
                     seconds_text(summary, stalled, label), settings_text(compared, configs),
                     answer_published(compared) if may_claim else None):
        if sentence:
            doc.text(sentence)

    table, long = k_table(rows, recon, summary, stalled, compared)
    long.to_csv(out / "k_comparison.csv", index=False)
    doc.table(table, (
        "Per k: mean over seeds [interval]. RBM columns: the seeds' 95% t-interval widened by the estimator's "
        "own uncertainty (AIS: its log Z interval, whose upper end for the log-likelihood is at most ln 20 = 3.0 "
        "nats above the estimate by Markov's inequality, ± 2 test-set standard errors; RAISE: ± 2 standard "
        "errors, on the images it scored); their gap is AIS minus RAISE (on the same images where recorded). "
        "DBN bounds: the interval claims are judged by, spanning AIS's interval and RAISE's side where there is one. A "
        "difference between k is claimed only where the envelope of the intervals separates. Recon error: the "
        "seeds' t-interval. Seconds: median and range over trials, stalled trials left out."))
    doc.figure(models_figure(rows, compared, out))
    curves = likelihood_curves(epochs, compared, out)
    if curves is None:
        doc.note(f"no likelihood curves recorded (per-epoch `{CURVE_METRIC}`; set eval.curve_every to record them).")
    doc.figure(curves)
    learning = learning_curves(epochs, compared, out)
    if learning is None:
        doc.note("none of the per-epoch training metrics (reconstruction error, pseudo-log-likelihood, free-energy "
                 "gap) are recorded, so there are no learning curves of them.")
    doc.figure(learning)
    per_trial = trial_table(rows, compared, stalled, label)
    per_trial.to_csv(out / "k_trials.csv", index=False)
    doc.table(per_trial, "Per trial: AIS estimate [its interval widened by 2 standard errors] ± standard error, "
                         "RAISE, their gap, the spread of log Z over AIS repeats, and the DBN bounds")


def _intro(done: pd.DataFrame, ks: list[int]) -> str:
    seeds = done.assign(seed=done["seed"].fillna(-1)).groupby("k")["seed"].nunique()
    count = done.groupby("k").size()
    if seeds.nunique() == 1 and (seeds == count).all():
        per = f"{int(seeds.iloc[0])} seed{'s' if seeds.iloc[0] != 1 else ''} at each k"
    else:
        per = "; ".join(f"k={k}: {int(count[k])} trial{'s' if count[k] != 1 else ''}, {int(seeds[k])} "
                        f"distinct seed{'s' if seeds[k] != 1 else ''}" for k in ks)
    return (f"{len(done)} completed trials over k = {_ks(ks)} ({per}). Trials with the same k and seed are "
            "averaged first: the seeds, not the trials, are the sample.")


# --- samples and the DBN question (kept from the lab's second question) ------------------------------
def sample_stats(samples_by_trial: dict[int, dict[str, dict]]) -> pd.DataFrame:
    """Per trial and model: sharpness (mean pixel entropy) and diversity of its samples
    (`samples_by_trial[trial][stage]` is `figures.sample(model)`)."""
    rows = []
    for trial_id, by_stage in samples_by_trial.items():
        for stage, drawn in by_stage.items():
            pv = drawn["pv"]
            rows.append({"trial_id": trial_id, "stage": stage, "pixel_entropy": figures.sample_sharpness(pv),
                         "diversity": figures.sample_diversity(pv), "pv": pv})
    return pd.DataFrame(rows, columns=["trial_id", "stage", "pixel_entropy", "diversity", "pv"])


def samples_per_k(
    samples: pd.DataFrame, representatives: dict[int, int], out: Path, numbers: dict[int, int] | None = None
) -> FigureFile | None:
    """One row of samples per k and model, from the same start states (figures.start_states);
    `numbers`: trial id -> the trial's number, as users know it (else the id is shown)."""
    rows = []
    names = {"rbm": "RBM", "dbn": "DBN", "finetune": "fine-tuned DBN"}
    for k, trial_id in sorted(representatives.items()):
        mine = samples[samples["trial_id"] == trial_id].set_index("stage")
        for stage in STAGE_TITLES:
            if stage in mine.index:
                pv = mine.loc[stage, "pv"][figures.N_CHAINS:]
                shown = (numbers or {}).get(trial_id, trial_id)
                rows.append((f"k={k} {names[stage]}\n(trial {shown})", pv, (28, 28), figures.N_CHAINS + 1))
    if not rows:
        return None
    return figures.image_rows(
        rows,
        f"Samples per k after {figures.GIBBS_STEPS} Gibbs steps, from the same random start states",
        out / "k_samples.png",
        f"For each k the best trial by the study's objective; chains {figures.N_CHAINS + 1}-"
        f"{2 * figures.N_CHAINS} of every sample figure ({figures.START_ACTIVE:.0%} of the top hidden "
        f"units on, seed {figures.SAMPLE_SEED}).",
        column_label="chain",
    )


def answer_published(trials: pd.DataFrame) -> str | None:
    """The published log-likelihoods beside this study's, where its RBMs are of the published size."""
    ll = "rbm.test.log_likelihood"
    if ll not in trials or "hidden" not in trials:
        return None
    published = ", ".join(f"{v} for CD-{k}" for k, v in PUBLISHED_LL.items())
    text = (f"For scale: Salakhutdinov & Murray (2008) report test log-probabilities of about {published} "
            f"for RBMs of {PUBLISHED_HIDDEN} hidden units, trained with their own recipe. ")
    same = trials[(trials["hidden"] == PUBLISHED_HIDDEN) & trials["k"].isin(list(PUBLISHED_LL)) & trials[ll].notna()]
    if same.empty:
        sizes = ", ".join(str(int(h)) for h in sorted(trials["hidden"].dropna().unique()))
        return text + (f"This study's RBMs have {sizes or 'other numbers of'} hidden units or other k, so compare "
                       "how the log-likelihood changes with k, not its level.")
    cells = []
    for k, group in same.groupby("k", sort=True):
        values = group[ll]
        low, high = t_interval(values)
        spread = f" [{fmt(low)}, {fmt(high)}]" if not math.isnan(low) else ""
        trials_text = f"{len(values)} trial{'' if len(values) == 1 else 's'}"
        cells.append(f"k={int(k)}: {fmt(values.mean())}{spread} ({trials_text}; published {PUBLISHED_LL[int(k)]})")
    return text + f"This study's {PUBLISHED_HIDDEN}-unit RBMs: " + "; ".join(cells) + "."


def answer_dbn(trials: pd.DataFrame, samples: pd.DataFrame) -> list[str]:
    """Paragraphs comparing DBN and RBM: bounds against the RBM's likelihood, and their samples."""
    out = []
    for stage, name in (("dbn", "task-2 DBN"), ("finetune", "fine-tuned DBN (task 3)")):
        column = f"{stage}.test.log_likelihood"
        if column not in trials or "rbm.test.log_likelihood" not in trials:
            continue
        both = trials[[column, "rbm.test.log_likelihood"]].dropna()
        if both.empty:
            continue
        diff = both[column] - both["rbm.test.log_likelihood"]
        low, high = t_interval(diff)
        above = int((diff > 0).sum())
        interval = f" [{fmt(low)}, {fmt(high)}]" if not math.isnan(low) else ""
        verdict = (
            "since it is a lower bound, the DBN's true log-likelihood is at least that much above the RBM's, "
            "as far as the AIS estimates of both log Z can be trusted (too few inverse temperatures make AIS "
            "underestimate log Z, which flatters both numbers, and the larger model more)"
            if low > 0 else
            "a lower bound below the RBM's likelihood does not show that the DBN is worse, only that the bound "
            "cannot prove it better" if high < 0 else
            "the difference is within the seed-to-seed spread"
        ) if not math.isnan(low) else ("a single trial: no interval")
        out.append(
            f"The {name}'s test lower bound minus the RBM's test log-likelihood is {fmt(float(diff.mean()))} nats on "
            f"average{interval} over {len(diff)} trials, positive in {above} of them; {verdict}."
        )
    if not samples.empty:
        by = samples.groupby("stage")[["pixel_entropy", "diversity"]].mean()
        names = {"rbm": "RBM", "dbn": "DBN", "finetune": "fine-tuned DBN"}
        parts = [f"{names[s]} {fmt(by.loc[s, 'pixel_entropy'], 3)} nats per pixel, diversity "
                 f"{fmt(by.loc[s, 'diversity'])}" for s in STAGE_TITLES if s in by.index]
        out.append(
            f"Samples after {figures.GIBBS_STEPS} Gibbs steps from the same start states, averaged over "
            f"{samples['trial_id'].nunique()} trials: " + "; ".join(parts) + ". Pixel entropy measures blur "
            "(0 for crisp black-and-white pictures, 0.69 for uniform grey); diversity is the mean distance "
            "between the 20 chains' pictures (near 0 when every chain ends on the same blob)."
        )
        wide = samples.pivot(index="trial_id", columns="stage", values="pixel_entropy")
        for stage, name in (("dbn", "task-2 DBN"), ("finetune", "fine-tuned DBN")):
            if not {"rbm", stage} <= set(wide.columns):
                continue
            diff = (wide[stage] - wide["rbm"]).dropna()
            low, high = t_interval(diff)
            if math.isnan(low):
                verdict = "one trial, no interval"
            elif high < 0:
                verdict = f"the {name}'s samples are crisper than the RBM's"
            elif low > 0:
                verdict = f"the {name}'s samples are blurrier than the RBM's"
            else:
                verdict = "no measurable difference in blur"
            out.append(
                f"Pixel entropy of the {name}'s samples minus the RBM's, per trial: {fmt(float(diff.mean()), 3)} "
                f"[{fmt(low, 3)}, {fmt(high, 3)}] over {len(diff)} trials: {verdict}."
            )
    return out
