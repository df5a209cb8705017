import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from twilbert.config import TaskSpec
from twilbert.evaluation.predictions import Predictions, PredictionsFileError, write_predictions
from twilbert.reports.rendering import render_results, write_results
from twilbert.reports.results import MetricsFileError, aggregate, collect, task_metrics_files, tracked_metrics
from twilbert.reports.stats import paired_delta


def _split(**over):
    return {"mp": 0.5, "mr": 0.25, "mf1": 0.3333, "acc": 0.75, "official": 0.3333, **over}


def _metrics(task, model="twilbert", test_is_dev=False, metric="mf1", **test):
    return {"task": task, "model": model, "official_metric": metric, "best_epoch": 2,
            "protocol": "dev_as_test" if test_is_dev else "test_file",
            "test_is_dev": test_is_dev, "dev": _split(), "test": _split(**{"mf1": 0.4, "official": 0.4, **test})}


PLACES = {"metrics.json": "runs/s0/metrics.json", "baseline.json": "baseline/metrics.json"}  # a run; the TF-IDF row


def _write(root, task, name, data):
    path = root / task / PLACES.get(name, name)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    assert ("| coset17 | twilbert | test file | 1 | 50.00 | 25.00 | 33.33 | - | 75.00 | 50.00 | 25.00 | 40.00 | - | 75.00 "
            "| mf1 | 33.33 | 40.00 | - |") in rows
    assert ("| coset17 | tfidf | test file | 1 | 50.00 | 25.00 | 33.33 | - | 75.00 | 12.50 | 25.00 | 25.00 | - | 75.00 "
            "| mf1 | 33.33 | 25.00 | - |") in rows


def test_comparison_table_has_one_row_per_task_and_model_with_the_delta_to_the_tfidf_row(tasks_dir, tmp_path):
    md = write_results(_files(tasks_dir, "coset17", "tass20_es"), tmp_path / "out")
    comparison = md.split("## Models compared")[1]
    rows = _md_rows(comparison)
    assert rows[1:] == [  # no predictions files beside these: the point Δ alone, no interval nor verdict
        "| coset17 | mf1 | twilbert | test file | 1 | 33.33 | **40.00** | +15.00 | - |",
        "| coset17 | mf1 | tfidf | test file | 1 | 33.33 | 25.00 | - | - |",
        "| tass20_es † | mf1 | twilbert | dev as test | 1 | 33.33 | 40.00 | - | - |",
    ]


def test_test_is_dev_tasks_are_marked_with_a_note(tasks_dir, tmp_path):
    md = write_results(_files(tasks_dir, "tass20_es"), tmp_path / "out")
    assert "| tass20_es † | twilbert | dev as test | 1 |" in md and "dev split is reported as test" in md
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
    assert sum(r.startswith("| tass20_es | twilbert | carved dev | 1 |") for r in rows) == 1
    assert "| tass20_es | mf1 | twilbert | carved dev |" in md.split("## Models compared")[1]
    assert "| coset17 | twilbert | test file |" in md and "†" not in md.split("## Per task")[1]
    assert "*carved dev*" in md  # the legend explains each protocol
    table = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert [r["protocol"] for r in table] == ["carve_dev", "carve_dev", "test_file", "test_file"]


def test_multi_label_task_shows_micro_f1_beside_the_official_jaccard(tasks_dir, tmp_path):
    md = write_results(_files(tasks_dir, "semeval18_affect"), tmp_path / "out")
    row = next(r for r in _md_rows(md) if r.startswith("| semeval18_affect | twilbert"))
    assert row.endswith("| jaccard | 33.33 | 37.50 | micro_f1 50.00 |")


def test_csv_holds_every_number_of_the_metrics_files(tasks_dir, tmp_path):
    files = _files(tasks_dir, "coset17", "tass20_es", "semeval18_affect")
    write_results(files, tmp_path / "out")
    table = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert [(r["task"], r["model"], r["row"]) for r in table] == [
        (task, model, row) for task, model in [("coset17", "twilbert"), ("coset17", "tfidf"),
                                               ("tass20_es", "twilbert"), ("semeval18_affect", "twilbert")]
        for row in ("run", "mean")]
    for path, line in zip(files, table[::2]):
        data = json.loads(path.read_text())
        for split in ("dev", "test"):
            for key, value in data[split].items():
                assert float(line[f"{split}_{key}"]) == value, (path, split, key)
        assert line["official_metric"] == data["official_metric"] and line["test_is_dev"] == str(data["test_is_dev"])


def test_dvc_metrics_hold_each_task_and_model(tasks_dir, tmp_path):
    write_results(_files(tasks_dir, "coset17", "semeval18_affect"), tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["coset17"]["test_official"] == 0.4 and summary["coset17"]["dev_official"] == 0.3333
    assert summary["coset17"]["test_official_n"] == 1 and summary["coset17"]["test_official_sd"] is None
    assert summary["coset17"]["tfidf"]["test_official"] == 0.25
    assert summary["coset17"]["tfidf"]["test_mp"] == 0.125
    assert "baseline" not in summary["coset17"]  # `baseline` is the experiment `make repro` keeps
    assert summary["semeval18_affect"]["test_micro_f1"] == 0.5


def test_mlflow_metrics_equal_the_files(tasks_dir):
    flat = tracked_metrics(aggregate(collect(_files(tasks_dir, "coset17"))))
    assert flat["coset17.twilbert.test_official"] == 0.4 and flat["coset17.twilbert.test_official_n"] == 1
    assert flat["coset17.tfidf.test_mf1"] == 0.25
    assert "coset17.twilbert.test_official_sd" not in flat  # one run has no spread, and MLflow takes numbers only


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


def test_the_runs_come_first_and_duplicate_model_names_are_told_apart(tmp_path):
    _write(tmp_path, "gender17", "baseline.json", _metrics("gender17", "baseline"))
    _write(tmp_path, "gender17", "metrics.json", _metrics("gender17", "baseline"))  # finetuning.backbone: baseline
    files = task_metrics_files(tmp_path / "gender17")
    assert [f.relative_to(tmp_path / "gender17").as_posix() for f in files] == [
        "runs/s0/metrics.json", "baseline/metrics.json"]
    assert [g["model"] for g in aggregate(collect(files))] == ["tfidf", "tfidf (baseline)"]


def test_metrics_files_outside_the_runs_layout_are_not_read(tmp_path):
    """The layout before runs/s<seed>/ (metrics.json and baseline.json at the task folder's top) is gone."""
    _write(tmp_path, "coset17", "top/metrics.json", _metrics("coset17"))
    (tmp_path / "coset17" / "top" / "metrics.json").rename(tmp_path / "coset17" / "metrics.json")
    assert task_metrics_files(tmp_path / "coset17") == []
    with pytest.raises(MetricsFileError, match=r"coset17/metrics.json: not where a metrics file lives"):
        collect([tmp_path / "coset17" / "metrics.json"])


def test_a_json_that_is_not_a_metrics_object_is_named(tmp_path):
    other = _write(tmp_path, "coset17", "metrics.json", [1, 2, 3])
    with pytest.raises(MetricsFileError, match=r"runs/s0/metrics.json: not a metrics file \(a JSON list"):
        collect([other])


def test_no_metrics_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no per-task metrics"):
        write_results([], tmp_path)


def test_a_corrupt_metrics_file_is_named(tmp_path):
    bad = _write(tmp_path, "coset17", "metrics.json", {})
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
        "| coset17 | mf1 | twilbert | test file | 1 | 33.33 | 40.00 | +15.00 | - |",
        "| coset17 | mf1 | tfidf | test file | 1 | 33.33 | 25.00 | - | - |",
        "| coset17 | mf1 | hf | test file | 1 | 33.33 | **50.00** | +25.00 | - |",
    ]


# --------------------------------------------------------------------------------------------
# The layout of several runs: runs/s<seed>/ and baseline/, each with its predictions.tsv
# --------------------------------------------------------------------------------------------

SPEC = TaskSpec(categories={"P": 0, "N": 1, "NEU": 2})  # eval_metric f1, macro: the official metric is mf1
N_TEST = 300


def _noisy(gold, right, seed):
    """Predictions right on about ``right`` of the examples, wrong labels elsewhere."""
    rng = np.random.default_rng(seed)
    wrong = (gold + rng.integers(1, 3, size=len(gold))) % 3
    return np.where(rng.random(len(gold)) < right, gold, wrong)


def _write_run(folder, task, model, preds):
    folder.mkdir(parents=True)
    scores = preds.scores()
    (folder / "metrics.json").write_text(json.dumps({
        "task": task, "model": model, "official_metric": "mf1", "best_epoch": 2, "protocol": "test_file",
        "test_is_dev": False, "n_test": len(preds.ids), "dev": {**scores, "official": scores["official"] - 0.01},
        "test": scores}))
    write_predictions(folder / "predictions.tsv", preds)
    return scores


@pytest.fixture
def seeded(tmp_path):
    """coset17 with three twilbert runs (seeds 1, 2, 10) right on ~75% and a baseline right on ~55%."""
    root = tmp_path / "tasks"
    gold = np.random.default_rng(0).integers(0, 3, size=N_TEST)
    ids = [f"t{i}" for i in range(N_TEST)]
    runs = {seed: Predictions(ids, gold, _noisy(gold, 0.75, seed), SPEC) for seed in (1, 2, 10)}
    scores = {seed: _write_run(root / "coset17" / "runs" / f"s{seed}", "coset17", "twilbert", p)
              for seed, p in runs.items()}
    baseline = Predictions(ids, gold, _noisy(gold, 0.55, 99), SPEC)
    base_scores = _write_run(root / "coset17" / "baseline", "coset17", "baseline", baseline)
    return {"root": root, "gold": gold, "runs": runs, "scores": scores, "baseline": baseline,
            "base_scores": base_scores}


def _cell(mean, sd):
    return f"{100 * mean:.2f} ± {100 * sd:.2f}"


def test_runs_are_listed_by_seed_and_the_baseline_last(seeded):
    files = task_metrics_files(seeded["root"] / "coset17")
    assert [f.relative_to(seeded["root"] / "coset17").as_posix() for f in files] == [
        "runs/s1/metrics.json", "runs/s2/metrics.json", "runs/s10/metrics.json", "baseline/metrics.json"]


def test_three_runs_show_mean_plus_minus_sd_with_n_3(seeded, tmp_path):
    md = write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})
    tests = [seeded["scores"][s]["official"] for s in (1, 2, 10)]
    devs = [seeded["scores"][s]["official"] - 0.01 for s in (1, 2, 10)]
    accs = [seeded["scores"][s]["acc"] for s in (1, 2, 10)]
    row = next(r for r in _md_rows(md.split("## Per task")[1]) if r.startswith("| coset17 | twilbert"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "3"
    assert cells[11] == cells[16] == _cell(np.mean(tests), np.std(tests, ddof=1))  # test MF1, the official metric
    assert cells[13] == _cell(np.mean(accs), np.std(accs, ddof=1))
    assert cells[15] == _cell(np.mean(devs), np.std(devs, ddof=1))
    base = next(r for r in _md_rows(md.split("## Per task")[1]) if r.startswith("| coset17 | tfidf"))
    assert "| tfidf | test file | 1 |" in base and "±" not in base  # one deterministic run: its value


def test_the_comparison_gives_the_delta_to_the_baseline_with_its_interval_and_verdict(seeded, tmp_path):
    md = write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})
    expected = paired_delta(SPEC, seeded["gold"], [seeded["baseline"].pred],
                            [seeded["runs"][s].pred for s in (1, 2, 10)])
    assert expected.low > 0  # 75% against 55% right on 300 examples: a clear gain
    rows = _md_rows(md.split("## Models compared")[1])
    tests = [seeded["scores"][s]["official"] for s in (1, 2, 10)]
    interval = f"{100 * expected.delta:+.2f} [{100 * expected.low:+.2f}, {100 * expected.high:+.2f}]"
    assert rows[1] == (f"| coset17 | mf1 | twilbert | test file | 3 | "
                       f"{_cell(np.mean(tests) - 0.01, np.std(tests, ddof=1))} | "
                       f"**{_cell(np.mean(tests), np.std(tests, ddof=1))}** | {interval} | better |")
    assert abs(expected.delta - (np.mean(tests) - seeded["base_scores"]["official"])) < 1e-12
    assert rows[2].endswith("| - | - |")  # the baseline against itself: nothing
    assert "*within noise*" in md and "paired bootstrap" in md


def test_csv_holds_each_run_and_the_mean_row_with_its_sd(seeded, tmp_path):
    write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})
    table = list(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert [(r["model"], r["row"], r["seed"], r["n"]) for r in table] == [
        ("twilbert", "run", "1", "1"), ("twilbert", "run", "2", "1"), ("twilbert", "run", "10", "1"),
        ("twilbert", "mean", "", "3"), ("tfidf", "run", "", "1"), ("tfidf", "mean", "", "1")]
    tests = [seeded["scores"][s]["official"] for s in (1, 2, 10)]
    assert [float(r["test_official"]) for r in table[:3]] == tests
    assert float(table[3]["test_official"]) == pytest.approx(np.mean(tests), abs=1e-15)
    assert float(table[3]["test_official_sd"]) == pytest.approx(np.std(tests, ddof=1), abs=1e-15)
    assert table[0]["file"] == "runs/s1/metrics.json" and table[0]["test_official_sd"] == ""


def test_dvc_metrics_keep_the_mean_under_the_old_key_with_sd_and_n_beside(seeded, tmp_path):
    write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())["coset17"]
    tests = [seeded["scores"][s]["official"] for s in (1, 2, 10)]
    assert summary["test_official"] == pytest.approx(np.mean(tests), abs=1e-15)
    assert summary["test_official_sd"] == pytest.approx(np.std(tests, ddof=1), abs=1e-15)
    assert summary["test_official_n"] == 3
    assert list(summary)[:3] == ["test_official", "test_official_sd", "test_official_n"]
    assert summary["tfidf"]["test_official"] == seeded["base_scores"]["official"]
    assert summary["tfidf"]["test_official_n"] == 1 and summary["tfidf"]["test_official_sd"] is None


def test_the_same_files_render_the_same_bytes(seeded, tmp_path):
    files = task_metrics_files(seeded["root"] / "coset17")
    first = render_results(files, specs={"coset17": SPEC})
    assert render_results(list(reversed(files)), specs={"coset17": SPEC}) == first


def test_runs_on_other_test_examples_than_the_baseline_are_refused_naming_both(seeded, tmp_path):
    moved = seeded["baseline"]
    ids = ["other"] + moved.ids[1:]
    write_predictions(seeded["root"] / "coset17" / "baseline" / "predictions.tsv",
                      Predictions(ids, moved.gold, moved.pred, SPEC))
    with pytest.raises(PredictionsFileError, match=r"coset17/runs/s1/predictions.tsv and coset17/baseline/"
                                                   r"predictions.tsv are not on the same test examples"):
        write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})


def test_a_skipped_baseline_leaves_the_runs_without_a_delta(seeded, tmp_path):
    base = seeded["root"] / "coset17" / "baseline"
    (base / "metrics.json").write_text(json.dumps({"task": "coset17", "model": "baseline",
                                                   "skipped": "finetuning.baseline_row is false"}))
    (base / "predictions.tsv").unlink()
    md = write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})
    rows = _md_rows(md.split("## Models compared")[1])
    assert len(rows) == 2 and rows[1].endswith("| - | - |")


# --------------------------------------------------------------------------------------------
# The evaluate stage on the runs layout
# --------------------------------------------------------------------------------------------

TASS = TaskSpec(categories={"N": 0, "NEU": 1, "NONE": 2, "P": 3})  # tass_default in conf/


def _evaluate(workdir):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "CI": "1"}
    args = ["--tasks-dir", "results/tasks", "--out", "results", "--curves-out", "results/curves",
            "seed=1234"]  # an override, so that the stage composes conf/
    return subprocess.run([sys.executable, str(REPO / "stages" / "evaluate.py"), *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def stage_dir(tmp_path):
    (tmp_path / "conf").symlink_to(REPO / "conf")
    task = tmp_path / "results" / "tasks" / "tass_default"
    gold = np.random.default_rng(0).integers(0, 4, size=N_TEST)
    ids = [str(i) for i in range(N_TEST)]
    for seed in (0, 1, 2, 7):  # the default finetuning.seeds: 3, so s7 is a run left from another config
        pred = np.where(np.random.default_rng(seed + 1).random(N_TEST) < 0.5, gold, 3 - gold)
        _write_run(task / "runs" / f"s{seed}", "tass_default", "twilbert", Predictions(ids, gold, pred, TASS))
        (task / "runs" / f"s{seed}" / "epochs.csv").write_text(f"epoch,train_loss,dev_official\n1,1.0,0.{seed + 1}\n")
    _write_run(task / "baseline", "tass_default", "baseline", Predictions(ids, gold, 3 - gold, TASS))
    return tmp_path


def test_the_evaluate_stage_tables_the_runs_with_their_spread_and_the_delta_interval(stage_dir):
    proc = _evaluate(stage_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (stage_dir / "results" / "results.md").read_text()
    row = next(r for r in _md_rows(md.split("## Models compared")[1]) if "| twilbert |" in r)
    assert "| test file | 3 |" in row and " ± " in row and row.endswith("| better |")
    summary = json.loads((stage_dir / "results" / "metrics.json").read_text())["tass_default"]
    assert summary["test_official_n"] == 3 and summary["test_official_sd"] > 0
    for curve in ("train_loss", "dev_official"):
        curves = sorted(p.name for p in (stage_dir / "results" / "curves" / curve).glob("*.csv"))
        assert curves == ["tass_default-s0.csv", "tass_default-s1.csv", "tass_default-s2.csv"]  # every listed seed
    assert "0.1" in (stage_dir / "results" / "curves" / "dev_official" / "tass_default-s0.csv").read_text()


def test_the_evaluate_stage_refuses_runs_on_other_test_examples_in_one_line(stage_dir):
    path = stage_dir / "results" / "tasks" / "tass_default" / "baseline" / "predictions.tsv"
    path.write_text(path.read_text().replace("\n0\t", "\nzero\t", 1))
    proc = _evaluate(stage_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "tass_default/baseline/predictions.tsv" in line and "not on the same test examples" in line
    assert not (stage_dir / "results" / "results.md").exists()


@pytest.mark.reliability
def test_a_run_without_predictions_is_refused_naming_the_file(seeded, tmp_path):
    """#29: a missing seed's predictions.tsv left Δ over 2 of 3 runs (or no interval) without a word."""
    (seeded["root"] / "coset17" / "runs" / "s2" / "predictions.tsv").unlink()
    with pytest.raises(MetricsFileError, match=r"coset17/runs/s2/predictions.tsv: missing.*twilbert has 3 runs"):
        write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})
    assert not (tmp_path / "out").exists()


def test_scores_are_in_points_and_the_tfidf_row_is_named_apart_from_the_baseline_experiment(seeded, tmp_path):
    md = write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})
    assert "Scores in points" in md and "in %" not in md
    assert "Δ test vs tfidf [95% CI]" in md and "| baseline |" not in md


def test_every_pair_of_a_task_with_more_than_two_models_gets_its_delta(seeded, tmp_path):
    """The four-row table: the continued checkpoint, the checkpoint as it is, twilbert from scratch and
    TF-IDF; "did continuing help?" is the pair (continued, as it is), with its interval."""
    root, gold = seeded["root"], seeded["gold"]
    ids = seeded["baseline"].ids
    models = {"coset17_asis": (0.65, 20), "coset17_scratch": (0.45, 30)}
    for task, (right, seed) in models.items():
        preds = Predictions(ids, gold, _noisy(gold, right, seed), SPEC)
        _write_run(root / task / "runs" / "s1", task, "hf", preds)
    files = [f for t in ("coset17", *models) for f in task_metrics_files(root / t)]
    labels = {t: "coset17" for t in models}
    md = write_results(files, tmp_path / "out", labels=labels, specs={t: SPEC for t in ("coset17", *models)})
    rows = _md_rows(md.split("## Every pair compared")[1])
    assert rows[0] == "| Task | A | B | Δ test A − B [95% CI] | verdict |" and len(rows) == 1 + 6
    continued = [seeded["runs"][s].pred for s in (1, 2, 10)]
    asis = _noisy(gold, 0.65, 20)
    expected = paired_delta(SPEC, gold, [asis], continued)
    interval = f"{100 * expected.delta:+.2f} [{100 * expected.low:+.2f}, {100 * expected.high:+.2f}]"
    assert rows[2] == f"| coset17 | twilbert | hf | {interval} | {expected.verdict} |"  # continued − as it is
    assert rows[1].startswith("| coset17 | twilbert | tfidf |") and rows[6].startswith("| coset17 | hf | hf |")


def test_one_model_beside_tfidf_needs_no_pairs_table(seeded, tmp_path):
    md = write_results(task_metrics_files(seeded["root"] / "coset17"), tmp_path / "out", specs={"coset17": SPEC})
    assert "## Every pair compared" not in md


def test_two_models_without_a_tfidf_row_get_their_pair(seeded, tmp_path):
    """baseline_row: false on both: the comparison table has no Δ column to fill, the pair still has one."""
    root, gold, ids = seeded["root"], seeded["gold"], seeded["baseline"].ids
    _write_run(root / "coset17_asis" / "runs" / "s1", "coset17_asis", "hf", Predictions(ids, gold, _noisy(gold, 0.6, 5), SPEC))
    files = task_metrics_files(root / "coset17")[:-1] + task_metrics_files(root / "coset17_asis")
    md = write_results(files, tmp_path / "out", labels={"coset17_asis": "coset17"},
                       specs={"coset17": SPEC, "coset17_asis": SPEC})
    rows = _md_rows(md.split("## Every pair compared")[1])
    assert len(rows) == 2 and rows[1].startswith("| coset17 | twilbert | hf | ")


@pytest.mark.reliability
def test_the_evaluate_stage_refuses_a_listed_run_without_predictions_in_one_line(stage_dir):
    (stage_dir / "results" / "tasks" / "tass_default" / "runs" / "s1" / "predictions.tsv").unlink()
    proc = _evaluate(stage_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "results/tasks/tass_default/runs/s1/predictions.tsv" in line and "finetune@tass_default-s1" in line
    assert not (stage_dir / "results" / "results.md").exists()
