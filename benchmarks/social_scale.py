"""``data_scale.py --format twitter-v2|twitter-v1|bluesky|parquet|csv --posts N``: N synthetic posts in the
format's documented shape, split over files, then the real ``data`` stage (and ``vocab``, ``pairs``) on
them, against DuckDB's bare scan of the same files for the same fields, in the same run.

The posts: ``--replies`` of them reply to an earlier post, nearly always in an earlier file; of those,
``--missing`` reply to a post that is nowhere (deleted), and for twitter-v2 ``--includes-only`` have a
parent that appears only in the ``includes.tweets`` of the reply's page. ``--retweets`` are retweets
(reposts), ``--other-lang`` are in English. Parents and replies are Spanish originals, so the pairs to
find are the replies whose parent exists; the run fails if the stage finds another number.

Measured per stage: wall and CPU seconds, peak memory of the process tree (as data_scale.py), posts/s and
MB/s of input; for ``data`` also the largest size of DuckDB's files (database and spill) during the run.
Ends with one JSON line: posts_per_s, scan_posts_per_s, peak_rss_mb (largest stage), pairs_found,
pairs_expected, and the rest.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

FORMATS = ("twitter-v2", "twitter-v1", "bluesky", "parquet", "csv")
SOURCE = {"twitter-v2": "twitter", "twitter-v1": "twitter", "bluesky": "bluesky", "parquet": "parquet", "csv": "csv"}
PAGE = 100  # tweets per v2 response page


def plan(n: int, seed: int, replies: float, missing: float, retweets: float, other: float,
         includes_only: float) -> dict:
    """Which post is what: ``kind`` 0 original, 1 reply, 2 retweet, 3 other language; ``parent`` the index
    of the post replied to (-1 none, -2 a missing one, -3 one only in its page's includes)."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    kind = np.zeros(n, dtype=np.int8)
    kind[u < replies] = 1
    kind[(u >= replies) & (u < replies + retweets)] = 2
    kind[(u >= replies + retweets) & (u < replies + retweets + other)] = 3
    kind[0] = 0
    parent = np.full(n, -1, dtype=np.int64)
    eligible = np.flatnonzero(kind <= 1)  # Spanish originals and replies may be parents: chains
    rep = np.flatnonzero(kind == 1)
    # a parent among the eligible posts before the reply (uniform: mostly in earlier files)
    before = np.searchsorted(eligible, rep)  # eligible posts with a smaller index
    pick = (rng.random(len(rep)) * np.maximum(before, 1)).astype(np.int64)
    parent[rep] = eligible[np.minimum(pick, len(eligible) - 1)]
    parent[rep[before == 0]] = -2
    v = rng.random(len(rep))
    parent[rep[v < missing]] = -2
    parent[rep[(v >= missing) & (v < missing + includes_only)]] = -3
    return {"kind": kind, "parent": parent}


def _v2(i, text, lang, parent_id=None, retweet_of=None):
    t = {"id": str(10**15 + i), "text": text, "lang": lang, "author_id": str(i % 5000),
         "edit_history_tweet_ids": [str(10**15 + i)]}
    if parent_id:
        t["referenced_tweets"] = [{"type": "replied_to", "id": parent_id}]
    if retweet_of:
        t["referenced_tweets"] = [{"type": "retweeted", "id": retweet_of}]
    return t


def write_posts(root: Path, fmt: str, n: int, files: int, seed: int, shares: dict) -> dict:
    """The posts as ``files`` files under ``root``; returns the pairs to find and the posts written."""
    sys.path.insert(0, str(Path(__file__).parent))
    from data_scale import TweetGenerator

    p = plan(n, seed, **shares)
    kind, parent = p["kind"], p["parent"]
    gen = TweetGenerator(seed)
    root.mkdir(parents=True, exist_ok=True)
    per = -(-n // files)
    expected = int(np.sum(parent >= 0) + np.sum(parent == -3))
    posts_read = n
    for f in range(files):
        lo, hi = f * per, min(n, (f + 1) * per)
        if lo >= hi:
            break
        texts = gen.texts(hi - lo)
        name = root / f"part-{f:04d}"
        if fmt == "twitter-v2":
            extra_texts = gen.texts(int(np.sum(parent[lo:hi] == -3)))
            with gzip.open(f"{name}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as fh:
                k = 0
                for start in range(lo, hi, PAGE):
                    data, includes = [], []
                    for i in range(start, min(hi, start + PAGE)):
                        text, pi = texts[i - lo], parent[i]
                        if kind[i] == 2:
                            data.append(_v2(i, "RT @x: " + text, "es", retweet_of=str(10**15)))
                        elif pi == -3:
                            pid = str(2 * 10**15 + i)
                            includes.append({"id": pid, "text": extra_texts[k], "lang": "es"})
                            k += 1
                            posts_read += 1
                            data.append(_v2(i, text, "es", parent_id=pid))
                        else:
                            pid = str(10**15 + pi) if pi >= 0 else (str(3 * 10**15 + i) if pi == -2 else None)
                            data.append(_v2(i, text, "en" if kind[i] == 3 else "es", parent_id=pid))
                    fh.write(json.dumps({"data": data, "includes": {"tweets": includes},
                                         "meta": {"result_count": len(data)}}, ensure_ascii=False) + "\n")
        elif fmt == "twitter-v1":
            with open(f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for i in range(lo, hi):
                    text, pi = texts[i - lo], parent[i]
                    pid = str(10**15 + pi) if pi >= 0 else (str(3 * 10**15 + i) if pi < -1 else None)
                    t = {"created_at": "Wed Oct 10 20:19:24 +0000 2018", "id": 10**15 + i, "id_str": str(10**15 + i),
                         "text": text[:140], "truncated": len(text) > 140, "in_reply_to_status_id_str": pid,
                         "lang": "en" if kind[i] == 3 else "es", "user": {"id_str": str(i % 5000)}}
                    if len(text) > 140:
                        t["extended_tweet"] = {"full_text": text}
                    if kind[i] == 2:
                        t["retweeted_status"] = {"id_str": str(10**15)}
                    fh.write(json.dumps(t, ensure_ascii=False) + "\n")
        elif fmt == "bluesky":
            with open(f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for i in range(lo, hi):
                    text, pi = texts[i - lo], parent[i]
                    coll = "app.bsky.feed.repost" if kind[i] == 2 else "app.bsky.feed.post"
                    rec = {"$type": coll, "createdAt": "2024-12-21T10:00:00.000Z", "text": text,
                           "langs": ["en" if kind[i] == 3 else "es"]}
                    if pi != -1:
                        uri = (f"at://did:plc:u{pi % 5000}/app.bsky.feed.post/r{pi}" if pi >= 0
                               else f"at://did:plc:gone/app.bsky.feed.post/r{i}")
                        rec["reply"] = {"root": {"uri": uri, "cid": "bafy"}, "parent": {"uri": uri, "cid": "bafy"}}
                    fh.write(json.dumps({"did": f"did:plc:u{i % 5000}", "time_us": 1703123456789012 + i, "kind": "commit",
                                         "commit": {"rev": "3l3q", "operation": "create", "collection": coll,
                                                    "rkey": f"r{i}", "record": rec, "cid": "bafy"}},
                                        ensure_ascii=False) + "\n")
        else:
            ids = [str(10**15 + i) for i in range(lo, hi)]
            reply_to = [None if parent[i] == -1 else str(10**15 + parent[i]) if parent[i] >= 0
                        else str(3 * 10**15 + i) for i in range(lo, hi)]
            langs = ["en" if kind[i] == 3 else "es" for i in range(lo, hi)]
            if fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table({"id": ids, "text": texts, "reply_to": reply_to, "lang": langs}),
                               f"{name}.parquet", row_group_size=100_000)
            else:
                with open(f"{name}.csv", "w", encoding="utf-8", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["id", "text", "reply_to", "lang"])
                    w.writerows(zip(ids, texts, reply_to, langs))
    return {"pairs_expected": expected, "posts_written": posts_read}


def overrides_for(fmt: str, root: Path) -> list[str]:
    pattern = f"data.posts_file={root}/part-*"
    out = [f"data.source={SOURCE[fmt]}", pattern, f"data.corpus_dir={root}", "data.lang=es"]
    if fmt in ("parquet", "csv"):
        out += ["data.id_column=id", "data.reply_to_column=reply_to", "data.lang_column=lang"]
    return out


SCAN = """
import json, sys, time
from pathlib import Path
import duckdb
from twilbert.data import social_read as r
fmt, files, threads, mem = sys.argv[1], sorted(map(str, Path(sys.argv[2]).glob('part-*'))), int(sys.argv[3]), sys.argv[4]
con = duckdb.connect(config={"threads": threads, "memory_limit": mem})
con.execute("SET enable_progress_bar = false")  # past 2 s (a loaded host) it drew over the JSON line, as in the stage
if fmt in ("twitter", "bluesky"):
    sql = r.twitter_sql() if fmt == "twitter" else r.bluesky_sql()
elif fmt == "parquet":
    sql = r.table_sql(r.parquet_scan(), "text", "id", "reply_to", "lang")
else:
    sql = r.table_sql(r.csv_scan(",", ["id", "text", "reply_to", "lang"]), "text", "id", "reply_to", "lang")
t = time.perf_counter()
n = con.execute(f"SELECT count(*), count(id), count(parent), sum(length(text)), count(langs) FROM ({sql})",
                {"files": files}).fetchall()[0]
print(json.dumps({"posts": n[0], "s": time.perf_counter() - t}))
"""


def spill_sampler(folder: Path, peak: list, done: threading.Event) -> None:
    while not done.wait(0.5):
        size = 0
        for d in folder.glob(".join-*"):
            size += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        peak[0] = max(peak[0], size)


def reused_truth(posts: Path, n: int, seed: int, files: int, shares: dict) -> dict:
    """The truth.json beside a folder of posts written earlier by :func:`write_posts`, checked against
    this run's options: a measurement must not count pairs against another corpus's truth."""
    truth_file = posts.parent / "truth.json"
    if not truth_file.is_file():
        raise SystemExit(f"--reuse {posts}: no {truth_file} (written with the posts, once they are complete)")
    truth = json.loads(truth_file.read_text())
    asked = {"seed": seed, "files": files, "shares": shares}
    differ = [f"{k} {truth.get(k)!r} (asked {v!r})" for k, v in asked.items() if truth.get(k) != v]
    if differ:
        raise SystemExit(f"--reuse {posts}: written with other options: {'; '.join(differ)}")
    found = len(list(posts.glob("part-*")))
    if found != files:
        raise SystemExit(f"--reuse {posts}: {found} part-* files, {files} expected")
    # the posts written exceed n only by the v2 parents that are only in includes: never fewer than n
    if not n <= truth["posts_written"] < 2 * n:
        raise SystemExit(f"--reuse {posts}: {truth['posts_written']:,} posts written, not a --posts {n:,} corpus")
    return {"pairs_expected": truth["pairs_expected"], "posts_written": truth["posts_written"]}


def run(fmt: str, n: int, work: Path, seed: int, files: int, threads: int, stages: list[str], shares: dict,
        extra: list[str], reuse: Optional[Path] = None) -> dict:
    from data_scale import du, host_line, run_measured

    posts = reuse or work / f"{fmt}-{n}" / "posts"
    data = work / f"{fmt}-{n}" / "data"
    t0 = time.perf_counter()
    data.mkdir(parents=True, exist_ok=True)
    if reuse:  # read only: the stage writes under --workdir, never beside the posts
        truth = reused_truth(posts, n, seed, files, shares)
    else:
        truth = write_posts(posts, fmt, n, files, seed, shares)
    in_bytes = du(posts)
    print(f"[{fmt} {n:,} posts] {in_bytes / 1e6:.1f} MB in {files} files "
          f"{'reused from ' + str(posts) if reuse else 'written'} in {time.perf_counter() - t0:.1f} s", flush=True)
    py = sys.executable
    common = [*overrides_for(fmt, posts), f"runtime.threads={threads}", *extra]
    out: dict = {"format": fmt, "posts": n, "input_mb": in_bytes / 1e6, "threads": threads, **truth}
    # the bare scan first: the page cache then holds the files for both
    scan = run_measured([py, "-c", SCAN, SOURCE[fmt], str(posts), str(threads), "768MB"], work / "scan.log")
    scanned = json.loads(scan["output"].strip().splitlines()[-1])
    out["scan_s"] = scanned["s"]
    out["scan_cpu_s"] = scan["cpu_s"]
    out["scan_posts_per_cpu_s"] = truth["posts_written"] / scan["cpu_s"]
    out["scan_posts_per_s"] = truth["posts_written"] / scanned["s"]
    print(f"[{fmt} {n:,} posts] bare scan  {scanned['s']:8.1f} s   {out['scan_posts_per_s']:,.0f} posts/s   "
          f"{in_bytes / 1e6 / scanned['s']:.1f} MB/s   peak {scan['rss_mb']:.0f} MiB", flush=True)
    cmds = {
        "data": [py, "stages/data.py", "--out", str(data), *common],
        "vocab": [py, "stages/vocab.py", "--corpus", str(data / "pretrain" / "corpus.jsonl"), "--out",
                  str(data / "vocab"), *common],
        "pairs": [py, "stages/pairs.py", "--corpus", str(data / "pretrain" / "corpus.jsonl"), "--vocab",
                  str(data / "vocab"), "--out", str(data / "pairs"), *common],
    }
    for name in stages:
        peak, done = [0], threading.Event()
        sampler = threading.Thread(target=spill_sampler, args=(data, peak, done), daemon=True)
        sampler.start()
        m = run_measured(cmds[name], work / f"{name}.log")
        done.set()
        sampler.join()
        out[f"{name}_s"], out[f"{name}_cpu_s"], out[f"{name}_rss_mb"] = m["s"], m["cpu_s"], m["rss_mb"]
        line = f"[{fmt} {n:,} posts] {name:9s} {m['s']:8.1f} s ({m['cpu_s']:.1f} CPU s)   peak {m['rss_mb']:.0f} MiB"
        if name == "data":
            summary = json.loads((data / "pretrain" / "summary.json").read_text())
            out["summary"] = summary
            out["pairs_found"] = summary["reply_pairs_found"]
            out["posts_per_s"] = summary["posts_read"] / m["s"]
            out["posts_per_cpu_s"] = summary["posts_read"] / m["cpu_s"]
            # the stage's own account of DuckDB's phases (read, join, dedup, ordered write): the stage
            # less its start-up (imports, config), which a 200k-post run does not hide
            phases = re.search(r"data: DuckDB \(\d+ threads\): (.*?); spill", m["output"])
            if phases:
                out["engine_phases"] = phases.group(1)
                out["engine_s"] = sum(float(x) for x in re.findall(r"([\d.]+) s", phases.group(1)))
                if out["engine_s"] > 0:  # logged to 0.1 s: a tiny run may read 0.0
                    out["engine_posts_per_s"] = summary["posts_read"] / out["engine_s"]
            cpu = re.search(r"data: DuckDB CPU s per phase \(.*?\): (.*)", m["output"])
            if cpu:  # which phase runs on one core: its CPU seconds near its wall seconds
                out["engine_phases_cpu_s"] = cpu.group(1).strip()
            out["spill_mb"] = peak[0] / 1e6
            line += (f"   engine {out.get('engine_phases')} (CPU s {out.get('engine_phases_cpu_s')})   "
                     f"{out['posts_per_s']:,.0f} posts/s   "
                     f"{in_bytes / 1e6 / m['s']:.1f} MB/s   engine files "
                     f"at most {out['spill_mb']:.0f} MB   pairs {out['pairs_found']:,} of {truth['pairs_expected']:,}")
        print(line, flush=True)
    out["peak_rss_mb"] = max(out[f"{s}_rss_mb"] for s in stages)
    out["ingest_over_scan"] = out.get("posts_per_s", 0) / out["scan_posts_per_s"]
    # on a loaded host the wall clock measures the neighbours too: CPU seconds say what each costs
    out["ingest_over_scan_cpu"] = out.get("posts_per_cpu_s", 0) / out["scan_posts_per_cpu_s"]
    out["host"] = host_line()
    return out


def add_arguments(parser) -> None:
    """data_scale.py's options for this benchmark."""
    social = parser.add_argument_group("posts as researchers hold them (benchmarks/social_scale.py)")
    social.add_argument("--format", choices=("twitter-v2", "twitter-v1", "bluesky", "parquet", "csv"),
                        help="measure data.source twitter/bluesky/parquet/csv on --posts synthetic posts instead")
    social.add_argument("--posts", type=int, nargs="+", default=[100_000])
    social.add_argument("--files", type=int, default=8, help="files the posts are split over")
    social.add_argument("--threads", type=int, help="runtime.threads (default: the cores)")
    social.add_argument("--stages", default="data,vocab,pairs", help="stages to run, comma-separated")
    social.add_argument("--replies", type=float, default=0.4, help="share of posts that reply to another")
    social.add_argument("--missing", type=float, default=0.1, help="share of replies whose parent is nowhere")
    social.add_argument("--includes-only", type=float, default=0.1,
                        help="twitter-v2: share of replies whose parent is only in the page's includes")
    social.add_argument("--retweets", type=float, default=0.05)
    social.add_argument("--other-lang", type=float, default=0.05)
    social.add_argument("--reuse", type=Path, metavar="DIR",
                        help="read the posts from DIR (written earlier, with truth.json beside it: one --posts) "
                             "instead of writing them; DIR is only read")


def main(args, extra: list[str]) -> None:
    from data_scale import host_line

    work = Path(args.workdir or "/tmp/twilbert-social-scale")
    shares = {"replies": args.replies, "missing": args.missing, "retweets": args.retweets,
              "other": args.other_lang, "includes_only": args.includes_only if args.format == "twitter-v2" else 0.0}
    threads = args.threads or len(os.sched_getaffinity(0))
    print(host_line(), flush=True)
    if args.reuse and len(set(args.posts)) != 1:
        raise SystemExit("--reuse DIR holds one corpus: give one --posts")
    result: Optional[dict] = None
    for n in sorted(set(args.posts)):
        result = run(args.format, n, work, args.seed, args.files, threads, args.stages.split(","), shares, extra,
                     args.reuse)
        if result.get("pairs_found") != result["pairs_expected"]:
            raise SystemExit(f"pairs found {result.get('pairs_found')} != pairs generated {result['pairs_expected']}")
        if not args.keep:
            import shutil

            shutil.rmtree(work / f"{args.format}-{n}", ignore_errors=True)
    print(host_line(), flush=True)
    keep = ("format", "posts", "threads", "posts_per_s", "scan_posts_per_s", "ingest_over_scan", "engine_posts_per_s",
            "engine_s", "engine_phases", "engine_phases_cpu_s", "posts_per_cpu_s",
            "scan_posts_per_cpu_s", "ingest_over_scan_cpu", "peak_rss_mb",
            "pairs_found", "pairs_expected", "spill_mb", "input_mb", "data_s", "data_rss_mb", "vocab_s",
            "vocab_rss_mb", "pairs_s", "pairs_rss_mb", "scan_s")
    print(json.dumps({k: result[k] for k in keep if k in result}))
