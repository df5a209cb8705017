"""summary.json of scripts/device_check.sh, rewritten before and after each part (standard library only).

A lent machine stops a command at its time limit, so the summary is never left for the end: at any
moment it says which parts passed, failed or timed out, and which one was running. Written through a
temporary file and a rename, so a kill mid-write leaves the previous summary whole.

    python3 scripts/device_summary.py OUT WORK DEVICE START [--running PART | --final]

Between parts (no flag) and while a part runs the summary says ``"complete": false``; ``--final``
also prints its gist in one JSON line and exits 1 unless every part passed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

TIMED_OUT = (124, 137)  # timeout(1): the part's limit passed (TERM), or it ignored TERM (KILL)
NOTES = ("attention kernels", "resume on CUDA", "predict:")  # lines the gpu tests print for the record


def read_parts(work: Path, out: Path) -> dict:
    """status.tsv (part, exit status or 'skipped', seconds, limit, log) -> one entry per part."""
    parts: dict = {}
    status = work / "status.tsv"
    lines = status.read_text(encoding="utf-8").splitlines() if status.exists() else []
    for line in lines:
        name, rc, seconds, limit, log = line.split("\t")
        skipped = not rc.lstrip("-").isdigit()
        part = {"exit": None if skipped else int(rc), "seconds": int(seconds), "limit_s": int(limit), "log": log,
                "skipped": rc if skipped else False, "timed_out": not skipped and int(rc) in TIMED_OUT}
        path = out / log
        if log != "-" and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            results = [line for line in text if line.startswith("{")]
            if results:
                try:
                    part["result"] = json.loads(results[-1])
                except json.JSONDecodeError:
                    pass
            if name == "tests":
                part["notes"] = [line.strip() for line in text if line.startswith(NOTES) or "synchronizing" in line]
        parts[name] = part
    junit = work / "tests.xml"
    if "tests" in parts and junit.is_file():
        try:
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            parts["tests"]["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        except ET.ParseError:  # a run killed while pytest wrote it
            pass
    return parts


def summarize(out: Path, work: Path, device: str, start: int, running: str = "", final: bool = False) -> dict:
    parts = read_parts(work, out)
    # a benchmark that ran out of memory (exit 3) and was replaced by the next size down is not a failure
    oom_ok = parts.get("bench_b256", {}).get("exit") == 3 and parts.get("bench_b128", {}).get("exit") == 0
    failed = [n for n, p in parts.items() if (p["exit"] not in (0, None) and not (n == "bench_b256" and oom_ok))
              or p["skipped"] == "no time left"]
    if running:
        parts[running] = {"running": True}
    return {
        "device": device,
        "ok": final and not failed,
        "complete": final,
        "running": running or None,
        "failed": failed,
        "timed_out": [n for n, p in parts.items() if p.get("timed_out")],
        "elapsed_s": int(time.time()) - start,
        "load_average": os.getloadavg()[0],
        "parts": parts,
        "note": "pipeline = vocab/pairs/pretrain/finetune stages on a generated corpus (no network for the data "
                "stage's download)",
    }


def write(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "summary.json")


def main() -> int:
    out, work, device, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    flags = sys.argv[5:]
    running = flags[1] if flags[:1] == ["--running"] else ""
    final = flags == ["--final"]
    summary = summarize(out, work, device, start, running, final)
    write(out, summary)
    if final:
        print(json.dumps({k: summary[k] for k in ("device", "ok", "failed", "timed_out", "elapsed_s")}))
    return 0 if summary["ok"] or not final else 1


if __name__ == "__main__":
    sys.exit(main())
