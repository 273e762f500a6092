"""Shared test settings: where MNIST is, and tiny configs that keep the suite in minutes."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def mnist_root() -> str | None:
    root = os.environ.get("MNIST_ROOT") or (str(SHARED_DATA) if SHARED_DATA.exists() else None)
    return root if root and (Path(root) / "MNIST" / "raw").exists() else None


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    root = mnist_root()
    if root is None:
        pytest.skip("MNIST not found: set MNIST_ROOT to a folder holding MNIST/raw")
    return root


# A whole lab run on MNIST in a few seconds: small subset, few epochs, cheap AIS.
TINY = [
    "data.subset=1000",
    "data.val_size=10000",
    "rbm.hidden_size=16",
    "rbm.epochs=2",
    "dbn.hidden_size=12",
    "dbn.epochs=1",
    "finetune.epochs=1",
    "eval.ais_betas=300",
    "eval.ais_chains=16",
    "eval.size=300",
    "eval.raise_images=5",
    "eval.raise_betas=200",
]
