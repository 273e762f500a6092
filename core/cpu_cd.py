"""The CD-k / PCD-k step on the CPU as one compiled call, its minibatch in two parts side by side.

Why: on the CPU a CD step of 100 MNIST images is a few dozen small operations. Run as torch
operations on two threads, the threads meet at every one of them, and the per-row work between
them (where the ones are, the sampler) runs on one; so the second core gains a step little. Here
the whole step is one call of C++ (`cpu_cd.cpp`) that splits its work two ways and meets three
times a step: W' from W (by hidden unit), the Gibbs chain (by rows of the minibatch), the update
(by visible unit). Every product with a binary matrix is a sum of the rows its ones pick, which on
MNIST's states (about 13% ones) is a fraction of a dense product's work, and the hidden samples'
product is done the same way. Each part draws from its own SFC64 lanes and every sum runs in a
fixed order, so one thread and two give the same bits: same seed, same weights.

The step is built from `cpu_cd.cpp` with torch's C++ extension API (`torch.utils.cpp_extension`,
for this machine's CPU) at its first use in an environment, about half a minute, and cached for
later processes (in `$TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`). Where no C++
compiler is at hand the trainer says so once and takes torch's operations instead (slower, the
same maths). `python -m tests.bench` times the trainer with and without it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from rbm_study.core import kernels

PARTS = 2
"""Parts a minibatch is cut into (rows), and a step's work into: fixed, so results never depend on
how many threads run them."""

SOURCE = Path(__file__).with_name("cpu_cd.cpp")


def _cpu_tag() -> str:
    """A short hash of this CPU's model and features: the build is for this CPU (-march=native), and
    a cache shared between unlike machines must not hand one machine's build to another."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            text += "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its note that no CUDA runtime was found (we build
    for the CPU only); it imports setuptools, so only when a step is wanted."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


@functools.cache
def extension() -> ModuleType | None:
    """The compiled step, built at first use; None (with a warning) where it cannot be built.

    Setting RBM_STUDY_NO_COMPILE=1 skips it (torch's operations train instead).
    """
    if os.environ.get("RBM_STUDY_NO_COMPILE"):
        return None
    cpp_extension = _cpp_extension()
    name = f"rbm_study_cpu_cd_{_cpu_tag()}"
    # one folder per CPU, Python and torch (a build is for all three); torch rebuilds in it when the
    # source or the flags change
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    folder = root / f"{name}-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    path = os.environ.get("PATH", "")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{name}.so").exists():
            print("rbm-study: building the compiled CD step for this CPU (once, about half a minute)", file=sys.stderr)
        if shutil.which("ninja") is None:  # the ninja package's binary, where the venv's bin is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-std=c++20", "-fopenmp-simd"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as error:  # no compiler, or one too old for C++20: torch's path still trains
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"the compiled CD step could not be built ({first_line}); training takes torch's operations "
            "instead, the same maths, slower (install a C++ compiler, e.g. g++, for the fast step)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    finally:
        os.environ["PATH"] = path


def fits(rbm_W: torch.Tensor) -> bool:
    """Whether the compiled step serves this model: float32 on the CPU, and the step could be built."""
    return rbm_W.device.type == "cpu" and rbm_W.dtype == torch.float32 and extension() is not None


class CPUStep:
    """The compiled step's state: PARTS samplers (64 SFC64 lanes each), seeded from `generator`.

    `threshold` replaces the sampler by 1 where p > 0.5, so that tests can follow the arithmetic.
    """

    def __init__(self, generator: torch.Generator, threshold: bool = False):
        self.generator = generator
        self.threshold = threshold
        self._threads = 1
        children = np.random.SeedSequence(int(torch.randint(2**62, (), generator=generator))).spawn(PARTS)
        self.lanes = torch.from_numpy(np.stack([kernels.sfc64_lanes(child) for child in children]))

    @property
    def threads(self) -> int:
        """How many threads run the parts (the trainer's AdaptiveThreads sets it)."""
        return self._threads

    @threads.setter
    def threads(self, count: int) -> None:
        if count < 2 <= self._threads:  # the worker sleeps at once rather than spin for the next step
            extension().rest()
        self._threads = count

    def __call__(
        self,
        v0: torch.Tensor,
        W: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        k: int,
        chain: torch.Tensor | None,
        beta: float,
        bias_beta: float,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One step; targets <- beta targets + scale (v0' ph0 - vk' phk), likewise the biases'.

        Returns (vk, the reconstruction's summed squared error), or None, with nothing changed,
        where v0 or the chain is not binary.
        """
        W_to, a_to, b_to = targets
        result = extension().cd_step(
            v0.contiguous(), W, a, b, W_to, a_to, b_to, self.lanes, k,
            None if chain is None else chain.contiguous(), beta, bias_beta, scale, self.threads, self.threshold,
        )  # fmt: skip
        if not result:
            return None
        vk, squared_error = result
        return vk, squared_error.to(v0.dtype)
