import json

import pytest

from twilbert.results import write_results


def _metrics(task, test_is_dev=False):
    split = {"mp": 0.5, "mr": 0.25, "mf1": 0.3333, "acc": 0.75, "official": 0.3333}
    return {"task": task, "model": "twilbert", "official_metric": "mf1", "best_epoch": 2,
            "test_is_dev": test_is_dev, "dev": dict(split), "test": dict(split, mf1=0.4, official=0.4)}


def test_results_tables_hold_the_numbers_of_the_metrics_files(tmp_path):
    files = []
    for name, flag in (("coset17", False), ("tass20", True)):
        (tmp_path / name).mkdir()
        f = tmp_path / name / "metrics.json"
        f.write_text(json.dumps(_metrics(name, flag)))
        files.append(f)
    md = write_results(files, tmp_path / "out")
    assert "| coset17 | twilbert | 50.00 | 25.00 | 33.33 | - | 75.00 | 50.00 | 25.00 | 40.00 | - | 75.00 | mf1 | 40.00 |" in md
    assert "tass20 †" in md and "dev split is reported as test" in md
    csv_text = (tmp_path / "out" / "results.csv").read_text()
    assert csv_text.splitlines()[1].startswith("coset17,twilbert,mf1,False,2,0.5,0.25")
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["coset17"]["test_official"] == 0.4


def test_no_metrics_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no per-task metrics"):
        write_results([], tmp_path)


def test_a_corrupt_metrics_file_is_named(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json"):
        write_results([bad], tmp_path / "out")
