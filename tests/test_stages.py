"""Stage scripts as a user runs them: bad input gets one clear line (no traceback) and no output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_stage(script: str, *args: str, cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CI": "1"}
    return subprocess.run([sys.executable, str(REPO / "stages" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "conf").symlink_to(REPO / "conf")
    return tmp_path


def test_unknown_params_key_is_named_and_nothing_is_written(workdir, tmp_path):
    proc = run_stage("data.py", "--out", "out", "+data.sorce=evomsa", cwd=workdir, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "data.sorce" in proc.stderr and "Traceback" not in proc.stderr
    assert not (workdir / "out").exists()


def test_task_without_files_is_reported_with_its_path(workdir, tmp_path):
    proc = run_stage(
        "finetune.py", "--task", "tass_default", "--model-out", "m", "--metrics-out", "r",
        "tasks.tass_default.dataset.data_dir=nowhere/hateval",
        cwd=workdir, tmp_path=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "nowhere/hateval" in proc.stderr or "models/pretrained" in proc.stderr
    assert not (workdir / "m").exists() and not (workdir / "r").exists()


def test_malformed_pair_corpus_names_file_and_line(workdir, tmp_path):
    bad = workdir / "pairs.tsv"
    bad.write_text("1\thola\t2\tque tal\n3\tsolo tres campos\t4\n", encoding="utf-8")
    proc = run_stage(
        "data.py", "--out", "out", "data.source=pairs_file", f"data.pairs_file={bad}", "data.pairs_header=false",
        cwd=workdir, tmp_path=tmp_path,
    )
    assert proc.returncode == 2
    assert f"{bad}:2:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (workdir / "out" / "pretrain" / "corpus.jsonl").exists()


def test_invalid_utf8_in_pair_corpus_names_file_and_line(workdir, tmp_path):
    bad = workdir / "pairs.tsv"
    bad.write_bytes(b"1\thola\t2\tque tal\n3\tmal \xff byte\t4\tok\n")
    proc = run_stage(
        "data.py", "--out", "out", "data.source=pairs_file", f"data.pairs_file={bad}", "data.pairs_header=false",
        cwd=workdir, tmp_path=tmp_path,
    )
    assert proc.returncode == 2
    assert f"{bad}:2:" in proc.stderr and "UTF-8" in proc.stderr


def test_bad_rows_within_max_bad_rows_are_reported_on_stderr_and_in_the_summary(workdir, tmp_path):
    bad = workdir / "pairs.tsv"
    bad.write_text("1\thola\t2\tque tal\n3\tsolo tres campos\t4\n5\tbien\t6\tbien\n", encoding="utf-8")
    proc = run_stage(
        "data.py", "--out", "out", "data.source=pairs_file", f"data.pairs_file={bad}", "data.pairs_header=false",
        "data.max_bad_rows=1", f"data.corpus_dir={workdir}", cwd=workdir, tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{bad}:2: expected 4 fields" in proc.stderr and "skipped" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bad_rows_skipped"] == 1 and summary["pretrain_texts"] == 2


def test_more_bad_rows_than_max_bad_rows_fail_naming_lines_and_the_key(workdir, tmp_path):
    bad = workdir / "tweets.txt"
    bad.write_bytes(b"uno\nmal \xff\ndos\npeor \xfe\n")
    proc = run_stage(
        "data.py", "--out", "out", "data.source=text_file", f"data.text_file={bad}", "data.max_bad_rows=1",
        cwd=workdir, tmp_path=tmp_path,
    )
    assert proc.returncode == 2
    assert f"{bad}:2: invalid UTF-8" in proc.stderr and f"{bad}:4: invalid UTF-8" in proc.stderr
    assert "data.max_bad_rows=1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (workdir / "out" / "pretrain" / "corpus.jsonl").exists()


def test_an_unknown_key_by_hand_gets_the_one_line_error_of_an_unknown_key_in_params_yaml(workdir, tmp_path):
    by_hand = run_stage("data.py", "--out", "out", "data.sorce=evomsa", cwd=workdir, tmp_path=tmp_path)
    plus = run_stage("data.py", "--out", "out", "+data.sorce=evomsa", cwd=workdir, tmp_path=tmp_path)
    assert by_hand.returncode == 2 and "Traceback" not in by_hand.stderr
    errors = [line for line in by_hand.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown config key(s): data.sorce" in errors[0]
    assert errors == [line for line in plus.stderr.splitlines() if line.startswith("error:")]


def test_bad_task_files_fail_before_an_mlflow_run_is_opened(workdir, tmp_path):
    proc = run_stage("finetune.py", "--task", "tass_default", "--model-out", "m", "--metrics-out", "r",
                     "tasks.tass_default.dataset.data_dir=nowhere/hateval", cwd=workdir, tmp_path=tmp_path)
    assert proc.returncode == 2 and "nowhere/hateval" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no store touched, so no FAILED run left behind


def test_the_default_task_under_another_corpus_source_fails_the_data_stage_at_once_in_one_line(workdir, tmp_path):
    corpus = workdir / "tweets.txt"
    corpus.write_text("uno\ndos\n", encoding="utf-8")
    proc = run_stage("data.py", "--out", "data", "--check-tasks", "data.source=text_file", f"data.text_file={corpus}",
                     cwd=workdir, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tasks.tass_default" in errors[0] and "data/default/train.tsv" in errors[0]
    assert "data.source: evomsa" in errors[0] and "Traceback" not in proc.stderr
    assert not (workdir / "data" / "pretrain").exists()  # nothing read, nothing written


def test_a_missing_task_file_fails_the_pretrain_stage_before_pretraining_in_one_line(workdir, tmp_path):
    task = workdir / "mytask"
    task.mkdir()
    (task / "train.tsv").write_text("ID\tTEXT\tCLASS\n1\thola\tN\n2\tbien\tP\n", encoding="utf-8")
    proc = run_stage("pretrain.py", "--pairs", "nowhere/pairs", "--vocab", "nowhere/vocab", "--out", "m",
                     "--check-tasks", "data/default", f"tasks.tass_default.dataset.data_dir={task}",
                     cwd=workdir, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tasks.tass_default" in errors[0] and f"{task}/dev.tsv" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "nowhere" not in proc.stderr  # the task is checked first
    assert not (workdir / "m").exists()


def test_a_stages_first_line_names_the_params_that_differ_from_conf(workdir, tmp_path):
    # as DVC runs it: through stages/py, which pins the numerics before Python starts (no restart)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CI": "1",
           "TWILBERT_PYTHON": sys.executable}
    proc = subprocess.run(["sh", str(REPO / "stages" / "py"), str(REPO / "stages" / "finetune.py"), "--task",
                           "tass_default", "model.n_encoders=4", "tasks.tass_default.dataset.data_dir=nowhere"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    first = proc.stderr.splitlines()[0]
    assert "params that differ from conf/:" in first and "model.n_encoders=4 (conf/: 2)" in first, first
    assert "tasks.tass_default.dataset.data_dir=nowhere (conf/: data/default)" in first


def test_params_equal_to_conf_say_so():
    from twilbert.config import compose
    from twilbert.pipeline.stage import describe_changes, param_changes

    raw = compose([], REPO / "conf")
    assert param_changes(raw, REPO / "conf") == []
    assert param_changes({**raw, "seed": raw["seed"] + 1}, REPO / "conf") == [
        f"seed={raw['seed'] + 1} (conf/: {raw['seed']})"]
    assert describe_changes(raw, []).startswith("params")
