"""``runtime.workers``: a training stage under portable numerics uses the machine's cores as workers.

Portable numerics fix torch at one intra-op thread (thread count changes the sums' bits), which leaves
all but one core idle. The training math cuts each global batch into K micro-batches
(``training.micro_batches``, ``finetuning.micro_batches``) whose gradients are combined in a fixed
order, so 1..K processes give the same bytes; the stage therefore runs as ``min(cores, K)`` workers of
one thread each. They are started the way ``torchrun --standalone`` starts them (torch's elastic agent,
in this process, rendezvous on a free local port), so a worker is exactly a rank under ``torchrun``:
rank 0 alone logs, tracks and writes. This process only waits for them, then exits with their status:

- one copy of the log: rank 0 writes to the stage's stdout and stderr, the other ranks to files in
  a temporary folder (read only when one of them fails first, for its one ``error:`` line);
- a failure prints one line, the failing rank's own ``error:`` line (no torchrun banner), and exits
  with that rank's status (2 for bad input);
- a worker dies with this process (``lifeline.WORKER_OF_ENV``); SIGTERM and SIGINT here stop the
  workers first (torch's agent forwards them).

``runtime.workers: 1`` keeps one in-process worker (no launch at all); ``N`` forces N. A GPU device
never gets CPU workers: several GPUs are ``torchrun --nproc_per_node N``'s job. Under ``torchrun`` (its
variables set) nothing is re-launched.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from twilbert.config import ConfigError
from twilbert.pipeline.lifeline import WORKER_OF_ENV
from twilbert.pipeline.runtime import concurrent_jobs, cpu_cores

if TYPE_CHECKING:
    from twilbert.config import RuntimeConfig

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
# time.time() of the launch, in the workers' environment: rank 0 logs what starting them cost
LAUNCHED_AT_ENV = "TWILBERT_WORKERS_LAUNCHED_AT"
ERROR_PREFIX = "error:"  # how pipeline.stage.run prints an expected failure
TAIL_LINES = 40  # of a failing rank's stderr when it has no error: line (a bug's traceback)


def under_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is already a rank (torchrun's or our own launch's)."""
    return any(key in environ for key in TORCHRUN_ENV)


def available_cores() -> int:
    """The cores this stage may use: its CPU affinity shared among the live DVC queue jobs (as
    ``runtime.threads``' auto value divides them)."""
    return max(1, cpu_cores() // concurrent_jobs())


def _on_gpu(device: str) -> bool:
    from twilbert.device import resolve_device  # torch: the training stages have it loaded already

    return resolve_device(device).type != "cpu"


def worker_count(runtime: "RuntimeConfig", micro_batches: int, device: str, where: str,
                 cores: Optional[int] = None, environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """How many worker processes the stage runs, and why (for its log).

    ``where`` is the config section holding ``device`` (``training``, ``finetuning``). Auto (null or 0)
    is ``min(cores, micro_batches)`` under portable numerics on the CPU, else 1.
    """
    if under_torchrun(environ):
        return 1, "already a torchrun rank"
    workers = runtime.workers or 0
    if workers > 1 and _on_gpu(device):
        raise ConfigError(f"runtime.workers={workers} starts CPU worker processes, but {where}.device={device} "
                          f"does not train on the CPU: set runtime.workers to null or 1, and for several GPUs run "
                          f"`torchrun --nproc_per_node N stages/<stage>.py`")
    if workers:
        return workers, f"runtime.workers={workers}"
    if not runtime.portable_numerics:
        return 1, "runtime.portable_numerics is false: one process with the host's threads"
    if _on_gpu(device):
        return 1, f"{where}.device={device} is a GPU"
    cores = available_cores() if cores is None else cores
    n = max(1, min(cores, micro_batches))
    return n, f"auto: min({cores} core(s), {where}.micro_batches={micro_batches})"


def worker_threads(runtime: "RuntimeConfig", workers: int, cores: int) -> int:
    """Intra-op threads of each worker: ``runtime.threads``, else 1 under portable numerics (the
    numerics fix it), else the cores shared among the workers."""
    if runtime.threads:
        return runtime.threads
    if runtime.portable_numerics:
        return 1
    return max(1, cores // workers)


def launch_workers(runtime: "RuntimeConfig", micro_batches: int, device: str, where: str) -> None:
    """In a stage process: when more than one worker is wanted, run this stage as that many workers
    and exit with their status (it does not return then); else return and train in this process.

    A test runner calling a stage's ``main`` in its own process never launches (``stage.is_stage_process``)."""
    from twilbert.pipeline.stage import is_stage_process, stage_name

    if not is_stage_process():
        return
    n, why = worker_count(runtime, micro_batches, device, where)
    if n <= 1:
        return
    threads = worker_threads(runtime, n, available_cores())
    log.info("%s: %d workers (%s), %d intra-op thread(s) each; rank 0 logs and writes", stage_name(), n, why,
             threads)
    raise SystemExit(run_workers(n, threads))


def run_workers(n: int, threads: int, argv: Optional[list[str]] = None) -> int:
    """Run ``argv`` (this process's command line) as ``n`` ranks of a standalone torchrun job on this
    host; returns the exit status to end with: 0, the failing rank's, or 128 + a signal's number."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    args = list(argv if argv is not None else getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:])
    # Inherited by the workers (the agent copies this environment): the numerics pins are already here
    # (numerics.pin ran before), so each worker's torch loads the pinned kernels at import.
    os.environ.update({"OMP_NUM_THREADS": str(threads), WORKER_OF_ENV: str(os.getpid()),
                       LAUNCHED_AT_ENV: f"{time.time():.3f}"})
    # The agent's INFO lines and its failure report would repeat what rank 0 says; our line replaces them.
    # (torch sets a level on each of its elastic modules' loggers, so each is quieted)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with tempfile.TemporaryDirectory(prefix="twilbert-workers-") as logs:
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
            rdzv_endpoint="localhost:0", max_restarts=0,  # as `torchrun --standalone`; a failure is final
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects={r: Std.ALL for r in range(1, n)}),
        )
        try:
            elastic_launch(config, sys.executable)(*args)
        except ChildFailedError as err:
            return _report_failure(err.failures, Path(logs))
        except SignalException as err:  # the agent has stopped the workers
            return 128 + int(err.sigval)
    return 0


def _status(exitcode: int) -> int:
    """A shell's exit status for a child's: 128 + N for a child killed by signal N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _report_failure(failures: Mapping[int, object], logs: Path) -> int:
    """The failure to report: a rank that ended by itself (the agent then stops the others with SIGTERM,
    and lists them too), rank 0 first. Rank 0 has printed its own lines on the stage's stderr; another
    rank's ``error:`` line (or, for a bug, its traceback) is read from its file."""
    own = sorted(rank for rank, f in failures.items() if f.exitcode > 0)
    rank = own[0] if own else min(failures)
    failure = failures[rank]
    if rank == 0:
        return _status(failure.exitcode)
    found = list(logs.glob(f"*/attempt_*/{failure.local_rank}/stderr.log"))
    lines = found[0].read_text(errors="replace").splitlines() if found else []
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    if errors:
        print(errors[0], file=sys.stderr)
    elif lines:
        print("\n".join(lines[-TAIL_LINES:]), file=sys.stderr)
    else:
        code = failure.exitcode
        why = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        print(f"error: worker rank {rank} of this stage ended with {why} and printed nothing", file=sys.stderr)
    return _status(failure.exitcode)


def log_startup(is_main: bool, world_size: int) -> None:
    """On rank 0 of launched workers: how long starting them took (torch import, process group)."""
    launched = os.environ.get(LAUNCHED_AT_ENV)
    if launched and is_main:
        log.info("%d workers ready %.1f s after their launch (interpreter and torch import, gloo process group)",
                 world_size, time.time() - float(launched))
