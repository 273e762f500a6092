"""Greedy layer-wise training of a deep belief network (LAB.md, task 2; Hinton, Osindero & Teh 2006).

Each new RBM is trained with CD-k (`core.train`) on samples of the top hidden layer of the frozen
stack below it, h_{l-1} ~ p(h_{l-1} | h_{l-2}) from data v = h_0; training it never changes the
layers below (see `core.models.DBN` for which bias plays which role).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rbm_study.core.data import Binarizer
from rbm_study.core.models import RBM, mean_activity, visible_bias_from_means
from rbm_study.core.sampling import FastBernoulli
from rbm_study.core.train import CDSettings, EpochCallback, train_rbm


def train_dbn_layer(
    below: list[RBM],
    n_hidden: int,
    data: torch.Tensor | Binarizer,
    settings: CDSettings,
    generator: torch.Generator,
    on_epoch: EpochCallback | None = None,
    epoch_metrics: Callable[[RBM], dict[str, float]] | None = None,
    weight_std: float = 0.01,
) -> RBM:
    """Greedily train one more RBM on samples of the top hidden layer of the frozen `below` stack.

    `data` is the grey-valued images (or their `Binarizer`, to share one across the lab's tasks).
    Its visible bias starts at the base rate of the layer below's mean activity (Hinton's guide).
    The up pass that makes its data samples with the training sampler, like the CD chain.
    """
    grey = data.grey if isinstance(data, Binarizer) else data
    sample = FastBernoulli(generator)

    def encode(v: torch.Tensor) -> torch.Tensor:
        for layer in below:
            v = sample(layer.p_h(v))
        return v

    means = mean_activity(below, grey)
    rbm = RBM.init(
        below[-1].n_hidden,
        n_hidden,
        generator=generator,
        device=grey.device,
        weight_std=weight_std,
        visible_bias=visible_bias_from_means(means),
    )
    return train_rbm(rbm, data, settings, generator, on_epoch, epoch_metrics, encode=encode)
