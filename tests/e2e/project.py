"""A temp git + DVC repository holding a copy of this project, for the end-to-end tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO, fake_sdist, make_tweets

COPY = ("conf", "stages", "src", "corpus", "plots", "dvc.yaml", ".dvcignore", ".gitignore")


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def copy_project(root: Path) -> tuple[Path, str]:
    """``root/repo`` with the project's files, and a fake EvoMSA sdist (240 generated tweets) in
    ``root/cache`` that the data stage takes offline; returns the repo and the sdist's sha256."""
    repo = root / "repo"
    repo.mkdir()
    for name in COPY:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.rmtree(repo / "src" / "twilbert" / "__pycache__", ignore_errors=True)
    (root / "cache" / "twilbert").mkdir(parents=True)
    sha = fake_sdist(root / "cache" / "twilbert" / "evomsa-2.0.14.tar.gz", make_tweets(240, seed=5))
    return repo, sha


def project_env(root: Path) -> dict:
    """The environment of ``dvc`` and the stages: this venv first, the fake sdist's cache, the store in ``root``."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "XDG_CACHE_HOME": str(root / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "CI": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }


def commit_project(repo: Path, env: dict) -> None:
    """git and DVC initialised with the project's .dvc/config, everything committed."""
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "init"], repo, env)
