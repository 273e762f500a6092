"""CD-k and PCD-k against the exact log-likelihood gradient of tiny RBMs (everything enumerable)."""

import itertools

import pytest
import torch

from rbm_study.core import evaluate
from rbm_study.core.models import RBM
from rbm_study.core.threads import AdaptiveThreads
from rbm_study.core.train import CDSettings, CDTrainer, train_rbm
from tests.core.conftest import deterministic


def all_states(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=dtype)


def tiny_rbm(seed: int = 0, V: int = 5, H: int = 3, scale: float = 0.5) -> RBM:
    g = torch.Generator().manual_seed(seed)
    return RBM(
        torch.randn(V, H, generator=g) * scale,
        torch.randn(V, generator=g) * scale,
        torch.randn(H, generator=g) * scale,
    )


def exact_gradient(rbm: RBM, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d mean log p(data) / d(W, a, b) by enumerating every visible state."""
    v = all_states(rbm.n_visible)
    p_v = torch.softmax(-rbm.free_energy(v), dim=0)
    ph_model, ph_data = rbm.p_h(v), rbm.p_h(data)
    dW = data.T @ ph_data / len(data) - (v * p_v[:, None]).T @ ph_model
    da = data.mean(0) - p_v @ v
    db = ph_data.mean(0) - p_v @ ph_model
    return dW, da, db


def cd_update(rbm: RBM, data: torch.Tensor, settings: CDSettings, seed: int = 1):
    """The change one CD step makes with learning rate 1: the algorithm's gradient estimate."""
    model = rbm.clone()
    trainer = CDTrainer(model, settings, torch.Generator().manual_seed(seed))
    trainer.step(data)
    return model.W - rbm.W, model.a - rbm.a, model.b - rbm.b


def patterns(n_rows: int) -> torch.Tensor:
    base = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0], [1, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.float32)
    return base.repeat(n_rows // len(base), 1)


def test_cd_with_long_chains_matches_exact_gradient():
    rbm, data = tiny_rbm(), patterns(200_000)
    exact = exact_gradient(rbm, data)
    estimate = cd_update(rbm, data, CDSettings(cd_k=30, learning_rate=1.0))
    for name, e, c in zip("Wab", exact, estimate, strict=True):
        assert torch.allclose(c, e, atol=0.01), f"{name}: CD-30 {c} vs exact {e}"


def test_cd1_is_biased_but_points_uphill():
    """CD-1 differs from the gradient (the point of the k study) yet has a positive inner product."""
    rbm, data = tiny_rbm(seed=3, scale=1.5), patterns(200_000)
    exact = torch.cat([t.flatten() for t in exact_gradient(rbm, data)])
    cd1 = torch.cat([t.flatten() for t in cd_update(rbm, data, CDSettings(cd_k=1, learning_rate=1.0))])
    assert (cd1 - exact).abs().max() > 0.02  # the bias is visible at this sample size
    assert torch.dot(cd1, exact) > 0


def test_pcd_chain_persists_and_matches_gradient_after_burn_in():
    rbm, data = tiny_rbm(seed=5), patterns(100_000)
    trainer = CDTrainer(rbm.clone(), CDSettings(cd_k=1, persistent=True, learning_rate=1e-9),
                        torch.Generator().manual_seed(0))
    for _ in range(30):  # lr ~ 0: the chain mixes towards the model without moving it
        trainer.step(data)
    before = trainer.rbm.clone()
    trainer.settings.learning_rate = 1.0
    trainer.step(data)
    exact = exact_gradient(before, data)
    for name, e, c in zip("Wab", exact, (trainer.rbm.W - before.W, trainer.rbm.a - before.a,
                                          trainer.rbm.b - before.b), strict=True):
        assert torch.allclose(c, e, atol=0.015), f"{name}: PCD {c} vs exact {e}"


@pytest.mark.parametrize("persistent", [False, True])
def test_training_raises_exact_log_likelihood(persistent: bool):
    data = patterns(400)
    rbm = RBM.init(5, 3, generator=torch.Generator().manual_seed(0))
    def mean_ll(model: RBM) -> float:
        return evaluate.mean_log_likelihood(model, data, evaluate.exact_log_z(model))

    before = mean_ll(rbm)
    settings = CDSettings(cd_k=1, persistent=persistent, learning_rate=0.05, epochs=100, batch_size=20)
    train_rbm(rbm, data, settings, torch.Generator().manual_seed(1))
    after = mean_ll(rbm)
    assert after > before + 0.5, (before, after)  # PCD-1 at a larger rate oscillates on 4 patterns
    assert after < 0


def test_momentum_and_weight_decay_follow_the_velocity_rule():
    rbm, data = tiny_rbm(seed=7), patterns(40)
    settings = CDSettings(cd_k=1, learning_rate=0.5, momentum=0.9, weight_decay=0.01)
    plain = cd_update(rbm, data, CDSettings(cd_k=1, learning_rate=0.5), seed=3)
    with_extras = cd_update(rbm, data, settings, seed=3)
    # first step: velocity = lr * (grad - wd * W), same random numbers, so the difference is -lr*wd*W
    assert torch.allclose(with_extras[0] - plain[0], -0.5 * 0.01 * rbm.W, atol=1e-6)
    assert torch.allclose(with_extras[1], plain[1]) and torch.allclose(with_extras[2], plain[2])


def test_weight_decay_without_momentum_shrinks_w_by_lr_times_decay():
    rbm, data = tiny_rbm(seed=7), patterns(40)
    plain = cd_update(rbm, data, CDSettings(cd_k=1, learning_rate=0.5), seed=3)
    decayed = cd_update(rbm, data, CDSettings(cd_k=1, learning_rate=0.5, weight_decay=0.01), seed=3)
    assert torch.allclose(decayed[0] - plain[0], -0.5 * 0.01 * rbm.W, atol=1e-6)
    assert torch.allclose(decayed[1], plain[1]) and torch.allclose(decayed[2], plain[2])


def test_same_seed_gives_bit_identical_weights():
    data = torch.rand(300, 20)

    def train(seed: int) -> RBM:
        rbm = RBM.init(20, 7, generator=torch.Generator().manual_seed(seed))
        return train_rbm(rbm, data, CDSettings(cd_k=2, epochs=3, batch_size=32), torch.Generator().manual_seed(seed))

    one, two, other = train(4), train(4), train(5)
    assert torch.equal(one.W, two.W) and torch.equal(one.a, two.a) and torch.equal(one.b, two.b)
    assert not torch.equal(one.W, other.W)


def test_divergence_is_reported():
    data = torch.rand(200, 10)
    rbm = RBM.init(10, 4, generator=torch.Generator().manual_seed(0))
    rbm.W.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="learning rate"):
        train_rbm(rbm, data, CDSettings(epochs=1, batch_size=50), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_every_step_follows_the_velocity_rule(momentum: float, step_path: str):
    """velocity <- m velocity + lr (g - wd W); theta += velocity, step after step, from a copy of each,
    on the compiled step and on torch's operations."""
    g = torch.Generator().manual_seed(0)
    rbm = RBM(torch.randn(12, 5, generator=g), torch.randn(12, generator=g), torch.randn(5, generator=g))
    lr, wd = 0.3, 0.01
    trainer = deterministic(CDTrainer(rbm, CDSettings(cd_k=1, learning_rate=lr, momentum=momentum, weight_decay=wd), g))
    velocity = [torch.zeros(12, 5), torch.zeros(12), torch.zeros(5)]
    for _ in range(4):
        v0 = (torch.rand(8, 12, generator=g) < 0.5).float()
        before = rbm.clone()
        ph0 = before.p_h(v0)
        vk = (before.p_v((ph0 > 0.5).float()) > 0.5).float()
        phk = before.p_h(vk)
        n = len(v0)
        gradients = ((v0.T @ ph0 - vk.T @ phk) / n - wd * before.W, (v0 - vk).mean(0), (ph0 - phk).mean(0))
        velocity = [momentum * u + lr * grad for u, grad in zip(velocity, gradients, strict=True)]
        trainer.step(v0)
        for name, got, old, u in zip("Wab", (rbm.W, rbm.a, rbm.b), (before.W, before.a, before.b), velocity,
                                     strict=True):
            assert torch.allclose(got, old + u, atol=1e-5), name


@pytest.mark.parametrize(
    ("V", "H", "power"), [(784, 100, 1), (100, 100, 1), (784, 200, 1), (784, 50, 1), (784, 100, 6)]
)
def test_the_thread_count_does_not_change_the_weights(V: int, H: int, power: int):
    """The trainer may switch between one thread and two at any chunk: same seed, same weights regardless.

    Uniform grey data binarises to half ones; its 6th power to a seventh, like MNIST. The compiled
    step cuts every minibatch in the same parts on any number of threads.
    """
    data = torch.rand(350, V, generator=torch.Generator().manual_seed(0)) ** power
    threads = torch.get_num_threads()

    def train(count: int, switch_every_step: bool = False) -> RBM:
        torch.set_num_threads(count)
        g = torch.Generator().manual_seed(3)
        trainer = CDTrainer(RBM.init(V, H, g), CDSettings(cd_k=2, momentum=0.5, batch_size=100), g)
        if switch_every_step:
            trainer.threads = AdaptiveThreads(chunk_seconds=0.0)  # every step a chunk: it alternates
        trainer.epoch(data)
        trainer.epoch(data)
        return trainer.rbm

    try:
        one, two, switching = train(1), train(2), train(2, switch_every_step=True)
    finally:
        torch.set_num_threads(threads)
    for model in (two, switching):
        assert torch.equal(model.W, one.W) and torch.equal(model.a, one.a) and torch.equal(model.b, one.b)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_adaptive_threads_runs_on_the_faster_count_and_follows_the_machine():
    """Quiet: two threads are faster, and a hiccup now and then changes nothing; one core taken:
    one thread is faster; freed again: back to two."""
    clock = Clock()
    chooser = AdaptiveThreads(chunk_seconds=3.0, max_interval=16, clock=clock)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)

    def quiet(count: int, i: int) -> float:
        return {1: 1.0, 2: 0.6}[count]

    def hiccups(count: int, i: int) -> float:
        return 10 * quiet(count, i) if i % 40 == 0 else quiet(count, i)  # one slow step in 40

    def busy(count: int, i: int) -> float:
        return {1: 1.1, 2: 6.0}[count]

    phases = {"quiet": quiet, "hiccups": hiccups, "busy": busy, "quiet again": quiet}
    seconds_on = {name: {1: 0.0, 2: 0.0} for name in phases}
    try:
        with chooser.running() as running:
            for name, cost in phases.items():
                for i in range(1500):
                    count = torch.get_num_threads()
                    clock.now += cost(count, i)
                    seconds_on[name][count] += cost(count, i)
                    running.step()
        assert torch.get_num_threads() == 2  # restored after the block
    finally:
        torch.set_num_threads(threads)
    for name in ("quiet", "hiccups", "quiet again"):  # trials of the other count cost half a chunk each, ever rarer
        assert seconds_on[name][2] > 0.9 * sum(seconds_on[name].values()), (name, seconds_on[name])
    busy_seconds = seconds_on["busy"]
    assert busy_seconds[1] > 0.85 * sum(busy_seconds.values()), busy_seconds


def test_adaptive_threads_leaves_one_thread_and_disabled_runs_alone():
    threads = torch.get_num_threads()
    try:
        for count, enabled in ((1, True), (2, False)):
            torch.set_num_threads(count)
            clock = Clock()
            chooser = AdaptiveThreads(chunk_seconds=0.0, clock=clock)
            with chooser.running(enabled=enabled) as running:
                for _ in range(10):
                    clock.now += 1.0
                    running.step()
                    assert torch.get_num_threads() == count
            assert chooser.per_step == {}
    finally:
        torch.set_num_threads(threads)
