"""The package's own import graph: which of twilbert's files a module runs.

A training run's fingerprint hashes the files its entry module imports, and a test checks that each
DVC stage's ``deps`` cover its script's imports: the import statements are the one list of a stage's
code, so the fingerprint, ``dvc.yaml`` and the code cannot disagree. Imports inside functions count
(they run when the function does); a package's ``__init__.py`` counts for every module under it.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

from twilbert import _LAZY

PACKAGE = "twilbert"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(name: str) -> Optional[Path]:
    """The source file of ``twilbert...`` module ``name`` (a package's ``__init__.py``), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> Optional[str]:
    try:
        rel = path.resolve().relative_to(PACKAGE_DIR)
    except ValueError:
        return None  # a script outside the package (a stage script)
    parts = [PACKAGE, *rel.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def _direct_imports(path: Path) -> tuple[str, ...]:
    """The twilbert modules ``path`` imports, anywhere in its body."""
    name = _module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                if name is None:
                    continue
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append(module)
            # `from twilbert.data import corpus` imports the submodule corpus
            found += [f"{module}.{alias.name}" for alias in node.names]
            if module == PACKAGE:  # the package's lazy names (twilbert.__init__._LAZY)
                found += [_LAZY.get(alias.name, "") for alias in node.names]
    return tuple(m for m in dict.fromkeys(found) if module_file(m) is not None)




def _with_packages(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(*entries: str | Path) -> list[Path]:
    """Every twilbert source file that importing ``entries`` (module names or script paths) runs,
    sorted by path."""
    seen: set[Path] = set()
    todo: list[Path] = []
    for entry in entries:
        if isinstance(entry, Path):
            todo.append(entry.resolve())
        else:
            todo += [f for m in _with_packages(entry) if (f := module_file(m)) is not None]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _direct_imports(path):
            todo += [f for m in _with_packages(module) if (f := module_file(m)) is not None]
    return sorted(p for p in seen if _module_name(p) is not None)


def code_digest(*entries: str | Path) -> str:
    """sha256 of the package-relative names and contents of ``import_closure(*entries)``."""
    digest = hashlib.sha256()
    for path in import_closure(*entries):
        digest.update(f"{path.relative_to(PACKAGE_DIR).as_posix()}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def relative_paths(paths: Iterable[Path], root: Path) -> list[str]:
    """``paths`` as posix paths relative to ``root`` (e.g. the repository, for dvc.yaml's deps)."""
    return [p.resolve().relative_to(root.resolve()).as_posix() for p in paths]


def compact_deps(files: Iterable[Path], root: Path) -> list[str]:
    """``files`` as dvc.yaml ``deps`` relative to ``root``: a folder of the package stands for its files
    when every source file in it (at any depth) is among them."""
    wanted = {p.resolve() for p in files}
    # by depth, then by name: a set's order varies with PYTHONHASHSEED, and dvc.yaml must not
    folders = sorted({p.parent for p in wanted if p.parent != PACKAGE_DIR}, key=lambda d: (len(d.parts), d.as_posix()))
    whole: list[Path] = []
    for folder in folders:
        if any(folder.is_relative_to(w) for w in whole):
            continue
        if all(f.resolve() in wanted for f in folder.rglob("*.py") if "__pycache__" not in f.parts):
            whole.append(folder)
    listed = whole + sorted(p for p in wanted if not any(p.is_relative_to(w) for w in whole))
    return relative_paths(listed, root)
