"""DVC stage `evaluate`: the results tables from the metrics files of the tasks in params
(every model that ran on a task: metrics.json, baseline.json, ...)."""

import argparse
from pathlib import Path

from twilbert.results import collect, render_results, task_metrics_files, tracked_metrics, write_rendered
from twilbert.stage import load_stage_config, parse_args, run
from twilbert.track import Tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks-dir", type=Path, default=Path("results/tasks"))
    parser.add_argument("--out", type=Path, default=Path("results"))
    args, overrides = parse_args(parser)
    cfg, _ = load_stage_config(overrides)
    missing = [str(args.tasks_dir / name / "metrics.json") for name in cfg.tasks
               if not (args.tasks_dir / name / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"evaluate: missing per-task metrics {missing}; run the finetune stages")
    files = [f for name in cfg.tasks for f in task_metrics_files(args.tasks_dir / name)]
    shown = {name: task.compare_as for name, task in cfg.tasks.items() if task.compare_as}
    rendered = render_results(files, labels=shown)  # reads and checks every metrics file, writes nothing
    tracker = Tracker(cfg.tracking, stage="evaluate")
    # The store is probed before any output is written: under tracking.on_unreachable=fail nothing is.
    with tracker.start({"tasks": ",".join(sorted(cfg.tasks))}, run_name="evaluate"):
        write_rendered(rendered, args.out)
        tracker.log_metrics(tracked_metrics(collect(files)))
        for name in ("results.md", "results.csv"):
            tracker.log_artifact(args.out / name)
    print(rendered["results.md"])


if __name__ == "__main__":
    run(main)
