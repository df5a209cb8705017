"""The package's layers, enforced: a module imports only from its own layer or the ones below.

Imports inside functions count (they run when the function does), so a circle cannot hide in one.
The layers, lowest first, are the table below; docs/layout.md shows the same order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from twilbert.codebase import PACKAGE_DIR, _direct_imports, _module_name

LAYERS = [
    # shared infrastructure: no twilbert imports beyond each other
    {"twilbert.errors", "twilbert.io_utils", "twilbert.progress", "twilbert.numerics", "twilbert.device",
     "twilbert.codebase"},
    {"twilbert.config"},
    {"twilbert.data"},
    {"twilbert.model"},
    {"twilbert.evaluation"},
    {"twilbert.tracking"},
    {"twilbert.train"},
    {"twilbert.inference"},
    {"twilbert.reports"},
    {"twilbert.pipeline"},
    {"twilbert.cli"},
]
AT_MOST_AT_TOP = 10  # modules directly under src/twilbert, __init__ included


def layer_of(module: str) -> int:
    """The layer of ``twilbert.x[.y...]``: that of its top-level module or package."""
    top = ".".join(module.split(".")[:2])
    for rank, members in enumerate(LAYERS):
        if top in members:
            return rank
    raise LookupError(f"{module}: in no layer of tests/test_layers.py; add its top-level module or package there")


def package_modules() -> list[tuple[str, Path]]:
    files = sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    return [(_module_name(p), p) for p in files]


def test_every_module_sits_in_a_layer():
    for name, _ in package_modules():
        if name != "twilbert":  # the package's facade: its lazy names resolve to the modules they name
            layer_of(name)


def test_no_module_imports_a_higher_layer():
    upward = []
    for name, path in package_modules():
        if name == "twilbert":
            continue
        own = layer_of(name)
        for imported in _direct_imports(path):
            if imported != "twilbert" and layer_of(imported) > own:
                upward.append(f"{path.relative_to(PACKAGE_DIR.parent)}: imports {imported} (layer {layer_of(imported)} > {own})")
    assert upward == [], "\n".join(upward)


def test_the_top_of_the_package_stays_small():
    top = sorted(p.name for p in PACKAGE_DIR.iterdir() if p.suffix == ".py")
    assert len(top) <= AT_MOST_AT_TOP, top


@pytest.mark.parametrize("source, upward", [
    ("def f():\n    from twilbert.inference.predict import predict_stream\n", True),  # a function-level import counts
    ("from twilbert.config import Config\n", False),
])
def test_the_check_sees_imports_inside_functions(tmp_path, source, upward):
    """A model/ module's import of inference/ is upward, even inside a function."""
    probe = tmp_path / "probe.py"
    probe.write_text(source, encoding="utf-8")
    found = [m for m in _direct_imports(probe) if layer_of(m) > layer_of("twilbert.model")]
    assert bool(found) is upward
