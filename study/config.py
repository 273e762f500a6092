"""A study's config: a lab config (`core.config.LabConfig`, what `rbm-study run` takes) plus the
sections `search`, `objective` and `resources`, so the same YAML runs as one trial or as a study.

Everything is validated before Ray or the database is touched: a bad key or search space must cost
the user one line and exit code 2, not a half-created study.

Search-space entries are keyed by the dotted lab key they vary and take one of these forms:

    rbm.cd_k: [1, 2, 3, 5, 10, 25]                     categorical (shorthand)
    rbm.cd_k: {type: categorical, values: [1, 3, 10]}
    rbm.hidden_size: {type: int, low: 50, high: 500, step: 50}
    rbm.learning_rate: {type: float, low: 0.001, high: 0.3, log: true}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from rbm_study.core.config import (
    ConfigError,
    LabConfig,
    Number,
    Section,
    check_value,
    get_dotted,
    keys,
    load_config,
    merge,
    set_dotted,
    validate,
)
from rbm_study.core.metrics import EPOCH_METRICS, FINAL_METRICS, STAGES

STUDY_SECTIONS = ("search", "objective", "resources")


def _final_metrics(value: str | list[str]) -> str | list[str]:
    names = value if isinstance(value, list) else [value]
    if not names:
        raise ValueError("objective.metric must be a metric name or a list of them, got []")
    for name in names:
        if name not in FINAL_METRICS:
            raise ValueError(
                f"objective.metric: unknown metric {name!r}; use a final metric such as final.val.log_likelihood, "
                "rbm.val.log_likelihood, rbm.val.recon_error"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"objective.metric names a metric twice: {value!r}")
    return value


def _epoch_metric(value: str) -> str:
    stage_names = {f"{s}.{m}" for s in STAGES for m in EPOCH_METRICS}
    if value not in set(EPOCH_METRICS) | stage_names:
        raise ValueError(
            f"search.asha.metric must be a per-epoch metric ({', '.join(EPOCH_METRICS)}, or stage-prefixed "
            f"such as rbm.val_pseudo_log_likelihood), got {value!r}"
        )
    return value


Mode = Literal["max", "min"]


class AshaConfig(Section):
    """ASHA's early stopping, on a per-epoch metric (time: the epoch across stages)."""

    metric: Annotated[str, AfterValidator(_epoch_metric)] = "val_recon_error"
    mode: Mode = "min"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)


class SearchConfig(Section):
    num_samples: int = Field(1, ge=1)  # trials in the study
    space: dict[str, Any] = Field(default_factory=dict)  # dotted lab key -> values (module docstring)
    sampler: Literal["tpe", "grid", "random"] = "tpe"
    seed: int | None = Field(None, ge=0)  # the sampler's seed
    max_concurrent: int | None = Field(None, ge=1)  # None: as many trials as the cluster fits
    scheduler: Literal["fifo", "asha"] = "fifo"
    asha: AshaConfig = AshaConfig()


class ObjectiveConfig(Section):
    metric: Annotated[str | list[str], AfterValidator(_final_metrics)] = "final.val.log_likelihood"
    mode: Mode | list[Mode] = "max"  # one, or one per metric

    @property
    def metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    @property
    def modes(self) -> list[str]:
        return self.mode if isinstance(self.mode, list) else [self.mode] * len(self.metrics)


class ResourcesConfig(Section):
    cpus_per_trial: Number = Field(1.0, gt=0)
    gpus_per_trial: Number = Field(0.0, ge=0)
    num_cpus: int | None = Field(None, ge=1)  # local Ray's CPUs (None: the machine's)
    max_failures: int = Field(2, ge=0)  # retries of a failed trial
    progress: bool = True  # the live status line


class StudyConfig(LabConfig):
    """A study: the lab tasks' settings, what to search, what to optimise, what each trial gets."""

    search: SearchConfig = SearchConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @property
    def params(self) -> list[Param]:
        return parse_space(self.search.space)

    @property
    def num_samples(self) -> int:
        return self.search.num_samples

    @property
    def metrics(self) -> list[str]:
        return self.objective.metrics

    @property
    def modes(self) -> list[str]:
        return self.objective.modes

    def lab_config(self, params: dict[str, Any] | None = None) -> LabConfig:
        """The config one trial runs with: the lab sections, with the trial's searched values set."""
        lab = {section: value for section, value in self.to_dict().items() if section not in STUDY_SECTIONS}
        for key, value in (params or {}).items():
            set_dotted(lab, key, value)
        return validate(LabConfig, lab)


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
    lab_keys = keys(LabConfig)
    for key, spec in space.items():
        where = f"search.space.{key}"
        if key in keys(StudyConfig) and key not in lab_keys:
            raise ConfigError(f"{where}: study settings cannot be searched; search a lab key such as rbm.cd_k")
        if key not in lab_keys:
            raise ConfigError(f"{where}: unknown config key {key!r}; known keys: {', '.join(lab_keys)}")

        def check(where: str, value: Any, key: str = key) -> Any:
            return check_value(LabConfig, key, value, where)

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


def check_study_config(study: StudyConfig) -> StudyConfig:
    """Cross-key checks that a single key's check cannot do; ConfigError names the keys."""
    params = study.params
    metrics, mode = study.metrics, study.objective.mode
    if isinstance(mode, list) and len(mode) != len(metrics):
        raise ConfigError(f"objective.mode lists {len(mode)} modes for {len(metrics)} metrics in objective.metric")
    search = study.search
    if search.sampler == "grid":
        if not params:
            raise ConfigError("search.sampler grid needs a search.space to enumerate")
        size = math.prod(len(p.grid_values()) for p in params)
        if search.num_samples > size:
            raise ConfigError(
                f"search.num_samples is {search.num_samples} but the grid of search.space has only "
                f"{size} points; set search.num_samples <= {size}"
            )
    if search.scheduler == "asha" and len(metrics) > 1:
        raise ConfigError("search.scheduler asha works with one objective.metric, not several")
    if study.resources.gpus_per_trial > 0 and study.device == "cpu":
        raise ConfigError("resources.gpus_per_trial > 0 but device is cpu; set device: auto or cuda")
    return study


# Keys added since a study could first be stored, whose defaults would change what an older study
# measures: such a study keeps the value it was planned with (RAISE did not run).
_ADDED_OFF = {"eval.raise_images": 0}
_ABSENT = object()


def stored_config(config: dict) -> StudyConfig:
    """A study's config as the database holds it, read by this release: keys added since it was
    stored take their defaults, except `_ADDED_OFF`, which keep the older behaviour."""
    completed = merge({}, config)
    for key, value in _ADDED_OFF.items():
        if get_dotted(config, key, _ABSENT) is _ABSENT:
            set_dotted(completed, key, value)
    return check_study_config(validate(StudyConfig, completed))


def load_study_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """The YAML file, then `--set` overrides; validated, search space and cross-key checks included."""
    return check_study_config(load_config(path, overrides, StudyConfig))
