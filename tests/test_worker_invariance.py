"""World-size invariance (CPU, gloo via torchrun, one intra-op thread per worker): the pretrain and
finetune stages write the same bytes (model, metrics, curves) whether 1, 2 or 4 workers share each
global batch's micro-batches, and a run killed on 2 workers resumes on 1 to the bytes of an
uninterrupted run; more workers than micro-batches is refused before training. 4 workers
oversubscribe a 2-core machine; only the time changes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from finetune_data import make_finetune_inputs
from helpers import (
    MAX_LEN,
    finetune_args,
    make_pretrain_inputs,
    ok,
    pretrain_args,
    run_stage,
    run_states,
    steps,
    write_params,
)

pytestmark = pytest.mark.reliability

MICRO = 4  # micro-batches per global batch: any of 1, 2 and 4 workers takes a block of them


def torchrun(workers: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers)]


def launch(workers: int):
    # 1: the stage process itself; the params say runtime.workers: 1, else auto would launch min(cores, K)
    return None if workers == 1 else torchrun(workers)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path: what a byte-for-byte comparison compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pretrain_outputs(out: Path) -> dict[str, bytes]:
    return {**{f"model/{k}": v for k, v in tree_bytes(out / "model").items()},
            **{f"curves/{k}": v for k, v in tree_bytes(out / "curves").items()},
            "metrics.json": (out / "metrics.json").read_bytes()}


def differing(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def test_pretraining_on_1_2_and_4_workers_writes_the_same_model_metrics_and_curves_and_resumes_across_counts(
        tmp_path):
    inputs = make_pretrain_inputs(tmp_path / "inputs")
    work = tmp_path / "work"
    # 97 train pairs, global batches of 8 in 4 micro-batches (the last batch of 1 pair: 3 empty ones),
    # windows of 2 global batches, a checkpoint due every 3 global batches waits for a window's end.
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}", "training.batch_size=8",
                        f"training.micro_batches={MICRO}", "training.epochs=2", "training.accum_iters=2",
                        "training.checkpoint_every=3", "training.log_every=1", "training.pll_examples=2",
                        "training.device=cpu", "runtime.workers=1"])

    def args(out: Path) -> list:
        return [*pretrain_args(inputs, out), "--curves", out / "curves"]

    outputs = {}
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        proc = ok(run_stage("pretrain.py", args(out), work, launcher=launch(workers)))
        assert f"{workers} process(es)" in proc.stderr
        outputs[workers] = pretrain_outputs(out)
    assert "curves/steps.csv" in outputs[1] and "model/model.safetensors" in outputs[1]
    assert differing(outputs[1], outputs[2]) == []
    assert differing(outputs[1], outputs[4]) == []

    # Killed on 2 workers right after the checkpoint of global batch 10, resumed on 1.
    out = tmp_path / "moved"
    stopped = run_stage("pretrain.py", args(out), work, kill_at=10, launcher=torchrun(2))
    assert stopped.returncode != 0 and not (out / "model").exists()
    assert steps(run_states(out / "checkpoints")) == ["step-00000006", "step-00000010"]
    resumed = ok(run_stage("pretrain.py", args(out), work))
    assert "resuming at epoch 1, batch 10" in resumed.stderr and "1 process(es)" in resumed.stderr
    assert differing(outputs[1], pretrain_outputs(out)) == []


def test_finetuning_on_1_2_and_4_workers_writes_the_same_model_and_metrics(tmp_path):
    _, task = make_finetune_inputs(tmp_path)
    task["task"]["class_weights"] = {"N": 3.0}  # the loss divides by the global batch's weight sum
    work = tmp_path / "work"
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}", "runtime.workers=1"], tasks={"t": task},
                 finetuning={"epochs": 2, "batch_size": 12, "micro_batches": MICRO, "device": "cpu",
                             "baseline_row": False})
    outputs = {}
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        ok(run_stage("finetune.py", finetune_args(tmp_path, out), work, launcher=launch(workers)))
        outputs[workers] = {**{f"model/{k}": v for k, v in tree_bytes(out / "model").items()},
                            **{f"results/{k}": v for k, v in tree_bytes(out / "results").items()}}
    assert "model/model.safetensors" in outputs[1] and "results/metrics.json" in outputs[1]
    assert differing(outputs[1], outputs[2]) == []
    assert differing(outputs[1], outputs[4]) == []


def test_more_workers_than_micro_batches_stop_before_training_with_one_line_naming_the_key(tmp_path):
    inputs = make_pretrain_inputs(tmp_path / "inputs")
    work = tmp_path / "work"
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}", "training.batch_size=8",
                        "training.micro_batches=1", "training.epochs=1", "training.device=cpu"])
    out = tmp_path / "out"
    proc = run_stage("pretrain.py", pretrain_args(inputs, out), work, launcher=torchrun(2))
    assert proc.returncode != 0 and not (out / "model").exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("training.micro_batches=1 is less than the 2 workers launched" in e for e in errors), \
        proc.stderr[-3000:]
