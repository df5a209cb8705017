"""``runtime.portable_numerics``: the same output bytes on any x86-64 CPU with AVX2 (on by default).

AVX2, AVX-512 and AMX hosts run different kernels for the same op, and those round differently: a
fresh clone on an AVX-512 EPYC gave test MF1 38.77 where the AVX2 host that made the table gave 34.63.
Pinned here: ATen's vectorized kernels (softmax, GELU and their gradients), oneDNN's instruction set,
MKL's code path (conditional numerical reproducibility) and torch's intra-op threads, since reductions
split by thread. The first three are read when torch loads its kernels, so they must be in the
environment before torch is imported: ``stages/py`` exports them, and ``pin`` re-executes a process
that imported torch under other values. GPUs are not covered: bits differ between cards.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, Optional

log = logging.getLogger(__name__)

# Checked byte for byte across an AVX2-only and an AVX-512 EPYC (issue 18); tests/test_numerics.py
# simulates a second CPU type by forcing the host's ATen capability both ways.
PORTABLE_ENV: Mapping[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    # MKL may otherwise run fewer threads than asked when the cores are busy, which changes its sums
    "MKL_DYNAMIC": "FALSE",
    # libgomp's OMP_DYNAMIC=TRUE sizes thread teams by the load average: with >1 thread, the one way found
    # for load to change the bytes (scripts/thread_determinism.py); no effect at 1 thread
    "OMP_DYNAMIC": "FALSE",
}
# Results differ between 1 and 2 intra-op threads (ATen splits its sums by thread; MKL_CBWR=AVX2,STRICT
# changes nothing: the same 20 steps, other bytes), so the count is part of the numerics, and of a run's
# identity (runtime.*). A fixed count is bit-exact on a busy machine too: with 2 threads and load
# average 8-10 on 2 cores, fresh training processes gave one weight hash and every op of the step one
# result over 20 repeats (scripts/thread_determinism.py, docs/pipeline.md). The resume test that
# "differed under load with 2" (6f78427) compared stages pinned to 2 threads with a last rerun inside
# the pytest process (until e88c43a), which conftest.py gave 1 thread in a pytest-xdist worker
# (`make test`, the loaded machine) and torch's default (one per core: 2) alone: the thread count
# differed, not the load (`--part history`). 1 stays: the committed results were made with it (2 passive
# threads ran an epoch 1.3x faster). More per worker (runtime.threads) stay bit-exact; on shared cores add
# OMP_WAIT_POLICY=PASSIVE (same bytes), as libgomp's spinning barriers made 2 threads 13x slower than 1
# under load. The one way found for load to change bits: OMP_DYNAMIC=TRUE (teams sized by the load
# average: a third hash), pinned off above. 1 thread also leaves the other cores to the stage's own
# workers (runtime.workers), which give the same bytes.
PORTABLE_THREADS = 1
# Set by stages/py beside PORTABLE_ENV: the launcher, not the user, put those values there.
PINNED_BY_LAUNCHER = "TWILBERT_PINNED_NUMERICS"
# The CLI has no params.yaml of its own: set to 0 to let its model tools use the host's fastest kernels.
CLI_SWITCH = "TWILBERT_PORTABLE_NUMERICS"


def wanted_env(portable: bool, environ: Mapping[str, str]) -> dict[str, Optional[str]]:
    """The environment changes that make ``environ`` match the setting (None: remove the variable).

    Portable: the pinned values, whatever the user's shell says. Not portable: the launcher's pins are
    taken away again, so that torch picks the host's best kernels; a user's own values stay.
    """
    if portable:
        changes: dict[str, Optional[str]] = {k: v for k, v in PORTABLE_ENV.items() if environ.get(k) != v}
        if environ.get(PINNED_BY_LAUNCHER) != "1":
            changes[PINNED_BY_LAUNCHER] = "1"
        return changes
    if environ.get(PINNED_BY_LAUNCHER) != "1":
        return {}
    changes = {k: None for k, v in PORTABLE_ENV.items() if environ.get(k) == v}
    changes[PINNED_BY_LAUNCHER] = None
    return changes


def pin(portable: bool) -> None:
    """Bring this process's numerics in line with ``portable``.

    Before torch is imported, setting the environment is enough. After, the kernels are already
    chosen: the process re-executes itself once with the new environment (same PID, so DVC, torchrun
    and the kill handling see no change). ``PINNED_BY_LAUNCHER`` in the new environment ends the loop.
    """
    changes = wanted_env(portable, os.environ)
    if not changes:
        return
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if "torch" not in sys.modules:
        return
    if not {k for k in changes if k != PINNED_BY_LAUNCHER}:
        return  # only the marker was missing: the kernels already match
    log.info("runtime.portable_numerics=%s: restarting with %s so that torch loads matching kernels",
             str(portable).lower(), ", ".join(f"{k}={v}" for k, v in changes.items() if k != PINNED_BY_LAUNCHER))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])))


def pin_cli() -> None:
    """The ``twilbert`` command's model tools: portable unless ``TWILBERT_PORTABLE_NUMERICS=0``.

    The thread count goes through OMP_NUM_THREADS, which torch reads when it loads."""
    portable = os.environ.get(CLI_SWITCH, "1") != "0"
    if portable and "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(PORTABLE_THREADS)
    pin(portable)


def threads(portable: bool, configured: Optional[int]) -> Optional[int]:
    """The intra-op thread count portable numerics fix (``runtime.threads`` or 1); None when not portable."""
    if not portable:
        return None
    return configured or PORTABLE_THREADS


def describe(portable: bool) -> str:
    """One line for the results table's header and the logs: what the numbers were computed with.

    Portable runs say only the pinned settings, never the host, so that the bytes match on every CPU.
    """
    if portable:
        return (f"portable CPU numerics (ATen {PORTABLE_ENV['ATEN_CPU_CAPABILITY']}, oneDNN "
                f"{PORTABLE_ENV['ONEDNN_MAX_CPU_ISA']}, MKL CBWR {PORTABLE_ENV['MKL_CBWR']}, "
                f"{PORTABLE_THREADS} thread{'s' if PORTABLE_THREADS > 1 else ''} unless runtime.threads says otherwise)")
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return f"this host's fastest CPU kernels (ATen {capability}; runtime.portable_numerics is false)"
