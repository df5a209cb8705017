"""`make acceptance`: finetune TWilBert's 11 sample tasks on the pretrained model and write
results/acceptance/results.md, each task listed by its sample folder.

Extra key=value arguments are Hydra overrides, e.g. `finetuning.epochs=5`. Exits 2 when the run
cannot start (no samples), 1 when a task failed.
"""

import argparse
import logging
import sys
from pathlib import Path

from twilbert.acceptance import SAMPLE_TASKS, AcceptanceError, acceptance_config, ensure_pretrained, run_acceptance
from twilbert.config import ConfigError
from twilbert.stage import parse_args, setup_logging

log = logging.getLogger("twilbert")
REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, default=REPO.parent / "shared" / "data" / "twilbert-samples",
                        help="the twilbert-samples folder (holding tasks/)")
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--out", type=Path, default=Path("results/acceptance"))
    parser.add_argument("--models-out", type=Path, default=Path("models/acceptance"))
    parser.add_argument("--tasks", nargs="+", choices=list(SAMPLE_TASKS), help="a subset (default: all)")
    parser.add_argument("--no-repro", action="store_true", help="fail instead of running `dvc repro pretrain`")
    args, overrides = parse_args(parser, argv)
    try:
        cfg = acceptance_config(args.samples, args.tasks, overrides, REPO / "conf")
        ensure_pretrained(args.pretrained, repro=not args.no_repro)
        report = run_acceptance(cfg, args.pretrained, args.out, args.models_out)
    except (AcceptanceError, ConfigError) as err:
        log.error("acceptance: %s", err)
        return 2
    if report.table:
        print(report.table)
    if report.failures:
        for name, error in report.failures.items():
            log.error("acceptance: %s (%s) failed: %s", name, SAMPLE_TASKS[name], error)
        return 1
    log.info("acceptance: %d tasks in %.0fs -> %s", len(report.seconds), sum(report.seconds.values()),
             args.out / "results.md")
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
