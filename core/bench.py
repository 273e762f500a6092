"""How fast is our CD training, against scikit-learn, a plain torch loop and the machine's sgemm?

    python -m core.bench [--repeats 5] [--data-dir ROOT] [--quick]

Everything is measured in one run, on the same data (all 60,000 MNIST training images as one
float32 tensor of grey values), with torch's default thread count, after a warm-up pass of every
contender. Within a round the contenders and the sgemm reference take turns, so a slow spell of a
shared machine hits them alike; times are medians over `--repeats` rounds, and ratios ("vs ours",
"of sgemm") are medians of the ratios taken within each round, which drift much less than the
times (the last line says how busy the rest of the machine was). `--quick` times 10,000 images
per epoch (the seconds shown are scaled to 60,000) and shorter CD-25 runs.

Useful flops. Only the matrix products the algorithm needs are counted, 2*N*V*H flops each for a
minibatch of N rows, V visible and H hidden units. CD-k (non-persistent) needs 2k + 3 of them:

    p(h|v0)                          1   [N,V] x [V,H]
    k Gibbs steps: p(v|h), p(h|v)   2k   [N,H] x [H,V], [N,V] x [V,H]
    dW = v0' ph0 - vk' phk           2   [V,N] x [N,H]

p(v|h0) is both the reconstruction the training signal reports and the first Gibbs step, so it is
counted (and computed) once. CD-1 784-100: 5 products, 78.4 MFLOP per minibatch of 100; CD-25
784-500: 53 products, 4.16 GFLOP. The reference rate is torch.mm alone on exactly those shapes and
layouts, in the same proportions; "of sgemm" is useful GFLOP/s over that rate.

scikit-learn's BernoulliRBM does PCD-1 on the grey values as they are (no binarisation): the same 5
products per minibatch, with numpy's BLAS and float64 uniforms for its samples.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from rbm_study.core.data import Binarizer, load_mnist
from rbm_study.core.errors import UserError
from rbm_study.core.rbm import RBM
from rbm_study.core.train import CDSettings, CDTrainer

N_IMAGES = 60_000
Data = TypeVar("Data")  # what a contender's epoch takes: grey images, or our Binarizer of them
V, BATCH = 784, 100


def cd_products(k: int) -> int:
    """Matrix products of one CD-k minibatch update (see the module docstring)."""
    return 2 * k + 3


def cd_flops(k: int, hidden: int, n: int = BATCH, visible: int = V) -> float:
    return cd_products(k) * 2.0 * n * visible * hidden


def settle() -> None:
    """Let the previous contender's thread pools go idle first: numpy's OpenBLAS threads keep
    spinning for a while after scikit-learn's fit, and slowed the next contender by ~30%."""
    time.sleep(0.5)


def seconds_of(epoch: Callable[[Data], object], data: Data) -> float:
    settle()
    start = time.perf_counter()
    epoch(data)
    return time.perf_counter() - start


# --- contenders -------------------------------------------------------------------------------
def ours(
    k: int, hidden: int, seed: int = 0, compiled: bool = True, momentum: float = 0.0
) -> Callable[[torch.Tensor | Binarizer], object]:
    """One epoch of core.train's CD-k over the given rows (the model keeps training across calls).

    `compiled=False` keeps the trainer on its torch path, off `core.cdstep`'s compiled step. With
    momentum m the learning rate is 0.1 (1 - m), the same step size once the velocity has built up.
    """
    g = torch.Generator().manual_seed(seed)
    settings = CDSettings(cd_k=k, learning_rate=0.1 * (1 - momentum), batch_size=BATCH, momentum=momentum)
    return CDTrainer(RBM.init(V, hidden, g), settings, g, compiled=compiled).epoch


def plain_torch(hidden: int = 100, seed: int = 0) -> Callable[[torch.Tensor], object]:
    """CD-1 the straightforward vectorised way: torch.bernoulli, fresh tensors, two matmuls for dW."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, hidden, generator=g) * 0.01
    a, b = torch.zeros(V), torch.zeros(hidden)
    lr = 0.1

    def epoch(x: torch.Tensor) -> float:
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


def sklearn_rbm(hidden: int = 100) -> Callable[[torch.Tensor], object] | None:
    try:
        from sklearn.neural_network import BernoulliRBM
    except ImportError:
        return None

    def epoch(x: torch.Tensor) -> object:
        model = BernoulliRBM(n_components=hidden, batch_size=BATCH, n_iter=1, learning_rate=0.1, random_state=0)
        return model.fit(x.numpy())  # float32 in, float32 model (sklearn keeps the dtype)

    return epoch


# --- sgemm reference --------------------------------------------------------------------------
@dataclass
class Gemm:
    label: str
    a: torch.Tensor
    b: torch.Tensor
    count: int  # how many of these one CD-k minibatch needs

    @property
    def flops(self) -> float:
        return 2.0 * self.a.shape[0] * self.a.shape[1] * self.b.shape[1]


def cd_gemms(k: int, hidden: int) -> list[Gemm]:
    """The products of a CD-k step, in the layouts core.rbm and core.train use them."""
    v = (torch.rand(BATCH, V) < 0.3).float()
    h = (torch.rand(BATCH, hidden) < 0.5).float()
    p = torch.rand(BATCH, hidden)
    W = torch.randn(V, hidden) * 0.01
    return [
        Gemm(f"[{BATCH},{V}]x[{V},{hidden}]  v W", v, W, k + 1),
        Gemm(f"[{BATCH},{hidden}]x[{hidden},{V}]  h W'", h, W.T, k),
        Gemm(f"[{V},{BATCH}]x[{BATCH},{hidden}]  v' ph", v.T, p, 2),
    ]


def gemm_seconds(g: Gemm, min_seconds: float = 0.1) -> float:
    """Seconds of one torch.mm of these shapes (into a preallocated output), over ~min_seconds."""
    out = torch.empty(g.a.shape[0], g.b.shape[1])
    settle()
    for _ in range(5):  # warm: MKL's buffers, the caches
        torch.mm(g.a, g.b, out=out)
    start, calls = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < min_seconds:
        for _ in range(10):
            torch.mm(g.a, g.b, out=out)
        calls += 10
    return elapsed / calls


def sgemm_rate(gemms: list[Gemm], seconds: dict[str, float]) -> float:
    """GFLOP/s of torch.mm on a CD step's mix of products: their flops over their summed time."""
    return sum(g.count * g.flops for g in gemms) / sum(g.count * seconds[g.label] for g in gemms) / 1e9


# --- the run ----------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OtherLoad:
    """How busy the rest of the machine was while we measured: CPU seconds of other processes (and
    of the hypervisor, "steal") per second, from /proc/stat minus our own CPU time. Linux only."""

    def __enter__(self) -> OtherLoad:
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        own = sum(os.times()[:2])
        return busy / os.sysconf("SC_CLK_TCK"), own, time.perf_counter()

    @property
    def cores(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        (b0, o0, t0), (b1, o1, t1) = self.start, self.end
        return max(0.0, (b1 - b0) - (o1 - o0)) / (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure; medians are shown")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $MNIST_ROOT)")
    parser.add_argument("--quick", action="store_true", help="10,000 images per epoch, shorter CD-25 runs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    try:
        mnist = load_mnist(args.data_dir, val_size=1)  # the last training image is "val": take both
    except UserError as err:  # MNIST not found: the message says where it looked
        print(f"core.bench: {err}")
        return 2
    x = torch.cat([mnist.train, mnist.val])
    n_epoch = 10_000 if args.quick else len(x)
    n_cd25 = 2_000 if args.quick else 10_000
    x_epoch, x_cd25, x_warm = x[:n_epoch], x[:n_cd25], x[:2_000]

    print(f"core.bench: torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()} "
          f"({os.cpu_count()} CPUs); medians of {args.repeats} round(s)")

    # Contenders take turns within each round, each after a warm-up (one epoch on 2,000 images), and
    # the sgemm reference is timed in the same rounds, so a slow spell of the machine hits all alike.
    # ours keeps a binary copy of the data between epochs (core.data.Binarizer): made once per
    # training run, so it is timed on its own and not in the per-epoch figures
    start = time.perf_counter()
    x_epoch_binarizer = Binarizer(x_epoch)
    prepare_s = time.perf_counter() - start
    # ours on its torch path too (no core.cdstep): what the compiled step gains, in the same rounds
    ours_name, torch_path_name = "ours (core.train, CD-1)", "torch path of core.train (CD-1)"
    momentum_name = "ours with momentum 0.9 (CD-1)"  # the recipe of Hinton's guide: what it costs
    cd1 = {ours_name: ours(1, 100), momentum_name: ours(1, 100, momentum=0.9),
           torch_path_name: ours(1, 100, compiled=False)}
    cd1["plain torch loop (CD-1)"] = plain_torch()
    sk = sklearn_rbm()
    if sk is not None:
        cd1["scikit-learn BernoulliRBM (PCD-1)"] = sk
    cd25 = ours(25, 500)
    gemms = {1: cd_gemms(1, 100), 25: cd_gemms(25, 500)}
    for epoch in cd1.values():
        epoch(x_warm)
    cd25(x_warm[:500])

    labels = [*cd1, "cd25", *(g.label for gs in gemms.values() for g in gs)]
    times: dict[str, list[float]] = {name: [] for name in labels}
    with OtherLoad() as load:
        for _ in range(args.repeats):
            for name, epoch in cd1.items():
                data = x_epoch_binarizer if name in (ours_name, momentum_name, torch_path_name) else x_epoch
                times[name].append(seconds_of(epoch, data) * N_IMAGES / n_epoch)  # per 60,000 images
            times["cd25"].append(seconds_of(cd25, x_cd25) / (n_cd25 / BATCH))  # per minibatch
            for g in [*gemms[1], *gemms[25]]:
                times[g.label].append(gemm_seconds(g))
    med = {name: statistics.median(t) for name, t in times.items()}
    rate = {k: sgemm_rate(gs, med) for k, gs in gemms.items()}
    rounds = range(args.repeats)

    def paired(value: Callable[[int], float]) -> float:
        """Median over rounds of a figure made within one round: on a machine whose speed drifts
        from minute to minute, a ratio of two timings taken back to back is steadier than either."""
        return statistics.median(value(r) for r in rounds)

    def rate_in(k: int, r: int) -> float:
        return sgemm_rate(gemms[k], {g.label: times[g.label][r] for g in gemms[k]})

    steps = N_IMAGES / BATCH
    vs_ours = {name: paired(lambda r, name=name: times[name][r] / times[ours_name][r]) for name in cd1}
    print()
    print(f"CD-1 784-100, batch 100, lr 0.1, one epoch over {N_IMAGES:,} MNIST images"
          + (f" (timed on {n_epoch:,}, scaled)" if n_epoch != N_IMAGES else ""))
    print(f"{'':36s} {'s/epoch':>8s} {'min-max':>13s} {'vs ours':>8s} {'GFLOP/s':>8s} {'of sgemm':>9s}")
    for name in cd1:
        s, spread = med[name], f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        useful = cd_flops(1, 100) * steps / s / 1e9
        of_sgemm = paired(lambda r, name=name: cd_flops(1, 100) * steps / times[name][r] / 1e9 / rate_in(1, r))
        print(f"{name:36s} {s:8.3f} {spread:>13s} {vs_ours[name]:7.2f}x {useful:8.1f} {of_sgemm:9.0%}")
    if sk is None:
        print("scikit-learn BernoulliRBM: not installed (pip install scikit-learn)")
    ratios = [f"{vs_ours[name]:.2f}x faster than {name.split(' (')[0]}" for name in cd1
              if name not in (ours_name, momentum_name)]
    print("ours is " + ", ".join(ratios) + " (medians of the ratios within each round)")
    print(f"ours, once per training run: {prepare_s:.2f} s to prepare the {n_epoch:,} images' binary copy")

    step25 = med["cd25"]
    useful25 = cd_flops(25, 500) / step25 / 1e9
    of_sgemm25 = paired(lambda r: cd_flops(25, 500) / times["cd25"][r] / 1e9 / rate_in(25, r))
    print()
    print(f"CD-25 784-500, batch 100 (ours, timed on {n_cd25:,} images)")
    print(f"{'':36s} {'s/batch':>8s} {'s/epoch':>13s} {'':>8s} {'GFLOP/s':>8s} {'of sgemm':>9s}")
    print(f"{'ours (core.train, CD-25)':36s} {step25:8.4f} {step25 * steps:13.1f} {'':>8s} {useful25:8.1f} "
          f"{of_sgemm25:9.0%}")

    print()
    print(f"sgemm reference, torch.mm on the CD step's shapes ({torch.get_num_threads()} threads)")
    print(f"{'':36s} {'per step':>8s} {'ms each':>13s} {'':>8s} {'GFLOP/s':>8s}")
    for k, gs in gemms.items():
        for g in gs:
            print(f"{g.label:36s} {g.count:8d} {med[g.label] * 1e3:13.4f} {'':>8s} {g.flops / med[g.label] / 1e9:8.1f}")
        print(f"{f'  CD-{k} mix ({cd_products(k)} products)':36s} {'':8s} {'':>13s} {'':>8s} {rate[k]:8.1f}")
    print()
    print("useful flops: the 2k+3 matrix products CD-k needs, 2*N*V*H each (see the module docstring);")
    print("scikit-learn does PCD-1 on the grey values (no binarisation, no reconstruction error), same 5 products")
    other = load.cores
    if other is not None:
        print(f"other processes (and the hypervisor) kept {other:.2f} of {os.cpu_count()} CPUs busy meanwhile"
              + ("; the figures above are skewed" if other > 0.2 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
