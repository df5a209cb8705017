"""Nothing of the user's is lost: `make baseline` and `make clean` refuse while a tracked file holds
edits that no commit or experiment keeps. A real git + DVC repository, real experiments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.reliability

STAGE = """stages:
  score:
    cmd: python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['lr'])" > results/score.txt
    params: [lr]
    outs:
      - results/score.txt:
          cache: false
"""


def sh(cmd: list[str], repo: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert not check or proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


def restore(repo: Path) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "twilbert.pipeline.experiments", "restore", "baseline"], repo, check=False)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A committed project with one stage, its run kept as `baseline` (what `make repro` ends with),
    then an experiment run in the workspace (`dvc exp run -S lr=2`)."""
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    (repo / "conf").mkdir()
    (repo / "conf" / "config.yaml").write_text("lr: 1\n")
    (repo / "params.yaml").write_text("lr: 1\n")
    (repo / "dvc.yaml").write_text(STAGE)
    (repo / "results" / "notes.md").write_text("committed notes\n")
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh(["dvc", "init", "-q"], repo)
    (repo / ".dvc" / "config").write_text("[core]\n    analytics = false\n    autostage = true\n")
    sh(["dvc", "repro", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "init"], repo)
    sh([sys.executable, "-m", "twilbert.pipeline.experiments", "save", "baseline"], repo)
    sh(["dvc", "exp", "run", "-q", "-n", "two", "-S", "lr=2"], repo)
    assert (repo / "results" / "score.txt").read_text() == "2\n"
    return repo


def test_make_baseline_after_an_experiment_run_restores_because_the_experiment_keeps_the_workspace(repo):
    proc = restore(repo)
    assert proc.returncode == 0, proc.stderr
    assert (repo / "params.yaml").read_text() == "lr: 1\n" and (repo / "results" / "score.txt").read_text() == "1\n"


def test_make_baseline_refuses_uncommitted_edits_naming_the_files_and_keeps_them(repo):
    (repo / "conf" / "config.yaml").write_text("lr: 7  # mine\n")
    (repo / "params.yaml").write_text("lr: 7  # mine too\n")
    proc = restore(repo)
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert "conf/config.yaml, params.yaml" in line and "git stash" in line and "git commit" in line
    assert "Traceback" not in proc.stderr
    # untouched, and DVC's own stash of the apply never ran
    assert (repo / "conf" / "config.yaml").read_text() == "lr: 7  # mine\n"
    assert (repo / "params.yaml").read_text() == "lr: 7  # mine too\n"
    assert (repo / "results" / "score.txt").read_text() == "2\n"
    assert sh(["git", "for-each-ref", "refs/exps/apply"], repo).stdout == ""
    # kept the way the message says, the restore goes through and the edits come back from `git stash list`
    sh(["git", "stash"], repo)
    assert restore(repo).returncode == 0
    assert (repo / "params.yaml").read_text() == "lr: 1\n"
    assert "lr: 7  # mine" in sh(["git", "stash", "show", "-p", "stash@{0}"], repo).stdout


def test_make_clean_refuses_while_results_hold_unkept_edits(repo):
    make = ["make", "-f", str(REPO / "Makefile"), f"VENV={Path(sys.executable).parent.parent}", "clean"]
    (repo / "results" / "notes.md").write_text("my analysis, not committed\n")
    proc = sh(make, repo, check=False)
    assert proc.returncode == 2 and "results/notes.md" in proc.stderr and "git stash" in proc.stderr
    assert (repo / "results" / "notes.md").read_text() == "my analysis, not committed\n"
    sh(["git", "checkout", "results/notes.md"], repo)  # results/ as committed or as the experiment left it
    assert sh(make, repo, check=False).returncode == 0
    assert not (repo / "results" / "notes.md").exists()
