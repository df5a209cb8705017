"""Soak: `twilbert predict` streams 100,000 tweets with flat memory and one output line per input line."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import make_tweets
from test_predict import LONG, build_finetuned, build_vocab

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

# The child runs the real CLI, then reports its peak resident set (VmHWM) from /proc.
CHILD = """
import sys
from twilbert.cli import main
rc = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak_rss_kb=" + hwm.split()[1], file=sys.stderr)
sys.exit(rc)
"""


def tweets(n: int) -> list[str]:
    """Generated tweets with the hostile lines mixed in: blank, emoji-only, URL-only, 5,800 characters."""
    texts = [t for t, _ in make_tweets(n, seed=11)]
    for i in range(0, n, 1000):
        texts[i] = ""
        texts[i + 1] = "😂🙏🏽"
        texts[i + 2] = "https://t.co/xyz"
    for i in range(500, n, 10_000):
        texts[i] = LONG
    return texts


def predict_peak_rss(model, texts, tmp_path, name) -> tuple[int, float]:
    """(peak RSS in MB, seconds) of one predict run; checks one JSON line per input line, in order."""
    src, out = tmp_path / f"{name}.txt", tmp_path / f"{name}.jsonl"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: one thread avoids oversubscription
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "predict", "--model", str(model), "--input", str(src), "--output", str(out),
         "--format", "jsonl", "--no-text", "--batch-size", "128"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    n_lines = 0
    with out.open(encoding="utf-8") as fh:
        for n_lines, line in enumerate(fh, 1):
            if n_lines % 9973 == 0 or n_lines == len(texts):
                assert json.loads(line)["id"] == n_lines
    assert n_lines == len(texts)
    peak_kb = int(re.search(r"peak_rss_kb=(\d+)", done.stderr).group(1))
    return peak_kb // 1024, seconds


def test_predict_memory_stays_flat_from_10k_to_100k_tweets(tmp_path):
    vocab = build_vocab(tmp_path / "vocab")
    model = build_finetuned(tmp_path / "model", vocab, n_encoders=1, hidden_size=16, intermediate_size=32)
    texts = tweets(100_000)
    rss_10k, s_10k = predict_peak_rss(model, texts[:10_000], tmp_path, "in10k")
    rss_100k, s_100k = predict_peak_rss(model, texts, tmp_path, "in100k")
    print(f"\npredict peak RSS: {rss_10k} MB at 10k tweets ({s_10k:.1f} s), "
          f"{rss_100k} MB at 100k tweets ({s_100k:.1f} s)")
    assert rss_100k <= rss_10k * 1.25 + 50, (rss_10k, rss_100k)
