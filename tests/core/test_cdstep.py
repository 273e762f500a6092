"""The compiled CPU step (`core.cdstep`): LAB.md's CD-k update, checked against the formulas."""

from __future__ import annotations

import math
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch
from rbm_study.core import cdstep
from rbm_study.core.rbm import RBM
from rbm_study.core.train import CDSettings, CDTrainer

pytestmark = pytest.mark.skipif(not cdstep.available(), reason="torch's CPU library has no MKL here")


def model(V: int, H: int, seed: int = 0) -> tuple[RBM, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W, a, b = (torch.randn(*shape, generator=g) * 0.3 for shape in ((V, H), (V,), (H,)))
    rbm = RBM(W, a, b)
    return rbm, (torch.rand(40, V, generator=g) < 0.3).float()


@pytest.mark.parametrize(
    ("V", "H", "k", "weight_decay", "rows"), [(784, 100, 1, 0.0, 40), (13, 5, 3, 0.0, 40), (9, 7, 2, 0.01, 1)]
)
def test_one_step_is_lab_cd_k_given_its_samples(V: int, H: int, k: int, weight_decay: float, rows: int):
    """Each quantity the step writes follows from the ones before it by LAB.md's formulas.

    V = 13 and 9 do not split evenly into the parts; H = 5 and 7 split the hidden bias unevenly;
    a one-row minibatch (an epoch's last) leaves one part no rows of the hidden side.
    """
    rbm, v0 = model(V, H)
    v0 = v0[:rows]
    lr, n = 0.3, len(v0)
    step = cdstep.CDStep(torch.Generator().manual_seed(1))
    W, a, b = rbm.W.clone(), rbm.a.clone(), rbm.b.clone()
    vk, squared_error = step(v0, W, a, b, k, lr, weight_decay)

    assert torch.allclose(step.ph0, rbm.p_h(v0), atol=1e-6)
    assert torch.allclose(step.pv, rbm.p_v(step.h), atol=1e-6)  # the last Gibbs step's p(v|h)
    assert torch.allclose(step.phk, rbm.p_h(vk), atol=1e-6)
    assert set(vk.unique().tolist()) <= {0.0, 1.0} and set(step.h.unique().tolist()) <= {0.0, 1.0}
    if k == 1:  # h is h0, so the reconstruction error can be recomputed
        assert squared_error == pytest.approx(((rbm.p_v(step.h) - v0) ** 2).sum().item(), rel=1e-5)
    want_W = rbm.W * (1 - lr * weight_decay) + lr * (v0.T @ step.ph0 - vk.T @ step.phk) / n
    assert torch.allclose(W, want_W, atol=1e-6)
    assert torch.allclose(a, rbm.a + lr * (v0 - vk).mean(0), atol=1e-6)
    assert torch.allclose(b, rbm.b + lr * (step.ph0 - step.phk).mean(0), atol=1e-6)


def compiled_sigmoid(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sigmoid(x + bias) by the compiled step's own row loop, on a copy of x."""
    out, n = x.clone(), len(x)
    cdstep._sigmoid_row(out.numpy(), bias.numpy(), np.empty(n, np.float32), np.empty(n, np.int32))
    return out


def test_sigmoid_is_within_two_ulp_of_the_exact_one():
    """The written-out exponential (Cephes' expf) against float64's sigmoid rounded to float32."""
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.linspace(-80, 80, 400_001), torch.randn(100_000, generator=g) * 4])
    bias = torch.randn(len(x), generator=g) * 0.5
    got = compiled_sigmoid(x, bias)
    want = torch.sigmoid((x + bias).double()).float()  # the sum in float32, as the step adds it
    ulp = torch.from_numpy(np.spacing(want.numpy()))
    assert ((got - want).abs() <= 2 * ulp).all()

    extremes = torch.tensor([-1e30, -1e4, -88.0, 88.0, 1e4, 1e30, -math.inf, math.inf, math.nan])
    got = compiled_sigmoid(extremes, torch.zeros(len(extremes)))
    assert (got[:3] <= 2e-38).all() and (got[:3] >= 0).all()  # tiny, never negative, never NaN
    assert (got[3:6] == 1.0).all()
    assert got[6] <= 2e-38 and got[7] == 1.0 and got[8].isnan()


def test_samples_fire_with_their_probability():
    """h ~ bernoulli(p(h|v0)): over many steps each unit fires as often as its probability says."""
    rbm, v0 = model(30, 8)
    step = cdstep.CDStep(torch.Generator().manual_seed(2))
    fired, steps = torch.zeros(len(v0), 8), 2000
    for _ in range(steps):
        step(v0, rbm.W.clone(), rbm.a.clone(), rbm.b.clone(), 1, 0.1, 0.0)
        fired += step.h
    p = rbm.p_h(v0)
    # 4.5 standard errors of a binomial frequency, over 320 units
    assert ((fired / steps - p).abs() <= 4.5 * (p * (1 - p) / steps).sqrt() + 1e-3).all()


def test_same_seed_same_weights_whatever_the_thread_count():
    """Each part draws from its own random state, so the threads that run them do not matter."""

    def train(threads: int) -> torch.Tensor:
        rbm, v0 = model(50, 12)
        step = cdstep.CDStep(torch.Generator().manual_seed(3))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)  # the step runs on as many threads as torch has
        try:
            for _ in range(5):
                step(v0, rbm.W, rbm.a, rbm.b, 2, 0.1, 0.0)
                assert numba.get_num_threads() == min(threads, cdstep.PARTS, numba.config.NUMBA_NUM_THREADS)
        finally:
            torch.set_num_threads(previous)
        return torch.cat([rbm.W.flatten(), rbm.a, rbm.b])

    assert torch.equal(train(1), train(2))


def test_the_trainer_takes_the_compiled_step_for_plain_cd_on_the_cpu():
    rbm, v0 = model(20, 6)
    plain = CDTrainer(rbm.clone(), CDSettings(cd_k=2), torch.Generator().manual_seed(0))
    plain.step(v0)
    assert plain._compiled_step is not None and plain.last_negative.shape == v0.shape
    with_momentum = CDTrainer(rbm.clone(), CDSettings(momentum=0.5), torch.Generator().manual_seed(0))
    with_momentum.step(v0)
    assert with_momentum._compiled_step is not None and with_momentum.velocity is not None
    persistent = CDTrainer(rbm.clone(), CDSettings(persistent=True), torch.Generator().manual_seed(0))
    persistent.step(v0)
    assert persistent._compiled_step is None  # PCD keeps the torch path


@pytest.mark.parametrize(("V", "H", "k", "weight_decay"), [(784, 100, 1, 2e-4), (13, 5, 2, 0.01)])
def test_momentum_steps_follow_the_velocity_rule_given_their_samples(V: int, H: int, k: int, weight_decay: float):
    """Three steps: U <- m U + lr/N (v0' ph0 - vk' phk) - lr wd W, W += U; c, d and a, b likewise."""
    rbm, v0 = model(V, H)
    lr, m, n = 0.3, 0.9, len(v0)
    step = cdstep.CDStep(torch.Generator().manual_seed(1))
    W, a, b = rbm.W.clone(), rbm.a.clone(), rbm.b.clone()
    velocity = (torch.zeros_like(W), torch.zeros_like(a), torch.zeros_like(b))
    for _ in range(3):
        before = RBM(W.clone(), a.clone(), b.clone())
        U, c, d = (t.clone() for t in velocity)  # each step checked from the velocities it was given
        vk, _ = step(v0, W, a, b, k, lr, weight_decay, m, velocity)
        assert torch.allclose(step.ph0, before.p_h(v0), atol=1e-6)
        want_U = m * U + lr * (v0.T @ step.ph0 - vk.T @ step.phk) / n - lr * weight_decay * before.W
        want_c = m * c + lr * (v0 - vk).mean(0)
        want_d = m * d + lr * (step.ph0 - step.phk).mean(0)
        for got, want in zip(velocity, (want_U, want_c, want_d), strict=True):
            assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(W, before.W + velocity[0], atol=1e-6)
        assert torch.allclose(a, before.a + velocity[1], atol=1e-6)
        assert torch.allclose(b, before.b + velocity[2], atol=1e-6)


def test_the_compiled_step_leaves_torchs_thread_count_alone():
    """Starting numba's threads sets OpenMP's thread count, torch's too (once a process: a new one here)."""
    script = (
        "import torch; from core import cdstep; torch.set_num_threads(1); "
        "step = cdstep.CDStep(torch.Generator().manual_seed(0)); W = torch.zeros(8, 4); "
        "step((torch.rand(4, 8) < 0.5).float(), W, torch.zeros(8), torch.zeros(4), 1, 0.1, 0.0); "
        "print(torch.get_num_threads())"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1"
