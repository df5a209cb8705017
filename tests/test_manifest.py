"""Checksummed model directories: every writer seals a checksums.json, every loader verifies it."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from finetune_data import first, make_config, make_pretrained, write_task
from helpers import REPO, build_finetuned, build_vocab
from twilbert.cli import main
from twilbert.config import compose
from twilbert.inference.predict import load_finetuned
from twilbert.model import TWilBertForClassification
from twilbert.model.baseline import load_baseline
from twilbert.model.io import CheckpointError, load_pretrained_state, save_pretrained
from twilbert.model.manifest import (
    MANIFEST_NAME,
    ManifestError,
    manifest_text,
    verify_model_dir,
    write_manifest,
)
from twilbert.train.finetune.stage_work import finetune_task

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return build_vocab(tmp_path_factory.mktemp("vocab") / "vocab")


@pytest.fixture(scope="module")
def sealed_model(tmp_path_factory, vocab):
    """A finetuned model directory sealed the way the finetune stage seals it (vocabulary included)."""
    directory = build_finetuned(tmp_path_factory.mktemp("model") / "model", vocab)
    write_manifest(directory)
    return directory


@pytest.fixture
def model(tmp_path, sealed_model):
    copy = tmp_path / "model"
    shutil.copytree(sealed_model, copy)
    return copy


def flip_last_byte(path):
    """The last byte of a safetensors file is tensor data: the file still loads, with another weight."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_but_itself_with_its_sha256(model):
    sums = json.loads((model / MANIFEST_NAME).read_text())
    assert sorted(sums) == sorted(p.name for p in model.iterdir() if p.name != MANIFEST_NAME)
    assert {"model.safetensors", "config.json", "spm.model", "meta.json"} <= set(sums)
    assert all(len(v) == 64 for v in sums.values())


def test_manifest_bytes_depend_on_content_only(tmp_path, model):
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(model, other)
    (other / "config.json").touch()  # a new mtime changes nothing
    write_manifest(other)
    assert (other / MANIFEST_NAME).read_bytes() == (model / MANIFEST_NAME).read_bytes()
    text = (model / MANIFEST_NAME).read_text()
    assert text == manifest_text(model) and list(json.loads(text)) == sorted(json.loads(text))


def test_save_pretrained_seals_the_directory_it_writes_extras_included(tmp_path, sealed_model):
    directory = tmp_path / "model"
    card, state = load_pretrained_state(sealed_model)
    model = TWilBertForClassification(card.model_config, card.vocab_size, card.max_positions, 4)
    save_pretrained(directory, model, card)
    assert set(json.loads((directory / MANIFEST_NAME).read_text())) == {"config.json", "model.safetensors"}
    (directory / "notes.txt").write_text("kept on re-save")
    save_pretrained(directory, model, card)  # a re-save carries the extra file and lists it
    assert set(json.loads((directory / MANIFEST_NAME).read_text())) == {"config.json", "model.safetensors",
                                                                         "notes.txt"}
    load_pretrained_state(directory)


def test_predict_refuses_a_flipped_byte_in_one_line_with_exit_2(model, tmp_path, capsys):
    flip_last_byte(model / "model.safetensors")
    out = tmp_path / "out.tsv"
    assert main(["predict", "--model", str(model), "--output", str(out), "hola"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert f"{model / 'model.safetensors'}: sha256 differs" in err and "--no-verify" in err
    assert not out.exists()


def test_predict_no_verify_loads_a_directory_edited_on_purpose(model, sealed_model, capsys):
    flip_last_byte(model / "model.safetensors")
    assert main(["predict", "--model", str(model), "--no-verify", "--format", "jsonl", "hola"]) == 0
    assert json.loads(capsys.readouterr().out)["label"]
    with pytest.raises(ManifestError):  # the switch lasts for that command only
        load_finetuned(model)


def test_predict_refuses_a_changed_vocabulary_and_a_missing_file(model, capsys):
    (model / "meta.json").write_text((model / "meta.json").read_text() + " ")
    assert main(["predict", "--model", str(model), "hola"]) == 2
    assert "meta.json: sha256 differs" in capsys.readouterr().err
    (model / "meta.json").unlink()
    with pytest.raises(CheckpointError):
        load_pretrained_state(model)


def test_a_directory_without_manifest_loads_with_a_warning(model, caplog):
    (model / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING):
        fm = load_finetuned(model)
    assert fm.scores(["hola"]).shape == (1, 4)
    assert any(f"no {MANIFEST_NAME}" in r.getMessage() for r in caplog.records)


def test_an_unlisted_file_warns_and_a_corrupt_manifest_refuses(model, caplog):
    (model / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING):
        verify_model_dir(model)
    assert any("notes.txt" in r.getMessage() for r in caplog.records)
    (model / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match=MANIFEST_NAME):
        verify_model_dir(model)


def test_embeddings_and_export_hf_refuse_a_flipped_byte(model, tmp_path, capsys):
    flip_last_byte(model / "model.safetensors")
    src = tmp_path / "in.txt"
    src.write_text("hola\n")
    assert main(["embeddings", "--model", str(model), "--input", str(src), "--output", str(tmp_path / "x.npy")]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
    assert main(["export-hf", "--model", str(model), "--out", str(tmp_path / "hf")]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_predict_cli_process_prints_one_error_line(model):
    flip_last_byte(model / "model.safetensors")
    done = subprocess.run([sys.executable, "-m", "twilbert.cli", "predict", "--model", str(model), "hola"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""


# --------------------------------------------------------------------------------------------
# The finetune stage: seals its output, verifies models/pretrained
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw():
    return compose(["model=tiny"], REPO / "conf")


def test_finetune_output_is_sealed_folds_and_baseline_included(tmp_path, raw):
    pretrained = make_pretrained(tmp_path / "pretrained")
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, epochs=1, kfold=2, baseline_row=True)
    task = first(cfg)
    out = tmp_path / "model"
    finetune_task(cfg, task, pretrained, out, tmp_path / "results")
    sums = json.loads((out / MANIFEST_NAME).read_text())
    for name in ("model.safetensors", "spm.model", "config.json", "folds/0/model.safetensors",
                 f"folds/1/{MANIFEST_NAME}", "baseline/weights.npz", f"baseline/{MANIFEST_NAME}"):
        assert name in sums, name
    for directory in (out, out / "folds" / "0", out / "baseline"):
        assert json.loads((directory / MANIFEST_NAME).read_text()) == json.loads(manifest_text(directory))
    load_finetuned(out)  # blended: every fold verified
    weights = out / "baseline" / "weights.npz"
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="weights.npz"):
        load_baseline(out / "baseline")


def test_finetune_refuses_a_corrupt_pretrained_model_before_any_output(tmp_path, raw, monkeypatch):
    pretrained = make_pretrained(tmp_path / "pretrained")
    flip_last_byte(pretrained / "model.safetensors")
    cfg = make_config(raw, {"t": write_task(tmp_path / "data")}, epochs=1, baseline_row=False)
    out, results = tmp_path / "model", tmp_path / "results"
    with pytest.raises(ManifestError, match="model.safetensors"):
        finetune_task(cfg, first(cfg), pretrained, out, results)
    assert not out.exists() and not results.exists()
    monkeypatch.setenv("TWILBERT_NO_VERIFY", "1")
    metrics = finetune_task(cfg, first(cfg), pretrained, out, results)
    assert np.isfinite(metrics["test"]["official"])


def test_only_the_users_switch_logs_unverified_checksums(model, monkeypatch, caplog):
    # verify=False is a caller that verified the directory once already: no line claiming otherwise
    with caplog.at_level(logging.INFO, logger="twilbert.model.manifest"):
        verify_model_dir(model, verify=False)
    assert "not verified" not in caplog.text
    monkeypatch.setenv("TWILBERT_NO_VERIFY", "1")
    with caplog.at_level(logging.INFO, logger="twilbert.model.manifest"):
        verify_model_dir(model)
    assert "checksums not verified (--no-verify or TWILBERT_NO_VERIFY=1)" in caplog.text
