"""What every stage script shares: arguments, config loading, logging, user-facing errors.

Under DVC a stage reads the composed ``params.yaml`` (so ``dvc exp run -S`` values apply). Run
by hand, extra ``key=value`` arguments are Hydra overrides: the stage composes ``conf/`` with them,
e.g. ``python stages/pretrain.py model.n_encoders=4``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from twilbert.config import Config, ConfigError, compose, load_config, read_yaml
from twilbert.config.strict import flatten
from twilbert.numerics import pin
from twilbert.pipeline.lifeline import WORKER_OF_ENV
from twilbert.pipeline.runtime import apply_threads
from twilbert.progress import format_duration

log = logging.getLogger("twilbert")

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
# Test hook: SIGKILL the stage right after the checkpoint of this micro-step is saved, the way a
# crash or an OOM kill would stop it (tests/test_resume.py, tests/e2e). Never set it otherwise.
KILL_HOOK_ENV = "TWILBERT_TEST_KILL_AT_MICRO_STEP"
# True once ``run`` is given the ``main`` of a script run as a program: only such a process is a stage,
# which ``numerics.pin`` may re-execute (never a test runner that calls ``run`` or ``load_stage_config``).
_STAGE_PROCESS = False
# The config the stage loaded, if any: a failing stage marks its experiment's MLflow parent FAILED.
_LOADED: Optional[tuple[Config, dict]] = None


def setup_logging() -> None:
    """INFO on rank 0; the other ranks (torchrun's, or the stage's own workers) say only warnings and
    errors, so that the stage log is one copy, not one per rank."""
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if not rank.isdigit() or int(rank) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_args(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """Known ``--flags`` for paths; the rest must be Hydra ``key=value`` overrides."""
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like model.n_encoders=4)")
    return args, rest


def load_stage_config(overrides: list[str], params: str = PARAMS_FILE) -> tuple[Config, dict]:
    """The validated config and its raw dict (for MLflow params)."""
    if overrides:
        raw = compose(overrides, CONF_DIR)
    else:
        path = Path(params)
        if not path.is_file():
            raise ConfigError(f"{path}: not found; run `make params` (or pass Hydra overrides) first")
        raw = read_yaml(path) or {}
    cfg = load_config(raw)
    global _LOADED
    _LOADED = (cfg, raw)
    if _STAGE_PROCESS:  # a test calling this in its own process must not be re-executed
        pin(cfg.runtime.portable_numerics)
        # after pin, which may re-execute the process: the stage's first line, once (a launched
        # worker's launcher has said it)
        if WORKER_OF_ENV not in os.environ:
            log.info("%s: %s", stage_name(), describe_changes(raw, overrides))
    apply_threads(cfg.runtime.threads, cfg.runtime.portable_numerics)
    return cfg, raw


MAX_CHANGES_SHOWN = 12


def param_changes(raw: dict, conf_dir: Path = Path(CONF_DIR)) -> Optional[list[str]]:
    """``key=value (conf/: default)`` for each param of ``raw`` that differs from ``conf/``'s
    composition (an experiment's ``-S`` overrides, a hand edit of params.yaml); None without ``conf/``."""
    from twilbert.config.plain_compose import DERIVED_KEY, compose_plain

    if not (conf_dir / "config.yaml").is_file():
        return None
    try:
        base = flatten(compose_plain([], conf_dir))
    except (ConfigError, OSError, ValueError):
        return None
    ours = flatten(raw)
    changed = []
    for key in sorted(set(ours) | set(base)):
        if key.split(".", 1)[0] == DERIVED_KEY or ours.get(key, "<none>") == base.get(key, "<none>"):
            continue
        changed.append(f"{key}={ours.get(key, '<none>')!s:.60} (conf/: {base.get(key, '<none>')!s:.40})")
    return changed


def describe_changes(raw: dict, overrides: list[str]) -> str:
    """The stage's first log line: what this run changes against ``conf/``, so that an experiment's
    log confirms its change (a change that leaves the model's size alone prints nothing else)."""
    changed = param_changes(raw)
    if changed is None:
        return "params: " + (" ".join(overrides) if overrides else PARAMS_FILE)
    if not changed:
        return "params: conf/'s composition, unchanged"
    shown = ", ".join(changed[:MAX_CHANGES_SHOWN])
    more = f", and {len(changed) - MAX_CHANGES_SHOWN} more" if len(changed) > MAX_CHANGES_SHOWN else ""
    return f"params that differ from conf/: {shown}{more}"


class KillAtMicroStep:
    """A training-loop callback (``train.loop.Callback``) that SIGKILLs this process, no cleanup."""

    def __init__(self, micro_step: int):
        self.micro_step = micro_step

    def on_checkpoint(self, trainer, path) -> None:
        if trainer.state.micro_steps == self.micro_step:
            log.warning("%s=%s: killing this process (test hook)", KILL_HOOK_ENV, self.micro_step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def fault_callbacks() -> list:
    """The training-loop callbacks the test hooks in the environment ask for (none in production)."""
    wanted = os.environ.get(KILL_HOOK_ENV)
    return [KillAtMicroStep(int(wanted))] if wanted else []


def is_stage_process() -> bool:
    """Whether this process runs a stage script as its program (not a test calling its ``main``)."""
    return _STAGE_PROCESS


def stage_name() -> str:
    """DVC's name for the running stage (``finetune@tass_default``), else the script's."""
    return os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem


def _mark_failed() -> None:
    if _STAGE_PROCESS and _LOADED is not None:
        from twilbert.tracking.runs import mark_failed

        mark_failed(_LOADED[0].tracking, _LOADED[1])


def run(main: Callable[[], Optional[str]]) -> None:
    """Run a stage; expected failures print one ``error:`` line (no traceback) and exit with status 2.

    Unexpected errors (bugs) keep their traceback. ``main`` returns the stage's one-line summary
    (None on the ranks that do not write); it ends the log as ``<stage>: done in <time>: <summary>``.
    """
    global _STAGE_PROCESS
    _STAGE_PROCESS = getattr(main, "__module__", None) == "__main__"
    setup_logging()
    start = time.monotonic()
    from twilbert.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, interrupted_line, user_message
    from twilbert.pipeline.lifeline import die_with_launcher

    die_with_launcher()  # under DVC: no orphan keeps writing after `dvc repro` is killed

    try:
        summary = main()
    except KeyboardInterrupt:
        print(interrupted_line(stage_name()), file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        _mark_failed()
        message = user_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if summary:
        log.info("%s: done in %s: %s", stage_name(), format_duration(time.monotonic() - start), summary)
