"""`make ui` on the default pipeline's store, photographed: the checkout's own DVC state (its committed
results/, and its experiments where this machine has them, e.g. after `make repro` and one `make exp`)
synced into a fresh store, MLflow's UI started by `make ui`'s code, and the page read in headless
Chromium. Each shown run's task score, Δ and verdict must be on the page as the store holds them.
`TWILBERT_UI_SCREENSHOT=docs/mlflow_ui.png` keeps the picture (README "Tracking with MLflow")."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT_ENV = "TWILBERT_UI_SCREENSHOT"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shown_parents(uri: str) -> dict:
    import mlflow

    from twilbert.tracking.view import PARENT_FILTER

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("twilbert")
    return {r.info.run_name: r.data for r in client.search_runs([exp.experiment_id], PARENT_FILTER)}


def cell(value: float) -> str:
    """A metric as MLflow's table prints it (33.14, -1.2, 0)."""
    return f"{value:g}"


def test_make_ui_on_the_default_pipelines_store_shows_each_runs_score_delta_and_verdict(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from ui_screenshot import find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("no chromium on PATH for the UI screenshot (apt-get install -y chromium)")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    errors = (tmp_path / "ui.err").open("w+")
    ui = subprocess.Popen([sys.executable, "-m", "twilbert.pipeline.mlflow_sync", "--ui", "--port", str(port)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        url = next((line.split(" ", 1)[1].strip() for line in ui.stdout if line.startswith("open ")), "")
        if not url:
            ui.wait(timeout=60)
            errors.seek(0)
            pytest.fail(f"make ui exited ({ui.returncode}) without an address: {errors.read()[-2000:]}")
        parents = shown_parents(uri)
        assert parents, "the default pipeline's state gave no run to show"
        tasks = sorted({k.removesuffix(" test") for p in parents.values() for k in p.metrics if k.endswith(" test")})
        assert tasks, "no task score on the shown runs: are results/ committed?"
        shot = tmp_path / "mlflow_ui.png"
        text = screenshot(url, shot, wait_for=(*parents, f"{tasks[0]} test", f"{tasks[0]} verdict"))
        assert shot.read_bytes().startswith(b"\x89PNG")
        assert "Evaluation runs" not in text  # the model-training side bar, not GenAI's
        for name, data in parents.items():
            for task in tasks:
                assert cell(data.metrics[f"{task} test"]) in text, (name, task)
                assert cell(data.metrics[f"{task} Δ"]) in text, (name, task)
                assert data.tags[f"{task} verdict"] in text, (name, task)
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copy(shot, os.environ[SCREENSHOT_ENV])
    finally:
        ui.terminate()
        ui.wait(timeout=60)
        errors.close()
