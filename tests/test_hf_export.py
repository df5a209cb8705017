"""Hugging Face export: HF models on exported weights compute what ours compute."""

import pytest
import torch

from twilbert.config import ModelConfig, PkmConfig, RopConfig
from twilbert.model import TWilBertForPretraining, TWilBertModel
from twilbert.model.hf import ExportError, save_hf, to_hf

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
