"""Hugging Face backbones: a tiny BERT and a tiny RoBERTa built here, packed, finetuned and reloaded."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twilbert.config import ConfigError, compose
from twilbert.data.hf_checkpoint import HFCheckpointError
from twilbert.data.preprocess import Preprocessor
from twilbert.data.tasks import load_task
from twilbert.evaluation.scoring import evaluate_scores, predict_scores
from twilbert.model.backbone import HFClassifier, load_hf_backbone
from twilbert.model.finetuned import hf_packer, load_classifier_module
from twilbert.model.io import load_pretrained_state
from twilbert.model.trainable import set_trainable
from twilbert.train.finetune.learners import encode_examples
from twilbert.train.finetune.stage_work import finetune_task

pytest.importorskip("transformers")

from finetune_data import MAX_LEN, first, make_config, make_hf_bert, make_hf_roberta, write_task  # noqa: E402
from helpers import REPO  # noqa: E402

MAKERS = {"bert": make_hf_bert, "roberta": make_hf_roberta}


@pytest.fixture(scope="module")
def raw():
    return compose(["model=tiny"], REPO / "conf")


@pytest.fixture(scope="module", params=["bert", "roberta"])
def checkpoint(request, tmp_path_factory):
    return MAKERS[request.param](tmp_path_factory.mktemp("hf") / request.param)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    encoder, tokenizer = load_hf_backbone(checkpoint)
    return encoder, tokenizer, hf_packer(encoder, tokenizer, Preprocessor())


def test_packed_rows_equal_the_tokenizers_own_pair_encoding(loaded):
    _, tokenizer, packer = loaded
    a, b = ["hola que tal feliz", "odio el lunes"], ["gracias por todo", "vamos al partido"]
    packed = packer.pack(a, b, max_len=MAX_LEN)
    for i in range(2):
        expected = tokenizer(packer.preprocess(a[i]), packer.preprocess(b[i]))["input_ids"]
        assert packed["input_ids"][i, : packed["length"][i]].tolist() == expected
        assert (packed["input_ids"][i, packed["length"][i] :] == packer.pad_id).all()
    single = packer.pack(a, None, max_len=MAX_LEN)
    assert single["input_ids"][0, : single["length"][0]].tolist() == tokenizer(a[0])["input_ids"]


def test_each_text_is_cut_to_max_len_tokens(loaded):
    _, _, packer = loaded
    packed = packer.pack(["feliz " * 40], ["odio " * 40], max_len=5)
    fixed = sum(map(len, packer.pair))
    assert packed["len_a"][0] == 5 and packed["length"][0] == 10 + fixed


def test_batch_marks_segment_b_and_only_the_template_tokens_as_special(loaded):
    _, tokenizer, packer = loaded
    packed = packer.pack(["hola feliz"], ["odio"], max_len=MAX_LEN)
    batch = packer.batch(packed["input_ids"], packed["len_a"], packed["length"], np.zeros(1))
    ids = batch.input_ids[0].tolist()
    prefix, middle, suffix = packer.pair
    b_start = len(prefix) + packed["len_a"][0] + len(middle)
    assert batch.segment_ids[0].tolist() == [0] * b_start + [1] * (len(ids) - b_start)
    template = set(prefix + middle + suffix)
    assert batch.special_mask[0].tolist() == [i in template for i in ids]
    assert tokenizer.unk_token_id not in template


def test_roberta_style_checkpoint_ignores_segment_ids(loaded):
    encoder, _, _ = loaded
    model = HFClassifier(encoder, 3)
    assert model.use_segments == (encoder.config.type_vocab_size > 1)


def test_hf_backbone_finetunes_saves_safely_and_reloads(tmp_path, raw, checkpoint):
    task_params = write_task(tmp_path / "data", aux=True)
    cfg = make_config(raw, {"t": task_params}, backbone="hf", hf_path=str(checkpoint), use_special_tokens=False,
                      collapse_mode="avg", lr=1e-2)
    task = first(cfg)
    metrics = finetune_task(cfg, task, tmp_path / "no-pretrained", tmp_path / "model", tmp_path / "results")
    assert (metrics["model"], metrics["model_name"], metrics["epochs_run"]) == ("hf", checkpoint.name, 2)

    files = {p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "hf/config.json", "hf/tokenizer_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pickle"))]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["backbone"] == "hf"
    assert {"model", "vocab_size", "max_positions", "head", "task", "max_len_test"} <= set(config)

    model, packer, _ = load_classifier_module(tmp_path / "model")
    test = encode_examples(packer, load_task(task, cfg.seed).test, MAX_LEN, task)
    scores = predict_scores(model, test, task, 64, torch.device("cpu"), packer=packer)
    assert metrics["test"] == evaluate_scores(task, test["labels"], scores)

    before = load_file(checkpoint / "model.safetensors")  # an HF directory: no model card
    _, after = load_pretrained_state(tmp_path / "model")
    changed = [k for k, v in before.items() if f"backbone.{k}" in after and not torch.equal(after[f"backbone.{k}"], v)]
    assert changed  # finetune_all: the encoder itself was trained


def test_hf_backbone_can_be_frozen(tmp_path, raw, checkpoint):
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, backbone="hf", hf_path=str(checkpoint),
                      finetune_all=False, epochs=1)
    finetune_task(cfg, first(cfg), tmp_path / "none", tmp_path / "model", tmp_path / "results")
    before = load_file(checkpoint / "model.safetensors")  # an HF directory: no model card
    _, after = load_pretrained_state(tmp_path / "model")
    assert all(torch.equal(after[f"backbone.{k}"], v) for k, v in before.items() if f"backbone.{k}" in after)


def test_trainable_layers_leaves_only_the_top_hf_layers_and_the_head_trainable(loaded):
    encoder, _, _ = loaded
    model = HFClassifier(copy.deepcopy(encoder), 2)
    set_trainable(model, finetune_all=True, trainable_layers=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.encoder.layer.1.", "classifier.")) for n in trainable)
    assert any(n.startswith("backbone.encoder.layer.1.") for n in trainable)


def test_hf_path_must_be_a_local_checkpoint_directory(tmp_path, raw):
    with pytest.raises(HFCheckpointError, match=r"finetuning\.hf_path .*not a directory"):
        load_hf_backbone(tmp_path / "dccuchile" / "bert-base-spanish")
    with pytest.raises(ConfigError, match=r"finetuning\.hf_path must name"):
        make_config(raw, {"t": write_task(tmp_path / "data")}, backbone="hf")
