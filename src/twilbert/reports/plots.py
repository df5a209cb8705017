"""The training curves, for people: DVC plot files of the finetuning curves (one CSV per task, beside
the pretraining ones) for `dvc plots show`, and static PNGs of every curve for readers of
results/results.md without DVC, written by the evaluate stage. The PNGs carry no timestamp or
version metadata: same curves, same bytes."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

from twilbert.io_utils import atomic_write
from twilbert.train.curves import EPOCHS_FILE, STEPS_FILE, write_csv

FINETUNE_COLUMNS = ("epoch", "train_loss", "dev_official")
PRETRAIN_LOSSES = ("train_loss", "train_mlm_loss", "heldout_mlm_loss")
PRETRAIN_ACCURACIES = ("train_mlm_accuracy", "heldout_mlm_accuracy", "train_rop_accuracy", "heldout_rop_accuracy")
STEP_ACCURACIES = ("running_mlm_accuracy", "running_rop_accuracy")


def read_rows(path: Path) -> list[dict[str, float]]:
    """A curves CSV as rows of numbers (an empty cell is NaN)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(fh)]


def finetune_curve(epochs_csv: Path) -> list[dict[str, float]]:
    """Train loss and dev official metric per epoch of a task's ``epochs.csv``; of a k-fold run,
    the first fold's (the folds' epochs would interleave on one x axis)."""
    rows = read_rows(epochs_csv)
    if rows and "fold" in rows[0]:
        first = min(r["fold"] for r in rows)
        rows = [r for r in rows if r["fold"] == first]
    return [{"epoch": int(r["epoch"]), **{k: r[k] for k in FINETUNE_COLUMNS[1:] if k in r}} for r in rows]


def write_finetune_curves(task_epochs: dict[str, Path], out_dir: Path) -> dict[str, list[dict]]:
    """``<out_dir>/<column>/<run>.csv`` (epoch and that column) for each run that has an epochs.csv:
    one folder per curve, so that ``dvc plots`` draws the loss and the dev score on axes of their own.
    Returns the curves by run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.csv"):  # the layout before one folder per curve
        stale.unlink()
    curves = {task: finetune_curve(path) for task, path in task_epochs.items() if Path(path).is_file()}
    for column in FINETUNE_COLUMNS[1:]:
        (out_dir / column).mkdir(exist_ok=True)
        for stale in (out_dir / column).glob("*.csv"):  # a run no longer in params
            if stale.stem not in curves:
                stale.unlink()
        for task, rows in curves.items():
            write_csv(out_dir / column / f"{task}.csv", [{"epoch": r["epoch"], column: r[column]} for r in rows
                                                         if column in r])
    return curves


def _figure(panels: Sequence[tuple[str, str, list[dict], Sequence[str]]], title: str,
            marks: Optional[dict[str, float]] = None):
    """One panel per (y label, x key, rows, curve keys); ``marks``: a curve key -> the x at which
    that curve gets a star (the selected epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    marks = marks or {}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, xkey, rows, keys) in zip(axes[0], panels):
        starred = False
        for key in keys:
            points = [(r[xkey], r[key]) for r in rows if key in r and not math.isnan(r[key])]
            if points:
                xs, ys = zip(*points)
                line, = ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
                at = [(x, y) for x, y in points if key in marks and x == marks[key]]
                if at:
                    ax.plot(*at[0], marker="*", markersize=13, color=line.get_color(), markeredgecolor="black",
                            markeredgewidth=0.6, linestyle="none", label=None if starred else "selected epoch")
                    starred = True
        ax.set_xlabel(xkey)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig, plt


def save_png(path: Path, panels, title: str, marks: Optional[dict[str, float]] = None) -> Path:
    fig, plt = _figure(panels, title, marks)
    with atomic_write(path, "wb", encoding=None, newline=None) as fh:
        fig.savefig(fh, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path


def write_pngs(out_dir: Path, pretrain_curves: Optional[Path], finetune: dict[str, list[dict]],
               selected: Optional[dict[str, int]] = None) -> list[Path]:
    """PNGs of the pretraining curves (per epoch, per logged step) and of each task's finetuning, every
    run (seed) of a task in one figure; ``selected``: each run's selected epoch (``<task>-s<seed>`` ->
    its ``best_epoch``), starred on its curves."""
    selected = selected or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if pretrain_curves is not None and (Path(pretrain_curves) / EPOCHS_FILE).is_file():
        epochs = read_rows(Path(pretrain_curves) / EPOCHS_FILE)
        written.append(save_png(out_dir / "pretrain_epochs.png", [
            ("loss", "epoch", epochs, PRETRAIN_LOSSES), ("accuracy", "epoch", epochs, PRETRAIN_ACCURACIES)],
            "pretraining per epoch"))
        steps_file = Path(pretrain_curves) / STEPS_FILE
        steps = read_rows(steps_file) if steps_file.is_file() else []
        if steps:
            written.append(save_png(out_dir / "pretrain_steps.png", [
                ("loss", "step", steps, ("loss",)), ("accuracy (epoch so far)", "step", steps, STEP_ACCURACIES)],
                "pretraining per logged step"))
    for task, runs in group_runs(finetune).items():
        # every seed's curves in one figure, so that the spread between runs shows
        rows = [{"epoch": r["epoch"], **{f"{key} {run}": r[key] for key in ("train_loss", "dev_official") if key in r}}
                for run, run_rows in runs.items() for r in run_rows]
        best = {run: selected.get(f"{task}-{run}", selected.get(task)) for run in runs}
        marks = {f"{key} {run}": epoch for run, epoch in best.items()
                 if isinstance(epoch, int) and any(r["epoch"] == epoch for r in runs[run])
                 for key in ("train_loss", "dev_official")}
        written.append(save_png(out_dir / f"finetune_{task}.png", [
            ("train loss", "epoch", rows, [f"train_loss {run}" for run in runs]),
            ("dev official metric", "epoch", rows, [f"dev_official {run}" for run in runs])],
            f"finetuning {task}" + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
            + (", ★ selected epoch" if marks else ""), marks))
    return written


def group_runs(curves: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    """``{"<task>-s<seed>": rows}`` as ``{task: {"s<seed>": rows}}``; a name without a seed is its own run."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for name, rows in curves.items():
        task, _, run = name.rpartition("-")
        if not (task and run[:1] == "s" and run[1:].isdigit()):
            task, run = name, "run"
        grouped.setdefault(task, {})[run] = rows
    return grouped
