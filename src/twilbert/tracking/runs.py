"""MLflow tracking for the stages. The store is ``<repo root>/mlflow.db`` (past a queued DVC experiment's
copy) unless ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` says otherwise. Each stage's run
(``<stage>@<experiment>``) is a child of its DVC experiment's parent run, which carries every param;
new params open a new parent (MLflow params are immutable), a rerun of a stage replaces its earlier
child, and a stage that fails marks its parent FAILED. The parents' scores, Δ and verdicts are
written by ``twilbert.pipeline.mlflow_sync`` alone, from DVC's state, so that a stage DVC skips
leaves no parent without them.
Tracking never kills training: see ``tracking_store``. Under torchrun only rank 0 tracks.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from twilbert.config import ConfigError, TrackingConfig
from twilbert.config.strict import flatten as flatten_tree
from twilbert.tracking.store import (
    bounded_http,
    is_locked_error,
    probe_store,
    quiet_store_logs,
    redact,
    root_cause,
    sqlite_path,
    store_lock,
)

log = logging.getLogger(__name__)
# Writes a finetuned model directory as an MLflow model folder (model dir, target, MLmodel description)
SaveModel = Callable[[Path, Path, Any], Path]

MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (tests pin the two equal)
MAX_KEY_CHARS = 250  # MAX_ENTITY_KEY_LENGTH
PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by MLflow 3's UI to pick the experiment's first page
EXPERIMENT_KIND = "custom_model_development"  # model training: the runs table, not GenAI traces
EXP_TMP_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


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
    texts = {param_key(key): str(value) for key, value in flatten_tree(tree, prefix).items()}
    return {key: text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
            for key, text in texts.items()}


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


def find_parent(client, exp_id: str, exp_name: str, everything: Optional[Mapping[str, str]]) -> Any:
    """The newest parent run of the DVC experiment ``exp_name`` (with the flattened params
    ``everything``, when given), or None."""
    query = f"tags.`dvc.exp_name` = '{exp_name}' and tags.`twilbert.parent` = 'true'"
    if everything is not None:
        query += f" and tags.`twilbert.params_digest` = '{params_digest(everything)}'"
    found = client.search_runs([exp_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def experiment_id(client, name: str, uri: str, root: Path) -> str:
    """The MLflow experiment ``name``'s id, created (tagged as model training) when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # Local stores get an explicit, absolute artifact root: the default is relative to the cwd,
        # which for a queued DVC experiment is a temporary copy that is deleted afterwards.
        # A server chooses its own.
        local = urlsplit(uri).scheme in ("sqlite", "file", "")
        location = (root / "mlartifacts").as_uri() if local else None
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a store made before the tag existed
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def log_params(client, run_id: str, flat: Mapping[str, str], call: Callable = lambda fn, *a, **k: fn(*a, **k)) -> None:
    """``flat`` on the run, in batches within MLflow's limit; ``call`` wraps each call (retries)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        call(client.log_batch, run_id, params=items[i:i + PARAMS_PER_BATCH])


def parent_run(client, exp_id: str, exp_name: str, commit: str, everything: Optional[Mapping[str, str]],
               log_all: Optional[Callable[[str, Mapping[str, str]], None]] = None) -> str:
    """Get or create the parent run of the DVC experiment ``exp_name`` with these params: one parent
    per experiment and configuration, whatever the commit (a commit between two stages of one run,
    say after a fix, keeps them together; the parent's ``git.commit`` is its latest stage's).
    A new parent gets every param of ``everything`` (through ``log_all``, by default :func:`log_params`)."""
    found = find_parent(client, exp_id, exp_name, everything)
    if found is not None:
        if found.data.tags.get("git.commit") != commit:
            client.set_tag(found.info.run_id, "git.commit", commit)
        return found.info.run_id
    tags = {"dvc.exp_name": exp_name, "git.commit": commit, "twilbert.parent": "true"}
    if everything is not None:
        tags["twilbert.params_digest"] = params_digest(everything)
    run = client.create_run(exp_id, run_name=exp_name, tags=tags)
    if everything is not None:
        (log_all or (lambda run_id, flat: log_params(client, run_id, flat)))(run.info.run_id, everything)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def mark_failed(cfg: TrackingConfig, experiment_params: Mapping[str, Any]) -> None:
    """Mark FAILED the parent run of a stage that failed before it opened its own run (a task file
    missing, a refused config...), so that a failed pipeline never shows as finished. Never raises:
    the stage's own error is what the user must see."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    try:
        import mlflow

        uri = tracking_uri(cfg)
        local = sqlite_path(uri)
        if (local is not None and not local.is_file()) or probe_store(uri, cfg.timeout) is not None:
            return  # no store yet (so no parent), or none reachable
        quiet_store_logs()
        with bounded_http(cfg):
            client = mlflow.MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                return
            parent = find_parent(client, experiment.experiment_id, dvc_experiment_name(), flatten(experiment_params))
            if parent is not None:
                client.set_terminated(parent.info.run_id, "FAILED")
    except Exception as err:  # tracking never hides the stage's error
        log.warning("MLflow: could not mark the experiment's run failed (%s)", type(root_cause(err)).__name__)


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
        # The parent spans its experiment: running while a stage runs, then ended with that stage's status.
        self._call("marking the experiment's run running", self._client.update_run, self.parent_run_id, "RUNNING")
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
            self._call("ending the experiment's run", self._client.set_terminated, self.parent_run_id, status)

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        self._log_metrics(self.run_id, metrics, step)

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

    # ---- the finetuned model as an MLflow model (self-contained: see twilbert.inference.pyfunc)

    def log_classifier(self, model_dir: Path, save: SaveModel, artifact_path: str = "model") -> None:
        """Log a finetuned model directory as a pyfunc model (written by ``save``, e.g.
        ``twilbert.inference.pyfunc.save_classifier_model``: tracking does not import the inference code),
        an MLflow 3 logged model named
        ``artifact_path``, an output of this run (``runs:/<run>/<artifact_path>`` and
        ``models:/<model id>`` load it; the UI and ``mlflow.search_logged_models`` list it).

        Like every tracking call it never stops the stage: a failure is reported and tracking goes off.
        """
        if self.run_id is None or self._failed:
            return
        self._call("logging the MLflow model", self._log_classifier, Path(model_dir), save, artifact_path)

    def _log_classifier(self, model_dir: Path, save: SaveModel, artifact_path: str) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        started = time.monotonic()
        run = self._client.get_run(self.run_id)
        model = self._client.create_logged_model(
            run.info.experiment_id, name=artifact_path, source_run_id=self.run_id, model_type="twilbert-classifier",
            tags={"twilbert.pipeline.stage": self.stage, "dvc.exp_name": run.data.tags.get("dvc.exp_name", "")})
        try:
            self._client.log_outputs(self.run_id, models=[LoggedModelOutput(model.model_id, step=0)])
            with tempfile.TemporaryDirectory(prefix="twilbert-pyfunc-") as tmp:
                # The MLmodel file names the model by id and by its relative artifact path: no absolute
                # path of this machine or store goes in (the store can be moved or shared).
                description = Model(artifact_path=artifact_path, run_id=self.run_id, model_id=model.model_id,
                                    model_uuid=model.model_id)
                saved = save(model_dir, Path(tmp) / artifact_path, description)
                self._client.log_model_artifacts(model.model_id, str(saved))
        except BaseException:
            self._client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self._client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        log.info("MLflow: logged %s as the pyfunc model %s (models:/%s, runs:/%s/%s; %.1fs)", model_dir,
                 artifact_path, model.model_id, self.run_id, artifact_path, time.monotonic() - started)

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
            "twilbert.pipeline.stage": self.stage,
            "mlflow.parentRunId": parent,  # nests this run under its DVC experiment in the UI
        }
        name = f"{run_name or self.stage}@{exp_name}"
        run = self._retry(client.create_run, exp_id, run_name=name, tags=tags)
        self._client, self.run_id, self.parent_run_id = client, run.info.run_id, parent
        self._log_params(client, self.run_id, flatten(params))
        self._retry(self._replace_older, client, exp_id, parent, name, run.info.run_id)

    def _replace_older(self, client, exp_id: str, parent: str, name: str, keep: str) -> None:
        """A rerun of a stage replaces its earlier run under the same parent (deleted: MLflow keeps it
        in the store, the UI and searches leave it out), so that a parent holds one child per stage."""
        query = f"tags.`mlflow.parentRunId` = '{parent}' and attributes.run_name = '{name}'"
        for older in client.search_runs([exp_id], filter_string=query, max_results=100):
            if older.info.run_id != keep:
                outputs = getattr(older, "outputs", None)
                for model in getattr(outputs, "model_outputs", None) or ():  # its logged model goes with it
                    client.delete_logged_model(model.model_id)
                client.delete_run(older.info.run_id)

    def _log_params(self, client, run_id: str, flat: Mapping[str, str]) -> None:
        log_params(client, run_id, flat, self._retry)

    def _experiment_id(self, client, root: Path) -> str:
        return experiment_id(client, self.cfg.experiment, self.uri, root)

    def _parent_run(self, client, exp_id: str, exp_name: str, commit: str,
                    everything: Optional[Mapping[str, str]]) -> str:
        return parent_run(client, exp_id, exp_name, commit, everything,
                          lambda run_id, flat: self._log_params(client, run_id, flat))

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
