"""A pinned intra-op thread count is part of the numerics and nothing else is: fresh processes with the
same count train to the same weights, another count to other weights (scripts/thread_determinism.py
probes the same under load; docs/pipeline.md "Threads and load")."""

from __future__ import annotations

import importlib.util

from helpers import REPO

spec = importlib.util.spec_from_file_location("thread_determinism", REPO / "scripts" / "thread_determinism.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def train_hash(threads: int) -> str:
    # passive waiting: with active spinning 2 threads crawl on cores that other jobs share (same bytes)
    env = {**probe.child_env(), "OMP_WAIT_POLICY": "PASSIVE"}
    return probe.run_child(["--child", "train", "--threads", str(threads)], env)["weights"]


def test_a_pinned_thread_count_trains_the_same_weights_in_fresh_processes_and_another_count_other_ones():
    two = {train_hash(2) for _ in range(2)}
    assert len(two) == 1
    assert train_hash(1) not in two
