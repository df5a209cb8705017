"""The real pipeline, end to end: real DVC in a temp git repo, real SentencePiece, real torch
training, a real MLflow store — on a tiny corpus generated here (an sdist-shaped EvoMSA tarball
placed in the download cache, so the `data` stage runs its real code path offline)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from twilbert.cli import dump_params
from twilbert.config import compose
from twilbert.pipeline.stage import KILL_HOOK_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from project import commit_project, copy_project, project_env, run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def shrink_conf(conf_file: Path, sha: str) -> None:
    """Make the default pipeline tiny; edited in conf/ so `dvc exp run` recomposes the same values."""
    conf = yaml.safe_load(conf_file.read_text(encoding="utf-8"))
    conf["data"]["evomsa_sha256"] = sha
    conf["vocab"]["vocab_size"] = 150
    conf["representation"]["max_len"] = 16
    conf["training"].update(epochs=2, batch_size=16)
    conf["finetuning"].update(epochs=2, patience=2)
    conf_file.write_text(yaml.safe_dump(conf, sort_keys=False, allow_unicode=True), encoding="utf-8")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    repo, sha = copy_project(root)
    shrink_conf(repo / "conf" / "config.yaml", sha)
    (repo / "params.yaml").write_text(dump_params(compose([], repo / "conf")), encoding="utf-8")
    env = project_env(root)
    commit_project(repo, env)
    run(["dvc", "repro"], repo, env)
    run([sys.executable, "-m", "twilbert.pipeline.experiments", "save", "baseline"], repo, env)  # what `make repro` ends with
    return repo, env, root


def mlflow_runs(root: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("twilbert")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_repro_writes_a_results_table_with_the_default_task(project):
    repo, _, _ = project
    table = (repo / "results" / "results.md").read_text(encoding="utf-8")
    # ⚠: a run of this tiny pipeline may predict one class on test (train/degenerate.py)
    assert re.search(r"\| tass_default \| twilbert( ⚠)? \|", table)
    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    score = metrics["tass_default"]["test_official"]
    assert math.isfinite(score) and 0.0 <= score <= 1.0
    runs = [json.loads((repo / f"results/tasks/tass_default/runs/s{s}/metrics.json").read_text())["test"]["official"]
            for s in range(3)]  # finetuning.seeds: 3
    assert score == pytest.approx(sum(runs) / 3, abs=1e-12) and metrics["tass_default"]["test_official_n"] == 3
    assert len(set(runs)) > 1  # three seeds, three different runs
    assert " ± " in table and "Computed with portable CPU numerics" in table
    predictions = (repo / "results/tasks/tass_default/runs/s0/predictions.tsv").read_text().splitlines()
    assert predictions[0] == "id\tgold\tpred" and len(predictions) > 10


def test_pretrained_model_is_safetensors_plus_json_with_its_vocab(project):
    repo, _, _ = project
    files = {p.name for p in (repo / "models" / "pretrained").iterdir()}
    assert {"model.safetensors", "config.json", "spm.model", "meta.json", "checksums.json"} <= files
    from twilbert.model.manifest import verify_model_dir

    for directory in (repo / "models" / "pretrained", repo / "models" / "finetuned" / "tass_default" / "s0"):
        verify_model_dir(directory, verify=True)  # sealed by the stages, vocabulary included
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)


def test_mlflow_holds_the_training_runs_with_finite_metrics(project):
    _, _, root = project
    client, runs = mlflow_runs(root)
    stages = {r.data.tags.get("twilbert.pipeline.stage") for r in runs}
    assert {"pretrain", "finetune", "evaluate"} <= stages
    pretrain = next(r for r in runs if r.data.tags.get("twilbert.pipeline.stage") == "pretrain")
    assert pretrain.data.params["model.n_encoders"] == "2"
    assert math.isfinite(pretrain.data.metrics["heldout_mlm_accuracy"])
    history = client.get_metric_history(pretrain.info.run_id, "heldout_mlm_loss")
    assert len(history) == 2  # one point per epoch
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs if r.data.tags.get("twilbert.pipeline.stage")}
    assert len(parents) == 1 and None not in parents


def test_table_metrics_and_mlflow_hold_the_same_numbers(project):
    repo, _, root = project
    _, runs = mlflow_runs(root)
    finetune = next(r for r in runs if r.info.run_name == "finetune-tass_default-s0@workspace")
    task_metrics = json.loads((repo / "results/tasks/tass_default/runs/s0/metrics.json").read_text())
    for key in ("official", "mf1", "acc"):
        assert finetune.data.metrics[f"test_{key}"] == pytest.approx(task_metrics["test"][key], abs=1e-12)
    # the table shows the mean over the seeds' runs
    runs = [json.loads((repo / f"results/tasks/tass_default/runs/s{s}/metrics.json").read_text()) for s in range(3)]
    mean = sum(100 * r["test"]["mf1"] for r in runs) / len(runs)
    table = (repo / "results" / "results.md").read_text(encoding="utf-8")
    assert f"{mean:.2f}" in table


def test_the_finetune_run_logs_a_pyfunc_model_that_predicts_offline(project, monkeypatch):
    import mlflow

    repo, _, root = project
    _, runs = mlflow_runs(root)
    finetune = next(r for r in runs if r.data.tags.get("twilbert.pipeline.stage") == "finetune")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{finetune.info.run_id}/model")
    out = model.predict(["qué día tan bonito", "odio los lunes"])
    from twilbert import load_classifier

    run_name = finetune.info.run_name.split("@")[0]  # finetune-tass_default-s<seed>
    model_dir = repo / "models" / "finetuned" / "tass_default" / run_name.rsplit("-", 1)[1]
    expected = load_classifier(model_dir).predict(["qué día tan bonito", "odio los lunes"])
    assert out["label"].tolist() == [p.label for p in expected]


def test_second_repro_runs_no_stage(project):
    repo, env, _ = project
    out = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in out


def sync(repo: Path, env: dict) -> str:
    """What `make repro`, `make exp` and `make baseline` end with: the MLflow store synced with DVC."""
    return run([sys.executable, "-m", "twilbert.pipeline.mlflow_sync"], repo, env)


def test_after_a_repro_that_skips_every_stage_the_sync_gives_the_workspace_its_score_delta_and_verdict(project):
    """As in a fresh clone: the finetunes reproduce the committed bytes, DVC skips evaluate and nothing
    in the store holds a score; the sync reads them from DVC's state."""
    import mlflow

    repo, env, root = project
    fresh = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'fresh.db'}"}
    assert stages_run(repro(repo, fresh)) == []
    sync(repo, fresh)
    client = mlflow.MlflowClient(tracking_uri=fresh["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("twilbert")
    parents = {r.info.run_name: r.data for r in client.search_runs([exp.experiment_id], "tags.`twilbert.parent` = 'true'")}
    runs = [json.loads((repo / f"results/tasks/tass_default/runs/s{s}/metrics.json").read_text()) for s in range(3)]
    mean = round(100 * sum(r["test"]["official"] for r in runs) / 3, 2)
    for name in ("workspace", "baseline"):
        data = parents[name]
        assert data.metrics["tass_default test"] == mean and data.metrics["tass_default n"] == 3
        assert data.metrics["tass_default sd"] > 0
        assert {"tass_default Δ", "tass_default Δ low", "tass_default Δ high"} <= set(data.metrics)
    assert parents["baseline"].tags["tass_default verdict"] == "reference"
    assert parents["workspace"].tags["tass_default verdict"] == "within noise"  # the same run as baseline
    assert parents["workspace"].metrics["tass_default Δ"] == 0.0
    assert "(0 value(s) changed)" in sync(repo, fresh)  # a rerun changes nothing


def lock_hashes(lock_text: str) -> dict[str, str]:
    """``stage: path -> md5`` for every dependency and output in a dvc.lock."""
    lock = yaml.safe_load(lock_text)
    return {f"{stage}: {entry['path']}": entry.get("md5", "")
            for stage, body in lock["stages"].items() for kind in ("deps", "outs") for entry in body.get(kind, [])}


@pytest.mark.reliability
def test_two_forced_runs_from_scratch_give_the_same_dvc_lock(project):
    """Same config + same seed on one machine: `dvc repro -f` from scratch writes a dvc.lock equal to
    the first run's, every md5 of every output (data, vocab, pairs, models, checkpoints, metrics)."""
    repo, env, _ = project
    first = (repo / "dvc.lock").read_text(encoding="utf-8")  # the fixture's run, from scratch
    for name in ("data", "models", "results"):
        shutil.rmtree(repo / name)
    run(["dvc", "repro", "-f"], repo, env)
    second = (repo / "dvc.lock").read_text(encoding="utf-8")
    a, b = lock_hashes(first), lock_hashes(second)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    assert not changed, f"md5s that changed between two identical runs: {changed}"
    assert first == second


def test_experiment_with_changed_param_gets_its_own_metrics_and_runs(project):
    repo, env, root = project
    # as `make exp` after `make repro`: the experiment `baseline` is on the same commit
    run(["dvc", "exp", "run", "-n", "enc4", "-S", "model.n_encoders=4"], repo, env)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = [e.get("name") for e in exps]
    assert "enc4" in names
    exp = next(e for e in exps if e.get("name") == "enc4")
    data = exp["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["model"]["n_encoders"] == 4
    assert "tass_default" in data["metrics"]["results/metrics.json"]["data"]

    # MLflow, after `make exp`'s sync: one parent run per experiment, with every param, and the
    # experiment's score, Δ against `baseline` and verdict, in points
    sync(repo, env)
    client, runs = mlflow_runs(root)
    parents = {r.data.tags["dvc.exp_name"]: r for r in runs if r.data.tags.get("twilbert.parent") == "true"}
    assert {"workspace", "baseline", "enc4"} <= set(parents)
    assert parents["workspace"].data.params["model.n_encoders"] == "2"
    assert parents["enc4"].data.params["model.n_encoders"] == "4"
    for parent in (parents["workspace"], parents["enc4"]):
        assert len(parent.data.params) > 100  # all of params.yaml, past MLflow's 100 params per call
    exp_score = data["metrics"]["results/metrics.json"]["data"]["tass_default"]["test_official"]
    enc4 = parents["enc4"].data
    assert enc4.metrics["tass_default test"] == round(100 * exp_score, 2)
    assert enc4.metrics["tass_default n"] == 3 and enc4.metrics["tass_default sd"] >= 0
    assert enc4.metrics["tass_default Δ low"] <= enc4.metrics["tass_default Δ"] <= enc4.metrics["tass_default Δ high"]
    assert enc4.tags["tass_default verdict"] in ("better", "worse", "within noise")
    assert client.get_experiment_by_name("twilbert").tags["mlflow.experimentKind"] == "custom_model_development"
    names = {r.info.run_name for r in runs}
    assert {f"finetune-tass_default-s{s}@{e}" for s in range(3) for e in ("enc4", "workspace")} <= names

    # `make compare`: the local baseline and the experiment, no commit row; a verdict per task
    table = run([sys.executable, "-m", "twilbert.reports.compare"], repo, env)
    rows = compare_rows(table)
    assert set(rows) == {"baseline", "enc4"}
    assert rows["enc4"]["n_encoders"] == "4" and rows["baseline"]["n_encoders"] == "2"
    assert rows["enc4"]["test"] == f"{100 * exp_score:.2f}"  # in points, as results.md
    verdict = rows["enc4"]["verdict"]
    assert verdict in ("better", "worse", "within noise")
    assert re.fullmatch(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", rows["enc4"]["Δ test vs baseline [95% CI]"])
    assert max(map(len, table.splitlines())) <= 160

    # `make baseline`: the baseline's params, lock, results and models back, from the cache, in seconds
    baseline_lock = run(["git", "show", "refs/exps/" + exp_ref(repo, env, "baseline") + ":dvc.lock"], repo, env)
    start = time.monotonic()
    out = run([sys.executable, "-m", "twilbert.pipeline.experiments", "restore", "baseline"], repo, env)
    assert time.monotonic() - start < 30 and "restored experiment 'baseline'" in out
    assert (repo / "dvc.lock").read_text(encoding="utf-8") == baseline_lock
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["n_encoders"] == 2
    status = run(["dvc", "status", "--json"], repo, env)
    assert json.loads(status) == {}, status  # every output matches the lock: nothing to retrain
    assert stages_run(repro(repo, env)) == []


def exp_ref(repo: Path, env: dict, name: str) -> str:
    """The git ref of a DVC experiment (``<base>/<name>`` under refs/exps)."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).split()
    [ref] = [r for r in refs if r.endswith("/" + name)]
    return ref.removeprefix("refs/exps/")


def compare_rows(table: str) -> dict[str, dict[str, str]]:
    """The `make compare` table as {experiment: {column: cell}}."""
    rows: dict[str, dict[str, str]] = {}
    head: list[str] = []
    for line in table.splitlines():
        if not line.startswith("|") or line.startswith("|-"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "experiment":
            head = cells
        elif head and cells[0]:
            rows.setdefault(cells[0], {}).update(zip(head, cells))
    return rows


def test_dvc_plots_render_offline(project):
    repo, env, root = project
    run(["dvc", "plots", "show", "-o", str(root / "shown")], repo, env)
    run(["dvc", "plots", "diff", "HEAD", "-o", str(root / "diff")], repo, env)
    for page in (root / "shown" / "index.html", root / "diff" / "index.html"):
        html = page.read_text(encoding="utf-8")
        assert not re.search(r"<script[^>]*src=[\"']?https?://", html), page
        assert "vegaEmbed" in html and "pretraining loss per epoch" in html
        assert "per logged step" in html
        for curve in ("train_loss", "dev_official"):  # a chart a seed and curve, each on its own axis
            assert all(re.search(f"results_curves_finetune_{curve}_tass_default.s{s}_csv", html) for s in range(3))
        # no title of their own: DVC titles each run's chart with its file (the seed); the axes say what is drawn
        assert "finetuning train loss" in html and "dev official metric (the best epoch is kept)" in html
    assert "plots/pretrain_epochs.png" in (repo / "results" / "results.md").read_text(encoding="utf-8")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_ui_prints_its_address_once_the_server_answers_and_opens_on_the_scores(project):
    import urllib.parse
    import urllib.request

    repo, env, root = project
    _, runs = mlflow_runs(root)
    if not any(r.data.tags.get("dvc.exp_name") == "enc4" for r in runs):  # this test run alone: `make exp` first
        run(["dvc", "exp", "run", "-n", "enc4", "-S", "model.n_encoders=4"], repo, env)
        run([sys.executable, "-m", "twilbert.pipeline.experiments", "restore", "baseline"], repo, env)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "twilbert.pipeline.mlflow_sync", "--ui", "--port", str(port)],
                          cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = ""
        for line in ui.stdout:
            if line.startswith("open "):
                url = line.split(" ", 1)[1].strip()
                break
        assert url, f"make ui exited ({ui.poll()}) without an address"
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).close()  # answers at once
        # The view as the UI reads it, through MLflow's REST API: the experiment's shared view tag
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        query = urllib.parse.urlencode({"experiment_name": "twilbert"})
        experiment = json.load(urllib.request.urlopen(f"{api}/experiments/get-by-name?{query}"))["experiment"]
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        key = urllib.parse.parse_qs(urllib.parse.urlsplit(url).fragment.split("?", 1)[1])["viewStateShareKey"][0]
        view = json.loads(tags[f"mlflow.sharedViewState.{key}"])
        for col in ("params.`model.n_encoders`", "metrics.`tass_default test`", "metrics.`tass_default Δ`",
                    "tags.`tass_default verdict`"):
            assert col in view["selectedColumns"], col
        assert tags["mlflow.experimentKind"] == "custom_model_development" and "workflowType=machine_learning" in url
        body = json.dumps({"experiment_ids": [experiment["experiment_id"]], "filter": view["searchFilter"]}).encode()
        found = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{api}/runs/search", data=body, headers={"Content-Type": "application/json"})))["runs"]
        assert {r["info"]["run_name"] for r in found} == {"baseline", "enc4"}  # the workspace holds baseline's run
        for r in found:
            assert {"tass_default test", "tass_default Δ"} <= {m["key"] for m in r["data"]["metrics"]}
    finally:
        ui.terminate()
        ui.wait(timeout=60)


# --------------------------------------------------------------------------------------------
# What reruns, and a `dvc repro` killed mid-training
# --------------------------------------------------------------------------------------------


def repro(repo: Path, env: dict, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", "repro"], cwd=repo, env={**env, **extra_env}, capture_output=True, text=True)


def stages_run(proc: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)


def set_params(repo: Path, section: str, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")


@pytest.mark.reliability
def test_a_changed_finetuning_param_reruns_only_finetune_and_evaluate(project):
    repo, env, _ = project
    assert stages_run(repro(repo, env)) == []  # up to date, whatever ran before
    set_params(repo, "finetuning", lr=0.003)
    proc = repro(repo, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stages_run(proc) == ["finetune@tass_default-s0", "finetune@tass_default-s1", "finetune@tass_default-s2",
                                "evaluate"]


@pytest.mark.reliability
def test_adding_a_seed_reruns_only_its_own_finetune_stage(project):
    repo, env, _ = project
    assert stages_run(repro(repo, env)) == []
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    composed = compose(["finetuning.seeds=4"], repo / "conf")
    params["finetuning"]["seeds"], params["finetune_runs"] = 4, composed["finetune_runs"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    status = json.loads(run(["dvc", "status", "--json"], repo, env))
    assert sorted(s for s in status if s.startswith("finetune")) == ["finetune@tass_default-s3"]
    proc = repro(repo, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stages_run(proc) == ["finetune@tass_default-s3", "evaluate"]
    metrics = json.loads((repo / "results" / "metrics.json").read_text())
    assert metrics["tass_default"]["test_official_n"] == 4


@pytest.mark.reliability
def test_a_killed_repro_leaves_dvc_lock_unchanged_and_the_rerun_resumes_the_stage(project):
    repo, env, _ = project
    set_params(repo, "training", lr=0.002, checkpoint_every=2)
    lock = (repo / "dvc.lock").read_text(encoding="utf-8")
    killed = repro(repo, env, **{KILL_HOOK_ENV: "4"})  # pretrain SIGKILLs itself after its checkpoint at step 4
    assert killed.returncode != 0 and stages_run(killed) == ["pretrain"]
    assert (repo / "dvc.lock").read_text(encoding="utf-8") == lock

    resumed = repro(repo, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch 1, batch 4" in resumed.stdout + resumed.stderr
    assert stages_run(resumed)[0] == "pretrain" and "evaluate" in stages_run(resumed)
    assert "lr: 0.002" in (repo / "dvc.lock").read_text(encoding="utf-8")
