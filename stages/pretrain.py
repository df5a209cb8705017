"""DVC stage `pretrain`: masked LM + reply-order prediction; the best epoch becomes the pretrained model.

Rerun after a crash, it resumes from the newest training checkpoint of the same run. Under
`torchrun --nproc_per_node N stages/pretrain.py ...` N workers (1..training.micro_batches) share
each global batch and write the same bytes as one; rank 0 writes.
"""

import argparse
import json
from pathlib import Path
from typing import Optional

from twilbert.data.hf_checkpoint import MASKED_LM, check_hf_checkpoint
from twilbert.data.tasks import check_config_tasks
from twilbert.io_utils import atomic_write
from twilbert.pipeline.stage import fault_callbacks, load_stage_config, parse_args, run
from twilbert.pipeline.workers import launch_workers, log_startup
from twilbert.progress import format_metrics
from twilbert.reports.results import PRETRAIN_HEADLINE
from twilbert.tracking.runs import Tracker
from twilbert.train.continued import continued_pretrain
from twilbert.train.distributed import distributed_context
from twilbert.train.pretrain import pretrain
from twilbert.train.pretrain_run import resolve_pretrain_run
from twilbert.train.writer_lock import checkpoint_lock


def main() -> Optional[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=Path, default=Path("data/pairs"))
    parser.add_argument("--vocab", type=Path, default=Path("data/vocab"))
    parser.add_argument("--out", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints/pretrain"))
    parser.add_argument("--metrics", type=Path, default=Path("results/pretrain.json"))
    parser.add_argument("--curves", type=Path, help="DVC plot files per epoch and per logged step (epochs.csv, steps.csv)")
    parser.add_argument("--check-tasks", type=Path, metavar="DEFAULT_DIR",
                        help="first read every task's files (DEFAULT_DIR: the data stage's default task)")
    args, overrides = parse_args(parser)
    cfg, raw = load_stage_config(overrides)
    if args.check_tasks:  # a task that cannot run fails now, not after pretraining
        check_config_tasks(cfg, args.check_tasks)
    # The run resolved once (seed, model, training with its init, length, runtime): what trains is what
    # MLflow records and what the checkpoints' identity hashes; dvc.yaml's params are its keys.
    run = resolve_pretrain_run(cfg)
    if run.continued:  # a checkpoint that cannot be continued fails now, before a run is opened
        check_hf_checkpoint(run.hf_path, "training.hf_path", MASKED_LM)
    # Portable numerics on the CPU: this stage as min(cores, training.micro_batches) DDP workers, then exit
    launch_workers(run.runtime, getattr(run.training, "micro_batches", 1), run.training.device, "training")
    # One writer per checkpoint directory: a second run beside a live one is refused, naming its PID.
    with distributed_context(run.training.device) as ctx, checkpoint_lock(args.checkpoints, enabled=ctx.is_main):
        log_startup(ctx.is_main, ctx.world_size)
        tracker = Tracker(cfg.tracking, stage="pretrain", enabled=ctx.is_main)
        with tracker.start(run.params(), run_name=f"pretrain-{run.model.name}", experiment_params=raw):
            # training.init_from hf: continued pretraining of a Hugging Face checkpoint (train/continued.py)
            train = continued_pretrain if run.continued else pretrain
            metrics = train(run, args.pairs, args.vocab, args.out, args.checkpoints, tracker, ctx, args.curves,
                            callbacks=fault_callbacks())
            if ctx.is_main:
                args.metrics.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(args.metrics) as fh:
                    json.dump(metrics, fh, indent=2)
                tracker.log_artifact(args.out / "config.json")
    if not ctx.is_main:
        return None
    return (f"best epoch {metrics['epoch']}/{run.training.epochs}: "
            f"{format_metrics(metrics, PRETRAIN_HEADLINE)} -> {args.out}")


if __name__ == "__main__":
    run(main)
