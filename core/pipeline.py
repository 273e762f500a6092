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

Every log-likelihood comes with its uncertainty (`core.evaluate`, "Uncertainty"):

    {stage}.{split}.log_likelihood[_low|_high]   the estimate and the ends that log Z's interval gives
    {stage}.{split}.log_likelihood_stderr        standard error over the scored images
    {stage}.log_z_sd                             spread of log Z over eval.ais_repeats AIS runs (0 for one)
    {stage}.test.log_likelihood_raise[_stderr]   RAISE on the first eval.raise_images test images
                                                 (the stages in eval.raise_stages)
    {stage}.test.log_likelihood_raise_gap[_stderr]  RAISE minus the forward estimate, image by image,
                                                 on those images (negative: RAISE is the lower one)

For the RBM, RAISE is a stochastic lower bound on its annealed model's log-likelihood; for the DBNs
it bounds the DBN whose top RBM is annealed, with an importance-weighted recognition pass
(`core.evaluate`, "RAISE"), so each stage gets the conservative side beside AIS's. With
eval.curve_every = N > 0 a cheap estimate (AIS with eval.curve_chains x eval.curve_betas, on the
first eval.curve_images validation images; the DBN's bound for the DBN stages) runs after every
N-th epoch of each stage in eval.curve_stages: per-epoch `val_log_likelihood` and `curve_seconds`.
The seconds each estimator took are final metrics too (`{stage}.ais_seconds`, `.raise_seconds`,
`.curve_seconds`), and `{stage}.eval_seconds` is all the stage spent measuring rather than training:
those three, the per-epoch signals and the final scores (log-likelihoods, DBN bounds, reconstructions).
AIS, RAISE and the curves draw from generators of their own, seeded from the run's seed, so their
settings (or turning them off) leave the trained models as they were.

After tasks 1 and 2 the run hands a `LabCheckpoint` to `on_checkpoint`: the finished models, their
metrics and the random generator's state. `run_lab(..., resume_from=checkpoint)` carries on from
there and, on the CPU, ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rbm_study.core import evaluate, labfiles
from rbm_study.core.config import LabConfig
from rbm_study.core.data import MNIST, TEST_BINARIZE_SEED, Binarizer, binarize_once, load_mnist
from rbm_study.core.finetune import fine_tune
from rbm_study.core.greedy import train_dbn_layer
from rbm_study.core.metrics import STAGES
from rbm_study.core.models import DBN, RBM, UpDownDBN, mean_activity, visible_bias_from_means
from rbm_study.core.train import train_rbm

StageEpochCallback = Callable[[str, int, dict[str, float]], None]
EPOCH_EVAL_ROWS = 1000  # rows of the validation set scored after every epoch (cheap signals)
RAISE_SPLITS = ("test",)  # the splits RAISE scores (its first eval.raise_images images of each)
# Seeds of the evaluation's own generators (AIS, RAISE, the likelihood curves), one per stage and
# use: drawing from the training generator would make the trained models depend on eval settings.
_EVAL_SEEDS = {(use, stage): 100 * u + i for u, use in enumerate(("ais", "raise", "curve"), 1)
               for i, stage in enumerate(STAGES)}


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

    def split(self, name: str) -> torch.Tensor:
        return {"val": self.val, "test": self.test}[name]


def run_lab(
    config: LabConfig,
    on_epoch: StageEpochCallback | None = None,
    data: MNIST | None = None,
    progress: bool = False,
    resume_from: LabCheckpoint | None = None,
    on_checkpoint: Callable[[LabCheckpoint], None] | None = None,
) -> LabResult:
    """Run tasks 1-3 with a validated config (`core.config.LabConfig`).

    `resume_from` must come from a run of the same config; stages it holds are not trained again.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    done = STAGES.index(resume_from.stage) + 1 if resume_from is not None else 0
    e = config.eval
    if data is None:
        data = load_mnist(config.data.root, device, config.data.val_size, config.data.subset)
    sets = _EvalSets.build(data, e.size)
    epochs = {"rbm": config.rbm.epochs, "dbn": config.dbn.epochs, "finetune": config.finetune.epochs}
    bar = tqdm(total=sum(epochs.values()), initial=sum(epochs[stage] for stage in STAGES[:done]),
               disable=not progress, unit="epoch", dynamic_ncols=True)
    # the settings behind the estimates travel with them: the numeric ones, as metrics (the rest,
    # such as the stage lists or a size of None, the stored config holds)
    metrics: dict[str, float] = {f"eval.{key}": float(value) for key, value in e if isinstance(value, int | float)}
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

    @contextmanager
    def evaluating(stage: str) -> Iterator[None]:
        """Add the block's seconds to {stage}.eval_seconds: what measuring the stage costs."""
        started = time.perf_counter()
        try:
            yield
        finally:
            key = f"{stage}.eval_seconds"
            metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - started

    def measured(stage: str, measure: Callable[[object], dict[str, float]]) -> Callable[[object], dict[str, float]]:
        """Per-epoch measurements, counted in the stage's evaluation seconds."""
        def timed(model: object) -> dict[str, float]:
            with evaluating(stage):
                return measure(model)

        return timed

    def ais(stage: str, model: RBM, base_bias: torch.Tensor) -> evaluate.LogZEstimate:
        bar.set_postfix_str("estimating log Z")
        started = time.perf_counter()
        estimate = evaluate.log_z(
            model, "auto", base_visible_bias=base_bias, chains=e.ais_chains, betas=e.ais_betas,
            generator=eval_generator("ais", stage), repeats=e.ais_repeats,
        )
        metrics[f"{stage}.ais_seconds"] = time.perf_counter() - started
        return estimate

    def eval_generator(use: str, stage: str, epoch: int = 0) -> torch.Generator:
        seed = (config.seed * 1_000 + _EVAL_SEEDS[use, stage]) * 100_000 + epoch
        return torch.Generator(device=device).manual_seed(seed)

    def reverse_estimates(stage: str, scored: _Scored, run: Callable[..., evaluate.RaiseEstimate]) -> None:
        """RAISE on the first eval.raise_images images of each split in RAISE_SPLITS (timed)."""
        if e.raise_images == 0 or stage not in e.raise_stages:
            return
        bar.set_postfix_str("RAISE")
        started = time.perf_counter()
        g = eval_generator("raise", stage)
        for split in RAISE_SPLITS:
            v = sets.split(split)[: e.raise_images]
            estimate = run(v, chains=e.raise_chains, betas=e.raise_betas, generator=g)
            metrics.update(_finite(_raise_metrics(f"{stage}.{split}", estimate, scored.log_p[split])))
        metrics[f"{stage}.raise_seconds"] = time.perf_counter() - started

    def score(stage: str, scored: Callable[[], _Scored], reverse: Callable[..., evaluate.RaiseEstimate]) -> None:
        """A trained stage's final scores, then RAISE beside them: all of it the stage's evaluation time."""
        with evaluating(stage):
            result = scored()
            metrics.update(_finite(result.metrics))
            reverse_estimates(stage, result, reverse)

    def curve(stage: str, estimate: Callable[[object, torch.Generator], float]) -> Callable[[object], dict[str, float]]:
        """The per-epoch likelihood curve: `estimate(model, generator)` every eval.curve_every epochs."""
        epoch = 0
        metrics[f"{stage}.curve_seconds"] = metrics.get(f"{stage}.curve_seconds", 0.0)

        def measure(model: object) -> dict[str, float]:
            nonlocal epoch
            epoch += 1
            if e.curve_every == 0 or epoch % e.curve_every or stage not in e.curve_stages:
                return {}
            started = time.perf_counter()
            value = estimate(model, eval_generator("curve", stage, epoch))
            seconds = time.perf_counter() - started
            metrics[f"{stage}.curve_seconds"] += seconds
            return {"val_log_likelihood": value, "curve_seconds": seconds}

        return measure

    curve_val = sets.val[: e.curve_images]

    def curve_log_z(model: RBM, base_bias: torch.Tensor, g: torch.Generator) -> evaluate.LogZEstimate:
        return evaluate.log_z(model, "auto", base_visible_bias=base_bias, chains=e.curve_chains,
                              betas=e.curve_betas, generator=g)

    def curve_dbn_bound(model: UpDownDBN, base_bias: torch.Tensor, g: torch.Generator) -> float:
        top_log_z = curve_log_z(model.top, base_bias, g).log_z
        parts = (model.R, model.b_rec, model.G, model.a, model.top)
        return evaluate.dbn_lower_bound(curve_val, *parts, top_log_z=top_log_z, generator=g, exact=False)

    images = Binarizer(data.train)  # one binary copy for the three tasks' training epochs

    # --- task 1: the RBM ----------------------------------------------------------------------
    pixel_bias = visible_bias_from_means(data.train.mean(dim=0))
    if done < 1:
        rbm = RBM.init(784, config.rbm.hidden_size, generator=generator, device=device, visible_bias=pixel_bias)
        rbm_curve = curve("rbm", lambda m, g: evaluate.mean_log_likelihood(m, curve_val, curve_log_z(m, pixel_bias, g)))
        train_rbm(rbm, images, config.rbm.cd_settings(), generator, _timed(report("rbm"), epoch_log["rbm"]),
                  epoch_metrics=measured("rbm", lambda m: {**_rbm_epoch_metrics(m, sets, generator), **rbm_curve(m)}))
        score("rbm", lambda: _score_rbm(rbm, sets, ais("rbm", rbm, pixel_bias), generator),
              lambda v, **kw: evaluate.raise_log_likelihood(rbm, v, pixel_bias, **kw))
        checkpoint("rbm", rbm)
    else:
        rbm = restored("rbm")

    # --- task 2: the DBN ----------------------------------------------------------------------
    h1_bias = visible_bias_from_means(mean_activity([rbm], data.train))
    if done < 2:
        dbn_curve = curve("dbn", lambda top, g: curve_dbn_bound(_untied(DBN([rbm, top])), h1_bias, g))
        dbn_settings = config.dbn.cd_settings(config.rbm.batch_size)
        top = train_dbn_layer([rbm], config.dbn.hidden_size, images, dbn_settings, generator,
                              _timed(report("dbn"), epoch_log["dbn"]), epoch_metrics=measured("dbn", dbn_curve))
        dbn = DBN([rbm.clone(), top])
        score("dbn", lambda: _score_dbn("dbn", _untied(dbn), sets, ais("dbn", dbn.top, h1_bias), generator),
              _dbn_raise(_untied(dbn), h1_bias))
        checkpoint("dbn", dbn)
    else:
        dbn = restored("dbn")

    # --- task 3: up-down fine-tuning -----------------------------------------------------------
    finetuned = None
    if config.finetune.epochs > 0:
        ft_settings = config.finetune.cd_settings(config.rbm.batch_size)
        finetuned = fine_tune(
            dbn, images, ft_settings, generator, _timed(report("finetune"), epoch_log["finetune"]),
            epoch_metrics=measured("finetune", curve("finetune", lambda model, g: curve_dbn_bound(model, h1_bias, g))),
        )
        score("finetune", lambda: _score_dbn("finetune", finetuned, sets, ais("finetune", finetuned.top, h1_bias),
                                             generator),
              _dbn_raise(finetuned, h1_bias))

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


@dataclass
class _Scored:
    """A stage's final metrics, and per split the per-image log p(v) (or its DBN bound) they came from."""

    metrics: dict[str, float]
    log_p: dict[str, torch.Tensor]


def _score_rbm(
    rbm: RBM, sets: _EvalSets, estimate: evaluate.LogZEstimate, generator: torch.Generator
) -> _Scored:
    out = _log_z_metrics("rbm", estimate)
    log_p = {}
    for split, v in (("val", sets.val), ("test", sets.test)):
        scores = evaluate.unnormalised_log_p(rbm, v)
        log_p[split] = scores - estimate.log_z
        out.update(_likelihood_metrics(f"rbm.{split}", scores, estimate))
        out[f"rbm.{split}.recon_error"] = evaluate.reconstruction_error(rbm, v, generator)
        out[f"rbm.{split}.pseudo_log_likelihood"] = evaluate.pseudo_log_likelihood(rbm, v, generator)
    out["rbm.free_energy_gap"] = evaluate.free_energy_gap(rbm, sets.train_sample, sets.val)
    return _Scored(out, log_p)


def _score_dbn(
    stage: str, model: UpDownDBN, sets: _EvalSets, estimate: evaluate.LogZEstimate, generator: torch.Generator
) -> _Scored:
    out = _log_z_metrics(stage, estimate)
    log_p = {}
    parts = (model.R, model.b_rec, model.G, model.a, model.top)
    for split, v in (("val", sets.val), ("test", sets.test)):
        scores = evaluate.dbn_lower_bound_per_image(v, *parts, generator=generator)
        log_p[split] = scores - estimate.log_z
        out.update(_likelihood_metrics(f"{stage}.{split}", scores, estimate))
        out[f"{stage}.{split}.recon_error"] = evaluate.dbn_reconstruction_error(v, *parts, generator=generator)
    return _Scored(out, log_p)


def _likelihood_metrics(prefix: str, scores: torch.Tensor, estimate: evaluate.LogZEstimate) -> dict[str, float]:
    """`prefix`.log_likelihood with its interval from log Z's and its standard error over the images."""
    ll = evaluate.LogLikelihood.from_scores(scores, estimate)
    return {
        f"{prefix}.log_likelihood": ll.mean,
        f"{prefix}.log_likelihood_low": ll.low,
        f"{prefix}.log_likelihood_high": ll.high,
        f"{prefix}.log_likelihood_stderr": ll.stderr,
    }


def _raise_metrics(prefix: str, estimate: evaluate.RaiseEstimate, log_p: torch.Tensor) -> dict[str, float]:
    """RAISE's mean and standard error, and its gap to the forward estimate on the same images.

    The gap is RAISE minus log p(v) from AIS's log Z (or the exact one) image by image, averaged
    over the images RAISE scored; its standard error is that of the paired differences, much
    smaller than either estimate's own (most of an image's score is shared by both).
    """
    difference = estimate.per_image - log_p[: estimate.images].cpu()
    return {
        f"{prefix}.log_likelihood_raise": estimate.log_likelihood,
        f"{prefix}.log_likelihood_raise_stderr": estimate.stderr,
        f"{prefix}.log_likelihood_raise_gap": difference.mean().item(),
        f"{prefix}.log_likelihood_raise_gap_stderr": evaluate.standard_error(difference),
    }


def _dbn_raise(model: UpDownDBN, h1_bias: torch.Tensor) -> Callable[..., evaluate.RaiseEstimate]:
    parts = (model.R, model.b_rec, model.G, model.a, model.top)
    return lambda v, **settings: evaluate.dbn_raise_log_likelihood(v, *parts, h1_bias, **settings)


def _log_z_metrics(stage: str, estimate: evaluate.LogZEstimate) -> dict[str, float]:
    return {
        f"{stage}.log_z": estimate.log_z,
        f"{stage}.log_z_low": estimate.low,
        f"{stage}.log_z_high": estimate.high,
        f"{stage}.log_z_sd": estimate.repeat_sd,
        f"{stage}.log_z_exact": float(estimate.method == "exact"),
    }


def _untied(dbn: DBN) -> UpDownDBN:
    """A task-2 DBN seen as recognition/generative weights: R = W1, G = W1', b_rec = h1_up."""
    return UpDownDBN.from_dbn(dbn)

