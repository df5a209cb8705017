"""stages/py, the launcher of every dvc.yaml command: stages run with the project's Python even
from a fresh shell where no venv is activated (DVC would otherwise run the system `python`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BARE_PATH = "/usr/bin:/bin"  # a fresh shell: no venv on PATH


def launch(env: dict, cwd: Path) -> subprocess.CompletedProcess:
    code = "import twilbert, sys; print('ran', sys.argv[1])"
    return subprocess.run(["sh", str(REPO / "stages" / "py"), "-c", code, "hello"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def fake_venv(root: Path) -> None:
    """<root>/.venv/bin/python: the project's interpreter (here, the one running the tests)."""
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)


def test_without_an_activated_venv_the_projects_venv_runs_the_stage(tmp_path):
    fake_venv(tmp_path)
    env = {"PATH": BARE_PATH, "PYTHONPATH": str(REPO / "src"), "HOME": os.environ.get("HOME", "/tmp")}
    proc = launch(env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ran hello"


def test_a_queued_experiment_finds_the_venv_of_its_repository(tmp_path):
    fake_venv(tmp_path / "repo")
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp123"
    copy.mkdir(parents=True)
    env = {"PATH": BARE_PATH, "PYTHONPATH": str(REPO / "src"), "DVC_ROOT": str(tmp_path / "repo")}
    proc = launch(env, cwd=copy)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ran hello"


def test_with_no_python_that_has_twilbert_it_stops_with_one_line_saying_what_to_do(tmp_path):
    proc = launch({"PATH": BARE_PATH}, cwd=tmp_path)
    assert proc.returncode == 2
    assert "make setup" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
