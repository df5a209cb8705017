"""Write tests/slow_tests.txt from a pytest ``--durations=0`` report: the tests that took ``--over``
seconds or more (setup, call and teardown together, all parameters of a test together).

    python -m pytest -n 2 --dist loadfile --durations=0 -q > durations.txt
    python scripts/slow_tests.py durations.txt
"""

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^([0-9.]+)s (?:call|setup|teardown)\s+(\S+)")
HEADER = ("# Tests left out of `make test-fast` (the daily tier): each took {over} s or more (stage subprocesses,\n"
          "# real training, MLflow stores). Regenerate with scripts/slow_tests.py after a `--durations=0` run.\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--over", type=float, default=1.5)
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    for line in args.report.read_text(encoding="utf-8").splitlines():
        row = ROW.match(line)
        if row:
            test = row.group(2).split("[", 1)[0]
            seconds[test] = seconds.get(test, 0.0) + float(row.group(1))
    slow = sorted(t for t, s in seconds.items() if s >= args.over)
    (REPO / "tests" / "slow_tests.txt").write_text(HEADER.format(over=args.over) + "\n".join(slow) + "\n",
                                                   encoding="utf-8")
    print(f"{len(slow)} of {len(seconds)} tests take {args.over} s or more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
