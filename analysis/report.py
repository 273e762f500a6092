"""`rbm-study report`: a study database in, `index.html`, `report.md`, PNG figures and CSV tables out.

Sections: summary; the lab's figures for the best trial (and for `--trial`); the k-comparison;
the study overview. Whatever the snapshot cannot support yet (no completed trial, one k, no
MNIST for reconstructions, too few trials for importances) becomes a note saying so.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from rbm_study.analysis import figures, kcompare, overview
from rbm_study.analysis.html import Document, write
from rbm_study.analysis.load import Snapshot, open_snapshot
from rbm_study.core import labfiles
from rbm_study.core.errors import UserError, output_folder

MAX_SAMPLED_TRIALS = 60  # trials whose samples enter the sample statistics (best first)


def load_test_digits(
    config: dict, data_dir: str | Path | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """The first N_DIGITS test images (grey, and binarised once) or (None, None, why not).

    MNIST is looked for as `rbm-study run` does: `data_dir` (--data-dir), the trial config's
    data.root, $MNIST_ROOT, ./data."""
    from rbm_study.core.data import ENV_VAR, binarize_once, has_mnist, load_mnist

    candidates = []
    configured = (config.get("data") or {}).get("root") if isinstance(config, dict) else None
    for root in (data_dir, configured, os.environ.get(ENV_VAR), "data"):
        if root and Path(root) not in candidates:
            candidates.append(Path(root))
    for root in candidates:
        if has_mnist(root):
            try:
                data = load_mnist(root, "cpu", subset=figures.N_DIGITS)
            except Exception as err:  # a damaged copy: the rest of the report still renders
                return None, None, f"reading MNIST from {root} failed ({str(err).splitlines()[0]})"
            grey = data.test[: figures.N_DIGITS]
            return grey, binarize_once(grey), ""
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    return None, None, (
        f"reconstructions need the MNIST test images, not found (looked in {looked}); pass --data-dir or set "
        f"{ENV_VAR} to a folder holding MNIST/raw/*-ubyte[.gz] and run the report again"
    )


_SAMPLES: dict[tuple[str, int], dict[str, dict]] = {}


def _models(snap: Snapshot, trial_id: int) -> dict[str, labfiles.Model]:
    files = snap.weights(trial_id)
    return {stage: labfiles.load(files[name]) for stage, name in labfiles.FILE_NAMES.items() if name in files}


def _samples(snap: Snapshot, trial_id: int, models: dict[str, labfiles.Model]) -> dict[str, dict]:
    """figures.sample of each model of a trial, run once per report (the chains are deterministic)."""
    key = (str(snap.copy), trial_id)
    if key not in _SAMPLES:
        _SAMPLES[key] = {stage: figures.sample(model) for stage, model in models.items()}
    return _SAMPLES[key]


def build(
    db: str | Path, out: str | Path, name: str | None = None, trial: int | None = None,
    data_dir: str | Path | None = None,
) -> Path:
    """Write the report of one study into `out`; returns the path of index.html. `trial`: a trial
    number (as `status` shows it) whose figures are drawn too; `data_dir`: where MNIST is, for the
    reconstruction figures (see `load_test_digits`)."""
    out = Path(out)
    with open_snapshot(db, name) as snap:
        study = snap.study(name)
        if trial is not None:
            snap.trial(int(study["id"]), trial)
        output_folder(out)
        doc = _build(snap, study, trial, out, data_dir)
        write(doc, out)
        for key in [k for k in _SAMPLES if k[0] == str(snap.copy)]:
            del _SAMPLES[key]
    return out / "index.html"


def _build(snap: Snapshot, study: pd.Series, asked: int | None, out: Path, data_dir: str | Path | None) -> Document:
    trials = snap.study_trials(int(study["id"]))
    table = overview.trials_table(trials, snap.final_metrics)
    overview.for_users(table).to_csv(out / "trials.csv", index=False)
    # Several objectives are stored comma-separated; tables, the history and "best" rank by the first.
    metrics, modes = str(study["objective_metric"]).split(","), str(study["objective_mode"]).split(",")
    metric, mode = metrics[0], modes[0]
    objectives = ", ".join(f"`{m}` ({d}imised)" for m, d in zip(metrics, modes, strict=False))
    if len(metrics) > 1:
        objectives += f"; tables and figures rank trials by the first, `{metric}`"
    done = table[(table["state"] == "completed")] if not table.empty else table
    doc = Document(f"rbm-study report: {study['name']}")

    # --- summary -----------------------------------------------------------------------------
    taken = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc.text(
        f"Database `{snap.path}`, read {taken} (a consistent snapshot). Study status: **{study['status']}**; "
        f"trials: {overview.state_counts(table) if not table.empty else 'none yet'}. "
        f"Objective{'s' if len(metrics) > 1 else ''}: {objectives}. Code version {study['code_version']}."
    )
    if study["status"] == "running":
        doc.note("the study is still running: the numbers below are those of the snapshot and will change.",
                 label="Note")
    lab = study["config"].get("lab", study["config"]) if isinstance(study["config"], dict) else {}

    # --- the lab's figures ---------------------------------------------------------------------
    doc.heading("The lab's figures")
    scored = overview.ranked(table, mode) if not table.empty else table
    to_draw: list[tuple[str, pd.Series]] = []
    if not scored.empty:
        to_draw.append(("best trial by the objective", scored.iloc[0]))
    else:
        doc.note("no trial has completed yet, so there are no figures of trained models.")
    if asked is not None:
        row = table[table["number"] == asked].iloc[0]
        if not to_draw or int(to_draw[0][1]["number"]) != asked:
            to_draw.append(("trial asked for with --trial", row))
    grey = binary = None
    why = ""
    if to_draw:
        trial_config = trials[trials["id"] == int(to_draw[0][1]["trial_id"])]["config"].iloc[0]
        grey, binary, why = load_test_digits(trial_config or lab, data_dir)
        if grey is None:
            doc.note(why)
    for reason, row in to_draw:
        tid, number = int(row["trial_id"]), int(row["number"])
        doc.heading(f"Trial {number}: {reason}", level=3)
        doc.text(
            f"k={row['k']}, seed={row['seed']}, state {row['state']}, objective `{metric}` = "
            f"{kcompare.fmt(row['objective'])}; searched parameters: "
            + (", ".join(f"{c[6:]}={row[c]}" for c in table.columns if c.startswith("param:") and pd.notna(row[c]))
               or "none")
        )
        models = _models(snap, tid)
        if not models:
            doc.note(f"trial {number} has no weight files in the database (state {row['state']}).")
            continue
        drawn = _samples(snap, tid, models)
        for fig in figures.lab_figures(models, out, f"trial{number}_", f"trial {number}, k={row['k']}", grey,
                                       binary, drawn):
            doc.figure(fig)

    # --- k-comparison ----------------------------------------------------------------------------
    doc.heading("What changes when k in CD-k grows?")
    ks = sorted(int(k) for k in done["k"].dropna().unique()) if not done.empty else []
    if len(ks) < 2:
        doc.note(
            "there is no k-comparison: " + (
                "no trial has completed yet." if not ks else
                f"every completed trial has k={ks[0]}; a study needs at least two values of rbm.cd_k "
                "(e.g. search rbm.cd_k over [1, 3, 10]) for this section."
            )
        )
    else:
        _kcomparison(snap, doc, done.assign(k=done["k"].astype(int)), trials, ks, mode, out)

    # --- overview ----------------------------------------------------------------------------------
    doc.heading("Study overview")
    if table.empty:
        doc.note("the study has no trials yet.")
    else:
        best = overview.best_trials(table, mode)
        if best.empty:
            doc.note("no completed trial with an objective value yet, so no best trials.")
        else:
            doc.table(overview.for_users(best), f"Best trials by `{metric}` ({mode}imised)")
        doc.figure(overview.history_figure(table, metric, mode, out))
        values, reason = overview.importances(snap.optuna_study(str(study["name"])))
        if values is None:
            doc.note(reason + ".")
        else:
            doc.text(reason + ": " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()) + ".")
            doc.figure(overview.importance_figure(values, out))
        doc.figure(overview.params_figure(table, metric, out))
        problems = overview.problem_trials(table)
        doc.heading("Failed, pruned and interrupted trials", level=3)
        if problems.empty:
            doc.text("None.")
        else:
            doc.table(overview.for_users(problems), "With the reason recorded in the database")
    doc.heading("Files", level=3)
    doc.text(
        "`trials.csv`: every trial of the study with its state, parameters and final metrics; "
        "`k_comparison.csv` (when there is a k-comparison): the per-k statistics quoted above; the PNG files "
        "are the figures of this page. Weight files of any trial: `rbm-study export --db DB --trial N --out DIR`, "
        "N the trial's number as shown here and by `rbm-study status`."
    )
    return doc


def _kcomparison(
    snap: Snapshot, doc: Document, done: pd.DataFrame, trials: pd.DataFrame, ks: list[int], mode: str, out: Path
) -> None:
    # The k-comparison's sentences, tables and figures (kcompare: what the data shows, and only that).
    study_config = snap.studies.set_index("id").loc[int(trials["study_id"].iloc[0]), "config"]
    search = study_config.get("search") if isinstance(study_config, dict) else None
    epochs = snap.epoch_metrics[snap.epoch_metrics["trial_id"].isin(done["trial_id"])]
    kcompare.write_section(doc, done, epochs, out, configs=dict(zip(trials["id"], trials["config"], strict=True)),
                           sampler=search.get("sampler") if isinstance(search, dict) else None)

    ranked = overview.ranked(done, mode)  # the tie rule `status` and the best-trials table use
    representatives = {int(k): int(g.iloc[0]["trial_id"]) for k, g in ranked.groupby("k")}
    chosen = list(ranked["trial_id"].head(MAX_SAMPLED_TRIALS)) + list(representatives.values())
    drawn = {}
    for tid in dict.fromkeys(int(t) for t in chosen):
        found = _models(snap, tid)
        if found:
            drawn[tid] = _samples(snap, tid, found)
    samples = kcompare.sample_stats(drawn)
    numbers = {int(t): int(n) for t, n in zip(done["trial_id"], done["number"], strict=True)}
    doc.figure(kcompare.samples_per_k(samples, representatives, out, numbers))

    doc.heading("DBN samples against RBM samples", level=3)
    answers = kcompare.answer_dbn(done, samples)
    if not answers:
        doc.note("no DBN metrics or weights in the completed trials.")
    for paragraph in answers:
        doc.text(paragraph)
    if not samples.empty:
        per = samples.merge(done[["trial_id", "k"]], on="trial_id").groupby(["k", "stage"])[
            ["pixel_entropy", "diversity"]].mean().reset_index()
        per.to_csv(out / "k_samples.csv", index=False)
        per = per.rename(columns={"stage": "model", "pixel_entropy": "pixel entropy (nats)"})
        doc.table(per, "Sample statistics per k and model (mean over the trials at that k)")


def export(db: str | Path, trial: int, out: str | Path, name: str | None = None) -> list[Path]:
    """Write the lab's weight files of trial number `trial` of study `name` into `out`."""
    out = Path(out)
    with open_snapshot(db, name) as snap:
        study = snap.study(name)
        row = snap.trial(int(study["id"]), trial)
        files = snap.weights(int(row["id"]))
    if not files:
        raise UserError(f"trial {trial} has no weight files in the database (state {row['state']})")
    output_folder(out)
    written = []
    for name in labfiles.FILE_NAMES.values():
        if name in files:
            (out / name).write_bytes(files[name])
            written.append(out / name)
    return written
