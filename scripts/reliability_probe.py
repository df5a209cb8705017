"""Rerun issue 21's reliability round: outputs that are devices or FIFOs, full disks, damaged pair
shards, infinite config values, lone \\r line ends, Ctrl-C, `make queue`, and the misleading messages;
and issue 29's "nothing of the user's is lost" (`make baseline`/`make clean` over uncommitted edits,
an `--output` that is the input or a symlink) with its task-file gaps, and issue 31's NUL-only task text.

    .venv/bin/python scripts/reliability_probe.py        # about 2 min on 2 shared CPU cores

Every case is a test in the FILES below (docs/reliability.md lists each promise beside its test);
cases needing root or a private tmpfs say why they skip. Exits non-zero if a case fails or the round
takes longer than its budget.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 300
FILES = ("tests/test_refusals.py", "tests/test_workspace_guard.py", "tests/test_output_paths.py",
         "tests/test_task_gaps.py")


def main() -> int:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", *FILES, "-q", "-rs", "-p", "no:randomly",
                           "-p", "no:cacheprovider", *sys.argv[1:]], cwd=REPO)
    elapsed = time.monotonic() - start
    print(f"reliability probe: {elapsed:.0f} s (budget {BUDGET_S} s), pytest exit {proc.returncode}")
    return proc.returncode or (1 if elapsed > BUDGET_S else 0)


if __name__ == "__main__":
    sys.exit(main())
