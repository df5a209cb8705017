"""scripts/device_check.sh in a simulation of the lent GPU machine's image, on the CPU: ``python3`` but
no ``python`` on PATH, no project venv, and hydra-core, omegaconf, mlflow and dvc not installed (a
sitecustomize hides them from imports and from package metadata, as if absent). The check must pass
and leave only what that machine brings back (at most 8 files, flat, plain names), and a part killed
at its limit, or a run stopped midway, must still leave a summary that says so."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO

SCRIPT = REPO / "scripts" / "device_check.sh"
RETURNED_FILES, RETURNED_BYTES = 8, 16 * 2**20  # what a lent machine brings back from $OUT
NAME = re.compile(r"[A-Za-z0-9._-]+")

ABSENT = '''
import importlib.metadata as metadata
import sys


def _absent(name):
    name = name.lower().replace("-", "_")
    return name in ("hydra", "hydra_core", "omegaconf", "mlflow", "dvc") or name.startswith(("mlflow_", "dvc_"))


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if _absent(name.split(".")[0]):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
# and out of the package metadata, or pytest would load Hydra's plugin from its entry point
_distributions = metadata.distributions
metadata.distributions = lambda **kw: (d for d in _distributions(**kw) if not _absent(d.metadata["Name"] or ""))
'''


@pytest.fixture
def image(tmp_path) -> dict:
    """The environment of the device image: PATH with python3 (this interpreter) but no python."""
    bin_dir, site = tmp_path / "bin", tmp_path / "site"
    bin_dir.mkdir()
    site.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # exec keeps the venv's sys.prefix
    python3.chmod(0o755)
    (site / "sitecustomize.py").write_text(ABSENT)
    path = [str(bin_dir)] + [d for d in os.environ["PATH"].split(os.pathsep)
                             if d and not os.access(os.path.join(d, "python"), os.X_OK)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=os.pathsep.join(path), PYTHONPATH=str(site), VENV=str(tmp_path / "no-venv"),
               TMPDIR=str(tmp_path), OUT=str(tmp_path / "out"))
    return env


def assert_returnable(out: Path) -> None:
    entries = list(out.rglob("*"))
    assert all(p.is_file() and p.parent == out for p in entries), entries  # flat
    assert len(entries) <= RETURNED_FILES, sorted(p.name for p in entries)
    assert all(NAME.fullmatch(p.name) and p.stat().st_size <= RETURNED_BYTES for p in entries), entries


def test_the_simulated_image_has_python3_with_torch_but_no_python_and_no_hydra(image):
    probe = ("command -v python || echo no-python; python3 -c 'import torch; print(\"torch\")'; "
             "python3 -c 'import hydra'")
    proc = subprocess.run(["bash", "-c", probe], env=image, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["no-python", "torch"], proc.stdout + proc.stderr
    assert "No module named 'hydra'" in proc.stderr


@pytest.mark.slow
def test_device_check_passes_in_the_device_image_and_leaves_only_what_comes_back(image):
    out = Path(image["OUT"])
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--pipeline"], cwd=REPO, env=image,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["complete"] and summary["failed"] == [] and summary["device"] == "cpu"
    parts = summary["parts"]
    counts = parts["tests"]["counts"]
    assert counts["failures"] == counts["errors"] == 0
    assert counts["tests"] - counts["skipped"] >= 5, counts  # the GPU tests' bodies ran on the CPU
    bench = parts["bench_smoke"]["result"]
    assert bench["device"] == "cpu" and bench["ours_fp32_tok_s"] > 0 and bench["hf_fp32_tok_s"] > 0
    pipeline = parts["pipeline"]["result"]
    assert pipeline["ok"] and pipeline["precision"] == "bf16" and pipeline["stages"]["finetune"]["rc"] == 0
    log = (out / "pipeline.log").read_text()
    assert log.count("No module named 'mlflow'") == 2, log[-3000:]  # tracking off, one warning per stage
    assert f"python {image['PATH'].split(os.pathsep)[0]}/python3" in (out / "device_check.log").read_text()
    assert_returnable(out)


def test_a_part_killed_at_its_limit_and_a_run_stopped_midway_still_leave_a_summary(image):
    out = Path(image["OUT"])
    env = {**image, "DEVICE_CHECK_LIMITS": "tests=1"}
    proc = subprocess.Popen(["bash", str(SCRIPT), "--device", "cpu"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        summary = {}
        deadline = time.monotonic() + 180
        while summary.get("running") != "bench_smoke" and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                summary = json.loads((out / "summary.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as a lent machine stops a command at its limit
        output = proc.communicate()[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["running"] == "bench_smoke", output[-3000:]
    assert not summary["ok"] and not summary["complete"]
    assert summary["failed"] == ["tests"] and summary["timed_out"] == ["tests"]
    assert summary["parts"]["tests"]["exit"] in (124, 137) and summary["parts"]["tests"]["limit_s"] == 1
    assert_returnable(out)


def test_without_a_python_that_imports_torch_it_says_so_in_one_line(image, tmp_path):
    no_torch = tmp_path / "no-torch"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu"], cwd=REPO, env={**image, "PYTHON": str(no_torch)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: no Python that imports torch among: {no_torch} "
                                        "(set PYTHON=/path/to/python)"]
    summary = json.loads((Path(image["OUT"]) / "summary.json").read_text())
    assert not summary["ok"] and "no Python that imports torch" in summary["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_cuda_device_says_so_in_one_line(image):
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=image, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: --device cuda: no torch among ")
    assert "--device cpu runs the smoke test" in proc.stderr
    summary = json.loads((Path(image["OUT"]) / "summary.json").read_text())
    assert not summary["ok"] and summary["parts"] == {}
