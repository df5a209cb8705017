"""Each DVC stage's package code deps, computed from its script's imports (twilbert.codebase).

    python scripts/stage_deps.py           # print them
    python scripts/stage_deps.py --write   # replace the src/twilbert lines of dvc.yaml's deps with them

tests/test_dvc_pipeline.py fails when dvc.yaml's deps differ from these.
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
    if args.write:
        path = REPO / "dvc.yaml"
        text = rewrite(path.read_text(encoding="utf-8"), deps)
        with atomic_write(path) as fh:
            fh.write(text)
        return 0
    for name, listed in deps.items():
        print(f"{name}:")
        print("".join(f"  - {dep}\n" for dep in listed), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
