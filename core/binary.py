"""Products with a CD step's binary visible states as sums of rows (CPU).

A CD step multiplies by binary visible states v twice forward and twice in the weight update:

    v W        row n is the sum of the rows i of W where v[n, i] = 1
    v' P       row i is the sum of the rows n of P where v[n, i] = 1

and on MNIST those states are mostly zeros (about 13% of the data's pixels are on, and so are
about as many of a trained model's reconstructions). Summing only the rows the ones pick does
a fraction of a dense product's work; torch's `embedding_bag` (sum mode) computes exactly such
sums of rows, in vectorised kernels, from lists of row numbers. `core.kernels` makes the lists:
where each row's ones are (`ones_by_row`), and, for the weight update, which rows each column's
ones pick from the stacked [P0; Pk] with weights +scale and -scale (`outer_bags`), so that

    dW = scale (v0' P0 - vk' Pk)

is one call, with the hidden bias's step as one more row. Each bag is summed in a fixed order by
one thread, so the same states give the same bits on any number of threads. Dense states (a DBN's
upper layers train on hidden samples, often half ones) take the dense products instead:
`BinaryProducts.locate` says which. `python -m tests.bench` times the trainer with this path and
without (its "torch only" contender has neither the compiled sampler nor this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rbm_study.core import kernels

MAX_DENSITY = 0.2
"""The largest fraction of ones for which sums of rows replace a dense product: about where, on
one thread, listing the ones and summing their rows costs what the dense products do (on two
threads the dense products win a little sooner; MNIST's states, near 13% ones, are well below)."""


class BinaryProducts:
    """The buffers of one CD step's sums of rows, for minibatches of `n` rows.

    Two slots hold where the ones of two binary [n, V] matrices are: 0 for the data v0, 1 for
    the chain's latest visible sample vk.
    """

    def __init__(self, n: int, n_visible: int, dtype: torch.dtype):
        size = n * n_visible
        self.n = n
        # 32-bit positions: half the memory traffic of 64-bit ones, and embedding_bag takes either
        index = torch.int32 if 2 * size < 2**31 else torch.int64
        self.columns = [torch.empty(size, dtype=index) for _ in range(2)]
        self.starts = [torch.empty(n + 1, dtype=index) for _ in range(2)]
        self.count = [0, 0]  # the ones in each slot's matrix
        self.rows = torch.empty(2 * size + 2 * n, dtype=index)  # the update's bags
        self.weights = torch.empty(2 * size + 2 * n, dtype=dtype)
        self.bag_starts = torch.empty(n_visible + 2, dtype=index)
        self.visible_step = torch.empty(n_visible, dtype=dtype)  # scale (v0 - vk) summed over rows
        # numpy views made once: they share the buffers' memory, and a call's conversions cost
        # about as much as the kernels' work on a minibatch
        self._np = {
            "columns": [c.numpy() for c in self.columns],
            "starts": [s.numpy() for s in self.starts],
            "rows": self.rows.numpy(),
            "weights": self.weights.numpy(),
            "bag_starts": self.bag_starts.numpy(),
            "visible_step": self.visible_step.numpy(),
        }

    def locate(self, slot: int, v: torch.Tensor) -> bool:
        """Find the ones of binary v [n, V] into `slot`; whether v is sparse enough for sums of rows."""
        limit = int(MAX_DENSITY * v.numel())
        count = kernels.ones_by_row(v.contiguous().numpy(), self._np["columns"][slot], self._np["starts"][slot], limit)
        self.count[slot] = count
        return count <= limit

    def times(self, slot: int, W: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = bias + v W for the v last located in `slot`."""
        sums = F.embedding_bag(
            self.columns[slot][: self.count[slot]], W, self.starts[slot], mode="sum", include_last_offset=True
        )
        return torch.add(sums, bias, out=out)

    def outer(self, P: torch.Tensor, scale: float) -> torch.Tensor:
        """The update's [V + 1, H] terms for the v0 and vk in slots 0 and 1, and P = [P0; Pk]:

            rows :V   scale (v0' P0 - vk' Pk)     the weights' step
            row  V    scale (1' P0 - 1' Pk)       the hidden bias's (a visible unit always on)

        and, into `visible_step`, scale (1' v0 - 1' vk), the visible bias's.
        """
        np_ = self._np
        kernels.outer_bags(
            np_["columns"][0], np_["starts"][0], np_["columns"][1], np_["starts"][1], scale,
            np_["rows"], np_["weights"], np_["bag_starts"], np_["visible_step"],
        )
        terms = self.count[0] + self.count[1] + 2 * self.n
        return F.embedding_bag(
            self.rows[:terms], P, self.bag_starts, mode="sum", per_sample_weights=self.weights[:terms],
            include_last_offset=True,
        )
