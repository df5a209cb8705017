"""MLflow tracking: where the store is, how runs are grouped, what is logged, and what happens when it fails.

- The store is ``sqlite:///<repo root>/mlflow.db`` (absolute) unless ``MLFLOW_TRACKING_URI`` or
  ``tracking.uri`` says otherwise. Inside a queued DVC experiment the working directory is a copy
  under ``<repo>/.dvc/tmp/exps/``; the root is resolved past it, so runs land in the real store.
- Runs of one DVC experiment share a parent run named after it (``DVC_EXP_NAME``, which ``dvc exp
  run`` sets for every stage it runs, ``-n NAME`` or DVC's random name; ``workspace`` under plain
  ``dvc repro``), tagged with it and the baseline git commit. The parent is the unit of comparison:
  it carries every resolved param (``experiment_params``) and the headline metrics of every stage
  (``log_experiment_metrics``), so two parents selected in the UI's compare view show what changed
  and what it did. A change of params in the same workspace at the same commit opens a new parent
  (the params' digest is part of its identity): MLflow params cannot change once logged.
- Child runs are named ``<stage run>@<experiment>`` (``finetune-tass_default@enc4``).
- The MLflow experiment is tagged as a model-training experiment (``mlflow.experimentKind``), so the
  UI opens on its runs table, not on GenAI traces.
- Params are the flattened config in dotted keys, within MLflow's limits (value and key lengths,
  100 params per call).
- Tracking never kills training: before training the store is probed within ``tracking.timeout``
  seconds; if it cannot be reached the stage either stops at once (``tracking.on_unreachable:
  fail``) or logs to the local SQLite store (``fallback``). During training a failing MLflow call
  is reported once and tracking is switched off for the rest of the run; the stage's metrics files
  and model are written regardless. HTTP calls are bounded (MLflow's defaults retry for minutes).
- Parallel runs (``dvc queue start -j N``) share one SQLite store: its creation and the
  experiment/parent-run lookup are serialized by a file lock, and a call that meets
  'database is locked' is retried with backoff.
- Under torchrun only rank 0 tracks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from twilbert.config import ConfigError, TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (tests pin the two equal)
MAX_KEY_CHARS = 250  # MAX_ENTITY_KEY_LENGTH
PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by MLflow 3's UI to pick the experiment's first page
EXPERIMENT_KIND = "custom_model_development"  # model training: the runs table, not GenAI traces
EXP_TMP_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
LOCK_WAIT_S = 120.0  # longest wait for another process to finish creating the SQLite store


class TrackingUnavailableError(ConfigError):
    """The tracking store cannot be reached and ``tracking.on_unreachable`` is ``fail``."""


def repo_root(start: Optional[Path] = None) -> Path:
    """The project root, past a DVC queued-experiment copy under ``.dvc/tmp/exps/``."""
    here = str(Path(start or Path.cwd()).resolve())
    if EXP_TMP_MARKER in here + os.sep:
        return Path((here + os.sep).split(EXP_TMP_MARKER)[0])
    path = Path(here)
    for candidate in (path, *path.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".dvc").is_dir():
            return candidate
    return path


def local_store_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def tracking_uri(cfg: TrackingConfig, root: Optional[Path] = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if uri:
        return uri
    return local_store_uri(root or repo_root())


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'model.n_encoders': '12', ...}, keys and values within MLflow's limits."""
    out: dict[str, str] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        text = str(tree)
        out[param_key(prefix)] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return out


def param_key(key: str) -> str:
    """A key MLflow accepts: characters outside its set become '_'; an over-long key keeps its
    start and a digest of the whole (two long keys never collide)."""
    key = re.sub(r"[^\w./\- :]", "_", key)
    if len(key) <= MAX_KEY_CHARS:
        return key
    digest = sha256(key.encode()).hexdigest()[:12]
    return f"{key[: MAX_KEY_CHARS - 13]}~{digest}"


def params_digest(flat: Mapping[str, str]) -> str:
    return sha256(json.dumps(sorted(flat.items())).encode()).hexdigest()[:16]


def git_commit(root: Path) -> str:
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_experiment_name() -> str:
    return os.environ.get("DVC_EXP_NAME") or "workspace"


# --------------------------------------------------------------------------------------------
# Reachability, bounded calls, retries
# --------------------------------------------------------------------------------------------


def redact(uri: str) -> str:
    """The URI without credentials, for messages."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def probe_store(uri: str, timeout: float) -> Optional[str]:
    """None when the store answers within ``timeout`` seconds, else what went wrong."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme == "sqlite":
        return _probe_sqlite(uri, timeout)
    if scheme in ("", "file"):
        return _probe_directory(Path(parts.path if scheme else uri))
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError as err:
        return f"invalid port: {err}"
    if not parts.hostname or port is None:
        return None  # e.g. databricks: left to MLflow
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"cannot connect to {parts.hostname}:{port} within {timeout:g}s ({err})"
    if scheme in ("http", "https"):
        return _probe_http(uri, timeout)
    return None


def _probe_http(uri: str, timeout: float) -> Optional[str]:
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # a server answered (401, 404 behind a proxy...): reachable
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            return None  # it speaks TLS; certificate policy is MLflow's business
        return f"no HTTP answer within {timeout:g}s ({err.reason})"
    except (OSError, ValueError) as err:
        return f"no HTTP answer within {timeout:g}s ({err})"
    return None


def _sqlite_path(uri: str) -> Optional[Path]:
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def _probe_sqlite(uri: str, timeout: float) -> Optional[str]:
    path = _sqlite_path(uri)
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=timeout)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            try:  # a write that changes nothing: a read-only store fails here, before training, not mid-run
                conn.execute(f"PRAGMA user_version = {int(version)}")
            except sqlite3.OperationalError as err:
                if "readonly" in str(err):
                    raise
                # 'database is locked': another stage is writing; that store is reachable
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as err:
        return f"cannot open {path} ({err})"
    return None


def _probe_directory(path: Path) -> Optional[str]:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create {path} ({err})"
    return None if os.access(path, os.W_OK) else f"{path} is not writable"


def is_locked_error(err: BaseException) -> bool:
    """SQLite's 'database is locked' anywhere in the exception chain (MLflow wraps it twice)."""
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if "database is locked" in str(current) or "database table is locked" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (``raise ... from`` or raised while handling)."""
    seen: set[int] = set()
    while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return err


def quiet_store_logs() -> None:
    """Keep MLflow's and SQLAlchemy's own logging of a failing store (a traceback of ~100 lines at
    ERROR) out of the stage's output: the tracker reports a failure once, in one line."""
    for name, level in (("mlflow", logging.WARNING), ("mlflow.store", logging.CRITICAL),
                        ("alembic", logging.WARNING), ("sqlalchemy", logging.CRITICAL)):
        logging.getLogger(name).setLevel(level)


@contextmanager
def bounded_http(cfg: TrackingConfig) -> Iterator[None]:
    """MLflow's HTTP retries and timeout cut to the config's, unless the user set them in the environment."""
    limits = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(cfg.timeout))),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    added = [k for k in limits if k not in os.environ]
    os.environ.update({k: limits[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialize the creation of one SQLite store across processes (MLflow's schema migration races)."""
    path = _sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the retries remain
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None:
        yield
        return
    key = sha256(str(path.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"twilbert-mlflow-{key}.lock"
    with open(lock_path, "a") as fh:
        deadline = time.monotonic() + LOCK_WAIT_S
        locked = False
        while not locked:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("MLflow: %s still locked after %.0fs; going on without the lock",
                                lock_path, LOCK_WAIT_S)
                    break
                time.sleep(0.05)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------


class Tracker:
    """A thin, failure-tolerant front of MLflow for the training stages."""

    def __init__(self, cfg: TrackingConfig, stage: str, enabled: bool = True):
        self.cfg, self.stage = cfg, stage
        # Under torchrun only rank 0 tracks; RANK is readable before the process group exists.
        self.enabled = enabled and int(os.environ.get("RANK", "0") or 0) == 0
        self.run_id: Optional[str] = None
        self.parent_run_id: Optional[str] = None
        self.uri: Optional[str] = None
        self._client: Any = None
        self._failed = False
        self._backoff = random.Random()  # never the global RNG: logging must not move training's streams

    @contextmanager
    def start(self, params: Mapping[str, Any], run_name: Optional[str] = None,
              experiment_params: Optional[Mapping[str, Any]] = None) -> Iterator["Tracker"]:
        """Probe the store, open this stage's run under its DVC experiment's parent, log ``params``.

        ``experiment_params``: the whole resolved config (params.yaml), logged on the parent run;
        a stage that passes none joins the newest parent of its experiment and commit.
        Raises TrackingUnavailableError (before any training) only with ``on_unreachable: fail``.
        """
        if not self.enabled:
            yield self
            return
        root = repo_root()
        self.uri = self._reachable_store(root)
        if self.uri is not None:
            try:
                self._open_run(root, params, run_name, experiment_params)
            except Exception as err:
                if self.cfg.on_unreachable == "fail":
                    raise TrackingUnavailableError(
                        f"MLflow store {redact(self.uri)}: cannot start the run ({err}); "
                        "tracking.on_unreachable is 'fail'"
                    ) from err
                self._give_up("starting the run", err)
        if self.run_id is None:
            yield self
            return
        status = "FINISHED"
        try:
            yield self
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._call("ending the run", self._client.set_terminated, self.run_id, status)
            # The parent spans its experiment: it ends when its last stage does, with that stage's status.
            self._call("ending the experiment's run", self._client.set_terminated, self.parent_run_id, status)

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        self._log_metrics(self.run_id, metrics, step)

    def log_experiment_metrics(self, metrics: Mapping[str, float]) -> None:
        """Headline metrics on the DVC experiment's parent run (``tass_default.test_official``...)."""
        self._log_metrics(self.parent_run_id, metrics, None)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.run_id is None or self._failed:
            return
        self._call("logging an artifact", self._client.log_artifact, self.run_id, str(path), artifact_path)

    def _log_metrics(self, run_id: Optional[str], metrics: Mapping[str, float], step: Optional[int]) -> None:
        if run_id is None or self._failed:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(param_key(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(batch), METRICS_PER_BATCH):
            self._call("logging metrics", self._client.log_batch, run_id, metrics=batch[i:i + METRICS_PER_BATCH])

    # ---- the finetuned model as an MLflow model (self-contained: see twilbert.mlflow_pyfunc)

    def log_classifier(self, model_dir: Path, artifact_path: str = "model") -> None:
        """Log a finetuned model directory as a pyfunc model at ``runs:/<run>/<artifact_path>``.

        Like every tracking call it never stops the stage: a failure is reported and tracking goes off.
        """
        if self.run_id is None or self._failed:
            return
        self._call("logging the MLflow model", self._log_classifier, Path(model_dir), artifact_path)

    def _log_classifier(self, model_dir: Path, artifact_path: str) -> None:
        from twilbert.mlflow_pyfunc import save_classifier_model

        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="twilbert-pyfunc-") as tmp:
            saved = save_classifier_model(model_dir, Path(tmp) / artifact_path)
            self._client.log_artifacts(self.run_id, str(saved), artifact_path)
        log.info("MLflow: logged %s as the pyfunc model runs:/%s/%s (%.1fs)", model_dir, self.run_id, artifact_path,
                 time.monotonic() - started)

    # ---- internals

    def _reachable_store(self, root: Path) -> Optional[str]:
        """The configured store if it answers; else the local one (fallback), an error (fail), or None."""
        uri = tracking_uri(self.cfg, root)
        problem = probe_store(uri, self.cfg.timeout)
        if problem is None:
            return uri
        if self.cfg.on_unreachable == "fail":
            raise TrackingUnavailableError(
                f"MLflow tracking store {redact(uri)} is unreachable: {problem}. tracking.on_unreachable is "
                "'fail', so the stage stops before training; start the server, fix tracking.uri (or "
                "MLFLOW_TRACKING_URI), or set tracking.on_unreachable: fallback to log to the local store"
            )
        local = local_store_uri(root)
        if local != uri and probe_store(local, self.cfg.timeout) is None:
            log.warning("MLflow tracking store %s is unreachable: %s; logging to the local store %s instead "
                        "(tracking.on_unreachable: fallback)", redact(uri), problem, local)
            return local
        log.warning("MLflow tracking store %s is unreachable: %s; tracking is off for this run, training "
                    "goes on", redact(uri), problem)
        return None

    def _open_run(self, root: Path, params: Mapping[str, Any], run_name: Optional[str],
                  experiment_params: Optional[Mapping[str, Any]]) -> None:
        import mlflow

        quiet_store_logs()
        exp_name, commit = dvc_experiment_name(), git_commit(root)
        everything = flatten(experiment_params) if experiment_params is not None else None
        with store_lock(self.uri):  # the client's first use creates the store's tables
            client = mlflow.MlflowClient(tracking_uri=self.uri)
            exp_id = self._retry(self._experiment_id, client, root)
            parent = self._retry(self._parent_run, client, exp_id, exp_name, commit, everything)
        tags = {
            "dvc.exp_name": exp_name,
            "git.commit": commit,
            "twilbert.stage": self.stage,
            "mlflow.parentRunId": parent,  # nests this run under its DVC experiment in the UI
        }
        run = self._retry(client.create_run, exp_id, run_name=f"{run_name or self.stage}@{exp_name}", tags=tags)
        self._client, self.run_id, self.parent_run_id = client, run.info.run_id, parent
        self._log_params(client, self.run_id, flatten(params))

    def _log_params(self, client, run_id: str, flat: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._retry(client.log_batch, run_id, params=items[i:i + PARAMS_PER_BATCH])

    def _experiment_id(self, client, root: Path) -> str:
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            # Local stores get an explicit, absolute artifact root: the default is relative to the cwd,
            # which for a queued DVC experiment is a temporary copy that is deleted afterwards.
            # A server chooses its own.
            local = urlsplit(self.uri).scheme in ("sqlite", "file", "")
            location = (root / "mlartifacts").as_uri() if local else None
            exp_id = client.create_experiment(self.cfg.experiment, artifact_location=location,
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            return exp_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # a store made before the tag existed
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    def _parent_run(self, client, exp_id: str, exp_name: str, commit: str,
                    everything: Optional[Mapping[str, str]]) -> str:
        """Get or create the parent run of this DVC experiment at this commit (and with these params)."""
        query = (f"tags.`dvc.exp_name` = '{exp_name}' and tags.`git.commit` = '{commit}' "
                 "and tags.`twilbert.parent` = 'true'")
        digest = params_digest(everything) if everything is not None else None
        if digest is not None:
            query += f" and tags.`twilbert.params_digest` = '{digest}'"
        found = client.search_runs([exp_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            return found[0].info.run_id
        tags = {"dvc.exp_name": exp_name, "git.commit": commit, "twilbert.parent": "true"}
        if digest is not None:
            tags["twilbert.params_digest"] = digest
        run = client.create_run(exp_id, run_name=exp_name, tags=tags)
        if everything is not None:
            self._log_params(client, run.info.run_id, everything)
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    def _retry(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn`` with bounded HTTP limits, retried with backoff while SQLite says 'database is locked'."""
        for attempt in range(self.cfg.retries + 1):
            try:
                with bounded_http(self.cfg):
                    return fn(*args, **kwargs)
            except Exception as err:
                if attempt == self.cfg.retries or not is_locked_error(err):
                    raise
                time.sleep(min(0.1 * 2**attempt, 5.0) * (0.5 + self._backoff.random()))
        raise AssertionError("unreachable")

    def _call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> None:
        """A tracking call during training: a failure is reported once and never propagates."""
        if self._failed:
            return
        try:
            self._retry(fn, *args, **kwargs)
        except Exception as err:
            self._give_up(what, err)

    def _give_up(self, what: str, err: Exception) -> None:
        self._failed = True
        err = root_cause(err)  # MLflow wraps SQLAlchemy wraps sqlite3: the innermost says what is wrong
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("MLflow: %s failed (%s: %s); tracking is off for the rest of this run, training goes on "
                    "(metrics and models are still written to the stage's outputs)", what, type(err).__name__, first)
