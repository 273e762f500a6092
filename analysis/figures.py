"""The lab's figures (LAB.md, tasks 1-3) drawn from one trial's weight files.

    task 1   W as a grid of 28x28 tiles; reconstructions of the first 10 test digits (original,
             p(v=1|h), hidden state); samples after n Gibbs steps from random hidden states
    task 2   W2 as tiles of the h1 layout beside W1; reconstructions beside task 1's; samples
    task 3   R1, G1 and |R1 - G1|; reconstructions of tasks 1-3 side by side; samples

Tiles are laid out with `tile()` (numpy), each figure is one matplotlib figure saved as PNG (Agg),
and every function returns a `FigureFile` that records the file and the tile grid it drew, so a
test (or a reader) can check that the weights figure of a 100-unit RBM really is a 10x10 grid.
Random hidden states come from a fixed seed, so figures of different trials are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from rbm_study.core import sampling
from rbm_study.core.models import DBN, RBM, UpDownDBN

GIBBS_STEPS = 1000  # Gibbs rounds before a sample is shown (the handout used 50 for the RBM, 1000 for the DBN)
SAMPLE_SEED = 2024  # the random hidden states every sample figure starts from
RECON_SEED = 7  # the sampling inside reconstructions
N_DIGITS = 10  # first test digits reconstructed
N_CHAINS = 10  # sample chains per kind of start state
START_ACTIVE = 0.1  # fraction of hidden units on in a random start state (the handout's 10%)
DPI = 100
PAD_COLOUR = "#b9cfe3"  # between tiles and in the unused cells of a layer drawn as a grid


@dataclass
class FigureFile:
    """A PNG written by this module and what it shows."""

    path: Path
    title: str
    caption: str = ""
    grids: list[tuple[int, int]] = field(default_factory=list)  # (rows, cols) of each tile mosaic
    tile_shapes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


# --- layout helpers ------------------------------------------------------------------------------
def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the most square grid that holds n tiles: 100 -> (10, 10), 17 -> (4, 5)."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def unit_shape(n_units: int) -> tuple[int, int]:
    """Image shape of a layer of n units: 784 -> 28x28, 100 -> 10x10, else the grid_shape (padded)."""
    return grid_shape(n_units)


def as_images(vectors: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[n, d] -> [n, rows, cols], padding each vector with NaN (drawn blank) to fill the shape."""
    n, d = vectors.shape
    size = shape[0] * shape[1]
    if d > size:
        raise ValueError(f"{d} values do not fit a {shape} image")
    padded = np.full((n, size), np.nan, dtype=np.float64)
    padded[:, :d] = vectors
    return padded.reshape(n, *shape)


def tile(
    images: np.ndarray, grid: tuple[int, int] | None = None, pad: int = 1, scale_each: bool = False
) -> np.ndarray:
    """Mosaic of [n, h, w] images on a grid with `pad` NaN pixels between tiles.

    `scale_each` maps each tile to [0, 1] by its own min and max (weights: the shape of the filter
    matters, not its size); otherwise values are left alone.
    """
    n, h, w = images.shape
    rows, cols = grid if grid is not None else grid_shape(n)
    if rows * cols < n:
        raise ValueError(f"{n} tiles do not fit a {rows}x{cols} grid")
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), np.nan)
    for index in range(n):
        image = images[index].astype(np.float64)
        if scale_each:
            low, high = np.nanmin(image), np.nanmax(image)
            image = (image - low) / (high - low) if high > low else np.zeros_like(image)
        r, c = divmod(index, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        out[top : top + h, left : left + w] = image
    return out


def _upscale(images: np.ndarray, size: int = 28) -> np.ndarray:
    """Nearest-neighbour resize of [n, h, w] images to [n, size, size] (a 10x10 state to 28x28 px)."""
    _, h, w = images.shape
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    return images[:, rows][:, :, cols]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _cmap(name: str = "gray") -> matplotlib.colors.Colormap:
    return plt.get_cmap(name).with_extremes(bad=PAD_COLOUR)


def save(fig: plt.Figure, path: Path) -> None:
    """Every figure of the report is written the same way: white, tight, at DPI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)


# --- generic figures -----------------------------------------------------------------------------
def weights_panels(
    panels: list[tuple[str, np.ndarray, tuple[int, int], bool]], title: str, path: Path, caption: str = ""
) -> FigureFile:
    """Side-by-side mosaics; each panel (subtitle, [d, n] columns as tiles, tile shape, scale_each)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 6.8), squeeze=False)
    grids, shapes = [], []
    for ax, (subtitle, columns, shape, scale_each) in zip(axes[0], panels, strict=True):
        images = as_images(columns.T, shape)
        grid = grid_shape(images.shape[0])
        mosaic = tile(images, grid, scale_each=scale_each)
        shown = ax.imshow(mosaic, cmap=_cmap(), interpolation="nearest")
        if not scale_each:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(subtitle, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{images.shape[0]} units in a {grid[0]}x{grid[1]} grid, tiles {shape[0]}x{shape[1]}")
        grids.append(grid)
        shapes.append(shape)
    fig.suptitle(title, fontsize=13)
    save(fig, path)
    return FigureFile(path, title, caption, grids, shapes)


def image_rows(
    rows: list[tuple],
    title: str,
    path: Path,
    caption: str = "",
    column_label: str = "test digit",
) -> FigureFile:
    """One strip of images per row: (row label, [n, d] values in [0, 1], image shape[, first column
    number]). Values outside a layer's units (a 17-unit layer drawn 4x5) are drawn in PAD_COLOUR."""
    n = max(row[1].shape[0] for row in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.0 * n + 1.6, 1.2 * len(rows) + 0.8), squeeze=False)
    grids, shapes = [], []
    for ax, (label, values, shape, *first) in zip(axes[:, 0], rows, strict=True):
        first_number = first[0] if first else 1
        images = _upscale(as_images(values, shape))  # small layers drawn as big as a digit
        mosaic = tile(images, (1, images.shape[0]), pad=2)
        ax.imshow(mosaic, cmap=_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
        width = mosaic.shape[1] / images.shape[0]
        ax.set_xticks([(i + 0.5) * width for i in range(images.shape[0])])
        ax.set_xticklabels([str(i + first_number) for i in range(images.shape[0])], fontsize=7)
        grids.append((1, images.shape[0]))
        shapes.append(shape)
    axes[-1, 0].set_xlabel(column_label)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    save(fig, path)
    return FigureFile(path, title, caption, grids, shapes)


# --- the models' operations ----------------------------------------------------------------------
def start_states(n_hidden: int, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """2*N_CHAINS hidden states: N_CHAINS with one unit on (spread over the layer), N_CHAINS random
    with START_ACTIVE of the units on. The same seed gives the same states for the same layer size."""
    generator = torch.Generator().manual_seed(seed)
    single = torch.zeros(N_CHAINS, n_hidden)
    for i in range(N_CHAINS):
        single[i, (i * n_hidden) // N_CHAINS] = 1.0
    random = sampling.bernoulli(torch.full((N_CHAINS, n_hidden), START_ACTIVE), generator)
    return torch.cat([single, random])


def sample(model: RBM | DBN | UpDownDBN, steps: int = GIBBS_STEPS, seed: int = SAMPLE_SEED) -> dict:
    """Visible probabilities after `steps` Gibbs rounds from `start_states` of the model's top hidden layer."""
    top = model if isinstance(model, RBM) else model.top
    start = start_states(top.n_hidden, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        pv, final = sampling.generate(model, start, steps, generator)
    return {"start": _numpy(start), "final": _numpy(final), "pv": _numpy(pv)}


def reconstruct(model: RBM | DBN | UpDownDBN, v: torch.Tensor, seed: int = RECON_SEED) -> dict:
    """p(v=1|...) for binary v, and the hidden state it came through (RBM: h; DBNs: the top state)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pv, h_top = sampling.reconstruct(model, v, 1, generator)
    return {"pv": _numpy(pv), "hidden": _numpy(h_top)}


def sample_sharpness(pv: np.ndarray) -> float:
    """Mean binary entropy (nats) of the shown pixel probabilities: 0 for crisp, 0.69 for grey mush."""
    p = np.clip(pv, 1e-7, 1 - 1e-7)
    return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))


def sample_diversity(pv: np.ndarray) -> float:
    """Mean Euclidean distance between the shown samples (pixel probabilities): low means the chains
    collapsed onto the same picture."""
    n = pv.shape[0]
    if n < 2:
        return float("nan")
    diffs = pv[:, None, :] - pv[None, :, :]
    distances = np.sqrt((diffs**2).sum(-1))
    return float(distances[np.triu_indices(n, 1)].mean())


# --- the lab's figures for one trial -------------------------------------------------------------
def lab_figures(
    models: dict[str, RBM | DBN | UpDownDBN],
    out: Path,
    prefix: str,
    label: str,
    test_grey: torch.Tensor | None,
    test_binary: torch.Tensor | None,
    samples: dict[str, dict] | None = None,
) -> list[FigureFile]:
    """All figures of tasks 1-3 that the available models allow; `label` names the trial in titles.
    `samples` (stage -> `sample(model)`) saves the Gibbs chains when they were already run."""
    files: list[FigureFile] = []
    rbm, dbn, ft = models.get("rbm"), models.get("dbn"), models.get("finetune")
    recon: dict[str, dict] = {}
    if test_binary is not None:
        for stage, model in models.items():
            recon[stage] = reconstruct(model, test_binary)
    samples = samples if samples is not None else {stage: sample(model) for stage, model in models.items()}
    digits = _numpy(test_grey) if test_grey is not None else None

    if rbm is not None:
        h = rbm.n_hidden
        files.append(weights_panels(
            [(f"W: {rbm.n_visible}x{h}, column j as a 28x28 tile", _numpy(rbm.W), (28, 28), True)],
            f"Task 1 ({label}): RBM weights, one tile per hidden unit",
            out / f"{prefix}task1_weights.png",
            "Each tile is one hidden unit's weights to the 784 pixels, scaled to its own range "
            "(white = most positive).",
        ))
        if digits is not None:
            files.append(image_rows(
                [("original\n(grey)", digits, (28, 28)),
                 ("binary input\nv ~ x", _numpy(test_binary), (28, 28)),
                 ("reconstruction\np(v=1|h)", recon["rbm"]["pv"], (28, 28)),
                 (f"hidden state h\n({h} units)", recon["rbm"]["hidden"], unit_shape(h))],
                f"Task 1 ({label}): reconstructions of the first {N_DIGITS} test digits",
                out / f"{prefix}task1_reconstructions.png",
                "The input is the grey digit binarised once with a fixed seed; h ~ p(h|v); the "
                "reconstruction is shown as probabilities p(v=1|h), not as a binary sample.",
            ))
        files.append(_samples_figure(
            [("RBM (task 1)", samples["rbm"], unit_shape(h))],
            f"Task 1 ({label}): samples after {GIBBS_STEPS} Gibbs steps from random hidden states",
            out / f"{prefix}task1_samples.png",
        ))

    if dbn is not None:
        bottom, top = dbn.layers
        h1, h2 = top.n_visible, top.n_hidden
        files.append(weights_panels(
            [(f"task 1: W1 ({bottom.n_visible}x{h1}), 28x28 tiles", _numpy(bottom.W), (28, 28), True),
             (f"task 2: W2 ({h1}x{h2}), tiles in the h1 layout", _numpy(top.W), unit_shape(h1), True),
             ("W1·W2: each top unit seen in pixel space", _numpy(bottom.W @ top.W), (28, 28), True)],
            f"Task 2 ({label}): second-layer weights beside the first layer's",
            out / f"{prefix}task2_weights.png",
            "Middle: each tile is one top unit's weights to the h1 units, laid out like the task-1 "
            "hidden state. Right: W1 times W2, a linear picture of what each top unit responds to.",
        ))
        if digits is not None and rbm is not None:
            files.append(image_rows(
                [("original", digits, (28, 28)),
                 ("task 1 RBM\np(v=1|h)", recon["rbm"]["pv"], (28, 28)),
                 ("task 2 DBN\np(v=1|h1)", recon["dbn"]["pv"], (28, 28)),
                 (f"top state h2\n({h2} units)", recon["dbn"]["hidden"], unit_shape(h2))],
                f"Task 2 ({label}): DBN reconstructions beside the RBM's",
                out / f"{prefix}task2_reconstructions.png",
                "DBN: up pass to h1, h2 ~ p(h2|h1), one Gibbs step in the top RBM, down pass.",
            ))
        rows = [("DBN (task 2)", samples["dbn"], unit_shape(h2))]
        if rbm is not None:
            rows.insert(0, ("RBM (task 1)", samples["rbm"], unit_shape(rbm.n_hidden)))
        files.append(_samples_figure(
            rows, f"Task 2 ({label}): DBN samples beside the RBM's ({GIBBS_STEPS} Gibbs steps)",
            out / f"{prefix}task2_samples.png",
        ))

    if ft is not None:
        R, G = _numpy(ft.R), _numpy(ft.G).T
        h1, h2 = ft.top.n_visible, ft.top.n_hidden
        files.append(weights_panels(
            [(f"R1: recognition ({R.shape[0]}x{h1})", R, (28, 28), True),
             (f"G1: generative (W1_down transposed, {R.shape[0]}x{h1})", G, (28, 28), True),
             ("|R1 - G1|, one scale for all tiles", np.abs(R - G), (28, 28), False)],
            f"Task 3 ({label}): weights after up-down fine-tuning",
            out / f"{prefix}task3_weights.png",
            "R1 and G1 both start from W1; the right panel shows how far fine-tuning moved them apart "
            "(shared colour scale, so a dark panel means little change).",
        ))
        if digits is not None and rbm is not None and dbn is not None:
            files.append(image_rows(
                [("original", digits, (28, 28)),
                 ("task 1 RBM", recon["rbm"]["pv"], (28, 28)),
                 ("task 2 DBN", recon["dbn"]["pv"], (28, 28)),
                 ("task 3 fine-tuned", recon["finetune"]["pv"], (28, 28)),
                 (f"task 3 top state\n({h2} units)", recon["finetune"]["hidden"], unit_shape(h2))],
                f"Task 3 ({label}): reconstructions of tasks 1-3 side by side",
                out / f"{prefix}task3_reconstructions.png",
                "All shown as probabilities p(v=1|...); task 3 goes up with R1 and down with G1.",
            ))
        rows = [(name, samples[stage], unit_shape(m.n_hidden if isinstance(m, RBM) else m.top.n_hidden))
                for stage, name, m in (("rbm", "RBM (task 1)", rbm), ("dbn", "DBN (task 2)", dbn),
                                       ("finetune", "fine-tuned DBN (task 3)", ft)) if m is not None]
        files.append(_samples_figure(
            rows, f"Task 3 ({label}): samples of tasks 1-3 ({GIBBS_STEPS} Gibbs steps, same start states)",
            out / f"{prefix}task3_samples.png",
        ))
    return files


def _samples_figure(
    models: list[tuple[str, dict, tuple[int, int]]], title: str, path: Path, show_states: bool = True
) -> FigureFile:
    """Rows of samples: for each model the chains started from one unit on, then from 10% on."""
    rows: list[tuple] = []
    groups = (("one unit on", slice(0, N_CHAINS), 1),
              (f"{START_ACTIVE:.0%} on", slice(N_CHAINS, 2 * N_CHAINS), N_CHAINS + 1))
    for name, s, shape in models:
        for start_label, part, first in groups:
            if show_states and len(models) == 1:
                rows.append((f"start state\n({start_label})", s["start"][part], shape, first))
                rows.append(("final hidden\nstate", s["final"][part], shape, first))
                rows.append(("p(v=1|h)", s["pv"][part], (28, 28), first))
            else:
                rows.append((f"{name}\nstart: {start_label}", s["pv"][part], (28, 28), first))
    caption = (
        f"Chains 1-{N_CHAINS} start with a single hidden unit on, chains {N_CHAINS + 1}-{2 * N_CHAINS} "
        f"with {START_ACTIVE:.0%} of the units on at random (seed {SAMPLE_SEED}, the same in every figure); "
        f"after {GIBBS_STEPS} Gibbs steps the visible probabilities p(v=1|h) are shown."
    )
    return image_rows(rows, title, path, caption, column_label="chain")
