"""The finetune stage's work on one task: the configured backbone (and the baseline row) fitted and
evaluated (``kfold.evaluate_learner``), the model directory published whole, and the metrics files
(``metrics.json``, ``baseline.json``, ``epochs.csv``) written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence, Union

from twilbert import distributed
from twilbert.config import Config, FinetuningConfig, TaskConfig, to_dict
from twilbert.data.tasks import TaskData, load_task
from twilbert.device import configure_matmul, resolve_device
from twilbert.distributed import DistContext
from twilbert.io_utils import atomic_write, publish_dir
from twilbert.track import Tracker
from twilbert.train.fingerprint import config_fingerprint, files_digest, package_paths
from twilbert.train.finetune import (
    Learner, NeuralLearner, baseline_learner, hf_learner, task_preprocessor, twilbert_learner,
)
from twilbert.train.kfold import LearnerRun, evaluate_learner
from twilbert.train.loop import Callback, seed_everything

# The code a finetuning run's identity covers (the stage's code deps in dvc.yaml).
FINGERPRINT_CODE = ("model", "train", "data/tasks.py", "data/formats.py", "data/tokenizer.py",
                    "data/preprocess.py", "data/pairs.py", "data/batch.py", "data/packers.py", "finetuned.py",
                    "distributed.py", "device.py", "scoring.py")

BASELINE_FILE = "baseline.json"
METRICS_FILE = "metrics.json"
EPOCHS_FILE = "epochs.csv"
PREDICTIONS_FILE = "predictions.tsv"
PREDICTIONS_HEADER = "id\tgold\tpred\n"  # what a run without predictions writes (twilbert.predictions reads it)
BASELINE_DIR = "baseline"  # the baseline row's model, inside the task's model directory


def finetune_fingerprint(cfg: Config, task: TaskConfig, ft: FinetuningConfig, pretrained_dir: Path) -> dict[str, str]:
    """What makes two finetuning runs of a task the same run: config, task files, backbone, code."""
    raw = {"seed": cfg.seed, "finetuning": to_dict(ft), "representation": to_dict(cfg.representation),
           "preprocess": to_dict(cfg.preprocess),
           "task": {"dataset": to_dict(task.dataset), "task": to_dict(task.task)}}
    files = [task.dataset.path(name) for name in (task.dataset.train_file, task.dataset.dev_file,
                                                   task.dataset.test_file)]
    backbone = Path(ft.hf_path) if ft.backbone == "hf" else Path(pretrained_dir)
    return {"config": config_fingerprint(raw), "inputs": files_digest([f for f in files if f] + [backbone]),
            "code": files_digest(package_paths(*FINGERPRINT_CODE))}


def run_config(cfg: Config, run_seed: int) -> Config:
    """The config of finetuning run ``run_seed``: its training seed is ``seed + run_seed`` (config/runs.py).

    Load the task's splits with ``cfg.seed`` before, so that every run is scored on the same examples."""
    return dataclasses.replace(cfg, seed=cfg.seed + run_seed)


def finetune_task(cfg: Config, task: TaskConfig, pretrained_dir: Path, model_out: Path, metrics_out: Path,
                  tracker: Optional[Tracker] = None, checkpoint_dir: Optional[Path] = None,
                  ctx: Optional[DistContext] = None, splits: Optional[TaskData] = None,
                  callbacks: Sequence[Callback] = (), baseline_row: Optional[bool] = None) -> dict:
    """Finetune the configured backbone on ``task`` (and the baseline row); write models and metrics.

    With ``checkpoint_dir`` the neural backbones checkpoint and resume there (``train_state/``, or
    ``fold-<i>/`` per fold). Under torchrun (``ctx``) every rank trains; rank 0 alone fits the
    baseline row and writes. ``splits``: the task's files already read (``load_task``), so that a
    caller can validate them before it opens its MLflow run. ``callbacks``: the training loop's hooks.
    ``baseline_row``: False when the baseline is a stage of its own (``baseline_task``); None: the config's.
    """
    ft = task.finetuning_config(cfg.finetuning)
    ctx = ctx or DistContext(device=resolve_device(ft.device))
    seed_everything(cfg.seed, ctx.device)
    configure_matmul(ctx.device, ft.tf32)
    pretrained_dir, model_out, metrics_out = Path(pretrained_dir), Path(model_out), Path(metrics_out)
    splits = splits if splits is not None else load_task(task, cfg.seed, ft.no_test_protocol)
    max_len = cfg.representation.max_len
    test_len = cfg.representation.test_len
    if ft.backbone == "twilbert":
        learner: Learner = twilbert_learner(cfg, task, ft, pretrained_dir, tracker, ctx)
    elif ft.backbone == "hf":
        learner = hf_learner(cfg, task, ft, tracker, ctx)
    else:
        learner = baseline_learner(cfg, task, ft, task_preprocessor(cfg, pretrained_dir))
    if checkpoint_dir is not None and isinstance(learner, NeuralLearner):
        learner.checkpoint_dir = Path(checkpoint_dir)
        learner.fingerprint_parts = finetune_fingerprint(cfg, task, ft, pretrained_dir)
    if isinstance(learner, NeuralLearner):
        learner.callbacks = list(callbacks)

    if not ctx.is_main:  # train beside rank 0, write nothing
        neural = isinstance(learner, NeuralLearner)
        metrics = evaluate_learner(learner, splits, max_len, test_len, None).metrics if neural else {}
        distributed.barrier()
        return metrics

    with publish_dir(model_out, checksums=True) as staged:  # checksums cover the k-fold publish, folds/, baseline/
        run = evaluate_learner(learner, splits, max_len, test_len, staged)
        baseline: Union[dict, None] = None
        if (ft.baseline_row if baseline_row is None else baseline_row) and ft.backbone != "baseline":
            row = baseline_learner(cfg, task, ft, learner.preprocess)
            baseline = evaluate_learner(row, splits, max_len, test_len, staged / BASELINE_DIR).metrics

    if tracker:
        tracker.log_metrics({f"test_{k}": v for k, v in run.metrics["test"].items()})
        tracker.log_metrics({f"best_dev_{k}": v for k, v in run.metrics["dev"].items()})
        if baseline:
            tracker.log_metrics({f"baseline_test_{k}": v for k, v in baseline["test"].items()})
    write_metrics(metrics_out, run, baseline, ft, baseline_file=baseline_row is not False)
    distributed.barrier()
    return run.metrics


def write_metrics(metrics_out: Path, run: LearnerRun, baseline: Optional[dict], ft: FinetuningConfig,
                  baseline_file: bool = True) -> None:
    """The run's files (``write_run_files``) and ``baseline.json`` (a note without scores when there
    is no separate baseline row, so DVC always finds it; none when the baseline is a stage of its own)."""
    write_run_files(metrics_out, run)
    if not baseline_file:
        return
    if baseline is None:
        reason = ("finetuning.baseline_row is false" if not ft.baseline_row
                  else "the backbone is the baseline: see metrics.json")
        baseline = {"task": run.metrics["task"], "model": "baseline", "skipped": reason}
    with atomic_write(metrics_out / BASELINE_FILE) as fh:
        json.dump(baseline, fh, indent=2)


def write_run_files(metrics_out: Path, run: LearnerRun) -> None:
    """One run's ``metrics.json`` and ``epochs.csv`` (none for a model without epochs)."""
    metrics_out = Path(metrics_out)
    metrics_out.mkdir(parents=True, exist_ok=True)
    with atomic_write(metrics_out / METRICS_FILE) as fh:
        json.dump(run.metrics, fh, indent=2)
    if not run.history:
        return
    fields = list(dict.fromkeys(k for row in run.history for k in row))
    with atomic_write(metrics_out / EPOCHS_FILE) as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(run.history)


def baseline_preprocessor(cfg: Config, ft: FinetuningConfig, pretrained_dir: Path):
    """The preprocessing the task's neural runs see, so that the baseline reads the same texts."""
    from twilbert.data.preprocess import Preprocessor
    from twilbert.train.finetune import task_preprocessor

    return task_preprocessor(cfg, pretrained_dir) if ft.backbone == "twilbert" else Preprocessor(cfg.preprocess)


def baseline_task(cfg: Config, task: TaskConfig, pretrained_dir: Path, model_out: Path, metrics_out: Path,
                  splits: Optional[TaskData] = None) -> Optional[dict]:
    """The TF-IDF baseline row of ``task``, once: it is deterministic, so it needs no seeds. Writes
    ``metrics_out/metrics.json`` (a note without scores when there is no separate row, so that DVC always
    finds the file, with a header-only ``predictions.tsv``) and the model under ``model_out`` (then a
    ``skipped.json``); returns the metrics, or None when skipped."""
    ft = task.finetuning_config(cfg.finetuning)
    metrics_out = Path(metrics_out)
    if not ft.baseline_row or ft.backbone == "baseline":
        note = {"task": task.name, "model": "baseline",
                "skipped": ("finetuning.baseline_row is false" if not ft.baseline_row
                            else "the backbone is the baseline: see the task's runs")}
        with publish_dir(Path(model_out)) as staged:
            (staged / "skipped.json").write_text(json.dumps(note, indent=2), encoding="utf-8")
        metrics_out.mkdir(parents=True, exist_ok=True)
        with atomic_write(metrics_out / METRICS_FILE) as fh:
            json.dump(note, fh, indent=2)
        with atomic_write(metrics_out / PREDICTIONS_FILE) as fh:
            fh.write(PREDICTIONS_HEADER)
        return None
    splits = splits if splits is not None else load_task(task, cfg.seed, ft.no_test_protocol)
    row = baseline_learner(cfg, task, ft, baseline_preprocessor(cfg, ft, Path(pretrained_dir)))
    with publish_dir(Path(model_out), checksums=True) as staged:
        run = evaluate_learner(row, splits, cfg.representation.max_len, cfg.representation.test_len, staged)
    write_run_files(metrics_out, run)
    return run.metrics
