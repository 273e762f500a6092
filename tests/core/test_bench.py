"""The benchmark (`python -m tests.bench`) runs end to end and prints every figure the README quotes."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench.py"


@pytest.fixture(scope="module")
def bench():
    """tests/bench.py, loaded from its file: it is not part of the installed package."""
    spec = importlib.util.spec_from_file_location("rbm_study_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_benchmark_is_not_part_of_the_package():
    import rbm_study

    assert importlib.util.find_spec("rbm_study.core.bench") is None
    assert not any(Path(p).resolve() == BENCH.parent for p in rbm_study.__path__)


def test_bench_reports_three_conditions_with_times_ratios_and_the_sgemm_reference(bench, mnist_dir, capsys):
    assert bench.main(["--quick", "--repeats", "1", "--images", "300", "--settle", "0", "--data-dir", mnist_dir]) == 0
    out = capsys.readouterr().out
    sections = re.split(r"\n\n(?=one thread|two threads|targets)", out)
    titles = [s.splitlines()[0] for s in sections[1:]]
    assert [t.split(" (")[0] for t in titles] == ["one thread", "two threads", "two threads, one core busy", "targets"]
    for section in sections[1:4]:
        rows = {}
        for name in (bench.OURS, bench.TORCH_ONLY, bench.PLAIN, bench.GREEDY):
            line = next(line for line in section.splitlines() if line.startswith(name))
            rows[name] = [float(v) for v in re.findall(r"\d+\.\d+|\d+(?=%)", line[len(name):])]
        seconds, _low, _high, vs_ours, gflops, of_sgemm = rows[bench.OURS][:6]
        assert vs_ours == 1.0 and seconds > 0 and gflops > 0 and of_sgemm > 0
        assert rows[bench.PLAIN][3] > 0 and rows[bench.TORCH_ONLY][3] > 0  # their time over ours, per round
        assert rows[bench.GREEDY][0] > 0
        assert re.search(r"sgemm reference, torch\.mm on CD-1's products: \d+\.\d GFLOP/s", section)
    busy = sections[3]
    assert "busy/quiet" in busy and re.search(r"busy loop pinned to CPU \d", busy)
    assert re.search(r"greedy layer 100-100, CD-2 .* \d+\.\d\dx$", busy, re.MULTILINE)  # its busy/quiet ratio
    targets = sections[4]
    assert len(re.findall(r"of sgemm on (one|two) threads? \(target 75%\): (met|missed)", targets)) == 2
    assert len(re.findall(r"the quiet two-thread epoch \(target <= 2x\): (met|missed)", targets)) == 2
    assert re.search(r"compiled code \(core\.cpu_cd, core\.kernels\) over torch alone: \d+\.\d\dx on one", targets)


def test_the_busy_loop_keeps_its_core_and_stops(bench):
    with bench.BusyCore(0) as busy:
        process = busy.process
        assert process.poll() is None
    assert process.poll() is not None  # killed and reaped


def test_bench_without_mnist_says_where_it_looked(bench, tmp_path, capsys, monkeypatch):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise OSError("no network")  # the same answer on a machine that could download

    monkeypatch.setattr(datasets, "MNIST", offline)
    assert bench.main(["--quick", "--data-dir", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().out
