"""TWilBertModel: shapes, padding, cross-layer sharing, attention width, factorization, init."""

import math

import pytest
import torch

from twilbert.config import ModelConfig, PkmConfig
from twilbert.model import TWilBertModel, count_parameters
from twilbert.model.encoder import explicit_attention, padding_bias

VOCAB, MAX_POS = 40, 24


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(embedding_size=8, hidden_size=16, n_encoders=3, n_heads=2, intermediate_size=32)
    fields.update(overrides)
    if not fields.get("factorize_embeddings", True):
        fields["embedding_size"] = fields["hidden_size"]
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def tiny_pkm(**overrides) -> PkmConfig:
    fields = dict(k_dim=8, memory_size=6, n_heads=2, knn=3, in_layers=[1])
    fields.update(overrides)
    return PkmConfig(**fields)


def batch(lengths, T, seed=0):
    """[CLS] a [SEP] b [SEP] rows of the given real lengths, padded to T."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    segments = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
        ids[row, 0] = 3
        ids[row, n // 2] = 4
        ids[row, n - 1] = 4
        segments[row, n // 2 + 1 : n] = 1
    ids[~mask] = 0
    return ids, segments, mask


def model(cfg, seed=0):
    torch.manual_seed(seed)
    return TWilBertModel(cfg, VOCAB, MAX_POS).eval()


@pytest.mark.parametrize("factorize", [True, False])
def test_output_is_batch_by_length_by_hidden(factorize):
    cfg = tiny_cfg(factorize_embeddings=factorize)
    ids, seg, mask = batch([7, 5], 9)
    assert model(cfg)(ids, seg, mask).shape == (2, 9, 16)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(cross_sharing=True),
        dict(cross_sharing=False, factorize_embeddings=False),
        dict(cross_sharing=True, pkm=True, pkm_params=tiny_pkm()),
    ],
    ids=["shared", "unshared", "shared+pkm"],
)
def test_appending_padding_leaves_real_token_outputs_unchanged(overrides):
    m = model(tiny_cfg(**overrides))
    ids, seg, mask = batch([7, 5], 7)
    padded = [torch.nn.functional.pad(t, (0, 6)) for t in (ids, seg, mask)]
    short = m(ids, seg, mask)
    long = m(*padded)
    torch.testing.assert_close(long[:, :7][mask], short[mask], atol=1e-6, rtol=0)


def test_padding_content_does_not_leak_into_real_tokens():
    m = model(tiny_cfg())
    ids, seg, mask = batch([7, 4], 7)
    noisy = ids.clone()
    noisy[~mask] = 17  # garbage under padding must be invisible
    torch.testing.assert_close(m(noisy, seg, mask)[mask], m(ids, seg, mask)[mask], atol=1e-6, rtol=0)


def test_all_padding_row_gives_finite_output():
    ids, seg, mask = batch([5, 1], 5)
    mask[1] = False
    assert torch.isfinite(model(tiny_cfg())(ids, seg, mask)).all()


def test_cross_sharing_parameter_count_does_not_grow_with_depth():
    shared = [count_parameters(model(tiny_cfg(cross_sharing=True, n_encoders=n))) for n in (1, 4)]
    unshared = [count_parameters(model(tiny_cfg(cross_sharing=False, n_encoders=n))) for n in (1, 4)]
    assert shared[0] == shared[1]
    assert unshared[0] == shared[0]
    one_layer = unshared[0] - count_parameters(model(tiny_cfg(cross_sharing=False, n_encoders=1)).embeddings) - (8 * 16 + 16)
    assert unshared[1] - unshared[0] == 3 * one_layer


def test_shared_layer_is_applied_n_encoders_times_and_mutation_reaches_every_application():
    m = model(tiny_cfg(cross_sharing=True, n_encoders=4))
    layer = m.encoder.layers[0]
    assert len(m.encoder.layers) == 1 and all(m.encoder.layer_at(i) is layer for i in range(4))
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    ids, seg, mask = batch([6, 6], 6)
    before = m(ids, seg, mask)
    assert len(calls) == 4

    # the output equals four hand-applied passes of the one layer
    x = m.embedding_hidden_mapping_in(m.embeddings(ids, seg))
    for _ in range(4):
        x = layer(x, mask)
    torch.testing.assert_close(before, x)

    with torch.no_grad():
        layer.ffn.weight.mul_(2.0)
    x = m.embedding_hidden_mapping_in(m.embeddings(ids, seg))
    for _ in range(4):
        x = layer(x, mask)
    after = m(ids, seg, mask)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, x)


def test_pkm_layers_under_sharing_keep_their_own_memories_and_skip_the_ffn():
    cfg = tiny_cfg(cross_sharing=True, n_encoders=3, pkm=True, pkm_params=tiny_pkm(in_layers=[0, 2]))
    m = model(cfg)
    assert sorted(m.encoder.memories) == ["0", "2"]
    assert m.encoder.memories["0"] is not m.encoder.memories["2"]
    ffn_calls = []
    m.encoder.layers[0].ffn.register_forward_hook(lambda *_: ffn_calls.append(1))
    ids, seg, mask = batch([5, 3], 5)
    m(ids, seg, mask)
    assert len(ffn_calls) == 1  # only layer 1 runs the shared FFN


def test_unshared_pkm_layer_has_no_ffn():
    cfg = tiny_cfg(cross_sharing=False, pkm=True, pkm_params=tiny_pkm(in_layers=[1]))
    layers = model(cfg).encoder.layers
    assert layers[1].ffn is None and layers[0].ffn is not None and layers[2].ffn is not None


def test_attention_size_independent_of_hidden_over_heads():
    cfg = tiny_cfg(attention_size=12, n_heads=2)  # 2 x 12 = 24 != H = 16
    m = model(cfg)
    attention = m.encoder.layers[0].attention
    assert attention.query.weight.shape == (24, 16) and attention.dense.weight.shape == (16, 24)
    ids, seg, mask = batch([6, 4], 6)
    m.train()
    m(ids, seg, mask).sum().backward()
    assert attention.query.weight.grad.abs().sum() > 0


def test_attention_matches_hand_written_softmax_with_head_size_scaling():
    cfg = tiny_cfg(attention_size=5, n_heads=3)
    attention = model(cfg).encoder.layers[0].attention
    x = torch.randn(2, 4, 16)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    q, k, v = (lin(x).view(2, 4, 3, 5).transpose(1, 2) for lin in (attention.query, attention.key, attention.value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(5)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 4, 15)
    expected = attention.LayerNorm(x + attention.dense(ctx))
    torch.testing.assert_close(attention(x, mask), expected)


def test_factorized_embeddings_are_E_wide_and_projected_to_H():
    fact = model(tiny_cfg(factorize_embeddings=True, cross_sharing=False))
    full = model(tiny_cfg(factorize_embeddings=False, cross_sharing=False))
    assert fact.embeddings.word_embeddings.weight.shape == (VOCAB, 8)
    assert fact.embedding_hidden_mapping_in.weight.shape == (16, 8)
    assert isinstance(full.embedding_hidden_mapping_in, torch.nn.Identity)
    assert full.embeddings.word_embeddings.weight.shape == (VOCAB, 16)
    # embeddings: (V + P + 2) * E + 2E for LayerNorm, plus E->H projection when factorized
    diff = count_parameters(full) - count_parameters(fact)
    assert diff == (VOCAB + MAX_POS + 2) * (16 - 8) + 2 * (16 - 8) - (8 * 16 + 16)


def test_init_is_truncated_normal_with_initializer_range():
    cfg = tiny_cfg(hidden_size=32, n_heads=4, intermediate_size=256, initializer_range=0.05, cross_sharing=False)
    m = model(cfg)
    weights = torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 2])
    # a normal truncated at +-2 std has std ~0.8796 of the untruncated one
    assert weights.std().item() == pytest.approx(0.05 * 0.8796, rel=0.05)
    assert weights.abs().max().item() <= 2 * 0.05 + 1e-7
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "LayerNorm" in name or "layer_norm" in name:
            assert torch.all(p == 1), name


def test_input_longer_than_max_positions_raises_with_both_numbers():
    ids, seg, mask = batch([MAX_POS + 1], MAX_POS + 1)
    with pytest.raises(ValueError, match=f"{MAX_POS + 1}.*max_positions={MAX_POS}"):
        model(tiny_cfg())(ids, seg, mask)


def test_explicit_attention_equals_sdpa_with_padding_bias():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    bias = padding_bias(mask, torch.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(explicit_attention(q, k, v, bias, 0.0), expected)


def test_bf16_autocast_on_cpu_stays_within_bf16_precision_and_ignores_padding():
    m = model(tiny_cfg())
    ids, seg, mask = batch([9, 6], 9)
    reference = m(ids, seg, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, seg, mask).float()
        longer = m(*(torch.nn.functional.pad(t, (0, 3)) for t in (ids, seg, mask))).float()
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.05)
    torch.testing.assert_close(longer[:, :9][mask], out[mask], atol=0.05, rtol=0.02)


def test_unpadded_batch_runs_attention_without_a_mask(monkeypatch):
    """No padding anywhere: the model drops the mask, so SDPA may take its unmasked path."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(kw.get("attn_mask")) or real(*a, **kw))
    m = model(tiny_cfg(n_encoders=2))
    ids, seg, mask = batch([7, 7], 7)
    m(ids, seg, mask)
    m(*batch([7, 5], 7))
    assert seen[:2] == [None, None] and all(b is not None for b in seen[2:]) and len(seen) == 4
