"""Reaching an MLflow store without ever stalling training: a reachability probe bounded by
``tracking.timeout``, MLflow's HTTP retries bounded by the config, and, for parallel runs
(``dvc queue start -j N``) sharing one SQLite store, a file lock around its creation and a retry with
backoff of calls that meet 'database is locked'."""

from __future__ import annotations

import logging
import math
import os
import socket
import sqlite3
import ssl
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

from twilbert.config import TrackingConfig

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
LOCK_WAIT_S = 120.0  # longest wait for another process to finish creating the SQLite store


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


def sqlite_path(uri: str) -> Optional[Path]:
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def _probe_sqlite(uri: str, timeout: float) -> Optional[str]:
    path = sqlite_path(uri)
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
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    key = sha256(str(path.resolve()).encode()).hexdigest()[:16]
    lock = FileLock(Path(tempfile.gettempdir()) / f"twilbert-mlflow-{key}.lock", timeout=LOCK_WAIT_S)
    try:
        lock.acquire()
    except Timeout:
        log.warning("MLflow: %s still locked after %.0fs; going on without the lock", lock.lock_file, LOCK_WAIT_S)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def local_store_problem(uri: str, timeout: float) -> Optional[str]:
    """What keeps a local SQLite store from being read and written, in one sentence that says how to
    move it aside; None when it is usable or not local (a server answers for itself). Checked before
    MLflow opens it: MLflow's own answer is a traceback (a damaged or locked file) or minutes of
    retries (a directory)."""
    path = sqlite_path(uri)
    if path is None or not path.exists():
        return None  # MLflow creates it
    aside = (f"move it aside (mv {path} {path}.broken) and rerun; the experiments' scores are rebuilt from "
             "DVC's results, the stages' curves stay in the moved file")
    if not path.is_file():
        return f"MLflow store {path} is a directory, not an SQLite file: {aside}"
    try:
        conn = sqlite3.connect(str(path), timeout=timeout)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
            conn.execute("BEGIN IMMEDIATE")  # the sync writes: a store another process holds locked is refused
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return (f"MLflow store {path} is locked by another process for over {timeout:g}s (a stage or "
                    f"`make ui` still running? `fuser {path}` names it): stop it, or {aside}")
        return f"MLflow store {path} cannot be opened ({err}): {aside}"
    except sqlite3.DatabaseError as err:
        return f"MLflow store {path} is not an SQLite database ({err}): {aside}"
    except OSError as err:
        return f"MLflow store {path} cannot be opened ({err}): {aside}"
    return None
