"""The results quoted in README.md and docs/, checked against the committed results/ (and, for
README's "Run the default" table, rewritten from it).

`--check` (the default) exits 1 naming each block that differs; `--write` rewrites README's quoted
"Models compared" table from results/results.md. The `make compare` example in docs/experiments.md
holds an experiment of its own (enc4) that results/ does not: its `baseline` row is checked here and
the whole block is pasted from `make compare` by hand (the page says when it was taken).
tests/test_docs_numbers.py runs the same checks."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

from twilbert.config.strict import dig
from twilbert.reports.compare import PRETRAIN_COLUMNS, TASK_COLUMNS, cell

REPO = Path(__file__).resolve().parents[1]
COMPARED = "## Models compared"


def results_table(results_md: str) -> str:
    """The "Models compared" table of results.md: its header, rule and rows."""
    section = results_md.split(COMPARED, 1)[1]
    return "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"


def quoted_tables(text: str, first_cells: str) -> list[tuple[int, int, str]]:
    """(start, end, body) of each fenced block whose first line starts with ``first_cells``."""
    found = []
    for match in re.finditer(r"```\n(.*?)```", text, re.S):
        if match.group(1).startswith(first_cells):
            found.append((match.start(1), match.end(1), match.group(1)))
    return found


def readme_block(readme: str) -> tuple[int, int, str]:
    blocks = quoted_tables(readme, "| Task | Official |")
    if len(blocks) != 1:
        raise SystemExit(f"README.md: expected one quoted 'Models compared' table, found {len(blocks)}")
    return blocks[0]


def compare_cells(repo: Path) -> dict[str, str]:
    """The `baseline` row of `make compare`'s first table, computed from the committed results/."""
    tasks = json.loads((repo / "results" / "metrics.json").read_text(encoding="utf-8"))
    pretrain = json.loads((repo / "results" / "pretrain.json").read_text(encoding="utf-8"))
    cells = {label: cell(pretrain.get(key), True, in_points) for key, label, in_points in PRETRAIN_COLUMNS}
    for task in tasks:
        cells.update({label: cell(dig(tasks, f"{task}.{key}"), True, True) for key, label in TASK_COLUMNS})
    return cells


def experiments_mismatches(repo: Path) -> list[str]:
    """Cells of the `baseline` row in docs/experiments.md's `make compare` example that differ from
    what results/ gives."""
    text = (repo / "docs" / "experiments.md").read_text(encoding="utf-8")
    blocks = [b for _, _, b in quoted_tables(text, "|") if "| experiment |" in b and "| baseline " in b]
    if not blocks:
        return ["docs/experiments.md: no `make compare` example with a baseline row"]
    expected = compare_cells(repo)
    wrong = []
    for block in blocks:
        head: list[str] = []
        for line in block.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == "experiment":
                head = cells
            elif head and cells[0] == "baseline":
                wrong += [f"docs/experiments.md: baseline {h} reads {c}, results/ gives {expected[h]}"
                          for h, c in zip(head, cells) if h in expected and c != expected[h]]
    return wrong


def mismatches(repo: Path = REPO) -> list[str]:
    wrong = []
    readme = (repo / "README.md").read_text(encoding="utf-8")
    table = results_table((repo / "results" / "results.md").read_text(encoding="utf-8"))
    if readme_block(readme)[2] != table:
        wrong.append("README.md: the quoted 'Models compared' table is not results/results.md's "
                     "(`python scripts/docs_numbers.py --write`)")
    return wrong + experiments_mismatches(repo)


def write_readme(repo: Path = REPO) -> bool:
    path = repo / "README.md"
    readme = path.read_text(encoding="utf-8")
    start, end, body = readme_block(readme)
    table = results_table((repo / "results" / "results.md").read_text(encoding="utf-8"))
    if body == table:
        return False
    path.write_text(readme[:start] + table + readme[end:], encoding="utf-8")
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite README's table from results/results.md")
    args = parser.parse_args(argv)
    if args.write and write_readme():
        print("README.md: the 'Models compared' table rewritten from results/results.md")
    wrong = mismatches()
    for line in wrong:
        print(line, file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
