"""Heads: MLM only at labelled positions, ROP on/off, classification pooling, shared parameter counts."""

import pytest
import torch

from twilbert.config import ModelConfig, RopConfig
from twilbert.model import (
    ClassificationHead,
    TWilBertForClassification,
    TWilBertForPretraining,
    count_parameters,
)

VOCAB, MAX_POS = 32, 16


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(embedding_size=8, hidden_size=16, n_encoders=2, n_heads=2, intermediate_size=32)
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def inputs(B=3, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    ids[:, 0] = 3
    ids[:, -1] = 4
    return ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool)


def pretraining(seed=0, **overrides):
    torch.manual_seed(seed)
    return TWilBertForPretraining(tiny_cfg(**overrides), VOCAB, MAX_POS).eval()


def test_mlm_logits_exist_only_at_positions_with_a_label():
    m = pretraining()
    ids, seg, mask = inputs()
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[0, 5], labels[2, 1] = 7, 11, 13
    calls = []
    m.predictions.dense.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape))
    out = m(ids, seg, mask, labels)
    assert out.mlm_logits.shape == (3, VOCAB)
    assert calls == [torch.Size([3, 16])]  # the head never sees unlabelled positions
    assert out.mlm_targets.tolist() == [7, 11, 13]
    full = m.predictions(m.twilbert(ids, seg, mask).reshape(-1, 16)).view(3, 8, VOCAB)
    torch.testing.assert_close(out.mlm_logits, full[labels != -100])


def test_no_labels_give_empty_mlm_logits():
    ids, seg, mask = inputs()
    out = pretraining()(ids, seg, mask, torch.full_like(ids, -100))
    assert out.mlm_logits.shape == (0, VOCAB) and out.mlm_targets.shape == (0,)


def test_mlm_decoder_shares_the_word_embedding_matrix():
    m = pretraining()
    assert m.predictions.decoder.weight is m.twilbert.embeddings.word_embeddings.weight


def test_rop_disabled_gives_no_head_and_none_logits():
    m = pretraining(rop=RopConfig(enabled=False))
    ids, seg, mask = inputs()
    assert m.rop_classifier is None
    assert m(ids, seg, mask, torch.full_like(ids, -100)).rop_logits is None


def test_rop_head_reads_cls_through_n_hidden_layers():
    m = pretraining(rop=RopConfig(n_hidden=2, hidden_size=10))
    ids, seg, mask = inputs()
    assert [tuple(layer.weight.shape) for layer in m.rop_classifier.hidden] == [(10, 16), (10, 10)]
    out = m(ids, seg, mask, torch.full_like(ids, -100))
    torch.testing.assert_close(out.rop_logits, m.rop_classifier(m.twilbert(ids, seg, mask)[:, 0]))
    assert out.rop_logits.shape == (3, 2)


def test_parameter_count_counts_shared_layer_and_tied_decoder_once():
    shallow, deep = pretraining(n_encoders=1), pretraining(n_encoders=6)
    assert count_parameters(shallow) == count_parameters(deep)
    rop = RopConfig()
    heads = (16 * 8 + 8) + 2 * 8 + VOCAB + (16 * rop.hidden_size + rop.hidden_size) + (rop.hidden_size * 2 + 2)
    assert count_parameters(shallow) == count_parameters(shallow.twilbert) + heads


def test_avg_pooling_ignores_padding():
    head = ClassificationHead(4, 2, collapse_mode="avg")
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    hidden[0, 2] = 1e6  # padding
    pooled = head.pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))


def test_avg_pooling_without_special_tokens_excludes_cls_and_sep():
    head = ClassificationHead(4, 2, collapse_mode="avg", use_special_tokens=False)
    hidden = torch.randn(1, 5, 4)
    mask = torch.tensor([[True, True, True, True, False]])
    special = torch.tensor([[True, False, False, True, False]])  # [CLS] a b [SEP] [PAD]
    torch.testing.assert_close(head.pool(hidden, mask, special)[0], hidden[0, 1:3].mean(0))
    with pytest.raises(ValueError, match="special_mask"):
        head.pool(hidden, mask)


def test_cls_pooling_takes_the_first_position():
    head = ClassificationHead(4, 2, collapse_mode="cls")
    hidden = torch.randn(2, 3, 4)
    torch.testing.assert_close(head.pool(hidden, torch.ones(2, 3, dtype=torch.bool)), hidden[:, 0])


def test_unknown_collapse_mode_is_rejected_by_name():
    with pytest.raises(ValueError, match="collapse_mode"):
        ClassificationHead(4, 2, collapse_mode="max")


def test_classification_model_defaults_special_mask_to_cls_and_sep_ids():
    torch.manual_seed(0)
    m = TWilBertForClassification(
        tiny_cfg(), VOCAB, MAX_POS, n_outputs=3, use_special_tokens=False, n_hidden=1, head_hidden_size=6
    ).eval()
    ids, seg, mask = inputs()
    logits = m(ids, seg, mask)
    assert logits.shape == (3, 3)
    special = (ids == 3) | (ids == 4)
    torch.testing.assert_close(logits, m(ids, seg, mask, special))
    assert not torch.allclose(logits, m(ids, seg, mask, torch.zeros_like(special)))
