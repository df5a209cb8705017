"""DVC stage `finetune` (one instance per task): the configured backbone (TWilBert encoder, a local
Hugging Face checkpoint, or the TF-IDF baseline) with the task's overrides, best dev epoch or k
blended folds, test; plus the baseline row (baseline.json).

Rerun after a crash, it resumes from the task's newest training checkpoint of the same run. Under
`torchrun --nproc_per_node N stages/finetune.py ...` it trains with DDP; rank 0 writes."""

import argparse
from dataclasses import asdict
from pathlib import Path

from twilbert.config import ConfigError
from twilbert.distributed import distributed_context
from twilbert.stage import load_stage_config, parse_args, run
from twilbert.track import Tracker
from twilbert.train.checkpoint import checkpoint_lock
from twilbert.train.finetune import finetune_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", required=True, help="a key of `tasks` in params.yaml")
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--model-out", type=Path)
    parser.add_argument("--metrics-out", type=Path)
    parser.add_argument("--checkpoints", type=Path, help="training checkpoints (resume); none when omitted")
    args, overrides = parse_args(parser)
    cfg, raw = load_stage_config(overrides)
    if args.task not in cfg.tasks:
        raise ConfigError(f"--task {args.task!r} is not in params.yaml tasks (have: {sorted(cfg.tasks)})")
    task = cfg.tasks[args.task]
    metrics_out = args.metrics_out or Path("results/tasks") / args.task
    ft = task.finetuning_config(cfg.finetuning)
    params = {"seed": cfg.seed, "finetuning": asdict(ft), "representation": raw["representation"],
              "task": raw["tasks"][args.task]}
    # One writer per checkpoint directory: a second run beside a live one is refused, naming its PID.
    with distributed_context(ft.device) as ctx, \
            checkpoint_lock(args.checkpoints, enabled=ctx.is_main and args.checkpoints is not None):
        tracker = Tracker(cfg.tracking, stage="finetune", enabled=ctx.is_main)
        with tracker.start(params, run_name=f"finetune-{args.task}"):
            metrics = finetune_task(cfg, task, args.pretrained, args.model_out or Path("models/finetuned") / args.task,
                                    metrics_out, tracker, args.checkpoints, ctx)
            if ctx.is_main:
                for name in ("metrics.json", "baseline.json"):
                    tracker.log_artifact(metrics_out / name)
    if ctx.is_main:
        print(f"{args.task} ({metrics['model']}): test {metrics['official_metric']} = "
              f"{metrics['test']['official']:.4f}")


if __name__ == "__main__":
    run(main)
