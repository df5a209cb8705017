"""The `twilbert` command: compose, predict, embeddings and export-hf as a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from helpers import LONG, REPO, build_finetuned, build_pretrained, copy_model, parse_tsv
from twilbert.cli import main
from twilbert.config import compose


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vocab_dir):
    return build_finetuned(tmp_path_factory.mktemp("model") / "model", vocab_dir)


def cli(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """The installed entry point in a fresh process, as a shell user calls it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "twilbert.cli", *map(str, args)], input=stdin,
                          capture_output=True, env=env, timeout=120)


def test_compose_still_writes_and_checks_params(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    assert main(["compose", "--conf", str(REPO / "conf"), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == compose([], REPO / "conf")
    assert main(["compose", "--conf", str(REPO / "conf"), "--check", str(out)]) == 0
    out.write_text("seed: 1\n")
    assert main(["compose", "--conf", str(REPO / "conf"), "--check", str(out)]) == 1


def test_after_an_experiment_check_says_in_one_line_how_to_go_back_and_params_says_what_it_replaces(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    raw = compose([], REPO / "conf")
    experiment = {**raw, "model": {**raw["model"], "n_encoders": 4}}  # what `dvc exp run -S model.n_encoders=4` leaves
    out.write_text(yaml.safe_dump(experiment, sort_keys=False))
    capsys.readouterr()
    assert main(["compose", "--conf", str(REPO / "conf"), "--check", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.n_encoders: 2 -> 4" in err
    assert all(hint in err for hint in (f"git checkout {out}", "make params", "dvc exp apply"))
    assert main(["compose", "--conf", str(REPO / "conf"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "model.n_encoders: 4 -> 2" in err and "dvc exp apply" in err  # not silent
    assert main(["compose", "--conf", str(REPO / "conf"), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""  # nothing replaced, nothing said


BAD_SEEDS = ["0", "-1", "1.5", '"3"', "[0,0]", "[]", "101", "99999999999999999999", "null"]


@pytest.mark.parametrize("seeds", BAD_SEEDS)
def test_an_invalid_seed_count_is_one_line_naming_the_key_in_compose_and_check(tmp_path, capsys, seeds):
    # `make params` is `compose --out`, `make repro` starts with `compose --check`: both compose conf/
    params = tmp_path / "params.yaml"
    for extra in (["--out", str(params)], ["--check", str(params)]):
        assert main(["compose", "--conf", str(REPO / "conf"), *extra, f"finetuning.seeds={seeds}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: finetuning.seeds"), err
        assert "InterpolationResolutionError" not in err and "full_key" not in err
    assert not params.exists()


def test_an_invalid_seed_count_exits_2_without_a_traceback_from_the_shell():
    proc = cli("compose", "--conf", REPO / "conf", "finetuning.seeds=0")
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and "Traceback" not in err
    assert err == "error: finetuning.seeds must be a count from 1 to 100 or a list of seeds, got 0"


def test_predict_from_arguments(model_dir, capsys):
    assert main(["predict", "--model", str(model_dir), "hola que tal", "", "😂", LONG]) == 0
    header, rows = parse_tsv(capsys.readouterr().out)
    assert header[:3] == ["id", "text", "label"] and len(rows) == 4
    assert [r[1] for r in rows] == ["hola que tal", "", "😂", LONG]


def test_predict_from_a_file_to_a_file_one_line_per_line(tmp_path, model_dir):
    texts = ["hola", "", "   ", "https://t.co/x", "@usuario", LONG, "odio el lunes"]
    src = tmp_path / "in.txt"
    src.write_bytes(("\r\n".join(texts) + "\n").encode())  # CRLF endings, final newline
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(model_dir), "--input", str(src), "--output", str(out),
                 "--format", "jsonl", "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == list(range(1, len(texts) + 1))
    assert [r["text"] for r in records] == texts


def test_predict_tsv_input_echoes_the_id_column(tmp_path, model_dir, capsys):
    src = tmp_path / "in.tsv"
    src.write_text("ID\tTEXT\n t1\thola\nt2\t\nt3\todio el lunes\n", encoding="utf-8")
    assert main(["predict", "--model", str(model_dir), "--input", str(src), "--column", "TEXT", "--no-text"]) == 0
    _, rows = parse_tsv(capsys.readouterr().out)
    assert [r[0] for r in rows] == [" t1", "t2", "t3"]


def test_predict_from_stdin_in_a_real_process(model_dir):
    texts = ["hola", "", "😂🙏", LONG, "sin salto final"]
    done = cli("predict", "--model", model_dir, "--input", "-", "--format", "jsonl", stdin="\n".join(texts).encode())
    assert done.returncode == 0, done.stderr.decode()
    records = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert [r["text"] for r in records] == texts
    assert "1 blank input lines labelled as the placeholder text '[vacío]'" in done.stderr.decode()


@pytest.mark.parametrize("missing", ["config.json", "spm.model"])
def test_wrong_model_directory_exits_2_with_one_line_naming_the_file(tmp_path, model_dir, missing):
    broken = copy_model(model_dir, tmp_path / "broken", without=missing)
    done = cli("predict", "--model", broken, "hola")
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b""
    assert err.count("\n") == 1 and err.startswith("error: ") and f"missing {missing}" in err
    assert "Traceback" not in err


def test_empty_input_gives_an_empty_output_and_exit_0(tmp_path, model_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "o.tsv"
    assert main(["predict", "--model", str(model_dir), "--input", str(empty), "--output", str(out)]) == 0
    assert out.read_bytes() == b""
    assert main(["predict", "--model", str(model_dir), "--input", str(empty), "--column", "TEXT"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["predict", "--model", str(model_dir)]) == 2
    assert "no input" in capsys.readouterr().err


def test_empty_stdin_in_a_real_process_exits_0_with_no_output(model_dir):
    done = cli("predict", "--model", model_dir, "--input", "-", "--format", "jsonl", stdin=b"")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b""


def test_invalid_utf8_lines_are_labelled_and_reported_by_line_number(tmp_path, model_dir, caplog):
    src = tmp_path / "latin1.txt"
    src.write_bytes("hola\n".encode() + "camión\n".encode("latin-1") + b"bien\n" + "año\n".encode("latin-1"))
    out = tmp_path / "o.jsonl"
    assert main(["predict", "--model", str(model_dir), "--input", str(src), "--output", str(out),
                 "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == ["hola", "cami\ufffdn", "bien", "a\ufffdo"]
    warning = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert warning == [f"{src}: 2 lines are not valid UTF-8 (lines 2, 4); their undecodable bytes were read as "
                       "U+FFFD. Convert the input to UTF-8 (e.g. iconv -f latin1 -t utf-8)"]


def test_a_binary_input_file_gets_a_warning(tmp_path, model_dir):
    src = tmp_path / "model.bin"
    src.write_bytes(bytes(range(256)) * 4)  # NUL bytes, a newline, undecodable bytes
    done = cli("predict", "--model", model_dir, "--input", src, "--no-text")
    assert done.returncode == 0
    err = done.stderr.decode()
    assert f"{src} looks like a binary file, not text: 4 lines hold NUL bytes (lines 1, 2, 3, 4)" in err
    assert "lines are not valid UTF-8 (lines 2, 3, 4, 5)" in err
    assert len(done.stdout.decode().splitlines()) == 1 + 5  # header + one line per input line


def test_two_text_model_needs_its_second_text(tmp_path, vocab_dir, capsys):
    model = build_finetuned(tmp_path / "aux", vocab_dir, aux_header="CONTEXT")
    assert main(["predict", "--model", str(model), "hola"]) == 2
    assert "second text ('CONTEXT')" in capsys.readouterr().err
    aux = tmp_path / "aux.txt"
    aux.write_text("contexto uno\n\n")
    assert main(["predict", "--model", str(model), "--aux-input", str(aux), "hola", "adiós"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    src = tmp_path / "in.tsv"
    src.write_text("TEXT\tCONTEXT\nhola\tcontexto\n")
    assert main(["predict", "--model", str(model), "--input", str(src), "--column", "TEXT"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_embeddings_command_writes_rows_in_input_order(tmp_path, model_dir):
    src = tmp_path / "in.txt"
    src.write_text("hola\n\nodio el lunes\n", encoding="utf-8")
    out = tmp_path / "x.npy"
    assert main(["embeddings", "--model", str(model_dir), "--input", str(src), "--output", str(out),
                 "--collapse-mode", "avg", "--no-use-special-tokens"]) == 0
    x = np.load(out)
    assert x.shape == (3, 16)
    src.write_text("odio el lunes\n\nhola\n", encoding="utf-8")
    assert main(["embeddings", "--model", str(model_dir), "--input", str(src), "--output", str(tmp_path / "r.npy"),
                 "--collapse-mode", "avg", "--no-use-special-tokens"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), x[::-1], atol=1e-5)


def test_export_hf_encoder_only_writes_a_directory_transformers_loads(tmp_path, model_dir, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    from twilbert.data.tokenizer import Tokenizer
    from twilbert.inference.embeddings import load_encoder

    out = tmp_path / "hf"
    assert main(["export-hf", "--model", str(model_dir), "--out", str(out), "--encoder-only"]) == 0
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer_config.json", "TOKENIZER.md"} <= {
        p.name for p in out.iterdir()}
    hf = transformers.AutoModel.from_pretrained(str(out)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = Tokenizer(model_dir)
    text = ours.preprocess("Hola @alguien, qué bonito día 😂 https://t.co/x jajajaja")
    enc = tok(text, "y otro texto", return_tensors="pt")
    a, b = ours.sp.encode([text, "y otro texto"])
    assert enc["input_ids"][0].tolist() == [3, *a, 4, *b, 4]
    assert enc["token_type_ids"][0].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    encoder, _, _ = load_encoder(model_dir)
    with torch.no_grad():
        theirs = hf(**enc).last_hidden_state
        mine = encoder(enc["input_ids"], enc["token_type_ids"])
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-4)
    assert main(["export-hf", "--model", str(model_dir), "--out", str(out)]) == 2  # never overwrites
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_export_hf_of_a_pretrained_model_keeps_its_heads(tmp_path, vocab_dir):
    transformers = pytest.importorskip("transformers")
    pretrained = build_pretrained(tmp_path / "pretrained", vocab_dir)
    out = tmp_path / "hf"
    assert main(["export-hf", "--model", str(pretrained), "--out", str(out)]) == 0
    hf = transformers.AlbertForPreTraining.from_pretrained(str(out), output_loading_info=True)
    model, info = hf
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "SentencePiece" in (out / "TOKENIZER.md").read_text() and (out / "spiece.model").is_file()
