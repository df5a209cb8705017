"""One resolved run, one identity: the MLflow params of a pretrain or finetune stage are the run that
trained (the backbone after its resolution from the pretrained directory included), its checkpoint
identity hashes the same params, and dvc.yaml tracks exactly the keys the run reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune_data import write_task
from helpers import PRETRAIN, REPO, make_pretrain_inputs, ok, run_stage, write_params
from test_continued_pretraining import MAX_LEN, continued_inputs, continued_overrides
from twilbert.config import load_config
from twilbert.config.strict import flatten
from twilbert.train.finetune.resolved import resolve_finetune_run
from twilbert.train.fingerprint import OUTPUT_NEUTRAL_KEYS
from twilbert.train.pretrain_run import resolve_pretrain_run

pytestmark = pytest.mark.reliability


def test_the_mlflow_params_of_a_finetune_stage_are_the_run_that_trained_not_the_config_as_written(tmp_path):
    import mlflow

    from twilbert.train.continued import continued_pretrain

    # models/pretrained written by continued pretraining: the default backbone (twilbert) reads it as hf
    root = tmp_path / "inputs"
    checkpoint = continued_inputs(root, "roberta", 40)
    write_params(tmp_path / "pretrain-work", continued_overrides(checkpoint, epochs=1))
    pretrained = tmp_path / "pretrained"
    continued_pretrain(resolve_pretrain_run(load_config(tmp_path / "pretrain-work" / "params.yaml")),
                       root / "pairs", root / "vocab",
                       pretrained, tmp_path / "ck")

    work = tmp_path / "work"  # run_stage's MLflow store: tmp_path / mlflow.db
    raw = write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}"], tasks={"t": write_task(tmp_path / "data")},
                       finetuning={"epochs": 1, "batch_size": 16, "device": "cpu", "baseline_row": False})
    assert raw["finetuning"]["backbone"] == "twilbert"
    ok(run_stage("finetune.py", ["--task", "t", "--pretrained", pretrained, "--model-out", tmp_path / "model",
                                 "--metrics-out", tmp_path / "results", "--seed", "1", "--no-baseline"], work))

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("twilbert")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name LIKE 'finetune-t-s1%'")
    assert len(runs) == 1
    params = runs[0].data.params
    card = json.loads((tmp_path / "model" / "config.json").read_text())
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert params["finetuning.backbone"] == "hf" == card["backbone"] == metrics["model"]
    assert params["finetuning.hf_path"] == str(pretrained)
    assert (params["seed"], params["run_seed"]) == (str(raw["seed"]), "1")
    assert params["representation.max_len"] == str(MAX_LEN) and params["finetuning.epochs"] == "1"


# --------------------------------------------------------------------------------------------
# Pretraining: the logged params are the resolved run, and the model that trained
# --------------------------------------------------------------------------------------------


def logged_run(tmp_path: Path, name: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("twilbert")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name LIKE '{name}%'")
    assert len(runs) == 1
    return runs[0].data.params


def run_pretrain_stage(tmp_path: Path, inputs: Path, overrides: list[str]) -> tuple[Path, Path]:
    work, out = tmp_path / "work", tmp_path / "out"  # run_stage's MLflow store: tmp_path / mlflow.db
    write_params(work, overrides)
    ok(run_stage("pretrain.py", ["--pairs", inputs / "pairs", "--vocab", inputs / "vocab", "--out", out / "model",
                                 "--checkpoints", out / "ck", "--metrics", out / "metrics.json"], work))
    return work, out


def identity_parts(checkpoints: Path) -> dict:
    (run_json,) = checkpoints.glob("run-*/run.json")
    return json.loads(run_json.read_text())["parts"]


def test_the_mlflow_params_of_a_pretrain_stage_are_the_resolved_run_and_the_model_that_trained(tmp_path):
    from twilbert.tracking.runs import flatten as mlflow_params
    from twilbert.train.pretrain import pretrain_fingerprint
    from twilbert.train.pretrain_run import resolve_pretrain_run

    inputs = make_pretrain_inputs(tmp_path / "inputs")
    work, out = run_pretrain_stage(tmp_path, inputs, [*PRETRAIN, "training.epochs=1", "representation.max_len_test=6"])
    run = resolve_pretrain_run(load_config(work / "params.yaml"))
    params = logged_run(tmp_path, "pretrain-tiny")
    # exactly the run: nothing it does not read (max_len_test, the vocab section), nothing it reads left out (runtime)
    assert params == mlflow_params(run.params())
    assert "representation.max_len_test" not in params and not any(k.startswith("vocab.") for k in params)
    assert params["runtime.portable_numerics"] == "True"
    card = json.loads((out / "model" / "config.json").read_text())
    assert {f"model.{k}": str(v) for k, v in flatten(card["model"]).items()} == \
        {k: v for k, v in params.items() if k.startswith("model.")}
    assert params["representation.max_len"] == str(card["max_len"]) and params["training.epochs"] == str(card["epoch"])
    # the checkpoints' identity hashes the same run
    assert identity_parts(out / "ck")["config"] == pretrain_fingerprint(run, inputs / "pairs", inputs / "vocab")["config"]


def test_the_mlflow_params_of_continued_pretraining_name_the_checkpoint_that_trained(tmp_path):
    from twilbert.tracking.runs import flatten as mlflow_params
    from twilbert.train.continued import continued_fingerprint
    from twilbert.train.pretrain_run import resolve_pretrain_run

    checkpoint = continued_inputs(tmp_path / "inputs", "roberta", 40)
    work, out = run_pretrain_stage(tmp_path, tmp_path / "inputs", continued_overrides(checkpoint, epochs=1))
    run = resolve_pretrain_run(load_config(work / "params.yaml"))
    params = logged_run(tmp_path, "pretrain-tiny")
    assert params == mlflow_params(run.params())
    card = json.loads((out / "model" / "twilbert.json").read_text())
    assert params["training.init_from"] == "hf" == card["init_from"]
    assert params["training.hf_path"] == str(checkpoint) == card["hf_path"]
    assert params["representation.max_len"] == str(card["max_len"])
    expected = continued_fingerprint(run, tmp_path / "inputs" / "pairs", tmp_path / "inputs" / "vocab")["config"]
    assert identity_parts(out / "ck")["config"] == expected


# --------------------------------------------------------------------------------------------
# DVC's params of a training stage are the run's keys
# --------------------------------------------------------------------------------------------


def dvc_params(stage: str) -> list[str]:
    body = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    return list(body.get("do", body)["params"])


def coverage(tracked: list[str], leaves: set[str]) -> tuple[set[str], set[str]]:
    """(the leaves no tracked key covers, the tracked keys that cover no leaf): a dotted key covers
    itself and every key under it."""
    def covers(key: str, leaf: str) -> bool:
        return leaf == key or leaf.startswith(key + ".")
    return ({leaf for leaf in leaves if not any(covers(k, leaf) for k in tracked)},
            {k for k in tracked if not any(covers(k, leaf) for leaf in leaves)})


def test_dvc_tracks_exactly_the_keys_a_pretraining_run_reads():
    from twilbert.train.pretrain_run import resolve_pretrain_run

    for init in ([], ["training.init_from=hf", "training.hf_path=ckpt"]):
        raw = write_params_dict(init)
        leaves = set(flatten(resolve_pretrain_run(load_config(raw)).params()))
        untracked, unread = coverage(dvc_params("pretrain"), leaves)
        # a key the run reads but DVC does not track would let `dvc repro` skip a run that changed
        assert untracked == set() and unread == set()


# A finetuning run's keys that DVC tracks otherwise, each with the reason.
FINETUNE_NOT_PARAMS = {
    "run_seed": "the stage's --seed ${item.seed}: in its cmd, which DVC tracks",
    "task.name": "the stage's --task ${item.task}: in its cmd",
    "finetuning.seeds": "says how many stages there are (finetune_runs); a run's own seed is run_seed",
    **{k: f"read only with a baseline row, which the stage leaves to stage baseline (--no-baseline): {why}"
       for k, why in OUTPUT_NEUTRAL_KEYS.items() if k.startswith("finetuning.baseline")},
}


def test_dvc_tracks_exactly_the_keys_a_finetuning_run_reads_but_those_its_cmd_names():
    raw = write_params_dict([])
    cfg = load_config(raw)
    (name,) = cfg.tasks
    run = resolve_finetune_run(cfg, cfg.tasks[name], Path("models/pretrained"), run_seed=1, resolve_backbone=False)
    # the run's task is the stage's tasks.<name>; its finetuning holds the task's overrides, under tasks.<name> too
    leaves = {f"tasks.${{item.task}}.{k.split('.', 1)[1]}" if k.startswith("task.") and k != "task.name" else k
              for k in flatten(run.params())}
    leaves -= set(FINETUNE_NOT_PARAMS)
    untracked, unread = coverage(dvc_params("finetune"), leaves)
    assert untracked == set() and unread == set()
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]["do"]["cmd"]
    assert "--seed ${item.seed}" in cmd and "--task ${item.task}" in cmd


def write_params_dict(overrides: list[str]) -> dict:
    from twilbert.config.plain_compose import compose_plain

    return compose_plain(overrides, REPO / "conf")
