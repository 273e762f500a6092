"""Helpers shared by the core tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from rbm_study.core import cpu_cd
from rbm_study.core.sampling import FastBernoulli
from rbm_study.core.train import CDTrainer


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread avoids hand-off stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Threshold:
    """A deterministic stand-in for the sampler (1 where p > 0.5), so CD's arithmetic can be checked."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = (p > 0.5).to(p.dtype)
        return x if out is None else out.copy_(x)

    def with_squared_error(self, p: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(p), ((p - v) ** 2).sum()


def deterministic(trainer: CDTrainer) -> CDTrainer:
    """The trainer with both its samplers (torch's path's and the compiled step's) replaced by 1
    where p > 0.5, so that its arithmetic can be checked."""
    trainer._sample = Threshold(trainer.generator)
    trainer._compiled = cpu_cd.CPUStep(trainer.generator, threshold=True)
    return trainer


@pytest.fixture(params=["compiled step", "torch's operations"])
def step_path(request, monkeypatch) -> str:
    """Runs a test on each way a CPU trainer takes its steps: the compiled step (core.cpu_cd) and
    torch's operations (as on a GPU, or without a compiler)."""
    compiled = request.param == "compiled step"
    if compiled and cpu_cd.extension() is None:
        pytest.fail("the compiled CD step could not be built here (is a C++ compiler installed?)")
    monkeypatch.setattr(FastBernoulli, "compiled", compiled)
    return request.param
