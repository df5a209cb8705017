"""Hugging Face export: HF models on exported weights compute what ours compute, classifiers included."""

import pytest
import torch

from twilbert.config import ModelConfig, PkmConfig, RopConfig
from twilbert.model import TWilBertForClassification, TWilBertForPretraining, TWilBertModel
from twilbert.model.hf import ExportError, save_hf, to_hf, to_hf_classifier

transformers = pytest.importorskip("transformers")

VOCAB, MAX_POS, H = 50, 20, 16
ATOL = 1e-5

ALBERT = dict(factorize_embeddings=True, cross_sharing=True)
BERT = dict(factorize_embeddings=False, cross_sharing=False, embedding_size=H)
ALBERT_UNSHARED = dict(factorize_embeddings=True, cross_sharing=False)
ALBERT_UNFACTORIZED = dict(factorize_embeddings=False, cross_sharing=True, embedding_size=H)


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(
        embedding_size=8,
        hidden_size=H,
        n_encoders=3,
        n_heads=2,
        intermediate_size=32,
        hidden_act="gelu",
        rop=RopConfig(n_hidden=1, hidden_size=H),
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def padded_batch(seed=0):
    """Three pairs of different lengths, padded; segments 0 for [CLS] a [SEP], 1 for b [SEP]."""
    g = torch.Generator().manual_seed(seed)
    lengths = [12, 7, 4]
    ids = torch.randint(5, VOCAB, (3, 12), generator=g)
    seg = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
        ids[row, 0], ids[row, n // 2], ids[row, n - 1] = 3, 4, 4
        seg[row, n // 2 + 1 : n] = 1
    ids[~mask] = 0
    labels = torch.full_like(ids, -100)
    labels[0, [2, 8]] = 9
    labels[1, 3] = 21
    labels[2, 1] = 30
    return ids, seg, mask, labels


def randomized(module: torch.nn.Module, seed=0) -> torch.nn.Module:
    """Non-trivial values everywhere (LayerNorms and biases included), so no mapping hides behind 1s and 0s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def hf_inputs(ids, seg, mask):
    return dict(input_ids=ids, token_type_ids=seg, attention_mask=mask.long())


@pytest.mark.parametrize(
    "layout, hf_class",
    [(ALBERT, "AlbertModel"), (BERT, "BertModel"), (ALBERT_UNSHARED, "AlbertModel"), (ALBERT_UNFACTORIZED, "AlbertModel")],
    ids=["albert", "bert", "albert-unshared", "albert-unfactorized"],
)
def test_hf_base_model_hidden_states_match_ours(layout, hf_class):
    cfg = tiny_cfg(**layout)
    torch.manual_seed(0)
    ours = randomized(TWilBertModel(cfg, VOCAB, MAX_POS))
    hf = to_hf(ours, cfg, VOCAB, MAX_POS)
    assert type(hf).__name__ == hf_class and not hf.training
    ids, seg, mask, _ = padded_batch()
    with torch.no_grad():
        expected = ours(ids, seg, mask)
        got = hf(**hf_inputs(ids, seg, mask)).last_hidden_state
    assert (got[mask] - expected[mask]).abs().max().item() <= ATOL


@pytest.mark.parametrize("layout, family", [(ALBERT, "Albert"), (BERT, "Bert")], ids=["albert", "bert"])
def test_hf_pretraining_mlm_logits_and_flipped_rop_match_ours(layout, family):
    cfg = tiny_cfg(**layout)
    torch.manual_seed(0)
    ours = randomized(TWilBertForPretraining(cfg, VOCAB, MAX_POS))
    hf = to_hf(ours, cfg, VOCAB, MAX_POS)
    assert type(hf).__name__ == f"{family}ForPreTraining"
    ids, seg, mask, labels = padded_batch()
    with torch.no_grad():
        expected = ours(ids, seg, mask, labels)
        out = hf(**hf_inputs(ids, seg, mask))
    assert (out.prediction_logits[labels != -100] - expected.mlm_logits).abs().max().item() <= ATOL
    sop = out.sop_logits if family == "Albert" else out.seq_relationship_logits
    # ours: 1 = original order; HF: 0 = original order
    assert (sop - expected.rop_logits[:, [1, 0]]).abs().max().item() <= ATOL


@pytest.mark.parametrize("layout, family", [(ALBERT, "Albert"), (BERT, "Bert")], ids=["albert", "bert"])
def test_hf_export_with_unmappable_rop_is_masked_lm_with_matching_logits(layout, family):
    cfg = tiny_cfg(rop=RopConfig(n_hidden=2, hidden_size=10), **layout)
    torch.manual_seed(0)
    ours = randomized(TWilBertForPretraining(cfg, VOCAB, MAX_POS))
    hf = to_hf(ours, cfg, VOCAB, MAX_POS)
    assert type(hf).__name__ == f"{family}ForMaskedLM"
    ids, seg, mask, labels = padded_batch(seed=1)
    with torch.no_grad():
        expected = ours(ids, seg, mask, labels).mlm_logits
        got = hf(**hf_inputs(ids, seg, mask)).logits[labels != -100]
    assert (got - expected).abs().max().item() <= ATOL


def test_hf_export_rejects_product_key_memory():
    cfg = tiny_cfg(pkm=True, pkm_params=PkmConfig(k_dim=8, memory_size=4, n_heads=1, knn=2, in_layers=[0]))
    with pytest.raises(ExportError, match="pkm"):
        to_hf(TWilBertModel(cfg, VOCAB, MAX_POS), cfg, VOCAB, MAX_POS)


def test_hf_export_rejects_attention_size_other_than_hidden_over_heads():
    cfg = tiny_cfg(attention_size=6)
    with pytest.raises(ExportError, match="attention_size"):
        to_hf(TWilBertModel(cfg, VOCAB, MAX_POS), cfg, VOCAB, MAX_POS)


def test_hf_saved_directory_reloads_with_from_pretrained(tmp_path):
    cfg = tiny_cfg(**ALBERT)
    torch.manual_seed(0)
    ours = randomized(TWilBertForPretraining(cfg, VOCAB, MAX_POS))
    save_hf(tmp_path / "hf", ours, cfg, VOCAB, MAX_POS)
    reloaded = transformers.AlbertForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    ids, seg, mask, labels = padded_batch()
    with torch.no_grad():
        expected = ours(ids, seg, mask, labels).mlm_logits
        got = reloaded(**hf_inputs(ids, seg, mask)).prediction_logits[labels != -100]
    assert (got - expected).abs().max().item() <= ATOL


# --------------------------------------------------------------------------------------------
# Finetuned classifiers -> *ForSequenceClassification
# --------------------------------------------------------------------------------------------

LABELS = {"single_label_classification": ["N", "NEU", "P"], "multi_label_classification": ["anger", "joy"],
          "regression": ["value"]}


def tiny_classifier(layout: dict, n_out: int, collapse_mode: str = "cls", n_hidden: int = 0,
                    ln_scale: float = 1.0) -> TWilBertForClassification:
    cfg = tiny_cfg(**layout)
    torch.manual_seed(0)
    model = randomized(TWilBertForClassification(cfg, VOCAB, MAX_POS, n_out, collapse_mode, n_hidden=n_hidden))
    with torch.no_grad():  # large LayerNorm gains: the hidden states the scaled pooler must carry are large too
        for name, p in model.named_parameters():
            if name.endswith("full_layer_layer_norm.weight"):
                p.mul_(ln_scale)
    return model


@pytest.mark.parametrize("problem_type", list(LABELS))
@pytest.mark.parametrize("layout, family", [(ALBERT, "Albert"), (BERT, "Bert")], ids=["albert", "bert"])
def test_hf_classifier_logits_match_ours_with_labels_and_problem_type(layout, family, problem_type):
    labels = LABELS[problem_type]
    ours = tiny_classifier(layout, len(labels), ln_scale=20.0)
    hf = to_hf_classifier(ours, ours.cfg, VOCAB, MAX_POS, labels, problem_type)
    assert type(hf).__name__ == f"{family}ForSequenceClassification" and not hf.training
    assert hf.config.id2label == dict(enumerate(labels))
    assert hf.config.label2id == {label: i for i, label in enumerate(labels)}
    assert hf.config.problem_type == problem_type and hf.config.num_labels == len(labels)
    ids, seg, mask, _ = padded_batch()
    with torch.no_grad():
        expected = ours(ids, seg, mask)
        got = hf(**hf_inputs(ids, seg, mask)).logits
    assert expected.abs().max() > 1.0  # logits far from zero: a dropped pooler or scale would show
    assert (got - expected).abs().max().item() <= ATOL


HEADS = {"avg": dict(collapse_mode="avg"), "avg-no-special": dict(collapse_mode="avg", use_special_tokens=False),
         "cls-hidden": dict(collapse_mode="cls", n_hidden=1), "avg-hidden": dict(collapse_mode="avg", n_hidden=2)}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("layout, family", [(ALBERT, "Albert"), (BERT, "Bert")], ids=["albert", "bert"])
def test_a_head_hf_has_no_class_for_exports_as_twilberts_own_class_with_matching_logits(layout, family, head):
    cfg = tiny_cfg(**layout)
    torch.manual_seed(0)
    ours = randomized(TWilBertForClassification(cfg, VOCAB, MAX_POS, 3, head_hidden_size=12, **HEADS[head]))
    hf = to_hf_classifier(ours, cfg, VOCAB, MAX_POS, ["N", "NEU", "P"], "single_label_classification")
    assert type(hf).__name__ == f"TWilBert{family}ForSequenceClassification" and not hf.training
    assert hf.config.auto_map == {"AutoModelForSequenceClassification":
                                  f"modeling_twilbert.TWilBert{family}ForSequenceClassification"}
    ids, seg, mask, _ = padded_batch()
    with torch.no_grad():
        expected = ours(ids, seg, mask)
        got = hf(**hf_inputs(ids, seg, mask)).logits
        # pooling over [CLS]/[SEP] or not, with or without hidden layers: each changes the logits
        plain = randomized(TWilBertForClassification(cfg, VOCAB, MAX_POS, 3))(ids, seg, mask)
    assert (got - expected).abs().max().item() <= ATOL
    assert (plain - expected).abs().max().item() > 1e-3


def test_the_exported_head_computes_huggingfaces_loss_for_its_problem_type():
    ours = randomized(TWilBertForClassification(tiny_cfg(**ALBERT), VOCAB, MAX_POS, 2))
    ids, seg, mask, _ = padded_batch()
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    for problem_type, labels, loss in [
        ("single_label_classification", torch.tensor([1, 0, 1]), torch.nn.functional.cross_entropy),
        ("multi_label_classification", targets, torch.nn.functional.binary_cross_entropy_with_logits),
    ]:
        hf = to_hf_classifier(ours, ours.cfg, VOCAB, MAX_POS, ["a", "b"], problem_type)
        with torch.no_grad():
            out = hf(**hf_inputs(ids, seg, mask), labels=labels)
        assert out.loss.item() == pytest.approx(loss(out.logits, labels).item())


# --------------------------------------------------------------------------------------------
# export-hf of a finetuned model directory, read by transformers.pipeline
# --------------------------------------------------------------------------------------------

PIPELINE_TEXTS = ["hola que tal", "odio el tráfico de la ciudad", "qué bonito día", "@alguien jajaja"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    from helpers import build_vocab

    return build_vocab(tmp_path_factory.mktemp("vocab") / "vocab")


def exported(tmp_path, vocab, kind: str, **model_overrides):
    from helpers import build_finetuned
    from twilbert.cli import main

    model_dir = build_finetuned(tmp_path / "model", vocab, kind=kind, collapse_mode="cls", **model_overrides)
    out = tmp_path / "hf"
    assert main(["export-hf", "--model", str(model_dir), "--out", str(out)]) == 0
    return model_dir, out


def hf_pipeline(out, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the exported directory is all it needs
    return transformers.pipeline("text-classification", model=str(out), tokenizer=str(out), device="cpu")


def preprocessed(out, texts):
    """The documented first step: the model's tweet normalization, read from the export's meta.json."""
    import json

    from twilbert.data.preprocess import Preprocessor

    prep = Preprocessor.from_dict(json.loads((out / "meta.json").read_text())["preprocess"])
    return [prep(t) for t in texts]


@pytest.mark.parametrize("layout", [{}, BERT], ids=["albert", "bert"])
def test_pipeline_on_an_exported_single_label_model_gives_our_labels(tmp_path, vocab, monkeypatch, layout):
    from twilbert import load_classifier

    model_dir, out = exported(tmp_path, vocab, "single_label", **layout)
    ours = load_classifier(model_dir).predict(PIPELINE_TEXTS)
    pipe = hf_pipeline(out, monkeypatch)
    theirs = pipe(preprocessed(out, PIPELINE_TEXTS))
    assert [t["label"] for t in theirs] == [p.label for p in ours]
    # every class's probability, not only the winner's: equal labels alone could be a coincidence
    for scored, p in zip(pipe(preprocessed(out, PIPELINE_TEXTS), top_k=None), ours):
        assert {s["label"]: s["score"] for s in scored} == pytest.approx(p.probs, abs=1e-5)


def test_pipeline_on_an_exported_multi_label_model_gives_our_probabilities(tmp_path, vocab, monkeypatch):
    from twilbert import load_classifier

    model_dir, out = exported(tmp_path, vocab, "multi_label")
    clf = load_classifier(model_dir)
    ours = clf.predict(PIPELINE_TEXTS)
    theirs = hf_pipeline(out, monkeypatch)(preprocessed(out, PIPELINE_TEXTS), top_k=None)
    threshold = clf.model.task.task.threshold
    for scored, p in zip(theirs, ours):
        probs = {s["label"]: s["score"] for s in scored}
        assert probs == pytest.approx(p.probs, abs=1e-5)
        assert sorted(label for label, s in probs.items() if s >= threshold) == sorted(p.label)


def test_pipeline_on_an_exported_regression_model_gives_our_values(tmp_path, vocab, monkeypatch):
    from twilbert import load_classifier

    model_dir, out = exported(tmp_path, vocab, "regression")
    ours = load_classifier(model_dir).predict(PIPELINE_TEXTS)
    theirs = hf_pipeline(out, monkeypatch)(preprocessed(out, PIPELINE_TEXTS))
    assert [t["label"] for t in theirs] == ["value"] * len(PIPELINE_TEXTS)
    assert [t["score"] for t in theirs] == pytest.approx([p.label for p in ours], abs=1e-5)


@pytest.fixture
def remote_code_cache(tmp_path, monkeypatch):
    """Hugging Face copies a directory's modeling file into its modules cache: a temporary one here."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("head", [dict(), dict(n_hidden=1, use_special_tokens=False)], ids=["default-avg", "avg-hidden"])
def test_the_default_average_pooling_model_exports_with_its_head_code_and_gives_our_probabilities(
        tmp_path, vocab, remote_code_cache, head, caplog):
    import json
    import logging

    from helpers import build_finetuned
    from twilbert import load_classifier
    from twilbert.cli import main

    model_dir = build_finetuned(tmp_path / "model", vocab, collapse_mode="avg", **head)
    out = tmp_path / "hf"
    with caplog.at_level(logging.INFO):
        assert main(["export-hf", "--model", str(model_dir), "--out", str(out)]) == 0
    assert "load the export with trust_remote_code=True" in caplog.text
    assert json.loads((out / "config.json").read_text())["auto_map"] == {
        "AutoModelForSequenceClassification": "modeling_twilbert.TWilBertAlbertForSequenceClassification"}
    assert "trust_remote_code=True" in (out / "TOKENIZER.md").read_text()
    clf = load_classifier(model_dir)
    texts = preprocessed(out, PIPELINE_TEXTS)
    # the class from the directory's own file, as a user without twilbert gets it
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(hf).__module__.endswith("modeling_twilbert") and not type(hf).__module__.startswith("twilbert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        logits = hf(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    ours = torch.as_tensor(clf.scores(PIPELINE_TEXTS))  # probabilities
    assert (torch.softmax(logits, -1) - ours).abs().max().item() <= ATOL
    pipe = transformers.pipeline("text-classification", model=str(out), tokenizer=str(out), device="cpu",
                                 trust_remote_code=True)
    for scored, p in zip(pipe(texts, top_k=None), clf.predict(PIPELINE_TEXTS)):
        assert {s["label"]: s["score"] for s in scored} == pytest.approx(p.probs, abs=1e-5)


def test_export_hf_encoder_only_of_an_average_pooling_model_writes_the_encoder(tmp_path, vocab):
    from helpers import build_finetuned
    from twilbert.cli import main

    model_dir = build_finetuned(tmp_path / "model", vocab, collapse_mode="avg")
    assert main(["export-hf", "--model", str(model_dir), "--out", str(tmp_path / "hf"), "--encoder-only"]) == 0
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "hf")).architectures == ["AlbertModel"]
    assert not (tmp_path / "hf" / "modeling_twilbert.py").exists()
