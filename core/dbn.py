"""Deep belief network: a stack of RBMs trained greedily, bottom to top (LAB.md, task 2).

Layer l is an RBM between h_{l-1} (h_0 = v) and h_l. Its visible bias is h_{l-1}'s bias when the
layer generates downwards; its hidden bias is h_l's bias when the layer recognises upwards. So a
correctly trained DBN has two biases on every inner layer: the lower RBM's hidden bias (up pass,
recognition) and the upper RBM's visible bias (top-level Gibbs steps and generation). Training the
upper RBM never changes the lower one: each layer is its own copy.

    up pass:      h_l ~ p(h_l | h_{l-1}) with layer l's W and hidden bias, up to the top's visible layer
    top level:    k block Gibbs steps in the top RBM
    down pass:    p(h_{l-1} | h_l) with layer l's W (same weights as up) and visible bias, to v
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from rbm_study.core.data import Binarizer
from rbm_study.core.rbm import RBM, FastBernoulli, bernoulli, visible_bias_from_means
from rbm_study.core.train import CDSettings, EpochCallback, train_rbm


class DBN:
    """A stack of RBMs; `layers[0]` sees the data, `layers[-1]` is the top (undirected) RBM."""

    def __init__(self, layers: list[RBM]):
        if len(layers) < 2:
            raise ValueError("a DBN needs at least two RBMs")
        for lower, upper in itertools.pairwise(layers):
            if lower.n_hidden != upper.n_visible:
                raise ValueError(
                    f"layer sizes do not fit: {lower.n_hidden} hidden below, {upper.n_visible} visible above"
                )
        self.layers = layers

    @property
    def top(self) -> RBM:
        return self.layers[-1]

    def up(self, v: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sampled states of the top RBM's visible layer (h_{L-1}) given binary data v."""
        h = v
        for layer in self.layers[:-1]:
            h = bernoulli(layer.p_h(h), generator)
        return h

    def reconstruct(
        self, v: torch.Tensor, gibbs_steps: int = 1, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up pass, `gibbs_steps` (>= 1) Gibbs rounds in the top RBM, down pass (LAB.md, task 2).

        A round is h_top ~ p(h_top | h_{L-1}), then h_{L-1} ~ p(h_{L-1} | h_top). Returns
        (p(v=1|...) at the bottom, the final top hidden state) for the lab's figure.
        """
        if gibbs_steps < 1:
            raise ValueError(f"gibbs_steps must be >= 1, got {gibbs_steps}")
        h_top = bernoulli(self.top.p_h(self.up(v, generator)), generator)
        return self.generate(h_top, gibbs_steps - 1, generator)

    def generate(
        self, h_top: torch.Tensor, gibbs_steps: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`gibbs_steps` (>= 0) Gibbs rounds in the top RBM from h_top, then the down pass.

        Returns (visible probabilities, the final top hidden state).
        """
        if gibbs_steps > 0:
            _, _, h_top = self.top.gibbs_from_hidden(h_top, gibbs_steps, generator)
        h = bernoulli(self.top.p_v(h_top), generator)
        for layer in reversed(self.layers[1:-1]):
            h = bernoulli(layer.p_v(h), generator)
        return self.layers[0].p_v(h), h_top

    def clone(self) -> DBN:
        return DBN([layer.clone() for layer in self.layers])


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


def mean_activity(layers: list[RBM], data: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    """Mean of p(h|v) of the top of `layers` over the data (mean-field up pass)."""
    total = torch.zeros(layers[-1].n_hidden, device=data.device, dtype=data.dtype)
    for start in range(0, data.shape[0], chunk):
        h = data[start : start + chunk]
        for layer in layers:
            h = layer.p_h(h)
        total += h.sum(dim=0)
    return total / data.shape[0]
