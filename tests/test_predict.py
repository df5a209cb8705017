"""Predicting with a finetuned model directory: one line out per line in, input order, every task shape.

The builders of tiny model directories (``build_finetuned``, ``build_pretrained``) are in helpers.py.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_data import first, make_config, make_hf_bert, make_pretrained, write_task
from helpers import CATEGORIES, EMOTIONS, LONG, REPO, build_finetuned, copy_model, make_tweets, parse_tsv
from twilbert.config import VocabConfig, compose
from twilbert.data.tokenizer import Tokenizer, train_vocab
from twilbert.evaluation.scoring import predict_scores
from twilbert.inference.embeddings import load_encoder
from twilbert.inference.inputs import Chunk, PredictError, chunked, text_rows, tsv_rows, with_aux
from twilbert.inference.predict import load_finetuned, predict_stream
from twilbert.model.finetuned import load_classifier_module
from twilbert.train.finetune.stage_work import finetune_task


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory, vocab_dir):
    return build_finetuned(tmp_path_factory.mktemp("single") / "model", vocab_dir)


def run(fm, texts, fmt="tsv", chunk_size=10_000, batch_size=4, aux=None, **kwargs) -> str:
    out = io.StringIO()
    rows = text_rows(texts) if aux is None else with_aux(text_rows(texts), aux, "texts", "aux")
    predict_stream(fm, chunked(rows, "texts", chunk_size), out, fmt, batch_size=batch_size, **kwargs)
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# One line out per line in, in input order
# --------------------------------------------------------------------------------------------


def test_every_input_line_gets_one_output_line_even_blank_emoji_url_and_huge(single_dir):
    fm = load_finetuned(single_dir)
    texts = ["hola que tal", "", "   ", "😂🙏", "https://t.co/abc", "@alguien", LONG, "odio el lunes"]
    header, rows = parse_tsv(run(fm, texts))
    assert header == ["id", "text", "label", "prob_N", "prob_NEU", "prob_NONE", "prob_P"]
    assert [r[0] for r in rows] == [str(i) for i in range(1, len(texts) + 1)]
    assert [r[1] for r in rows] == texts
    for r in rows:
        probs = np.array(r[3:], dtype=float)
        assert abs(probs.sum() - 1) < 1e-4
        assert r[2] == list(CATEGORIES)[int(probs.argmax())]


def test_blank_lines_are_labelled_as_the_placeholder_text(single_dir):
    fm = load_finetuned(single_dir)
    blank, placeholder = fm.scores(["", "  "]), fm.scores([fm.placeholder])
    np.testing.assert_allclose(blank, np.repeat(placeholder, 2, axis=0), atol=1e-6)


def test_length_bucketing_preserves_input_order(single_dir):
    fm = load_finetuned(single_dir)
    texts = [t for t, _ in make_tweets(37, seed=3)] + [LONG, "", "sí"]
    batched = fm.scores(texts, batch_size=4)
    one_by_one = np.concatenate([fm.scores([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert len({tuple(np.round(row, 4)) for row in batched}) > 10  # texts really get different scores


def test_chunk_size_and_batch_size_do_not_change_the_output(single_dir):
    fm = load_finetuned(single_dir)
    texts = [t for t, _ in make_tweets(25, seed=5)] + [""]
    reference = run(fm, texts, chunk_size=10_000, batch_size=64)
    assert run(fm, texts, chunk_size=3, batch_size=2) == reference
    assert reference.count("\n") == len(texts) + 1


def test_long_texts_are_truncated_to_max_len(single_dir):
    fm = load_finetuned(single_dir)
    data = fm.members[0].encode([LONG, "hola"], None, fm.max_len)
    assert data["length"].tolist()[0] == fm.max_len + 2
    np.testing.assert_allclose(fm.scores([LONG]), fm.scores([LONG + " jaja " * 500]), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Formats and task shapes
# --------------------------------------------------------------------------------------------


def test_jsonl_lines_parse_with_label_and_probabilities(single_dir):
    fm = load_finetuned(single_dir)
    texts = ["hola", "", "odio"]
    records = [json.loads(line) for line in run(fm, texts, fmt="jsonl").splitlines()]
    assert [r["id"] for r in records] == [1, 2, 3]
    assert [r["text"] for r in records] == texts
    for r in records:
        assert set(r["probs"]) == set(CATEGORIES)
        assert r["label"] == max(r["probs"], key=r["probs"].get)


def test_without_text_and_header(single_dir):
    fm = load_finetuned(single_dir)
    lines = run(fm, ["a\tb", "c"], with_text=False, header=False).splitlines()
    assert [line.split("\t")[0] for line in lines] == ["1", "2"]
    assert all(len(line.split("\t")) == 2 + len(CATEGORIES) for line in lines)


def test_tabs_in_echoed_text_do_not_break_tsv_columns(single_dir):
    fm = load_finetuned(single_dir)
    _, rows = parse_tsv(run(fm, ["uno\tdos\rtres"]))
    assert rows[0][1] == "uno dos tres"


def test_multi_label_lists_the_labels_over_the_threshold(tmp_path, vocab_dir):
    directory = build_finetuned(tmp_path / "ml", vocab_dir, kind="multi_label")
    fm = load_finetuned(directory)
    with torch.no_grad():  # anger always on, fear always off, joy undecided
        out = fm.members[0].model.classifier.out
        out.weight[[0, 2]] = 0.0
        out.bias[:] = torch.tensor([6.0, 0.0, -6.0])
    texts = ["hola", "", "odio el lunes"]
    header, rows = parse_tsv(run(fm, texts))
    assert header == ["id", "text", "labels", "prob_anger", "prob_joy", "prob_fear"]
    for r in rows:
        probs = dict(zip(EMOTIONS, map(float, r[3:])))
        assert r[2].split("|") == [k for k, p in probs.items() if p >= 0.5]
        assert r[2].startswith("anger") and "fear" not in r[2]
    records = [json.loads(line) for line in run(fm, texts, fmt="jsonl").splitlines()]
    assert all(isinstance(r["labels"], list) and r["labels"][0] == "anger" for r in records)
    assert all(set(r["probs"]) == set(EMOTIONS) for r in records)


def test_regression_outputs_one_value_per_text(tmp_path, vocab_dir):
    fm = load_finetuned(build_finetuned(tmp_path / "reg", vocab_dir, kind="regression"))
    texts = ["hola", "", LONG]
    header, rows = parse_tsv(run(fm, texts))
    assert header == ["id", "text", "value"]
    values = [float(r[2]) for r in rows]
    np.testing.assert_allclose(values, fm.scores(texts), atol=1e-5)
    records = [json.loads(line) for line in run(fm, texts, fmt="jsonl").splitlines()]
    assert [r["value"] for r in records] == pytest.approx(values, abs=1e-5)
    assert all("probs" not in r for r in records)


def test_two_text_model_uses_the_second_text(tmp_path, vocab_dir):
    fm = load_finetuned(build_finetuned(tmp_path / "aux", vocab_dir, aux_header="CONTEXT"))
    assert fm.aux_header == "CONTEXT"
    same = fm.scores(["hola", "hola"], ["odio el lunes", "qué bonito día con mis amigos"])
    assert not np.allclose(same[0], same[1])
    assert len(run(fm, ["hola", ""], aux=["a", ""]).splitlines()) == 3


def test_aux_lines_must_match_the_input_lines():
    with pytest.raises(PredictError, match="aux: 1 lines, fewer than the input"):
        list(with_aux(text_rows(["a", "b"]), ["x"], "texts", "aux"))
    with pytest.raises(PredictError, match="more lines than the 1"):
        list(with_aux(text_rows(["a"]), ["x", "y"], "texts", "aux"))


# --------------------------------------------------------------------------------------------
# Inputs and errors
# --------------------------------------------------------------------------------------------


def test_empty_input_is_an_error():
    with pytest.raises(PredictError, match="stdin: empty input"):
        list(chunked(text_rows([]), "stdin"))


def test_tsv_rows_echo_the_id_column_and_read_short_rows_as_empty(caplog):
    lines = ["ID\tTEXT\tCLASS", "a1\thola\tP", "a2", "a3\t\tN"]
    rows = list(tsv_rows(lines, "in.tsv", "TEXT"))
    assert rows == [("a1", "hola", None), ("a2", "", None), ("a3", "", None)]
    assert "in.tsv: 1 rows have a field count" in caplog.text and "lines 3" in caplog.text
    assert [r[0] for r in tsv_rows(["TEXT", "x", "y"], "in.tsv", "TEXT")] == [2, 3]  # no ID column: line numbers


def test_tsv_without_the_column_names_the_header():
    with pytest.raises(PredictError, match=r"in.tsv:1: no 'TEXTO' column in the header \('ID', 'TEXT'\)"):
        list(tsv_rows(["ID\tTEXT", "1\thola"], "in.tsv", "TEXTO"))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "spm.model", "meta.json"])
def test_wrong_model_directory_names_the_missing_file(tmp_path, single_dir, missing):
    broken = copy_model(single_dir, tmp_path / "broken", without=missing)
    with pytest.raises(PredictError, match=f"broken: missing {missing};"):
        load_finetuned(broken)


def test_missing_directory_and_pretrained_directory_are_rejected(tmp_path, single_dir):
    with pytest.raises(PredictError, match="nope: model directory not found"):
        load_finetuned(tmp_path / "nope")
    pretrained = copy_model(single_dir, tmp_path / "pretrained")
    config = json.loads((single_dir / "config.json").read_text())
    for key in ("task", "head"):
        config.pop(key)
    (pretrained / "config.json").write_text(json.dumps(config))
    with pytest.raises(PredictError, match="is not a finetuned model"):
        load_finetuned(pretrained)


def test_an_unknown_backbone_is_refused_clearly(tmp_path, single_dir):
    other = copy_model(single_dir, tmp_path / "other")
    config = json.loads((single_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "backbone": "xgboost"}))
    with pytest.raises(PredictError, match="backbone 'xgboost' is not supported by predict yet"):
        load_finetuned(other)


def test_a_vocabulary_that_does_not_fit_the_model_is_rejected(tmp_path, single_dir):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(500)]
    texts = [" ".join(rng.choice(words, size=12)) for _ in range(600)]
    bigger = train_vocab(texts, tmp_path / "v", VocabConfig(vocab_size=400))
    assert Tokenizer(bigger).vocab_size > Tokenizer(single_dir).vocab_size
    swapped = copy_model(single_dir, tmp_path / "swapped")
    Tokenizer(bigger).copy_to(swapped)
    with pytest.raises(PredictError, match=r"swapped/spm.model: \d+ pieces but the model has \d+ embeddings"):
        load_finetuned(swapped)


def test_chunk_carries_aux_only_when_given():
    chunks = list(chunked(text_rows(["a", "b", "c"]), "x", size=2))
    assert [c.texts for c in chunks] == [["a", "b"], ["c"]] and chunks[0].aux is None
    assert isinstance(chunks[0], Chunk)


# --------------------------------------------------------------------------------------------
# Every kind of directory the finetune stage writes
# --------------------------------------------------------------------------------------------

STAGE_TEXTS = ["hola que tal", "", "😂🙏", "https://t.co/x", LONG, "odio el tráfico"]


def stage_output(tmp_path, **finetuning) -> Path:
    """Run the real finetune stage on a tiny generated task; return its model directory."""
    pretrained = make_pretrained(tmp_path / "pretrained")
    cfg = make_config(compose(["model=tiny"], REPO / "conf"), {"t": write_task(tmp_path / "data")}, epochs=1,
                      **finetuning)
    finetune_task(cfg, first(cfg), pretrained, tmp_path / "model", tmp_path / "results")
    return tmp_path / "model"


def stage_scores(directory: Path, texts) -> np.ndarray:
    """Scores the way the finetune stage computes them: its own loader, packer and predict_scores."""
    model, packer, card = load_classifier_module(directory)
    data = packer.pack(texts, None, card.max_len_test)
    data["labels"] = np.zeros(len(texts), dtype=np.int64)
    return predict_scores(model, data, card.task, 4, torch.device("cpu"), packer=packer)


def test_kfold_output_blends_its_folds_and_its_baseline_row_predicts(tmp_path):
    directory = stage_output(tmp_path, kfold=2, baseline_row=True)
    blended = load_finetuned(directory)
    assert len(blended.members) == 2 and blended.backbone == "twilbert"
    folds = [stage_scores(directory / "folds" / str(i), STAGE_TEXTS) for i in range(2)]
    np.testing.assert_allclose(blended.scores(STAGE_TEXTS), np.mean(folds, axis=0), atol=1e-5)
    selected = load_finetuned(directory, blend=False)
    assert len(selected.members) == 1
    np.testing.assert_allclose(selected.scores(STAGE_TEXTS), stage_scores(directory, STAGE_TEXTS), atol=1e-5)

    baseline = load_finetuned(directory / "baseline")
    assert baseline.backbone == "baseline"
    header, rows = parse_tsv(run(baseline, STAGE_TEXTS))
    assert len(rows) == len(STAGE_TEXTS) and header[2] == "label"
    assert all(abs(sum(map(float, r[3:])) - 1) < 1e-4 for r in rows)


def test_hugging_face_backbone_output_predicts_as_the_stage_does(tmp_path):
    pytest.importorskip("transformers")
    bert = make_hf_bert(tmp_path / "bert")
    directory = stage_output(tmp_path, backbone="hf", hf_path=str(bert), baseline_row=False)
    fm = load_finetuned(directory)
    assert fm.backbone == "hf"
    np.testing.assert_allclose(fm.scores(STAGE_TEXTS, batch_size=2), stage_scores(directory, STAGE_TEXTS), atol=1e-5)
    assert len(run(fm, STAGE_TEXTS).splitlines()) == len(STAGE_TEXTS) + 1


def test_embeddings_refuse_a_hugging_face_directory_clearly(tmp_path):
    directory = tmp_path / "hf_model"
    (directory / "hf").mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model": {}, "vocab_size": 8, "max_positions": 8,
                                                       "backbone": "hf"}))
    (directory / "model.safetensors").write_bytes(b"")
    with pytest.raises(PredictError, match="backbone 'hf' is not supported by embeddings yet"):
        load_encoder(directory)
