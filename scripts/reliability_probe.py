"""Rerun the reliability rounds. Issue 21: outputs that are devices or FIFOs, full disks, damaged pair
shards, infinite config values, lone \\r line ends, Ctrl-C, `make queue`, and the misleading messages.
Issue 31: invalid `finetuning.seeds` (compose and real `dvc exp run -S`), damaged or mismatched Hugging
Face checkpoints (gpt2 config, truncated safetensors, missing tokenizer files, a tensor missing, extra
or of another shape) in the vocab, pretrain and finetune stages, and every other file a third-party
loader reads (YAML, SentencePiece, tokenizers, a finetuned HF classifier's hf/, the MLflow store), `make ui`
over a damaged, locked or directory store or a taken port, and a task text of NUL bytes alone.
Issue 29: `make baseline`/`make clean` over uncommitted edits, an `--output` that is the input or a
symlink, and task files whose ids repeat or are shared across splits.

    .venv/bin/python scripts/reliability_probe.py        # about 4 min on 2 shared CPU cores
    .venv/bin/python scripts/reliability_probe.py --round 31

Every case is a test in the files below (docs/reliability.md lists each promise beside its test);
cases needing root or a private tmpfs say why they skip. Exits non-zero if a case fails or the
rounds take longer than their budget.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# issue -> (its cases, seconds it may take on 2 shared cores)
ROUNDS = {
    "21": (["tests/test_refusals.py"], 180),
    "31": (["tests/test_hf_refusals.py", "tests/test_loader_refusals.py",
            "tests/test_cli.py::test_an_invalid_seed_count_is_one_line_naming_the_key_in_compose_and_check",
            "tests/test_cli.py::test_an_invalid_seed_count_exits_2_without_a_traceback_from_the_shell",
            "tests/test_dvc_pipeline.py::test_dvc_exp_run_refuses_an_invalid_seed_count_as_a_plain_error_and_keeps_params",
            "tests/test_mlflow_view.py::test_make_ui_on_a_damaged_store_says_how_to_move_it_aside",
            "tests/test_mlflow_view.py::test_make_ui_on_a_locked_store_names_the_lock",
            "tests/test_mlflow_view.py::test_make_ui_on_a_directory_store_fails_at_once",
            "tests/test_mlflow_view.py::test_make_ui_on_a_taken_port_fails_in_one_line"],
           300),
}


def main() -> int:
    args = sys.argv[1:]
    chosen = list(ROUNDS)
    if args[:1] == ["--round"] and len(args) >= 2:
        chosen, args = [args[1]], args[2:]
    files = [f for name in chosen for f in ROUNDS[name][0]]
    budget = sum(ROUNDS[name][1] for name in chosen)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-rs", "-p", "no:randomly",
                           "-p", "no:cacheprovider", *args], cwd=REPO)
    elapsed = time.monotonic() - start
    print(f"reliability probe (issue {', '.join(chosen)}): {elapsed:.0f} s (budget {budget} s), "
          f"pytest exit {proc.returncode}")
    return proc.returncode or (1 if elapsed > budget else 0)


if __name__ == "__main__":
    sys.exit(main())
