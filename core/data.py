"""MNIST as tensors: found on disk (or downloaded), loaded once, split, binarised by sampling.

Training never goes through a per-image Dataset or PIL: the images are one [N, 784] float tensor
of grey values in [0, 1] on the chosen device; minibatches are index slices of a binary copy that
is sampled afresh (v = bernoulli(x)) every epoch, so an image is new each time it is used.
Evaluation sets are binarised once, with a fixed seed, so every model is scored on the same
binary vectors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rbm_study.core.errors import UserError
from rbm_study.core.sampling import FastBernoulli, bernoulli

ENV_VAR = "MNIST_ROOT"
DEFAULT_ROOT = Path("data")
EVAL_BINARIZE_SEED = 1234  # the validation images' one binarisation
TEST_BINARIZE_SEED = 4321  # the test images'
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataNotFoundError(UserError, FileNotFoundError):
    """MNIST is neither on disk nor downloadable; the message says where we looked."""


@dataclass
class MNIST:
    """Grey values in [0, 1], one image per row; labels alongside (unused by the models)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    test_labels: torch.Tensor
    root: Path

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        return getattr(self, name)


def resolve_root(root: str | Path | None = None) -> Path:
    """The setting, else $MNIST_ROOT, else ./data."""
    if root is not None:
        return Path(root)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return DEFAULT_ROOT


def has_mnist(root: Path) -> bool:
    """Whether ROOT/MNIST/raw holds the four files (plain or gzipped), torchvision's layout."""
    raw = root / "MNIST" / "raw"
    return all((raw / f).exists() or (raw / f"{f}.gz").exists() for pair in _FILES.values() for f in pair)


def ensure_downloaded(root: Path) -> Path:
    """ROOT/MNIST/raw with the four files; downloads with torchvision when they are missing."""
    raw = root / "MNIST" / "raw"
    if has_mnist(root):
        return raw
    try:
        from torchvision import datasets

        datasets.MNIST(str(root), train=True, download=True)
        datasets.MNIST(str(root), train=False, download=True)
    except Exception as err:  # no network, a proxy, a read-only folder: all end the same way
        raise DataNotFoundError(
            f"MNIST not found in {raw.resolve()} and the download failed ({type(err).__name__}); "
            f"set {ENV_VAR} or data.root to a folder holding MNIST/raw/*-ubyte[.gz] "
            "(torchvision's layout)"
        ) from None
    return raw


def _read_idx(raw: Path, name: str) -> torch.Tensor:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    path = raw / name
    if not path.exists():  # only the .gz is there: unpack it beside (or in memory if read-only)
        import gzip
        import tempfile

        data = gzip.decompress((raw / f"{name}.gz").read_bytes())
        with tempfile.NamedTemporaryFile(suffix=name) as tmp:
            tmp.write(data)
            tmp.flush()
            return (read_image_file if "images" in name else read_label_file)(tmp.name)
    return (read_image_file if "images" in name else read_label_file)(str(path))


def load_mnist(
    root: str | Path | None = None,
    device: torch.device | str = "cpu",
    val_size: int = 10_000,
    subset: int | None = None,
) -> MNIST:
    """Load MNIST once into float tensors on `device`.

    The validation split is the last `val_size` training images. `subset` keeps only the first
    `subset` images of each split (train, val and test alike) for quick runs.
    """
    root = resolve_root(root)
    raw = ensure_downloaded(root)
    images, labels = {}, {}
    for split, (image_file, label_file) in _FILES.items():
        images[split] = _read_idx(raw, image_file).reshape(-1, 784)
        labels[split] = _read_idx(raw, label_file)
    n_train = images["train"].shape[0]
    if not 0 < val_size < n_train:
        raise ValueError(f"data.val_size must be between 1 and {n_train - 1}, got {val_size}")
    cut = n_train - val_size

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x[:subset] if subset else x
        return x.to(device=device, dtype=torch.float32) / 255.0

    def keep(y: torch.Tensor) -> torch.Tensor:
        return (y[:subset] if subset else y).to(device)

    return MNIST(
        train=prepare(images["train"][:cut]),
        val=prepare(images["train"][cut:]),
        test=prepare(images["test"]),
        train_labels=keep(labels["train"][:cut]),
        val_labels=keep(labels["train"][cut:]),
        test_labels=keep(labels["test"]),
        root=root,
    )


def binarize_once(x: torch.Tensor, seed: int = EVAL_BINARIZE_SEED) -> torch.Tensor:
    """The fixed binary version of an evaluation set: same seed, same vectors, every model."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return bernoulli(x, generator)


class Binarizer:
    """A grey-valued dataset (x in [0, 1], one image per row) as fresh binary samples v ~ bernoulli(x).

    `minibatches` gives one epoch: the rows shuffled, every image binarised afresh. A pixel with
    x = 0 or x = 1 comes out the same in every sample, and 82% of MNIST's pixels are one or the
    other; so the binary copy is kept from epoch to epoch and each epoch redraws only the pixels
    strictly between 0 and 1 (18% of MNIST's), in one vectorised pass: 5x fewer random numbers
    than sampling every minibatch whole. Same distribution, same independence between epochs.

    Making one costs a few passes over the data (a fraction of one training epoch)
    and memory for the binary copy (a byte a pixel) and the uncertain pixels' indices and
    probabilities (~0.8x the grey data): make one per training run, not per epoch. Samples come
    from `FastBernoulli` (bias <= 2^-17 per pixel); evaluation sets use `binarize_once`.
    """

    def __init__(self, grey: torch.Tensor):
        self.grey = grey
        flat = grey.reshape(-1)
        # bytes, not floats: each minibatch's rows come from all over the copy, mostly from memory
        # rather than cache, and a byte a pixel is a quarter of the traffic of a float
        self.binary = (grey >= 1).to(torch.uint8)  # the certain ones; x = 0 stays 0
        self.uncertain = torch.nonzero((flat > 0) & (flat < 1)).squeeze(1)  # flat indices
        self.p = flat[self.uncertain]

    @classmethod
    def of(cls, data: torch.Tensor | Binarizer) -> Binarizer:
        """`data` itself if it is a Binarizer already, else a new one of the grey images `data`."""
        return data if isinstance(data, Binarizer) else cls(data)

    def __len__(self) -> int:
        return self.grey.shape[0]

    def minibatches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One epoch of shuffled binary minibatches; the last partial batch is kept."""
        order = torch.randperm(len(self), generator=generator, device=generator.device)
        FastBernoulli(generator).scatter(self.p, self.uncertain, self.binary)  # this epoch's draw
        for rows in order.to(self.binary.device).split(batch_size):
            # index_select: a plain gather of whole rows, without advanced indexing's general path
            yield self.binary.index_select(0, rows).to(self.grey.dtype)


def minibatches(
    data: torch.Tensor | Binarizer, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Shuffled minibatches of `data`, freshly binarised; the last partial batch is kept.

    Grey-valued `data` is wrapped in a `Binarizer` for this one epoch; pass a `Binarizer` made
    once to train for many epochs without paying for its preparation each time.
    """
    return Binarizer.of(data).minibatches(batch_size, generator)
