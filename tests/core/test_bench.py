"""The benchmark command runs end to end and prints every figure the README quotes."""

import re

from rbm_study.core import bench


def test_quick_bench_prints_times_ratios_and_the_sgemm_reference(mnist_dir, capsys):
    assert bench.main(["--quick", "--repeats", "1", "--data-dir", mnist_dir]) == 0
    out = capsys.readouterr().out
    rows = {}
    ours, torch_path = "ours (core.train, CD-1)", "torch path of core.train (CD-1)"
    momentum = "ours with momentum 0.9 (CD-1)"
    for name in (ours, momentum, torch_path, "plain torch loop (CD-1)", "ours (core.train, CD-25)"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        rows[name] = [float(v) for v in re.findall(r"\d+\.\d+", line[len(name):])]
    seconds, _low, _high, vs_ours, gflops = rows[ours][:5]
    assert vs_ours == 1.0 and seconds > 0 and gflops > 0
    assert rows["plain torch loop (CD-1)"][3] > 0  # its time over ours, within the round
    assert rows[torch_path][3] > 0  # the trainer without core.cdstep
    assert rows[momentum][3] > 0
    assert re.search(r"of sgemm", out) and re.search(r"CD-1 mix \(5 products\)\s+\d+\.\d", out)
    assert re.search(r"CD-25 mix \(53 products\)\s+\d+\.\d", out)
    assert "to prepare the 10,000 images' binary copy" in out


def test_bench_without_mnist_says_where_it_looked(tmp_path, capsys, monkeypatch):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise OSError("no network")  # the same answer on a machine that could download

    monkeypatch.setattr(datasets, "MNIST", offline)
    assert bench.main(["--quick", "--data-dir", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().out
