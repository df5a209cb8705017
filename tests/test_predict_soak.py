"""Soak: `twilbert predict` streams 100,000 tweets with flat memory and one output line per input line."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from helpers import LONG, build_finetuned, build_vocab, make_tweets

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

# The child runs the real CLI and reports its peak resident set (VmHWM, /proc) each time a chunk of
# 10,000 lines has been scored and written: `inputs.chunked` is wrapped, and its generator is
# resumed only then. (benchmarks/predict_memory.py prints the same figures for any model.)
CHILD = """
import json, sys
import twilbert.inference.inputs as inputs
from twilbert.cli import main

marks, real = {}, inputs.chunked

def peak_kb():
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmHWM:")).split()[1])

def watched(rows, name, size=inputs.CHUNK_SIZE, **options):
    done = 0
    for chunk in real(rows, name, size, **options):
        yield chunk
        done += len(chunk.texts)
        marks[done] = peak_kb()

inputs.chunked = watched
rc = main(sys.argv[1:])
print("MARKS " + json.dumps(marks), file=sys.stderr)
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


def predict_peak_rss(model, texts, tmp_path, name) -> tuple[dict[int, float], float]:
    """({lines done: peak RSS in MB}, seconds) of one predict run; checks one JSON line per input line, in order."""
    src, out = tmp_path / f"{name}.txt", tmp_path / f"{name}.jsonl"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: one thread avoids oversubscription
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "predict", "--model", str(model), "--input", str(src), "--output", str(out),
         "--format", "jsonl", "--no-text", "--batch-size", "128", "--chunk-size", "10000"],
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
    marks = json.loads(re.search(r"MARKS (.*)", done.stderr).group(1))
    return {int(k): v / 1024 for k, v in marks.items()}, seconds


def test_predict_peak_memory_grows_under_10_percent_after_the_first_10k_of_100k_tweets(tmp_path):
    vocab = build_vocab(tmp_path / "vocab")
    model = build_finetuned(tmp_path / "model", vocab, n_encoders=1, hidden_size=16, intermediate_size=32)
    rss, seconds = predict_peak_rss(model, tweets(100_000), tmp_path, "in100k")
    assert sorted(rss) == list(range(10_000, 100_001, 10_000))
    print(f"\npredict peak RSS: {rss[10_000]:.0f} MB after 10k tweets, {rss[50_000]:.0f} MB after 50k, "
          f"{rss[100_000]:.0f} MB after 100k ({seconds:.1f} s)")
    assert max(rss.values()) <= 1.10 * rss[10_000], rss
