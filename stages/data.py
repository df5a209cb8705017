"""DVC stage `data`: the default corpus and task split, or the user's pair corpus."""

import argparse
import json
from pathlib import Path

from twilbert.data.corpus import run_data_stage
from twilbert.data.tasks import check_config_tasks
from twilbert.pipeline.stage import load_stage_config, parse_args, run


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--check-tasks", action="store_true",
                        help="first check that every task's files exist (or are the default task this stage writes)")
    args, overrides = parse_args(parser)
    cfg, _ = load_stage_config(overrides)
    if args.check_tasks:  # a task that cannot run fails now, not after pretraining
        check_config_tasks(cfg, args.out / "default", default_pending=True)
    summary = run_data_stage(cfg.data, cfg.seed, args.out, cfg.runtime.threads)
    print(json.dumps(summary))  # machine-readable, for scripts and the data_scale benchmark
    return ", ".join(f"{k} {v}" for k, v in summary.items())


if __name__ == "__main__":
    run(main)
