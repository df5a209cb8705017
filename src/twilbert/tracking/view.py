"""`make ui`: MLflow's UI on the project's store, opening on a view that compares the experiments.

MLflow 3 keeps a runs-table view shareable as an experiment tag, ``mlflow.sharedViewState.<key>``
(JSON of the search facets and the table's UI state: ``selectedColumns``, ``columnOrder``,
``columnWidths``), opened by the experiment page's URL ``#/experiments/<id>/runs?viewStateShareKey=<key>``;
it is what the UI's own "Share" button writes. This module writes that view from the parent runs
(one per DVC experiment, their scores written by ``twilbert.pipeline.mlflow_sync``): the runs table
shows them with the params that differ among them and, per task, the official test score, its sd
and n, Δ against the reference run with its interval and the verdict, each column wide enough for
its header. The experiment is tagged as model training (``mlflow.experimentKind``), so the UI opens
on its runs table, not in GenAI mode.

Before starting the server: the store's file is checked (a directory, a damaged or locked file are
refused in one line) and so is the port; the address is printed once the server answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from twilbert.config import TrackingConfig
from twilbert.errors import TwilbertError
from twilbert.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, repo_root, tracking_uri
from twilbert.tracking.store import local_store_problem, quiet_store_logs

log = logging.getLogger(__name__)

VIEW_KEY = "twilbert-experiments"
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # MLflow's UI: the prefix of a shared view's experiment tag
PARENT_TAG, SHOWN_TAG = "twilbert.parent", "twilbert.shown"
PARENT_FILTER = f"tags.`{PARENT_TAG}` = 'true' and tags.`{SHOWN_TAG}` = 'true'"
DERIVED_PARAMS = ("finetune_runs",)  # derived from other params: never the change itself
MAX_PARAM_COLUMNS = 12
SERVER_START_S = 180.0  # MLflow's UI takes ~40 s to answer on a busy machine


# A task's columns on a parent run, as its headers read: "<task> test" is the official test score
# (mean over the runs, in points), then its sd and n, Δ against the reference run with the 95%
# interval's bounds, and the verdict (a tag: better, worse, within noise, reference).
SCORE_SUFFIXES = ("test", "sd", "n", "Δ", "Δ low", "Δ high")
VERDICT_SUFFIX = "verdict"


def score_key(task: str, suffix: str) -> str:
    return f"{task} {suffix}"


class ViewError(TwilbertError, RuntimeError):
    """The store has nothing to show yet, or cannot be used; the message says what to do."""


@dataclass
class View:
    experiment_id: str
    params: list[str]  # the param keys that differ among the parent runs
    metrics: list[str]  # per task: test score, sd, n (where it differs), Δ and its bounds
    tags: list[str]  # per task: the verdict
    n_parents: int

    @property
    def columns(self) -> list[str]:
        """The runs table's columns, as MLflow's UI names them."""
        return ([column("params", k) for k in self.params] + [column("metrics", k) for k in self.metrics]
                + [column("tags", k) for k in self.tags])

    def path(self, key: str = VIEW_KEY) -> str:
        """The page's path: the shared view, in model-training mode (the UI's own switch, kept in the
        URL: without it a browser's first visit lands in GenAI mode)."""
        return f"#/experiments/{self.experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"


def column(group: str, key: str) -> str:
    """MLflow's UI column id: ``params.`model.n_encoders```."""
    return f"{group}.`{key}`"


def column_width(key: str, values: Sequence[str] = (), per_char: int = 6) -> int:
    """Pixels that show the header ``key`` (and the cells ``values``) whole in MLflow's table font
    (about 6 px a character; a dotted param key's letters, 7), with the sort icon's room."""
    return 20 + per_char * max([len(key), *(len(v) for v in values)])


def differing_params(runs: Sequence[Any]) -> list[str]:
    """The param keys whose values are not the same in every run (a missing key counts as a value)."""
    keys = sorted({k for r in runs for k in r.data.params})
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1
              and k.split(".", 1)[0] not in DERIVED_PARAMS]
    # the first listed are the ones an experiment sets (-S model.n_encoders=4), not the seeds' lists
    return differ[:MAX_PARAM_COLUMNS]


def task_names(runs: Sequence[Any]) -> list[str]:
    """The tasks with a test score on some parent, sorted."""
    suffix = " " + SCORE_SUFFIXES[0]
    return sorted({k.removesuffix(suffix) for r in runs for k in r.data.metrics if k.endswith(suffix)})


def build_view(client: Any, experiment_name: str) -> View:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ViewError(f"the MLflow store has no experiment {experiment_name!r} yet: run `make repro` first")
    parents = client.search_runs([experiment.experiment_id], filter_string=PARENT_FILTER, max_results=1000)
    if not parents:
        raise ViewError(f"experiment {experiment_name!r} has no run yet: run `make repro` first")
    tasks = task_names(parents)
    metrics = [score_key(t, s) for t in tasks for s in SCORE_SUFFIXES]
    metrics = [k for k in metrics if any(k in r.data.metrics for r in parents)]
    # n is shown where it tells runs apart (a seed added); else it is one more column to scroll past
    metrics = [k for k in metrics if not k.endswith(" n") or len({r.data.metrics.get(k) for r in parents}) > 1]
    tags = [score_key(t, VERDICT_SUFFIX) for t in tasks]
    return View(experiment.experiment_id, differing_params(parents), metrics, tags, len(parents))


def view_state(view: View, widths: Optional[dict[str, int]] = None) -> dict:
    """The shared view: the parent runs (newest first) with the view's columns, each as wide as given."""
    widths = widths or {}
    return {
        "searchFilter": PARENT_FILTER,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": view.columns,
        # MLflow's table applies columnWidths only to the columns columnOrder lists
        "columnOrder": [c for c in view.columns if c in widths],
        "columnWidths": {c: widths[c] for c in view.columns if c in widths},
        "viewMaximized": False,
        "runListHidden": False,
    }


def widths_of(client: Any, view: View) -> dict[str, int]:
    """Each column's width: its header, and for a param or tag its longest value, shown whole."""
    parents = client.search_runs([view.experiment_id], filter_string=PARENT_FILTER, max_results=1000)
    widths = {column("params", k): column_width(k, [r.data.params.get(k, "") for r in parents], per_char=7)
              for k in view.params}
    widths.update({column("metrics", k): column_width(k, ["-000.00"]) for k in view.metrics})
    widths.update({column("tags", k): column_width(k, [r.data.tags.get(k, "") for r in parents]) for k in view.tags})
    return widths


def write_view(client: Any, view: View, key: str = VIEW_KEY) -> None:
    """The view as the experiment's shared view ``key`` and the experiment's kind (model training)."""
    state = json.dumps(view_state(view, widths_of(client, view)))
    client.set_experiment_tag(view.experiment_id, SHARED_VIEW_TAG + key, state)
    client.set_experiment_tag(view.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def prepare(uri: str, experiment_name: str) -> View:
    import mlflow

    quiet_store_logs()
    client = mlflow.MlflowClient(tracking_uri=uri)
    view = build_view(client, experiment_name)
    write_view(client, view)
    return view


def port_problem(host: str, port: int) -> Optional[str]:
    """Why the UI cannot listen on ``host:port`` (another server holds it), or None."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as err:
            return (f"port {port} on {host} is taken ({err.strerror or err}): another `make ui` or server "
                    f"holds it; stop it, or choose another port: make ui PORT={port + 1}")
    return None


def serve(command: list[str], answer_url: str, open_url: str, timeout: float = SERVER_START_S) -> int:
    """Start the server, print ``open_url`` once ``answer_url`` answers, then wait for the server.
    The server runs in its own process group, stopped whole (MLflow's UI starts workers) on Ctrl-C
    or SIGTERM."""
    server = subprocess.Popen(command, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                print(f"error: MLflow's UI exited with status {server.returncode} before answering", file=sys.stderr)
                return 2
            try:
                urllib.request.urlopen(answer_url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    print(f"error: MLflow's UI did not answer {answer_url} within {timeout:.0f}s", file=sys.stderr)
                    return 2
                time.sleep(0.5)
        print(f"open {open_url}", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_group(server)


def stop_group(server: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: Optional[list[str]] = None, sync: Optional[Callable[[str], None]] = None,
         prog: str = "python -m twilbert.tracking.view") -> int:
    """`make ui`; ``sync(uri)`` first brings the store up to date (twilbert.pipeline.mlflow_sync)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default=TrackingConfig().experiment)
    parser.add_argument("--prepare-only", action="store_true", help="write the view and print its URL; no server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = repo_root()
    cfg = TrackingConfig()
    uri = tracking_uri(cfg, root)
    problem = local_store_problem(uri, cfg.timeout)
    if problem is None and not args.prepare_only:
        problem = port_problem(args.host, args.port)
    try:
        if problem is not None:
            raise ViewError(problem)
        if sync is not None:
            sync(uri)
        view = prepare(uri, args.experiment)
    except TwilbertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{args.port}/{view.path()}"
    print(f"{view.n_parents} experiment run(s); columns: {', '.join(view.columns) or 'none differ yet'}", flush=True)
    if args.prepare_only:
        print(f"open {url}")
        return 0
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.is_file() else "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    return serve(command, f"http://{local}:{args.port}/health", url)


if __name__ == "__main__":
    sys.exit(main())
