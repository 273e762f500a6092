"""Study overview: the trials table, best trials, optimisation history, parameter importances
(Optuna's `optuna.importance`), each hyperparameter against the objective, failed and pruned trials."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from rbm_study.analysis import figures
from rbm_study.analysis.figures import FigureFile
from rbm_study.core.config import get_dotted
from rbm_study.study.progress import rank_key

KEY_METRICS = (
    "rbm.test.log_likelihood", "dbn.test.log_likelihood", "finetune.test.log_likelihood",
    "rbm.test.recon_error", "rbm.test.pseudo_log_likelihood", "rbm.seconds_per_epoch",
)


def trials_table(trials: pd.DataFrame, finals: pd.DataFrame) -> pd.DataFrame:
    """One row per trial of the study: ids, state, k, seed, searched params, objective, metrics, error."""
    wide = (finals[finals["trial_id"].isin(trials["id"])]
            .pivot(index="trial_id", columns="name", values="value")) if not finals.empty else pd.DataFrame()
    rows = []
    for t in trials.itertuples():
        config = t.config if isinstance(t.config, dict) else {}
        params = t.params if isinstance(t.params, dict) else {}
        duration = (t.finished_at - t.started_at).total_seconds() if pd.notna(t.finished_at) else float("nan")
        row: dict[str, Any] = {
            "trial_id": int(t.id), "number": int(t.number), "state": t.state,
            "k": get_dotted(config, "rbm.cd_k", params.get("rbm.cd_k")),
            "persistent": get_dotted(config, "rbm.persistent", None),
            "hidden": get_dotted(config, "rbm.hidden_size", params.get("rbm.hidden_size")),
            "seed": get_dotted(config, "seed", params.get("seed")),
            "objective": t.objective_value, "seconds": duration, "node": t.node, "attempt": t.attempt,
            "error": _last_line(t.error),
        }
        row.update({f"param:{k}": v for k, v in params.items()})
        if int(t.id) in wide.index:
            row.update(wide.loc[int(t.id)].to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


def for_users(table: pd.DataFrame) -> pd.DataFrame:
    """A trials table as users see it: each trial named by its number (`trial`), the one that
    `status` shows and `--trial` takes; the database's row id stays internal."""
    return table.drop(columns=["trial_id"], errors="ignore").rename(columns={"number": "trial"})


def _last_line(error: Any) -> str:
    """The last line of a traceback is the exception and its message."""
    if not isinstance(error, str) or not error.strip():
        return ""
    return error.strip().splitlines()[-1][:300]



def ranked(table: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Completed trials with an objective, best first, by `rbm-study status`'s own rank key (equal
    objectives in trial-number order), so the report and `status` name the same best trial."""
    done = table[(table["state"] == "completed") & table["objective"].notna()]
    keys = [rank_key(mode, value, number) for value, number in zip(done["objective"], done["number"], strict=True)]
    return done.iloc[sorted(range(len(done)), key=keys.__getitem__)]


def best_trials(table: pd.DataFrame, mode: str, n: int = 5) -> pd.DataFrame:
    done = ranked(table, mode).head(n)
    columns = ["trial_id", "number", "k", "seed", "objective"]
    columns += [c for c in table.columns if c.startswith("param:") and c not in ("param:rbm.cd_k", "param:seed")]
    columns += [m for m in KEY_METRICS if m in table]
    return done[[c for c in columns if c in done]]


def problem_trials(table: pd.DataFrame) -> pd.DataFrame:
    bad = table[table["state"].isin(["failed", "pruned", "interrupted"])]
    params = bad.filter(like="param:").apply(
        lambda r: ", ".join(f"{c[6:]}={v}" for c, v in r.items() if pd.notna(v)), axis=1
    ) if not bad.empty else pd.Series(dtype=str)
    out = bad[["trial_id", "number", "state", "error"]].copy()
    out.insert(3, "params", params.values if len(params) else [])
    out["error"] = out["error"].replace("", "(no reason recorded)")
    return out.rename(columns={"error": "reason"})


def history_figure(table: pd.DataFrame, metric: str, mode: str, out: Path) -> FigureFile | None:
    done = table[(table["state"] == "completed") & table["objective"].notna()].sort_values("number")
    if done.empty:
        return None
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.scatterplot(data=done.assign(k=done["k"].astype(str)), x="number", y="objective", hue="k", ax=ax, s=50,
                    palette="viridis")
    running = done["objective"].cummax() if mode == "max" else done["objective"].cummin()
    ax.step(done["number"], running, where="post", color="C3", label="best so far")
    for state, marker in (("failed", "x"), ("pruned", "v"), ("interrupted", "s")):
        part = table[table["state"] == state]
        if not part.empty:
            ax.scatter(part["number"], [done["objective"].min()] * len(part), marker=marker, color="0.4",
                       label=f"{state} (no value)")
    ax.set_xlabel("trial number (order of start)")
    ax.set_ylabel(metric)
    ax.set_title(f"Optimisation history: {metric} ({mode}imise)")
    ax.legend(fontsize=8, title="k", loc="best")
    fig.tight_layout()
    path = out / "overview_history.png"
    figures.save(fig, path)
    sns.reset_orig()
    return FigureFile(path, "Optimisation history")


def importances(optuna_study: Any) -> tuple[dict[str, float] | None, str]:
    """Optuna's parameter importances, or None and the reason they cannot be computed."""
    if optuna_study is None:
        return None, "the database holds no Optuna study of this name, so there are no parameter importances"
    import optuna

    complete = [t for t in optuna_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None, f"parameter importances need at least two completed trials in Optuna's study ({len(complete)} now)"
    try:
        values = optuna.importance.get_param_importances(optuna_study)
    except Exception as err:  # Optuna raises for a single distribution, constant params, ...
        return None, f"Optuna could not compute parameter importances: {str(err).splitlines()[0]}"
    if not values:
        return None, "Optuna found no searched parameter with more than one value"
    several = len(optuna_study.directions) > 1
    how = ("of reaching the best trials (for several objectives: the Pareto front's best by hypervolume)"
           if several else "of reaching the best 10% of the objective")
    return dict(values), ("PED-ANOVA importances (Optuna's default evaluator, optuna.importance."
                          f"get_param_importances) {how}, over the completed trials")


def importance_figure(values: dict[str, float], out: Path) -> FigureFile:
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(values) + 1.5))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="C0")
    ax.set_xlabel("importance for the objective (sums to 1)")
    ax.set_title("Hyperparameter importances (Optuna, PED-ANOVA)")
    fig.tight_layout()
    path = out / "overview_importances.png"
    figures.save(fig, path)
    sns.reset_orig()
    return FigureFile(path, "Hyperparameter importances")


def params_figure(table: pd.DataFrame, metric: str, out: Path) -> FigureFile | None:
    """The objective against each searched hyperparameter (completed trials)."""
    done = table[(table["state"] == "completed") & table["objective"].notna()]
    params = [c for c in table.columns if c.startswith("param:") and done[c].notna().any()] if not done.empty else []
    if not params:
        return None
    cols = min(3, len(params))
    rows = math.ceil(len(params) / cols)
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    for ax, column in zip(axes.flat, params, strict=False):
        values = done[[column, "objective"]].dropna()
        numeric = pd.to_numeric(values[column], errors="coerce")
        if numeric.notna().all() and values[column].nunique() > 6:
            ax.scatter(numeric, values["objective"], color="C0", alpha=0.8)
            if numeric.min() > 0 and numeric.max() / numeric.min() > 100:
                ax.set_xscale("log")
        else:
            order = sorted(values[column].unique(), key=lambda v: (str(type(v)), v))
            sns.stripplot(x=values[column].astype(str), y=values["objective"], order=[str(o) for o in order],
                          ax=ax, color="C0", size=6, jitter=0.1)
        ax.set_xlabel(column[6:])
        ax.set_ylabel(metric, fontsize=8)
    for ax in list(axes.flat)[len(params):]:
        ax.set_visible(False)
    fig.suptitle(f"The objective ({metric}) against each searched hyperparameter", fontsize=11)
    fig.tight_layout()
    path = out / "overview_params.png"
    figures.save(fig, path)
    sns.reset_orig()
    return FigureFile(path, "Objective against each hyperparameter")


def state_counts(table: pd.DataFrame) -> str:
    counts = table["state"].value_counts()
    order = ["completed", "running", "pruned", "failed", "interrupted"]
    return ", ".join(f"{int(counts[s])} {s}" for s in order if s in counts) or "no trials"


def numbers_equal(a: float, b: float) -> bool:
    return bool(np.isclose(a, b, rtol=1e-9, atol=1e-12))
