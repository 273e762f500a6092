"""The names a run of the three lab tasks produces: its stages and its metrics, declared once.

`core.pipeline` writes them, the study checks objectives and schedulers against them, the analysis
reads them. Final metrics are dotted `{stage}.{split}.{name}` or `{stage}.{name}`; per-epoch metrics
are plain names reported with their stage (`core.pipeline`'s docstring says what each one means).
"""

from __future__ import annotations

STAGES = ("rbm", "dbn", "finetune")
STAGE_TITLES = {"rbm": "RBM", "dbn": "greedy DBN", "finetune": "fine-tuned DBN"}
SPLITS = ("val", "test")

EPOCH_METRICS = ("train_recon_error", "seconds", "val_recon_error", "val_pseudo_log_likelihood",
                 "free_energy_gap", "val_log_likelihood", "curve_seconds", "sleep_recognition_error")
CURVE_METRIC = "val_log_likelihood"  # the likelihood curve (eval.curve_every)

_PER_SPLIT = ("recon_error", "log_likelihood", "log_likelihood_low", "log_likelihood_high", "log_likelihood_stderr")
_RAISE = ("log_likelihood_raise", "log_likelihood_raise_stderr", "log_likelihood_raise_gap",
          "log_likelihood_raise_gap_stderr")
_PER_STAGE = ("log_z", "log_z_low", "log_z_high", "log_z_sd", "seconds_per_epoch", "ais_seconds", "raise_seconds",
              "curve_seconds", "eval_seconds")
FINAL_METRICS = frozenset(
    [f"{stage}.{split}.{name}" for stage in STAGES for split in SPLITS for name in _PER_SPLIT]
    + [f"{stage}.test.{name}" for stage in STAGES for name in _RAISE]
    + [f"rbm.{split}.pseudo_log_likelihood" for split in SPLITS]
    + ["rbm.free_energy_gap"]
    + [f"{stage}.{name}" for stage in STAGES for name in _PER_STAGE]
    + [f"final.{split}.log_likelihood" for split in SPLITS]
)
"""Every final metric a run can report (`final.*` is the last stage's, fine-tuned or greedy)."""
