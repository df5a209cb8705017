"""Peak resident memory of `twilbert predict` as it streams a long input: flat after the first chunk?

Runs the real CLI (``twilbert predict --input FILE --output FILE``) in a child process and reads its
peak resident set (VmHWM, /proc) each time a chunk has been scored and written, and prints it at
10k, 50k and 100k lines (every ``--every`` lines up to ``--n``). The input mixes the hostile lines of
the soak test (blank, emoji-only, URL-only, 5,800 characters) into tweet-like texts of 3-45 words.

    python benchmarks/predict_memory.py                          # synthetic tiny model, 100k lines
    python benchmarks/predict_memory.py --synthetic small --n 100000
    python benchmarks/predict_memory.py --model models/finetuned/tass_default

Prints the figures, then one JSON line: {"peak_rss_mb": {"10000": .., ...}, "growth_after_first": ..}.
Linux only (/proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_throughput import SYNTHETIC, make_texts, synthetic_model  # noqa: E402

LONG = "odio el tráfico de la ciudad " * 200  # ~5,800 characters

# The child: the real CLI, with `inputs.chunked` wrapped so that the peak RSS is read each time the
# previous chunk has been scored and written (the generator is resumed only then).
CHILD = r"""
import json, sys
import twilbert.inference.inputs as inputs
from twilbert.cli import main

every, marks, real = int(sys.argv[1]), {}, inputs.chunked

def peak_kb():
    with open("/proc/self/status") as fh:
        return int(next(l for l in fh if l.startswith("VmHWM:")).split()[1])

def watched(rows, name, size=inputs.CHUNK_SIZE, **options):
    done = 0
    marks[0] = peak_kb()  # the model loaded, no line read yet
    for chunk in real(rows, name, size, **options):
        yield chunk
        done += len(chunk.texts)
        if done % every == 0:
            marks[done] = peak_kb()

inputs.chunked = watched
rc = main(sys.argv[2:])
print("MARKS " + json.dumps(marks), file=sys.stderr)
sys.exit(rc)
"""


def hostile_texts(n: int) -> list[str]:
    texts = make_texts(n, seed=11)
    for i in range(0, n, 1000):
        texts[i] = ""
        if i + 2 < n:
            texts[i + 1], texts[i + 2] = "😂🙏🏽", "https://t.co/xyz"
    for i in range(500, n, 10_000):
        texts[i] = LONG
    return texts


def peak_rss_marks(model: Path, texts: list[str], tmp: Path, every: int, batch_size: int,
                   extra: list[str]) -> dict[int, float]:
    """{lines done: peak RSS in MB} of one `twilbert predict` run over ``texts``."""
    src, out = tmp / "in.txt", tmp / "out.tsv"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(every), "predict", "--model", str(model), "--input", str(src),
         "--output", str(out), "--no-text", "--batch-size", str(batch_size), "--chunk-size", str(every), *extra],
        capture_output=True, text=True, env=env,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    with out.open(encoding="utf-8") as fh:
        n_out = sum(1 for _ in fh) - 1  # the header
    if n_out != len(texts):
        raise SystemExit(f"{n_out} output lines for {len(texts)} input lines")
    line = next(row for row in done.stderr.splitlines() if row.startswith("MARKS "))
    return {int(k): v / 1024 for k, v in json.loads(line[len("MARKS "):]).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="finetuned model directory (default: a synthetic one)")
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), default="tiny")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per text of a synthetic model")
    parser.add_argument("--n", type=int, default=100_000, help="input lines")
    parser.add_argument("--every", type=int, default=10_000, help="lines per chunk, and between readings")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `twilbert predict` flags")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or synthetic_model(tmp, args.synthetic, args.max_len)
        marks = peak_rss_marks(model, hostile_texts(args.n), tmp, args.every, args.batch_size, args.extra)
    loaded = marks.pop(0)
    first = marks[min(marks)]
    print(f"model: {args.model or 'synthetic ' + args.synthetic}; {args.n} lines, chunks of {args.every}, "
          f"batch size {args.batch_size}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"  peak RSS with the model loaded, before the first line: {loaded:7.1f} MB")
    for done, mb in sorted(marks.items()):
        print(f"  peak RSS after {done:>7} lines: {mb:7.1f} MB  ({100 * (mb / first - 1):+5.1f}% vs {min(marks)})")
    growth = max(marks.values()) / first - 1
    print(f"growth after the first {min(marks)} lines: {100 * growth:+.1f}% (target: at most +10%)")
    shown = {k: round(v, 1) for k, v in sorted(marks.items()) if k in (10_000, 50_000, 100_000) or k == max(marks)}
    print(json.dumps({"loaded_mb": round(loaded, 1), "peak_rss_mb": shown, "growth_after_first": round(growth, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
