"""The samplers training and evaluation rest on: right frequencies, exact ends, reproducible streams."""

import pytest
import torch

from rbm_study.core.data import Binarizer, minibatches
from rbm_study.core.models import RBM
from rbm_study.core.sampling import FastBernoulli, bernoulli
from rbm_study.core.train import CDSettings, CDTrainer, train_rbm
from tests.core.conftest import deterministic

PROBABILITIES = [0.0, 0.001, 0.3, 0.5, 0.999, 1.0]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fast_sampler(seed: int, device: str = "cpu", numpy_bits: bool = True) -> FastBernoulli:
    sampler = FastBernoulli(torch.Generator(device=device).manual_seed(seed))
    if not numpy_bits:
        sampler._lanes = None  # the torch random_ path that non-CPU devices take, tested on the CPU
    return sampler


def assert_binomial(count: float, n: int, p: float, bias: float = 0.0) -> None:
    """count of n Bernoulli(p) draws within 5 standard deviations (plus a known rounding bias)."""
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(count - n * p) <= 5 * sd + n * bias + 1e-9, (count, n * p, sd)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numpy_bits", [True, False])
def test_fast_bernoulli_frequencies(device: str, numpy_bits: bool):
    n = 400_000
    sample = fast_sampler(0, device, numpy_bits)
    p = torch.tensor(PROBABILITIES, device=device)[:, None].expand(-1, n).contiguous()
    counts = sample(p).sum(dim=1).tolist()
    for prob, count in zip(PROBABILITIES, counts, strict=True):
        assert_binomial(count, n, prob, bias=2.0**-17)  # 16-bit uniforms: |bias| <= 2^-17
    assert counts[0] == 0 and counts[-1] == n  # p = 0 never fires, p = 1 always does


@pytest.mark.parametrize("numpy_bits", [True, False])
def test_fast_bernoulli_uses_all_16_bits_of_every_lane(numpy_bits: bool):
    """Each 64-bit word gives four uniforms; a word drawn in [0, 2^63) would starve the fourth.

    At p = 0.5 - 2^-17 the threshold sits just below the middle: a lane whose top bit never fires
    would give frequency 0 or 1 there instead of 1/2.
    """
    n = 1_000_000
    sample = fast_sampler(1, numpy_bits=numpy_bits)
    x = sample(torch.full((n // 4, 4), 0.5))
    for lane in range(4):
        assert_binomial(x[:, lane].sum().item(), n // 4, 0.5)
    signs = 2 * x.flatten() - 1  # neighbours, within a word and across words, are uncorrelated
    for lag in (1, 2, 3, 4, 5):
        assert abs((signs[:-lag] * signs[lag:]).mean().item()) < 5 / (n - lag) ** 0.5


def test_fast_bernoulli_rounds_p_to_multiples_of_2_to_the_minus_16():
    """The documented precision: p below 2^-17 never fires, p above 1 - 2^-17 always does."""
    sample = fast_sampler(2)
    assert sample(torch.full((200_000,), 2.0**-18)).sum() == 0
    assert sample(torch.full((200_000,), 1 - 2.0**-18)).sum() == 200_000
    assert_binomial(sample(torch.full((400_000,), 3 * 2.0**-16)).sum().item(), 400_000, 3 * 2.0**-16)


def test_fast_bernoulli_keeps_shape_dtype_and_writes_into_out():
    sample = fast_sampler(3)
    p = torch.rand(7, 13, dtype=torch.float64)  # 91 values: not a multiple of four
    x = sample(p)
    assert x.shape == p.shape and x.dtype == torch.float64
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    out = torch.empty(7, 13, dtype=torch.float64)
    assert sample(p, out=out) is out
    big = torch.rand(3, 200_000)  # more than one block of uniforms at once
    assert big.shape == sample(big).shape


def test_same_seed_same_samples_other_seed_other_samples():
    sizes = [(100, 784), (100, 100), (5,), (3, 300_000), (100, 784)]  # one request spans blocks

    def stream(seed: int, numpy_bits: bool = True) -> list[torch.Tensor]:
        sample = fast_sampler(seed, numpy_bits=numpy_bits)
        return [sample(torch.full(size, 0.4)) for size in sizes]

    for numpy_bits in (True, False):
        one, two, other = stream(7, numpy_bits), stream(7, numpy_bits), stream(8, numpy_bits)
        assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
        assert not torch.equal(one[0], other[0])


def test_compiled_off_makes_samplers_of_the_torch_path(monkeypatch):
    """What the benchmark times the compiled loop against: the words from the generator, torch's comparison."""
    p = torch.rand(3000, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(FastBernoulli, "compiled", False)
    sampler, again = fast_sampler(5), fast_sampler(5)
    assert sampler._lanes is None
    samples = sampler(p)
    assert torch.equal(samples, again(p)) and set(samples.unique().tolist()) <= {0.0, 1.0}
    monkeypatch.setattr(FastBernoulli, "compiled", True)
    assert fast_sampler(5)._lanes is not None


@pytest.mark.parametrize("numpy_bits", [True, False])
def test_sampling_with_squared_error_gives_the_same_samples_and_the_error(numpy_bits: bool):
    """The CD step's fused call: the samples `__call__` would give from the same state, plus sum((p - v)^2)."""
    g = torch.Generator().manual_seed(0)
    p, v = torch.rand(100, 784, generator=g), (torch.rand(100, 784, generator=g) < 0.3).float()
    samples, error = fast_sampler(9, numpy_bits=numpy_bits).with_squared_error(p, v)
    assert torch.equal(samples, fast_sampler(9, numpy_bits=numpy_bits)(p))
    assert error.dim() == 0 and error.dtype == p.dtype
    assert error.item() == pytest.approx(((p.double() - v.double()) ** 2).sum().item(), rel=1e-6)


@pytest.mark.parametrize("numpy_bits", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_scatter_writes_the_samples_call_makes_at_the_index(numpy_bits: bool, dtype: torch.dtype):
    """The Binarizer's redraw: chunk by chunk, the same samples as `__call__` gives, where they belong."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2500, generator=g)
    index = torch.randperm(40 * 100, generator=g)[:2500]
    out = torch.full((40, 100), 7, dtype=dtype)  # places not in index keep their 7
    fast_sampler(11, numpy_bits=numpy_bits).scatter(p, index, out, chunk=1000)  # three chunks, one partial
    reference = fast_sampler(11, numpy_bits=numpy_bits)
    expected = torch.full((40 * 100,), 7, dtype=dtype)
    for part in range(0, 2500, 1000):
        expected[index[part : part + 1000]] = reference(p[part : part + 1000]).to(dtype)
    assert torch.equal(out.view(-1), expected)


def test_exact_bernoulli_is_rand_below_p():
    """The evaluation path: 24-bit uniforms from torch.rand, the same draws as before the fast path."""
    p = torch.rand(50, 784, generator=torch.Generator().manual_seed(0))
    expected = (torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) < p).to(p.dtype)
    assert torch.equal(bernoulli(p, torch.Generator().manual_seed(5)), expected)
    g = torch.Generator().manual_seed(6)
    for prob in PROBABILITIES:
        count = bernoulli(torch.full((200_000,), prob), g).sum().item()
        assert_binomial(count, 200_000, prob)
        if prob in (0.0, 1.0):
            assert count == 200_000 * prob


def test_minibatches_cover_every_row_once_and_keep_the_last_partial_batch():
    n, bits = 1050, 11
    ids = torch.arange(n)
    rows = ((ids[:, None] >> torch.arange(bits)) & 1).float()  # 0/1 grey values: binarising is exact
    batches = list(minibatches(rows, 100, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [100] * 10 + [50]
    seen = (torch.cat(batches) * (1 << torch.arange(bits))).sum(dim=1).long()
    assert torch.equal(seen.sort().values, ids)
    assert not torch.equal(seen, ids)  # shuffled


def test_binarizer_redraws_every_uncertain_pixel_each_epoch_and_keeps_the_certain_ones():
    """Each epoch is a fresh bernoulli(x): right frequencies, exact 0 and 1, new draws every epoch."""
    grey = torch.tensor(PROBABILITIES)[None, :].expand(40, -1).contiguous()  # one row per image
    images = Binarizer(grey)
    g = torch.Generator().manual_seed(0)
    epochs = 2_000
    counts = torch.zeros_like(grey)
    previous = None
    changed = 0
    for _ in range(epochs):
        epoch = torch.cat(list(images.minibatches(7, g)))  # shuffled rows, all rows alike here
        assert epoch.shape == grey.shape
        counts += epoch
        if previous is not None:
            changed += int((epoch[:, 3] != previous[:, 3]).sum())  # p = 0.5: flips half the time
        previous = epoch
    n = epochs * grey.shape[0]
    for column, prob in enumerate(PROBABILITIES):
        assert_binomial(counts[:, column].sum().item(), n, prob, bias=2.0**-17)
    assert counts[:, 0].sum() == 0 and counts[:, -1].sum() == n  # certain pixels are never redrawn wrong
    assert_binomial(changed, (epochs - 1) * grey.shape[0], 0.5)  # independent of the epoch before


def test_binarizer_minibatches_are_the_shuffled_images_and_reproducible():
    grey = torch.rand(230, 784, generator=torch.Generator().manual_seed(1))
    grey[grey < 0.3] = 0.0  # certain pixels as MNIST has them: background 0, stroke cores 1
    grey[grey > 0.9] = 1.0

    def epoch(seed: int) -> list[torch.Tensor]:
        return list(Binarizer(grey).minibatches(100, torch.Generator().manual_seed(seed)))

    batches = epoch(3)
    assert [len(b) for b in batches] == [100, 100, 30]
    binary = torch.cat(batches)
    order = torch.randperm(230, generator=torch.Generator().manual_seed(3))  # the same shuffle
    assert torch.equal(binary[grey[order] == 0.0], torch.zeros(int((grey == 0).sum())))
    assert torch.equal(binary[grey[order] == 1.0], torch.ones(int((grey == 1).sum())))
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch(3), strict=True))
    assert not torch.equal(binary, torch.cat(epoch(4)))


def test_trainer_keeps_the_binarizer_of_the_same_data_and_makes_a_new_one_for_other_data():
    g = torch.Generator().manual_seed(0)
    trainer = CDTrainer(RBM.init(784, 8, g), CDSettings(batch_size=50), g)
    data, other = torch.rand(100, 784, generator=g), torch.rand(60, 784, generator=g)
    trainer.epoch(data)
    first = trainer._data
    trainer.epoch(data)
    assert trainer._data is first
    trainer.epoch(other)
    assert trainer._data is not first and trainer._data.grey is other


@pytest.mark.parametrize(("k", "persistent"), [(1, False), (3, False), (2, True)])
def test_cd_step_with_deterministic_sampling_matches_the_formulas(k: int, persistent: bool, step_path: str):
    g = torch.Generator().manual_seed(0)
    rbm = RBM(torch.randn(12, 5, generator=g), torch.randn(12, generator=g), torch.randn(5, generator=g))
    v0 = (torch.rand(8, 12, generator=g) < 0.5).float()
    chain = (torch.rand(8, 12, generator=g) < 0.5).float()
    lr = 0.3

    # LAB.md's CD-k, written out
    ph0 = rbm.p_h(v0)
    h0 = (ph0 > 0.5).float()
    recon = ((v0 - rbm.p_v(h0)) ** 2).sum() / len(v0)
    h = (rbm.p_h(chain) > 0.5).float() if persistent else h0
    for _ in range(k):
        vk = (rbm.p_v(h) > 0.5).float()
        phk = rbm.p_h(vk)
        h = (phk > 0.5).float()
    W = rbm.W + lr * (v0.T @ ph0 - vk.T @ phk) / len(v0)
    a = rbm.a + lr * (v0 - vk).mean(0)
    b = rbm.b + lr * (ph0 - phk).mean(0)

    # the trainer's sampler swapped for a deterministic one
    trainer = deterministic(CDTrainer(rbm.clone(), CDSettings(cd_k=k, persistent=persistent, learning_rate=lr), g))
    trainer.chain = chain.clone() if persistent else None
    error = trainer.step(v0)
    assert error == pytest.approx(recon.item(), rel=1e-5)
    for name, got, want in (("W", trainer.rbm.W, W), ("a", trainer.rbm.a, a), ("b", trainer.rbm.b, b)):
        assert torch.allclose(got, want, atol=1e-5), name
    assert torch.equal(trainer.last_negative, vk)
    if persistent:
        assert torch.equal(trainer.chain, vk)


@pytest.mark.parametrize("settings", [
    CDSettings(cd_k=1, epochs=3, batch_size=32),
    CDSettings(cd_k=3, persistent=True, momentum=0.5, weight_decay=1e-3, epochs=2, batch_size=25),
])
def test_cd_training_with_the_same_seed_gives_bit_identical_weights(settings: CDSettings):
    data = torch.rand(310, 20, generator=torch.Generator().manual_seed(0))

    def train(seed: int) -> RBM:
        g = torch.Generator().manual_seed(seed)
        return train_rbm(RBM.init(20, 7, generator=g), data, settings, g)

    one, two, other = train(4), train(4), train(5)
    assert torch.equal(one.W, two.W) and torch.equal(one.a, two.a) and torch.equal(one.b, two.b)
    assert not torch.equal(one.W, other.W)
