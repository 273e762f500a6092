"""How fast is our CD training, against scikit-learn, a plain torch loop and the machine's sgemm?

    python -m core.bench [--repeats 3] [--data-dir ROOT] [--quick]

Everything is measured in one run, on the same data (all 60,000 MNIST training images as one
float32 tensor of grey values), with torch's default thread count, after a warm-up pass of every
contender; each figure is the median over `--repeats`, and the contenders take turns within each
repeat so a burst of background load hits them alike. `--quick` times 10,000 images per epoch
(the seconds shown are scaled to 60,000) and shorter CD-25 runs.

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

import torch

from core.data import load_mnist
from core.rbm import RBM
from core.train import CDSettings, CDTrainer

N_IMAGES = 60_000
V, BATCH = 784, 100


def cd_products(k: int) -> int:
    """Matrix products of one CD-k minibatch update (see the module docstring)."""
    return 2 * k + 3


def cd_flops(k: int, hidden: int, n: int = BATCH, visible: int = V) -> float:
    return cd_products(k) * 2.0 * n * visible * hidden


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- contenders -------------------------------------------------------------------------------
def ours(data: torch.Tensor, k: int, hidden: int, seed: int = 0) -> Callable[[torch.Tensor], object]:
    """One epoch of core.train's CD-k over the given rows (the model keeps training across calls)."""
    g = torch.Generator().manual_seed(seed)
    trainer = CDTrainer(RBM.init(V, hidden, g), CDSettings(cd_k=k, learning_rate=0.1, batch_size=BATCH), g)
    return trainer.epoch


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


def gemm_seconds(g: Gemm, repeats: int, min_seconds: float = 0.2) -> float:
    """Median seconds of one torch.mm of these shapes (into a preallocated output)."""
    out = torch.empty(g.a.shape[0], g.b.shape[1])
    for _ in range(20):  # warm-up: MKL's buffers, the caches
        torch.mm(g.a, g.b, out=out)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds / 4:
        torch.mm(g.a, g.b, out=out)
        calls += 1
    calls = max(calls * 4, 10)

    def run() -> None:
        for _ in range(calls):
            torch.mm(g.a, g.b, out=out)

    return median_time(run, repeats) / calls


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


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; medians are shown")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $MNIST_ROOT)")
    parser.add_argument("--quick", action="store_true", help="10,000 images per epoch, shorter CD-25 runs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    mnist = load_mnist(args.data_dir, val_size=1)  # the last training image is "val": take both
    x = torch.cat([mnist.train, mnist.val])
    n_epoch = 10_000 if args.quick else len(x)
    n_cd25 = 2_000 if args.quick else 10_000
    x_epoch, x_cd25, x_warm = x[:n_epoch], x[:n_cd25], x[:2_000]
    scale = N_IMAGES / n_epoch  # seconds per n_epoch images -> per 60,000

    print(f"core.bench: torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()} "
          f"({os.cpu_count()} CPUs); load average {load_average()} at start")
    print(f"CD-1 784-100, batch 100, lr 0.1: one epoch over {n_epoch:,} of {len(x):,} MNIST images"
          f"{f' (times scaled to {N_IMAGES:,})' if scale != 1 else ''}; median of {args.repeats}")

    # CD-1: the three contenders in turns, after one warm-up epoch each on 2,000 images
    contenders = {"ours (core.train, CD-1)": ours(x, 1, 100), "plain torch loop (CD-1)": plain_torch()}
    sk = sklearn_rbm()
    if sk is not None:
        contenders["scikit-learn BernoulliRBM (PCD-1)"] = sk
    for epoch in contenders.values():
        epoch(x_warm)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, epoch in contenders.items():
            start = time.perf_counter()
            epoch(x_epoch)
            times[name].append((time.perf_counter() - start) * scale)
    seconds = {name: statistics.median(t) for name, t in times.items()}

    # CD-25 784-500 on fewer images: seconds per minibatch are what matter there
    cd25 = ours(x, 25, 500)
    cd25(x_warm[:500])
    cd25_step = median_time(lambda: cd25(x_cd25), args.repeats) / (n_cd25 / BATCH)

    # sgemm on the same shapes
    gemm_sets = {(1, 100): cd_gemms(1, 100), (25, 500): cd_gemms(25, 500)}
    gemm_s = {key: {g.label: gemm_seconds(g, args.repeats) for g in gs} for key, gs in gemm_sets.items()}
    rate = {key: sgemm_rate(gemm_sets[key], gemm_s[key]) for key in gemm_sets}

    # the table
    ours_s = seconds["ours (core.train, CD-1)"]
    steps = N_IMAGES / BATCH
    print()
    print(f"{'CD-1 784-100':36s} {'s/epoch':>8s} {'ours is':>9s} {'GFLOP/s':>8s} {'of sgemm':>9s}")
    for name, s in seconds.items():
        useful = cd_flops(1, 100) * steps / s / 1e9
        ratio = "-" if s is ours_s else f"{s / ours_s:.2f}x"
        print(f"{name:36s} {s:8.3f} {ratio:>9s} {useful:8.1f} {useful / rate[1, 100]:9.0%}")
    if sk is None:
        print("scikit-learn BernoulliRBM: not installed (pip install scikit-learn)")
    useful25 = cd_flops(25, 500) / cd25_step / 1e9
    print()
    print(f"{'CD-25 784-500 (ours)':36s} {'s/batch':>8s} {'s/epoch':>9s} {'GFLOP/s':>8s} {'of sgemm':>9s}")
    print(f"{f'over {n_cd25:,} images':36s} {cd25_step:8.4f} {cd25_step * steps:9.1f} {useful25:8.1f} "
          f"{useful25 / rate[25, 500]:9.0%}")
    print()
    print(f"{'sgemm, torch.mm':36s} {'per step':>8s} {'ms each':>9s} {'GFLOP/s':>8s}")
    for (k, hidden), gs in gemm_sets.items():
        for g in gs:
            s = gemm_s[k, hidden][g.label]
            print(f"{g.label:36s} {g.count:8d} {s * 1e3:9.4f} {g.flops / s / 1e9:8.1f}")
        print(f"{f'  CD-{k} 784-{hidden} mix ({cd_products(k)} products)':36s} {'':8s} {'':9s} "
              f"{rate[k, hidden]:8.1f}")
    print()
    print(f"load average {load_average()} at the end (other processes on the machine skew all of the above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
