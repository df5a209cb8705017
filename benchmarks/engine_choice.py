"""DuckDB against Polars' streaming engine on the reply join, the choice behind data.source twitter:
the same v2 page files (from ``data_scale.py --format twitter-v2 --keep``), the same work: unnest
``data`` and ``includes.tweets``, keep one post per id, join each reply to its parent, and write the
pairs and single texts ordered by id. Each engine runs in its own process (wall seconds, peak RSS).

    python benchmarks/engine_choice.py /tmp/twilbert-social-scale/twitter-v2-200000/posts --threads 2

Needs polars beside duckdb (not a dependency of the project: ``pip install polars`` in a scratch venv).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DUCK = """
import duckdb, sys, json, time, resource
files, threads, out = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3]
con = duckdb.connect(config={"threads": threads, "memory_limit": "768MB", "preserve_insertion_order": False})
con.execute("SET enable_progress_bar = false")
t = time.perf_counter()
T = "STRUCT(id VARCHAR, text VARCHAR, referenced_tweets STRUCT(type VARCHAR, id VARCHAR)[])"
con.execute(f'''CREATE TABLE p AS SELECT t.id AS id, any_value(t.text) AS text,
  any_value(list_filter(t.referenced_tweets, lambda r: r.type = 'replied_to')[1].id) AS parent
  FROM (SELECT unnest(list_concat(coalesce(data, []), coalesce(includes.tweets, []))) AS t
        FROM read_json($f, format='newline_delimited', columns={{'data': '{T}[]', 'includes': 'STRUCT(tweets {T}[])'}}))
  GROUP BY t.id''', {"f": files})
# as the data stage writes: the ordered JSON lines streamed out (DuckDB's ordered COPY is single-threaded)
reader = con.sql('''SELECT to_json(struct_pack(a := coalesce(par.text, r.text),
  b := CASE WHEN par.id IS NOT NULL THEN r.text END)) FROM p r LEFT JOIN p par ON par.id = r.parent
  ORDER BY r.id''').to_arrow_reader(1 << 16)
with open(out, "w", encoding="utf-8") as fh:
    for batch in reader:
        if batch.num_rows:
            fh.write("\\n".join(batch.column(0).to_pylist()) + "\\n")
print(json.dumps({"s": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

POLARS = """
import polars as pl, sys, json, time, resource
files, threads, out = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
tw = pl.Struct({"id": pl.String, "text": pl.String,
                "referenced_tweets": pl.List(pl.Struct({"type": pl.String, "id": pl.String}))})
schema = {"data": pl.List(tw), "includes": pl.Struct({"tweets": pl.List(tw)})}
raw = pl.scan_ndjson(files, schema=schema)
tweets = (raw.select(pl.concat_list([pl.col("data").fill_null([]), pl.col("includes").struct.field("tweets").fill_null([])])
                     .alias("t")).explode("t").unnest("t")
          .with_columns(parent=pl.col("referenced_tweets").list.eval(
              pl.element().filter(pl.element().struct.field("type") == "replied_to").struct.field("id")).list.first())
          .select("id", "text", "parent").group_by("id").agg(pl.col("text").first(), pl.col("parent").first()))
par = tweets.select(pl.col("id").alias("pid"), pl.col("text").alias("ptext"))
rows = (tweets.join(par, left_on="parent", right_on="pid", how="left")
        .sort("id").select(pl.coalesce("ptext", "text").alias("a"),
                           pl.when(pl.col("ptext").is_not_null()).then(pl.col("text")).alias("b")))
rows.sink_ndjson(out, engine="streaming")
print(json.dumps({"s": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(python: str, code: str, files: list[str], threads: int, out: Path) -> dict:
    env = {**os.environ, "POLARS_MAX_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.Popen([python, "-c", code, ",".join(files), str(threads), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(stderr[-2000:])
    return {**json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1]), "wall_s": time.perf_counter() - t,
            "lines": sum(1 for _ in out.open())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("posts", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--python", default=sys.executable, help="an interpreter with duckdb and polars")
    args = parser.parse_args()
    files = sorted(str(p) for p in args.posts.glob("part-*"))
    print(f"load average {os.getloadavg()}", flush=True)
    pol = measure(args.python, POLARS, files, args.threads, Path("/tmp/engine-choice-polars.jsonl"))
    print("polars", json.dumps(pol), flush=True)
    duck = measure(args.python, DUCK, files, args.threads, Path("/tmp/engine-choice-duckdb.jsonl"))
    print("duckdb", json.dumps(duck), flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
