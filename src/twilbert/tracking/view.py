"""`make ui`: MLflow's UI on the project's store, opening on a view that compares the experiments.

MLflow 3 keeps a runs-table view shareable as an experiment tag, ``mlflow.sharedViewState.<key>``
(JSON of the search facets and the table's UI state, ``selectedColumns`` among them), opened by the
experiment page's URL ``#/experiments/<id>/runs?viewStateShareKey=<key>``; it is what the UI's own
"Share" button writes. This module writes that view from the parent runs (one per DVC experiment):
the runs table shows them with the params that differ among them and each task's test official
metric, without a click. The experiment is tagged as model training (``mlflow.experimentKind``), so
the UI opens on its runs table, not in GenAI mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from twilbert.config import TrackingConfig
from twilbert.errors import TwilbertError
from twilbert.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, repo_root, tracking_uri

log = logging.getLogger(__name__)

VIEW_KEY = "twilbert-experiments"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # MLflow's UI: the prefix of a shared view's experiment tag
PARENT_FILTER = "tags.`twilbert.parent` = 'true'"
DERIVED_PARAMS = ("finetune_runs",)  # derived from other params: never the change itself
MAX_PARAM_COLUMNS = 12


class ViewError(TwilbertError, RuntimeError):
    """The store has nothing to show yet; the message says what to run."""


@dataclass
class View:
    experiment_id: str
    params: list[str]  # the param keys that differ among the parent runs
    metrics: list[str]  # each task's test official metric (and the pretraining headline)
    n_parents: int

    @property
    def columns(self) -> list[str]:
        """The runs table's columns, as MLflow's UI names them."""
        return [column("params", k) for k in self.params] + [column("metrics", k) for k in self.metrics]

    def path(self, key: str = VIEW_KEY) -> str:
        """The page's path: the shared view, in model-training mode (the UI's own switch, kept in the
        URL: without it a browser's first visit lands in GenAI mode)."""
        return f"#/experiments/{self.experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"


def column(group: str, key: str) -> str:
    """MLflow's UI column id: ``params.`model.n_encoders```."""
    return f"{group}.`{key}`"


def differing_params(runs: Sequence[Any]) -> list[str]:
    """The param keys whose values are not the same in every run (a missing key counts as a value)."""
    keys = sorted({k for r in runs for k in r.data.params})
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1
              and k.split(".", 1)[0] not in DERIVED_PARAMS]
    # the first listed are the ones an experiment sets (-S model.n_encoders=4), not the seeds' lists
    return differ[:MAX_PARAM_COLUMNS]


def test_metrics(runs: Sequence[Any]) -> list[str]:
    """Each task's test official metric on the parents (``<task>.test_official``), then its TF-IDF row's."""
    keys = {k for r in runs for k in r.data.metrics}
    primary = sorted(k for k in keys if k.endswith(".test_official") and k.count(".") == 1)
    tfidf = sorted(k for k in keys if k.endswith(".tfidf.test_official"))  # reports.results.TFIDF_ROW
    return primary + tfidf


def build_view(client: Any, experiment_name: str) -> View:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ViewError(f"the MLflow store has no experiment {experiment_name!r} yet: run `make repro` first")
    parents = client.search_runs([experiment.experiment_id], filter_string=PARENT_FILTER, max_results=1000)
    if not parents:
        raise ViewError(f"experiment {experiment_name!r} has no run yet: run `make repro` first")
    return View(experiment.experiment_id, differing_params(parents), test_metrics(parents), len(parents))


def view_state(view: View) -> dict:
    """The shared view: the parent runs (newest first) with the view's columns."""
    return {
        "searchFilter": PARENT_FILTER,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": view.columns,
        "columnOrder": [],
        "columnWidths": {},
        "viewMaximized": False,
        "runListHidden": False,
    }


def write_view(client: Any, view: View, key: str = VIEW_KEY) -> None:
    """The view as the experiment's shared view ``key`` and the experiment's kind (model training)."""
    client.set_experiment_tag(view.experiment_id, SHARED_VIEW_TAG + key, json.dumps(view_state(view)))
    client.set_experiment_tag(view.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def prepare(uri: str, experiment_name: str) -> View:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    view = build_view(client, experiment_name)
    write_view(client, view)
    return view


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="make ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default=TrackingConfig().experiment)
    parser.add_argument("--prepare-only", action="store_true", help="write the view and print its URL; no server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = repo_root()
    uri = tracking_uri(TrackingConfig(), root)
    try:
        view = prepare(uri, args.experiment)
    except ViewError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    url = f"http://{args.host}:{args.port}/{view.path()}"
    print(f"{view.n_parents} experiment run(s); columns: {', '.join(view.columns) or 'none differ yet'}")
    print(f"open {url}")
    if args.prepare_only:
        return
    sys.stdout.flush()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.is_file() else "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
