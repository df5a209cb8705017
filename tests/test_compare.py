"""`make compare`: one table of the workspace and every experiment, with the params that differ
and the headline metrics, that fits a 160-column terminal. (tests/e2e runs it on real DVC output.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from twilbert.evaluation.predictions import Predictions, PredictionsFileError, format_predictions
from twilbert.reports import compare
from twilbert.reports.compare import (
    changed_params,
    compare_table,
    compare_task,
    experiment_rows,
    run_predictions,
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
                "tfidf": {"test_official": 0.46, "dev_official": 0.41}}}},
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
    assert "| 4 " in enc4 and "42.00" in enc4
    assert "37.00" in next(line for line in lines if line.startswith("| workspace"))
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


def test_scores_read_in_points_and_the_tfidf_row_is_not_named_baseline():
    """`baseline` is the experiment `make repro` keeps; the TF-IDF row is `tfidf`, and every score is in
    points, as in the Δ table and results.md (the held-out MLM loss is a loss, not a score)."""
    table = compare_table(experiment_rows(exp_show(("enc4", 4, 0.001, 0.42))))
    head = table.splitlines()[1]
    assert "tfidf test" in head and "baseline" not in head and "tf-idf" not in head
    enc4 = next(line for line in table.splitlines() if line.startswith("| enc4"))
    cells = [c.strip() for c in enc4.split("|")[1:-1]]
    assert cells[2:] == ["5.5000", "5.00", "55.00", "43.00", "42.00", "46.00"]  # loss; mlm, rop acc; dev, test, tfidf
    assert "Scores in points" in table


def test_any_experiment_can_be_the_reference():
    rows = experiment_rows(exp_show(("enc4", 4, 0.001, 0.42), ("lr", 2, 0.003, 0.39)))
    enc4 = [predictions_text(0.4, s) for s in (4, 5, 6)]
    lr = [predictions_text(0.6, s) for s in (7, 8, 9)]
    table = verdict_table(rows, {"enc4": {"tass_default": enc4}, "lr": {"tass_default": lr}}, reference="enc4")
    assert "Δ test vs enc4 [95% CI]" in table
    line = next(line for line in table.splitlines() if line.startswith("| lr"))
    delta = compare_task(SPEC, enc4, lr)
    assert f"{100 * delta.delta:+.2f} [{100 * delta.low:+.2f}, {100 * delta.high:+.2f}]" in line and "better" in line


def test_an_unknown_reference_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(compare, "exp_show_json", lambda repo: exp_show(("enc4", 4, 0.001, 0.42)))
    assert compare.main(["--reference", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare: --reference 'nope' is no row here") and "enc4" in err and "\n" not in err


@pytest.mark.reliability
def test_a_run_without_predictions_is_said_as_n_of_in_the_verdict():
    """#29: Δ from 2 of 3 runs read like the Δ from all three; now the cell says n=2 of 3."""
    rows = experiment_rows(exp_show(("enc4", 4, 0.001, 0.42)))
    workspace = [predictions_text(0.6, s) for s in (1, 2, 3)]
    enc4 = [predictions_text(0.6, 4), None, predictions_text(0.6, 6)]
    line = next(line for line in verdict_table(rows, {"workspace": {"tass_default": workspace},
                                                      "enc4": {"tass_default": enc4}}).splitlines()
                if line.startswith("| enc4"))
    delta = compare_task(SPEC, workspace, [enc4[0], enc4[2]])
    assert f"{100 * delta.delta:+.2f} [" in line and "enc4 n=2 of 3" in line


@pytest.mark.reliability
def test_run_predictions_names_each_missing_file(tmp_path):
    runs = {f"tass_default-s{s}": {"task": "tass_default", "seed": s} for s in (0, 1, 2)}
    row = {"name": "workspace", "kind": "workspace", "params_tree": {"finetune_runs": runs}}
    for seed in (0, 2):
        folder = tmp_path / "results" / "tasks" / "tass_default" / "runs" / f"s{seed}"
        folder.mkdir(parents=True)
        (folder / "predictions.tsv").write_text(predictions_text(0.6, seed))
    missing = []
    texts = run_predictions(tmp_path, row, missing)
    assert [t is None for t in texts["tass_default"]] == [False, True, False]
    assert missing == ["workspace: results/tasks/tass_default/runs/s1/predictions.tsv"]
