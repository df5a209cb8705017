"""The finetune stage's work on one task: the configured backbone (and the baseline row) fitted and
evaluated (``learner_run.evaluate_learner``), the model directory published whole, and the metrics files
(``metrics.json``, ``predictions.tsv``, ``baseline.json``, ``epochs.csv``) written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence, Union

from twilbert.codebase import code_digest
from twilbert.config import Config, FinetuningConfig, TaskConfig
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tasks import TaskData, load_task
from twilbert.device import configure_matmul, resolve_device
from twilbert.evaluation.predictions import FILE as PREDICTIONS_FILE
from twilbert.evaluation.predictions import HEADER as PREDICTIONS_COLUMNS
from twilbert.evaluation.predictions import write_predictions
from twilbert.io_utils import atomic_write, publish_dir
from twilbert.tracking.runs import Tracker
from twilbert.train import distributed
from twilbert.train.distributed import DistContext
from twilbert.train.finetune.degenerate import run_warnings, warn
from twilbert.train.finetune.learner_run import LearnerRun, evaluate_learner
from twilbert.train.finetune.learners import (
    Learner,
    NeuralLearner,
    baseline_learner,
    hf_learner,
    task_preprocessor,
    twilbert_learner,
)
from twilbert.train.finetune.resolved import FinetuneRun, resolve_finetune_run
from twilbert.train.fingerprint import config_fingerprint, files_digest
from twilbert.train.loop import Callback, seed_everything

BASELINE_FILE = "baseline.json"
METRICS_FILE = "metrics.json"
EPOCHS_FILE = "epochs.csv"
PREDICTIONS_HEADER = "\t".join(PREDICTIONS_COLUMNS) + "\n"  # what a baseline that did not run writes
BASELINE_DIR = "baseline"  # the baseline row's model, inside the task's model directory


def finetune_fingerprint(run: FinetuneRun) -> dict[str, str]:
    """What makes two finetuning runs of a task the same run: what trains (``run.params()``), the task's
    files, the backbone, the code."""
    dataset = run.task.dataset
    files = [dataset.path(name) for name in (dataset.train_file, dataset.dev_file, dataset.test_file)]
    backbone = Path(run.ft.hf_path) if run.ft.backbone == "hf" else run.pretrained_dir
    return {"config": config_fingerprint(run.params()), "inputs": files_digest([f for f in files if f] + [backbone]),
            "code": code_digest(__name__)}


def finetune_task(cfg: Config, task: TaskConfig, pretrained_dir: Path, model_out: Path, metrics_out: Path,
                  tracker: Optional[Tracker] = None, checkpoint_dir: Optional[Path] = None,
                  ctx: Optional[DistContext] = None, splits: Optional[TaskData] = None,
                  callbacks: Sequence[Callback] = (), baseline_row: Optional[bool] = None) -> dict:
    """``finetune_run`` of ``task``'s run trained with ``cfg.seed`` (``resolve_finetune_run``)."""
    return finetune_run(resolve_finetune_run(cfg, task, pretrained_dir), model_out, metrics_out, tracker,
                        checkpoint_dir, ctx, splits, callbacks, baseline_row)


def finetune_run(run: FinetuneRun, model_out: Path, metrics_out: Path,
                 tracker: Optional[Tracker] = None, checkpoint_dir: Optional[Path] = None,
                 ctx: Optional[DistContext] = None, splits: Optional[TaskData] = None,
                 callbacks: Sequence[Callback] = (), baseline_row: Optional[bool] = None) -> dict:
    """Finetune the configured backbone on ``task`` (and the baseline row); write models and metrics.

    With ``checkpoint_dir`` the neural backbones checkpoint and resume in this run's folder there
    (``run-<identity>/train_state/``, or ``fold-<i>/`` per fold: ``train.run_dirs``). Under torchrun
    (``ctx``) every rank trains; rank 0 alone fits the baseline row and writes. ``splits``: the task's
    files already read (``load_task``), so that a caller can validate them before it opens its MLflow run.
    ``callbacks``: the training loop's hooks.
    ``baseline_row``: False when the baseline is a stage of its own (``baseline_task``); None: the config's.
    """
    task, ft = run.task, run.ft
    ctx = ctx or DistContext(device=resolve_device(ft.device))
    seed_everything(run.seed, ctx.device)
    configure_matmul(ctx.device, ft.tf32)
    model_out, metrics_out = Path(model_out), Path(metrics_out)
    splits = splits if splits is not None else load_task(task, run.split_seed, ft.no_test_protocol)
    max_len, test_len = run.max_len, run.test_len
    if ft.backbone == "twilbert":
        learner: Learner = twilbert_learner(run, tracker, ctx)
    elif ft.backbone == "hf":
        learner = hf_learner(run, tracker, ctx)
    else:
        learner = baseline_learner(run, task_preprocessor(run))
    if checkpoint_dir is not None and isinstance(learner, NeuralLearner):
        parts = finetune_fingerprint(run)
        learner.checkpoint_dir = Path(checkpoint_dir)  # the run's folder opens when training starts
        learner.fingerprint_parts = parts
    if isinstance(learner, NeuralLearner):
        learner.callbacks = list(callbacks)

    if not ctx.is_main:  # train beside rank 0, write nothing
        neural = isinstance(learner, NeuralLearner)
        metrics = evaluate_learner(learner, splits, max_len, test_len, None).metrics if neural else {}
        distributed.barrier()
        return metrics

    with publish_dir(model_out, checksums=True) as staged:  # checksums cover the k-fold publish, folds/, baseline/
        result = flag_degenerate(task, evaluate_learner(learner, splits, max_len, test_len, staged), splits)
        baseline: Union[dict, None] = None
        if (ft.baseline_row if baseline_row is None else baseline_row) and ft.backbone != "baseline":
            row = baseline_learner(run, learner.preprocess)
            baseline = flag_degenerate(task, evaluate_learner(row, splits, max_len, test_len, staged / BASELINE_DIR),
                                       splits).metrics

    if tracker:
        tracker.log_metrics(run_scores(result.metrics))
        if baseline:
            tracker.log_metrics({f"baseline_{k}": v for k, v in run_scores(baseline).items()})
    write_metrics(metrics_out, result, baseline, ft, baseline_file=baseline_row is not False)
    distributed.barrier()
    return result.metrics


def write_metrics(metrics_out: Path, run: LearnerRun, baseline: Optional[dict], ft: FinetuningConfig,
                  baseline_file: bool = True) -> None:
    """``metrics.json``, ``predictions.tsv``, ``epochs.csv`` (:func:`write_run`) and ``baseline.json``
    (a note without scores when there is no separate baseline row, so DVC always finds it; none when
    the baseline is a stage of its own, ``baseline_task``)."""
    write_run(metrics_out, run)
    if not baseline_file:
        return
    if baseline is None:
        baseline = skipped_baseline(run.metrics["task"], ft)
    with atomic_write(metrics_out / BASELINE_FILE) as fh:
        json.dump(baseline, fh, indent=2)


def skipped_baseline(task: str, ft: FinetuningConfig) -> dict:
    """The baseline's metrics file when it has no row of its own: why, and no scores."""
    reason = ("finetuning.baseline_row is false" if not ft.baseline_row
              else "the backbone is the baseline: see metrics.json")
    return {"task": task, "model": "baseline", "skipped": reason}


def baseline_task(cfg: Config, task: TaskConfig, vocab_dir: Path, model_out: Path, metrics_out: Path,
                  splits: Optional[TaskData] = None) -> Optional[dict]:
    """The TF-IDF baseline row on its own (deterministic: one run per task, whatever the seeds):
    its model published under ``model_out``, ``metrics.json`` and ``predictions.tsv`` under
    ``metrics_out``. When the task has no baseline row: the skipped note in ``metrics.json``, a
    header-only ``predictions.tsv`` and a ``skipped.json`` model folder (DVC finds every output), None.
    ``vocab_dir``: the vocabulary (or a model directory carrying it) whose preprocessing it applies."""
    run = resolve_finetune_run(cfg, task, vocab_dir, resolve_backbone=False)
    ft = run.ft
    metrics_out = Path(metrics_out)
    if not ft.baseline_row or ft.backbone == "baseline":
        note = skipped_baseline(task.name, ft)
        with publish_dir(Path(model_out)) as staged:
            (staged / "skipped.json").write_text(json.dumps(note, indent=2), encoding="utf-8")
        metrics_out.mkdir(parents=True, exist_ok=True)
        with atomic_write(metrics_out / PREDICTIONS_FILE) as fh:
            fh.write(PREDICTIONS_HEADER)
        with atomic_write(metrics_out / METRICS_FILE) as fh:
            json.dump(note, fh, indent=2)
        return None
    splits = splits if splits is not None else load_task(task, run.split_seed, ft.no_test_protocol)
    # the text the finetuned model reads: the vocabulary's preprocessing, or `preprocess` under hf
    preprocess = Preprocessor(run.preprocess) if ft.backbone == "hf" else task_preprocessor(run)
    row = baseline_learner(run, preprocess)
    with publish_dir(model_out, checksums=True) as staged:
        result = evaluate_learner(row, splits, run.max_len, run.test_len, staged)
    write_run(metrics_out, flag_degenerate(task, result, splits), epochs=False)
    return result.metrics


def run_scores(metrics: dict) -> dict[str, float]:
    """A run's scores as its MLflow metrics, under the results tables' names (``dev_official``,
    ``test_mf1``...): the selected epoch's dev scores and the test scores, and that epoch."""
    out = {f"{split}_{k}": v for split in ("dev", "test") for k, v in metrics[split].items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(metrics.get("best_epoch"), int):
        out["best_epoch"] = metrics["best_epoch"]
    return out


def flag_degenerate(task: TaskConfig, run: LearnerRun, splits: TaskData) -> LearnerRun:
    """Warn about, and note in its metrics (``warnings``), a run whose score says little
    (:mod:`twilbert.train.finetune.degenerate`) or whose task files repeat or share ids
    (``TaskData.id_warnings``); a sound run's metrics are left as they are."""
    found = run_warnings(task.task, splits.train.labels, run.test)
    if found:
        warn(task.name, run.metrics.get("model", "?"), found)
    found += splits.id_warnings  # already logged when the files were read (data.tasks.load_task)
    if found:
        run.metrics["warnings"] = found
    return run


def write_run(out_dir: Path, run: LearnerRun, epochs: bool = True) -> None:
    """One run's files in ``out_dir``: ``metrics.json``, ``predictions.tsv`` (one line per reported
    test example) and, with ``epochs``, ``epochs.csv``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / METRICS_FILE) as fh:
        json.dump(run.metrics, fh, indent=2)
    if run.test is not None:
        write_predictions(out_dir / PREDICTIONS_FILE, run.test)
    if not epochs:
        return
    fields = list(dict.fromkeys(k for row in run.history for k in row))
    with atomic_write(out_dir / EPOCHS_FILE) as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(run.history)
