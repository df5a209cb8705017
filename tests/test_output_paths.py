"""Nothing of the user's is lost: predict, embeddings and export-hf never write over what they read
(the input file, the model directory), and a symlink output writes its target and stays a link."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from helpers import build_finetuned, parse_tsv
from twilbert.cli import main
from twilbert.io_utils import checksums_text

pytestmark = pytest.mark.reliability

TEXTS = "hola que tal\nodio el lunes\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vocab_dir):
    return build_finetuned(tmp_path_factory.mktemp("model") / "model", vocab_dir)


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(TEXTS, encoding="utf-8")
    return path


def refused(capsys, *fragments: str) -> str:
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and all(f in line for f in fragments), line
    return line


def same_input(src, how: str):
    """``src`` itself, a symlink to it, or a hard link of it."""
    if how == "path":
        return src
    alias = src.with_name("alias.txt")
    (alias.symlink_to if how == "symlink" else alias.hardlink_to)(src)
    return alias


def model_state(model_dir) -> tuple[list[str], str]:
    return sorted(p.name for p in model_dir.iterdir()), checksums_text(model_dir)


@pytest.mark.parametrize("command,how", [("predict", "path"), ("predict", "symlink"), ("predict", "hard link"),
                                         ("embeddings", "path"), ("embeddings", "symlink")])
def test_predict_and_embeddings_refuse_an_output_that_is_their_input(tmp_path, model_dir, src, command, how, capsys):
    output = same_input(src, how)
    assert main([command, "--model", str(model_dir), "--input", str(src), "--output", str(output)]) == 2
    refused(capsys, "--output", "is the input file")
    assert src.read_text(encoding="utf-8") == TEXTS


@pytest.mark.parametrize("command", ["predict", "embeddings"])
def test_an_output_inside_the_model_directory_is_refused_and_the_model_is_untouched(tmp_path, model_dir, src,
                                                                                    command, capsys):
    before = model_state(model_dir)
    for target in (model_dir / "out.tsv", model_dir / "config.json"):
        assert main([command, "--model", str(model_dir), "--input", str(src), "--output", str(target)]) == 2
        refused(capsys, "lies in the model directory")
    link = tmp_path / "link.out"
    link.symlink_to(model_dir / "weights-copy")  # a link leading into the model directory
    assert main([command, "--model", str(model_dir), "--input", str(src), "--output", str(link)]) == 2
    refused(capsys, "lies in the model directory")
    assert model_state(model_dir) == before


def test_export_hf_refuses_an_out_inside_the_model_directory(tmp_path, model_dir, capsys):
    before = model_state(model_dir)
    assert main(["export-hf", "--model", str(model_dir), "--out", str(model_dir / "hf"), "--encoder-only"]) == 2
    refused(capsys, "--out", "lies in the model directory")
    assert model_state(model_dir) == before


def test_predict_into_a_symlink_writes_its_target_atomically_and_keeps_the_link(tmp_path, model_dir, src):
    target = tmp_path / "kept" / "predictions.tsv"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "latest.tsv"
    link.symlink_to(target)
    inode = target.stat().st_ino
    assert main(["predict", "--model", str(model_dir), "--input", str(src), "--output", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    _, rows = parse_tsv(target.read_text(encoding="utf-8"))
    assert [r[1] for r in rows] == TEXTS.splitlines()
    assert target.stat().st_ino != inode  # replaced by a rename, never rewritten in place
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["predictions.tsv"]  # no temp file left


def test_predict_into_a_dangling_symlink_creates_its_target(tmp_path, model_dir, src):
    link = tmp_path / "latest.tsv"
    link.symlink_to(tmp_path / "new.tsv")
    assert main(["predict", "--model", str(model_dir), "--input", str(src), "--output", str(link)]) == 0
    assert link.is_symlink() and len((tmp_path / "new.tsv").read_text().splitlines()) == 3


def test_embeddings_into_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, model_dir, src):
    target = tmp_path / "x.npy"
    target.write_bytes(b"old")
    link = tmp_path / "latest.npy"
    link.symlink_to(target)
    assert main(["embeddings", "--model", str(model_dir), "--input", str(src), "--output", str(link)]) == 0
    assert link.is_symlink() and np.load(target).shape == (2, 16)


def test_export_hf_into_a_symlink_to_an_empty_directory_writes_the_directory_and_keeps_the_link(tmp_path, model_dir):
    target = tmp_path / "exports" / "hf"
    target.mkdir(parents=True)
    link = tmp_path / "hf-latest"
    link.symlink_to(target)
    assert main(["export-hf", "--model", str(model_dir), "--out", str(link), "--encoder-only"]) == 0
    assert link.is_symlink() and (target / "config.json").is_file() and (target / "model.safetensors").is_file()
