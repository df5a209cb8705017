import csv
import io
import json

import pytest

from twilbert.results import collect, task_metrics_files, tracked_metrics, write_results


def _split(**over):
    return {"mp": 0.5, "mr": 0.25, "mf1": 0.3333, "acc": 0.75, "official": 0.3333, **over}


def _metrics(task, model="twilbert", test_is_dev=False, metric="mf1", **test):
    return {"task": task, "model": model, "official_metric": metric, "best_epoch": 2,
            "test_is_dev": test_is_dev, "dev": _split(), "test": _split(**{"mf1": 0.4, "official": 0.4, **test})}


def _write(root, task, name, data):
    (root / task).mkdir(exist_ok=True)
    path = root / task / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tasks_dir(tmp_path):
    root = tmp_path / "tasks"
    root.mkdir()
    _write(root, "coset17", "metrics.json", _metrics("coset17"))
    _write(root, "coset17", "baseline.json", _metrics("coset17", "baseline", official=0.25, mf1=0.25, mp=0.125))
    _write(root, "tass20_es", "metrics.json", _metrics("tass20_es", test_is_dev=True))
    _write(root, "semeval18_affect", "metrics.json",
           _metrics("semeval18_affect", metric="jaccard", official=0.375, jaccard=0.375, micro_f1=0.5, macro_f1=0.4))
    return root


def _files(root, *tasks):
    return [f for t in tasks for f in task_metrics_files(root / t)]


def _md_rows(md):
    return [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]


def test_twilbert_table_holds_the_numbers_of_every_metrics_file(tasks_dir, tmp_path):
    md = write_results(_files(tasks_dir, "coset17", "tass20_es"), tmp_path / "out")
    rows = _md_rows(md)
    assert ("| coset17 | twilbert | test file | 50.00 | 25.00 | 33.33 | - | 75.00 | 50.00 | 25.00 | 40.00 | - | 75.00 "
            "| mf1 | 33.33 | 40.00 | - |") in rows
    assert ("| coset17 | baseline | test file | 50.00 | 25.00 | 33.33 | - | 75.00 | 12.50 | 25.00 | 25.00 | - | 75.00 "
            "| mf1 | 33.33 | 25.00 | - |") in rows


def test_comparison_table_has_one_row_per_task_and_model_with_the_delta_to_the_baseline(tasks_dir, tmp_path):
    md = write_results(_files(tasks_dir, "coset17", "tass20_es"), tmp_path / "out")
    comparison = md.split("## Models compared")[1]
    rows = _md_rows(comparison)
    assert rows[1:] == [
        "| coset17 | mf1 | twilbert | test file | 33.33 | **40.00** | +15.00 |",
        "| coset17 | mf1 | baseline | test file | 33.33 | 25.00 | - |",
        "| tass20_es † | mf1 | twilbert | dev as test | 33.33 | 40.00 | - |",
    ]


def test_test_is_dev_tasks_are_marked_with_a_note(tasks_dir, tmp_path):
    md = write_results(_files(tasks_dir, "tass20_es"), tmp_path / "out")
    assert "| tass20_es † | twilbert | dev as test |" in md and "dev split is reported as test" in md
    md = write_results(_files(tasks_dir, "coset17"), tmp_path / "out2")
    assert "†" not in md


def test_each_row_names_its_protocol_in_both_tables_and_the_csv(tmp_path):
    root = tmp_path / "tasks"
    root.mkdir()
    carved = {**_metrics("tass20_es"), "protocol": "carve_dev"}
    files = [_write(root, "tass20_es", "metrics.json", carved),
             _write(root, "coset17", "metrics.json", {**_metrics("coset17"), "protocol": "test_file"})]
    md = write_results(files, tmp_path / "out")
    rows = _md_rows(md)
    assert sum(r.startswith("| tass20_es | twilbert | carved dev |") for r in rows) == 1
    assert "| tass20_es | mf1 | twilbert | carved dev |" in md.split("## Models compared")[1]
    assert "| coset17 | twilbert | test file |" in md and "†" not in md.split("## Per task")[1]
    assert "*carved dev*" in md  # the legend explains each protocol
    table = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert [r["protocol"] for r in table] == ["carve_dev", "test_file"]


def test_multi_label_task_shows_micro_f1_beside_the_official_jaccard(tasks_dir, tmp_path):
    md = write_results(_files(tasks_dir, "semeval18_affect"), tmp_path / "out")
    row = next(r for r in _md_rows(md) if r.startswith("| semeval18_affect | twilbert"))
    assert row.endswith("| jaccard | 33.33 | 37.50 | micro_f1 50.00 |")


def test_csv_holds_every_number_of_the_metrics_files(tasks_dir, tmp_path):
    files = _files(tasks_dir, "coset17", "tass20_es", "semeval18_affect")
    write_results(files, tmp_path / "out")
    table = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert [(r["task"], r["model"]) for r in table] == [
        ("coset17", "twilbert"), ("coset17", "baseline"), ("tass20_es", "twilbert"), ("semeval18_affect", "twilbert")]
    for path, line in zip(files, table):
        data = json.loads(path.read_text())
        for split in ("dev", "test"):
            for key, value in data[split].items():
                assert float(line[f"{split}_{key}"]) == value, (path, split, key)
        assert line["official_metric"] == data["official_metric"] and line["test_is_dev"] == str(data["test_is_dev"])


def test_dvc_metrics_hold_each_task_and_model(tasks_dir, tmp_path):
    write_results(_files(tasks_dir, "coset17", "semeval18_affect"), tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["coset17"]["test_official"] == 0.4 and summary["coset17"]["dev_official"] == 0.3333
    assert summary["coset17"]["baseline"]["test_official"] == 0.25
    assert summary["coset17"]["baseline"]["test_mp"] == 0.125
    assert summary["semeval18_affect"]["test_micro_f1"] == 0.5


def test_mlflow_metrics_equal_the_files(tasks_dir):
    flat = tracked_metrics(collect(_files(tasks_dir, "coset17")))
    assert flat["coset17.twilbert.test_official"] == 0.4
    assert flat["coset17.baseline.test_mf1"] == 0.25


def test_kfold_numbers_reach_the_csv(tmp_path):
    data = _metrics("haha19")
    data["kfold"] = {"n_folds": 5, "mean": {"official": 0.61}, "blended_test": {"official": 0.64}}
    path = _write(tmp_path, "haha19", "metrics.json", data)
    write_results([path], tmp_path / "out")
    line = next(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert (line["kfold_n_folds"], line["kfold_mean_official"], line["kfold_blended_test_official"]) == ("5", "0.61", "0.64")


def test_labels_rename_tasks_in_the_tables_only(tasks_dir, tmp_path):
    md = write_results(_files(tasks_dir, "coset17"), tmp_path / "out", labels={"coset17": "coset17/folder"})
    assert "| coset17/folder | twilbert |" in md
    line = next(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert (line["task"], line["label"]) == ("coset17", "coset17/folder")


def test_primary_metrics_file_comes_first_and_duplicate_model_names_are_told_apart(tmp_path):
    _write(tmp_path, "gender17", "baseline.json", _metrics("gender17", "baseline"))
    _write(tmp_path, "gender17", "metrics.json", _metrics("gender17", "baseline"))
    files = task_metrics_files(tmp_path / "gender17")
    assert [f.name for f in files] == ["metrics.json", "baseline.json"]
    assert [r["model"] for r in collect(files)] == ["baseline", "baseline (baseline)"]


def test_a_json_that_is_not_a_metrics_file_is_left_out(tmp_path):
    good = _write(tmp_path, "coset17", "metrics.json", _metrics("coset17"))
    other = _write(tmp_path, "coset17", "predictions.json", [1, 2, 3])
    assert [r["file"] for r in collect([good, other])] == ["metrics.json"]


def test_no_metrics_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no per-task metrics"):
        write_results([], tmp_path)


def test_a_corrupt_metrics_file_is_named(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json"):
        write_results([bad], tmp_path / "out")


def test_a_metrics_file_without_scores_is_named_with_the_missing_keys(tmp_path):
    bad = _write(tmp_path, "coset17", "metrics.json", {"task": "coset17", "official_metric": "mf1", "dev": {}})
    with pytest.raises(ValueError, match=r"metrics\.json: metrics file lacks \['test'\]"):
        write_results([bad], tmp_path / "out")


def test_a_skipped_baseline_file_is_left_out(tmp_path):
    good = _write(tmp_path, "coset17", "metrics.json", _metrics("coset17"))
    skipped = _write(tmp_path, "coset17", "baseline.json",
                     {"task": "coset17", "model": "baseline", "skipped": "finetuning.baseline_row is false"})
    assert [r["model"] for r in collect([good, skipped])] == ["twilbert"]


def test_a_task_compared_as_another_joins_its_rows_in_the_comparison(tasks_dir, tmp_path):
    """Our encoder, an HF backbone and the baseline on one benchmark: the HF run is a second task
    entry (`compare_as: coset17`) and its row sits with coset17's, scored against the same baseline."""
    _write(tasks_dir, "coset17_beto", "metrics.json", _metrics("coset17_beto", "hf", official=0.5, mf1=0.5))
    md = write_results(_files(tasks_dir, "coset17", "coset17_beto"), tmp_path / "out",
                       labels={"coset17_beto": "coset17"})
    rows = _md_rows(md.split("## Models compared")[1])
    assert rows[1:] == [
        "| coset17 | mf1 | twilbert | test file | 33.33 | 40.00 | +15.00 |",
        "| coset17 | mf1 | baseline | test file | 33.33 | 25.00 | - |",
        "| coset17 | mf1 | hf | test file | 33.33 | **50.00** | +25.00 |",
    ]
