"""DVC stage `evaluate`: the results tables from the metrics files of the tasks in params
(every finetuning run, runs/s<seed>/metrics.json, and the TF-IDF row `tfidf`, baseline/metrics.json,
with their predictions.tsv for the Δ intervals: a listed run without one is refused), the finetuning
curves as DVC plot files, PNGs of every training curve. The experiment's scores on its MLflow parent
run come from `make`'s sync (twilbert.pipeline.mlflow_sync), which also runs when DVC skips this stage."""

import argparse
import json
import os
from pathlib import Path

from twilbert.config.runs import expand_seeds
from twilbert.numerics import describe
from twilbert.pipeline.stage import load_stage_config, parse_args, run
from twilbert.reports.plots import write_finetune_curves, write_pngs
from twilbert.reports.rendering import render_results, write_rendered
from twilbert.reports.results import (
    aggregate,
    collect,
    headline_metrics,
    task_metrics_files,
    tracked_metrics,
)
from twilbert.tracking.runs import Tracker


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks-dir", type=Path, default=Path("results/tasks"))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--pretrain-metrics", type=Path, help="results/pretrain.json: its held-out scores join the headline")
    parser.add_argument("--pretrain-curves", type=Path, help="the pretrain stage's curves (epochs.csv, steps.csv)")
    parser.add_argument("--curves-out", type=Path, help="finetuning curves as DVC plot files, one CSV per task")
    parser.add_argument("--plots-out", type=Path, help="PNGs of the curves, linked from results.md")
    args, overrides = parse_args(parser)
    cfg, raw = load_stage_config(overrides)
    # The runs params lists (finetune_runs): a run left by a seed no longer listed is not counted.
    runs = {f"{name}-s{seed}": args.tasks_dir / name / "runs" / f"s{seed}"
            for name in cfg.tasks for seed in expand_seeds(cfg.finetuning.seeds)}
    missing = [str(d / "metrics.json") for d in runs.values() if not (d / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"evaluate: missing finetuning runs {missing}; run the finetune stages")
    # Δ and its interval pair every run's predictions: one missing would shrink n without a word.
    missing = [name for name, d in runs.items() if not (d / "predictions.tsv").is_file()]
    if missing:
        files = ", ".join(str(runs[name] / "predictions.tsv") for name in missing)
        stages = " ".join(f"finetune@{name}" for name in missing)
        raise FileNotFoundError(f"evaluate: missing {files}; Δ pairs every listed run's predictions, so none is "
                                f"left out: `dvc checkout` or `dvc repro --force {stages}` brings it back")
    listed = {d / "metrics.json" for d in runs.values()}
    files = [f for name in cfg.tasks for f in task_metrics_files(args.tasks_dir / name)
             if f in listed or f.parent.parent.name != "runs"]
    shown = {name: task.compare_as for name, task in cfg.tasks.items() if task.compare_as}
    specs = {name: task.task for name, task in cfg.tasks.items()}
    header = f"Computed with {describe(cfg.runtime.portable_numerics)}."
    render_results(files, labels=shown, specs=specs, header=header)  # reads and checks every metrics file, writes nothing
    pretrain = None
    if args.pretrain_metrics and args.pretrain_metrics.is_file():
        pretrain = json.loads(args.pretrain_metrics.read_text(encoding="utf-8"))
    rows = aggregate(collect(files))
    headline = headline_metrics(rows, pretrain)
    tracker = Tracker(cfg.tracking, stage="evaluate")
    # The store is probed before any output is written: under tracking.on_unreachable=fail nothing is.
    with tracker.start({"tasks": ",".join(sorted(cfg.tasks))}, run_name="evaluate", experiment_params=raw):
        epochs = {name: run_dir / "epochs.csv" for name, run_dir in runs.items()}  # every seed's curves
        curves = write_finetune_curves(epochs, args.curves_out) if args.curves_out else {}
        best = {name: json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")).get("best_epoch")
                for name, run_dir in runs.items()}  # starred on the PNGs: the epoch each run kept
        pngs = write_pngs(args.plots_out, args.pretrain_curves, curves, best) if args.plots_out else []
        rendered = render_results(files, labels=shown, specs=specs, header=header,
                                  plots=[Path(os.path.relpath(p, args.out)).as_posix() for p in pngs])
        write_rendered(rendered, args.out)
        tracker.log_metrics(tracked_metrics(rows))
        for name in ("results.md", "results.csv"):
            tracker.log_artifact(args.out / name)
        for png in pngs:
            tracker.log_artifact(png, "plots")
    # No table printed here: `make repro` shows results/results.md once, also when this stage was cached.
    tests = ", ".join(f"{k.removesuffix('.test_official')} {v:.4f}" for k, v in headline.items()
                      if k.endswith(".test_official") and k.count(".") == 1)
    return f"test official: {tests}; {len(pngs)} plots -> {args.out}"


if __name__ == "__main__":
    run(main)
