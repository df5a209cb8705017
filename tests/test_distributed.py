"""torchrun on CPU (gloo, 2 processes): checkpoints saved and resumed by every rank; each worker's
micro-batches of the shared batch order; resume; memory-mapped shards read in disjoint shares."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port, join_gloo_group
from twilbert.config import ConfigError, ModelConfig, RopConfig
from twilbert.model import TWilBertForPretraining
from twilbert.train.distributed import (
    DistContext,
    check_workers,
    destroy_distributed,
    init_distributed,
    iterate_micro_batches,
    micro_batch_indices,
    n_global_batches,
)

pytestmark = pytest.mark.reliability

VOCAB, MAX_POS, WIDTH = 40, 16, 12
N_EXAMPLES, WORLD, SEED = 12, 2, 5


def tiny_model(seed: int = 0) -> TWilBertForPretraining:
    torch.manual_seed(seed)
    cfg = ModelConfig(embedding_size=8, hidden_size=16, n_encoders=2, n_heads=2, intermediate_size=32,
                      input_dropout=0.0, output_dropout=0.0, rop=RopConfig(enabled=False))
    cfg.validate()
    return TWilBertForPretraining(cfg, VOCAB, MAX_POS)


def pair_data() -> dict[str, np.ndarray]:
    """Packed rows of varied length."""
    rng = np.random.default_rng(0)
    length = rng.integers(5, WIDTH + 1, N_EXAMPLES).astype(np.int32)
    ids = np.zeros((N_EXAMPLES, WIDTH), dtype=np.int32)
    for i, n in enumerate(length):
        ids[i, :n] = rng.integers(5, VOCAB, n)
        ids[i, 0], ids[i, n - 1] = 3, 4  # [CLS] ... [SEP]
    return {"input_ids": ids, "len_a": length - 2, "length": length, "labels": np.ones(N_EXAMPLES, dtype=np.int64)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from twilbert.train.checkpoint import resume_training, save_training_checkpoint

    join_gloo_group(rank, WORLD, port)
    try:
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        # Every rank saves, rank 0 alone writes (with its RNG state); every rank resumes the same state.
        state = {"epoch": 0, "batch_in_epoch": 2, "optimizer_steps": 1, "micro_steps": 2, "accum_position": 0}
        torch.manual_seed(11)
        expected_draw = (torch.get_rng_state(), torch.rand(4))
        torch.set_rng_state(expected_draw[0])
        torch.rand(1 + rank)  # the ranks' own streams differ: each resumes rank 0's
        path = save_training_checkpoint(f"{out_dir}/ckpt", model, opt, None, state, "fp")
        fresh = tiny_model(seed=9)
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
        resumed = resume_training(f"{out_dir}/ckpt", fresh, fresh_opt, None, "fp")
        report = {
            "state": resumed,
            "weights_equal": all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                                  model.state_dict().values())),
            "rng": torch.rand(4).tolist(),
            "expected_rng": expected_draw[1].tolist() if rank == 0 else None,
            "rng_states": len(json.loads((path / "trainer.json").read_text())["rng"]),
        }
        with open(f"{out_dir}/report-{rank}.json", "w") as fh:
            json.dump(report, fh)
    finally:
        destroy_distributed()


def test_every_gloo_rank_resumes_the_checkpoint_rank_0_wrote_with_rank_0s_rng_state(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in range(WORLD)]
    checkpoints = [p.name for p in (tmp_path / "ckpt").iterdir()]
    assert checkpoints == ["step-00000002"]
    for report in reports:
        assert report["state"]["micro_steps"] == 2
        assert report["weights_equal"], report
        assert report["rng_states"] == 1  # one state: every micro-batch reseeds from its position
    assert reports[0]["rng"] != reports[0]["expected_rng"]  # rank 0 drew one number before saving
    assert reports[0]["rng"] == reports[1]["rng"]  # both continue rank 0's stream


# --------------------------------------------------------------------------------------------
# Each worker's micro-batches of the batch order (no processes needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [12, 13, 7, 1])
@pytest.mark.parametrize("n_micro", [1, 3, 4])
def test_any_number_of_workers_shares_the_same_micro_batches_of_the_same_global_batches(n, n_micro):
    batch_size = 4
    single = list(micro_batch_indices(n, batch_size, n_micro, SEED, 4, 0, 1))
    assert len(single) == n_global_batches(n, batch_size)
    for workers in range(1, n_micro + 1):
        shares = [list(micro_batch_indices(n, batch_size, n_micro, SEED, 4, r, workers)) for r in range(workers)]
        for s, (index, whole) in enumerate(single):
            parts = [part for share in shares for part in share[s][1]]  # the workers' blocks, in rank order
            assert all(share[s][0] == index == s for share in shares)
            assert [k for k, _ in parts] == list(range(n_micro))  # contiguous blocks, every micro-batch once
            assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(parts, whole))
    seen = np.concatenate([part for _, whole in single for _, part in whole])
    assert sorted(seen.tolist()) == list(range(n))  # batch_size examples a global batch, each once an epoch


def test_a_short_last_global_batch_leaves_its_last_micro_batches_empty():
    last = list(micro_batch_indices(9, 4, 4, SEED, 0, 0, 1))[-1][1]  # one example in 4 micro-batches
    assert [len(idx) for _, idx in last] == [1, 0, 0, 0]
    batches = list(iterate_micro_batches(pair_data(), 5, 3, SEED, 0, DistContext(world_size=1)))
    assert [b is None for _, b in batches[-1].micro] == [False, False, True]  # 12 = 5 + 5 + 2: sizes 1, 1, 0
    ours = [int(len(b.labels)) for g in batches for _, b in g.micro if b is not None]
    assert ours == [2, 2, 1, 2, 2, 1, 1, 1]


def test_micro_batches_resume_from_a_global_batch():
    full = list(micro_batch_indices(40, 4, 2, SEED, 1, 1, 2))
    resumed = list(micro_batch_indices(40, 4, 2, SEED, 1, 1, 2, start=3))
    assert [(s, [(k, i.tolist()) for k, i in p]) for s, p in resumed] == \
        [(s, [(k, i.tolist()) for k, i in p]) for s, p in full[3:]]


def test_more_workers_than_micro_batches_is_a_config_error_naming_the_key():
    check_workers(4, 4, "training.micro_batches")
    with pytest.raises(ConfigError, match=r"training.micro_batches=2 is less than the 3 workers"):
        check_workers(2, 3, "training.micro_batches")


def test_without_torchrun_variables_the_context_is_a_single_main_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)


def test_a_partial_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK.*torchrun --nproc_per_node"):
        init_distributed("cpu")


# --------------------------------------------------------------------------------------------
# Memory-mapped pair shards under torchrun: each worker reads its own share
# --------------------------------------------------------------------------------------------


def _examples_as_rows(batches) -> list:
    return [(tuple(r[: int(n)].tolist()), int(y)) for b in batches
            for r, n, y in zip(b.input_ids, b.attention_mask.sum(1), b.labels)]


def _shard_worker(rank: int, port: int, pairs_dir: str, out_dir: str, length_grouping: bool) -> None:
    from twilbert.data.pairs import load_shards

    ctx = join_gloo_group(rank, WORLD, port)
    try:
        data = load_shards(pairs_dir)
        seen = {epoch: _examples_as_rows(part for batch in iterate_micro_batches(
                    data, 6, 2, SEED, epoch, ctx, length_grouping=length_grouping) for _, part in batch.micro)
                for epoch in (0, 1)}
        report = {"seen": seen, "memmap": all(isinstance(a, np.memmap) for a in data.open_arrays())}
        with open(f"{out_dir}/shard-report-{rank}.json", "w") as fh:
            json.dump(report, fh)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("length_grouping", [False, True], ids=["random", "length-grouped"])
def test_two_gloo_ranks_read_disjoint_shares_of_the_shards_that_cover_every_example_once_per_epoch(
        tmp_path, length_grouping):
    from collections import Counter

    from helpers import make_tweets
    from twilbert.config import VocabConfig
    from twilbert.data.pairs import build_pair_shards, load_shards
    from twilbert.data.tokenizer import Tokenizer, train_vocab

    train_vocab([t for t, _ in make_tweets(200)], tmp_path / "vocab", VocabConfig(vocab_size=100))
    corpus = [(t, None) if i % 2 else (t, "gracias " + t) for i, (t, _) in enumerate(make_tweets(47, seed=5))]
    build_pair_shards(corpus, Tokenizer(tmp_path / "vocab"), tmp_path / "pairs", max_len=8, heldout_fraction=0.0,
                      shard_size=10, seed=0)
    mp.spawn(_shard_worker, args=(free_port(), str(tmp_path / "pairs" / "train"), str(tmp_path), length_grouping),
             nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"shard-report-{r}.json").read_text()) for r in range(WORLD)]
    data = load_shards(tmp_path / "pairs" / "train")
    every = data.take(np.arange(len(data)))
    expected = Counter((tuple(r[: int(n)].tolist()), int(y))
                       for r, n, y in zip(every["input_ids"], every["length"], every["labels"]))
    assert len(data) == 94
    for epoch in ("0", "1"):
        shares = [Counter((tuple(row), label) for row, label in rep["seen"][epoch]) for rep in reports]
        assert sum(shares[0].values()) == sum(shares[1].values()) == len(data) // WORLD
        assert shares[0] + shares[1] == expected  # together every example exactly once, none on both ranks
    assert reports[0]["seen"]["0"] != reports[0]["seen"]["1"]  # a new order each epoch
    assert all(rep["memmap"] for rep in reports)
