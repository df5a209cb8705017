"""The acceptance run (`make acceptance`): sample tasks finetuned by the real code, one table;
and the documented grid search (a 4-point DVC queue) in a temp copy of the project.

The tests generate sample folders in TWilBert's layouts and a tiny pretrained model; one slow test
runs two of the real samples (../shared/data/twilbert-samples) when they are at hand.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from helpers import WORDS, fake_sdist, load_acceptance_script, make_tweets
from twilbert.cli import dump_params
from twilbert.config import compose, load_config
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.model.card import ModelCard
from twilbert.model.io import save_pretrained
from twilbert.train.pretrain import build_pretraining_model
from twilbert.train.pretrain_run import resolve_pretrain_run

REPO = Path(__file__).resolve().parents[1]
acceptance = load_acceptance_script()
SAMPLE_TASKS, AcceptanceError = acceptance.SAMPLE_TASKS, acceptance.AcceptanceError
acceptance_config, run_acceptance = acceptance.acceptance_config, acceptance.run_acceptance
REAL_SAMPLES = Path(os.environ.get("TWILBERT_SAMPLES", REPO.parent / "shared" / "data" / "twilbert-samples"))
MAX_LEN = ["representation.max_len=16"]  # the tiny pretrained model's positions


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny, untrained TWilBert with its vocabulary: what the pretrain stage's output looks like."""
    root = tmp_path_factory.mktemp("pretrained")
    raw = compose(MAX_LEN, REPO / "conf")
    raw["vocab"]["vocab_size"] = 120
    cfg = load_config(raw)
    train_vocab([t for t, _ in make_tweets(200)], root / "vocab", cfg.vocab, cfg.preprocess)
    tokenizer = Tokenizer(root / "vocab")
    model = build_pretraining_model(resolve_pretrain_run(cfg), tokenizer.vocab_size)
    card = ModelCard.pretrained(cfg.model, tokenizer.vocab_size, cfg.representation.max_len)
    save_pretrained(root / "model", model, card)
    tokenizer.copy_to(root / "model")
    return root / "model"


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def make_samples(root: Path, n: int = 16, seed: int = 0) -> Path:
    """Sample folders for three task shapes, in TWilBert's layouts: multiple input (multistance18),
    multi-label (semeval18_affect), train/dev only (tass20/subtask1/{train,dev}/es.tsv)."""
    rng = random.Random(seed)
    stances = ["FAVOR", "AGAINST", "NEUTRAL"]
    for split in ("train", "dev", "test"):
        _write(root / "tasks/multistance18" / f"{split}.csv", ["ID", "TEXT", "PREV", "NEXT", "CLASS"],
               [[f"m{i}", _text(rng), _text(rng), _text(rng), stances[i % 3]] for i in range(n)])
        _write(root / "tasks/semeval18_affect" / f"{split}.csv", ["ID", "TEXT", "CLASS"],
               [[f"s{i}", _text(rng), "|".join(rng.choice("01") for _ in range(11))] for i in range(n)])
    for split in ("train", "dev"):
        _write(root / "tasks/tass20/subtask1" / split / "es.tsv", ["ID", "TEXT", "CLASS"],
               [[f"t{i}", _text(rng), "N NEU P".split()[i % 3]] for i in range(n)])
    return root


GENERATED = ["multistance18", "semeval18_affect", "tass20_es"]


def test_missing_samples_folder_fails_with_a_clear_message(tmp_path):
    with pytest.raises(AcceptanceError, match=r"sample tasks not found.*make acceptance SAMPLES="):
        acceptance_config(tmp_path / "nowhere")


def test_a_missing_task_folder_is_named(tmp_path):
    make_samples(tmp_path)
    with pytest.raises(AcceptanceError, match=r"tasks/coset17"):
        acceptance_config(tmp_path, ["coset17"])


def test_script_exits_2_without_samples(tmp_path, caplog):
    assert acceptance.main(["--samples", str(tmp_path)]) == 2
    assert "SAMPLES=" in caplog.text


def test_config_holds_only_the_sample_tasks_read_from_their_folders(tmp_path):
    make_samples(tmp_path)
    cfg = acceptance_config(tmp_path, GENERATED, ["finetuning.epochs=1"], REPO / "conf")
    assert list(cfg.tasks) == GENERATED
    assert cfg.tasks["tass20_es"].dataset.data_dir == str((tmp_path / "tasks/tass20/subtask1").resolve())
    assert cfg.finetuning.epochs == 1 and cfg.finetuning.loss == "auto"  # the caller's value wins


def test_generated_samples_finetune_end_to_end_into_one_table(tmp_path, pretrained):
    make_samples(tmp_path / "samples")
    cfg = acceptance_config(tmp_path / "samples", GENERATED,
                            [*MAX_LEN, "finetuning.epochs=2", "finetuning.baseline_row=true"], REPO / "conf")
    report = run_acceptance(cfg, pretrained, tmp_path / "out", tmp_path / "models")
    assert report.failures == {}
    md = (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    for name in GENERATED:
        metrics = json.loads((tmp_path / "out/tasks" / name / "runs" / "s0" / "metrics.json").read_text())
        protocol = "carved dev" if name == "tass20_es" else "test file"  # no test file: honest by default
        row = next(line for line in md.splitlines()  # ⚠: a tiny run may predict a single class
                   if re.match(rf"\| {re.escape(SAMPLE_TASKS[name])} \| twilbert( ⚠)? \| {protocol} \|", line))
        assert f"| {metrics['official_metric']} | {100 * metrics['dev']['official']:.2f} " \
               f"| {100 * metrics['test']['official']:.2f} |" in row
    assert (tmp_path / "models" / "multistance18" / "config.json").is_file()
    comparison = md.split("## Models compared")[1]
    assert re.search(r"\| multistance18 \| stance_f1 \| twilbert( ⚠)? \|", comparison)
    assert re.search(r"\| multistance18 \| stance_f1 \| tfidf( ⚠)? \|", comparison)  # finetuning.baseline_row


def test_a_failing_task_is_reported_and_the_others_still_tabled(tmp_path, pretrained):
    make_samples(tmp_path / "samples")
    cfg = acceptance_config(tmp_path / "samples", ["multistance18", "tass20_es"],
                            [*MAX_LEN, "finetuning.epochs=1"], REPO / "conf")
    (tmp_path / "samples/tasks/multistance18/dev.csv").write_text("ID\tTEXT\tCLASS\n", encoding="utf-8")
    report = run_acceptance(cfg, pretrained, tmp_path / "out", tmp_path / "models")
    assert list(report.failures) == ["multistance18"] and "NEXT" in report.failures["multistance18"]
    assert "| tass20/subtask1 |" in report.table and "multistance18" not in report.table


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_SAMPLES / "tasks").is_dir(), reason=f"{REAL_SAMPLES} not present")
def test_two_real_sample_tasks_run_through_the_acceptance_path(tmp_path, pretrained):
    names = ["multistance18", "semeval18_affect"]
    cfg = acceptance_config(REAL_SAMPLES, names, [*MAX_LEN, "finetuning.epochs=2"], REPO / "conf")
    report = run_acceptance(cfg, pretrained, tmp_path / "out", tmp_path / "models")
    assert report.failures == {}
    assert {f.relative_to(tmp_path / "out" / "tasks").parts[0] for f in report.metrics_files} == set(names)
    for name in names:  # a tiny model on 19 examples may be flagged ⚠ (train/degenerate.py); the row is there either way
        assert re.search(rf"^\| {name} \| twilbert( ⚠)? \|", report.table, re.M), report.table


# --------------------------------------------------------------------------------------------
# Grid search: a 4-point DVC queue in a temp copy of the project
# --------------------------------------------------------------------------------------------

PROJECT_FILES = ("conf", "stages", "src", "corpus", "dvc.yaml", ".dvcignore", ".gitignore")
GRID = ["-S", "finetuning.lr=1e-3,1e-4", "-S", "finetuning.batch_size=16,32"]
# The persisted pretraining checkpoints are untracked: copied in, the queued runs skip pretraining.
KEEP_PRETRAINED = ["-C", "models/checkpoints/pretrain"]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _copy_project(repo: Path) -> None:
    for name in PROJECT_FILES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, repo / name)


def _tiny_project(root: Path) -> tuple[Path, dict]:
    """The project in a fresh git + DVC repo, shrunk to seconds a stage, its baseline reproduced and
    committed. The `data` stage reads a generated EvoMSA-shaped tarball from the download cache."""
    repo = root / "repo"
    repo.mkdir()
    _copy_project(repo)
    cache = root / "cache"
    (cache / "twilbert").mkdir(parents=True)
    sha = fake_sdist(cache / "twilbert" / "evomsa-2.0.14.tar.gz", make_tweets(160, seed=3))
    conf_file = repo / "conf" / "config.yaml"
    conf = yaml.safe_load(conf_file.read_text(encoding="utf-8"))
    conf["data"]["evomsa_sha256"] = sha
    conf["vocab"]["vocab_size"] = 120
    conf["representation"]["max_len"] = 16
    conf["training"].update(epochs=1, batch_size=32)
    conf["finetuning"].update(epochs=1, patience=1, lr=5e-4)  # off the grid: every point reruns finetune
    conf_file.write_text(yaml.safe_dump(conf, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (repo / "params.yaml").write_text(dump_params(compose([], repo / "conf")), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the repo's own store
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "XDG_CACHE_HOME": str(cache),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    })
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    _run(["dvc", "repro", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "baseline"], repo, env)
    return repo, env


def _wait_for_queue(repo: Path, env: dict, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _run(["dvc", "queue", "status"], repo, env)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(3)
    raise AssertionError(f"the queue did not finish in {timeout}s:\n{status}")


@pytest.mark.slow
def test_grid_search_queue_runs_four_points(tmp_path):
    repo, env = _tiny_project(tmp_path)
    _run(["dvc", "exp", "run", "--queue", *GRID, *KEEP_PRETRAINED], repo, env)
    _run(["dvc", "queue", "start"], repo, env)
    status = _wait_for_queue(repo, env, timeout=900)  # 2-3 min on 2 busy cores; a guard against a hang
    assert "Failed" not in status, status

    # dvc exp show: four experiments, one per grid point, each with its own metrics
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env))
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    points, names, scores = set(), set(), {}
    for exp in exps:
        data = exp["revs"][0]["data"]
        ft = data["params"]["params.yaml"]["data"]["finetuning"]
        points.add((ft["lr"], ft["batch_size"]))
        names.add(exp["name"])
        scores[exp["name"]] = data["metrics"]["results/metrics.json"]["data"]["tass_default"]["test_official"]
        assert 0.0 <= scores[exp["name"]] <= 1.0
    assert points == {(1e-3, 16), (1e-3, 32), (1e-4, 16), (1e-4, 32)} and len(names) == 4

    # MLflow: every point's finetune run in the repo's one store, under its DVC experiment's name
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("twilbert").experiment_id], max_results=1000)
    finetunes = {r.data.tags["dvc.exp_name"]: r for r in runs if r.data.tags.get("twilbert.pipeline.stage") == "finetune"}
    assert names <= set(finetunes)
    assert {(float(finetunes[n].data.params["finetuning.lr"]), int(finetunes[n].data.params["finetuning.batch_size"]))
            for n in names} == points
    evaluates = {r.data.tags["dvc.exp_name"]: r for r in runs if r.data.tags.get("twilbert.pipeline.stage") == "evaluate"}
    assert {n: evaluates[n].data.metrics["tass_default.twilbert.test_official"] for n in names} == scores
    for name in names:  # artifacts outlive the experiments' temporary copies
        artifacts = Path(urlparse(finetunes[name].info.artifact_uri).path)
        assert artifacts.is_relative_to(repo / "mlartifacts") and (artifacts / "metrics.json").is_file()
