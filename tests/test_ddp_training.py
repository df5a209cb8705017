"""The training loop under torchrun (CPU, gloo, 2 processes): the same bytes as one process, step for
step (gradients combined in the fixed micro-batch tree, not by DDP); the finetune stage under torchrun
writes one model and its metrics from rank 0. (Pretraining under torchrun, and a run moved between
worker counts: tests/test_worker_invariance.py.)"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from finetune_data import make_finetune_inputs
from helpers import (
    MAX_LEN,
    REPO,
    finetune_args,
    free_port,
    join_gloo_group,
    ok,
    run_stage,
    run_states,
    steps,
    write_params,
)
from twilbert.config import compose, load_config
from twilbert.data.batch import make_batch, pack_pairs
from twilbert.data.masking import mask_tokens
from twilbert.data.special import MASK_ID, N_SPECIAL
from twilbert.train.distributed import DistContext, destroy_distributed, iterate_micro_batches, micro_batch_indices
from twilbert.train.loop import Checkpointing
from twilbert.train.pretrain import build_pretraining
from twilbert.train.pretrain_run import resolve_pretrain_run

pytestmark = pytest.mark.reliability

VOCAB, WIDTH, N_EXAMPLES, BATCH, MICRO, WORLD, SEED = 40, 8, 30, 6, 2, 2, 5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone"]


def tiny_config():
    """Tiny preset with its dropout; windows of 2 global batches of 2 micro-batches."""
    raw = compose(["model=tiny", f"representation.max_len={WIDTH}", f"training.batch_size={BATCH}",
                   f"training.micro_batches={MICRO}", "training.accum_iters=2"], REPO / "conf")
    return load_config(raw)


def pair_data():
    """Rows of varied length, and one fixed masking of every row (MLM counts differ between rows)."""
    rng = np.random.default_rng(0)
    a = [rng.integers(N_SPECIAL, VOCAB, rng.integers(2, WIDTH + 1)).tolist() for _ in range(N_EXAMPLES)]
    b = [rng.integers(N_SPECIAL, VOCAB, rng.integers(2, WIDTH + 1)).tolist() for _ in range(N_EXAMPLES)]
    data = pack_pairs(a, b, WIDTH)
    data["labels"] = rng.integers(0, 2, N_EXAMPLES)
    whole = make_batch(*(data[k] for k in ("input_ids", "len_a", "length", "labels")))
    masked, labels = mask_tokens(whole.input_ids, whole.special_mask, tiny_config().model.masked_lm, VOCAB, MASK_ID,
                                 N_SPECIAL, torch.Generator().manual_seed(1))
    return data, masked, labels


def train_one_epoch(ctx: DistContext, checkpoint_dir=None):
    """One epoch of the real pretraining loop; every row masked as in ``pair_data``. Returns the
    weights and the epoch totals."""
    data, masked, labels = pair_data()
    model, trainer, objective = build_pretraining(resolve_pretrain_run(tiny_config()), VOCAB, torch.device("cpu"), ctx=ctx)
    parts = {(s, k): idx for s, share in micro_batch_indices(N_EXAMPLES, BATCH, MICRO, SEED, 0, ctx.rank,
                                                               ctx.world_size) for k, idx in share}

    def fixed_masks(batch, epoch, s, k):
        idx, width = parts[(s, k)], batch.input_ids.shape[1]
        return masked[idx][:, :width], labels[idx][:, :width]

    objective.mask = fixed_masks
    if checkpoint_dir is not None:
        trainer.checkpointing = Checkpointing(checkpoint_dir, "f" * 64, every=1)  # due at every micro-step
    totals = trainer.train_epoch(iterate_micro_batches(data, BATCH, MICRO, SEED, 0, ctx), objective)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, totals, trainer.state.optimizer_steps


def _worker(rank: int, port: int, out_dir: str) -> None:
    from safetensors.torch import save_file

    ctx = join_gloo_group(rank, WORLD, port)
    try:
        weights, totals, optimizer_steps = train_one_epoch(ctx, f"{out_dir}/ckpt")
        save_file(weights, f"{out_dir}/weights-{rank}.safetensors")
        with open(f"{out_dir}/totals-{rank}.json", "w") as fh:
            json.dump({**totals, "optimizer_steps": optimizer_steps}, fh)
    finally:
        destroy_distributed()


def test_an_epoch_on_two_workers_is_bit_for_bit_the_epoch_of_one_process(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single, single_totals, single_steps = train_one_epoch(DistContext())
    assert single_steps == 3  # 5 global batches in windows of 2: the last, short window steps too

    start = build_pretraining(resolve_pretrain_run(tiny_config()), VOCAB, torch.device("cpu")).model.state_dict()
    ranks = [load_file(str(tmp_path / f"weights-{r}.safetensors")) for r in range(WORLD)]
    for name, tensor in single.items():
        assert torch.equal(ranks[0][name], tensor) and torch.equal(ranks[1][name], tensor), name
    ffn = "twilbert.encoder.layers.0.ffn.weight"
    assert not torch.equal(single[ffn], start[ffn])

    # Epoch totals: every micro-batch's values, gathered and summed in micro-batch order, on every rank.
    for rank in range(WORLD):
        totals = json.loads((tmp_path / f"totals-{rank}.json").read_text())
        assert totals == {**single_totals, "optimizer_steps": single_steps}
    assert single_totals["rop_count"] == N_EXAMPLES
    # Checkpoints due inside a window waited for its end (micro-step 1 -> 2, 3 -> 4; 5 ends the epoch).
    assert steps(tmp_path / "ckpt") == ["step-00000004", "step-00000005"]
    trainer = json.loads((tmp_path / "ckpt" / "step-00000004" / "trainer.json").read_text())
    assert trainer["state"]["accum_position"] == 0 and len(trainer["rng"]) == 1


# --------------------------------------------------------------------------------------------
# The stage scripts under torchrun
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_finetune_trains_on_two_ranks_and_rank_0_writes_the_model_and_metrics(tmp_path):
    _, task = make_finetune_inputs(tmp_path)
    work = tmp_path / "work"
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}"], tasks={"t": task},
                 finetuning={"epochs": 2, "batch_size": 8, "device": "cpu", "baseline_row": True})
    out = tmp_path / "out"
    proc = ok(run_stage("finetune.py", finetune_args(tmp_path, out), work, launcher=TORCHRUN))
    assert (proc.stdout + proc.stderr).count("t s0 (twilbert): dev ") == 1  # rank 0 alone ends with its summary
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["n_train"] == 48
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "baseline").is_dir()
    trainer = json.loads((run_states(out / "checkpoints") / "step-00000012" / "trainer.json").read_text())
    assert trainer["world_size"] == WORLD  # 48 rows / 8 = 6 global batches (micro-steps) an epoch
