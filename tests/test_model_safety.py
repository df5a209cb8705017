"""Safe model files: planted pickles never run, and a config that does not fit its weights is named.

test_model_io.py covers a raw pickle ``pytorch_model.bin`` beside a model directory's config; here:
pickles in torch.save's own format, pickles disguised as the safetensors or JSON files, the training
checkpoint's pickle-format files, and mismatches met through the public loading paths.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from twilbert.config import ModelConfig
from twilbert.inference.embeddings import load_encoder
from twilbert.io_utils import sha256_file
from twilbert.model import CheckpointError, TWilBertForPretraining, load_into, load_pretrained_state
from twilbert.model.card import ModelCard
from twilbert.model.io import save_pretrained
from twilbert.model.manifest import write_manifest
from twilbert.train.checkpoint import (
    CHECKSUMS_FILE,
    TrainingCheckpointError,
    load_training_checkpoint,
    resume_training,
    save_training_checkpoint,
)
from twilbert.train.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.reliability

VOCAB, MAX_POS = 40, 16


class _Tripwire:
    """Unpickling this creates a file: proof that the payload ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def tiny(vocab: int = VOCAB, hidden: int = 16) -> TWilBertForPretraining:
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=8, hidden_size=hidden, n_encoders=1, n_heads=2, intermediate_size=32)
    cfg.validate()
    return TWilBertForPretraining(cfg, vocab, MAX_POS)


def plant(path, tripwire, fmt: str) -> None:
    if fmt == "torch.save":
        torch.save({"state": _Tripwire(tripwire)}, path)  # the zip format torch.save writes
    else:
        path.write_bytes(pickle.dumps(_Tripwire(tripwire), protocol=2))  # a legacy raw pickle


@pytest.fixture
def tripwire(tmp_path):
    wire = tmp_path / "payload-ran"
    yield wire
    assert not wire.exists(), "a planted pickle was executed"


# --------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch.save", "raw"])
def test_pickles_beside_a_model_directory_are_never_unpickled(tmp_path, tripwire, fmt):
    model = tiny()
    directory = save_pretrained(tmp_path / "m", model, ModelCard(model.cfg, VOCAB, MAX_POS))
    for name in ("pytorch_model.bin", "model.pt", "optimizer.pt", "training_args.bin"):
        plant(directory / name, tripwire, fmt)
    _, state = load_pretrained_state(directory)
    assert load_into(tiny(), state) == ([], [])


@pytest.mark.parametrize("disguised", ["model.safetensors", "config.json"])
def test_a_pickle_disguised_as_a_model_file_is_refused_with_the_file_named(tmp_path, tripwire, disguised):
    model = tiny()
    directory = save_pretrained(tmp_path / "m", model, ModelCard(model.cfg, VOCAB, MAX_POS))
    plant(directory / disguised, tripwire, "torch.save")
    with pytest.raises(CheckpointError, match=disguised.replace(".", r"\.")):
        load_pretrained_state(directory)


# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint(tmp_path):
    model = tiny()
    opt = build_optimizer("adam", model.parameters(), 1e-3, 0.0)
    sched = build_scheduler(opt, True, 16, 2)
    state = {"epoch": 0, "batch_in_epoch": 1, "optimizer_steps": 1, "micro_steps": 1, "accum_position": 0}
    return save_training_checkpoint(tmp_path / "ckpt", model, opt, sched, state, "fp"), model, opt, sched


def reseal(path) -> None:
    sums = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.name != CHECKSUMS_FILE}
    (path / CHECKSUMS_FILE).write_text(json.dumps(sums))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "model.safetensors"])
@pytest.mark.parametrize("fmt", ["torch.save", "raw"])
def test_a_pickle_planted_in_a_training_checkpoint_is_refused_and_never_executed(tmp_path, tripwire, name, fmt):
    path, model, opt, sched = checkpoint(tmp_path)
    plant(path / name, tripwire, fmt)
    reseal(path)  # consistent checksums: the loader itself must refuse
    with pytest.raises(TrainingCheckpointError, match=name.replace(".", r"\.")):
        load_training_checkpoint(path, model, opt, sched)
    assert resume_training(tmp_path / "ckpt", model, opt, sched, "fp") is None  # nothing usable: fresh start


# --------------------------------------------------------------------------------------------
# Config and weights that do not fit
# --------------------------------------------------------------------------------------------


def edit_config(directory, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if key in config:
            config[key] = value
        else:
            config["model"][key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, named", [
    ({"vocab_size": 50}, r"word_embeddings\.weight: checkpoint \(40, 8\) vs model \(50, 8\) — vocab size differs"),
    ({"max_positions": 32}, r"position_embeddings\.weight.*max_positions differs"),
    ({"hidden_size": 32, "intermediate_size": 64}, r"embedding_hidden_mapping_in\.weight.*model config differs"),
])
def test_a_config_that_does_not_fit_its_weights_fails_naming_the_mismatch(tmp_path, change, named):
    model = tiny()
    directory = save_pretrained(tmp_path / "m", model, ModelCard(model.cfg, VOCAB, MAX_POS))
    edit_config(directory, **change)
    for name in ("spm.model", "meta.json"):  # present, as in a real model directory; never reached
        (directory / name).write_text("{}")
    write_manifest(directory)  # sealed as it is: the loader itself must catch the misfit
    with pytest.raises(CheckpointError, match=named):
        load_encoder(directory)


def test_a_training_checkpoint_for_another_vocabulary_fails_naming_the_tensor(tmp_path):
    path, *_ = checkpoint(tmp_path)
    other = tiny(vocab=VOCAB + 8)
    opt = build_optimizer("adam", other.parameters(), 1e-3, 0.0)
    named = r"(?s)model\.safetensors.*word_embeddings\.weight.*vocab size differs"
    with pytest.raises(TrainingCheckpointError, match=named):
        load_training_checkpoint(path, other, opt, None)
