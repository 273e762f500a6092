"""The study's own config keys (search.*, objective.*, resources.*) and the search-space check.

A study config is a lab config (`core.config.LAB_KEYS`, what `rbm-study run` takes) plus the keys
below, so the same YAML runs as one trial or as a study. Everything is validated before Ray or the
database is touched: a bad key or search space must cost the user one line and exit code 2, not a
half-created study.

Search-space entries are keyed by the dotted lab key they vary and take one of these forms:

    rbm.cd_k: [1, 2, 3, 5, 10, 25]                     categorical (shorthand)
    rbm.cd_k: {type: categorical, values: [1, 3, 10]}
    rbm.hidden_size: {type: int, low: 50, high: 500, step: 50}
    rbm.learning_rate: {type: float, low: 0.001, high: 0.3, log: true}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rbm_study.core.config import (
    LAB_KEYS,
    ConfigError,
    Key,
    Schema,
    boolean,
    choice,
    get_dotted,
    integer,
    load_config,
    mapping,
    merge,
    number,
    optional_integer,
    set_dotted,
)

SAMPLERS = ("tpe", "grid", "random")
SCHEDULERS = ("fifo", "asha")
# The final metrics `core.pipeline.run_lab` produces; an objective must be one of them.
_STAGES = ("rbm", "dbn", "finetune")
FINAL_METRICS = frozenset(
    [f"{s}.{split}.{m}" for s in _STAGES for split in ("val", "test")
     for m in ("recon_error", "log_likelihood", "log_likelihood_low", "log_likelihood_high",
               "log_likelihood_stderr")]
    + [f"{s}.test.{m}" for s in _STAGES
       for m in ("log_likelihood_raise", "log_likelihood_raise_stderr", "log_likelihood_raise_gap",
                 "log_likelihood_raise_gap_stderr")]
    + [f"rbm.{split}.pseudo_log_likelihood" for split in ("val", "test")]
    + ["rbm.free_energy_gap"]
    + [f"{s}.{m}" for s in _STAGES for m in ("log_z", "log_z_low", "log_z_high", "log_z_sd", "seconds_per_epoch",
                                             "ais_seconds", "raise_seconds", "curve_seconds")]
    + ["final.val.log_likelihood", "final.test.log_likelihood"]
)


def _metric_names(key: str, value: Any) -> str | list[str]:
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{key} must be a metric name or a list of them, got {value!r}")
    for name in names:
        if name not in FINAL_METRICS:
            raise ConfigError(
                f"{key}: unknown metric {name!r}; use a final metric such as final.val.log_likelihood, "
                "rbm.val.log_likelihood, rbm.val.recon_error"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} names a metric twice: {value!r}")
    return value


def _modes(key: str, value: Any) -> str | list[str]:
    modes = value if isinstance(value, list) else [value]
    if not modes or any(m not in ("max", "min") for m in modes):
        raise ConfigError(f"{key} must be max or min (or a list of them, one per metric), got {value!r}")
    return value


def _optional_seed(key: str, value: Any) -> int | None:
    return None if value is None else integer(0)(key, value)


STUDY_KEYS = Schema(
    {
        "search.num_samples": Key(1, integer(1)),
        "search.space": Key({}, mapping),
        "search.sampler": Key("tpe", choice(*SAMPLERS)),
        "search.seed": Key(None, _optional_seed),
        "search.max_concurrent": Key(None, optional_integer(1)),
        "search.scheduler": Key("fifo", choice(*SCHEDULERS)),
        "search.asha.metric": Key("val_recon_error", lambda k, v: _epoch_metric(k, v)),
        "search.asha.mode": Key("min", choice("max", "min")),
        "search.asha.grace_period": Key(1, integer(1)),
        "search.asha.reduction_factor": Key(3, integer(2)),
        "objective.metric": Key("final.val.log_likelihood", _metric_names),
        "objective.mode": Key("max", _modes),
        "resources.cpus_per_trial": Key(1.0, number(0.0, strict=True)),
        "resources.gpus_per_trial": Key(0.0, number(0.0)),
        "resources.num_cpus": Key(None, optional_integer(1)),
        "resources.max_failures": Key(2, integer(0)),
        "resources.progress": Key(True, boolean),
    }
)
FULL_KEYS = LAB_KEYS.extend(STUDY_KEYS.keys)

# Per-epoch metric names (`core.pipeline`), as each tune.report carries them (see study.trainable).
EPOCH_METRICS = ("train_recon_error", "seconds", "val_recon_error", "val_pseudo_log_likelihood", "free_energy_gap",
                 "val_log_likelihood", "curve_seconds")


def _epoch_metric(key: str, value: Any) -> str:
    stage_names = {f"{s}.{m}" for s in _STAGES for m in EPOCH_METRICS}
    if value not in set(EPOCH_METRICS) | stage_names:
        raise ConfigError(
            f"{key} must be a per-epoch metric ({', '.join(EPOCH_METRICS)}, or stage-prefixed such as "
            f"rbm.val_pseudo_log_likelihood), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Param:
    """One searched dimension, independent of Optuna so it can be checked and stored as JSON."""

    key: str
    kind: str  # int, float, categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: tuple = ()

    def grid_values(self) -> list:
        """The points a grid search visits (categorical values, or every step of an int range)."""
        if self.kind == "categorical":
            return list(self.values)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ConfigError(
            f"search.space.{self.key}: the grid sampler needs a list of values or an int range "
            f"without log, got {self.kind}{' (log)' if self.log else ''}"
        )


_SPACE_FIELDS = {"type", "low", "high", "log", "step", "values"}


def parse_space(space: dict) -> list[Param]:
    """Check every entry against the lab key it varies; ConfigError names the key."""
    params: list[Param] = []
    study_only = set(STUDY_KEYS.keys)
    for key, spec in space.items():
        where = f"search.space.{key}"
        if key in study_only:
            raise ConfigError(f"{where}: study settings cannot be searched; search a lab key such as rbm.cd_k")
        if key not in LAB_KEYS.keys:
            raise ConfigError(f"{where}: unknown config key {key!r}; known keys: {', '.join(LAB_KEYS.keys)}")
        check = LAB_KEYS.keys[key].check
        if isinstance(spec, list):
            spec = {"type": "categorical", "values": spec}
        if not isinstance(spec, dict):
            raise ConfigError(
                f"{where} must be a list of values or a mapping such as {{type: int, low: 1, high: 10}}, "
                f"got {spec!r}"
            )
        unknown = set(spec) - _SPACE_FIELDS
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; use {sorted(_SPACE_FIELDS)}")
        kind = spec.get("type")
        if kind == "categorical":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: categorical needs a non-empty list under values")
            checked = tuple(check(where, v) for v in values)
            if len(set(map(repr, checked))) != len(checked):
                raise ConfigError(f"{where}: values repeat: {values!r}")
            params.append(Param(key, "categorical", values=checked))
        elif kind in ("int", "float"):
            params.append(_range_param(where, key, kind, spec, check))
        else:
            raise ConfigError(f"{where}: type must be int, float or categorical, got {kind!r}")
    return params


def _range_param(where: str, key: str, kind: str, spec: dict, check) -> Param:
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: {kind} needs low and high")
    low, high = spec["low"], spec["high"]
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is None and name == "step":
            continue
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: {name} of an int range must be an integer, got {value!r}")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    if not low <= high:
        raise ConfigError(f"{where}: low must be <= high, got {low} > {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log-scaled range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}: step must be > 0 and cannot be combined with log")
    if kind == "float" and math.isinf(high - low):
        raise ConfigError(f"{where}: range must be finite")
    # Both ends must be values the lab key accepts (an int range for a float key is fine).
    check(where, float(low) if kind == "float" else low)
    check(where, float(high) if kind == "float" else high)
    return Param(key, kind, low=low, high=high, log=log, step=step)


@dataclass(frozen=True)
class StudyConfig:
    """A validated study config and the facts derived from it."""

    config: dict  # the whole nested config (lab + study keys)
    params: list[Param]

    @property
    def num_samples(self) -> int:
        return self.config["search"]["num_samples"]

    @property
    def metrics(self) -> list[str]:
        metric = self.config["objective"]["metric"]
        return metric if isinstance(metric, list) else [metric]

    @property
    def modes(self) -> list[str]:
        mode = self.config["objective"]["mode"]
        return mode if isinstance(mode, list) else [mode] * len(self.metrics)

    def lab_config(self, params: dict[str, Any] | None = None) -> dict:
        """The config one trial runs with: lab keys only, with the trial's searched values set."""
        lab = {section: value for section, value in _copy(self.config).items() if section not in STUDY_SECTIONS}
        for key, value in (params or {}).items():
            set_dotted(lab, key, value)
        return LAB_KEYS.validate(lab)


STUDY_SECTIONS = ("search", "objective", "resources")


def _copy(config: dict) -> dict:
    import copy

    return copy.deepcopy(config)


def check_study_config(config: dict) -> StudyConfig:
    """Cross-key checks that a single key's check cannot do."""
    FULL_KEYS.validate(config)
    params = parse_space(config["search"]["space"])
    metric, mode = config["objective"]["metric"], config["objective"]["mode"]
    metrics = metric if isinstance(metric, list) else [metric]
    if isinstance(mode, list) and len(mode) != len(metrics):
        raise ConfigError(f"objective.mode lists {len(mode)} modes for {len(metrics)} metrics in objective.metric")
    search = config["search"]
    if search["sampler"] == "grid":
        if not params:
            raise ConfigError("search.sampler grid needs a search.space to enumerate")
        size = math.prod(len(p.grid_values()) for p in params)
        if search["num_samples"] > size:
            raise ConfigError(
                f"search.num_samples is {search['num_samples']} but the grid of search.space has only "
                f"{size} points; set search.num_samples <= {size}"
            )
    if search["scheduler"] == "asha" and len(metrics) > 1:
        raise ConfigError("search.scheduler asha works with one objective.metric, not several")
    if config["resources"]["gpus_per_trial"] > 0 and config["device"] == "cpu":
        raise ConfigError("resources.gpus_per_trial > 0 but device is cpu; set device: auto or cuda")
    study = StudyConfig(config, params)
    study.lab_config()  # the fixed part must be a valid lab config on its own
    for p in params:  # and so must every searched value (checked above per key)
        get_dotted(study.config, p.key)
    return study


# Keys added since a study could first be stored, whose defaults would change what an older study
# measures: such a study keeps the value it was planned with (RAISE did not run).
_ADDED_OFF = {"eval.raise_images": 0}


def stored_config(config: dict) -> dict:
    """A study's config as the database holds it, completed for this release: keys added since it
    was stored take their defaults, except `_ADDED_OFF`, which keep the older behaviour."""
    completed = merge(FULL_KEYS.defaults(), _copy(config))
    for key, value in _ADDED_OFF.items():
        try:
            get_dotted(config, key)
        except (KeyError, TypeError):
            set_dotted(completed, key, value)
    return completed


def load_study_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Defaults, YAML, `--set` overrides; validated, search space included."""
    return check_study_config(load_config(path, overrides, FULL_KEYS))
