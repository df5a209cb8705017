"""``runtime.threads``: torch's intra-op threads, by default the cores shared among concurrent DVC jobs.

Under ``dvc queue start -j N`` each torch process taking all cores would put N times too many threads
on them. DVC passes no job count to a stage, so it is read from the process table (psutil): the live
``dvc exp queue-worker`` processes of this repository's queue; outside a queue worker a stage is the only job."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)

QUEUE_WORKER_ARGS = ("exp", "queue-worker")


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, which container limits narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _queue_node(proc: "psutil.Process") -> Optional[str]:
    """The node name of a ``dvc exp queue-worker <node>`` process (``dvc-exp-<repo hash>-<n>@localhost``)."""
    import psutil

    try:
        args = proc.cmdline()
    except psutil.Error:
        return None
    for i in range(len(args) - 2):
        if tuple(args[i:i + 2]) == QUEUE_WORKER_ARGS:
            return args[i + 2]
    return None


def own_queue_node() -> Optional[str]:
    """The node name of the queue worker this process runs under, if any."""
    try:
        import psutil  # a DVC queue worker has it (dvc depends on it); a bare image may not: no queue there
    except ImportError:
        return None
    try:
        ancestors = psutil.Process().parents()
    except psutil.Error:
        return None
    return next((node for p in ancestors if (node := _queue_node(p)) is not None), None)


def concurrent_jobs() -> int:
    """DVC jobs running now: the live workers of this process's queue (``-j N`` starts N; they
    share a node-name prefix, the hash of the repository), or 1 outside a queue."""
    node = own_queue_node()
    if node is None:
        return 1
    prefix = node.rsplit("-", 1)[0] + "-"
    import psutil

    nodes = (_queue_node(p) for p in psutil.process_iter())
    return max(1, sum(1 for n in nodes if n is not None and n.startswith(prefix)))


def auto_threads(base: int, jobs: int, local_ranks: int = 1) -> int:
    """``base`` threads divided among the jobs (and, under torchrun, among a job's ranks); at least 1."""
    return max(1, base // max(1, jobs * local_ranks))


def apply_threads(threads: Optional[int], portable: bool = False) -> Optional[int]:
    """Set torch's intra-op threads: ``threads`` when > 0; under portable numerics 1 otherwise (the
    count is part of the numerics, so neither OMP_NUM_THREADS nor the queue changes it); else (null or
    0, auto) torch's own default (one per physical core) divided among the concurrent jobs, left alone
    outside a queue and when OMP_NUM_THREADS is set. Returns the count set, if any.

    Only in processes that use torch (already imported): the data and vocab stages do not.
    """
    if "torch" not in sys.modules:
        return None
    import torch

    from twilbert.numerics import threads as portable_threads

    pinned = portable_threads(portable, threads)
    if pinned:
        n, how = pinned, "runtime.portable_numerics" if not threads else "runtime.threads"
    elif threads:
        n, how = threads, "runtime.threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        return None  # the user's (or the test runner's) explicit choice stands
    else:
        jobs, ranks = concurrent_jobs(), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        if jobs * ranks == 1:
            return None  # the only job: torch's default
        base = min(torch.get_num_threads(), cpu_cores())
        n = auto_threads(base, jobs, ranks)
        how = f"auto: {base} threads / ({jobs} DVC job(s) x {ranks} rank(s))"
    torch.set_num_threads(n)
    log.info("torch intra-op threads: %d (%s)", n, how)
    return n
