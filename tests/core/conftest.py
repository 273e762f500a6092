"""Helpers shared by the core tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


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
