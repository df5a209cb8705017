"""Posts as researchers hold them, read by DuckDB into one table ``recs``: Twitter API JSON (v1.1 and
v2, told apart per record), Bluesky (Jetstream commit events, or post records with their URI),
Parquet and CSV. Every format becomes the same columns::

    filename, id, parent, text, langs (VARCHAR[]), retweet (BOOLEAN), skip (BOOLEAN), problem

``skip`` marks Bluesky events that are no post (likes, follows, deletes...); ``problem`` a record that is
no post at all (no id, no text). The field names are the platforms' own (docs/own-data.md cites them).

DuckDB parses the files in parallel and with a memory limit. A malformed record stops the stage with
``file:line: problem``, or, under ``data.max_bad_rows``, is skipped and counted: DuckDB's CSV reader
lists rejected rows with their lines; for JSON the few files with a bad record are read again in
Python, which finds each bad line, and DuckDB then reads a copy without those lines.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

from twilbert.data.formats import DataFormatError
from twilbert.errors import TwilbertError

SkipBad = Callable[[str, int, str], bool]

# Python's str.isspace() set, so that whitespace runs collapse as " ".join(text.split()) would
_OTHER = r"\t\n\x{0b}\x{0c}\r\x{1c}-\x{1f}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
OTHER_SPACE = f"[{_OTHER}]"  # every whitespace character but the blank
SPACE = f"[ {_OTHER}]"

_TWEET_FIELDS = {
    "id": "VARCHAR", "id_str": "VARCHAR", "text": "VARCHAR", "full_text": "VARCHAR",
    "extended_tweet": "STRUCT(full_text VARCHAR)", "note_tweet": "STRUCT(text VARCHAR)", "lang": "VARCHAR",
    "in_reply_to_status_id_str": "VARCHAR", "referenced_tweets": "STRUCT(type VARCHAR, id VARCHAR)[]",
    "retweeted_status": "STRUCT(id_str VARCHAR)",
}
_TWEET = "STRUCT(" + ", ".join(f'"{k}" {v}' for k, v in _TWEET_FIELDS.items()) + ")"
_PAGE_KEYS = ("data", "includes", "meta", "errors")

_POST = "STRUCT(text VARCHAR, langs VARCHAR[], reply STRUCT(parent STRUCT(uri VARCHAR)))"
_BLUESKY_FIELDS = {
    "did": "VARCHAR", "kind": "VARCHAR", "uri": "VARCHAR", "value": _POST, "record": _POST,
    "commit": f"STRUCT(operation VARCHAR, collection VARCHAR, rkey VARCHAR, record {_POST})",
}
POST_COLLECTION = "app.bsky.feed.post"
REPOST_COLLECTION = "app.bsky.feed.repost"


class EngineError(TwilbertError, RuntimeError):
    """DuckDB could not read the corpus; the message names the file."""


def _columns(fields: dict[str, str]) -> str:
    return "{" + ", ".join(f"'{k}': '{v}'" for k, v in fields.items()) + "}"


def json_scan(fields: dict[str, str]) -> str:
    # compression 'auto': .gz and .zst are read as such, on the fly. A line may hold up to 16 MiB
    # (DuckDB's default; a v2 page of 100 tweets is ~100 kB): each thread's read buffer is twice that,
    # and it comes out of data.engine_memory
    return (f"read_json($files, format='newline_delimited', columns={_columns(fields)}, filename=true, "
            "compression='auto')")


def twitter_sql() -> str:
    """One row per tweet: a v1.1 or v2 object is itself a tweet, a v2 response page holds tweets in
    ``data`` and (parents, quoted tweets) in ``includes.tweets``."""
    fields = dict(_TWEET_FIELDS, data=f"{_TWEET}[]", includes=f"STRUCT(tweets {_TWEET}[])", meta="JSON",
                  errors="JSON")
    own = "struct_pack(" + ", ".join(f'"{k}" := "{k}"' for k in _TWEET_FIELDS) + ")"
    page = " OR ".join(f"{k} IS NOT NULL" for k in _PAGE_KEYS)
    return f"""
    SELECT filename, id, parent, text, CASE WHEN lang IS NULL OR lang = 'und' THEN NULL ELSE [lang] END AS langs,
           retweet, false AS skip,
           CASE WHEN id IS NULL THEN 'not a tweet: no id_str or id (nor a v2 page with data/includes)'
                WHEN text IS NULL AND NOT retweet THEN 'tweet ' || id || ' has no text' END AS problem
    FROM (
      SELECT filename, coalesce(t.id_str, t.id) AS id,
             coalesce(t.in_reply_to_status_id_str,
                      list_filter(t.referenced_tweets, lambda r: r.type = 'replied_to')[1].id) AS parent,
             coalesce(t.extended_tweet.full_text, t.note_tweet.text, t.full_text, t.text) AS text, t.lang AS lang,
             (t.retweeted_status IS NOT NULL
              OR coalesce(len(list_filter(t.referenced_tweets, lambda r: r.type = 'retweeted')), 0) > 0) AS retweet
      FROM (
        SELECT filename, unnest(CASE WHEN {page} THEN list_concat(coalesce(data, []), coalesce(includes.tweets, []))
                                     ELSE [{own}] END) AS t
        FROM {json_scan(fields)}
      )
    )"""


def bluesky_sql() -> str:
    """One row per event or record: a Jetstream commit creating an ``app.bsky.feed.post`` is a post
    (URI ``at://<did>/app.bsky.feed.post/<rkey>``); other events are skipped and counted, a repost as a
    retweet. A record object carries its URI (``uri``) and the post in ``value`` (listRecords) or
    ``record`` (a PostView)."""
    return f"""
    SELECT filename, id, parent, text,
           CASE WHEN len(langs) > 0 THEN langs END AS langs, retweet, skip,
           CASE WHEN NOT skip AND NOT retweet AND id IS NULL
                  THEN 'not a Bluesky post: no Jetstream commit (did, commit.rkey) nor uri'
                WHEN NOT skip AND NOT retweet AND text IS NULL THEN 'post ' || id || ' has no record.text' END AS problem
    FROM (
      SELECT filename,
             CASE WHEN kind IS NOT NULL THEN 'at://' || did || '/{POST_COLLECTION}/' || "commit".rkey ELSE uri END AS id,
             p.reply.parent.uri AS parent, p.text AS text, p.langs AS langs,
             coalesce(kind = 'commit' AND "commit".collection = '{REPOST_COLLECTION}'
                      AND "commit".operation = 'create', false) AS retweet,
             coalesce(kind IS NOT NULL AND NOT (kind = 'commit' AND "commit".collection IN ('{POST_COLLECTION}',
                      '{REPOST_COLLECTION}') AND "commit".operation = 'create'), false) AS skip
      FROM (SELECT *, CASE WHEN kind IS NOT NULL THEN "commit".record ELSE coalesce(value, record) END AS p
            FROM {json_scan(_BLUESKY_FIELDS)})
    )"""


def table_sql(scan: str, text: str, id_col: Optional[str], reply_to: Optional[str], lang: Optional[str]) -> str:
    """Named columns of a Parquet or CSV table, as text."""
    def col(name: Optional[str]) -> str:
        return "NULL::VARCHAR" if name is None else f'CAST("{name}" AS VARCHAR)'

    return f"""
    SELECT filename, nullif({col(id_col)}, '') AS id, nullif({col(reply_to)}, '') AS parent, {col(text)} AS text,
           CASE WHEN nullif({col(lang)}, '') IS NOT NULL THEN [{col(lang)}] END AS langs,
           false AS retweet, false AS skip, NULL::VARCHAR AS problem
    FROM {scan}"""


def csv_scan(delimiter: str, header: list[str]) -> str:
    """RFC 4180: fields may be quoted, quotes doubled inside them, and quoted fields may hold the
    delimiter and line breaks. The columns are the header's (no sniffing: a bad row must not stop the
    reader from starting); rejected rows are kept in reject_errors, with their lines."""
    delim = delimiter.replace("'", "''")
    cols = "{" + ", ".join("'{}': 'VARCHAR'".format(c.replace("'", "''")) for c in header) + "}"
    return (f"read_csv($files, header=true, auto_detect=false, columns={cols}, delim='{delim}', quote='\"', "
            "escape='\"', strict_mode=true, filename=true, ignore_errors=true, store_rejects=true, "
            "compression='auto')")


def csv_header_sql() -> str:
    # the first physical line, raw (compressed or not): its names are parsed as CSV in Python
    return ("SELECT line FROM read_csv($files, header=false, auto_detect=false, columns={'line': 'VARCHAR'}, "
            "delim='\x01', quote='', escape='', compression='auto') LIMIT 1")


def parquet_scan() -> str:
    return "read_parquet($files, filename=true, union_by_name=true)"


# --------------------------------------------------------------------------------------------
# Finding a bad JSON record's line (only for files where DuckDB found one)
# --------------------------------------------------------------------------------------------

_DUCK_JSON_ERROR = re.compile(r'in file "(?P<file>.*)", at byte \d+ in line (?P<line>\d+): (?P<problem>.*)', re.S)


def parse_json_error(message: str) -> Optional[tuple[str, int, str]]:
    """``(file, line, problem)`` from DuckDB's "Malformed JSON in file ..." error, if it is one."""
    m = _DUCK_JSON_ERROR.search(message)
    return (m["file"], int(m["line"]), m["problem"].strip().rstrip(".")) if m else None


def open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard  # not a dependency: DuckDB reads .zst itself; only a bad .zst line needs it here
        except ImportError:
            raise EngineError(f"{path}: a malformed record in a .zst file: install zstandard to find its line, "
                              "or decompress the file (zstd -d)") from None
        return zstandard.open(path, "rb")
    return open(path, "rb")


def _tweet_problem(t: Any) -> Optional[str]:
    if not isinstance(t, dict):
        return "a tweet must be a JSON object"
    tid = t.get("id_str") or t.get("id")
    if tid is None:
        return "not a tweet: no id_str or id (nor a v2 page with data/includes)"
    retweet = "retweeted_status" in t or any(isinstance(r, dict) and r.get("type") == "retweeted"
                                             for r in t.get("referenced_tweets") or [])
    texts = [t.get("text"), t.get("full_text"), (t.get("extended_tweet") or {}).get("full_text"),
             (t.get("note_tweet") or {}).get("text")]
    if not retweet and all(x is None for x in texts):
        return f"tweet {tid} has no text"
    return None


def twitter_problem(obj: Any) -> Optional[str]:
    if not isinstance(obj, dict):
        return "not a JSON object"
    if any(k in obj for k in _PAGE_KEYS):
        tweets = list(obj.get("data") or []) + list((obj.get("includes") or {}).get("tweets") or [])
        return next((p for p in map(_tweet_problem, tweets) if p), None)
    return _tweet_problem(obj)


def bluesky_problem(obj: Any) -> Optional[str]:
    if not isinstance(obj, dict):
        return "not a JSON object"
    if "kind" in obj:
        c = obj.get("commit") or {}
        if obj["kind"] != "commit" or c.get("collection") != POST_COLLECTION or c.get("operation") != "create":
            return None
        if not obj.get("did") or not c.get("rkey"):
            return "not a Bluesky post: no Jetstream commit (did, commit.rkey) nor uri"
        post = c.get("record") or {}
    else:
        if not obj.get("uri"):
            return "not a Bluesky post: no Jetstream commit (did, commit.rkey) nor uri"
        post = obj.get("value") or obj.get("record") or {}
    if not isinstance(post, dict) or post.get("text") is None:
        return "post has no record.text"
    return None


def clean_copy(path: Path, dest: Path, problem_of: Callable[[Any], Optional[str]], skip_bad: SkipBad) -> int:
    """Copy ``path`` to ``dest`` without its bad lines, each offered to ``skip_bad``; when it declines,
    raise the line's DataFormatError. Blank lines are dropped (DuckDB skips them too). Returns the lines dropped."""
    dropped = 0
    with open_binary(path) as src, open(dest, "wb") as out:
        for lineno, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            try:
                problem = problem_of(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError as err:
                problem = f"not valid UTF-8 (byte {err.start + 1} of the line)"
            except json.JSONDecodeError as err:
                problem = f"malformed JSON ({err.msg}, column {err.colno})"
            if problem is None:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                continue
            if not skip_bad(str(path), lineno, problem):
                raise DataFormatError(path, [(lineno, problem)])
            dropped += 1
    return dropped
