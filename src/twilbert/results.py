"""Results tables (TWilBert's layout) regenerated from the per-task metrics files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable

from twilbert.io_utils import atomic_write

COLUMNS = ("mp", "mr", "mf1", "f1", "acc")
HEADERS = {"mp": "MP", "mr": "MR", "mf1": "MF1", "f1": "F1", "acc": "Acc"}


def collect(metrics_files: Iterable[Path]) -> list[dict]:
    rows = []
    for path in sorted(Path(p) for p in metrics_files):
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable metrics file ({err})") from None
    return rows


def _cell(split: dict, key: str) -> str:
    value = split.get(key)
    return "-" if value is None else f"{100 * value:.2f}"


def _label(row: dict) -> str:
    return f"{row['task']} †" if row.get("test_is_dev") else row["task"]


def markdown_table(rows: list[dict]) -> str:
    """Per task: dev and test MP, MR, MF1, F1, Acc, then the task's official metric on test."""
    head = ["Task", "Model"] + [f"dev {HEADERS[c]}" for c in COLUMNS] + [f"test {HEADERS[c]}" for c in COLUMNS]
    head += ["Official metric", "Official (test)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in rows:
        cells = [_label(row), row.get("model", "twilbert")]
        cells += [_cell(row["dev"], c) for c in COLUMNS] + [_cell(row["test"], c) for c in COLUMNS]
        cells += [row["official_metric"], _cell(row["test"], "official")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if any(r.get("test_is_dev") for r in rows):
        text += "\n† the task ships no test file: its dev split is reported as test.\n"
    return text


def csv_table(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["task", "model", "official_metric", "test_is_dev", "best_epoch"]
    fields += [f"{split}_{c}" for split in ("dev", "test") for c in (*COLUMNS, "official")]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: row.get(k) for k in fields[:5]}
        for split in ("dev", "test"):
            for c in (*COLUMNS, "official"):
                out[f"{split}_{c}"] = row[split].get(c)
        writer.writerow(out)
    return buf.getvalue()


def summary_metrics(rows: list[dict]) -> dict:
    """The DVC metrics file: each task's official test and dev scores."""
    return {
        row["task"]: {"test_official": row["test"]["official"], "dev_official": row["dev"]["official"],
                      **{f"test_{c}": row["test"][c] for c in COLUMNS if c in row["test"]}}
        for row in rows
    }


def write_results(metrics_files: Iterable[Path], out_dir: Path) -> str:
    """Write results.md, results.csv and metrics.json under ``out_dir``; return the markdown."""
    rows = collect(metrics_files)
    if not rows:
        raise ValueError("evaluate: no per-task metrics files found; did the finetune stages run?")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(rows)
    with atomic_write(out_dir / "results.md") as fh:
        fh.write("# twilbert results\n\nScores in %. MP/MR/MF1: macro precision/recall/F1; F1: F1 of the "
                 "task's class of interest; Acc: accuracy.\n\n" + md)
    with atomic_write(out_dir / "results.csv") as fh:
        fh.write(csv_table(rows))
    with atomic_write(out_dir / "metrics.json") as fh:
        json.dump(summary_metrics(rows), fh, indent=2)
    return md
