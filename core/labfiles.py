"""The lab's weight files: `torch.save` of a dict of tensors, keys and shapes as in LAB.md.

    zad1_rbm.th     rbm_w [784,H], rbm_v [784], rbm_h [H]
    zad2_dbn.th     W1 [784,H1], v1 [784], h1 [H1], W2 [H1,H2], h2 [H2], h1_up [H1]
    zad3_dbn_ft.th  R1 [784,H1], W1_down [H1,784], v1 [784], h1_up [H1], h1_down [H1],
                    W2 [H1,H2], h2 [H2]

In zad2, `h1` is the top RBM's visible bias (used by top-level Gibbs and generation) and `h1_up`
the first RBM's hidden bias (used by the up pass). A student's zad2 file lacks `h1_up`; its code
used `h1` for both roles, so we do too. Files are read with `weights_only=True`.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from rbm_study.core.errors import UserError
from rbm_study.core.models import DBN, RBM, UpDownDBN

FILE_NAMES = {"rbm": "zad1_rbm.th", "dbn": "zad2_dbn.th", "finetune": "zad3_dbn_ft.th"}
Model = RBM | DBN | UpDownDBN


class LabFileError(UserError, ValueError):
    """The file is not one of the lab's three weight formats."""


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def state_of(model: Model) -> dict[str, torch.Tensor]:
    """The lab-format dict of a model (tensors on the CPU, float32)."""
    if isinstance(model, RBM):
        return {"rbm_w": _cpu(model.W), "rbm_v": _cpu(model.a), "rbm_h": _cpu(model.b)}
    if isinstance(model, DBN):
        if len(model.layers) != 2:
            raise LabFileError("the lab's zad2 format holds a DBN of exactly two RBMs")
        bottom, top = model.layers
        return {
            "W1": _cpu(bottom.W),
            "v1": _cpu(bottom.a),
            "h1": _cpu(top.a),
            "W2": _cpu(top.W),
            "h2": _cpu(top.b),
            "h1_up": _cpu(bottom.b),
        }
    if isinstance(model, UpDownDBN):
        return {
            "R1": _cpu(model.R),
            "W1_down": _cpu(model.G),
            "v1": _cpu(model.a),
            "h1_up": _cpu(model.b_rec),
            "h1_down": _cpu(model.top.a),
            "W2": _cpu(model.top.W),
            "h2": _cpu(model.top.b),
        }
    raise TypeError(f"no lab format for {type(model).__name__}")


def kind_of_state(state: dict) -> str:
    """'rbm', 'dbn' or 'finetune' from the keys; LabFileError if none fits."""
    keys = set(state)
    if {"rbm_w", "rbm_v", "rbm_h"} <= keys:
        return "rbm"
    if {"R1", "W1_down", "v1", "h1_up", "h1_down", "W2", "h2"} <= keys:
        return "finetune"
    if {"W1", "v1", "h1", "W2", "h2"} <= keys:
        return "dbn"
    raise LabFileError(
        f"keys {sorted(keys)} match none of the lab formats "
        "(zad1: rbm_w, rbm_v, rbm_h; zad2: W1, v1, h1, W2, h2; zad3: R1, W1_down, v1, h1_up, h1_down, W2, h2)"
    )


def model_from_state(state: dict, device: torch.device | str = "cpu") -> Model:
    """Rebuild the model a lab-format dict describes, checking the shapes."""
    def t(key: str) -> torch.Tensor:
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise LabFileError(f"{key} is a {type(value).__name__}, not a tensor")
        return value.to(device=device, dtype=torch.float32).clone()

    kind = kind_of_state(state)
    try:
        if kind == "rbm":
            return RBM(t("rbm_w"), t("rbm_v"), t("rbm_h"))
        top = RBM(t("W2"), t("h1_down") if kind == "finetune" else t("h1"), t("h2"))
        if kind == "dbn":
            h1_up = t("h1_up") if "h1_up" in state else t("h1")  # a student's file: one bias, both roles
            return DBN([RBM(t("W1"), t("v1"), h1_up), top])
        model = UpDownDBN(t("R1"), t("h1_up"), t("W1_down"), t("v1"), top)
        if model.G.shape != model.R.T.shape or model.a.shape[0] != model.R.shape[0]:
            raise ValueError(f"R1 {tuple(model.R.shape)} and W1_down {tuple(model.G.shape)} do not fit")
        return model
    except ValueError as err:
        raise LabFileError(f"{kind} file with inconsistent shapes: {err}") from None


def save(model: Model, path: str | Path) -> Path:
    path = Path(path)
    torch.save(state_of(model), path)
    return path


def to_bytes(model: Model) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_of(model), buffer)
    return buffer.getvalue()


def load_state(source: str | Path | bytes) -> dict:
    """The dict in a lab file (path or bytes), read with weights_only=True."""
    name = "data" if isinstance(source, bytes) else str(source)
    stream = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    try:
        state = torch.load(stream, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise LabFileError(f"{name} is not a lab weight file: {_load_failure(source, err)}") from None
    if not isinstance(state, dict):
        raise LabFileError(f"a lab file holds a dict of tensors, this one a {type(state).__name__}")
    return state


def _load_failure(source: str | Path | bytes, err: Exception) -> str:
    """Why torch.load refused a file, in words. Its own message for a weights-only refusal opens
    with advice to load with weights_only=False (running whatever code the file holds), which is
    not ours to give; the reason is the line after "WeightsUnpickler error:"."""
    if isinstance(err, IsADirectoryError):
        return "it is a folder"
    try:
        if isinstance(source, bytes):
            head = source[:4]
        else:
            with Path(source).open("rb") as file:
                head = file.read(4)
    except OSError as unreadable:
        return unreadable.strerror or type(unreadable).__name__
    if head != b"PK\x03\x04":
        return "torch.save writes a zip archive and this is not one"
    text = str(err)
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1].strip()
        return after.split(". ")[0].splitlines()[0] if after else "refused by weights_only"
    return text.splitlines()[0] if text else type(err).__name__


def load(source: str | Path | bytes, device: torch.device | str = "cpu") -> Model:
    """Read any of the three lab files into its model."""
    return model_from_state(load_state(source), device)
