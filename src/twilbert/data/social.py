"""Real reply pairs out of social-media posts (``data.source`` twitter, bluesky, parquet, csv), joined out
of core by DuckDB: the posts are read (:mod:`twilbert.data.social_read`), filtered (retweets, language,
empty texts: each counted), made unique by id, and every reply whose parent is anywhere in the corpus
becomes a ``(parent, reply)`` row; the other posts go on as single texts ``(text, None)``. The rows then
pass the checks every source's rows pass (``write_pretrain_corpus``: a printable character, exact
duplicates dropped by the same normalization), done here in SQL so that they too run out of core.

DuckDB works in memory up to ``data.engine_memory`` and spills to a temporary folder beside the
output past it (removed at the end). The rows come out in one total order (ORDER BY the reply's id, or
the post's), so the bytes do not depend on the thread count or on which file a post came from.
"""
from __future__ import annotations

import csv as _csv
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from twilbert.config import DataConfig
from twilbert.data.formats import DataFormatError
from twilbert.data.social_read import (
    OTHER_SPACE,
    SPACE,
    EngineError,
    bluesky_problem,
    bluesky_sql,
    clean_copy,
    csv_header_sql,
    csv_scan,
    open_binary,
    parquet_scan,
    parse_json_error,
    table_sql,
    twitter_problem,
    twitter_sql,
)

log = logging.getLogger(__name__)

SOCIAL_SOURCES = ("twitter", "bluesky", "parquet", "csv")
SkipBad = Callable[[str, int, str], bool]


def engine_threads(threads: Optional[int]) -> int:
    return threads if threads and threads > 0 else (os.cpu_count() or 1)


def _connect(tmp: Path, cfg: DataConfig, threads: int):
    import duckdb  # imported here: the other sources and later stages never load it

    # in memory, spilling to temp_directory past memory_limit: a database file would add its WAL and fsyncs
    con = duckdb.connect(":memory:", config={
        "threads": threads, "memory_limit": cfg.engine_memory, "temp_directory": str(tmp / "spill"),
        # the output's order is fixed by ORDER BY; insertion order would only cost memory
        "preserve_insertion_order": False,
    })
    con.execute("SET enable_progress_bar = false")  # it would draw over the stage's log and its JSON summary
    return con


def _load_json(con, sql: str, files: list[str], problem_of, skip_bad: SkipBad, tmp: Path) -> dict[str, str]:
    """Create ``recs`` from JSON files; a malformed line is found (DuckDB names file and line), offered
    to ``skip_bad``, and the file read again from a copy without its bad lines. Returns copy -> original."""
    import duckdb

    copies: dict[str, str] = {}  # original -> clean copy
    while True:
        try:
            con.execute(f"CREATE OR REPLACE TABLE recs AS {sql}", {"files": [copies.get(f, f) for f in files]})
            return {v: k for k, v in copies.items()}
        except (duckdb.InvalidInputException, duckdb.ConversionException) as err:
            message = str(err)
            found = parse_json_error(message)
            if found is None:
                raise EngineError(f"data.posts_file: DuckDB could not read the posts: {message.splitlines()[0]}") from None
            file, line, problem = found
            if file in copies.values() or file not in files:  # a copy is already clean: the reader and we disagree
                original = next((o for o, c in copies.items() if c == file), file)
                raise DataFormatError(original, [(None, f"malformed JSON near line {line}: {problem}")]) from None
            # Each bad line of the file is found, offered to skip_bad (this one among them), and left out
            copies[file] = str(tmp / f"clean-{len(copies)}.jsonl")
            clean_copy(Path(file), Path(copies[file]), problem_of, skip_bad)


def _drop_problem_records(con, problem_of, skip_bad: SkipBad, originals: dict[str, str], tmp: Path) -> None:
    """Records DuckDB read but that are no post (no id, no text): find their lines, offer each to
    ``skip_bad``, and delete them from ``recs``."""
    bad = con.execute("SELECT filename, any_value(problem) FROM recs WHERE problem IS NOT NULL "
                      "GROUP BY filename ORDER BY filename").fetchall()
    for file, problem in bad:
        original = originals.get(file, file)
        if problem_of is not None:
            dropped = clean_copy(Path(original), tmp / "located.jsonl", problem_of, skip_bad)
            if dropped:
                continue
        if not skip_bad(original, 0, problem):  # reader and locator disagree: still counted, never silent
            raise DataFormatError(original, [(None, problem)])
    con.execute("DELETE FROM recs WHERE problem IS NOT NULL")


def _load_table(con, cfg: DataConfig, files: list[str], skip_bad: SkipBad) -> None:
    """Create ``recs`` from CSV or Parquet files; each must hold the configured columns. CSV files are
    read in groups of the same header."""
    import duckdb

    csv = cfg.source == "csv"
    wanted = {"data.text_column": cfg.text_column, "data.id_column": cfg.id_column,
              "data.reply_to_column": cfg.reply_to_column, "data.lang_column": cfg.lang_column}
    groups: dict[tuple, list[str]] = {}
    for file in files:
        try:
            if csv:
                names = csv_header(con, file, cfg.csv_delimiter)
            else:
                names = [d[0] for d in con.execute(f"DESCRIBE SELECT * FROM {parquet_scan()}", {"files": [file]}).fetchall()]
        except duckdb.Error as err:
            raise DataFormatError(file, [(None, f"not readable as {cfg.source}: {str(err).splitlines()[0]}")]) from None
        for key, name in wanted.items():
            if name is not None and name not in names:
                raise DataFormatError(file, [(1 if csv else None, f"no column {name!r} (set by {key}); "
                                              f"the columns are {', '.join(names[:20])}")])
        groups.setdefault(tuple(names) if csv else (), []).append(file)
    sql = "CREATE OR REPLACE TABLE recs AS"
    for header, group in groups.items():
        scan = csv_scan(cfg.csv_delimiter, list(header)) if csv else parquet_scan()
        try:
            read = table_sql(scan, cfg.text_column, cfg.id_column, cfg.reply_to_column, cfg.lang_column)
            con.execute(f"{sql} {classified(read, cfg)}", {"files": group})
        except duckdb.Error as err:
            raise EngineError(f"data.posts_file: DuckDB could not read the posts: {str(err).splitlines()[0]}") from None
        sql = "INSERT INTO recs"
    if csv:
        rejects = con.execute("SELECT s.file_path, e.line, string_agg(e.error_message, '; ' ORDER BY e.error_message) "
                              "FROM reject_errors e JOIN reject_scans s ON e.scan_id = s.scan_id AND e.file_id = s.file_id "
                              "GROUP BY ALL ORDER BY 1, 2").fetchall()
        for file, line, message in rejects:
            problem = f"not an RFC 4180 CSV row: {message.splitlines()[0]}"
            if not skip_bad(file, int(line), problem):
                raise DataFormatError(file, [(int(line), problem)])


def csv_header(con, file: str, delimiter: str) -> list[str]:
    """The column names of a CSV file's first line (a header's names hold no line break)."""
    if file.endswith(".zst"):  # no zstd reader in Python's standard library: DuckDB's own
        first = con.execute(csv_header_sql(), {"files": [file]}).fetchall()
        line = first[0][0] if first else ""
    else:
        with open_binary(Path(file)) as fh:
            line = fh.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
    return next(_csv.reader([line], delimiter=delimiter), [])


def _lang_fate(cfg: DataConfig) -> str:
    if cfg.lang is None:
        return ""
    lang = cfg.lang.lower().replace("'", "''")
    untagged = "" if cfg.keep_untagged else "WHEN langs IS NULL THEN 'untagged_language_dropped' "
    return (f"{untagged}WHEN langs IS NOT NULL AND NOT list_bool_or(list_transform(langs, "
            f"lambda l: lower(l) = '{lang}' OR starts_with(lower(l), '{lang}-'))) THEN 'other_language_dropped' ")


def classified(read_sql: str, cfg: DataConfig) -> str:
    """The posts of ``read_sql`` with their text collapsed and their fate: kept, or why they are dropped;
    and for a kept post what the corpus rows need of its text, ``pt`` (it holds a printable character)
    and ``nh`` (the digest of its dedup form, :func:`normalized_steps`). One pass: filtering while
    reading costs no second table, and each text is looked at once, not once per row it is in.

    ``odd``: the text holds whitespace to collapse or a character lower() changes. One regexp scan of
    every text for both (most tweets hold neither); only the odd ones are looked at again."""
    fated = f"""
        SELECT CASE WHEN problem IS NOT NULL THEN filename END AS filename, id, parent, problem, text, odd,
               CASE WHEN skip THEN 'events_skipped' WHEN problem IS NOT NULL THEN 'bad'
                    WHEN retweet THEN 'retweets_dropped' {_lang_fate(cfg)}
                    WHEN text IS NULL OR text = '' THEN 'empty_texts_dropped' ELSE 'kept' END AS fate
        FROM (SELECT filename, id, parent, problem, skip, retweet, langs, odd, {collapsed('text', 'odd')} AS text
              FROM (SELECT *, regexp_matches(text, '{UNCOLLAPSED}|{LOWERED}') AS odd FROM ({read_sql})))"""
    if not cfg.dedup:
        return (f"SELECT * EXCLUDE (odd), CASE WHEN fate = 'kept' THEN {printable('text')} END AS pt, "
                f"NULL::UBIGINT AS nh FROM ({fated})")
    sql = f"SELECT *, CASE WHEN fate = 'kept' THEN text END AS n FROM ({fated})"
    for step in normalized_steps("n", "odd"):
        sql = f"SELECT * REPLACE ({step} AS n) FROM ({sql})"
    return (f"SELECT * EXCLUDE (n, odd), CASE WHEN fate = 'kept' THEN {printable('text')} END AS pt, "
            f"CASE WHEN fate = 'kept' THEN hash(n) END AS nh FROM ({sql})")


def _build_rows(con, cfg: DataConfig) -> dict[str, int]:
    """From ``recs`` to the table ``rows`` (k, a, b, h, ok): the found pairs ``(parent, reply)`` and the
    other posts ``(text, NULL)``, each with its dedup digest and whether both texts are printable;
    return the counts."""
    fates = dict(con.execute("SELECT fate, count(*) FROM recs GROUP BY fate").fetchall())
    skipped = fates.pop("events_skipped", 0)
    con.execute("ALTER TABLE recs RENAME TO cls")
    # One post per id: the longest text (a note tweet over its truncated text), then a fixed order
    # (pt and nh follow from the text: they never decide). Most ids are seen once: only the few seen
    # more often go through the (costlier) aggregate.
    con.execute("CREATE OR REPLACE TABLE dup AS SELECT id FROM cls WHERE fate = 'kept' GROUP BY id HAVING count(*) > 1")
    # a view when no id is seen twice (the usual case): the posts are not copied
    p = "SELECT id, parent, text, pt, nh FROM cls WHERE fate = 'kept'"
    if con.execute("SELECT count(*) FROM dup").fetchall()[0][0]:
        p = f"""{p} AND (id IS NULL OR id NOT IN (SELECT id FROM dup))
            UNION ALL
            SELECT id, nullif(m.p, '') AS parent, m.t AS text, m.g AS pt, m.h AS nh FROM (
              SELECT id, max(struct_pack(l := length(text), t := text, p := coalesce(parent, ''), g := pt, h := nh)) AS m
              FROM cls WHERE fate = 'kept' AND id IN (SELECT id FROM dup) GROUP BY id)"""
        con.execute(f"CREATE OR REPLACE TABLE p AS {p}")
    else:
        con.execute(f"CREATE OR REPLACE VIEW p AS {p}")
    # the pairs by their ids alone: the texts are fetched once, into the rows
    con.execute("""CREATE OR REPLACE TABLE pr AS
        SELECT r.id AS rid, r.parent AS pid FROM p r JOIN p par ON par.id = r.parent WHERE r.id <> r.parent""")
    posts, replies = con.execute("SELECT count(*), count(parent) FROM p").fetchall()[0]
    pairs = con.execute("SELECT count(*) FROM pr").fetchall()[0][0]
    chains = con.execute("SELECT count(*) FROM pr WHERE rid IN (SELECT pid FROM pr)").fetchall()[0][0]
    # A post with a parent (ids unique: one at most) is a pair's reply (the join's table holds the
    # posts replied to only, not every post's text); a post that is no pair's reply
    # nor parent is a text of its own. k orders the output: the reply's id, or the post's; a post
    # without an id goes by its text (after a \x01 no id starts with). The dedup digest of a row is
    # that of its texts' digests: rows share it exactly when their texts' dedup forms are the same
    # a view: its texts are read once, by the ordered write, and the counts and digests before it
    # only read the ids and digests
    con.execute("""CREATE OR REPLACE VIEW rows AS
        SELECT coalesce(r.id, chr(1) || r.text) AS k,
               CASE WHEN par.id IS NULL THEN r.text ELSE par.text END AS a,
               CASE WHEN par.id IS NULL THEN NULL ELSE r.text END AS b,
               CASE WHEN par.id IS NULL THEN hash(r.nh, NULL::UBIGINT) ELSE hash(par.nh, r.nh) END AS h,
               CASE WHEN par.id IS NULL THEN r.pt ELSE par.pt AND r.pt END AS ok
        FROM p r LEFT JOIN (SELECT * FROM p WHERE id IN (SELECT pid FROM pr)) par
          ON par.id = r.parent AND r.id <> r.parent
        WHERE par.id IS NOT NULL OR r.id IS NULL OR r.id NOT IN (SELECT pid FROM pr)""")
    counts = {"posts_read": sum(fates.values())}
    if cfg.source == "bluesky":
        counts["events_skipped"] = skipped
    for key in ("retweets_dropped", "other_language_dropped", "untagged_language_dropped", "empty_texts_dropped"):
        counts[key] = fates.get(key, 0)
    counts.update(duplicate_ids_removed=fates.get("kept", 0) - posts, posts=posts, replies=replies,
                  reply_pairs_found=pairs, replies_parent_missing=replies - pairs, reply_chains=chains)
    return counts


UNCOLLAPSED = f"  |^ | $|{OTHER_SPACE}"  # what " ".join(text.split()) changes


def collapsed(col: str, odd: str = "true") -> str:
    """``col`` with whitespace runs as one space and no blank at either end (" ".join(text.split())):
    the regexp only where it changes something (and where ``odd``, a test it implies), a tenth of its
    cost on tweets."""
    return (f"CASE WHEN {odd} AND regexp_matches({col}, '{UNCOLLAPSED}') "
            f"THEN trim(regexp_replace({col}, '{SPACE}+', ' ', 'g')) ELSE {col} END")


URL = "(?:https?://|www\\.)\\S*"
USER = "@[\\pL\\pN\\pM_]+"


# Every character DuckDB's lower() changes (lower maps one character at a time): upper and title case
# letters, Roman numerals, circled letters (tests/test_sources_social.py checks every code point)
LOWERED = "[\\p{Lu}\\p{Lt}\\x{2160}-\\x{216f}\\x{24b6}-\\x{24cf}]"


def normalized_steps(c: str, odd: str = "true") -> list[str]:
    """The steps from a (collapsed) text ``c`` to its dedup form, as :func:`twilbert.data.dedup.normalized`:
    lowercase, URLs and @users as placeholders, no leading ``RT @user:``. Each a subquery's column, its
    function only where it changes something (a cheap test first: most tweets need none of them);
    ``odd`` is false only for texts without a character of :data:`LOWERED` (collapsing keeps them)."""
    return [f"CASE WHEN {odd} AND regexp_matches({c}, '{LOWERED}') THEN lower({c}) ELSE {c} END",
            f"CASE WHEN contains({c}, '://') OR contains({c}, 'www.') THEN regexp_replace({c}, '{URL}', 'url', 'g') "
            f"ELSE {c} END",
            f"CASE WHEN contains({c}, '@') THEN regexp_replace({c}, '{USER}', '@user', 'g') ELSE {c} END",
            f"CASE WHEN starts_with({c}, 'rt @user') THEN regexp_replace({c}, '^rt @user:? ?', '') ELSE {c} END"]


def printable(col: str) -> str:
    # twilbert.data.formats.has_printable: a character that is neither a control/format mark nor blank
    return f"CASE WHEN regexp_matches({col}, '[!-~]') THEN true ELSE regexp_matches({col}, '[^\\pC\\pZ]') END"


def _final_rows(con, cfg: DataConfig) -> tuple[str, dict[str, int]]:
    """The corpus rows' query (k, a, b): printable, without exact duplicates when ``data.dedup`` (the first
    in output order kept, as the other sources keep the first read); and the counts so far."""
    # the rows counted by digest: one pass over the join (of ids and digests only)
    con.execute("CREATE OR REPLACE TABLE hc AS SELECT h, ok, count(*) AS c FROM rows GROUP BY h, ok")
    n_rows, n_ok, n_dup = con.execute("SELECT sum(c), sum(c) FILTER (WHERE ok), count(*) FILTER (WHERE ok AND c > 1) "
                                      "FROM hc").fetchall()[0]
    n_rows, n_ok = int(n_rows or 0), int(n_ok or 0)
    fin = "SELECT k, a, b FROM rows WHERE ok"
    if cfg.dedup and n_dup:  # as for ids: only the rows whose digest is seen more than once are aggregated
        con.execute("CREATE OR REPLACE TABLE dup AS SELECT h FROM hc WHERE ok AND c > 1")
        fin = """SELECT k, a, b FROM rows WHERE ok AND h NOT IN (SELECT h FROM dup)
                 UNION ALL
                 SELECT k, m.a, m.b FROM (SELECT h, min(k) AS k, arg_min(struct_pack(a := a, b := b), k) AS m
                                          FROM rows WHERE ok AND h IN (SELECT h FROM dup) GROUP BY h)"""
    return fin, {"rows_read": n_rows, "unprintable_removed": n_rows - n_ok}


def _write(con, fin: str, path: Path) -> tuple[int, int]:
    """The rows of ``fin`` as JSON lines (``{"a":...,"b":...}``, rendered by DuckDB), in one total order,
    into a temporary file renamed over ``path`` when complete. Returns the lines and those with a reply.

    The sorted lines stream out of DuckDB as Arrow batches, each written as its one buffer of string
    bytes (each line ends in its newline): no Python object per row, and half the CPU of DuckDB's
    COPY of a sorted table (a table first, as an ordered COPY writes on one thread)."""
    import numpy as np
    import pyarrow as pa

    # k is unique but for posts without an id, whose k is their text: rows of the same k are the same
    # bytes, so ORDER BY k is a total order of the output
    con.execute("SET preserve_insertion_order = true")
    con.execute("SET arrow_large_buffer_size = true")  # 64-bit offsets: a batch of long texts may pass 2 GiB
    # rendered after the sort, as its result streams out in order (insertion order preserved): the sort
    # moves the texts, not their JSON, and the rendering overlaps the fetch (~0.2 CPU s less at 1M)
    reader = con.sql(f"""SELECT to_json(struct_pack(a := a, b := b)) || chr(10) AS line, b IS NOT NULL AS pair
                         FROM (SELECT k, a, b FROM ({fin}) ORDER BY k)""").to_arrow_reader(1 << 13)
    lines = pairs = 0
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            for batch in reader:
                col = batch.column(0)
                if col.type != pa.large_string():  # as set above; a string view too would hold the bytes apart
                    col = col.cast(pa.large_string())
                offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset:col.offset + len(col) + 1]
                out.write(memoryview(col.buffers()[2])[offsets[0]:offsets[-1]])
                lines += len(col)
                pairs += batch.column(1).true_count
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return lines, pairs


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def social_corpus(cfg: DataConfig, files: list[Path], skip_bad: SkipBad, threads: Optional[int],
                  corpus_file: Path, source: str) -> dict[str, int]:
    """Write the corpus rows ``(parent, reply)`` / ``(text, None)`` of the posts in ``files`` to
    ``corpus_file`` (atomically), in their fixed order; return the counts. The engine's files live in a
    temporary folder beside ``corpus_file``'s folder until the end."""
    workdir = corpus_file.parent.parent
    workdir.mkdir(parents=True, exist_ok=True)
    corpus_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".join-", dir=workdir))
    con = None
    try:
        con = _connect(tmp, cfg, engine_threads(threads))
        names = [str(f) for f in files]
        clock = [(time.perf_counter(), time.process_time())]

        def lap() -> str:
            clock.append((time.perf_counter(), time.process_time()))
            return f"{clock[-1][0] - clock[-2][0]:.1f} s"

        def cpu() -> str:  # this process's CPU seconds per phase: on a loaded host wall time measures the neighbours
            return ", ".join(f"{b[1] - a[1]:.1f}" for a, b in zip(clock, clock[1:]))

        if cfg.source in ("twitter", "bluesky"):
            problem_of = twitter_problem if cfg.source == "twitter" else bluesky_problem
            sql = twitter_sql() if cfg.source == "twitter" else bluesky_sql()
            originals = _load_json(con, classified(sql, cfg), names, problem_of, skip_bad, tmp)
            _drop_problem_records(con, problem_of, skip_bad, originals, tmp)
        else:
            _load_table(con, cfg, names, skip_bad)
        laps = [f"read {lap()}"]
        counts = _build_rows(con, cfg)
        laps.append(f"join {lap()}")
        fin, written = _final_rows(con, cfg)
        laps.append(f"dedup {lap()}")
        if not written["rows_read"]:
            raise EngineError(f"{source}: no posts to pretrain on (summary so far: {counts})")
        spill = du(tmp)
        texts, pairs = _write(con, fin, corpus_file)
        n_ok = written["rows_read"] - written["unprintable_removed"]
        written.update(duplicates_removed=n_ok - texts, pretrain_texts=texts, pretrain_pairs_with_reply=pairs)
        laps.append(f"ordered write {lap()}")
        log.info("data: DuckDB CPU s per phase (read, join, dedup, ordered write): %s", cpu())
        log.info("data: DuckDB (%d threads): %s; spill %.1f MB before the write, %.1f MB after (in %s; removed)",
                 engine_threads(threads), ", ".join(laps), spill / 1e6, du(tmp) / 1e6, tmp)
        return {**counts, **written}
    except Exception as err:
        if type(err).__name__ == "OutOfMemoryException":  # duckdb's, imported lazily
            raise EngineError(f"{source}: DuckDB ran out of data.engine_memory={cfg.engine_memory} "
                              f"({str(err).splitlines()[0]}); raise data.engine_memory, or lower runtime.threads") from None
        raise
    finally:
        if con is not None:
            con.close()
        shutil.rmtree(tmp, ignore_errors=True)
