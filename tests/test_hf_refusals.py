"""A damaged or mismatched local Hugging Face checkpoint is refused in one line naming the file or the
tensor, exit 2, before anything is written: in the vocab stage and pretraining (`training.init_from:
hf`, a masked-LM) and in finetuning (`finetuning.backbone: hf`, an encoder). One check serves all
three (data.hf_checkpoint); the checkpoints are built here, tiny, with no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from helpers import run_stage, write_params  # noqa: E402
from hf_checkpoints import make_mlm_checkpoint  # noqa: E402
from test_user_errors import error_lines, write_task  # noqa: E402
from twilbert.data.hf_checkpoint import ENCODER, MASKED_LM, HFCheckpointError, load_hf_checkpoint  # noqa: E402

pytestmark = pytest.mark.reliability

TENSOR = "roberta.encoder.layer.1.output.dense.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_mlm_checkpoint(tmp_path_factory.mktemp("hf") / "roberta", "roberta")


def edit_weights(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def gpt2_config(d: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=2, n_positions=64).save_pretrained(d)


def truncate(d: Path) -> None:
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not read")  # never unpickled: refused by its name


def specials_only(d: Path) -> None:
    data = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    specials = {t["content"]: t["id"] for t in data["added_tokens"]}
    data["model"].update(vocab=specials, merges=[])
    (d / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")


DAMAGES = {
    # what is done to the checkpoint -> what the one line must name, for (masked-LM, encoder)
    "gpt2 config over RoBERTa weights": (gpt2_config, ("'gpt2' model (GPT2Config), which AutoModelForMaskedLM "
                                                       "does not support", "tensor h.0.attn.c_attn.bias of the model")),
    "truncated weights": (truncate, ("model.safetensors is not a whole safetensors file",) * 2),
    "empty weights": (lambda d: (d / "model.safetensors").write_bytes(b""),
                      ("model.safetensors is not a whole safetensors file",) * 2),
    "a tensor missing": (lambda d: edit_weights(d, lambda t: t.pop(TENSOR)),
                         (f"tensor {TENSOR} of the model", "tensor encoder.layer.1.output.dense.weight of the model")),
    "an extra tensor": (lambda d: edit_weights(d, lambda t: t.update({TENSOR.replace("1", "5"): torch.zeros(2)})),
                        (f"tensor {TENSOR.replace('1', '5')} of the weights has no place",) * 2),
    "a tensor of another shape": (lambda d: edit_weights(d, lambda t: t.update({TENSOR: torch.zeros(32, 63)})),
                                  (f"tensor {TENSOR} has shape [32, 63] in the weights but [32, 64]",
                                   "tensor encoder.layer.1.output.dense.weight has shape [32, 63]")),
    "no tokenizer files": (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                           ("tokenizer.json is missing, and so are vocab.json, merges.txt: the checkpoint has no",) * 2),
    "a tokenizer.json of its special tokens only": (specials_only, ("the tokenizer holds only its 5 special tokens",) * 2),
    "no tokenizer.json": (lambda d: (d / "tokenizer.json").unlink(), ("tokenizer.json is missing",) * 2),
    "no config.json": (lambda d: (d / "config.json").unlink(), ("config.json is missing",) * 2),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{\"model_type\": "),
                             ("config.json is not valid JSON",) * 2),
    "config.json of an unknown model type": (lambda d: (d / "config.json").write_text('{"model_type": "nonesuch"}'),
                                             ("config.json cannot be read as a transformers config",) * 2),
    "pickle weights only": (pickle_only, ("weights only as pytorch_model.bin",) * 2),
    "a sharded index naming a missing shard": (
        lambda d: ((d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors"),
                   (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                       "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))),
        ("model-00002-of-00002.safetensors is missing (listed by model.safetensors.index.json)",) * 2),
}


def damaged(pristine: Path, tmp_path: Path, damage: str) -> Path:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(pristine, checkpoint)
    DAMAGES[damage][0](checkpoint)
    return checkpoint


@pytest.mark.parametrize("head", [MASKED_LM, ENCODER])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_naming_the_file_or_tensor(pristine, tmp_path, damage, head):
    checkpoint = damaged(pristine, tmp_path, damage)
    with pytest.raises(HFCheckpointError) as refused:
        load_hf_checkpoint(checkpoint, "training.hf_path", head)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"training.hf_path '{checkpoint}'"), message
    assert DAMAGES[damage][1][head == ENCODER] in message, message


def test_the_pristine_checkpoint_loads_for_both_heads_and_a_masked_lm_checkpoint_is_an_encoder(pristine):
    # the pooler the MLM checkpoint lacks and its lm_head, unused by an encoder, are not refusals
    assert type(load_hf_checkpoint(pristine, "k", MASKED_LM).model).__name__ == "RobertaForMaskedLM"
    assert type(load_hf_checkpoint(pristine, "k", ENCODER).model).__name__ == "RobertaModel"


def test_a_directory_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(HFCheckpointError, match="not a directory"):
        load_hf_checkpoint(tmp_path / "dccuchile" / "bert-base-spanish", "finetuning.hf_path", ENCODER)


# --------------------------------------------------------------------------------------------
# The real stages, as DVC runs them: one line, exit 2, nothing written, no MLflow run opened
# --------------------------------------------------------------------------------------------

def hf_pretraining_params(work: Path, checkpoint: Path) -> None:
    write_params(work, ["model=tiny", "representation.max_len=12", "training.init_from=hf",
                        f"training.hf_path={checkpoint}", "training.device=cpu"])


@pytest.mark.parametrize("damage", ["gpt2 config over RoBERTa weights", "no tokenizer files"])
def test_the_vocab_stage_refuses_a_damaged_checkpoint_in_one_line(pristine, tmp_path, damage):
    checkpoint = damaged(pristine, tmp_path, damage)
    work = tmp_path / "work"
    hf_pretraining_params(work, checkpoint)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("", encoding="utf-8")
    proc = run_stage("vocab.py", ["--corpus", corpus, "--out", tmp_path / "vocab"], work)
    [line] = error_lines(proc)
    assert f"training.hf_path '{checkpoint}'" in line and DAMAGES[damage][1][0] in line, line
    assert not (tmp_path / "vocab").exists()


@pytest.mark.parametrize("damage", ["truncated weights"])
def test_continued_pretraining_refuses_a_damaged_checkpoint_before_a_run_opens(pristine, tmp_path, damage):
    checkpoint = damaged(pristine, tmp_path, damage)
    work = tmp_path / "work"
    hf_pretraining_params(work, checkpoint)
    proc = run_stage("pretrain.py", ["--pairs", tmp_path / "pairs", "--vocab", tmp_path / "vocab", "--out",
                                     tmp_path / "out", "--checkpoints", tmp_path / "ck"], work)
    [line] = error_lines(proc)
    assert DAMAGES[damage][1][0] in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("damage", ["gpt2 config over RoBERTa weights", "truncated weights"])
def test_finetuning_on_a_damaged_hf_backbone_is_refused_before_a_run_opens(pristine, tmp_path, damage):
    checkpoint = damaged(pristine, tmp_path, damage)
    work = tmp_path / "work"
    task = write_task(tmp_path / "task")
    write_params(work, ["model=tiny", "representation.max_len=12", "finetuning.backbone=hf",
                        f"finetuning.hf_path={checkpoint}", "finetuning.device=cpu", "finetuning.baseline_row=false",
                        f"tasks.tass_default.dataset.data_dir={task}"])
    proc = run_stage("finetune.py", ["--task", "tass_default", "--model-out", tmp_path / "m", "--metrics-out",
                                     tmp_path / "r", "--checkpoints", tmp_path / "ck"], work)
    [line] = error_lines(proc)
    assert f"finetuning.hf_path '{checkpoint}'" in line and DAMAGES[damage][1][1] in line, line
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_encoder_only_checkpoint_continues_with_a_seeded_head_and_says_so(tmp_path, caplog):
    # BertModel's weights under AutoModelForMaskedLM: the head is missing, not the encoder; no refusal
    from finetune_data import make_hf_bert

    checkpoint = make_hf_bert(tmp_path / "bert")
    with caplog.at_level("WARNING", logger="twilbert.data.hf_checkpoint"):
        model = load_hf_checkpoint(checkpoint, "training.hf_path", MASKED_LM).model
    assert type(model).__name__ == "BertForMaskedLM"
    assert "head tensor(s) not in the checkpoint start seeded (cls.predictions." in caplog.text
