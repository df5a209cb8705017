"""`dvc repro` end to end with `training.init_from: hf`: the vocab stage takes a tiny RoBERTa checkpoint's
tokenizer, pairs tokenize with it, pretrain continues the checkpoint, finetune reads the output as it
is, and "Models compared" holds the four rows that answer "did adapting help?": the checkpoint as
it is, the checkpoint after continued pretraining, twilbert from scratch (exported with
`twilbert export-hf`), and the baseline. Real DVC in a temp git repo, as tests/e2e/test_pipeline.py.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from twilbert.cli import dump_params
from twilbert.cli import main as cli_main
from twilbert.config import compose
from twilbert.config.runs import finetune_runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from project import commit_project, copy_project, project_env, run  # noqa: E402

from finetune_data import make_pretrained  # noqa: E402
from helpers import apply_four_row_recipe  # noqa: E402
from hf_checkpoints import make_mlm_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def continued_params(repo: Path, sha: str) -> dict:
    """params.yaml of the recipe in README "Start from an existing checkpoint", made tiny: the
    four-row yaml of docs/continued-pretraining.md pasted into conf/config.yaml as it is written."""
    conf_file = repo / "conf" / "config.yaml"
    conf = yaml.safe_load(conf_file.read_text(encoding="utf-8"))
    conf["data"]["evomsa_sha256"] = sha
    conf_file.write_text(yaml.safe_dump(conf, sort_keys=False, allow_unicode=True), encoding="utf-8")
    apply_four_row_recipe(repo / "conf")
    raw = compose([], repo / "conf")
    raw["representation"]["max_len"] = 16
    raw["training"].update(init_from="hf", hf_path="checkpoints/beto", epochs=1, batch_size=16, lr=1e-3)
    raw["finetuning"].update(epochs=2, patience=2, seeds=1)
    raw["finetune_runs"] = finetune_runs(raw["tasks"], raw["finetuning"]["seeds"])
    return raw


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-continued")
    repo, sha = copy_project(root)
    make_mlm_checkpoint(repo / "checkpoints" / "beto", "roberta")  # a tiny RoBERTa where the recipe looks
    scratch = make_pretrained(root / "scratch")  # a twilbert pretrained from scratch, as a scratch run leaves it
    exported = repo / "checkpoints" / "twilbert-scratch"
    assert cli_main(["export-hf", "--model", str(scratch), "--out", str(exported)]) == 0
    (repo / "params.yaml").write_text(dump_params(continued_params(repo, sha)), encoding="utf-8")
    env = project_env(root)
    commit_project(repo, env)
    run(["dvc", "repro"], repo, env)
    return repo, env


def test_repro_takes_the_checkpoints_tokenizer_and_writes_a_hf_folder(project):
    repo, _ = project
    meta = json.loads((repo / "data" / "vocab" / "meta.json").read_text())
    assert (meta["kind"], meta["model_type"]) == ("hf", "roberta")
    assert json.loads((repo / "data" / "pairs" / "manifest.json").read_text())["template"] == meta["template"]
    from transformers import AutoModelForMaskedLM

    from twilbert.model.manifest import verify_model_dir

    pretrained = repo / "models" / "pretrained"
    verify_model_dir(pretrained, verify=True)
    AutoModelForMaskedLM.from_pretrained(pretrained, local_files_only=True)
    inspected = json.loads((repo / "results" / "inspect.json").read_text())
    assert "before_heldout_mlm_accuracy" in inspected and "heldout_mlm_accuracy" in inspected


def test_models_compared_holds_the_four_rows(project):
    repo, _ = project
    table = (repo / "results" / "results.md").read_text(encoding="utf-8")
    compared = table.split("## Models compared")[1].split("## Every pair compared")[0]
    rows = [line for line in compared.splitlines() if line.startswith("| tass_default |")]
    models = [line.split(" | ")[2].removesuffix(" ⚠") for line in rows]  # ⚠: a tiny run may predict one class
    assert sorted(models) == sorted(["hf (pretrained)", "hf (beto)", "hf (twilbert-scratch)", "tfidf"]), rows
    pairs = [line for line in table.split("## Every pair compared")[1].splitlines() if line.startswith("| tass_default |")]
    assert len(pairs) == 6  # each two of the four rows, with Δ and its interval
    continued = next(line for line in pairs if line.startswith("| tass_default | hf (pretrained) | hf (beto) |"))
    assert re.search(r"\| [+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\] \| (better|worse|within noise) \|$", continued)


def test_a_new_hf_path_reruns_from_the_vocab_stage(project):
    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["training"]["hf_path"] = "checkpoints/other"
    (repo / "params.yaml").write_text(dump_params(params), encoding="utf-8")
    status = run(["dvc", "status", "vocab"], repo, env)
    assert "training.hf_path" in status
