"""Run configuration: defaults, YAML files, dotted `--set` overrides and validation.

A configuration is a nested dict. Every key a user may write is declared in `LAB_KEYS` (the three
lab tasks; the study service adds its own with `Schema.extend`), with its default and a check.
Unknown keys and invalid values raise `ConfigError` naming the key, which the CLI turns into a
one-line message and exit code 2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rbm_study.core.errors import UserError
from rbm_study.core.evaluate import RAISE_BETAS, RAISE_CHAINS, RAISE_IMAGES


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names the key and how to fix it."""


Check = Callable[[str, Any], Any]


def integer(minimum: int) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {value}")
        return value

    return check


def optional_integer(minimum: int) -> Check:
    inner = integer(minimum)
    return lambda key, value: None if value is None else inner(key, value)


def number(minimum: float, strict: bool = False) -> Check:
    def check(key: str, value: Any) -> float:
        value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if value < minimum or (strict and value == minimum):
            bound = ">" if strict else ">="
            raise ConfigError(f"{key} must be {bound} {minimum}, got {value}")
        return float(value)

    return check


def _yaml11_float(value: Any) -> Any:
    """YAML 1.1 reads '1e-3' (no dot) as a string; users mean the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def fraction(key: str, value: Any) -> float:
    value = number(0.0)(key, value)
    if value >= 1.0:
        raise ConfigError(f"{key} must be in [0, 1), got {value}")
    return value


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def choice(*options: str) -> Check:
    def check(key: str, value: Any) -> str:
        if value not in options:
            raise ConfigError(f"{key} must be one of {', '.join(options)}; got {value!r}")
        return value

    return check


def optional_string(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def mapping(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return value


@dataclass(frozen=True)
class Key:
    default: Any
    check: Check


class Schema:
    """The declared keys (dotted names) with defaults and checks."""

    def __init__(self, keys: dict[str, Key]):
        self.keys = dict(keys)

    def extend(self, keys: dict[str, Key]) -> Schema:
        return Schema({**self.keys, **keys})

    def defaults(self) -> dict:
        config: dict = {}
        for dotted, key in self.keys.items():
            set_dotted(config, dotted, copy.deepcopy(key.default))
        return config

    def validate(self, config: dict) -> dict:
        """Check every leaf against its declaration; returns the config with values normalised."""
        for dotted, value in flatten(config, stop_at=self._mapping_keys()):
            if dotted not in self.keys:
                raise ConfigError(f"unknown config key {dotted!r}; known keys: {', '.join(self.keys)}")
            set_dotted(config, dotted, self.keys[dotted].check(dotted, value))
        return config

    def _mapping_keys(self) -> set[str]:
        return {k for k, v in self.keys.items() if v.check is mapping}



LAB_KEYS = Schema(
    {
        "seed": Key(0, integer(0)),
        "device": Key("auto", choice("auto", "cpu", "cuda")),
        "data.root": Key(None, optional_string),
        "data.subset": Key(None, optional_integer(1)),
        "data.val_size": Key(10_000, integer(1)),
        "rbm.hidden_size": Key(100, integer(1)),
        "rbm.cd_k": Key(1, integer(1)),
        "rbm.persistent": Key(False, boolean),
        "rbm.learning_rate": Key(0.1, number(0.0, strict=True)),
        "rbm.epochs": Key(100, integer(0)),
        "rbm.batch_size": Key(100, integer(1)),
        "rbm.momentum": Key(0.0, fraction),
        "rbm.weight_decay": Key(0.0, number(0.0)),
        "dbn.hidden_size": Key(100, integer(1)),
        "dbn.cd_k": Key(2, integer(1)),
        "dbn.learning_rate": Key(0.1, number(0.0, strict=True)),
        "dbn.epochs": Key(100, integer(0)),
        "finetune.cd_k": Key(2, integer(1)),
        "finetune.learning_rate": Key(0.01, number(0.0, strict=True)),
        "finetune.epochs": Key(100, integer(0)),
        "eval.ais_chains": Key(100, integer(1)),
        "eval.ais_betas": Key(14_500, integer(2)),
        "eval.ais_repeats": Key(1, integer(1)),
        "eval.size": Key(None, optional_integer(1)),
        # RAISE (core.evaluate): the first raise_images test images, raise_chains reverse chains each,
        # the AIS schedule's shape with raise_betas inverse temperatures; raise_images = 0 turns it off
        "eval.raise_images": Key(RAISE_IMAGES, integer(0)),
        "eval.raise_chains": Key(RAISE_CHAINS, integer(1)),
        "eval.raise_betas": Key(RAISE_BETAS, integer(3)),
        # the likelihood curve: a cheap AIS every curve_every epochs of each stage (0 = never), on the
        # first curve_images validation images. On a 784-100 CD-1 RBM, 16 x 5,000 scatters by about 2
        # nats from seed to seed, where 2,000 inverse temperatures were up to 6 nats optimistic
        "eval.curve_every": Key(0, integer(0)),
        "eval.curve_chains": Key(16, integer(1)),
        "eval.curve_betas": Key(5_000, integer(3)),
        "eval.curve_images": Key(1_000, integer(1)),
    }
)


def flatten(config: dict, prefix: str = "", stop_at: set[str] = frozenset()) -> Iterable[tuple[str, Any]]:
    """(dotted key, leaf value) pairs; keys in `stop_at` are leaves even when they hold a dict."""
    for name, value in config.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and dotted not in stop_at:
            yield from flatten(value, f"{dotted}.", stop_at)
        else:
            yield dotted, value


def get_dotted(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
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


def load_config(
    path: str | Path | None, overrides: Iterable[str] = (), schema: Schema = LAB_KEYS
) -> dict:
    """Defaults, then the YAML file, then `--set` overrides; validated against `schema`."""
    config = schema.defaults()
    if path is not None:
        path = config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        config = merge(config, loaded)
    for text in overrides:
        key, value = parse_override(text)
        if key not in schema.keys:
            raise ConfigError(f"unknown config key {key!r} in --set; known keys: {', '.join(schema.keys)}")
        set_dotted(config, key, value)
    return schema.validate(config)
