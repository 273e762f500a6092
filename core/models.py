"""The three models of the lab, as parameters, conditionals and free energies; nothing random here.

RBM (task 1). Energy of a joint state of binary visible units v (V of them) and hidden units h
(H of them):

    E(v, h) = -v'Wh - b'h - a'v          W: [V, H], a: visible bias [V], b: hidden bias [H]

which gives factorial conditionals

    p(h_j = 1 | v) = sigmoid(b_j + sum_i v_i W_ij)
    p(v_i = 1 | h) = sigmoid(a_i + sum_j W_ij h_j)

and, summing the hidden units out, the free energy whose exp(-F) is the unnormalised p(v):

    F(v) = -a'v - sum_j softplus(b_j + v'W_j)

The names follow LAB.md (W, a, b); scikit-learn's BernoulliRBM calls them components_ (W.T),
intercept_visible_ and intercept_hidden_.

DBN (task 2): a stack of RBMs trained greedily, bottom to top. Layer l is an RBM between h_{l-1}
(h_0 = v) and h_l. Its visible bias is h_{l-1}'s bias when the layer generates downwards; its
hidden bias is h_l's bias when the layer recognises upwards. So a correctly trained DBN has two
biases on every inner layer: the lower RBM's hidden bias (up pass, recognition) and the upper RBM's
visible bias (top-level Gibbs steps and generation). Each layer is its own copy.

UpDownDBN (task 3): a two-layer DBN after up-down fine-tuning, its bottom weights untied into
recognition weights R (v -> h1, with h1's recognition bias) and generative weights G (h1 -> v,
with the visible bias); the top RBM keeps tied weights.

Sampling from these models lives in `core.sampling`, training in `core.train`, `core.greedy` and
`core.finetune`, scoring in `core.evaluate`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class RBM:
    """Parameters of a Bernoulli RBM plus the operations every algorithm here is built from."""

    def __init__(self, W: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        if W.dim() != 2 or a.shape != (W.shape[0],) or b.shape != (W.shape[1],):
            raise ValueError(
                f"RBM shapes do not fit: W {tuple(W.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
            )
        self.W, self.a, self.b = W, a, b

    @classmethod
    def init(
        cls,
        n_visible: int,
        n_hidden: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        weight_std: float = 0.01,
        visible_bias: torch.Tensor | None = None,
    ) -> RBM:
        """Small random weights, zero hidden bias, visible bias zero or as given.

        Hinton's practical guide suggests visible biases log(p/(1-p)) of the data's pixel means;
        pass them as `visible_bias` (see `visible_bias_from_means`).
        """
        # draw where the generator lives (a CUDA generator cannot fill a CPU tensor)
        where = generator.device if generator is not None else device
        W = torch.randn(n_visible, n_hidden, generator=generator, dtype=dtype, device=where) * weight_std
        a = torch.zeros(n_visible, dtype=dtype) if visible_bias is None else visible_bias.to(dtype)
        b = torch.zeros(n_hidden, dtype=dtype)
        return cls(W.to(device), a.to(device).clone(), b.to(device))

    @property
    def n_visible(self) -> int:
        return self.W.shape[0]

    @property
    def n_hidden(self) -> int:
        return self.W.shape[1]

    @property
    def device(self) -> torch.device:
        return self.W.device

    def to(self, device: torch.device | str) -> RBM:
        return RBM(self.W.to(device), self.a.to(device), self.b.to(device))

    def clone(self) -> RBM:
        return RBM(self.W.clone(), self.a.clone(), self.b.clone())

    # --- conditionals -------------------------------------------------------------------------
    def p_h(self, v: torch.Tensor) -> torch.Tensor:
        """p(h = 1 | v), one row per row of v."""
        return torch.sigmoid(torch.addmm(self.b, v, self.W))

    def p_v(self, h: torch.Tensor) -> torch.Tensor:
        """p(v = 1 | h), one row per row of h."""
        return torch.sigmoid(torch.addmm(self.a, h, self.W.T))

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) per row; exp(-F(v)) / Z = p(v)."""
        return -(v @ self.a) - F.softplus(torch.addmm(self.b, v, self.W)).sum(dim=1)

    def hidden_free_energy(self, h: torch.Tensor) -> torch.Tensor:
        """F(h) per row, the visible units summed out; exp(-F(h)) / Z = p(h)."""
        return -(h @ self.b) - F.softplus(torch.addmm(self.a, h, self.W.T)).sum(dim=1)


def visible_bias_from_means(means: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """log(p / (1 - p)) of the pixel means, clipped away from 0 and 1: the base-rate bias."""
    p = means.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


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

    def clone(self) -> DBN:
        return DBN([layer.clone() for layer in self.layers])


@dataclass
class UpDownDBN:
    """A two-layer DBN with untied recognition (R, b_rec) and generative (G, a) weights."""

    R: torch.Tensor  # [V, H1] recognition weights, v -> h1
    b_rec: torch.Tensor  # [H1] recognition bias of h1 (the lab file's h1_up)
    G: torch.Tensor  # [H1, V] generative weights, h1 -> v (the lab file's W1_down)
    a: torch.Tensor  # [V] visible bias
    top: RBM  # h1 <-> h2; top.a is h1's bias in the top RBM (h1_down), top.b is h2's

    @classmethod
    def from_dbn(cls, dbn: DBN) -> UpDownDBN:
        if len(dbn.layers) != 2:
            raise ValueError("up-down fine-tuning here is for a DBN of two RBMs")
        bottom = dbn.layers[0]
        return cls(bottom.W.clone(), bottom.b.clone(), bottom.W.T.clone(), bottom.a.clone(), dbn.top.clone())

    def p_h1(self, v: torch.Tensor) -> torch.Tensor:
        """Recognition: Q(h1 = 1 | v)."""
        return torch.sigmoid(torch.addmm(self.b_rec, v, self.R))

    def p_v(self, h1: torch.Tensor) -> torch.Tensor:
        """Generation: p(v = 1 | h1)."""
        return torch.sigmoid(torch.addmm(self.a, h1, self.G))


def mean_activity(layers: list[RBM], data: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    """Mean of p(h|v) of the top of `layers` over the data (mean-field up pass)."""
    total = torch.zeros(layers[-1].n_hidden, device=data.device, dtype=data.dtype)
    for start in range(0, data.shape[0], chunk):
        h = data[start : start + chunk]
        for layer in layers:
            h = layer.p_h(h)
        total += h.sum(dim=0)
    return total / data.shape[0]
