"""Greedy DBN and up-down fine-tuning on a small problem where the bound can be enumerated."""

import torch

from rbm_study.core import evaluate
from rbm_study.core.finetune import fine_tune
from rbm_study.core.greedy import train_dbn_layer
from rbm_study.core.models import DBN, RBM, UpDownDBN
from rbm_study.core.sampling import generate, reconstruct
from rbm_study.core.train import CDSettings, train_rbm


def bars(n: int, seed: int = 0) -> torch.Tensor:
    """4x4 images of one horizontal or vertical bar, with 5% pixel noise: a classic toy set."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(n):
        img = torch.zeros(4, 4)
        k = int(torch.randint(4, (1,), generator=g))
        if i % 2:
            img[k, :] = 1
        else:
            img[:, k] = 1
        images.append(img.flatten())
    x = torch.stack(images)
    flip = torch.rand(x.shape, generator=g) < 0.05
    return torch.where(flip, 1 - x, x)


def bound(model: UpDownDBN, v: torch.Tensor) -> float:
    log_z = evaluate.exact_log_z(model.top)
    return evaluate.dbn_lower_bound(v, model.R, model.b_rec, model.G, model.a, model.top, top_log_z=log_z)


def greedy_dbn(data: torch.Tensor, seed: int = 0) -> DBN:
    g = torch.Generator().manual_seed(seed)
    rbm = train_rbm(RBM.init(16, 10, generator=g), data, CDSettings(cd_k=1, learning_rate=0.1, epochs=40,
                                                                    batch_size=20), g)
    top = train_dbn_layer([rbm], 8, data, CDSettings(cd_k=2, learning_rate=0.1, epochs=40, batch_size=20), g)
    return DBN([rbm, top])


def test_greedy_layer_does_not_touch_the_layer_below():
    data = bars(200)
    g = torch.Generator().manual_seed(0)
    rbm = train_rbm(RBM.init(16, 10, generator=g), data, CDSettings(epochs=5, batch_size=20), g)
    before = rbm.clone()
    train_dbn_layer([rbm], 8, data, CDSettings(cd_k=2, epochs=5, batch_size=20), g)
    assert torch.equal(rbm.W, before.W) and torch.equal(rbm.a, before.a) and torch.equal(rbm.b, before.b)


def test_lower_bound_below_exact_and_up_down_raises_it():
    data = bars(400)
    dbn = greedy_dbn(data)
    model = UpDownDBN.from_dbn(dbn)
    exact = evaluate.dbn_exact_log_likelihood(data, model.G, model.a, model.top, evaluate.exact_log_z(model.top))
    before = bound(model, data)
    assert before <= exact
    tuned = fine_tune(dbn, data, CDSettings(cd_k=2, learning_rate=0.05, epochs=60, batch_size=20),
                      torch.Generator().manual_seed(1))
    after = bound(tuned, data)
    assert after > before + 0.05, (before, after)
    assert after <= evaluate.dbn_exact_log_likelihood(data, tuned.G, tuned.a, tuned.top,
                                                      evaluate.exact_log_z(tuned.top))
    # the untied weights really moved apart, and the DBN given in was left alone
    assert not torch.equal(tuned.R, tuned.G.T)
    assert torch.equal(dbn.layers[0].W, UpDownDBN.from_dbn(dbn).R)


def test_generation_and_reconstruction_shapes():
    dbn = greedy_dbn(bars(100))
    g = torch.Generator().manual_seed(0)
    pv, h_top = reconstruct(dbn, bars(5), gibbs_steps=3, generator=g)
    assert pv.shape == (5, 16) and h_top.shape == (5, 8)
    assert ((pv >= 0) & (pv <= 1)).all()
    pv, h_top = generate(UpDownDBN.from_dbn(dbn), torch.zeros(7, 8), gibbs_steps=2, generator=g)
    assert pv.shape == (7, 16) and set(h_top.unique().tolist()) <= {0.0, 1.0}
