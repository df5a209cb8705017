"""`make acceptance`: finetune TWilBert's 11 sample tasks on the pretrained model and write
results/acceptance/results.md, each task listed by its sample folder.

Each task's conf/task/<name>.yaml is composed with its data_dir pointed at <samples>/tasks/<folder>
and finetuned by the real finetune code. The samples hold ~20 tweets a split: the run checks that
every task shape loads, trains and is scored, not how well.

Extra key=value arguments are Hydra overrides, e.g. `finetuning.epochs=5`. Exits 2 when the run
cannot start (no samples), 1 when a task failed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from twilbert.config import Config, ConfigError, compose, load_config
from twilbert.model.card import read_card, row_width
from twilbert.pipeline.stage import parse_args, setup_logging
from twilbert.reports.rendering import write_results
from twilbert.reports.results import task_metrics_files
from twilbert.train.finetune.stage_work import baseline_task, finetune_task

log = logging.getLogger("twilbert")
REPO = Path(__file__).resolve().parents[1]

# conf/task/<name>.yaml -> its folder under <samples>/tasks/
SAMPLE_TASKS = {
    "coset17": "coset17",
    "irosva19_es": "irosva19/subtask_a",
    "gender17": "gender17",
    "stance17": "stance17",
    "haha19": "haha19",
    "haha18": "haha18",
    "tass19_es": "tass19/es",
    "tass20_es": "tass20/subtask1",
    "hateeval19": "hateeval19",
    "multistance18": "multistance18",
    "semeval18_affect": "semeval18_affect",
}
# A few epochs keep the 11 tasks to about a minute on 2 CPU cores. loss=auto picks cross-entropy
# for the single-label tasks and BCE for SemEval's multi-label one.
DEFAULT_OVERRIDES = ("finetuning.epochs=3", "finetuning.patience=3", "finetuning.batch_size=8", "finetuning.loss=auto")
TITLE = "twilbert acceptance: TWilBert's sample tasks"


class AcceptanceError(RuntimeError):
    """The acceptance run cannot start (no samples, no pretrained model) or a task failed."""


@dataclass
class AcceptanceReport:
    metrics_files: list[Path] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # task -> error
    seconds: dict[str, float] = field(default_factory=dict)
    table: str = ""


def sample_dirs(samples: Union[str, Path], names: Iterable[str]) -> dict[str, Path]:
    """The sample folder of each task; a clear error when the samples are not where expected."""
    root = Path(samples) / "tasks"
    if not root.is_dir():
        raise AcceptanceError(
            f"{root}: TWilBert's sample tasks not found. Point the run at the twilbert-samples folder "
            f"(the one holding tasks/coset17, ...): `make acceptance SAMPLES=/path/to/twilbert-samples`"
        )
    dirs = {name: root / SAMPLE_TASKS[name] for name in names}
    missing = [str(d) for d in dirs.values() if not d.is_dir()]
    if missing:
        raise AcceptanceError(f"{root}: sample task folders missing: {', '.join(missing)}")
    return dirs


def _merge_overrides(defaults: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """Defaults, less those whose key the caller overrides (Hydra rejects a key given twice)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [o for o in defaults if o.split("=", 1)[0] not in keys] + list(overrides)


def acceptance_config(
    samples: Union[str, Path],
    names: Optional[Iterable[str]] = None,
    overrides: Sequence[str] = (),
    conf_dir: Union[str, Path] = "conf",
) -> Config:
    """conf/ composed with the sample tasks (and nothing else) as ``tasks``, data read from ``samples``."""
    names = list(names or SAMPLE_TASKS)
    unknown = [n for n in names if n not in SAMPLE_TASKS]
    if unknown:
        raise AcceptanceError(f"no sample folder known for task(s) {unknown}; choose among {list(SAMPLE_TASKS)}")
    dirs = sample_dirs(samples, names)
    task_overrides = [f"+task@tasks.{name}={name}" for name in names]
    raw = compose(task_overrides + _merge_overrides(DEFAULT_OVERRIDES, overrides), conf_dir)
    tasks = {}
    for name in names:  # set after composing: a path needs no escaping for Hydra's grammar
        task = raw["tasks"][name]
        tasks[name] = {**task, "dataset": {**task["dataset"], "data_dir": str(dirs[name].resolve())}}
    raw["tasks"] = tasks
    return load_config(raw)


def ensure_pretrained(pretrained: Path, repro: bool = True) -> None:
    """The pretrained model, made by ``dvc repro pretrain`` when missing (and ``repro``)."""
    if (Path(pretrained) / "config.json").is_file():
        return
    if not repro:
        raise AcceptanceError(f"{pretrained}: no pretrained model; run `dvc repro pretrain` first")
    log.info("%s missing: running `dvc repro pretrain`", pretrained)
    if subprocess.run(["dvc", "repro", "pretrain"]).returncode != 0:
        raise AcceptanceError("`dvc repro pretrain` failed; see its output above")
    if not (Path(pretrained) / "config.json").is_file():
        raise AcceptanceError(f"{pretrained}: still no pretrained model after `dvc repro pretrain`; pass --pretrained")


def _check_lengths(cfg: Config, pretrained: Path) -> None:
    card = read_card(pretrained)
    if not card.fits(cfg.representation.max_len, 2):  # [CLS] a [SEP] b [SEP] for multiple-input tasks
        needed = row_width(cfg.representation.max_len, 2)
        raise AcceptanceError(
            f"representation.max_len={cfg.representation.max_len} needs {needed} positions but {pretrained} "
            f"has {card.max_positions}; use the max_len it was pretrained with"
        )


def run_acceptance(cfg: Config, pretrained: Path, out_dir: Path, models_dir: Path) -> AcceptanceReport:
    """Finetune every task of ``cfg``; write ``out_dir``/results.md from those that succeeded."""
    _check_lengths(cfg, pretrained)
    out_dir, models_dir = Path(out_dir), Path(models_dir)
    report = AcceptanceReport()
    for name, task in cfg.tasks.items():
        metrics_dir = out_dir / "tasks" / name
        shutil.rmtree(metrics_dir, ignore_errors=True)  # no stale metrics from an earlier run
        start = time.perf_counter()
        try:
            # the pipeline's layout (runs/s<seed>/ and baseline/), which the results tables read
            metrics = finetune_task(cfg, task, pretrained, models_dir / name, metrics_dir / "runs" / "s0",
                                    baseline_row=False)
            baseline_task(cfg, task, pretrained, models_dir / "tfidf" / name, metrics_dir / "baseline")
        except Exception as err:  # noqa: BLE001 - one broken task must not hide the others' results
            log.exception("acceptance: task %s failed", name)
            report.failures[name] = f"{type(err).__name__}: {err}"
            continue
        report.seconds[name] = time.perf_counter() - start
        report.metrics_files += task_metrics_files(metrics_dir)  # the run's, and the TF-IDF row's when it ran
        log.info("acceptance: %s (%s) test %s = %.4f in %.1fs", name, SAMPLE_TASKS.get(name, name),
                 metrics["official_metric"], metrics["test"]["official"], report.seconds[name])
    if report.metrics_files:
        labels = {name: SAMPLE_TASKS.get(name, name) for name in cfg.tasks}
        report.table = write_results(report.metrics_files, out_dir, labels=labels, title=TITLE)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, default=REPO.parent / "shared" / "data" / "twilbert-samples",
                        help="the twilbert-samples folder (holding tasks/)")
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--out", type=Path, default=Path("results/acceptance"))
    parser.add_argument("--models-out", type=Path, default=Path("models/acceptance"))
    parser.add_argument("--tasks", nargs="+", choices=list(SAMPLE_TASKS), help="a subset (default: all)")
    parser.add_argument("--no-repro", action="store_true", help="fail instead of running `dvc repro pretrain`")
    args, overrides = parse_args(parser, argv)
    try:
        cfg = acceptance_config(args.samples, args.tasks, overrides, REPO / "conf")
        ensure_pretrained(args.pretrained, repro=not args.no_repro)
        report = run_acceptance(cfg, args.pretrained, args.out, args.models_out)
    except (AcceptanceError, ConfigError) as err:
        log.error("acceptance: %s", err)
        return 2
    if report.table:
        print(report.table)
    if report.failures:
        for name, error in report.failures.items():
            log.error("acceptance: %s (%s) failed: %s", name, SAMPLE_TASKS[name], error)
        return 1
    log.info("acceptance: %d tasks in %.0fs -> %s", len(report.seconds), sum(report.seconds.values()),
             args.out / "results.md")
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
