"""The compiled CD step (core.cpu_cd) against torch's operations and against numba's sampler."""

import numpy as np
import pytest
import torch

from rbm_study.core import cpu_cd, kernels
from rbm_study.core.models import RBM
from rbm_study.core.sampling import FastBernoulli
from rbm_study.core.train import CDSettings, CDTrainer
from tests.core.conftest import deterministic


@pytest.fixture(scope="module")
def extension():
    built = cpu_cd.extension()
    if built is None:
        pytest.fail("the compiled CD step could not be built here (is a C++ compiler installed?)")
    return built


@pytest.mark.parametrize(
    "settings",
    [
        CDSettings(cd_k=1),
        CDSettings(cd_k=3),
        CDSettings(cd_k=2, persistent=True),
        CDSettings(cd_k=1, momentum=0.5, weight_decay=0.01),
        CDSettings(cd_k=1, weight_decay=0.01),
    ],
    ids=["CD-1", "CD-3", "PCD-2", "CD-1 momentum decay", "CD-1 decay"],
)
@pytest.mark.parametrize(("V", "H", "n"), [(40, 6, 10), (37, 70, 11), (40, 6, 1), (784, 100, 100)], ids=str)
def test_the_compiled_step_makes_torchs_steps(extension, settings: CDSettings, V: int, H: int, n: int, monkeypatch):
    """With the same (deterministic) samples, every step of CD-k, PCD-k, momentum and decay comes out as
    torch's dense products make it, to rounding: weights, reconstruction error, the chain's last state.

    Widths that are not multiples of 16 (the padded rows), an odd minibatch (unequal parts), and 784-100.
    """
    g = torch.Generator().manual_seed(0)
    start = RBM(torch.randn(V, H, generator=g) / H**0.5, torch.randn(V, generator=g) - 2, torch.randn(H, generator=g))
    batches = [(torch.rand(n, V, generator=g) < 0.15).float() for _ in range(3)]

    def train(compiled: bool):
        monkeypatch.setattr(FastBernoulli, "compiled", compiled)
        trainer = deterministic(CDTrainer(start.clone(), settings, torch.Generator().manual_seed(1)))
        errors = [float(trainer.update(v0)) for v0 in batches]
        return trainer, errors

    (torch_path, torch_errors), (compiled, compiled_errors) = train(False), train(True)
    assert compiled._compiled is not None and compiled._work is None  # the compiled step took every step
    for name in "Wab":
        torch.testing.assert_close(getattr(compiled.rbm, name), getattr(torch_path.rbm, name), rtol=1e-5, atol=1e-5)
    assert compiled_errors == pytest.approx(torch_errors, rel=1e-5)
    assert torch.equal(compiled.last_negative, torch_path.last_negative)
    assert not torch.equal(compiled.rbm.W, start.W)


def test_states_that_are_not_binary_take_torchs_path():
    """Grey visible states cannot be summed as rows: the trainer takes torch's products for them."""
    g = torch.Generator().manual_seed(0)
    start = RBM.init(30, 8, g)
    grey = torch.rand(12, 30, generator=g)
    compiled = deterministic(CDTrainer(start.clone(), CDSettings(), torch.Generator().manual_seed(1)))
    compiled.step(grey)
    reference = start.clone()
    ph0 = reference.p_h(grey)
    vk = (reference.p_v((ph0 > 0.5).float()) > 0.5).float()
    expected = reference.W + 0.1 * (grey.T @ ph0 - vk.T @ reference.p_h(vk)) / len(grey)
    torch.testing.assert_close(compiled.rbm.W, expected, rtol=1e-5, atol=1e-6)
    assert compiled._work is not None  # torch's path ran


@pytest.mark.parametrize("n", [1, 255, 4096, 10_001])
def test_the_steps_sampler_draws_numbas_samples(extension, n: int):
    """The C++ sampler is kernels.bernoulli's: from the same SFC64 state, the same samples, block after block."""
    p = torch.rand(n, generator=torch.Generator().manual_seed(n))
    state = kernels.sfc64_lanes(7)
    expected = np.empty(n, dtype=np.float32)
    kernels.bernoulli(p.numpy(), state.copy(), np.empty((kernels.scratch_rows(n), kernels.LANES), np.uint64), expected)
    ours = extension.bernoulli(p, torch.from_numpy(state.copy()))
    assert torch.equal(ours, torch.from_numpy(expected))
    assert 0 < ours.sum() < n or n == 1


def test_the_steps_samples_have_the_probabilities_asked_for(extension):
    """A million samples at each of five p: frequencies within 5 standard errors (and p = 0, 1 exact)."""
    n = 1_000_000
    state = torch.from_numpy(kernels.sfc64_lanes(3))
    for p in (0.0, 0.01, 0.3, 0.5, 0.97, 1.0):
        frequency = float(extension.bernoulli(torch.full((n,), p), state).mean())
        assert abs(frequency - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12, (p, frequency)


def test_one_thread_and_two_give_the_same_step(extension):
    """The parts are the same on any number of threads, and so are their random numbers."""
    g = torch.Generator().manual_seed(0)
    rbm = RBM.init(784, 100, g)
    v0 = (torch.rand(100, 784, generator=g) < 0.13).float()

    def step(threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = rbm.clone()
        sampler = cpu_cd.CPUStep(torch.Generator().manual_seed(5))
        sampler.threads = threads
        vk, error = sampler(v0, model.W, model.a, model.b, (model.W, model.a, model.b), 2, None, 1.0, 1.0, 0.001)
        return model.W, vk, error

    one, two = step(1), step(2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_bad_tensors_are_refused_by_name(extension):
    g = torch.Generator().manual_seed(0)
    rbm = RBM.init(20, 4, g)
    sampler = cpu_cd.CPUStep(g)
    with pytest.raises(RuntimeError, match="float32"):
        sampler(torch.zeros(3, 20, dtype=torch.float64), rbm.W, rbm.a, rbm.b, (rbm.W, rbm.a, rbm.b), 1, None, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r"v0 must be \[N, 20\]"):
        sampler(torch.zeros(3, 21), rbm.W, rbm.a, rbm.b, (rbm.W, rbm.a, rbm.b), 1, None, 1, 1, 1)


def _two_thread_step(queue) -> None:
    g = torch.Generator().manual_seed(0)
    rbm = RBM.init(50, 10, g)
    sampler = cpu_cd.CPUStep(g)
    sampler.threads = 2
    v0 = (torch.rand(20, 50, generator=g) < 0.2).float()
    vk, _ = sampler(v0, rbm.W, rbm.a, rbm.b, (rbm.W, rbm.a, rbm.b), 1, None, 1.0, 1.0, 0.01)
    queue.put(vk.shape[0])


def _in_forked_child(target, what: str):
    """What `target(queue)` puts in the queue, run in a child made by fork(); fails if it hangs or dies."""
    import multiprocessing

    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=target, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail(f"{what} never finished")
    assert child.exitcode == 0, f"{what}: the child died (exit code {child.exitcode})"
    return queue.get(timeout=5)


def test_a_forked_child_steps_on_two_threads_of_its_own(extension):
    """fork() copies none of the parent's worker threads: the child's step must not wait for them."""
    import multiprocessing

    queue = multiprocessing.get_context("fork").Queue()
    _two_thread_step(queue)  # the parent's team is started
    assert queue.get(timeout=30) == 20
    assert _in_forked_child(_two_thread_step, "the forked child's two-thread step") == 20


def _failing_parts(queue) -> None:
    """In a forked child: a part that throws on the caller's thread or on the worker's, on two threads."""
    built = cpu_cd.extension()
    outcomes = []
    for failing in range(cpu_cd.PARTS):
        try:
            outcomes.append(built.team_trial(2, 3, failing, 1))
        except MemoryError:
            outcomes.append("MemoryError")
    outcomes.append(built.team_trial(2, 3, -1, -1))  # and the team still runs a whole job after
    queue.put(outcomes)


def test_a_part_that_throws_raises_on_the_caller_and_stops_the_job(extension):
    """An exception in a worker's part must not terminate the process (C++ does, where it leaves a
    thread), nor one in the caller's part leave while the worker runs (or leave the worker waiting):
    the caller raises it, and the team then runs a whole job again. In a child, so that a process
    killed or hung by it fails this test only."""
    every_phase = [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert extension.team_trial(1, 3, -1, -1) == every_phase
    with pytest.raises(MemoryError):  # one thread: the parts run in turn on the caller
        extension.team_trial(1, 3, 1, 1)
    outcomes = _in_forked_child(_failing_parts, "a two-thread job with a failing part")
    assert outcomes == ["MemoryError", "MemoryError", every_phase]
