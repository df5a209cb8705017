"""dvc.yaml's plots as a person reads them in `dvc plots show` / `dvc plots diff`: every axis has a
label, and each finetuning run's chart is titled with its task and seed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import REPO


def plots() -> list[dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["plots"]


def test_every_plot_definition_labels_both_axes():
    for entry in plots():
        (name, spec), = entry.items()
        assert spec.get("x_label") and spec.get("y_label"), f"dvc.yaml plot {name!r}: no x_label or y_label"
        assert spec["y_label"] != "y"


def test_the_finetune_curve_folders_leave_the_title_to_each_runs_file():
    # a title in a folder's definition is every file's title: the runs' charts could not be told apart
    folders = [spec for entry in plots() for name, spec in entry.items() if name.startswith("results/curves/finetune/")]
    assert len(folders) == 2 and all("title" not in spec for spec in folders)


def _write_curves(root: Path) -> None:
    pretrain = root / "results" / "curves" / "pretrain"
    pretrain.mkdir(parents=True)
    columns = ["epoch", "train_loss", "train_mlm_loss", "heldout_mlm_loss", "train_mlm_accuracy",
               "heldout_mlm_accuracy", "train_rop_accuracy", "heldout_rop_accuracy"]
    rows = [[1, 5.0, 4.5, 4.6, 0.1, 0.1, 0.5, 0.5], [2, 4.0, 3.5, 3.9, 0.2, 0.2, 0.6, 0.5]]
    (pretrain / "epochs.csv").write_text("\n".join(",".join(map(str, r)) for r in [columns, *rows]) + "\n")
    (pretrain / "steps.csv").write_text("step,loss,running_mlm_accuracy,running_rop_accuracy\n5,5.1,0.1,0.5\n"
                                        "10,4.2,0.2,0.6\n")
    for curve in ("train_loss", "dev_official"):
        folder = root / "results" / "curves" / "finetune" / curve
        folder.mkdir(parents=True)
        for seed in (0, 1, 2):
            (folder / f"tass-s{seed}.csv").write_text(f"epoch,{curve}\n1,0.{seed + 1}\n2,0.{seed + 4}\n")


def test_dvc_draws_each_finetune_run_under_a_title_naming_its_seed_and_no_axis_called_y(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, timeout=120)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots()}, sort_keys=False), encoding="utf-8")
    _write_curves(repo)
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    charts = {name: chart["content"] for name, drawn in shown["data"].items() for chart in drawn}
    finetune = {name: c["title"]["text"] for name, c in charts.items() if "/finetune/" in name}
    assert len(finetune) == 6 and len(set(finetune.values())) == 6
    for curve in ("train_loss", "dev_official"):
        assert sorted(re.search(r"-s(\d+)\.csv$", t).group(1) for n, t in finetune.items() if curve in n) == \
            ["0", "1", "2"]
    for name, content in charts.items():
        axis_titles = set(re.findall(r'"title": "([^"]+)"', json.dumps(content)))
        assert "y" not in axis_titles, f"{name}: an axis reads 'y'"
