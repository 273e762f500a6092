"""`rbm-study report` and `export` on a small real study database."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch

from rbm_study.analysis import figures, kcompare
from rbm_study.analysis.load import open_snapshot
from rbm_study.cli import main
from rbm_study.core import labfiles
from rbm_study.core.models import RBM
from tests.analysis import builddb
from tests.conftest import Database


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _db_per_trial(db: Database) -> pd.DataFrame:
    """Completed trials with k, seed and their final metrics, read straight from the database."""
    trials = pd.DataFrame(db.query("SELECT id, config FROM rbm_trials WHERE state = 'completed'"),
                          columns=["id", "config"])
    finals = pd.DataFrame(db.query("SELECT trial_id, name, value FROM rbm_final_metrics"),
                          columns=["trial_id", "name", "value"])
    config = trials["config"].map(lambda c: c if isinstance(c, dict) else json.loads(c))  # PostgreSQL: parsed
    trials["k"] = config.map(lambda c: c["rbm"]["cd_k"])
    trials["seed"] = config.map(lambda c: c["seed"])
    wide = finals.pivot(index="trial_id", columns="name", values="value")
    return trials.set_index("id").join(wide)


# --- files and figures ---------------------------------------------------------------------------
EXPECTED = [
    "index.html", "report.md", "trials.csv", "k_comparison.csv", "figures.json", "k_metrics.png",
    "k_learning_curves.png", "k_samples.png", "overview_history.png", "overview_importances.png",
    "overview_params.png",
]


def test_report_writes_every_file_and_figure(report_dir: Path):
    for name in EXPECTED:
        assert (report_dir / name).is_file(), name
    best = int(pd.read_csv(report_dir / "trials.csv").query("state == 'completed'")
               .sort_values("objective").iloc[-1]["trial"])
    for trial in {best, 1}:
        for task in (1, 2, 3):
            for kind in ("weights", "reconstructions", "samples"):
                path = report_dir / f"trial{trial}_task{task}_{kind}.png"
                assert path.is_file(), path
    for png in report_dir.glob("*.png"):
        image = mpimg.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100, png
        assert np.asarray(image[..., :3]).std() > 0.01, f"{png} is blank"


def test_figures_have_the_expected_grids(report_dir: Path):
    manifest = {f["file"]: f for f in json.loads((report_dir / "figures.json").read_text())}
    weights = manifest["trial1_task1_weights.png"]
    assert weights["grids"] == [list(figures.grid_shape(17))] and weights["tile_shapes"] == [[28, 28]]
    task2 = manifest["trial1_task2_weights.png"]
    assert task2["grids"][1] == list(figures.grid_shape(16)) and task2["tile_shapes"][1] == list(figures.unit_shape(17))
    assert len(manifest["trial1_task3_weights.png"]["grids"]) == 3  # R1, G1, |R1 - G1|
    recon = manifest["trial1_task1_reconstructions.png"]
    assert recon["grids"] == [[1, 10]] * 4  # original, binary input, p(v|h), hidden state; 10 digits
    assert manifest["trial1_task3_reconstructions.png"]["grids"] == [[1, 10]] * 5


def test_a_100_unit_rbm_is_drawn_as_a_10x10_grid_of_28x28_tiles(tmp_path: Path):
    rbm = RBM.init(784, 100, generator=torch.Generator().manual_seed(0))
    assert figures.grid_shape(100) == (10, 10) and figures.unit_shape(100) == (10, 10)
    mosaic = figures.tile(figures.as_images(rbm.W.numpy().T, (28, 28)), pad=1)
    assert mosaic.shape == (10 * 29 + 1, 10 * 29 + 1)
    files = figures.lab_figures({"rbm": rbm}, tmp_path, "", "random", None, None)
    assert files[0].grids == [(10, 10)] and files[0].tile_shapes == [(28, 28)]
    assert [f.name for f in files] == ["task1_weights.png", "task1_samples.png"]


# --- numbers ---------------------------------------------------------------------------------------
def test_k_table_matches_a_groupby_of_the_database(report_dir: Path, study_db: Database):
    table = pd.read_csv(report_dir / "k_comparison.csv")
    expected = _db_per_trial(study_db)
    report = (report_dir / "report.md").read_text()
    assert set(table["k"]) == {1, 2}
    shown = {"rbm.test.log_likelihood (AIS only)", "rbm.test.log_likelihood_raise", "dbn.test.log_likelihood",
             "finetune.test.log_likelihood", "rbm.test.recon_error"}
    assert shown <= set(table["metric"])
    for row in table.itertuples():
        metric = row.metric.removesuffix(" (AIS only)")
        per_seed = expected[expected["k"] == row.k].groupby("seed")[metric].mean()  # seeds are the sample
        assert row.n == len(per_seed) == 2
        assert row.mean == pytest.approx(per_seed.mean(), rel=1e-9)
        low, high = kcompare.t_interval(per_seed)
        assert (row.ci_low, row.ci_high) == pytest.approx((low, high), rel=1e-9)
        assert row.low <= row.ci_low and row.high >= row.ci_high  # the estimators' uncertainty only widens it
        if row.metric in shown:  # the report's table quotes the same numbers
            assert f"{kcompare.fmt(row.mean)} [{kcompare.fmt(row.low)}, {kcompare.fmt(row.high)}]" in report


def test_written_answer_uses_the_database_numbers(report_dir: Path, study_db: Database):
    report = (report_dir / "report.md").read_text()
    expected = _db_per_trial(study_db)
    means = expected.groupby("k")["rbm.test.log_likelihood"].mean()
    best_ll = int(means.idxmax())
    recon = expected.groupby("k")["rbm.test.recon_error"].mean()
    best_recon = int(recon.idxmin())
    assert f"at k=1 to {kcompare.fmt(means[2])}" in report.replace("**", "") or kcompare.fmt(means[2]) in report
    assert best_ll in (1, 2) and best_recon in (1, 2)
    assert ("Reconstruction error and likelihood" in report
            or "Neither the RBM's test log-likelihood nor its test reconstruction error" in report)
    diff = (expected["dbn.test.log_likelihood"] - expected["rbm.test.log_likelihood"]).mean()
    assert f"{kcompare.fmt(diff)} nats on average" in report
    assert "What changes when k in CD-k grows?" in report and "DBN samples against RBM samples" in report
    assert "For scale: Salakhutdinov & Murray (2008)" in report and "not its level" in report


def test_trials_csv_and_overview(report_dir: Path, study_db: Database):
    table = pd.read_csv(report_dir / "trials.csv")
    db = pd.DataFrame(study_db.query("SELECT number, state, objective_value FROM rbm_trials"),
                      columns=["number", "state", "objective_value"])
    assert "trial_id" not in table and sorted(table["trial"]) == sorted(db["number"])  # one number, no row ids
    merged = table.merge(db, left_on="trial", right_on="number")
    assert (merged["state_x"] == merged["state_y"]).all()
    report = (report_dir / "report.md").read_text()
    assert "FloatingPointError: fine-tuning diverged" in report and "pruned by ASHA" in report
    assert "importances" in report and "Best trials" in report


# --- what the report cannot show -----------------------------------------------------------------
def test_one_k_and_no_completed_trial_are_said(runs: list[dict], tmp_path: Path):
    one_k = tmp_path / "one_k.db"
    builddb.write_study(one_k, "onek", [r for r in runs if r["params"]["rbm.cd_k"] == 1])
    assert main(["report", "--db", str(one_k), "--out", str(tmp_path / "r1")]) == 0
    text = (tmp_path / "r1" / "report.md").read_text()
    assert "there is no k-comparison: every completed trial has k=1" in text
    assert len(list((tmp_path / "r1").glob("trial*_task1_weights.png"))) == 1

    empty = tmp_path / "empty.db"
    builddb.write_study(empty, "fresh", [], extra_states=(("running", None),), study_status="running")
    before = _digest(empty)
    assert main(["report", "--db", str(empty), "--out", str(tmp_path / "r2")]) == 0
    text = (tmp_path / "r2" / "report.md").read_text()
    assert "no trial has completed yet, so there are no figures" in text
    assert "the study is still running" in text
    assert not list((tmp_path / "r2").glob("trial*.png"))
    assert _digest(empty) == before  # read, never written


def test_mnist_for_the_reconstructions_comes_from_data_dir_or_is_asked_for(
    runs: list[dict], mnist_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A study launched with $MNIST_ROOT (no data.root in its configs), reported without it."""
    unrooted = [{**r, "config": {**r["config"], "data": {**r["config"]["data"], "root": None}}} for r in runs[:1]]
    study_db = tmp_path / "unrooted.db"
    builddb.write_study(study_db, "unrooted", unrooted)
    monkeypatch.delenv("MNIST_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data here
    assert main(["report", "--db", str(study_db), "--out", "without"]) == 0
    assert "pass --data-dir or set MNIST_ROOT" in (tmp_path / "without" / "report.md").read_text()
    assert not list((tmp_path / "without").glob("*reconstructions.png"))

    assert main(["report", "--db", str(study_db), "--out", "with", "--data-dir", mnist_dir]) == 0
    assert list((tmp_path / "with").glob("*task1_reconstructions.png"))
    assert main(["report", "--db", str(study_db), "--out", "wrong", "--data-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "wrong").exists()  # refused before anything is written


def test_several_objectives_are_named_and_ranked_by_the_first(runs: list[dict], tmp_path: Path):
    """A multi-objective study stores "a,b" and "max,max": the report names both and ranks by the
    first, best first (a "max,max" taken for "not max" once ranked it as minimised)."""
    first, second = "rbm.val.log_likelihood", builddb.OBJECTIVE
    path = tmp_path / "two.db"
    builddb.write_study(path, "two", runs, objectives=(first, second))
    assert main(["report", "--db", str(path), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert f"Objectives: `{first}` (maximised), `{second}` (maximised)" in text
    assert f"Best trials by `{first}` (maximised)" in text
    best = pd.read_csv(tmp_path / "r" / "trials.csv").query("state == 'completed'")["objective"].max()
    table = text.split(f"Best trials by `{first}` (maximised)")[1]
    first_row = next(line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit())
    assert float(first_row.split("|")[4]) == pytest.approx(best, abs=0.006)  # trial | k | seed | objective
    assert "Pareto front" in text


def test_snapshot_of_a_study_being_written(study_db: Database, tmp_path: Path):
    """A writer holding an open transaction (WAL mode, as the study service runs) does not stop the
    report, and the report sees the last committed state only."""
    if study_db.kind == "sqlite":
        live = tmp_path / "live.db"
        shutil.copy(study_db.arg, live)
        writer = sqlite3.connect(live, isolation_level=None)
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("BEGIN IMMEDIATE")
        rollback = "ROLLBACK"
    else:
        import psycopg

        live, writer = study_db.arg, psycopg.connect(study_db.arg)  # a transaction opens with the update
        rollback = None
    writer.execute("UPDATE rbm_trials SET state = 'failed' WHERE id = 1")
    try:
        with open_snapshot(live) as snap:
            assert snap.trials.set_index("id").loc[1, "state"] == "completed"
            assert len(snap.final_metrics) > 0
    finally:
        writer.execute(rollback) if rollback else writer.rollback()
        writer.close()


def test_a_server_snapshot_is_one_state_of_the_named_study(study_db: Database, runs: list[dict],
                                                           monkeypatch: pytest.MonkeyPatch):
    """On PostgreSQL the copy is read in one read-only REPEATABLE READ transaction: writes committed
    by a driver while it is read are not in it; and it holds the rows of the study asked for only."""
    if study_db.kind != "postgresql":
        pytest.skip("the server's snapshot (SQLite's is the backup API, tested above)")
    from rbm_study.study import storage as storage_module

    server = study_db.server
    assert server is not None
    db = Database("postgresql", server.create_database(), server)
    builddb.write_study(db.arg, "first", runs[:2])
    builddb.write_study(db.arg, "second", runs[2:])
    copy_table = storage_module._copy_table
    tables_read: list[str] = []

    def copy_then_commit_a_write(con, out, table, query, chunk=500):
        copy_table(con, out, table, query, chunk)
        tables_read.append(table.name)
        if table.name == "rbm_studies":  # mid-copy, a driver commits: trials and metrics change
            db.execute("UPDATE rbm_trials SET state = 'failed'")
            db.execute("DELETE FROM rbm_final_metrics")

    monkeypatch.setattr(storage_module, "_copy_table", copy_then_commit_a_write)
    with open_snapshot(db.arg, "second") as snap:
        assert "rbm_trials" in tables_read and "trial_values" in tables_read
        assert list(snap.studies["name"]) == ["first", "second"]
        second = int(snap.study("second")["id"])
        assert set(snap.trials["study_id"]) == {second} and len(snap.trials) == 2  # only the named study's
        assert set(snap.trials["state"]) == {"completed"} and len(snap.final_metrics) > 0  # as before the write
        assert server.password not in snap.path and "***" in snap.path
        optuna_study = snap.optuna_study("second")
        assert optuna_study is not None and len(optuna_study.trials) == 2
        assert snap.optuna_study("first") is None  # the other study's Optuna rows were not copied
    assert db.query("SELECT DISTINCT state FROM rbm_trials") == [("failed",)]  # the write did happen


# --- bad input -----------------------------------------------------------------------------------
def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


def test_bad_inputs_exit_2_with_one_line(study_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = str(tmp_path / "out")
    missing = tmp_path / "missing.db"
    assert "does not exist" in _one_line_exit_2(["report", "--db", str(missing), "--out", out], capsys)
    assert not missing.exists()
    text = tmp_path / "notes.db"
    text.write_text("hello")
    assert "not an SQLite file" in _one_line_exit_2(["report", "--db", str(text), "--out", out], capsys)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE things (x)")
    before = _digest(foreign)
    assert "not an rbm-study database" in _one_line_exit_2(["report", "--db", str(foreign), "--out", out], capsys)
    assert _digest(foreign) == before
    assert "no study named 'nope'" in _one_line_exit_2(
        ["report", "--db", study_db.arg, "--name", "nope", "--out", out], capsys)
    assert "no trial 999" in _one_line_exit_2(
        ["report", "--db", study_db.arg, "--trial", "999", "--out", out], capsys)
    assert "no trial 999" in _one_line_exit_2(
        ["export", "--db", study_db.arg, "--trial", "999", "--out", out], capsys)
    assert "has no weight files" in _one_line_exit_2(
        ["export", "--db", study_db.arg, "--trial", "4", "--out", out], capsys)
    taken, before = tmp_path / "taken.html", study_db.digest()
    taken.write_text("mine")
    for command in (["report"], ["export", "--trial", "1"]):
        assert "is a file, not a folder" in _one_line_exit_2(
            [*command, "--db", study_db.arg, "--out", str(taken)], capsys)
    assert taken.read_text() == "mine" and study_db.digest() == before


# --- export ----------------------------------------------------------------------------------------
def test_export_round_trips_through_labfiles(study_db: Database, tmp_path: Path, runs: list[dict]):
    before = study_db.digest()
    assert main(["export", "--db", study_db.arg, "--trial", "1", "--out", str(tmp_path)]) == 0  # number 1: runs[1]
    assert study_db.digest() == before
    for name in ("zad1_rbm.th", "zad2_dbn.th", "zad3_dbn_ft.th"):
        written = (tmp_path / name).read_bytes()
        assert written == runs[1]["weights"][name]
        state = labfiles.load_state(tmp_path / name)
        original = labfiles.load_state(runs[1]["weights"][name])
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) for k in state)
        labfiles.load(tmp_path / name)


# --- the page in a browser -----------------------------------------------------------------------
def test_index_html_is_self_contained_and_renders(report_dir: Path, tmp_path: Path):
    page = (report_dir / "index.html").read_text()
    sources = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert len(sources) == len(list(report_dir.glob("*.png")))
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"](https?:|file:|//)", page)

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("SKIP REASON: no chromium on PATH (Debian: apt-get install chromium)")
        pytest.skip("no chromium on PATH: the page was checked but not rendered")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3000",
         (report_dir / "index.html").resolve().as_uri()],
        check=True, timeout=120, capture_output=True,
    )
    assert shot.is_file()
    image = mpimg.imread(shot)[..., :3]
    assert image.shape[0] >= 2000
    assert image.std() > 0.05, "the screenshot is blank"
    # broken images show as small placeholders; the figures are large areas of dark pixels
    assert (image.mean(axis=2) < 0.3).mean() > 0.02
