"""`make compare`: one table of the workspace and every experiment, with the params that differ
and the headline metrics, that fits a 160-column terminal. (tests/e2e runs it on real DVC output.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from twilbert.evaluation.predictions import Predictions, PredictionsFileError, format_predictions
from twilbert.reports.compare import (
    changed_params,
    compare_table,
    compare_task,
    experiment_rows,
    short_labels,
    task_specs,
    verdict_table,
)

CATEGORIES = {"P": 0, "N": 1, "NEU": 2}


def rev_data(n_encoders: int, lr: float, test: float) -> dict:
    params = {"model": {"name": "tiny", "n_encoders": n_encoders, "pkm_params": {"in_layers": []}},
              "finetuning": {"lr": lr}, "seed": 1,
              "tasks": {"tass_default": {"finetuning": {"lr": lr}, "task": {"categories": CATEGORIES}}}}
    return {
        "params": {"params.yaml": {"data": params}},
        "metrics": {
            "results/pretrain.json": {"data": {"heldout_mlm_loss": 5.5, "heldout_mlm_accuracy": 0.05,
                                               "heldout_rop_accuracy": 0.55, "epoch": 2}},
            "results/metrics.json": {"data": {"tass_default": {
                "test_official": test, "dev_official": test + 0.01,
                "baseline": {"test_official": 0.46, "dev_official": 0.41}}}},
        },
    }


def exp_show(*experiments: tuple[str, int, float, float]) -> list:
    """The shape of `dvc exp show --json` (DVC 3): the workspace, the baseline commit and its experiments."""
    base = rev_data(2, 0.001, 0.37)
    return [
        {"rev": "workspace", "name": None, "data": copy.deepcopy(base), "experiments": None},
        {"rev": "a" * 40, "name": "main", "data": copy.deepcopy(base), "experiments": [
            {"name": name, "executor": None,
             "revs": [{"rev": "b" * 40, "name": name, "data": rev_data(n, lr, test), "experiments": None}]}
            for name, n, lr, test in experiments
        ]},
    ]


def test_the_table_has_every_row_the_changed_params_and_the_test_scores():
    rows = experiment_rows(exp_show(("enc4", 4, 0.001, 0.42), ("lr", 2, 0.003, 0.39)))
    table = compare_table(rows)
    lines = table.splitlines()
    assert [r["name"] for r in rows] == ["workspace", "main", "enc4", "lr"]
    head = lines[1]  # under the line of groups (params, pretraining, each task)
    assert "n_encoders" in head and "test" in head and "mlm loss" in head
    assert "tass_default" in lines[0] and "pretrain held-out" in lines[0]
    enc4 = next(line for line in lines if line.startswith("| enc4"))
    assert "| 4 " in enc4 and "0.4200" in enc4
    assert "0.3700" in next(line for line in lines if line.startswith("| workspace"))
    assert "seed" not in head and "model.name" not in head  # unchanged params are left out
    assert max(map(len, lines)) <= 160


def test_params_and_metrics_split_into_two_tables_when_they_do_not_fit():
    rows = experiment_rows(exp_show(("enc4", 4, 0.001, 0.42)))
    table = compare_table(rows, width=60)
    assert table.count("experiment |") == 2
    assert "n_encoders" in table.split("\n\n")[0] and "tass_default" in table.split("\n\n")[1]


def test_changed_params_and_their_shortest_unique_labels():
    rows = experiment_rows(exp_show(("lr", 2, 0.003, 0.39)))
    params = changed_params(rows)
    assert params == ["finetuning.lr", "tasks.tass_default.finetuning.lr"]
    assert short_labels(params) == {"finetuning.lr": "finetuning.lr",
                                    "tasks.tass_default.finetuning.lr": "tass_default.finetuning.lr"}


def test_a_failed_experiment_is_a_row_with_dashes():
    shown = exp_show(("enc4", 4, 0.001, 0.42))
    shown[1]["experiments"][0]["revs"][0].update(data={}, error={"type": "ReproductionError", "msg": "x"})
    table = compare_table(experiment_rows(shown))
    assert "enc4 (failed)" in table


# --------------------------------------------------------------------------------------------
# Δ against the workspace with its interval and verdict
# --------------------------------------------------------------------------------------------

SPEC = task_specs({"tasks": {"t": {"task": {"categories": CATEGORIES}}}})["t"]
N_TEST = 600
GOLD = np.random.default_rng(0).integers(0, 3, size=N_TEST)
IDS = [f"tw{i}" for i in range(N_TEST)]


def predictions_text(right: float, seed: int, ids=IDS) -> str:
    """A run right on about ``right`` of the test tweets, as its predictions.tsv."""
    rng = np.random.default_rng(seed)
    pred = np.where(rng.random(N_TEST) < right, GOLD, (GOLD + rng.integers(1, 3, size=N_TEST)) % 3)
    return format_predictions(Predictions(list(ids), GOLD, pred, SPEC))


def test_compare_task_gives_the_delta_its_interval_and_verdict():
    workspace = [predictions_text(0.6, s) for s in (1, 2, 3)]
    same = compare_task(SPEC, workspace, list(workspace))
    assert same.delta == 0 and same.low <= 0 <= same.high and same.verdict == "within noise"
    better = compare_task(SPEC, workspace, [predictions_text(0.85, s) for s in (4, 5, 6)])
    assert 0.2 < better.delta and better.low > 0 and better.verdict == "better"
    assert compare_task(SPEC, [predictions_text(0.85, 4)], workspace).verdict == "worse"


def test_compare_task_refuses_runs_on_other_test_examples():
    other = predictions_text(0.6, 2, ids=["x"] + IDS[1:])
    with pytest.raises(PredictionsFileError, match="enc4 run 0 and workspace run 0 are not on the same test examples"):
        compare_task(SPEC, [predictions_text(0.6, 1)], [other], ("workspace", "enc4"))


def test_the_verdict_table_has_a_delta_and_a_verdict_per_task_for_each_experiment():
    rows = experiment_rows(exp_show(("enc4", 4, 0.001, 0.42), ("lr", 2, 0.003, 0.39), ("new", 2, 0.002, 0.4)))
    workspace = [predictions_text(0.6, s) for s in (1, 2, 3)]
    texts = {"workspace": {"tass_default": workspace}, "main": {"tass_default": list(workspace)},
             "enc4": {"tass_default": [predictions_text(0.4, s) for s in (4, 5, 6)]},
             "lr": {"tass_default": [predictions_text(0.6, s) for s in (7, 8, 9)]}}
    table = verdict_table(rows, texts)
    lines = table.splitlines()
    assert "tass_default" in lines[0]
    assert "Δ test vs workspace [95% CI]" in lines[1] and "verdict" in lines[1]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in lines[3:] if "|" in line}
    assert set(cells) == {"main", "enc4", "lr", "new"}  # every row but the workspace itself
    assert cells["main"][0].startswith("+0.00 [-") and cells["main"][1] == "within noise"  # the same runs
    delta = compare_task(task_specs(rows[0]["params_tree"])["tass_default"], workspace, texts["enc4"]["tass_default"])
    assert cells["enc4"] == [f"{100 * delta.delta:+.2f} [{100 * delta.low:+.2f}, {100 * delta.high:+.2f}]", "worse"]
    assert cells["lr"][1] == "within noise"
    assert cells["new"] == ["-", "-"]  # no predictions: nothing to pair
    assert "within noise: the interval holds 0" in table


def test_an_experiment_on_other_test_examples_is_marked_not_paired():
    rows = experiment_rows(exp_show(("enc4", 4, 0.001, 0.42)))
    texts = {"workspace": {"tass_default": [predictions_text(0.6, 1)]},
             "enc4": {"tass_default": [predictions_text(0.6, 2, ids=["x"] + IDS[1:])]}}
    line = next(line for line in verdict_table(rows, texts.get).splitlines() if line.startswith("| enc4"))
    assert "other test examples" in line
