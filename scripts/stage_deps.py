"""Each DVC stage's package code deps, computed from its script's imports (twilbert.codebase).

    python scripts/stage_deps.py           # print them
    python scripts/stage_deps.py --write   # replace the src/twilbert lines of dvc.yaml's deps with them

and checks the data deps: a stage may depend on another stage's output only when its command passes
that path to the script (what it reads), so no stage reruns for an output it never opens.
tests/test_dvc_pipeline.py fails when dvc.yaml's deps differ from these or a data dep is not read.
"""

import argparse
import re
import sys
from pathlib import Path

import yaml

from twilbert.codebase import compact_deps, import_closure
from twilbert.io_utils import atomic_write

REPO = Path(__file__).resolve().parents[1]
SCRIPT = re.compile(r"stages/\w+\.py")


def stage_code_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, stage in stages.items():
        script = SCRIPT.search(stage.get("do", stage)["cmd"])
        if script is not None:
            out[name] = compact_deps(import_closure(REPO / script.group(0)), REPO)
    return out


def _path(entry) -> str:
    """A deps/outs entry's path (``- path`` or ``- path: {options}``)."""
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def _literal(path: str) -> str:
    """The part of a templated path before its first ``${...}`` folder: what every instance lies under."""
    return path.split("${", 1)[0].rstrip("/") if "${" in path else path


def _within(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def producers(stages: dict) -> list[tuple[str, str]]:
    """(output path, its literal part; the stage that writes it) for every out and metrics file."""
    return [(_literal(_path(out)), name) for name, stage in stages.items()
            for key in ("outs", "metrics") for out in stage.get("do", stage).get(key, [])]


def data_deps(stages: dict, name: str) -> dict[str, list[str]]:
    """Stage ``name``'s deps that other stages write -> those stages. A templated dep (a task's data
    folder from params) is not matched: its path is not known before DVC resolves it."""
    made = producers(stages)
    out = {}
    for dep in map(_path, stages[name].get("do", stages[name]).get("deps", [])):
        writers = sorted({w for path, w in made if "${" not in dep and w != name and _within(dep, path)})
        if writers:
            out[dep] = writers
    return out


def upstream(stages: dict, name: str) -> set[str]:
    """Every stage whose outputs ``name`` depends on, directly or not."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for writer in (w for ws in data_deps(stages, todo.pop()).values() for w in ws):
            if writer not in seen:
                seen.add(writer)
                todo.append(writer)
    return seen


def unread_data_deps(stages: dict) -> list[str]:
    """One line per data dep that the stage's command does not pass to its script: a dep it does not
    read reruns it for nothing (as ``models/pretrained`` once reran the TF-IDF baseline)."""
    problems = []
    for name, stage in stages.items():
        args = stage.get("do", stage)["cmd"].split()
        for dep, writers in data_deps(stages, name).items():
            if dep not in args:
                problems.append(f"dvc.yaml stage {name}: depends on {dep} (written by {', '.join(writers)}), "
                                f"which its command does not pass to {SCRIPT.search(' '.join(args)).group(0)}")
    return problems


def rewrite(text: str, deps: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's ``- src/twilbert...`` dep lines replaced, right after the line
    naming the stage script; comments and every other line kept."""
    lines, out, stage = text.splitlines(keepends=True), [], None
    for line in lines:
        header = re.match(r"^  (\w+):\s*$", line)
        if header:
            stage = header.group(1)
        if stage in deps and re.match(r"^\s+- src/twilbert/", line):
            continue
        out.append(line)
        script = re.match(r"^(\s+)- (stages/\w+\.py)\s*$", line)
        if stage in deps and script:
            out += [f"{script.group(1)}- {dep}\n" for dep in deps[stage]]
    return "".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's package deps")
    args = parser.parse_args()
    deps = stage_code_deps()
    problems = unread_data_deps(yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    for line in problems:
        print(line, file=sys.stderr)
    if args.write:
        path = REPO / "dvc.yaml"
        text = rewrite(path.read_text(encoding="utf-8"), deps)
        with atomic_write(path) as fh:
            fh.write(text)
        return 1 if problems else 0
    for name, listed in deps.items():
        print(f"{name}:")
        print("".join(f"  - {dep}\n" for dep in listed), end="")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
