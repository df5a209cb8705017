"""Every user-supplied file that reaches a third-party loader (PyYAML and Hydra, SentencePiece, tokenizers,
transformers) damaged or wrong: one `error:` line naming the file (and line), exit 2, no traceback.

The Hugging Face checkpoints of `training.hf_path` / `finetuning.hf_path` are in test_hf_refusals.py,
the MLflow store in test_track.py, safetensors model files in test_model_safety.py; this round's
others are here (docs/reliability.md lists them all)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, build_finetuned, make_tweets, write_params
from test_user_errors import error_lines, run_stage
from twilbert.cli import main
from twilbert.config import ConfigError, compose, load_config
from twilbert.data.hf_vocab import HFVocab
from twilbert.data.tokenizer import Tokenizer, VocabError

pytestmark = pytest.mark.reliability


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twilbert.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


# --------------------------------------------------------------------------------------------
# YAML: params.yaml and conf/
# --------------------------------------------------------------------------------------------

def test_a_stage_on_a_params_yaml_that_is_not_yaml_names_its_line(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\nmodel: [tiny\n", encoding="utf-8")
    proc = run_stage("pairs.py", "--corpus", "none.jsonl", cwd=tmp_path)
    [line] = error_lines(proc)
    assert line.startswith("error: params.yaml:3:1: invalid YAML (expected ',' or ']'") and "make params" in line, line


def test_load_config_names_the_line_of_a_params_file_that_is_not_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\n  model: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"params\.yaml:2:8: invalid YAML \(mapping values are not allowed here\)"):
        load_config(params)
    params.write_bytes(b"seed: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(params)


def test_compose_check_against_a_damaged_params_is_one_line_and_make_params_replaces_it(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("seed: [0\n", encoding="utf-8")
    assert main(["compose", "--conf", str(REPO / "conf"), "--check", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {params}:2:1: invalid YAML") and len(err.splitlines()) == 1, err
    # `make params` is the repair the line points at: it says what it replaces, then writes the composition
    assert main(["compose", "--conf", str(REPO / "conf"), "--out", str(params)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{params}:2:1: invalid YAML") and err.endswith("replaced with the composition of " +
                                                                        str(REPO / "conf") + "/"), err
    assert load_config(params).seed == compose([], REPO / "conf")["seed"]


def test_a_conf_file_that_is_not_yaml_is_one_line_naming_the_file_and_line(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    model = conf / "model" / "tiny.yaml"
    model.write_text(model.read_text(encoding="utf-8") + "bad: [\n", encoding="utf-8")
    proc = cli("compose", "--conf", conf, "model=tiny")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith(f"error: {model}:") and "invalid YAML" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------------------------
# Vocabularies: SentencePiece's spm.model, tokenizers' tokenizer.json, meta.json
# --------------------------------------------------------------------------------------------

SPM_DAMAGES = {
    "spm.model of garbage": (lambda d: (d / "spm.model").write_bytes(b"garbage" * 9), "spm.model: not a SentencePiece"),
    "empty spm.model": (lambda d: (d / "spm.model").write_bytes(b""), "spm.model: not a SentencePiece model"),
    "meta.json not JSON": (lambda d: (d / "meta.json").write_text("{"), "meta.json: not valid JSON"),
    "meta.json a list": (lambda d: (d / "meta.json").write_text("[]"), "meta.json: a JSON list, not the object"),
}


@pytest.mark.parametrize("damage", list(SPM_DAMAGES))
def test_a_damaged_sentencepiece_vocabulary_is_refused_naming_the_file(vocab_dir, tmp_path, damage):
    assert_damaged_vocab_refused(Tokenizer, vocab_dir, tmp_path / "vocab", *SPM_DAMAGES[damage])


def assert_damaged_vocab_refused(reader, source: Path, vocab: Path, edit, message: str) -> None:
    """A copy of ``source`` damaged by ``edit``: ``reader`` refuses it in one line naming it and ``message``."""
    shutil.copytree(source, vocab)
    edit(vocab)
    with pytest.raises(VocabError, match=re.escape(message)) as refused:
        reader(vocab)
    assert str(vocab) in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_the_pairs_stage_on_a_garbage_spm_model_is_one_line(vocab_dir, tmp_path):
    vocab = tmp_path / "vocab"
    shutil.copytree(vocab_dir, vocab)
    (vocab / "spm.model").write_bytes(b"garbage" * 9)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in make_tweets(20)), encoding="utf-8")
    write_params(tmp_path / "work", ["model=tiny", "representation.max_len=12"])
    proc = run_stage("pairs.py", "--corpus", str(corpus), "--vocab", str(vocab), "--out", str(tmp_path / "pairs"),
                     cwd=tmp_path / "work")
    [line] = error_lines(proc)
    assert f"{vocab / 'spm.model'}: not a SentencePiece model" in line and "rerun the vocab stage" in line, line
    assert not (tmp_path / "pairs").exists()


@pytest.fixture(scope="module")
def hf_vocab(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from hf_checkpoints import make_mlm_checkpoint
    from twilbert.data.hf_vocab import take_hf_vocab

    root = tmp_path_factory.mktemp("hfvocab")
    return take_hf_vocab(make_mlm_checkpoint(root / "checkpoint", "roberta"), root / "vocab")


HF_VOCAB_DAMAGES = {
    "tokenizer.json not JSON": (lambda d: (d / "tokenizer.json").write_text("{nope"),
                                "tokenizer.json: not a tokenizers file (key must be a string"),
    "tokenizer.json truncated": (lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:500]),
                                 "tokenizer.json: not a tokenizers file (EOF while parsing"),
    "meta.json not JSON": (lambda d: (d / "meta.json").write_text("{"), "meta.json: not valid JSON"),
    "meta.json without its template": (
        lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()),
                                                           "template": None} | {"kind": "hf"}).replace(
            '"template": null, ', "")),
        "meta.json: no template"),
}


@pytest.mark.parametrize("damage", list(HF_VOCAB_DAMAGES))
def test_a_damaged_hugging_face_vocabulary_is_refused_naming_the_file(hf_vocab, tmp_path, damage):
    assert_damaged_vocab_refused(HFVocab, hf_vocab, tmp_path / "vocab", *HF_VOCAB_DAMAGES[damage])


# --------------------------------------------------------------------------------------------
# Finetuned model directories read past their checksums (`--no-verify`)
# --------------------------------------------------------------------------------------------

def test_predict_no_verify_on_a_garbage_spm_model_is_one_line(vocab_dir, tmp_path):
    model = build_finetuned(tmp_path / "model", vocab_dir)
    (model / "spm.model").write_bytes(b"garbage" * 9)
    proc = cli("predict", "--model", model, "--no-verify", "hola")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{model / 'spm.model'}: not a SentencePiece model" in proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.fixture(scope="module")
def hf_classifier_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from hf_checkpoints import make_mlm_checkpoint
    from twilbert.data.preprocess import Preprocessor
    from twilbert.model.backbone import load_hf_backbone, save_hf_classifier
    from twilbert.model.card import HeadConfig
    from twilbert.model.finetuned import hf_classifier, hf_packer

    root = tmp_path_factory.mktemp("hfclassifier")
    encoder, tokenizer = load_hf_backbone(make_mlm_checkpoint(root / "checkpoint", "roberta"))
    model = hf_classifier(encoder, HeadConfig(), 2)
    from twilbert.config import TaskConfig, TaskDataset, TaskSpec

    task = TaskConfig(name="t", dataset=TaskDataset(), task=TaskSpec(categories={"N": 0, "P": 1}))
    extra = {"head": HeadConfig(), "task": task, "max_len_test": 12}
    return save_hf_classifier(root / "model", model, hf_packer(encoder, tokenizer, Preprocessor()), extra)


@pytest.mark.parametrize("damage, message", [
    ("tokenizer.json", "hf/tokenizer.json is missing"),  # would label every text from 5 special tokens
    ("config.json", "hf/config.json is missing"),
])
def test_predict_no_verify_on_a_hf_classifier_without_its_hf_files_is_one_line(hf_classifier_dir, tmp_path, damage,
                                                                                message, capsys):
    model = tmp_path / "model"
    shutil.copytree(hf_classifier_dir, model)
    (model / "hf" / damage).unlink()
    assert main(["predict", "--model", str(model), "--no-verify", "hola"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {model}: {model / 'hf'}") and message in err, err


# --------------------------------------------------------------------------------------------
# The MLflow store (sqlite): a stage warns in one line and trains on (`make ui` has its own check)
# --------------------------------------------------------------------------------------------

def test_a_tracking_store_that_is_not_a_database_is_one_warning_and_training_carries_on(tmp_path):
    from test_user_errors import TRACKED_RUN

    store = tmp_path / "mlflow.db"
    store.write_bytes(b"garbage" * 200)
    proc = subprocess.run([sys.executable, "-c", TRACKED_RUN, f"sqlite:///{store}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "trained", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [warning] = [line for line in proc.stderr.splitlines() if line.strip()]
    assert f"cannot open {store} (file is not a database)" in warning and "training goes on" in warning, warning
    assert store.read_bytes() == b"garbage" * 200  # the user's file is left as it was
