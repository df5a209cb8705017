"""DDP on CPU (gloo, 2 processes): the same gradients as one process with the global batch; rank shards; resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port, join_gloo_group
from twilbert.config import ModelConfig, RopConfig
from twilbert.data.batch import iterate_batches
from twilbert.model import TWilBertForPretraining
from twilbert.train.distributed import (
    DistContext,
    destroy_distributed,
    init_distributed,
    iterate_rank_batches,
    loss_normalizer,
    n_rank_batches,
    no_sync_unless,
    rank_batch_indices,
    wrap_ddp,
)
from twilbert.train.losses import mlm_loss

pytestmark = pytest.mark.reliability

VOCAB, MAX_POS, WIDTH = 40, 16, 12
N_EXAMPLES, PER_RANK, WORLD, ACCUM, SEED = 12, 3, 2, 2, 5


def tiny_model(seed: int = 0) -> TWilBertForPretraining:
    torch.manual_seed(seed)
    cfg = ModelConfig(embedding_size=8, hidden_size=16, n_encoders=2, n_heads=2, intermediate_size=32,
                      input_dropout=0.0, output_dropout=0.0, rop=RopConfig(enabled=False))
    cfg.validate()
    return TWilBertForPretraining(cfg, VOCAB, MAX_POS)


def pair_data() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Packed rows of varied length, and fixed MLM labels per row (both sides mask the same tokens)."""
    rng = np.random.default_rng(0)
    length = rng.integers(5, WIDTH + 1, N_EXAMPLES).astype(np.int32)
    ids = np.zeros((N_EXAMPLES, WIDTH), dtype=np.int32)
    labels = np.full((N_EXAMPLES, WIDTH), -100, dtype=np.int64)
    for i, n in enumerate(length):
        ids[i, :n] = rng.integers(5, VOCAB, n)
        ids[i, 0], ids[i, n - 1] = 3, 4  # [CLS] ... [SEP]
        chosen = rng.choice(np.arange(1, n - 1), size=rng.integers(1, n - 2), replace=False)  # uneven counts
        labels[i, chosen] = ids[i, chosen]
    data = {"input_ids": ids, "len_a": length - 2, "length": length, "labels": np.ones(N_EXAMPLES, dtype=np.int64)}
    return data, labels


def accumulate(model, batches, labels_of, normalizer) -> list[float]:
    """ACCUM micro-batches of masked-LM loss into .grad; ``normalizer(local_count)`` sets the divisor.

    Returns the gradient norm of the word embeddings after each micro-batch."""
    norms = []
    for micro, batch in enumerate(batches):
        labels = torch.from_numpy(labels_of(micro))[:, : batch.input_ids.shape[1]]
        with no_sync_unless(model, sync=micro == ACCUM - 1):
            out = model(batch.input_ids, batch.segment_ids, batch.attention_mask, labels)
            loss = mlm_loss(out.mlm_logits, out.mlm_targets, normalizer=normalizer(out.mlm_targets.numel()))
            (loss / ACCUM).backward()
        norms.append(next(p for p in model.parameters()).grad.norm().item())
    return norms


def _worker(rank: int, port: int, out_dir: str) -> None:
    from safetensors.torch import save_file

    from twilbert.train.checkpoint import resume_training, save_training_checkpoint

    ctx = join_gloo_group(rank, WORLD, port)
    try:
        data, labels = pair_data()
        model = tiny_model()
        ddp = wrap_ddp(model, ctx)
        batches = list(iterate_rank_batches(data, PER_RANK, SEED, 0, ctx))
        idx = list(rank_batch_indices(N_EXAMPLES, PER_RANK, SEED, 0, ctx.rank, ctx.world_size))
        norms = accumulate(ddp, batches, lambda m: labels[idx[m]], loss_normalizer)
        save_file({n: p.grad.contiguous() for n, p in model.named_parameters()}, f"{out_dir}/grads-{rank}.safetensors")

        # Resume under DDP: every rank saves, rank 0 alone writes; every rank resumes the same state.
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.step()
        state = {"epoch": 0, "batch_in_epoch": 2, "optimizer_steps": 1, "micro_steps": 2, "accum_position": 0}
        torch.rand(1 + rank)  # ranks' RNG streams differ; each must get its own back
        expected_draw = (torch.get_rng_state(), torch.rand(4))
        torch.set_rng_state(expected_draw[0])
        path = save_training_checkpoint(f"{out_dir}/ckpt", ddp, opt, None, state, "fp")
        fresh = tiny_model(seed=9)
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
        resumed = resume_training(f"{out_dir}/ckpt", fresh, fresh_opt, None, "fp")
        report = {
            "state": resumed,
            "weights_equal": all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                                  model.state_dict().values())),
            "rng_equal": torch.equal(torch.rand(4), expected_draw[1]),
            "grad_norms": norms,
            "rng_states": len(json.loads((path / "trainer.json").read_text())["rng"]),
        }
        with open(f"{out_dir}/report-{rank}.json", "w") as fh:
            json.dump(report, fh)
    finally:
        destroy_distributed()


def test_two_gloo_ranks_give_the_gradients_of_one_process_with_twice_the_batch(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    data, labels = pair_data()
    model = tiny_model()
    batches = list(iterate_batches(data, PER_RANK * WORLD, SEED, 0))
    idx = list(rank_batch_indices(N_EXAMPLES, PER_RANK * WORLD, SEED, 0, 0, 1))
    accumulate(model, batches, lambda m: labels[idx[m]], lambda count: count)
    for rank in range(WORLD):
        grads = load_file(str(tmp_path / f"grads-{rank}.safetensors"))
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")

    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in range(WORLD)]
    # no_sync: after the first micro-batch each rank holds only its own gradients; synced after the last
    assert reports[0]["grad_norms"][0] != reports[1]["grad_norms"][0]
    assert reports[0]["grad_norms"][-1] == reports[1]["grad_norms"][-1]

    checkpoints = [p.name for p in (tmp_path / "ckpt").iterdir()]
    assert checkpoints == ["step-00000002"]
    for report in reports:
        assert report["state"]["micro_steps"] == 2
        assert report["weights_equal"] and report["rng_equal"], report
        assert report["rng_states"] == WORLD


# --------------------------------------------------------------------------------------------
# Rank shards of the batch order (no processes needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [12, 13, 7, 1])
def test_rank_shards_are_disjoint_slices_of_the_single_process_batches(n):
    world, per_rank = 3, 2
    shards = [list(rank_batch_indices(n, per_rank, SEED, 4, r, world)) for r in range(world)]
    steps = n_rank_batches(n, per_rank, world)
    assert all(len(s) == steps for s in shards)  # every rank takes the same number of steps
    single = list(rank_batch_indices(n, per_rank * world, SEED, 4, 0, 1))
    for step, whole in enumerate(single):
        parts = [shards[r][step] for r in range(world)]
        assert all(len(p) for p in parts)
        if len(whole) >= world:
            assert sorted(np.concatenate(parts)) == sorted(whole)  # disjoint, nothing lost
        else:  # fewer examples than ranks: padded from the start of the order
            assert set(whole) <= set(np.concatenate(parts))


def test_rank_shards_resume_from_a_global_batch():
    full = list(rank_batch_indices(40, 4, SEED, 1, 1, 2))
    assert [list(b) for b in rank_batch_indices(40, 4, SEED, 1, 1, 2, start=3)] == [list(b) for b in full[3:]]


def test_single_rank_shards_match_iterate_batches():
    data, _ = pair_data()
    ctx = DistContext()
    for ours, theirs in zip(iterate_rank_batches(data, 5, SEED, 2, ctx), iterate_batches(data, 5, SEED, 2)):
        assert torch.equal(ours.input_ids, theirs.input_ids)


def test_without_torchrun_variables_the_context_is_a_single_main_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert loss_normalizer(7).item() == 7.0
    assert wrap_ddp(tiny_model(), ctx).__class__ is TWilBertForPretraining


def test_a_partial_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK.*torchrun --nproc_per_node"):
        init_distributed("cpu")


# --------------------------------------------------------------------------------------------
# Memory-mapped pair shards under DDP: each rank reads its own share
# --------------------------------------------------------------------------------------------


def _examples_as_rows(batches) -> list:
    return [(tuple(r[: int(n)].tolist()), int(y)) for b in batches
            for r, n, y in zip(b.input_ids, b.attention_mask.sum(1), b.labels)]


def _shard_worker(rank: int, port: int, pairs_dir: str, out_dir: str, length_grouping: bool) -> None:
    from twilbert.data.pairs import load_shards

    ctx = join_gloo_group(rank, WORLD, port)
    try:
        data = load_shards(pairs_dir)
        seen = {epoch: _examples_as_rows(iterate_rank_batches(data, 5, SEED, epoch, ctx,
                                                              length_grouping=length_grouping))
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
