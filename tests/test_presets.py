"""Size presets in conf/model/: parameter counts (on the meta device) and the reduced CPU override."""

import pytest
import torch

from helpers import REPO
from twilbert.config import ModelConfig, compose, load_config
from twilbert.data.batch import make_batch, pack_pairs
from twilbert.data.special import N_SPECIAL
from twilbert.model import TWilBertForPretraining, count_parameters
from twilbert.train.pretrain import build_pretraining
from twilbert.train.pretrain_run import resolve_pretrain_run

V, MAX_LEN = 30000, 64  # the README table's vocabulary; positions 2*64+3 = 131
PRESETS = ("base", "large", "xlarge", "xxlarge")
# The reduced base that runs on a CPU in minutes (docs/models.md quotes this exact command).
REDUCED = ["model=base", "model.hidden_size=64", "model.embedding_size=32", "model.n_heads=2",
           "model.intermediate_size=128", "model.pkm_params.k_dim=16", "model.pkm_params.memory_size=16",
           "model.pkm_params.knn=4", "model.rop.hidden_size=64", "training.epochs=1"]


def preset(name: str, *overrides: str) -> ModelConfig:
    return load_config(compose([f"model={name}", f"representation.max_len={MAX_LEN}", *overrides], REPO / "conf")).model


def count_on_meta(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory for the 50M-slot value tables
        return count_parameters(TWilBertForPretraining(cfg, V, 2 * MAX_LEN + 3))


def expected_count(cfg: ModelConfig) -> int:
    """Hand count of our layout: factorized embeddings, one shared layer, a memory per PKM layer,
    MLM head tied to the word embeddings, ROP head."""
    E, H, I, P = cfg.embedding_size, cfg.hidden_size, cfg.ffn_size, 2 * MAX_LEN + 3  # noqa: E741 (the paper's letters)
    inner = cfg.n_heads * cfg.head_size
    embeddings = V * E + P * E + 2 * E + 2 * E  # word, position, segment, LayerNorm
    mapping = E * H + H
    attention = 3 * (H * inner + inner) + inner * H + H + 2 * H
    ffn = H * I + I + I * H + H
    layer = attention + ffn + 2 * H
    mlm = H * E + E + 2 * E + V  # dense, LayerNorm, output bias (the decoder is the word embeddings)
    rop = H * cfg.rop.hidden_size + cfg.rop.hidden_size + cfg.rop.hidden_size * 2 + 2
    total = embeddings + mapping + layer + mlm + rop
    if cfg.pkm:
        p = cfg.pkm_params
        query = H * p.n_heads * p.k_dim + p.n_heads * p.k_dim + 2 * p.n_heads * p.k_dim  # + batch norm
        keys = p.n_heads * 2 * p.memory_size * (p.k_dim // 2)
        values = p.memory_size**2 * H
        total += len(p.in_layers) * (query + keys + values)
    return total


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_the_readme_table_sizes(name):
    cfg = preset(name)
    table = {"base": (6, 6), "large": (10, 10), "xlarge": (12, 12), "xxlarge": (16, 16)}[name]
    assert (cfg.n_encoders, cfg.n_heads) == table
    assert (cfg.embedding_size, cfg.hidden_size, cfg.cross_sharing, cfg.factorize_embeddings) == (128, 768, True, True)
    p = cfg.pkm_params
    assert cfg.pkm and (p.knn, p.memory_size, p.k_dim, p.n_heads) == (32, 256, 512, 4)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count_equals_the_hand_count(name):
    cfg = preset(name)
    assert count_on_meta(cfg) == expected_count(cfg)


def test_counts_at_v30000_are_64m_with_pkm_and_11_6m_without():
    base = preset("base")
    assert count_on_meta(base) == 64_002_610
    assert count_on_meta(preset("base", "model.pkm=false")) == 11_567_666
    # the memory's value table alone: 256^2 slots x 768
    assert 256**2 * 768 == 50_331_648


def test_cross_sharing_makes_depth_free():
    """base, xlarge and xxlarge differ only in depth and heads (same H/A product): same count."""
    counts = {name: count_on_meta(preset(name)) for name in ("base", "xlarge", "xxlarge")}
    assert len(set(counts.values())) == 1, counts
    # large sets attention_size 76 (768 / 10 is not whole): 10 x 76 = 760 inner width
    assert count_on_meta(preset("large")) == counts["base"] - 4 * 8 * 768 - 3 * 8


def test_reduced_base_override_trains_a_step():
    cfg = load_config(compose([*REDUCED, "representation.max_len=8"], REPO / "conf"))
    assert cfg.model.pkm and cfg.model.pkm_params.in_layers == [4] and cfg.model.n_encoders == 6
    model, trainer, objective = build_pretraining(resolve_pretrain_run(cfg), 50, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(N_SPECIAL, 50, (4, 8), generator=g).tolist()
    packed = pack_pairs(rows, rows[::-1], 8)
    batch = make_batch(packed["input_ids"], packed["len_a"], packed["length"], torch.tensor([1, 0, 1, 0]).numpy())
    before = model.twilbert.encoder.memories["4"].values.weight.detach().clone()
    (loss,), (counts,) = trainer.train_step(batch, objective)  # one micro-batch: a plain batch
    assert torch.isfinite(loss) and counts["mlm_count"] > 0 and trainer.state.optimizer_steps == 1
    assert not torch.equal(before, model.twilbert.encoder.memories["4"].values.weight)
