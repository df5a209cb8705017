"""Shared fixtures: a tiny config and vocabulary (tests make their own data; the helpers they share are in
helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from twilbert.config import compose, load_config

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # One torch thread in the test process and the stage processes it starts: the stages' own count
    # under portable numerics (so an in-process run and a stage's give the same bits, with or without
    # pytest-xdist), and `make test`'s workers, one per core, do not fight over the cores.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


SLOW_TESTS = REPO / "tests" / "slow_tests.txt"


def pytest_collection_modifyitems(config, items):
    # The tests listed in slow_tests.txt (measured, see scripts/slow_tests.py) are `slow` too:
    # `make test-fast` leaves them out, `make test` runs them.
    listed = {line.strip() for line in SLOW_TESTS.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid.split("[", 1)[0] in listed:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def tiny_raw() -> dict:
    raw = compose(["model=tiny"], REPO / "conf")
    raw["vocab"]["vocab_size"] = 120
    raw["representation"]["max_len"] = 16
    raw["training"]["epochs"] = 1
    raw["training"]["batch_size"] = 16
    raw["finetuning"]["epochs"] = 2
    return raw


@pytest.fixture
def tiny_cfg(tiny_raw):
    return load_config(tiny_raw)


@pytest.fixture
def in_project(project, monkeypatch):
    """The test file's ``project`` as the working directory, with no tracking or DVC variables leaking in."""
    monkeypatch.chdir(project)
    for var in ("MLFLOW_TRACKING_URI", "RANK", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    return project


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """A tiny SentencePiece vocabulary of generated tweets."""
    from helpers import build_vocab  # here, not at the top: helpers imports torch

    return build_vocab(tmp_path_factory.mktemp("vocab") / "vocab")
