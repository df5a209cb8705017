"""`make compare`: one table of the workspace and every experiment, with the params that differ
and the headline metrics, that fits a 160-column terminal. (tests/e2e runs it on real DVC output.)"""

from __future__ import annotations

import copy

from twilbert.compare import changed_params, compare_table, experiment_rows, short_labels


def rev_data(n_encoders: int, lr: float, test: float) -> dict:
    params = {"model": {"name": "tiny", "n_encoders": n_encoders, "pkm_params": {"in_layers": []}},
              "finetuning": {"lr": lr}, "tasks": {"tass_default": {"finetuning": {"lr": lr}}}, "seed": 1}
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
