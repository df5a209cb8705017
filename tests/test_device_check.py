"""scripts/device_check.sh runs on the CPU as a smoke test: the gpu tests collect and skip, the
benchmark runs at tiny sizes, and the JSON summary says what ran, what was skipped and how it went."""

from __future__ import annotations

import json
import os
import subprocess

from helpers import REPO


def test_device_check_smoke_mode_runs_on_the_cpu_and_writes_its_summary(tmp_path):
    out = tmp_path / "device"
    env = {**os.environ, "OUT": str(out), "PYTHON": os.environ.get("PYTHON", "python")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--device", "cpu"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["device"] == "cpu" and summary["failed"] == []
    parts = summary["parts"]
    tests = parts["tests"]["counts"]
    assert tests["tests"] >= 6 and tests["skipped"] == tests["tests"]  # no CUDA here: every gpu test skips
    bench = parts["bench_smoke"]["result"]
    assert bench["device"] == "cpu" and bench["ours_fp32_tok_s"] > 0 and bench["hf_fp32_tok_s"] > 0
    assert parts["pipeline"]["skipped"]
    for name in ("environment.log", "tests.log", "bench_smoke.log", "device_check.log"):
        assert (out / name).is_file(), name
