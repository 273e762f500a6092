"""rbm-study: RBMs and DBNs on MNIST, and hyperparameter studies of them on Ray.

The repository's folders install under this one name (see pyproject.toml):

    rbm_study.core       models, sampling, training, evaluation, the lab pipeline, lab weight files
    rbm_study.study      studies: Ray Tune runs the trials Optuna proposes; one database
    rbm_study.analysis   figures and the k-comparison report, read from a study database
    rbm_study.cli        the `rbm-study` command line

The names in `__all__` are the public Python API, for notebooks (README: "Python API"). They are
imported on first use, so `import rbm_study` (and the command line's `--help`) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    # models
    "RBM": "rbm_study.core.models",
    "DBN": "rbm_study.core.models",
    "UpDownDBN": "rbm_study.core.models",
    # data
    "load_mnist": "rbm_study.core.data",
    "binarize_once": "rbm_study.core.data",
    "TEST_BINARIZE_SEED": "rbm_study.core.data",
    "visible_bias_from_means": "rbm_study.core.models",
    # training
    "CDSettings": "rbm_study.core.train",
    "train_rbm": "rbm_study.core.train",
    "train_dbn_layer": "rbm_study.core.greedy",
    "fine_tune": "rbm_study.core.finetune",
    # evaluation
    "log_z": "rbm_study.core.evaluate",
    "exact_log_z": "rbm_study.core.evaluate",
    "ais_log_z": "rbm_study.core.evaluate",
    "mean_log_likelihood": "rbm_study.core.evaluate",
    "dbn_lower_bound": "rbm_study.core.evaluate",
    # the lab's weight files
    "save_lab_file": "rbm_study.core.labfiles",
    "load_lab_file": "rbm_study.core.labfiles",
    # the three lab tasks in one call
    "run_lab": "rbm_study.core.pipeline",
}
_RENAMED = {"save_lab_file": "save", "load_lab_file": "load"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'rbm_study' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
