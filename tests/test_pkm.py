"""ProductKeyMemory: product-key search is exact, reading is a sparse EmbeddingBag lookup."""

import pytest
import torch
from torch import nn

from twilbert.config import PkmConfig
from twilbert.model import ProductKeyMemory

H = 12


def memory(seed=0, **overrides) -> ProductKeyMemory:
    fields = dict(k_dim=6, memory_size=8, n_heads=2, knn=4, batch_norm=True)
    fields.update(overrides)
    torch.manual_seed(seed)
    return ProductKeyMemory(H, H, PkmConfig(**fields)).eval()


def all_slot_scores(mem: ProductKeyMemory, query: torch.Tensor) -> torch.Tensor:
    """Brute force: the score of every one of memory_size**2 slots, (N, heads, memory_size**2)."""
    half = mem.k_dim // 2
    s1 = torch.einsum("nhd,hkd->nhk", query[..., :half], mem.keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", query[..., half:], mem.keys[:, 1])
    return (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # slot i*memory_size + j


def test_get_indices_equals_brute_force_top_knn_over_all_slots():
    mem = memory()
    query = torch.randn(20, 2, 6)
    scores, indices = mem.get_indices(query)
    ref_scores, ref_indices = all_slot_scores(mem, query).topk(4, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)
    # the returned scores are those of the returned slots
    torch.testing.assert_close(all_slot_scores(mem, query).gather(-1, indices), scores)


@pytest.mark.parametrize("factorize", [False, True])
def test_forward_equals_dense_reference_over_all_slots(factorize):
    mem = memory(factorize_embeddings=factorize, value_size=5)
    with torch.no_grad():  # non-trivial batch-norm statistics, used in eval mode
        mem.query_batchnorm.running_mean.uniform_(-0.5, 0.5)
        mem.query_batchnorm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, H)

    query = mem.query_batchnorm(mem.query_proj(x.reshape(-1, H))).view(-1, 2, 6)
    scores = all_slot_scores(mem, query)  # (N, heads, 64)
    kth = scores.topk(4, dim=-1).values[..., -1:]
    weights = scores.masked_fill(scores < kth, float("-inf")).softmax(-1)  # dense, zero off the top-knn
    expected = torch.einsum("nhs,sv->nv", weights, mem.values.weight)  # heads summed
    if factorize:
        expected = mem.value_proj(expected)
    torch.testing.assert_close(mem(x), expected.view(3, 5, H))


def test_values_are_read_with_embedding_bag_over_knn_slots_per_head():
    mem = memory()
    assert isinstance(mem.values, nn.EmbeddingBag) and mem.values.mode == "sum"
    assert mem.values.weight.shape == (8 * 8, H)
    seen = {}

    def hook(module, args, kwargs, output):
        seen["indices"] = args[0]
        seen["weights"] = kwargs["per_sample_weights"]

    mem.values.register_forward_hook(hook, with_kwargs=True)
    mem(torch.randn(7, H))
    assert seen["indices"].shape == (7, 2 * 4)  # heads * knn slots per token, never all 64
    torch.testing.assert_close(seen["weights"].view(7, 2, 4).sum(-1), torch.ones(7, 2))


def test_value_parameter_name_ends_with_values_weight():
    names = [n for n, _ in memory().named_parameters()]
    assert "values.weight" in names


def test_gradients_reach_only_the_selected_value_rows():
    mem = memory()
    x = torch.randn(3, H)
    query = mem.query_batchnorm(mem.query_proj(x)).view(-1, 2, 6)
    _, indices = mem.get_indices(query)
    mem(x).pow(2).sum().backward()
    touched = mem.values.weight.grad.abs().sum(-1).nonzero().flatten()
    assert set(touched.tolist()) == set(indices.flatten().tolist())


def test_padding_tokens_read_zeros_and_do_not_change_real_tokens():
    mem = memory()
    x = torch.randn(2, 5, H)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = mem(x, mask)
    assert torch.all(out[~mask] == 0)
    torch.testing.assert_close(out[mask], mem(x[mask]))


def test_training_with_batch_norm_uses_only_real_tokens_for_statistics():
    mem = memory().train()
    x = torch.randn(2, 4, H)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    mem(x, mask)
    reference = memory().train()
    reference(x[mask])
    torch.testing.assert_close(mem.query_batchnorm.running_mean, reference.query_batchnorm.running_mean)


def test_factorized_value_table_defaults_to_a_quarter_of_k_dim():
    mem = memory(k_dim=16, factorize_embeddings=True)
    assert mem.values.weight.shape == (64, 4) and mem.value_proj.weight.shape == (H, 4)
    assert memory(k_dim=16, factorize_embeddings=True, value_size=3).values.weight.shape == (64, 3)
