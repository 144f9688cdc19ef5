"""The package's layers: imports only go downward.

The library (kernels, solvers, AGOP, collapse, datasets, the models, the theory's mathematics,
distributed plumbing) imports nothing from the experiments, the report or the CLI; the
experiments import nothing from the report or the CLI; the report nothing from the CLI.
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "agop"

# the layers, top first; a module may import only from its own layer or the ones below
LAYERS = [
    ("cli", ("agop.cli", "agop.__main__")),
    ("report", ("agop.report",)),
    ("experiments", ("agop.experiments",)),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    """0 for the CLI, 1 for the report, 2 for the experiments, 3 for the library."""
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return len(LAYERS)


def _imports(path: Path) -> set[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    return _imports_of(path.read_text(encoding="utf-8"), package)


def _imports_of(text: str, package: str) -> set[str]:
    """Every ``agop`` module that ``text`` (code of a module in ``package``) imports."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # `from agop import report` imports the submodule agop.report
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m == "agop" or m.startswith("agop.")}


MODULES = sorted(SRC.rglob("*.py"))


def test_the_layers_cover_the_package():
    names = {_module_name(p) for p in MODULES}
    assert {"agop.cli", "agop.collapse", "agop.models.deep_rfm", "agop.experiments.rfm"} <= names
    assert any(_layer(n) == 1 for n in names), "no report module found"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_go_downward(path):
    me = _layer(_module_name(path))
    upward = sorted(m for m in _imports(path) if _layer(m) < me)
    assert not upward, f"{_module_name(path)} (layer {LAYERS[me][0] if me < len(LAYERS) else 'library'}) imports {upward}"


def test_the_check_sees_lazy_and_relative_imports():
    """A lazy import inside a function and a relative import are both found, and both are
    upward from the library (the mistakes the rule is about)."""
    lazy = "def f():\n    from agop.experiments.records import RunDir\n    return RunDir\n"
    assert "agop.experiments.records" in _imports_of(lazy, "agop")
    relative = "from ..report import page\n"
    found = _imports_of(relative, "agop.models")
    assert "agop.report.page" in found
    assert min(_layer(m) for m in found) < _layer("agop.models.deep_rfm")
