"""Run configuration: one typed section per part of the lab, YAML files, dotted `--set` overrides.

A lab config is a `LabConfig`: `seed`, `device` and the sections `data`, `rbm` (task 1), `dbn`
(task 2), `finetune` (task 3) and `eval` (how every model is measured). Each section is a pydantic
model whose fields are the keys a user may write, with their defaults and their bounds, declared
once here and read as attributes by the code that uses them (`config.rbm.cd_k`). A study adds its
own sections (`study.config.StudyConfig`).

Files and overrides are plain nested mappings until `load_config` validates them, once: defaults,
then the YAML file, then `--set key=value` overrides (dotted names, values read as YAML scalars).
Unknown keys and invalid values raise `ConfigError` naming the key, which the CLI turns into a
one-line message and exit code 2. Validation is strict (no "3" for 3, no 1.5 for an integer, no
"yes" for true), except that a number written 1e-3, which YAML 1.1 reads as a string, is a number.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from rbm_study.core.errors import UserError
from rbm_study.core.evaluate import RAISE_BETAS, RAISE_CHAINS, RAISE_IMAGES
from rbm_study.core.metrics import STAGES
from rbm_study.core.train import CDSettings


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names the key and how to fix it."""


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads '1e-3' (no dot) as a string; users mean the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[float, BeforeValidator(_yaml11_float)]


class Section(BaseModel):
    """A config section: known keys only, strict types, immutable once validated."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataConfig(Section):
    root: str | None = None  # MNIST's folder; None: $MNIST_ROOT, else ./data
    subset: int | None = Field(None, ge=1)  # train on the first N training images only
    val_size: int = Field(10_000, ge=1)  # training images held out for validation


class RBMConfig(Section):
    """Task 1: the RBM and how CD-k / PCD-k trains it (Hinton's guide for momentum, weight decay)."""

    hidden_size: int = Field(100, ge=1)
    cd_k: int = Field(1, ge=1)
    persistent: bool = False
    learning_rate: Number = Field(0.1, gt=0)
    epochs: int = Field(100, ge=0)
    batch_size: int = Field(100, ge=1)
    momentum: Number = Field(0.0, ge=0, lt=1)
    weight_decay: Number = Field(0.0, ge=0)

    def cd_settings(self) -> CDSettings:
        return CDSettings(cd_k=self.cd_k, persistent=self.persistent, learning_rate=self.learning_rate,
                          epochs=self.epochs, batch_size=self.batch_size, momentum=self.momentum,
                          weight_decay=self.weight_decay)


class _UpperStage(Section):
    """A stage above the first RBM: CD-k (in the top RBM) at its own rate, the RBM's minibatches."""

    cd_k: int = Field(2, ge=1)
    learning_rate: Number = Field(0.1, gt=0)
    epochs: int = Field(100, ge=0)

    def cd_settings(self, batch_size: int) -> CDSettings:
        return CDSettings(cd_k=self.cd_k, learning_rate=self.learning_rate, epochs=self.epochs, batch_size=batch_size)


class DBNConfig(_UpperStage):
    """Task 2: the top RBM, trained greedily on the first one's hidden samples."""

    hidden_size: int = Field(100, ge=1)


class FinetuneConfig(_UpperStage):
    """Task 3: up-down fine-tuning (0 epochs: skipped); CD-k in the top RBM."""

    learning_rate: Number = Field(0.01, gt=0)


class EvalConfig(Section):
    """How each model is measured (`core.evaluate`; README: "The estimators, validated")."""

    # log Z by AIS: ais_repeats runs of ais_chains chains, side by side, pooled; the full schedule
    # of Salakhutdinov & Murray (2008) is 100 chains x 14,500 inverse temperatures
    ais_chains: int = Field(100, ge=1)
    ais_betas: int = Field(14_500, ge=2)
    ais_repeats: int = Field(1, ge=1)
    size: int | None = Field(None, ge=1)  # score the first N validation and test images (None: all)
    # RAISE: the first raise_images test images, raise_chains reverse chains each, the AIS schedule's
    # shape with raise_betas inverse temperatures; raise_images = 0 turns it off
    raise_images: int = Field(RAISE_IMAGES, ge=0)
    raise_chains: int = Field(RAISE_CHAINS, ge=1)
    raise_betas: int = Field(RAISE_BETAS, ge=3)
    # the models RAISE scores: the RBM, and the greedy and fine-tuned DBNs (there it anneals the top
    # RBM back from h1 ~ Q(h1 | v)); a stage left out has only AIS's side, and the report says so
    raise_stages: list[Literal[STAGES]] = Field(default_factory=lambda: list(STAGES))  # names from core.metrics
    # the likelihood curve: a cheap AIS every curve_every epochs of each stage (0 = never), on the
    # first curve_images validation images. On a 784-100 CD-1 RBM, 16 x 5,000 scatters by about 2
    # nats from seed to seed, where 2,000 inverse temperatures were up to 6 nats optimistic
    curve_every: int = Field(0, ge=0)
    curve_chains: int = Field(16, ge=1)
    curve_betas: int = Field(5_000, ge=3)
    curve_images: int = Field(1_000, ge=1)
    # the stages whose curve is drawn (the DBN stages' is their bound, with AIS on the top RBM)
    curve_stages: list[Literal[STAGES]] = Field(default_factory=lambda: list(STAGES))


class LabConfig(Section):
    """What `rbm-study run` takes and one trial of a study runs: the three lab tasks."""

    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    rbm: RBMConfig = RBMConfig()
    dbn: DBNConfig = DBNConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict:
        """The nested mapping a file would hold (what a study database stores)."""
        return self.model_dump(mode="json")

    def with_values(self, values: dict[str, Any]) -> LabConfig:
        """A copy with dotted keys set (`{"rbm.cd_k": 3}`), validated again."""
        return validate(type(self), _with_dotted(self.to_dict(), values))


Config = TypeVar("Config", bound=Section)


def keys(model: type[Section]) -> list[str]:
    """Every dotted key a user may write in a config of type `model`."""
    found = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, Section):
            found += [f"{name}.{key}" for key in keys(kind)]
        else:
            found.append(name)
    return found


def validate(model: type[Config], mapping: Any) -> Config:
    """`mapping` as a `model`, or `ConfigError` naming the first wrong key in one line."""
    try:
        return model.model_validate(mapping)
    except ValidationError as err:
        raise ConfigError(_one_line(model, err)) from None


def _one_line(model: type[Section], err: ValidationError) -> str:
    first = err.errors()[0]
    dotted = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        section = dotted.rpartition(".")[0]
        known = [k for k in keys(model) if k.startswith(f"{section}.")] if section else keys(model)
        return f"unknown config key {dotted!r}; known keys{f' of {section}' if section else ''}: {', '.join(known)}"
    message = first["msg"][0].lower() + first["msg"][1:]
    return f"config key {dotted}: {message}, got {first.get('input')!r}"


def check_value(model: type[Section], dotted: str, value: Any, where: str | None = None) -> Any:
    """`value` as `model` reads it at the dotted key (e.g. a searched value), or ConfigError."""
    if dotted not in keys(model):
        raise ConfigError(f"unknown config key {dotted!r}; known keys: {', '.join(keys(model))}")
    try:
        checked = model.model_validate(_with_dotted({}, {dotted: value}))
    except ValidationError as err:
        if where is None:
            raise ConfigError(_one_line(model, err)) from None
        raise ConfigError(f"{where}: {_one_line(model, err)}") from None
    return get_dotted(checked.model_dump(), dotted)


def _with_dotted(mapping: dict, values: dict[str, Any]) -> dict:
    out = copy.deepcopy(mapping)
    for dotted, value in values.items():
        set_dotted(out, dotted, value)
    return out


_REQUIRED = object()


def get_dotted(config: dict, dotted: str, default: Any = _REQUIRED) -> Any:
    """config["a"]["b"] for "a.b"; `default` where a part is missing (KeyError without one)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _REQUIRED:
                raise KeyError(dotted)
            return default
        node = node[part]
    return node


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def merge(base: dict, update: dict) -> dict:
    """Deep merge of `update` into a copy of `base`."""
    out = copy.deepcopy(base)
    for name, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = merge(out[name], value)
        else:
            out[name] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'rbm.cd_k=3' -> ('rbm.cd_k', 3); values are read as YAML scalars (3, 0.1, true, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key=value, e.g. rbm.cd_k=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def bundled_configs() -> dict[str, Path]:
    """The configs that ship inside the package (`rbm_study.configs`), by name: lab, quick, ..."""
    from importlib.resources import files

    folder = files("rbm_study.configs")
    return {Path(item.name).stem: Path(str(item)) for item in folder.iterdir() if item.name.endswith(".yaml")}


def config_path(name: str | Path) -> Path:
    """A config file: an existing path as given, else a bundled config by name (`quick`, `lab.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = bundled_configs()
    if path.parent == Path(".") and path.stem in bundled and path.suffix in ("", ".yaml"):
        return bundled[path.stem]
    raise ConfigError(
        f"config file {path} does not exist; pass a YAML file or a bundled config: {', '.join(sorted(bundled))}"
    )


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping (a bundled config by name, or a path), or ConfigError."""
    path = config_path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def load_config(
    path: str | Path | None, overrides: Iterable[str] = (), model: type[Config] = LabConfig
) -> Config:
    """The YAML file (None: the defaults alone), then `--set` overrides; validated as `model`."""
    mapping = read_yaml(path) if path is not None else {}
    known = keys(model)
    for text in overrides:
        key, value = parse_override(text)
        if key not in known:
            raise ConfigError(f"unknown config key {key!r} in --set; known keys: {', '.join(known)}")
        set_dotted(mapping, key, value)
    return validate(model, mapping)
