"""The model card (config.json): one typed record, loaded strictly, written byte for byte as before."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from twilbert.config import FinetuningConfig, ModelConfig, TaskConfig, TaskDataset, TaskSpec
from twilbert.data.preprocess import PreprocessConfig
from twilbert.model import TWilBertForPretraining, save_pretrained
from twilbert.model.card import (
    CardError, CheckpointError, HeadConfig, KFoldSummary, ModelCard, max_text_len, n_outputs, pretraining_positions,
    read_card, row_width,
)

MODEL = ModelConfig(name="micro", embedding_size=8, hidden_size=16, n_encoders=2, n_heads=2, intermediate_size=32)
TASK = TaskConfig(name="emo", dataset=TaskDataset(aux_header="CONTEXT"),
                  task=TaskSpec(categories={"alegría": 0, "enfado": 1, "miedo": 2}))
HEAD = {"collapse_mode": "cls", "use_special_tokens": False, "dropout": 0.2, "n_hidden": 1, "hidden_size": 32}
KFOLD = {"k": 2, "fold_scores": [0.5, 0.75], "mean_fold_score": 0.625, "best_epochs": [1, 2], "on": "train",
         "members": ["folds/0", "folds/1"], "selected_fold": 1}


# config.json objects as the stages wrote them before the card existed (key order included)
def old_pretrained() -> dict:
    return {"model": asdict(MODEL), "vocab_size": 120, "max_positions": 35, "max_len": 16, "epoch": 3,
            "metrics": {"heldout_mlm_loss": 4.5, "heldout_rop_accuracy": 0.5}}


def old_twilbert_fold() -> dict:
    return {**old_pretrained(), "backbone": "twilbert", "head": dict(HEAD), "task": asdict(TASK), "max_len_test": 12,
            "finetuning": asdict(FinetuningConfig()), "best_epoch": 2, "fold": 1}


def old_kfold_top() -> dict:
    return {**old_twilbert_fold(), "kfold": json.loads(json.dumps(KFOLD))}


def old_baseline() -> dict:
    return {"model": {"baseline_model": "svm", "c": 1.0, "link": "softmax", "word_ngrams": [1, 2]},
            "vocab_size": 500, "max_positions": None, "backbone": "baseline", "head": None,
            "preprocess": asdict(PreprocessConfig()), "task": asdict(TASK), "max_len_test": 16,
            "finetuning": asdict(FinetuningConfig(backbone="baseline")), "best_epoch": None}


def old_text(config: dict, ascii: bool = True) -> str:
    return json.dumps(config, indent=2, ensure_ascii=ascii) + "\n"


def write(tmp_path, text: str):
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("old, ascii", [
    (old_pretrained, True), (old_twilbert_fold, True), (old_kfold_top, True), (old_baseline, False),
], ids=["pretrained", "fold", "kfold", "baseline"])
def test_configs_written_before_the_card_load_and_rewrite_to_the_same_bytes(tmp_path, old, ascii):
    text = old_text(old(), ascii)
    card = read_card(write(tmp_path, text))
    assert card.to_json() == text


def test_round_trip_keeps_every_key_typed(tmp_path):
    card = ModelCard.from_dict(old_kfold_top())
    assert isinstance(card.model, ModelConfig) and card.model == MODEL
    assert isinstance(card.head, HeadConfig) and card.head.collapse_mode == "cls"
    assert isinstance(card.task, TaskConfig) and card.task == TASK
    assert isinstance(card.finetuning, FinetuningConfig) and card.kfold_members == ["folds/0", "folds/1"]
    assert isinstance(card.kfold, KFoldSummary) and card.kfold.best_epochs == [1, 2]
    card.write(tmp_path / "config.json")
    assert read_card(tmp_path) == card


def test_a_foreign_model_section_is_kept_as_read(tmp_path):
    hf = {"architectures": ["BertModel"], "hidden_size": 16, "max_position_embeddings": 64}
    card = ModelCard(hf, 200, 64, backbone="hf", hf_dir="hf", head=HeadConfig(), task=TASK, max_len_test=12)
    assert read_card(write(tmp_path, card.to_json())).model == hf


@pytest.mark.parametrize("edit, named", [
    (lambda c: c.update(tsak=c.pop("task")), r"unknown config key\(s\): tsak"),
    (lambda c: c["model"].update(hiden_size=16), r"unknown config key\(s\): model\.hiden_size"),
    (lambda c: c["model"].update(hidden_size="big"), r"model\.hidden_size must be an integer"),
    (lambda c: c["head"].update(dropout="high"), r"head\.dropout must be a number"),
    (lambda c: c["task"]["task"].update(threshold=[0.5]), r"task\.task\.threshold must be a number"),
    (lambda c: c.update(max_len_test="16"), r"max_len_test must be an integer"),
    (lambda c: c.pop("vocab_size"), r"missing key\(s\) \['vocab_size'\]"),
    (lambda c: c["model"].update(n_heads=3), r"model\.n_heads \(3\) must divide"),  # validated, not only typed
    (lambda c: c.update(kfold={"k": 2}), r"missing .* 'fold_scores'"),
    (lambda c: c.update(max_positions=None), r"max_positions must be an integer for a twilbert model"),
])
def test_an_unknown_mistyped_or_missing_key_is_refused_naming_the_file_and_the_key(tmp_path, edit, named):
    config = old_twilbert_fold()
    edit(config)
    path = write(tmp_path, json.dumps(config))
    with pytest.raises(CardError, match=rf"{tmp_path.name}[/\\]config\.json: .*{named}"):
        read_card(path)


def test_card_errors_are_checkpoint_errors_and_invalid_json_names_the_file(tmp_path):
    path = write(tmp_path, "{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        read_card(path)
    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        read_card(write(tmp_path, "[]"))


def test_save_refuses_a_bad_card_before_touching_disk(tmp_path):
    config = {**old_pretrained(), "step": 12}
    with pytest.raises(CardError, match=r"unknown config key\(s\): step"):
        save_pretrained(tmp_path / "m", TWilBertForPretraining(MODEL, 120, 35), config)
    assert not (tmp_path / "m").exists()


def test_a_saved_pretrained_model_carries_its_card(tmp_path):
    torch.manual_seed(0)
    card = ModelCard.pretrained(MODEL, 120, 16)
    directory = save_pretrained(tmp_path / "m", TWilBertForPretraining(MODEL, 120, card.max_positions), card)
    assert (directory / "config.json").read_text(encoding="utf-8") == old_text(
        {k: v for k, v in old_pretrained().items() if k not in ("epoch", "metrics")})
    assert read_card(directory) == card


# --------------------------------------------------------------------------------------------
# Derived lengths
# --------------------------------------------------------------------------------------------


def test_pretraining_positions_fit_a_reply_pair_of_max_len_texts():
    assert pretraining_positions(16) == 2 * 16 + 3 == row_width(16, 2)
    assert row_width(16, 1) == 18  # [CLS] a [SEP]


@pytest.mark.parametrize("n_segments", [1, 2])
def test_max_text_len_is_the_longest_text_whose_row_fits(n_segments):
    for positions in range(4, 80):
        longest = max_text_len(positions, n_segments)
        assert row_width(longest, n_segments) <= positions < row_width(longest + 1, n_segments)


def card_with(**fields) -> ModelCard:
    return ModelCard(MODEL, 120, 35, **fields)


def test_text_len_is_the_test_length_cut_to_the_positions():
    single = TaskConfig(name="t")
    assert card_with(max_len=16, max_len_test=12, task=TASK).text_len() == 12
    assert card_with(max_len=16).text_len() == 16  # a pretrained model: its max_len
    assert card_with().text_len() == max_text_len(35, 1) == 33  # nothing declared: what the positions allow
    assert card_with(max_len_test=20, task=single).text_len() == 20
    assert card_with(max_len_test=20, task=TASK).text_len() == 16  # two texts of 20 do not fit 35 positions
    assert card_with(max_len_test=20, task=TASK).text_len(n_segments=1) == 20
    assert card_with(max_len_test=40, task=single).text_len() == 33


def test_text_len_of_other_backbones_is_their_declared_test_length():
    assert ModelCard({}, 200, 64, backbone="hf", max_len_test=12, task=TASK).text_len() == 12
    assert ModelCard({}, 500, None, backbone="baseline", task=TASK).text_len() == 0  # the baseline does not truncate


def test_fits_checks_a_row_against_the_positions():
    assert card_with().fits(16, 2) and not card_with().fits(17, 2)
    assert ModelCard({}, 500, None, backbone="baseline").fits(10_000, 2)


def test_outputs_are_one_per_category_or_one_value():
    assert card_with(task=TASK).n_outputs == n_outputs(TASK) == 3
    assert n_outputs(TaskConfig(name="r", task=TaskSpec(regression=True, eval_metric="pearson"))) == 1


def test_a_pretrained_card_has_no_classifier_keys():
    card = ModelCard.pretrained(MODEL, 120, 16)
    assert not card.is_finetuned and card.kind == "twilbert"
    with pytest.raises(CardError, match="no 'task' key"):
        _ = card.n_outputs
