"""MLflow tracking: where the store is, how runs are grouped, what is logged.

- The store is ``sqlite:///<repo root>/mlflow.db`` (absolute) unless ``MLFLOW_TRACKING_URI`` or
  ``tracking.uri`` says otherwise. Inside a queued DVC experiment the working directory is a copy
  under ``<repo>/.dvc/tmp/exps/``; the root is resolved past it, so runs land in the real store.
- Runs of one DVC experiment share a parent run named after it (``DVC_EXP_NAME``, set by
  ``dvc exp run``; ``workspace`` under plain ``dvc repro``), tagged with the baseline git commit,
  so the MLflow UI shows two DVC experiments side by side.
- Params are the flattened config in dotted keys with short values (MLflow caps value length).
"""

from __future__ import annotations

import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from twilbert.config import TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 250
EXP_TMP_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


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


def tracking_uri(cfg: TrackingConfig, root: Optional[Path] = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if uri:
        return uri
    return f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {'model.n_encoders': '12', ...}, values cut to MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        text = str(tree)
        out[prefix] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return out


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


class Tracker:
    """A thin, failure-tolerant front of MLflow for the training stages."""

    def __init__(self, cfg: TrackingConfig, stage: str, enabled: bool = True):
        self.cfg, self.stage, self.enabled = cfg, stage, enabled
        self.run_id: Optional[str] = None

    @contextmanager
    def start(self, params: Mapping[str, Any], run_name: Optional[str] = None) -> Iterator["Tracker"]:
        if not self.enabled:
            yield self
            return
        import mlflow

        root = repo_root()
        mlflow.set_tracking_uri(tracking_uri(self.cfg, root))
        experiment = mlflow.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            # An explicit, absolute artifact root: the default is relative to the cwd, which for a
            # queued DVC experiment is a temporary copy that is deleted afterwards.
            exp_id = mlflow.create_experiment(
                self.cfg.experiment, artifact_location=(root / "mlartifacts").as_uri()
            )
        else:
            exp_id = experiment.experiment_id
        exp_name, commit = dvc_experiment_name(), git_commit(root)
        parent = self._parent_run(mlflow, exp_id, exp_name, commit)
        tags = {
            "dvc.exp_name": exp_name,
            "git.commit": commit,
            "twilbert.stage": self.stage,
            "mlflow.parentRunId": parent,  # nests this run under its DVC experiment in the UI
        }
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name or self.stage, tags=tags) as run:
            self.run_id = run.info.run_id
            mlflow.log_params(flatten(params))
            yield self

    @staticmethod
    def _parent_run(mlflow, exp_id: str, exp_name: str, commit: str) -> str:
        """Get or create the parent run of this DVC experiment at this commit."""
        query = f"tags.`dvc.exp_name` = '{exp_name}' and tags.`git.commit` = '{commit}' and tags.`twilbert.parent` = 'true'"
        found = mlflow.search_runs([exp_id], filter_string=query, max_results=1, output_format="list")
        if found:
            return found[0].info.run_id
        client = mlflow.MlflowClient()
        run = client.create_run(
            exp_id,
            run_name=exp_name,
            tags={"dvc.exp_name": exp_name, "git.commit": commit, "twilbert.parent": "true"},
        )
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if not self.enabled or self.run_id is None:
            return
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if not self.enabled or self.run_id is None:
            return
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)
