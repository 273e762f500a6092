"""The package as users install it: one import name, the configs inside, nothing else taken."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_the_wheel_holds_one_package_and_the_configs(tmp_path: Path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = tmp_path.glob("rbm_study-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"rbm_study"}, top  # no top-level core, study or analysis
    for expected in ("rbm_study/__init__.py", "rbm_study/cli.py", "rbm_study/core/models.py",
                     "rbm_study/core/evaluate.py", "rbm_study/study/storage.py", "rbm_study/study/migrations.py",
                     "rbm_study/analysis/report.py", "rbm_study/configs/quick.yaml", "rbm_study/configs/lab.yaml",
                     "rbm_study/configs/k_comparison.yaml", "rbm_study/core/cpu_cd.cpp"):
        assert expected in names, expected
    assert not [n for n in names if "/tests/" in n or n.startswith("tests/")]  # the benchmark stays out too


def test_the_cli_runs_outside_the_checkout_and_core_is_not_a_top_level_name(tmp_path: Path):
    version = subprocess.run([str(BIN / "rbm-study"), "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("rbm-study "), version.stderr
    for name in ("core", "study", "analysis"):
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, name
    bundled = subprocess.run([sys.executable, "-c", "from rbm_study.core.config import config_path; "
                              "print(config_path('quick'))"], cwd=tmp_path, capture_output=True, text=True)
    assert bundled.returncode == 0 and bundled.stdout.strip().endswith("quick.yaml"), bundled.stderr
