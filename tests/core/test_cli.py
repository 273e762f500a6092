"""`rbm-study run` and `rbm-study evaluate` as a user runs them (real processes, real MNIST)."""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import TINY


def rbm_study(*args: str, env_root: str | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_root:
        env["MNIST_ROOT"] = env_root
    return subprocess.run([sys.executable, "-m", "rbm_study", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def run_dir(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cheap_raise = ["eval.raise_images=10", "eval.raise_chains=2", "eval.raise_betas=100"]
    sets = [a for s in [*TINY, *cheap_raise] for a in ("--set", s)]
    done = rbm_study("run", "configs/lab.yaml", "--out", str(out), "--data-dir", mnist_dir, *sets)
    assert done.returncode == 0, done.stderr
    return out


def test_run_writes_the_lab_files_and_metrics(run_dir):
    assert {p.name for p in run_dir.iterdir()} == {"zad1_rbm.th", "zad2_dbn.th", "zad3_dbn_ft.th", "metrics.json"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("rbm", "dbn", "finetune"):
        assert {"val", "test", "log_z", "seconds_per_epoch"} <= metrics[stage].keys()
        assert {"log_likelihood", "recon_error"} <= metrics[stage]["test"].keys()
    assert "pseudo_log_likelihood" in metrics["rbm"]["val"] and "free_energy_gap" in metrics["rbm"]


def test_metrics_json_is_strict_json_with_null_for_an_undefined_interval_end(tmp_path):
    from rbm_study.core.commands import write_metrics

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    path = tmp_path / "metrics.json"
    write_metrics(path, {"rbm.log_z": 249.75, "rbm.log_z_low": -math.inf, "rbm.log_z_high": 250.53},
                  seconds_total=7.5, config={"seed": 0})
    metrics = json.loads(path.read_text(), parse_constant=refuse)
    assert metrics["rbm"] == {"log_z": 249.75, "log_z_low": None, "log_z_high": 250.53}
    assert metrics["seconds_total"] == 7.5 and metrics["config"] == {"seed": 0}


@pytest.mark.parametrize(("name", "method"), [("zad1_rbm.th", "exact"), ("zad2_dbn.th", "ais"),
                                                ("zad3_dbn_ft.th", "auto")])
def test_evaluate_prints_the_estimate_last(run_dir, mnist_dir, name, method):
    done = rbm_study("evaluate", str(run_dir / name), "--method", method, "--chains", "16", "--betas", "200",
                     env_root=mnist_dir)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    estimate = float(line.split()[-1])
    assert -400 < estimate < 0, line
    assert "log Z" in line and ("exact" in line if method == "exact" else True)


@pytest.mark.parametrize(("name", "label"), [("zad1_rbm.th", "test LL"), ("zad3_dbn_ft.th", "test LL lower bound")])
def test_evaluate_all_scores_the_same_images_with_every_method(run_dir, mnist_dir, name, label):
    done = rbm_study("evaluate", str(run_dir / name), "--method", "all", "--images", "20", "--chains", "3",
                     "--betas", "100", env_root=mnist_dir)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    # 16 hidden units (RBM) and a 16-12 top RBM: small enough to enumerate, so exact comes first
    assert [line.split()[0] for line in lines] == ["exact", "ais", "raise"], lines
    estimates = [float(line.split()[-1]) for line in lines]
    assert all(-400 < value < 0 for value in estimates), lines
    assert all("(20 images)" in line for line in lines[:2]) and "20 images" in lines[2], lines
    assert all(label in line for line in lines) and "from exact on these images" in lines[2], lines
    if name == "zad1_rbm.th":  # the same log p(v) per image: only log Z differs between exact and AIS
        assert abs(estimates[0] - estimates[1]) < 5, lines


def test_evaluate_raise_alone(run_dir, mnist_dir):
    done = rbm_study("evaluate", str(run_dir / "zad2_dbn.th"), "--method", "raise", "--images", "5",
                     "--chains", "2", "--betas", "50", env_root=mnist_dir)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("raise (2 chains x 50 betas, 5 images)") and -400 < float(line.split()[-1]) < 0, line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "configs/lab.yaml", "--out", "{tmp}", "--set", "rbm.cd_k=0"], "rbm.cd_k"),
        (["run", "configs/lab.yaml", "--out", "{tmp}", "--set", "rbm.bogus=1"], "rbm.bogus"),
        (["run", "configs/nope.yaml", "--out", "{tmp}"], "does not exist"),
        (["run", "configs/lab.yaml", "--out", "{tmp}", "--data-dir", "{tmp}/no-mnist", "--set", "rbm.epochs=0"],
         "MNIST not found"),
        (["evaluate", "{tmp}/missing.th"], "does not exist"),
        (["evaluate", "{tmp}"], "is a folder, not a lab weight file"),
        (["evaluate", "{tmp}/missing.th", "--images", "0"], "--images"),
        (["evaluate", "{tmp}/missing.th", "--betas", "2"], "--betas"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    done = rbm_study(*[a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_output_folder_that_is_a_file_is_refused_and_left_alone(tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    done = rbm_study("run", "configs/lab.yaml", "--out", str(taken))
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and taken.read_text() == "mine"


def test_divergence_is_a_one_line_message(tmp_path, mnist_dir):
    sets = [a for s in [*TINY, "rbm.learning_rate=3e38"] for a in ("--set", s)]
    done = rbm_study("run", "configs/lab.yaml", "--out", str(tmp_path), "--data-dir", mnist_dir, *sets)
    assert done.returncode == 2 and "diverged" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()[-1:]) == 1 and "Traceback" not in done.stderr
