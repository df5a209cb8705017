"""benchmarks/data_scale.py at its smoke-run size: the real stages as child processes, one JSON line."""

import json
import subprocess
import sys

import pytest

from helpers import REPO

KEYS = {"pairs", "data_rss_mb", "vocab_rss_mb", "pairs_rss_mb", "pretrain_startup_rss_mb", "data_s", "vocab_s",
        "pairs_s", "pairs_per_s", "bytes_per_token", "projected_70m_hours", "projected_70m_peak_gb",
        "pairs_rss_growth_pct", "growth_from_pairs"}


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
    assert figures["growth_from_pairs"] == 1000  # quick: the 1k baseline is the smaller run
    for key in KEYS - {"pretrain_startup_rss_mb", "pairs_rss_growth_pct"}:
        assert figures[key] > 0, key
    assert 0 < figures["bytes_per_token"] < 3  # uint16, each pair once, unpadded
    for stage in ("data", "vocab", "pairs", "pretrain"):
        assert any(line.startswith("[3000 pairs] " + stage) for line in lines), stage
    assert any(line.startswith("peak growth from 1000 to 3000 pairs: data") for line in lines)
    assert not (tmp_path / "work").exists()  # removed without --keep


def _benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_scale", REPO / "benchmarks" / "data_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_carries_the_slope_between_the_two_runs_from_the_larger_one():
    project = _benchmark().project
    # a fixed start-up cost adds nothing: only the growth between the runs is carried to 70M pairs
    assert project(400, 500, 250_000, 1_000_000, 70_000_000) == 500 + 100 / 750_000 * 69_000_000
    assert project(400, 400, 250_000, 1_000_000, 70_000_000) == 400  # flat stays flat
    assert project(410, 400, 250_000, 1_000_000, 70_000_000) == 400  # noise never projects a shrink


def test_projection_stops_growing_at_the_cap_of_the_vocabulary_sample():
    project = _benchmark().project
    # both runs below the cap: the slope runs up to the cap only
    assert project(100, 200, 10_000, 110_000, 70_000_000, cap=250_000) == 200 + 1e-3 * 140_000
    # the larger run holds the full sample already: it is the projection
    assert project(2000, 2200, 100_000, 1_000_000, 70_000_000, cap=250_000) == 2200


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["twitter-v2", "bluesky"])
def test_the_format_benchmark_finds_every_generated_pair_and_ends_with_its_json_line(tmp_path, fmt):
    cmd = [sys.executable, "benchmarks/data_scale.py", "--format", fmt, "--posts", "3000", "--stages", "data",
           "--workdir", str(tmp_path / "work")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"posts_per_s", "scan_posts_per_s", "peak_rss_mb", "pairs_found", "pairs_expected"} <= set(figures)
    assert figures["pairs_found"] == figures["pairs_expected"] > 500  # 40% replies, 10% of them orphans


@pytest.mark.slow
def test_the_format_benchmark_reuses_posts_written_earlier_without_writing_beside_them(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import social_scale

    shares = {"replies": 0.4, "missing": 0.1, "retweets": 0.05, "other": 0.05, "includes_only": 0.1}
    posts = tmp_path / "held" / "posts"
    truth = social_scale.write_posts(posts, "twitter-v2", 3000, 8, 2024, shares)
    (posts.parent / "truth.json").write_text(json.dumps({"seed": 2024, "files": 8, "shares": shares, **truth}))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in posts.parent.rglob("*"))
    cmd = [sys.executable, "benchmarks/data_scale.py", "--format", "twitter-v2", "--posts", "3000", "--stages", "data",
           "--workdir", str(tmp_path / "work"), "--reuse", str(posts)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["pairs_found"] == figures["pairs_expected"] == truth["pairs_expected"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in posts.parent.rglob("*")) == before
    other = subprocess.run([*cmd[:-2], "--seed", "7", "--reuse", str(posts)], cwd=REPO, capture_output=True, text=True)
    assert other.returncode != 0 and "written with other options: seed 2024 (asked 7)" in other.stderr
