"""One checkpoint folder per run (train/run_dirs.py): experiments never resume each other, disk stays bounded."""

from __future__ import annotations

import os

import pytest

from twilbert.train.run_dirs import KEEP_RUNS, run_directory

pytestmark = pytest.mark.reliability


def _open(root, n: int, **parts):
    return run_directory(root, f"{n}" * 64, {"config": "c", "inputs": "i", "code": "k", **parts})


def test_each_identity_gets_its_own_folder_and_the_same_identity_the_same_one(tmp_path):
    first = _open(tmp_path, 1)
    (first / "train_state").mkdir()
    assert first.name == "run-" + "1" * 16
    assert _open(tmp_path, 2, config="c2") != first
    assert _open(tmp_path, 1) == first and (first / "train_state").is_dir()  # going back finds its checkpoints


def test_a_stage_keeps_the_checkpoints_of_two_runs_and_deletes_older_ones_by_name(tmp_path, caplog):
    with caplog.at_level("INFO"):
        for n in range(1, 5):
            folder = _open(tmp_path, n, config=f"c{n}")
            (folder / "train_state").mkdir()
            os.utime(folder, ns=(n * 10**9, n * 10**9))  # opened one after the other, whatever the clock's grain
        current = _open(tmp_path, 5, config="c5")
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([current.name, "run-" + "4" * 16]) and len(kept) == KEEP_RUNS
    assert "run-" + "1" * 16 in caplog.text and "deleted the training checkpoints of an older run" in caplog.text


def test_a_new_run_names_what_changed_since_the_run_before(tmp_path, caplog):
    _open(tmp_path, 1)
    with caplog.at_level("INFO"):
        _open(tmp_path, 2, code="k2")
    assert "the code changed" in caplog.text and "starting fresh" in caplog.text


def test_checkpoints_of_the_layout_before_run_folders_are_deleted(tmp_path, caplog):
    for name in ("train_state", "superseded", "fold-0", "best", "last"):
        (tmp_path / name).mkdir()
    with caplog.at_level("INFO"):
        _open(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last", "run-" + "1" * 16]
    assert "layout before run folders" in caplog.text
