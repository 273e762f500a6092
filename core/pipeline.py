"""The three lab tasks end to end: train the RBM, stack the DBN, fine-tune it, measure each.

This is one trial of a study and the whole of `rbm-study run`:

    task 1   RBM 784-H trained with CD-k / PCD-k on freshly binarised minibatches
    task 2   a second RBM on samples of the first one's hidden units (greedy DBN)
    task 3   the DBN untied and fine-tuned with up-down (skipped when finetune.epochs = 0)

After each stage the model is scored on the validation and test sets, binarised once with a fixed
seed: log-likelihood (exact when a layer is small, else AIS) or the DBN's variational lower bound,
reconstruction error, pseudo-log-likelihood and the free-energy gap. Final metrics are one flat
dict with dotted names (`rbm.val.log_likelihood`, `final.test.log_likelihood`, ...); per-epoch
metrics go to `on_epoch(stage, epoch, metrics)` as they happen.

After tasks 1 and 2 the run hands a `LabCheckpoint` to `on_checkpoint`: the finished models, their
metrics and the random generator's state. `run_lab(..., resume_from=checkpoint)` carries on from
there and, on the CPU, ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rbm_study.core import evaluate, labfiles
from rbm_study.core.data import MNIST, TEST_BINARIZE_SEED, Binarizer, binarize_once, load_mnist
from rbm_study.core.dbn import DBN, mean_activity, train_dbn_layer
from rbm_study.core.finetune import UpDownDBN, fine_tune
from rbm_study.core.rbm import RBM, visible_bias_from_means
from rbm_study.core.train import CDSettings, train_rbm
from tqdm.auto import tqdm

STAGES = ("rbm", "dbn", "finetune")
StageEpochCallback = Callable[[str, int, dict[str, float]], None]
EPOCH_EVAL_ROWS = 1000  # rows of the validation set scored after every epoch (cheap signals)


@dataclass
class LabCheckpoint:
    """A run after a finished stage: enough to carry on as if it had never stopped."""

    stage: str  # the last finished stage, "rbm" or "dbn"
    models: dict[str, dict[str, torch.Tensor]]  # stage -> lab-format tensors (core.labfiles)
    metrics: dict[str, float]
    epoch_seconds: dict[str, list[float]]
    generator_state: torch.Tensor

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {"stage": self.stage, "models": self.models, "metrics": self.metrics,
             "epoch_seconds": self.epoch_seconds, "generator_state": self.generator_state},
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LabCheckpoint:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return cls(**state)


@dataclass
class LabResult:
    rbm: RBM
    dbn: DBN
    finetuned: UpDownDBN | None
    metrics: dict[str, float]
    seconds: float

    def models(self) -> dict[str, labfiles.Model]:
        found = {"rbm": self.rbm, "dbn": self.dbn, "finetune": self.finetuned}
        return {stage: model for stage, model in found.items() if model is not None}

    def weight_files(self) -> dict[str, bytes]:
        """The lab's weight files as bytes, by file name."""
        return {labfiles.FILE_NAMES[stage]: labfiles.to_bytes(m) for stage, m in self.models().items()}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from rbm_study.core.errors import UserError

        raise UserError("device cuda asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


@dataclass
class _EvalSets:
    """The binary vectors every model is scored on, and what AIS needs from the training data."""

    train: torch.Tensor  # grey values
    val: torch.Tensor  # binary, fixed
    test: torch.Tensor  # binary, fixed
    train_sample: torch.Tensor  # binary, fixed, as many rows as val: for the free-energy gap

    @classmethod
    def build(cls, data: MNIST, size: int | None) -> _EvalSets:
        val, test = data.val[:size], data.test[:size]
        return cls(
            train=data.train,
            val=binarize_once(val),
            test=binarize_once(test, seed=TEST_BINARIZE_SEED),
            train_sample=binarize_once(data.train[: val.shape[0]], seed=2468),
        )


def run_lab(
    config: dict,
    on_epoch: StageEpochCallback | None = None,
    data: MNIST | None = None,
    progress: bool = False,
    resume_from: LabCheckpoint | None = None,
    on_checkpoint: Callable[[LabCheckpoint], None] | None = None,
) -> LabResult:
    """Run tasks 1-3 with a validated config (see `core.config.LAB_KEYS`).

    `resume_from` must come from a run of the same config; stages it holds are not trained again.
    """
    started = time.perf_counter()
    device = resolve_device(config["device"])
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    done = STAGES.index(resume_from.stage) + 1 if resume_from is not None else 0
    d, r, s, f, e = (config[k] for k in ("data", "rbm", "dbn", "finetune", "eval"))
    if data is None:
        data = load_mnist(d["root"], device, d["val_size"], d["subset"])
    sets = _EvalSets.build(data, e["size"])
    epochs = {"rbm": r["epochs"], "dbn": s["epochs"], "finetune": f["epochs"]}
    bar = tqdm(total=sum(epochs.values()), initial=sum(epochs[stage] for stage in STAGES[:done]),
               disable=not progress, unit="epoch", dynamic_ncols=True)
    metrics: dict[str, float] = {"eval.ais_chains": e["ais_chains"], "eval.ais_betas": e["ais_betas"]}
    epoch_log: dict[str, list[float]] = {stage: [] for stage in STAGES}
    models: dict[str, dict[str, torch.Tensor]] = {}
    if resume_from is not None:
        generator.set_state(resume_from.generator_state.to(generator.get_state().device))
        metrics.update(resume_from.metrics)
        epoch_log.update({stage: list(s) for stage, s in resume_from.epoch_seconds.items()})
        models.update(resume_from.models)

    def checkpoint(stage: str, model: labfiles.Model) -> None:
        models[stage] = labfiles.state_of(model)
        if on_checkpoint is not None:
            on_checkpoint(LabCheckpoint(stage, dict(models), dict(metrics),
                                        {k: list(v) for k, v in epoch_log.items()}, generator.get_state()))

    def restored(stage: str) -> labfiles.Model:
        return labfiles.model_from_state(models[stage], device)

    def report(stage: str) -> Callable[[int, dict[str, float]], None]:
        def callback(epoch: int, values: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix_str(f"{stage} {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
            if on_epoch is not None:
                on_epoch(stage, epoch, values)

        return callback

    def ais(model: RBM, base_bias: torch.Tensor) -> evaluate.LogZEstimate:
        bar.set_postfix_str("estimating log Z")
        return evaluate.log_z(
            model, "auto", base_visible_bias=base_bias, chains=e["ais_chains"], betas=e["ais_betas"],
            generator=generator,
        )

    images = Binarizer(data.train)  # one binary copy for the three tasks' training epochs

    # --- task 1: the RBM ----------------------------------------------------------------------
    pixel_bias = visible_bias_from_means(data.train.mean(dim=0))
    if done < 1:
        rbm = RBM.init(784, r["hidden_size"], generator=generator, device=device, visible_bias=pixel_bias)
        rbm_settings = CDSettings(
            cd_k=r["cd_k"], persistent=r["persistent"], learning_rate=r["learning_rate"], epochs=r["epochs"],
            batch_size=r["batch_size"], momentum=r["momentum"], weight_decay=r["weight_decay"],
        )
        train_rbm(rbm, images, rbm_settings, generator, _timed(report("rbm"), epoch_log["rbm"]),
                  epoch_metrics=lambda m: _rbm_epoch_metrics(m, sets, generator))
        metrics.update(_finite(_score_rbm(rbm, sets, ais(rbm, pixel_bias), generator)))
        checkpoint("rbm", rbm)
    else:
        rbm = restored("rbm")

    # --- task 2: the DBN ----------------------------------------------------------------------
    h1_bias = visible_bias_from_means(mean_activity([rbm], data.train))
    if done < 2:
        dbn_settings = CDSettings(
            cd_k=s["cd_k"], learning_rate=s["learning_rate"], epochs=s["epochs"], batch_size=r["batch_size"]
        )
        top = train_dbn_layer([rbm], s["hidden_size"], images, dbn_settings, generator,
                              _timed(report("dbn"), epoch_log["dbn"]))
        dbn = DBN([rbm.clone(), top])
        top_estimate = ais(dbn.top, h1_bias)
        metrics.update(_finite(_score_dbn("dbn", _untied(dbn), sets, top_estimate, generator)))
        checkpoint("dbn", dbn)
    else:
        dbn = restored("dbn")

    # --- task 3: up-down fine-tuning -----------------------------------------------------------
    finetuned = None
    if f["epochs"] > 0:
        ft_settings = CDSettings(
            cd_k=f["cd_k"], learning_rate=f["learning_rate"], epochs=f["epochs"], batch_size=r["batch_size"]
        )
        finetuned = fine_tune(
            dbn, images, ft_settings, generator, _timed(report("finetune"), epoch_log["finetune"])
        )
        ft_estimate = ais(finetuned.top, h1_bias)
        metrics.update(_finite(_score_dbn("finetune", finetuned, sets, ft_estimate, generator)))

    for stage, seconds in epoch_log.items():
        if seconds:
            metrics[f"{stage}.seconds_per_epoch"] = statistics.median(seconds)
    last = "finetune" if finetuned is not None else "dbn"
    for split in ("val", "test"):
        metrics[f"final.{split}.log_likelihood"] = metrics[f"{last}.{split}.log_likelihood"]
    bar.close()
    return LabResult(rbm, dbn, finetuned, metrics, time.perf_counter() - started)


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """Weights can explode and stay finite (sigmoids saturate); their log Z then is not a number."""
    broken = [name for name, value in metrics.items() if math.isnan(value)]
    if broken:
        raise FloatingPointError(
            f"training diverged: {', '.join(broken[:3])} {'is' if len(broken) == 1 else 'are'} NaN "
            "(the weights exploded; lower the learning rate)"
        )
    return metrics


def _timed(callback: Callable[[int, dict[str, float]], None], seconds: list[float]):
    """Remember each epoch's training seconds for the stage's median."""
    def wrapped(epoch: int, values: dict[str, float]) -> None:
        seconds.append(values["seconds"])
        callback(epoch, values)

    return wrapped


def _rbm_epoch_metrics(rbm: RBM, sets: _EvalSets, generator: torch.Generator) -> dict[str, float]:
    val = sets.val[:EPOCH_EVAL_ROWS]
    return {
        "val_recon_error": evaluate.reconstruction_error(rbm, val, generator),
        "val_pseudo_log_likelihood": evaluate.pseudo_log_likelihood(rbm, val, generator),
        "free_energy_gap": evaluate.free_energy_gap(rbm, sets.train_sample[:EPOCH_EVAL_ROWS], val),
    }


def _score_rbm(
    rbm: RBM, sets: _EvalSets, estimate: evaluate.LogZEstimate, generator: torch.Generator
) -> dict[str, float]:
    out = _log_z_metrics("rbm", estimate)
    for split, v in (("val", sets.val), ("test", sets.test)):
        out[f"rbm.{split}.log_likelihood"] = evaluate.mean_log_likelihood(rbm, v, estimate.log_z)
        out[f"rbm.{split}.recon_error"] = evaluate.reconstruction_error(rbm, v, generator)
        out[f"rbm.{split}.pseudo_log_likelihood"] = evaluate.pseudo_log_likelihood(rbm, v, generator)
    out["rbm.free_energy_gap"] = evaluate.free_energy_gap(rbm, sets.train_sample, sets.val)
    return out


def _score_dbn(
    stage: str, model: UpDownDBN, sets: _EvalSets, estimate: evaluate.LogZEstimate, generator: torch.Generator
) -> dict[str, float]:
    out = _log_z_metrics(stage, estimate)
    parts = (model.R, model.b_rec, model.G, model.a, model.top)
    for split, v in (("val", sets.val), ("test", sets.test)):
        out[f"{stage}.{split}.log_likelihood"] = evaluate.dbn_lower_bound(
            v, *parts, top_log_z=estimate.log_z, generator=generator
        )
        out[f"{stage}.{split}.recon_error"] = evaluate.dbn_reconstruction_error(v, *parts, generator=generator)
    return out


def _log_z_metrics(stage: str, estimate: evaluate.LogZEstimate) -> dict[str, float]:
    return {
        f"{stage}.log_z": estimate.log_z,
        f"{stage}.log_z_low": estimate.low,
        f"{stage}.log_z_high": estimate.high,
        f"{stage}.log_z_exact": float(estimate.method == "exact"),
    }


def _untied(dbn: DBN) -> UpDownDBN:
    """A task-2 DBN seen as recognition/generative weights: R = W1, G = W1', b_rec = h1_up."""
    return UpDownDBN.from_dbn(dbn)

