"""The `data` and `vocab` stages under real DVC in a temp git repo, on a user's plain-text corpus
(a gzip file and a plain one, picked by a glob in corpus/): the corpus files are dependencies, so
editing one in place reruns the pipeline from `data`, and a forced rerun of `vocab` writes the same bytes."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from twilbert.cli import dump_params
from twilbert.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import make_tweets  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COPY = ("conf", "stages", "src", "corpus", "dvc.yaml", ".dvcignore", ".gitignore")

pytestmark = pytest.mark.slow


def repro(repo: Path, env: dict, *args: str) -> list[str]:
    proc = subprocess.run(["dvc", "repro", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-dvc")
    repo = root / "repo"
    repo.mkdir()
    for name in COPY:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    (repo / "corpus" / "2019.txt.gz").write_bytes(
        gzip.compress("".join(t + "\n" for t, _ in make_tweets(120, seed=1)).encode("utf-8")))
    (repo / "corpus" / "2020.txt").write_text("".join(t + "\n" for t, _ in make_tweets(120, seed=2)), encoding="utf-8")
    conf_file = repo / "conf" / "config.yaml"
    conf = yaml.safe_load(conf_file.read_text(encoding="utf-8"))
    conf["data"].update(source="text_file", text_file="corpus/*.txt*")
    # the built-in task needs the default source: removed, as README "Your own data" says (the data stage checks)
    conf["defaults"] = [d for d in conf["defaults"] if not (isinstance(d, dict) and "task@tasks.tass_default" in d)]
    conf["tasks"] = {}
    conf["vocab"]["vocab_size"] = 80
    conf_file.write_text(yaml.safe_dump(conf, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (repo / "params.yaml").write_text(dump_params(compose([], repo / "conf")), encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "CI": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["git", "init", "-q", "-b", "main"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, env=env, check=True, capture_output=True)
    first = repro(repo, env, "vocab")
    return repo, env, first


def corpus_texts(repo: Path) -> list[str]:
    import json

    lines = (repo / "data" / "pretrain" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["a"] for line in lines]


def test_the_corpus_files_feed_data_then_vocab(project):
    repo, env, first = project
    assert first == ["data", "vocab"]
    assert len(corpus_texts(repo)) > 200  # both files, minus any duplicates
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    tracked = next(d for d in lock["stages"]["data"]["deps"] if d["path"] == "corpus")
    assert tracked["nfiles"] == 4  # the two corpus files, README.md and .gitignore
    assert repro(repo, env, "vocab") == []


def test_editing_a_corpus_file_in_place_reruns_from_data(project):
    repo, env, _ = project
    assert repro(repo, env, "vocab") == []
    with (repo / "corpus" / "2020.txt").open("a", encoding="utf-8") as fh:
        fh.write("un tuit nuevo escrito en el mismo archivo\n")
    ran = repro(repo, env, "vocab")
    assert ran[0] == "data" and ran == ["data", "vocab"]
    assert corpus_texts(repo)[-1] == "un tuit nuevo escrito en el mismo archivo"


def test_a_forced_vocab_rerun_writes_byte_identical_files(project):
    repo, env, _ = project
    vocab = repo / "data" / "vocab"
    before = {p.name: p.read_bytes() for p in vocab.iterdir()}
    lock = (repo / "dvc.lock").read_text(encoding="utf-8")
    assert repro(repo, env, "-f", "-s", "vocab") == ["vocab"]
    assert {p.name: p.read_bytes() for p in vocab.iterdir()} == before
    assert (repo / "dvc.lock").read_text(encoding="utf-8") == lock
