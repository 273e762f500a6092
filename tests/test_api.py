"""The README's Python API example runs as written, from the installed package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import rbm_study
from rbm_study.core import labfiles

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_public_name_resolves():
    for name in rbm_study.__all__:
        assert getattr(rbm_study, name) is not None, name
    with pytest.raises(AttributeError):
        rbm_study.not_a_public_name  # noqa: B018


@pytest.mark.slow
def test_the_readme_example_runs(mnist_dir: str, tmp_path: Path):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"MNIST_ROOT": mnist_dir, "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    line = run.stdout.strip()
    match = re.fullmatch(r"log Z ([\d.]+) \[([\d.]+), ([\d.]+)\]; test log-likelihood (-[\d.]+) nats", line)
    assert match, line
    log_z, low, high, ll = map(float, match.groups())
    assert low <= log_z <= high and -200 < ll < -80  # five epochs of CD-1 on 784-100
    assert isinstance(labfiles.load(tmp_path / "zad1_rbm.th"), rbm_study.RBM)
