"""The training loop under DDP (CPU, gloo, 2 processes): the same steps as one process with the global
batch; the stage scripts under torchrun write one model, and a killed torchrun run resumes bit for bit."""

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
    assert_same_weights,
    finetune_args,
    free_port,
    join_gloo_group,
    make_pretrain_inputs,
    ok,
    pretrain_args,
    run_stage,
    run_states,
    steps,
    write_params,
)
from twilbert.config import compose, load_config
from twilbert.data.batch import make_batch, pack_pairs
from twilbert.data.masking import mask_tokens
from twilbert.data.special import MASK_ID, N_SPECIAL
from twilbert.train.distributed import (
    DistContext,
    destroy_distributed,
    iterate_rank_batches,
    rank_batch_indices,
)
from twilbert.train.loop import Checkpointing
from twilbert.train.pretrain import build_pretraining
from twilbert.train.pretrain_run import resolve_pretrain_run

pytestmark = pytest.mark.reliability

VOCAB, WIDTH, N_EXAMPLES, PER_RANK, WORLD, SEED = 40, 8, 30, 3, 2, 5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone"]


def sgd_config():
    """Tiny preset without dropout; SGD (Adam would amplify rounding); windows of 2 micro-batches."""
    raw = compose(["model=tiny", f"representation.max_len={WIDTH}", "model.input_dropout=0.0",
                   "model.output_dropout=0.0", "training.optimizer=sgd", "training.lr=0.5",
                   "training.weight_decay=0.0", "training.accum_iters=2", "training.max_grad_norm=null"], REPO / "conf")
    return load_config(raw)


def pair_data():
    """Rows of varied length, and one fixed masking of every row (MLM counts differ between rows)."""
    rng = np.random.default_rng(0)
    a = [rng.integers(N_SPECIAL, VOCAB, rng.integers(2, WIDTH + 1)).tolist() for _ in range(N_EXAMPLES)]
    b = [rng.integers(N_SPECIAL, VOCAB, rng.integers(2, WIDTH + 1)).tolist() for _ in range(N_EXAMPLES)]
    data = pack_pairs(a, b, WIDTH)
    data["labels"] = rng.integers(0, 2, N_EXAMPLES)
    whole = make_batch(*(data[k] for k in ("input_ids", "len_a", "length", "labels")))
    masked, labels = mask_tokens(whole.input_ids, whole.special_mask, sgd_config().model.masked_lm, VOCAB, MASK_ID,
                                 N_SPECIAL, torch.Generator().manual_seed(1))
    return data, masked, labels


def train_one_epoch(batch_size: int, ctx: DistContext, checkpoint_dir=None):
    """One epoch of the real pretraining loop; every row masked as in ``pair_data``. Returns the
    weights and the epoch totals."""
    data, masked, labels = pair_data()
    model, trainer, objective = build_pretraining(resolve_pretrain_run(sgd_config()), VOCAB, torch.device("cpu"), ctx=ctx)
    order = iter(rank_batch_indices(N_EXAMPLES, batch_size, SEED, 0, ctx.rank, ctx.world_size))

    def fixed_masks(batch, *keys):
        idx, width = next(order), batch.input_ids.shape[1]
        return masked[idx][:, :width], labels[idx][:, :width]

    objective.mask = fixed_masks
    if checkpoint_dir is not None:
        trainer.checkpointing = Checkpointing(checkpoint_dir, "f" * 64, every=1)  # due at every micro-step
    totals = trainer.train_epoch(iterate_rank_batches(data, batch_size, SEED, 0, ctx), objective)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, totals, trainer.state.optimizer_steps


def _worker(rank: int, port: int, out_dir: str) -> None:
    from safetensors.torch import save_file

    ctx = join_gloo_group(rank, WORLD, port)
    try:
        weights, totals, optimizer_steps = train_one_epoch(PER_RANK, ctx, f"{out_dir}/ckpt")
        save_file(weights, f"{out_dir}/weights-{rank}.safetensors")
        with open(f"{out_dir}/totals-{rank}.json", "w") as fh:
            json.dump({**totals, "optimizer_steps": optimizer_steps}, fh)
    finally:
        destroy_distributed()


def test_an_epoch_on_two_ranks_with_batch_b_equals_one_process_with_batch_2b(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single, single_totals, single_steps = train_one_epoch(PER_RANK * WORLD, DistContext())
    assert single_steps == 3  # 5 micro-batches in windows of 2: the last, short window steps too

    start = build_pretraining(resolve_pretrain_run(sgd_config()), VOCAB, torch.device("cpu")).model.state_dict()
    ranks = [load_file(str(tmp_path / f"weights-{r}.safetensors")) for r in range(WORLD)]
    for name, tensor in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps the replicas identical
        torch.testing.assert_close(ranks[0][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    ffn = "twilbert.encoder.layers.0.ffn.weight"
    assert not torch.equal(single[ffn], start[ffn])

    # Epoch totals are summed over ranks: the masked tokens and pairs of the whole epoch, once each.
    totals = json.loads((tmp_path / "totals-0.json").read_text())
    assert totals["optimizer_steps"] == single_steps
    for key in ("mlm_count", "rop_count", "mlm_correct", "rop_correct"):
        assert totals[key] == single_totals[key], key
    assert totals["rop_count"] == N_EXAMPLES
    assert totals["loss"] == pytest.approx(single_totals["loss"], rel=1e-5)
    # Checkpoints due inside a window waited for its end (micro-step 1 -> 2, 3 -> 4; 5 ends the epoch).
    assert steps(tmp_path / "ckpt") == ["step-00000004", "step-00000005"]
    trainer = json.loads((tmp_path / "ckpt" / "step-00000004" / "trainer.json").read_text())
    assert trainer["state"]["accum_position"] == 0 and len(trainer["rng"]) == WORLD


# --------------------------------------------------------------------------------------------
# The stage scripts under torchrun
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_pretrain_writes_one_model_and_a_killed_run_resumes_bit_for_bit(tmp_path):
    inputs = make_pretrain_inputs(tmp_path / "inputs")
    work = tmp_path / "work"
    # 108 pairs, 2 ranks x batch 4: 14 micro-steps an epoch; a checkpoint due every 3 waits for a window end.
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}", "training.batch_size=4",
                        "training.epochs=2", "training.accum_iters=2", "training.checkpoint_every=3",
                        "training.pll_examples=2", "training.device=cpu"])
    reference = tmp_path / "reference"
    proc = ok(run_stage("pretrain.py", pretrain_args(inputs, reference), work, launcher=TORCHRUN))
    assert "2 process(es)" in proc.stderr
    assert {p.name for p in reference.iterdir()} == {"model", "checkpoints", "metrics.json"}
    assert {"model.safetensors", "config.json", "spm.model"} <= {p.name for p in (reference / "model").iterdir()}
    states = run_states(reference / "checkpoints")
    trainer = json.loads((states / "step-00000028" / "trainer.json").read_text())
    assert trainer["world_size"] == WORLD and len(trainer["rng"]) == WORLD

    out = tmp_path / "interrupted"
    killed = run_stage("pretrain.py", pretrain_args(inputs, out), work, kill_at=10, launcher=TORCHRUN)
    assert killed.returncode != 0 and not (out / "model").exists()
    assert steps(run_states(out / "checkpoints")) == ["step-00000006", "step-00000010"]  # 9 waited for 10
    resumed = ok(run_stage("pretrain.py", pretrain_args(inputs, out), work, launcher=TORCHRUN))
    assert "resuming at epoch 1, batch 10" in resumed.stderr
    assert_same_weights(reference / "model" / "model.safetensors", out / "model" / "model.safetensors")
    assert json.loads((reference / "metrics.json").read_text()) == json.loads((out / "metrics.json").read_text())


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
    trainer = json.loads((run_states(out / "checkpoints") / "step-00000006" / "trainer.json").read_text())
    assert trainer["world_size"] == WORLD  # 48 rows / (2 ranks x 8) = 3 micro-steps an epoch
