"""DVC stage `finetune` (one instance per task and seed, `finetune@<task>-s<seed>`): the configured
backbone (TWilBert encoder, a local Hugging Face checkpoint, or the TF-IDF baseline) with the task's
overrides, best dev epoch or k blended folds, test. Run `--seed S` trains with seed + S on the same
splits as every other run. Without `--no-baseline` it also fits the baseline row (baseline.json),
which the pipeline runs once per task instead (stages/baseline.py).

Rerun after a crash, it resumes from the task's newest training checkpoint of the same run. Under
`torchrun --nproc_per_node N stages/finetune.py ...` N workers (1..finetuning.micro_batches) share
each global batch and write the same bytes as one; rank 0 writes."""

import argparse
from pathlib import Path
from typing import Optional

from twilbert.config import ConfigError
from twilbert.data.hf_checkpoint import ENCODER, check_hf_checkpoint
from twilbert.data.tasks import load_task
from twilbert.pipeline.stage import fault_callbacks, load_stage_config, parse_args, run
from twilbert.pipeline.workers import launch_workers, log_startup
from twilbert.tracking.runs import Tracker
from twilbert.train.distributed import distributed_context
from twilbert.train.finetune.resolved import resolve_finetune_run
from twilbert.train.finetune.stage_work import finetune_run
from twilbert.train.writer_lock import checkpoint_lock


def save_pyfunc(model_dir: Path, target: Path, description) -> Path:
    """The finetuned model as an MLflow pyfunc folder; mlflow is imported only when tracking logs it."""
    from twilbert.inference.pyfunc import save_classifier_model

    return save_classifier_model(model_dir, target, description)


def main() -> Optional[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", required=True, help="a key of `tasks` in params.yaml")
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--model-out", type=Path)
    parser.add_argument("--metrics-out", type=Path)
    parser.add_argument("--checkpoints", type=Path, help="training checkpoints (resume); none when omitted")
    parser.add_argument("--seed", type=int, default=0, help="the run: trains with seed + SEED (finetuning.seeds)")
    parser.add_argument("--no-baseline", action="store_true", help="the baseline row is a stage of its own")
    args, overrides = parse_args(parser)
    cfg, raw = load_stage_config(overrides)
    if args.task not in cfg.tasks:
        raise ConfigError(f"--task {args.task!r} is not in params.yaml tasks (have: {sorted(cfg.tasks)})")
    # The run resolved once (overrides, backbone, seeds, lengths): what trains is what MLflow records.
    run = resolve_finetune_run(cfg, cfg.tasks[args.task], args.pretrained, args.seed)
    metrics_out = args.metrics_out or Path("results/tasks") / args.task
    # Bad task files fail here, before an MLflow run is opened; the splits are the same for every seed.
    splits = load_task(run.task, run.split_seed, run.ft.no_test_protocol)
    if run.ft.backbone == "hf":  # so is a Hugging Face checkpoint the classifier cannot be built on
        check_hf_checkpoint(run.ft.hf_path, "finetuning.hf_path", ENCODER)
    if run.ft.backbone != "baseline":  # portable numerics on the CPU: min(cores, micro_batches) DDP workers
        launch_workers(run.runtime, getattr(run.ft, "micro_batches", 1), run.ft.device, "finetuning")
    # One writer per checkpoint directory: a second run beside a live one is refused, naming its PID.
    with distributed_context(run.ft.device) as ctx, \
            checkpoint_lock(args.checkpoints, enabled=ctx.is_main and args.checkpoints is not None):
        log_startup(ctx.is_main, ctx.world_size)
        tracker = Tracker(cfg.tracking, stage="finetune", enabled=ctx.is_main)
        with tracker.start(run.params(), run_name=f"finetune-{args.task}-s{args.seed}", experiment_params=raw):
            model_out = args.model_out or Path("models/finetuned") / args.task
            metrics = finetune_run(run, model_out, metrics_out, tracker, args.checkpoints, ctx, splits=splits,
                                   callbacks=fault_callbacks(), baseline_row=False if args.no_baseline else None)
            if ctx.is_main:
                for name in ("metrics.json", "baseline.json", "predictions.tsv"):
                    if (metrics_out / name).is_file():
                        tracker.log_artifact(metrics_out / name)
                tracker.log_classifier(model_out, save_pyfunc)  # mlflow.pyfunc.load_model("runs:/<run>/model")
    if not ctx.is_main:
        return None
    return (f"{args.task} s{args.seed} ({metrics['model']}): dev {metrics['official_metric']} {metrics['dev']['official']:.4f}, "
            f"test {metrics['test']['official']:.4f}")


if __name__ == "__main__":
    run(main)
