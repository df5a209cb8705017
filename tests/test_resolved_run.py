"""One resolved finetuning run, one identity: the MLflow params of a finetune stage are what trained,
the backbone after its resolution from the pretrained directory included."""

from __future__ import annotations

import json

import pytest

from finetune_data import write_task
from helpers import ok, run_stage, write_params
from test_continued_pretraining import MAX_LEN, continued_inputs, continued_overrides
from twilbert.config import load_config

pytestmark = pytest.mark.reliability


def test_the_mlflow_params_of_a_finetune_stage_are_the_run_that_trained_not_the_config_as_written(tmp_path):
    import mlflow

    from twilbert.train.continued import continued_pretrain

    # models/pretrained written by continued pretraining: the default backbone (twilbert) reads it as hf
    root = tmp_path / "inputs"
    checkpoint = continued_inputs(root, "roberta", 40)
    write_params(tmp_path / "pretrain-work", continued_overrides(checkpoint, epochs=1))
    pretrained = tmp_path / "pretrained"
    continued_pretrain(load_config(tmp_path / "pretrain-work" / "params.yaml"), root / "pairs", root / "vocab",
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
