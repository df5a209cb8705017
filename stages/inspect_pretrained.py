"""DVC stage `inspect`: TWilBert's evaluation application on the held-out pairs — sample masked
inputs with the MLM predictions and the ROP decision (Markdown), and the held-out metrics (JSON)."""

import argparse
import json
from pathlib import Path

from twilbert.device import resolve_device
from twilbert.io_utils import atomic_write
from twilbert.pipeline.stage import load_stage_config, parse_args, run
from twilbert.progress import format_metrics
from twilbert.reports.inspection import inspect_model
from twilbert.tracking.runs import Tracker


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--pairs", type=Path, default=Path("data/pairs/heldout"))
    parser.add_argument("--samples", type=int, default=4, help="held-out pairs shown in the report")
    parser.add_argument("--out", type=Path, default=Path("results/inspect.md"))
    parser.add_argument("--metrics", type=Path, default=Path("results/inspect.json"))
    args, overrides = parse_args(parser)
    cfg, raw = load_stage_config(overrides)
    tcfg = cfg.training
    report, metrics = inspect_model(args.model, args.pairs, args.samples, cfg.seed, tcfg.batch_size,
                                    tcfg.pll_examples, resolve_device(tcfg.device), tcfg.precision)
    tracker = Tracker(cfg.tracking, stage="inspect")
    # The store is probed before any output is written: under tracking.on_unreachable=fail nothing is.
    with tracker.start({"model": str(args.model), "pairs": str(args.pairs)}, run_name="inspect", experiment_params=raw):
        for path in (args.out, args.metrics):
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as fh:
            fh.write(report)
        with atomic_write(args.metrics) as fh:
            json.dump(metrics, fh, indent=2)
        tracker.log_metrics(metrics)
        tracker.log_artifact(args.out)
    return f"{format_metrics(metrics)} -> {args.out}"


if __name__ == "__main__":
    run(main)
