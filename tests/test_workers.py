"""runtime.workers: a training stage under portable numerics runs as workers it launches itself
(pipeline/workers.py), with one log, one error line, one writer, and no worker outliving it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune_data import make_finetune_inputs
from helpers import (
    MAX_LEN,
    PRETRAIN,
    REPO,
    alive,
    finetune_args,
    make_pretrain_inputs,
    ok,
    pretrain_args,
    run_stage,
    run_states,
    steps,
    write_params,
)
from twilbert.config import ConfigError, RuntimeConfig, compose, load_config
from twilbert.numerics import PINNED_BY_LAUNCHER, PORTABLE_ENV
from twilbert.pipeline import workers
from twilbert.pipeline.lifeline import WORKER_OF_ENV
from twilbert.pipeline.workers import worker_count

pytestmark = pytest.mark.reliability

CPU = "cpu"


# --------------------------------------------------------------------------------------------
# How many workers
# --------------------------------------------------------------------------------------------


def test_auto_is_min_of_cores_and_micro_batches_under_portable_numerics_on_the_cpu():
    auto = RuntimeConfig()
    assert worker_count(auto, 4, CPU, "training", cores=2, environ={})[0] == 2
    assert worker_count(auto, 4, CPU, "training", cores=16, environ={})[0] == 4
    assert worker_count(auto, 1, CPU, "training", cores=16, environ={})[0] == 1  # K = 1: today's one process
    n, why = worker_count(auto, 8, CPU, "finetuning", cores=3, environ={})
    assert n == 3 and why == "auto: min(3 core(s), finetuning.micro_batches=8)"


def test_the_host_numerics_a_gpu_and_torchrun_get_one_process_and_workers_overrides():
    assert worker_count(RuntimeConfig(portable_numerics=False), 8, CPU, "training", cores=8, environ={})[0] == 1
    assert worker_count(RuntimeConfig(), 8, "meta", "training", cores=8, environ={})[0] == 1  # not the CPU
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    assert worker_count(RuntimeConfig(workers=4), 8, CPU, "training", cores=8, environ=torchrun) == (
        1, "already a torchrun rank")
    assert worker_count(RuntimeConfig(workers=1), 8, CPU, "training", cores=8, environ={})[0] == 1
    assert worker_count(RuntimeConfig(workers=3), 1, CPU, "training", cores=1, environ={})[0] == 3
    assert worker_count(RuntimeConfig(workers=2, portable_numerics=False), 1, CPU, "training", cores=1,
                        environ={})[0] == 2
    with pytest.raises(ConfigError, match=r"runtime.workers=2 .* training.device=meta does not .* `torchrun --nproc_per_node"):
        worker_count(RuntimeConfig(workers=2), 8, "meta", "training", cores=8, environ={})


def test_each_worker_gets_one_thread_under_portable_numerics_unless_runtime_threads_says():
    assert workers.worker_threads(RuntimeConfig(), 4, 16) == 1
    assert workers.worker_threads(RuntimeConfig(threads=2), 4, 16) == 2
    assert workers.worker_threads(RuntimeConfig(portable_numerics=False), 4, 16) == 4


def test_runtime_workers_is_a_checked_key_null_by_default():
    assert load_config(compose([], REPO / "conf")).runtime.workers is None
    with pytest.raises(ConfigError, match=r"runtime.workers must be >= 0, got -1"):
        load_config(compose(["runtime.workers=-1"], REPO / "conf"))


def test_another_ranks_failure_is_its_own_error_line_and_status(tmp_path, capsys):
    """Rank 1 failed by itself; the agent stopped rank 0 with SIGTERM, which is listed too."""
    stderr = tmp_path / "run_1" / "attempt_0" / "1" / "stderr.log"
    stderr.parent.mkdir(parents=True)
    stderr.write_text("12:00:00 WARNING x: something\nerror: pairs/manifest.json: line 2: not valid JSON\n")
    failures = {0: SimpleNamespace(local_rank=0, exitcode=-signal.SIGTERM),
                1: SimpleNamespace(local_rank=1, exitcode=2)}
    assert workers._report_failure(failures, tmp_path) == 2
    assert capsys.readouterr().err == "error: pairs/manifest.json: line 2: not valid JSON\n"
    # rank 0 failing by itself has printed its own line on the stage's stderr: nothing is added
    failures[0] = SimpleNamespace(local_rank=0, exitcode=2)
    assert workers._report_failure(failures, tmp_path) == 2
    assert capsys.readouterr().err == ""
    assert workers._report_failure({1: SimpleNamespace(local_rank=1, exitcode=-signal.SIGKILL)}, tmp_path / "x") == 137
    assert "worker rank 1 of this stage ended with signal SIGKILL" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The pretrain stage, launched as workers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_pretrain_inputs(tmp_path_factory.mktemp("inputs"))


def mlflow_runs(workdir: Path, stage: str) -> list[str]:
    """The names of the stage's MLflow runs (beside them: the experiment's parent run)."""
    with sqlite3.connect(workdir.parent / "mlflow.db") as db:
        return [name for (name,) in db.execute("select name from runs where name like ?", (f"{stage}-%",))]


def test_runtime_workers_2_trains_on_two_ranks_with_one_log_one_writer_and_one_mlflow_run(tmp_path, inputs):
    work = tmp_path / "work"
    write_params(work, [*PRETRAIN, "runtime.workers=2"])
    out = tmp_path / "out"
    proc = ok(run_stage("pretrain.py", pretrain_args(inputs, out), work))
    assert "pretrain: 2 workers (runtime.workers=2), 1 intra-op thread(s) each" in proc.stderr
    states = run_states(out / "checkpoints")
    # batch_size is the global batch: 108 pairs / 8 = 14 global batches an epoch on any number of workers
    assert steps(states)[-1] == "step-00000028"
    trainer = json.loads((states / "step-00000028" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and len(trainer["rng"]) == 1  # rank 0's: every micro-batch reseeds
    assert (out / "model" / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    log = proc.stdout + proc.stderr
    for once in ("pretrain: params: params.yaml", "pretrain epoch 1/2", "pretrain: done in", "2 workers ready"):
        assert log.count(once) == 1, once
    assert "rank 1" not in log and "[rank" not in log and "torch.distributed.elastic" not in log
    assert mlflow_runs(work, "pretrain") == ["pretrain-tiny@workspace"]


def test_finetune_under_two_workers_writes_the_model_and_metrics_once_from_rank_0(tmp_path):
    _, task = make_finetune_inputs(tmp_path)
    work = tmp_path / "work"
    write_params(work, ["model=tiny", f"representation.max_len={MAX_LEN}", "runtime.workers=2"], tasks={"t": task},
                 finetuning={"epochs": 1, "batch_size": 8, "device": "cpu"})
    out = tmp_path / "out"
    proc = ok(run_stage("finetune.py", [*finetune_args(tmp_path, out), "--no-baseline"], work))
    log = proc.stdout + proc.stderr
    assert "finetune: 2 workers (runtime.workers=2)" in log and log.count("t s0 (twilbert): dev ") == 1
    assert json.loads((out / "results" / "metrics.json").read_text())["n_train"] == 48
    assert (out / "model" / "model.safetensors").is_file()
    trainer = json.loads((run_states(out / "checkpoints") / "step-00000006" / "trainer.json").read_text())
    assert trainer["world_size"] == 2  # 48 rows / a global batch of 8: 6 global batches, on any worker count
    assert mlflow_runs(work, "finetune") == ["finetune-t-s0@workspace"]


def test_the_portable_default_launches_min_of_cores_and_micro_batches_workers(tmp_path, inputs):
    work = tmp_path / "work"
    write_params(work, [*PRETRAIN, "training.epochs=1", "training.micro_batches=2"])  # runtime.workers: null
    out = tmp_path / "out"
    proc = ok(run_stage("pretrain.py", pretrain_args(inputs, out), work))
    expected = min(workers.available_cores(), 2)
    trainer = json.loads((run_states(out / "checkpoints") / steps(run_states(out / "checkpoints"))[-1]
                          / "trainer.json").read_text())
    assert trainer["world_size"] == expected
    assert (f"pretrain: {expected} workers (auto: min(" in proc.stderr) == (expected > 1)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(shutil.which("taskset") is None or workers.available_cores() < 2,
                    reason="needs taskset and 2 cores to change the core count between the runs")
def test_a_run_killed_on_auto_workers_resumes_on_fewer_cores_to_the_bytes_of_an_uninterrupted_run(tmp_path, inputs):
    work = tmp_path / "work"
    write_params(work, [*PRETRAIN, "training.micro_batches=2"])  # runtime.workers: null (auto)
    one_core = ["taskset", "-c", "0", sys.executable]  # auto: min(1 core, K=2) = 1 worker

    def args(out: Path) -> list:
        return [*pretrain_args(inputs, out), "--curves", out / "curves"]

    def outputs(out: Path) -> dict[str, bytes]:
        return {**{f"model/{k}": v for k, v in tree_bytes(out / "model").items()},
                **{f"curves/{k}": v for k, v in tree_bytes(out / "curves").items()},
                "metrics.json": (out / "metrics.json").read_bytes()}

    whole = tmp_path / "whole"
    ok(run_stage("pretrain.py", args(whole), work, launcher=one_core))
    moved = tmp_path / "moved"
    stopped = run_stage("pretrain.py", args(moved), work, kill_at=10)  # 2 cores: 2 workers
    assert "pretrain: 2 workers (auto: min(2 core(s)" in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.returncode != 0 and not (moved / "model").exists()
    saved = steps(run_states(moved / "checkpoints"))
    resumed = ok(run_stage("pretrain.py", args(moved), work, launcher=one_core))
    # the same run (runtime.workers is output-neutral and null in both), continued on 1 worker
    assert saved and "resuming at" in resumed.stderr and "1 process(es)" in resumed.stderr
    want, got = outputs(whole), outputs(moved)
    assert "model/model.safetensors" in want and "curves/steps.csv" in want
    assert sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k)) == []


def test_runtime_workers_1_trains_in_the_stage_process_itself(tmp_path, inputs):
    work = tmp_path / "work"
    write_params(work, [*PRETRAIN, "training.epochs=1", "runtime.workers=1"])
    out = tmp_path / "out"
    proc = ok(run_stage("pretrain.py", pretrain_args(inputs, out), work))
    assert "twilbert.pipeline.workers" not in proc.stderr and "1 process(es)" in proc.stderr
    trainer = json.loads((run_states(out / "checkpoints") / "step-00000014" / "trainer.json").read_text())
    assert trainer["world_size"] == 1


def test_bad_input_under_two_workers_is_one_error_line_and_exit_2(tmp_path, inputs):
    bad = tmp_path / "bad"
    (bad / "pairs").mkdir(parents=True)
    for split in ("train", "heldout"):
        (bad / "pairs" / split).symlink_to(inputs / "pairs" / split)
    (bad / "pairs" / "manifest.json").write_text('{"format": \n')  # truncated: read by each worker
    (bad / "vocab").symlink_to(inputs / "vocab")
    work = tmp_path / "work"
    write_params(work, [*PRETRAIN, "runtime.workers=2"])
    proc = run_stage("pretrain.py", pretrain_args(bad, tmp_path / "out"), work)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr and "[rank" not in proc.stderr
    [line] = [x for x in (proc.stdout + proc.stderr).splitlines() if "error" in x.lower()]
    assert line.startswith("error: ") and "manifest.json: line 2: not valid JSON" in line
    assert not (tmp_path / "out" / "model").exists()


# --------------------------------------------------------------------------------------------
# Kills: no orphan worker, and the next run resumes
# --------------------------------------------------------------------------------------------


def stage_workers(launcher: int) -> list[int]:
    """PIDs of the processes whose environment names ``launcher`` as their launcher."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"{WORKER_OF_ENV}={launcher}".encode() in env:
                found.append(int(entry.name))
    return found


def environ_of(pid: int) -> dict[str, str]:
    pairs = (Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0"))
    return dict(p.split("=", 1) for p in pairs if "=" in p)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_killing_the_stage_leaves_no_worker_and_the_next_run_resumes(tmp_path, inputs, sig):
    work = tmp_path / "work"
    write_params(work, [*PRETRAIN, "training.epochs=12", "training.checkpoint_every=2", "runtime.workers=2"])
    out = tmp_path / "out"
    # Started without the numerics pins: the stage restarts itself with them, and its workers inherit them
    env = {k: v for k, v in os.environ.items() if k not in {*PORTABLE_ENV, PINNED_BY_LAUNCHER, "OMP_NUM_THREADS"}}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", CI="1")
    cmd = [sys.executable, str(REPO / "stages" / "pretrain.py"), *map(str, pretrain_args(inputs, out))]
    with open(tmp_path / "stderr.log", "w") as log:
        stage = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    pids: list[int] = []
    checkpoints: list[Path] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and stage.poll() is None:
            pids = stage_workers(stage.pid)
            checkpoints = list(out.glob("checkpoints/run-*/train_state/step-*"))
            if len(pids) == 2 and checkpoints:
                break
            time.sleep(0.05)
        assert stage.poll() is None and len(pids) == 2 and checkpoints, (tmp_path / "stderr.log").read_text()[-3000:]
        for pid in pids:  # the pins reached each worker's environment before its torch loaded
            env_seen = environ_of(pid)
            assert {k: env_seen.get(k) for k in PORTABLE_ENV} == dict(PORTABLE_ENV)
            assert env_seen["OMP_NUM_THREADS"] == "1"
        stage.send_signal(sig)
        status = stage.wait(timeout=60)
        deadline = time.monotonic() + 10  # PR_SET_PDEATHSIG at once, the watchdog within a second
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], f"workers survived {sig.name} of the stage"
        assert status == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
    finally:
        stage.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "stderr.log").read_text()
    assert log.count("restarting with ATEN_CPU_CAPABILITY=avx2") == 1  # the launcher's; no worker restarted
    assert "torch/distributed/elastic" not in log and "[rank" not in log  # no agent line, no rank's traceback
    if sig == signal.SIGINT:  # rank 0's one line; the agent passed the Ctrl-C on to the workers
        assert log.count("interrupted: pretrain stopped (Ctrl-C)") == 1 and "Traceback" not in log
    assert not (out / "model").exists()
    if sig == signal.SIGKILL:  # once is enough for the resume: the slow part
        saved = steps(run_states(out / "checkpoints"))
        resumed = ok(run_stage("pretrain.py", pretrain_args(inputs, out), work))
        assert saved and "resuming at" in resumed.stderr and (out / "model" / "model.safetensors").is_file()
