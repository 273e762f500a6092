"""How fast is our CD training, against a plain torch loop, scikit-learn and the machine's sgemm,
on one thread, on two, and on two while another process keeps one of the cores busy?

    python -m tests.bench [--repeats 5] [--data-dir ROOT] [--quick] [--images N]

Run from the repository root: the benchmark lives with the tests, off the library's import path
(`rbm_study` does not ship it). It needs MNIST ($MNIST_ROOT or --data-dir) and, for one
contender, scikit-learn (a dev dependency).

Conditions. The process runs on two CPUs (its affinity is cut to the first two it may use), and
each round measures everything under three conditions in turn:

    one thread       torch.set_num_threads(1): what a trial with `cpus_per_trial: 1` gets
    two threads      torch.set_num_threads(2): `cpus_per_trial: 2`, the machine otherwise idle
    two, one busy    two threads while a pure-Python busy loop, started and stopped here for each
                     round, is pinned to the second CPU: another trial, or anything else, taking
                     one of the two cores

Contenders. Each condition has its own instance of every contender, warmed up by one epoch in
that condition, so each one's state (our trainer's choice of thread count above all) is the
state it settles into there:

    ours                 core.train's CD-1 784-100, batch 100, lr 0.1, on a core.data.Binarizer
    ours, torch only     the same with FastBernoulli.compiled off: torch's operations (dense
                         products, samples from torch's generator) instead of the compiled step of
                         core.cpu_cd and the compiled sampler of core.kernels; the ratio is what
                         the compiled code gains (it is kept where it gains at least 1.15x)
    plain torch loop     CD-1 written the straightforward way: torch.bernoulli, fresh tensors
    scikit-learn         BernoulliRBM (PCD-1 on the grey values; numpy's BLAS, its threads limited
                         to the condition's count with threadpoolctl)
    greedy layer         the second RBM of the lab's DBN: 100-100, CD-2, on samples of a trained
                         784-100 first layer's hidden units, as core.greedy.train_dbn_layer trains it

Within a round the contenders and the sgemm reference take turns, so a slow spell of a shared
machine hits them alike; times are medians over the rounds, and ratios ("vs ours", "of sgemm",
"busy/quiet") are medians of ratios taken within each round, which drift much less than the
times. The last lines say how busy the rest of the machine was. `--quick` times 10,000 images
per epoch and 3 rounds (seconds are always scaled to an epoch of 60,000 images).

Useful flops. Only the matrix products the algorithm needs are counted, 2*N*V*H flops each for a
minibatch of N rows, V visible and H hidden units. CD-1 needs five:

    p(h|v0)                          [N,V] x [V,H]
    p(v|h0), then p(h|v1)            [N,H] x [H,V], [N,V] x [V,H]
    dW = v0' ph0 - v1' ph1           [V,N] x [N,H], twice

p(v|h0) is both the reconstruction the training signal reports and the first Gibbs step, so it is
counted (and computed) once: 78.4 MFLOP per minibatch of 100 at 784-100. The sgemm reference is
torch.mm alone, on exactly those shapes and layouts, in the same proportions, on the condition's
threads; "of sgemm" is a contender's useful GFLOP/s over it. Ours takes every product with binary
states as sums of the rows their ones pick (about 13% of MNIST's pixels, about half of the hidden
samples), so it does fewer flops than it is credited with and can pass 100%: the figure says how
an epoch compares with the matrix products alone, not how well the machine's units are used.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from rbm_study.core.data import Binarizer, load_mnist
from rbm_study.core.errors import UserError
from rbm_study.core.models import RBM, visible_bias_from_means
from rbm_study.core.sampling import FastBernoulli
from rbm_study.core.train import CDSettings, CDTrainer

N_IMAGES = 60_000  # every figure is per epoch of this many images
V, H, BATCH = 784, 100, 100
CD1_PRODUCTS = 5
KEEP_COMPILED = 1.15  # the least gain, in one run, that keeps compiled code (issue 14)
TARGET_OF_SGEMM = 0.75
TARGET_BUSY = 2.0

Epoch = Callable[[], object]  # one epoch of a contender over the benchmark's images


def cd1_flops(n: int = BATCH) -> float:
    return CD1_PRODUCTS * 2.0 * n * V * H


# --- contenders -------------------------------------------------------------------------------
@dataclass
class Ours:
    """One epoch of core.train's CD-1 784-100 per call (the model keeps training across calls)."""

    data: Binarizer
    compiled: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.trainer = CDTrainer(RBM.init(V, H, g), CDSettings(cd_k=1, learning_rate=0.1, batch_size=BATCH), g)

    def __call__(self) -> object:
        FastBernoulli.compiled = self.compiled  # read by each CD step and when a sampler is made
        try:
            return self.trainer.epoch(self.data)
        finally:
            FastBernoulli.compiled = True

    def steps_on_one_thread(self) -> int:
        return self.trainer.threads.steps_on.get(1, 0)


def greedy_layer(data: Binarizer, below: RBM, seed: int = 0) -> Epoch:
    """One epoch of the DBN's second RBM, 100-100 CD-2, on samples of `below`'s hidden units.

    The same visible states, sampler and trainer as core.greedy.train_dbn_layer's.
    """
    g = torch.Generator().manual_seed(seed)
    sample = FastBernoulli(g)

    def encode(v: torch.Tensor) -> torch.Tensor:
        return sample(below.p_h(v))

    bias = visible_bias_from_means(below.p_h(data.grey[:10_000]).mean(dim=0))
    top = RBM.init(below.n_hidden, H, g, visible_bias=bias)
    trainer = CDTrainer(top, CDSettings(cd_k=2, learning_rate=0.1, batch_size=BATCH), g)
    return lambda: trainer.epoch(data, encode)


def plain_torch(x: torch.Tensor, seed: int = 0) -> Epoch:
    """CD-1 the straightforward vectorised way: torch.bernoulli, fresh tensors, two matmuls for dW."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) * 0.01
    a, b = torch.zeros(V), torch.zeros(H)
    lr = 0.1

    def epoch() -> float:
        error = torch.zeros(())
        for rows in torch.randperm(len(x), generator=g).split(BATCH):
            v0 = torch.bernoulli(x[rows], generator=g)
            ph0 = torch.sigmoid(v0 @ W + b)
            h0 = torch.bernoulli(ph0, generator=g)
            pv1 = torch.sigmoid(h0 @ W.T + a)
            error += ((v0 - pv1) ** 2).sum() / len(rows)  # the same training signal as ours
            v1 = torch.bernoulli(pv1, generator=g)
            ph1 = torch.sigmoid(v1 @ W + b)
            W.add_((v0.T @ ph0 - v1.T @ ph1) * (lr / len(rows)))
            a.add_((v0 - v1).mean(0) * lr)
            b.add_((ph0 - ph1).mean(0) * lr)
        return float(error)

    return epoch


def sklearn_rbm(x: torch.Tensor, threads: int) -> Epoch | None:
    try:
        from sklearn.neural_network import BernoulliRBM
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    grey = x.numpy()

    def epoch() -> object:
        model = BernoulliRBM(n_components=H, batch_size=BATCH, n_iter=1, learning_rate=0.1, random_state=0)
        with threadpool_limits(limits=threads, user_api="blas"):
            return model.fit(grey)  # float32 in, float32 model (scikit-learn keeps the dtype)

    return epoch


# --- the sgemm reference ----------------------------------------------------------------------
@dataclass
class Gemm:
    label: str
    short: str
    a: torch.Tensor
    b: torch.Tensor
    count: int  # how many of these one CD-1 minibatch needs

    @property
    def flops(self) -> float:
        return 2.0 * self.a.shape[0] * self.a.shape[1] * self.b.shape[1]


def cd1_gemms() -> list[Gemm]:
    """The products of a CD-1 step, in the layouts core.train uses them."""
    g = torch.Generator().manual_seed(0)
    v = (torch.rand(BATCH, V, generator=g) < 0.3).float()
    h = (torch.rand(BATCH, H, generator=g) < 0.5).float()
    p = torch.rand(BATCH, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.01
    return [
        Gemm(f"[{BATCH},{V}]x[{V},{H}]", "v W", v, W, 2),
        Gemm(f"[{BATCH},{H}]x[{H},{V}]", "h W'", h, W.T, 1),
        Gemm(f"[{V},{BATCH}]x[{BATCH},{H}]", "v' ph", v.T, p, 2),
    ]


def gemm_seconds(g: Gemm, min_seconds: float) -> float:
    """Seconds of one torch.mm of these shapes (into a preallocated output), over ~min_seconds."""
    out = torch.empty(g.a.shape[0], g.b.shape[1])
    for _ in range(5):  # warm: MKL's buffers, the caches
        torch.mm(g.a, g.b, out=out)
    start, calls = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < min_seconds:
        for _ in range(10):
            torch.mm(g.a, g.b, out=out)
        calls += 10
    return elapsed / calls


def sgemm_rate(gemms: list[Gemm], seconds: dict[str, float]) -> float:
    """GFLOP/s of torch.mm on a CD-1 step's mix of products: their flops over their summed time."""
    return sum(g.count * g.flops for g in gemms) / sum(g.count * seconds[g.label] for g in gemms) / 1e9


# --- the machine ------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity, and the busy loop goes unpinned
        return list(range(os.cpu_count() or 1))


def use_cpus(cpus: list[int]) -> None:
    """Run this process on `cpus` only (Linux; elsewhere a no-op)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


_BUSY_LOOP = "import os, sys\ncpu = int(sys.argv[1])\nif cpu >= 0 and hasattr(os, 'sched_setaffinity'):\n" \
    "    os.sched_setaffinity(0, {cpu})\nwhile True:\n    pass\n"  # fmt: skip


class BusyCore:
    """Another process keeping one core busy: a pure-Python loop pinned to `cpu`, for the `with` block."""

    def __init__(self, cpu: int):
        self.cpu = cpu

    def __enter__(self) -> BusyCore:
        self.process = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(self.cpu)])
        time.sleep(0.2)  # let it start and settle on its core
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.kill()
        self.process.wait()

    def cpu_seconds(self) -> float:
        return _process_cpu_seconds(self.process.pid)


def _process_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class OtherLoad:
    """CPU seconds per second that other processes (and the hypervisor: "steal") used meanwhile:
    all busy time in /proc/stat, less our own and our busy loop's. Linux only (else None)."""

    busy: float = 0.0
    seconds: float = 0.0
    _start: tuple[float, float, float] | None = field(default=None, repr=False)

    @staticmethod
    def _machine_busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait

    def start(self) -> None:
        machine = self._machine_busy()
        self._start = None if machine is None else (machine, sum(os.times()[:2]), time.perf_counter())

    def stop(self, excluded_cpu_seconds: float = 0.0) -> None:
        machine = self._machine_busy()
        if self._start is None or machine is None:
            return
        m0, own0, t0 = self._start
        own = sum(os.times()[:2]) - own0
        self.busy += max(0.0, machine - m0 - own - excluded_cpu_seconds)
        self.seconds += time.perf_counter() - t0

    @property
    def cores(self) -> float | None:
        return self.busy / self.seconds if self.seconds else None


# --- the run ----------------------------------------------------------------------------------
@dataclass
class Condition:
    name: str
    threads: int
    busy_cpu: int | None  # the CPU a busy loop keeps busy, or None
    contenders: dict[str, Epoch] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)  # per epoch of N_IMAGES, per round
    one_thread_steps: dict[str, int] = field(default_factory=dict)  # ours: timed steps our trainer ran on one
    load: OtherLoad = field(default_factory=OtherLoad)


OURS = "ours (core.train)"
TORCH_ONLY = "ours, torch only"
PLAIN = "plain torch loop"
SKLEARN = "scikit-learn BernoulliRBM"
GREEDY = "greedy layer 100-100, CD-2"
SGEMM = "sgemm"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="rounds; medians are shown (default 5, quick 3)")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $MNIST_ROOT)")
    parser.add_argument("--quick", action="store_true", help="10,000 images per epoch and 3 rounds")
    parser.add_argument("--images", type=int, default=None, help="images per timed epoch (default 60,000)")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="seconds of rest before each timing, for other libraries' spinning threads")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        mnist = load_mnist(args.data_dir, val_size=1)  # the last training image is "val": take both
    except UserError as err:  # MNIST not found: the message says where it looked
        print(f"tests.bench: {err}")
        return 2
    x_all = torch.cat([mnist.train, mnist.val])
    n_epoch = min(args.images or (10_000 if args.quick else N_IMAGES), len(x_all))
    if n_epoch < BATCH:
        parser.error(f"--images must be at least {BATCH}")
    x = x_all[:n_epoch].contiguous()

    allowed = allowed_cpus()
    cpus = allowed[:2]
    threads_before = torch.get_num_threads()
    use_cpus(cpus)
    try:
        return _run(args, repeats, x, n_epoch, cpus)
    finally:
        use_cpus(allowed)
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, repeats: int, x: torch.Tensor, n_epoch: int, cpus: list[int]) -> int:
    scale = N_IMAGES / n_epoch
    min_gemm_seconds = 0.05 if args.quick else 0.1
    print(f"tests.bench: torch {torch.__version__}, {cpu_name()}, on CPUs {cpus} of {os.cpu_count()}; "
          f"medians of {repeats} round(s); epochs of {N_IMAGES:,} images"
          + (f" (timed on {n_epoch:,}, scaled)" if n_epoch != N_IMAGES else ""))
    if len(cpus) < 2:
        print("tests.bench: fewer than two CPUs: the two-thread conditions share one")

    # the first layer of the greedy-layer contender: trained for one epoch, so its hidden units
    # carry the structure the second layer learns from
    data = Binarizer(x)
    g = torch.Generator().manual_seed(1)
    below = RBM.init(V, H, g)
    CDTrainer(below, CDSettings(cd_k=1, learning_rate=0.1, batch_size=BATCH), g).epoch(data)

    conditions = [
        Condition("one thread", 1, None),
        Condition("two threads", 2, None),
        Condition("two threads, one core busy", 2, cpus[-1]),
    ]
    gemms = cd1_gemms()
    for c in conditions:
        c.contenders = {
            OURS: Ours(data),
            TORCH_ONLY: Ours(data, compiled=False),
            PLAIN: plain_torch(x),
            GREEDY: greedy_layer(data, below),
        }
        sk = sklearn_rbm(x, c.threads)
        if sk is not None:
            c.contenders[SKLEARN] = sk
        c.times = {name: [] for name in [*c.contenders, *(gm.label for gm in gemms)]}

    def timed(epoch: Epoch) -> float:
        time.sleep(args.settle)
        start = time.perf_counter()
        epoch()
        return time.perf_counter() - start

    for r in range(-1, repeats):  # round -1 warms every contender up in its condition, untimed
        for c in conditions:
            torch.set_num_threads(c.threads)
            with BusyCore(c.busy_cpu) if c.busy_cpu is not None else nullcontext() as busy:
                if r >= 0:
                    c.load.start()
                for name, epoch in c.contenders.items():
                    one_before = epoch.steps_on_one_thread() if isinstance(epoch, Ours) else 0
                    seconds = timed(epoch) * scale
                    if r >= 0:
                        c.times[name].append(seconds)
                        if isinstance(epoch, Ours):
                            c.one_thread_steps[name] = c.one_thread_steps.get(name, 0) + (
                                epoch.steps_on_one_thread() - one_before)
                for gm in gemms:
                    time.sleep(args.settle)
                    seconds = gemm_seconds(gm, min_gemm_seconds)
                    if r >= 0:
                        c.times[gm.label].append(seconds)
                if r >= 0:
                    c.load.stop(busy.cpu_seconds() if busy is not None else 0.0)

    report(conditions, gemms, repeats, -(-n_epoch // BATCH))
    return 0


def report(conditions: list[Condition], gemms: list[Gemm], repeats: int, steps_per_epoch: int) -> None:
    rounds = range(repeats)
    steps = N_IMAGES / BATCH

    def paired(value: Callable[[int], float]) -> float:
        """Median over rounds of a figure made within one round: on a machine whose speed drifts
        from minute to minute, a ratio of two timings taken back to back is steadier than either."""
        return statistics.median(value(r) for r in rounds)

    def rate(c: Condition, r: int) -> float:
        return sgemm_rate(gemms, {gm.label: c.times[gm.label][r] for gm in gemms})

    quiet = conditions[1]

    def of_sgemm(c: Condition, name: str) -> float:
        """Against the condition's own sgemm rate; under the busy core, whose two-thread sgemm
        stalls, against the quiet two-thread rate of the same round."""
        reference = quiet if c.busy_cpu is not None else c
        return paired(lambda r: cd1_flops() * steps / c.times[name][r] / 1e9 / rate(reference, r))

    summary: dict[str, dict[str, float]] = {}
    for c in conditions:
        busy = c.busy_cpu is not None
        print()
        print(f"{c.name} (torch.set_num_threads({c.threads}))"
              + (f"; a busy loop pinned to CPU {c.busy_cpu}" if busy else ""))
        header = f"{'':34s} {'s/epoch':>8s} {'min-max':>11s} {'vs ours':>8s} {'GFLOP/s':>8s} {'of sgemm':>9s}"
        print(header + (f" {'busy/quiet':>11s}" if busy else ""))
        row: dict[str, float] = {}
        for name in c.contenders:
            t = c.times[name]
            cd1 = name != GREEDY
            vs_ours = paired(lambda r, t=t, c=c: t[r] / c.times[OURS][r]) if cd1 else None
            line = f"{name:34s} {statistics.median(t):8.3f} {f'{min(t):.2f}-{max(t):.2f}':>11s} "
            line += f"{vs_ours:7.2f}x " if vs_ours is not None else f"{'':8s} "
            if cd1:
                line += f"{cd1_flops() * steps / statistics.median(t) / 1e9:8.1f} {of_sgemm(c, name):9.0%}"
            else:
                line += f"{'':8s} {'':9s}"
            if busy:
                ratio = paired(lambda r, name=name, c=c: c.times[name][r] / quiet.times[name][r])
                line += f" {ratio:10.2f}x"
                row[f"busy {name}"] = ratio
            print(line)
            if vs_ours is not None:
                row[f"vs {name}"] = vs_ours
        row["of sgemm"] = of_sgemm(c, OURS)
        reference = paired(lambda r, c=c: rate(c, r))
        each = ", ".join(f"{gm.short} {gm.label} {gm.flops / statistics.median(c.times[gm.label]) / 1e9:.1f}"
                         for gm in gemms)
        print(f"sgemm reference, torch.mm on CD-1's products: {reference:.1f} GFLOP/s ({each})"
              + ("; 'of sgemm' above is against the quiet two-thread rate" if c.busy_cpu is not None else ""))
        if c.threads > 1:
            shares = ", ".join(f"{name} {c.one_thread_steps.get(name, 0) / (repeats * steps_per_epoch):.0%}"
                               for name in (OURS, TORCH_ONLY))
            print(f"steps our trainer ran on one thread (it picks the faster count as it goes): {shares}")
        other = c.load.cores
        if other is not None:
            print(f"other processes (and the hypervisor) kept {other:.2f} CPUs busy meanwhile"
                  + ("; the figures above are skewed" if other > 0.2 else ""))
        summary[c.name] = row

    print()
    print("targets (issue 14), this run:")
    one, two, busy_c = (summary[c.name] for c in conditions)
    for label, value in (("one thread", one["of sgemm"]), ("two threads", two["of sgemm"])):
        verdict = "met" if value >= TARGET_OF_SGEMM else "missed"
        print(f"  ours at {value:.0%} of sgemm on {label} (target {TARGET_OF_SGEMM:.0%}): {verdict}")
    for name in (OURS, GREEDY):
        ratio = busy_c[f"busy {name}"]
        verdict = "met" if ratio <= TARGET_BUSY else "missed"
        print(f"  {name}: one core busy {ratio:.2f}x the quiet two-thread epoch (target <= {TARGET_BUSY:.0f}x): "
              f"{verdict}")
    gains = [summary[c.name][f"vs {TORCH_ONLY}"] for c in conditions[:2]]
    keep = "kept" if min(gains) >= KEEP_COMPILED else "not worth keeping"
    print(f"  compiled code (core.cpu_cd, core.kernels) over torch alone: {gains[0]:.2f}x on one thread, "
          f"{gains[1]:.2f}x on two (keep at >= {KEEP_COMPILED}x): {keep}")
    print()
    print("useful flops: the 5 matrix products CD-1 needs, 2*N*V*H each (see the module docstring); scikit-learn")
    print("does PCD-1 on the grey values (no binarisation, no reconstruction error), the same 5 products")


if __name__ == "__main__":
    raise SystemExit(main())
