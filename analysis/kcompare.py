"""The k-comparison: what changes when k in CD-k grows, measured across seeds.

For each k (the trial config's `rbm.cd_k`) over the completed trials: mean and a 95% Student-t
interval of the final metrics in `METRICS`; seaborn point plots of each against k (with every
seed's value); learning curves per k from the per-epoch metrics; sample grids per k from the same
random hidden states; and the written answer to the handout's two questions, every number in it
taken from these tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from rbm_study.analysis import figures
from rbm_study.analysis.figures import FigureFile
from rbm_study.core import evaluate
from scipy import stats

# (final metric, what it is, which direction is better)
METRICS: list[tuple[str, str, str]] = [
    ("rbm.test.log_likelihood", "RBM test log-likelihood (nats)", "higher"),
    ("dbn.test.log_likelihood", "DBN lower bound before fine-tuning (nats)", "higher"),
    ("finetune.test.log_likelihood", "DBN lower bound after fine-tuning (nats)", "higher"),
    ("rbm.test.recon_error", "RBM reconstruction error (test, squared error per image)", "lower"),
    ("rbm.test.pseudo_log_likelihood", "RBM pseudo-log-likelihood (test, nats)", "higher"),
    ("rbm.seconds_per_epoch", "seconds per RBM epoch", "lower"),
]
# Salakhutdinov & Murray's (2008) published test log-likelihoods, by k, of RBMs of one size
PUBLISHED_HIDDEN, PUBLISHED_LL = evaluate.PAPER_HIDDEN, evaluate.PAPER_TEST_LL
LABELS = {name: label for name, label, _ in METRICS}
BETTER = {name: better for name, _, better in METRICS}
CURVES = [  # (stage, per-epoch metric) drawn as learning curves
    ("rbm", "train_recon_error"),
    ("rbm", "val_recon_error"),
    ("rbm", "val_pseudo_log_likelihood"),
    ("rbm", "free_energy_gap"),
    ("dbn", "train_recon_error"),
    ("finetune", "train_recon_error"),
    ("finetune", "sleep_recognition_error"),
]


def fmt(x: float, digits: int = 2) -> str:
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


# --- tables --------------------------------------------------------------------------------------
def per_k(trials: pd.DataFrame) -> pd.DataFrame:
    """Long table: k, metric, label, better, n, mean, std, ci_low, ci_high over the completed trials."""
    rows = []
    for k, group in trials.groupby("k", sort=True):
        for name, label, better in METRICS:
            if name not in group:
                continue
            values = group[name].dropna()
            if values.empty:
                continue
            low, high = t_interval(values)
            rows.append({
                "k": int(k), "metric": name, "label": label, "better": better, "n": int(values.size),
                "mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                "ci_low": low, "ci_high": high,
            })
    return pd.DataFrame(rows, columns=["k", "metric", "label", "better", "n", "mean", "std", "ci_low", "ci_high"])


def wide_table(stats_long: pd.DataFrame) -> pd.DataFrame:
    """One row per metric, one column per k: 'mean [low, high]' (n seeds)."""
    if stats_long.empty:
        return pd.DataFrame()
    cells = stats_long.assign(cell=[
        f"{fmt(r.mean)} [{fmt(r.ci_low)}, {fmt(r.ci_high)}]" if not math.isnan(r.ci_low) else f"{fmt(r.mean)} (n=1)"
        for r in stats_long.itertuples()
    ])
    table = cells.pivot(index="label", columns="k", values="cell")
    order = [LABELS[m] for m, _, _ in METRICS if LABELS[m] in table.index]
    table = table.loc[order]
    table.columns = [f"k={k}" for k in table.columns]
    counts = stats_long.groupby("k")["n"].max()
    table.loc["seeds (completed trials)"] = [str(counts[int(c[2:])]) for c in table.columns]
    return table.reset_index().rename(columns={"label": "metric (mean [95% t-interval])"})


# --- plots ---------------------------------------------------------------------------------------
def metric_plots(trials: pd.DataFrame, out: Path) -> FigureFile:
    """Point plot (mean and 95% t-interval) of each metric against k, each seed as a dot."""
    names = [m for m, _, _ in METRICS if m in trials and trials[m].notna().any()]
    cols = 3
    rows = math.ceil(len(names) / cols)
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    order = sorted(trials["k"].unique())
    for ax, name in zip(axes.flat, names, strict=False):
        sns.stripplot(data=trials, x="k", y=name, order=order, ax=ax, color="0.55", size=5, jitter=0.12, alpha=0.8)
        sns.pointplot(data=trials, x="k", y=name, order=order, ax=ax, errorbar=_errorbar, capsize=0.15,
                      color="C0", markers="o", linestyles="-")
        ax.set_title(f"{LABELS[name]}\n({BETTER[name]} is better)", fontsize=10)
        ax.set_xlabel("k in CD-k")
        ax.set_ylabel(name, fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("Final metrics against k: mean and 95% t-interval across seeds (grey dots: single trials)",
                 fontsize=12)
    fig.tight_layout()
    path = out / "k_metrics.png"
    figures.save(fig, path)
    sns.reset_orig()
    return FigureFile(path, "Final metrics against k", grids=[(rows, cols)])


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


def samples_per_k(samples: pd.DataFrame, representatives: dict[int, int], out: Path) -> FigureFile | None:
    """One row of samples per k and model, from the same start states (figures.start_states)."""
    rows = []
    names = {"rbm": "RBM", "dbn": "DBN", "finetune": "fine-tuned DBN"}
    for k, trial_id in sorted(representatives.items()):
        mine = samples[samples["trial_id"] == trial_id].set_index("stage")
        for stage in ("rbm", "dbn", "finetune"):
            if stage in mine.index:
                pv = mine.loc[stage, "pv"][figures.N_CHAINS:]
                rows.append((f"k={k} {names[stage]}\n(trial {trial_id})", pv, (28, 28), figures.N_CHAINS + 1))
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


# --- the written answer ----------------------------------------------------------------------------
def _row(stats_long: pd.DataFrame, metric: str, k: int) -> pd.Series:
    return stats_long[(stats_long["metric"] == metric) & (stats_long["k"] == k)].iloc[0]


def _cell(r: pd.Series) -> str:
    if math.isnan(r["ci_low"]):
        return f"{fmt(r['mean'])} (one seed, no interval)"
    return f"{fmt(r['mean'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"


def best_k(stats_long: pd.DataFrame, metric: str) -> int | None:
    part = stats_long[stats_long["metric"] == metric]
    if part.empty:
        return None
    index = part["mean"].idxmax() if BETTER[metric] == "higher" else part["mean"].idxmin()
    return int(part.loc[index, "k"])


def _resolved(a: pd.Series, b: pd.Series) -> str:
    if math.isnan(a["ci_low"]) or math.isnan(b["ci_low"]):
        return "with a single seed at one end there is no interval to judge it by"
    if a["ci_high"] < b["ci_low"] or b["ci_high"] < a["ci_low"]:
        return "the 95% intervals do not overlap"
    return "the 95% intervals overlap, so the seeds do not resolve this difference"


def answer_k(stats_long: pd.DataFrame, trials: pd.DataFrame) -> list[str]:
    """Paragraphs answering 'what changes when k grows?', every number from `stats_long`."""
    ks = sorted(stats_long["k"].unique())
    low_k, high_k = ks[0], ks[-1]
    out = []
    for metric, label, better in METRICS:
        if stats_long[stats_long["metric"] == metric].empty:
            continue
        if not ({low_k, high_k} <= set(stats_long[stats_long["metric"] == metric]["k"])):
            continue
        a, b = _row(stats_long, metric, low_k), _row(stats_long, metric, high_k)
        change = b["mean"] - a["mean"]
        direction = "rises" if change > 0 else "falls" if change < 0 else "stays"
        best = best_k(stats_long, metric)
        sentence = (
            f"**{label}** {direction} from {_cell(a)} at k={low_k} to {_cell(b)} at k={high_k} "
            f"(change {fmt(change)}; {_resolved(a, b)}); the best k by this measure ({better} is better) is k={best}."
        )
        out.append(sentence)

    ll, rec = best_k(stats_long, "rbm.test.log_likelihood"), best_k(stats_long, "rbm.test.recon_error")
    if ll is not None and rec is not None:
        a_ll = _row(stats_long, "rbm.test.log_likelihood", ll)
        a_rec = _row(stats_long, "rbm.test.recon_error", rec)
        if ll != rec:
            out.append(
                f"**Reconstruction error and likelihood disagree about the best k**: the test log-likelihood is "
                f"highest at k={ll} ({fmt(a_ll['mean'])} nats) while the reconstruction error is lowest at "
                f"k={rec} ({fmt(a_rec['mean'])}). Reconstruction error measures one Gibbs step away from the "
                "data, not how much probability the model gives to the data, so it is the likelihood that answers "
                "which k trains the better generative model."
            )
        else:
            out.append(
                f"Reconstruction error and likelihood agree about the best k: both prefer k={ll} "
                f"(log-likelihood {fmt(a_ll['mean'])} nats, reconstruction error {fmt(a_rec['mean'])})."
            )
    if {"rbm.seconds_per_epoch"} <= set(stats_long["metric"]):
        part = stats_long[stats_long["metric"] == "rbm.seconds_per_epoch"].set_index("k")["mean"]
        if low_k in part and high_k in part and part[low_k] > 0:
            out.append(
                f"Time: an RBM epoch takes {fmt(part[low_k])} s at k={low_k} and {fmt(part[high_k])} s "
                f"at k={high_k}, {fmt(part[high_k] / part[low_k])} times as long."
            )
    if "rbm.log_z_exact" in trials:
        exact = int((trials["rbm.log_z_exact"] == 1.0).sum())
        total = int(trials["rbm.log_z_exact"].notna().sum())
        how = f"{exact} of {total} RBM log-likelihoods are exact (log Z by enumeration)"
        if exact < total and "eval.ais_chains" in trials:
            how += (f"; the others use AIS with {int(trials['eval.ais_chains'].median())} chains and "
                    f"{int(trials['eval.ais_betas'].median())} inverse temperatures")
        out.append(how + ".")
    return out


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
                 f"{fmt(by.loc[s, 'diversity'])}" for s in ("rbm", "dbn", "finetune") if s in by.index]
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
