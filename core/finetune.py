"""Generative fine-tuning of a two-layer DBN with the up-down algorithm (contrastive wake-sleep).

Hinton, Osindero and Teh (2006), "A fast learning algorithm for deep belief nets", appendix B;
LAB.md task 3. The weights below the top RBM are untied into recognition weights R (v -> h1, with
the recognition bias of h1) and generative weights G (h1 -> v, with the visible bias), both
starting from the first RBM's W. The top RBM (h1 <-> h2) keeps tied weights. Per minibatch v:

    wake:   h1 ~ sigmoid(v R + b_rec);  pv = sigmoid(h1 G + a)
            dG = h1' (v - pv) / N,   da = mean(v - pv)
    top:    CD-k in the top RBM started from the wake h1 (updates exactly as in task 1);
            its last negative-phase state h1_neg starts the sleep pass
    sleep:  v_s ~ sigmoid(h1_neg G + a);  ph1 = sigmoid(v_s R + b_rec)
            dR = v_s' (h1_neg - ph1) / N,   db_rec = mean(h1_neg - ph1)

All three parts use the parameters as they were at the start of the minibatch.
"""

from __future__ import annotations

import time

import torch

from rbm_study.core.data import Binarizer, minibatches
from rbm_study.core.models import DBN, UpDownDBN
from rbm_study.core.sampling import FastBernoulli
from rbm_study.core.threads import AdaptiveThreads
from rbm_study.core.train import CDSettings, CDTrainer, EpochCallback


def up_down_epoch(
    model: UpDownDBN,
    data: torch.Tensor | Binarizer,
    settings: CDSettings,
    generator: torch.Generator,
    threads: AdaptiveThreads | None = None,
) -> dict[str, float]:
    """One epoch of up-down over grey-valued `data` (or its `Binarizer`); updates `model` in place.

    Wake and sleep states are drawn with the training sampler (`FastBernoulli`), like the CD chain.
    On the CPU the steps run on torch's thread count or on one thread, whichever `threads` finds
    faster now (`AdaptiveThreads`: a busy neighbour core stalls every multi-threaded step).
    """
    start = time.perf_counter()
    sample = FastBernoulli(generator)
    lr = settings.learning_rate
    top_trainer = CDTrainer(model.top, CDSettings(cd_k=settings.cd_k, learning_rate=lr), generator)
    wake_errors: list[torch.Tensor] = []
    sleep_errors: list[torch.Tensor] = []
    threads = AdaptiveThreads() if threads is None else threads
    with threads.running(enabled=model.G.device.type == "cpu") as chosen:
        for v in minibatches(data, settings.batch_size, generator):
            _up_down_step(model, v, top_trainer, sample, lr, wake_errors, sleep_errors)
            chosen.step()
    batches = max(len(wake_errors), 1)
    if not all(torch.isfinite(t).all() for t in (model.R, model.G, model.top.W)):
        raise FloatingPointError("fine-tuning diverged: weights hold NaN or inf (lower finetune.learning_rate)")
    return {
        "train_recon_error": float(torch.stack(wake_errors).sum()) / batches,
        "sleep_recognition_error": float(torch.stack(sleep_errors).sum()) / batches,
        "seconds": time.perf_counter() - start,
    }


def _up_down_step(
    model: UpDownDBN,
    v: torch.Tensor,
    top_trainer: CDTrainer,
    sample: FastBernoulli,
    lr: float,
    wake_errors: list[torch.Tensor],
    sleep_errors: list[torch.Tensor],
) -> None:
    """One minibatch v of up-down: wake, top-level CD-k, sleep, then the four updates."""
    n = v.shape[0]
    # wake: recognise, then see how well the generative weights predict the data
    h1 = sample(model.p_h1(v))
    wake_diff = v - model.p_v(h1)
    grad_G = h1.T @ wake_diff
    grad_a = wake_diff.sum(dim=0)

    # top: CD-k from the wake state; the top RBM's own update touches nothing used below
    top_trainer.update(h1)
    h1_neg = top_trainer.last_negative

    # sleep: dream from the generative model, see how well recognition inverts the dream
    v_s = sample(model.p_v(h1_neg))
    sleep_diff = h1_neg - model.p_h1(v_s)
    grad_R = v_s.T @ sleep_diff
    grad_b_rec = sleep_diff.sum(dim=0)

    model.G.add_(grad_G, alpha=lr / n)
    model.a.add_(grad_a, alpha=lr / n)
    model.R.add_(grad_R, alpha=lr / n)
    model.b_rec.add_(grad_b_rec, alpha=lr / n)

    wake_errors.append(wake_diff.square().sum() / n)  # 0-dim tensors: no host sync per step (CUDA)
    sleep_errors.append(sleep_diff.square().sum() / n)


def fine_tune(
    dbn: DBN,
    data: torch.Tensor | Binarizer,
    settings: CDSettings,
    generator: torch.Generator,
    on_epoch: EpochCallback | None = None,
    epoch_metrics=None,
) -> UpDownDBN:
    """Untie a two-layer DBN and fine-tune it with up-down for `settings.epochs` epochs.

    `data` is the grey-valued images, or their `Binarizer` (to share one across the lab's tasks).
    """
    model = UpDownDBN.from_dbn(dbn)
    images = Binarizer.of(data)  # made once: each epoch redraws only its uncertain pixels
    threads = AdaptiveThreads()  # one across epochs: what it measured stays valid
    for epoch in range(1, settings.epochs + 1):
        metrics = up_down_epoch(model, images, settings, generator, threads)
        if epoch_metrics is not None:
            metrics.update(epoch_metrics(model))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return model
