"""runtime.threads: torch's intra-op threads, and the default sharing the cores among concurrent DVC jobs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO
from twilbert.pipeline.runtime import apply_threads, auto_threads, concurrent_jobs
from twilbert.pipeline.stage import load_stage_config


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_runtime_threads_sets_torch_intra_op_threads(restore_threads, monkeypatch):
    monkeypatch.chdir(REPO)
    load_stage_config(["runtime.threads=3"])
    assert torch.get_num_threads() == 3


def test_auto_divides_the_threads_among_jobs_and_ranks():
    assert auto_threads(16, 1) == 16
    assert auto_threads(16, 4) == 4
    assert auto_threads(16, 3) == 5
    assert auto_threads(16, 2, local_ranks=4) == 2
    assert auto_threads(2, 8) == 1  # never 0


def test_auto_leaves_an_explicit_omp_num_threads_alone(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    assert apply_threads(None) is None and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert concurrent_jobs() == 1 and apply_threads(0) is None  # the only job: torch's default stays
    assert torch.get_num_threads() == 2


# A stand-in for `dvc exp queue-worker <node>` (what `dvc queue start -j N` runs N of): only its
# command line matters. The first one runs a "stage" that reports the jobs it counts.
WORKER = ("import subprocess, sys, time\nif sys.argv[-1] == 'report':\n"
          "    subprocess.run(sys.argv[1:2] + ['-c', {stage!r}])\nelse:\n    time.sleep(60)\n")
STAGE = "from twilbert.pipeline.runtime import concurrent_jobs; print(concurrent_jobs())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_concurrent_jobs_counts_the_live_queue_workers():
    code = WORKER.format(stage=STAGE)
    idle = [subprocess.Popen([sys.executable, "-c", code, "exp", "queue-worker", f"dvc-exp-t3st00-{i}@localhost", "idle"])
            for i in (2, 3)]
    other_queue = subprocess.Popen([sys.executable, "-c", code, "exp", "queue-worker", "dvc-exp-0ther0-1@localhost",
                                    "idle"])  # another repository's queue: not this job's
    idle.append(other_queue)
    try:
        time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", code, sys.executable, "exp", "queue-worker",
                              "dvc-exp-t3st00-1@localhost", "report"], capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
        assert out.stdout.strip() == "3", out.stderr[-2000:]
    finally:
        for proc in idle:
            proc.kill()
            proc.wait()
    assert concurrent_jobs() == 1  # this test process runs under no queue worker
