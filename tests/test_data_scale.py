"""benchmarks/data_scale.py at its smoke-run size: the real stages as child processes, one JSON line."""

import json
import subprocess
import sys

import pytest

from helpers import REPO

KEYS = {"pairs", "data_rss_mb", "vocab_rss_mb", "pairs_rss_mb", "pretrain_startup_rss_mb", "data_s", "vocab_s",
        "pairs_s", "pairs_per_s", "bytes_per_token", "projected_70m_hours", "projected_70m_peak_gb"}


@pytest.mark.slow
def test_data_scale_quick_mode_runs_every_stage_and_ends_with_the_json_line(tmp_path):
    cmd = [sys.executable, "benchmarks/data_scale.py", "--quick", "--workdir", str(tmp_path / "work"),
           "pairs.workers=2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures) == KEYS
    assert figures["pairs"] == 3000
    for key in KEYS - {"pretrain_startup_rss_mb"}:
        assert figures[key] > 0, key
    assert 0 < figures["bytes_per_token"] < 3  # uint16, each pair once, unpadded
    for stage in ("data", "vocab", "pairs", "pretrain"):
        assert any(line.startswith("[3000 pairs] " + stage) for line in lines), stage
    assert not (tmp_path / "work").exists()  # removed without --keep
