"""Model directories: exact round trip, atomic writes, clear errors, never pickle."""

import json

import pytest
import torch
from safetensors import safe_open

import twilbert.model.io as model_io
from twilbert.config import ModelConfig, PkmConfig
from twilbert.model import (
    CheckpointError,
    ModelCard,
    TWilBertForClassification,
    TWilBertForPretraining,
    TWilBertModel,
    load_into,
    load_pretrained_state,
    save_pretrained,
)

VOCAB, MAX_POS = 40, 16


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(
        embedding_size=8,
        hidden_size=16,
        n_encoders=2,
        n_heads=2,
        intermediate_size=32,
        pkm=True,
        pkm_params=PkmConfig(k_dim=8, memory_size=4, n_heads=2, knn=2, in_layers=[1]),
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def pretraining(seed=0, vocab=VOCAB, **overrides):
    torch.manual_seed(seed)
    return TWilBertForPretraining(tiny_cfg(**overrides), vocab, MAX_POS)


def save(tmp_path, m, name="model", **extra):
    return save_pretrained(tmp_path / name, m, ModelCard(m.cfg, VOCAB, MAX_POS, **extra))


def test_round_trip_is_bit_exact_and_keeps_the_tie(tmp_path):
    m = pretraining(seed=0)
    m.train()
    ids = torch.randint(5, VOCAB, (4, 6))
    m(ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool), torch.full_like(ids, -100))  # BN stats
    directory = save(tmp_path, m)

    card, state = load_pretrained_state(directory)
    assert card.model == m.cfg and (card.vocab_size, card.max_positions) == (VOCAB, MAX_POS)
    fresh = pretraining(seed=1)
    load_into(fresh, state)
    for name, tensor in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert fresh.predictions.decoder.weight is fresh.twilbert.embeddings.word_embeddings.weight


def test_tied_matrix_is_stored_once(tmp_path):
    directory = save(tmp_path, pretraining())
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "twilbert.embeddings.word_embeddings.weight" in keys
    assert "predictions.decoder.weight" not in keys


def test_config_json_holds_the_model_section_and_the_card_keys(tmp_path):
    m = pretraining()
    directory = save(tmp_path, m, epoch=12, metrics={"heldout_mlm_loss": 1.5})
    config = json.loads((directory / "config.json").read_text())
    assert config["model"]["n_encoders"] == 2 and config["model"]["pkm_params"]["in_layers"] == [1]
    assert (config["vocab_size"], config["max_positions"], config["epoch"]) == (VOCAB, MAX_POS, 12)
    assert load_pretrained_state(directory)[0].metrics == {"heldout_mlm_loss": 1.5}


def test_save_requires_model_sizes_in_config(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        save_pretrained(tmp_path / "m", pretraining(), {"model": {}, "max_positions": 3})
    assert not (tmp_path / "m").exists()


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full")


def test_failure_mid_write_leaves_no_directory_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, pretraining())
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = save(tmp_path, pretraining(seed=0))
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    monkeypatch.setattr(model_io, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        save(tmp_path, pretraining(seed=1))
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_resave_replaces_weights_and_keeps_other_files(tmp_path):
    directory = save(tmp_path, pretraining(seed=0))
    (directory / "vocab.model").write_text("spm")
    m = pretraining(seed=1)
    save(tmp_path, m)
    assert (directory / "vocab.model").read_text() == "spm"
    state = load_pretrained_state(directory)[1]
    assert torch.equal(state["twilbert.embeddings.word_embeddings.weight"], m.twilbert.embeddings.word_embeddings.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_shape_mismatch_names_the_parameter_and_the_reason(tmp_path):
    directory = save(tmp_path, pretraining(vocab=100, hidden_size=32, embedding_size=32))
    model = pretraining(vocab=120, hidden_size=32, embedding_size=32)
    with pytest.raises(CheckpointError) as err:
        load_into(model, load_pretrained_state(directory)[1])
    message = str(err.value)
    assert "twilbert.embeddings.word_embeddings.weight: checkpoint (100, 32) vs model (120, 32) — vocab size differs" in message
    assert "predictions.bias: checkpoint (100,) vs model (120,)" in message


def test_strict_load_lists_missing_and_unexpected_names(tmp_path):
    state = load_pretrained_state(save(tmp_path, pretraining()))[1]
    torch.manual_seed(0)
    classifier = TWilBertForClassification(tiny_cfg(), VOCAB, MAX_POS, n_outputs=3)
    with pytest.raises(CheckpointError, match="classifier.out.weight"):
        load_into(classifier, state)
    report = load_into(classifier, state, strict=False)
    assert "classifier.out.weight" in report.missing and "predictions.bias" in report.unexpected
    assert torch.equal(classifier.twilbert.embeddings.word_embeddings.weight, state["twilbert.embeddings.word_embeddings.weight"])


def test_bare_encoder_loads_from_a_pretraining_checkpoint(tmp_path):
    m = pretraining()
    state = load_pretrained_state(save(tmp_path, m))[1]
    torch.manual_seed(5)
    encoder = TWilBertModel(tiny_cfg(), VOCAB, MAX_POS)
    assert load_into(encoder, state) == ([], [])
    for name, tensor in m.twilbert.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_checkpoint_is_never_loaded(tmp_path, monkeypatch):
    import pickle

    tripwire = tmp_path / "pickle-was-loaded"
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "config.json").write_text(ModelCard(tiny_cfg(), VOCAB, MAX_POS).to_json())
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(FileNotFoundError, match="model.safetensors.*never loaded"):
        load_pretrained_state(directory)
    assert not tripwire.exists()

    save(tmp_path, pretraining(), name="m")  # now with safetensors beside the pickle
    load_pretrained_state(directory)
    assert not tripwire.exists()


def test_missing_config_names_the_file(tmp_path):
    directory = save(tmp_path, pretraining())
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model[/\\]config\.json"):
        load_pretrained_state(directory)


def test_invalid_json_names_the_file(tmp_path):
    directory = save(tmp_path, pretraining())
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: sha256 differs"):  # checksums.json catches it
        load_pretrained_state(directory)
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):  # and so does the reader
        load_pretrained_state(directory, verify=False)


def test_truncated_weights_name_the_file(tmp_path):
    directory = save(tmp_path, pretraining())
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 differs"):
        load_pretrained_state(directory)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_pretrained_state(directory, verify=False)
