"""The package's layers import only downward (README: "Layout").

Every `import` and `from ... import` of an `rbm_study` module, at the top of a module or inside a
function, is checked against the table below: a module may import its own layer's modules and
those of the layers it lists, nothing else. A new module must be placed in the table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rbm_study

LAYERS: dict[str, tuple[set[str], set[str]]] = {
    # layer: (its modules, the layers below it that it may import)
    "base": ({"core", "core.errors", "core.kernels", "core.threads", "configs"}, set()),
    "models": ({"core.models"}, {"base"}),
    "sampling": ({"core.sampling"}, {"base", "models"}),
    "data": ({"core.data"}, {"base", "models", "sampling"}),
    "training": ({"core.cpu_cd", "core.train", "core.greedy", "core.finetune"}, {"base", "models", "sampling", "data"}),
    "evaluation": ({"core.evaluate"}, {"base", "models", "sampling"}),
    "lab": (
        {"core.labfiles", "core.config", "core.metrics", "core.pipeline", "core.commands"},
        {"base", "models", "sampling", "data", "training", "evaluation"},
    ),
    "study": ({"study"}, {"base", "models", "sampling", "data", "training", "evaluation", "lab"}),
    "analysis": ({"analysis"}, {"base", "models", "sampling", "data", "training", "evaluation", "lab", "study"}),
    "cli": ({"", "cli", "__main__"}, {"base", "models", "sampling", "data", "training", "evaluation", "lab",
                                      "study", "analysis"}),
}

PACKAGE = Path(rbm_study.__file__).parent  # the installed rbm_study (an editable install maps the folders)


def layer_of(module: str) -> str:
    """The layer of a module named relative to rbm_study ("core.train", "study.storage", "cli")."""
    for layer, (members, _) in LAYERS.items():
        for member in members:
            if module == member or (member in ("study", "analysis", "configs") and module.startswith(member + ".")):
                return layer
    raise AssertionError(f"rbm_study.{module} is in no layer of tests/test_layers.py: add it there")


def source_files() -> dict[str, Path]:
    """rbm_study's modules (relative names) and their files, wherever the install maps them."""
    import importlib.util

    files = {"": PACKAGE / "__init__.py", "cli": PACKAGE / "cli.py", "__main__": PACKAGE / "__main__.py"}
    for package in ("core", "study", "analysis", "configs"):
        spec = importlib.util.find_spec(f"rbm_study.{package}")
        folder = Path(spec.origin).parent
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            files[name] = path
    return files


def imported_modules(path: Path, module: str) -> set[str]:
    """The rbm_study modules that `path` imports, relative to rbm_study."""
    modules = source_files()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from rbm_study.core import evaluate` imports a module; `from rbm_study.core.train import
            # CDSettings` a name of one
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}".removeprefix("rbm_study.")
                     in modules else node.module for alias in node.names]
        else:
            continue
        found |= {name.removeprefix("rbm_study.") for name in names if name.startswith("rbm_study.")}
    return found - {module}


@pytest.mark.parametrize("module", sorted(source_files()))
def test_imports_go_only_downward(module):
    path = source_files()[module]
    layer = layer_of(module)
    allowed = LAYERS[layer][1] | {layer}
    wrong = {name: layer_of(name) for name in imported_modules(path, module) if layer_of(name) not in allowed}
    assert not wrong, f"rbm_study.{module} ({layer}) imports upward or sideways: {wrong}"


def test_a_violation_is_caught(tmp_path):
    """The checker itself: an evaluation module importing training code is reported."""
    bad = tmp_path / "evaluate.py"
    bad.write_text("from rbm_study.core.train import CDSettings\nfrom rbm_study.core import data\n")
    assert imported_modules(bad, "core.evaluate") == {"core.train", "core.data"}
    assert {layer_of(m) for m in imported_modules(bad, "core.evaluate")} - LAYERS["evaluation"][1]
