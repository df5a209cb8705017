"""Posts as researchers hold them (data.source twitter, bluesky, parquet, csv): each format in its
documented shape (docs/own-data.md cites the field references), replies joined to parents across
files, every drop counted, malformed records, and bytes that do not depend on the thread count."""

import gzip
import json
from pathlib import Path

import pytest

from helpers import ok, run_stage, write_params
from twilbert.config import DataConfig
from twilbert.data.corpus import read_pretrain_corpus, run_data_stage
from twilbert.data.formats import DataFormatError
from twilbert.data.sources import CorpusError


def jsonl(path: Path, records: list) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def v2(id_, text, lang="es", reply_to=None, **extra):
    tweet = {"id": id_, "text": text, "lang": lang, "edit_history_tweet_ids": [id_], **extra}
    if reply_to:
        tweet["referenced_tweets"] = [{"type": "replied_to", "id": reply_to}]
    return tweet


def v1(id_, text, lang="es", reply_to=None, **extra):
    return {"created_at": "Wed Oct 10 20:19:24 +0000 2018", "id": int(id_), "id_str": id_, "text": text,
            "in_reply_to_status_id": int(reply_to) if reply_to else None, "in_reply_to_status_id_str": reply_to,
            "lang": lang, "user": {"id_str": "1", "screen_name": "ana"}, **extra}


def run(tmp_path: Path, source: str, files, threads=1, **kw) -> tuple[dict, list]:
    cfg = DataConfig(source=source, posts_file=[str(f) for f in files], corpus_dir=str(tmp_path), **kw)
    out = tmp_path / f"out-{threads}"
    summary = run_data_stage(cfg, 1, out, threads)
    return summary, read_pretrain_corpus(out / "pretrain" / "corpus.jsonl")


@pytest.fixture
def twitter_folder(tmp_path):
    """Two days of v2 response pages and a v1.1 file: replies whose parents sit in another file or only
    in a page's includes, a missing parent, a retweet, another language, a long note tweet, a chain."""
    d = tmp_path / "corpus"
    d.mkdir()
    jsonl(d / "day1.jsonl", [
        {"data": [v2("100", "¿Quién viene mañana al partido?"),
                  v2("101", "Yo voy seguro", reply_to="100"),
                  v2("102", "texto corto…", note_tweet={"text": "Una nota larga " + "muy " * 100 + "larga"})],
         "includes": {"tweets": [v2("90", "el padre sólo en includes")], "users": [{"id": "1"}]},
         "meta": {"result_count": 3}},
        {"data": [v2("103", "respondo al padre de includes", reply_to="90"),
                  v2("104", "English words here", lang="en"),
                  v2("105", "RT @ana: Yo voy seguro", referenced_tweets=[{"type": "retweeted", "id": "101"}])]},
    ])
    jsonl(d / "day2.jsonl.gz", [
        {"data": [v2("200", "y yo también", reply_to="101"),  # parent in day1: a chain 100 <- 101 <- 200
                  v2("201", "a un tuit borrado", reply_to="999")]},
    ])
    jsonl(d / "v1.jsonl", [
        v1("300", "truncado…", reply_to="102", extended_tweet={"full_text": "respuesta completa a la nota"}),
        v1("301", "RT @ana: hola", retweeted_status=v1("100", "¿Quién viene mañana al partido?")),
        v1("302", "", full_text="tweet_mode extended: full_text"),
    ])
    return d


def test_twitter_v1_and_v2_replies_join_across_files_and_includes(tmp_path, twitter_folder):
    summary, rows = run(tmp_path, "twitter", [twitter_folder / "*"], lang="es")
    assert ("¿Quién viene mañana al partido?", "Yo voy seguro") in rows
    assert ("Yo voy seguro", "y yo también") in rows  # the parent in the other day's file
    assert ("el padre sólo en includes", "respondo al padre de includes") in rows
    note = "Una nota larga " + "muy " * 100 + "larga"
    assert (note, "respuesta completa a la nota") in rows  # note_tweet.text; extended_tweet.full_text
    assert ("a un tuit borrado", None) in rows and ("tweet_mode extended: full_text", None) in rows
    assert not any("English" in a or "RT @ana" in a for a, _ in rows)
    assert summary["pretrain_pairs_with_reply"] == summary["reply_pairs_found"] == 4
    assert summary["replies_parent_missing"] == 1 and summary["reply_chains"] == 1
    assert summary["retweets_dropped"] == 2 and summary["other_language_dropped"] == 1
    assert summary["posts_read"] == 12  # 7 in day1 (includes too), 2 in day2, 3 in v1: everything counted
    assert len(rows) == 6  # 4 pairs, 2 single texts: every post that is in no pair goes on alone


def test_without_a_language_every_language_is_kept(tmp_path, twitter_folder):
    summary, rows = run(tmp_path, "twitter", [twitter_folder / "*"])
    assert ("English words here", None) in rows and summary["other_language_dropped"] == 0


def test_untagged_posts_are_kept_or_dropped_as_configured(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [v2("1", "sin idioma", lang="und"), v2("2", "en español")])
    assert run(tmp_path, "twitter", [f], lang="es")[1] == [("sin idioma", None), ("en español", None)]
    summary, rows = run(tmp_path, "twitter", [f], threads=2, lang="es", keep_untagged=False)
    assert rows == [("en español", None)] and summary["untagged_language_dropped"] == 1


def test_one_and_two_threads_write_identical_bytes(tmp_path, twitter_folder):
    import random

    rng = random.Random(0)  # and a few thousand posts more, so that two threads do split the work
    for f in range(3):
        pages = [{"data": [v2(str(10_000 + 1000 * f + i), f"tuit {rng.randrange(900)} número {i}",
                              reply_to=str(rng.randrange(10_000, 13_000)) if rng.random() < 0.5 else None)
                           for i in range(p, p + 100)]} for p in range(0, 1000, 100)]
        jsonl(twitter_folder / f"more-{f}.jsonl", pages)
    run(tmp_path, "twitter", [twitter_folder / "*"], threads=1)
    run(tmp_path, "twitter", [twitter_folder / "*"], threads=2)
    one, two = (tmp_path / f"out-{n}" / "pretrain" for n in (1, 2))
    assert (one / "corpus.jsonl").read_bytes() == (two / "corpus.jsonl").read_bytes()
    assert (one / "summary.json").read_bytes() == (two / "summary.json").read_bytes()


def test_the_log_gives_each_engine_phase_its_cpu_seconds(tmp_path, twitter_folder, caplog):
    # on a shared host wall time measures the neighbours: the benchmark reads these to tell a phase
    # that runs on one core from one that runs on all
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="twilbert.data.social"):
        run(tmp_path, "twitter", [twitter_folder / "*"])
    line = next(r.getMessage() for r in caplog.records if "CPU s per phase" in r.getMessage())
    found = re.fullmatch(r"data: DuckDB CPU s per phase \(read, join, dedup, ordered write\): (.*)", line)
    assert found and len([float(x) for x in found.group(1).split(", ")]) == 4


def test_a_tweet_seen_twice_is_one_post_and_the_longer_text_wins(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [v2("1", "corto…", note_tweet={"text": "corto y ahora largo"})])
    b = jsonl(tmp_path / "b.jsonl", [v2("1", "corto…"), v2("2", "respuesta", reply_to="1")])
    summary, rows = run(tmp_path, "twitter", [a, b])
    assert rows == [("corto y ahora largo", "respuesta")] and summary["duplicate_ids_removed"] == 1


def test_a_malformed_twitter_line_names_file_and_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps(v2("1", "hola")) + "\n" + '{"id": "2", "text": "roto\n' + json.dumps(v2("3", "x")) + "\n")
    with pytest.raises(DataFormatError, match=r"a\.jsonl:2: malformed JSON"):
        run(tmp_path, "twitter", [f])


def test_a_record_that_is_no_tweet_names_its_line(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [v2("1", "hola"), {"created_at": "x"}, v2("3", "adiós")])
    with pytest.raises(DataFormatError, match=r"a\.jsonl:2: not a tweet: no id_str or id"):
        run(tmp_path, "twitter", [f])


def test_malformed_records_are_skipped_and_counted_within_max_bad_rows(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps(v2("1", "hola")) + "\nnot json\n" + json.dumps({"id": "5"}) + "\n"
                 + json.dumps(v2("3", "adiós", reply_to="1")) + "\n")
    summary, rows = run(tmp_path, "twitter", [f], max_bad_rows=2)
    assert rows == [("hola", "adiós")] and summary["bad_rows_skipped"] == 2
    assert [b.split(": ")[0] for b in summary["bad_rows"]] == [f"{f}:2", f"{f}:3"]
    with pytest.raises(CorpusError, match=r"a\.jsonl:3: tweet 5 has no text\n1 malformed rows were skipped"):
        run(tmp_path, "twitter", [f], max_bad_rows=1)


def jetstream(did, rkey, text, langs=("es",), parent=None, collection="app.bsky.feed.post", kind="commit"):
    record = {"$type": collection, "createdAt": "2024-12-21T10:00:00.000Z", "text": text, "langs": list(langs)}
    if parent:
        ref = {"uri": parent, "cid": "bafyreiabc"}
        record["reply"] = {"root": ref, "parent": ref}
    return {"did": did, "time_us": 1703123456789012, "kind": kind,
            "commit": {"rev": "3l3qo2vutsw2b", "operation": "create", "collection": collection, "rkey": rkey,
                       "record": record, "cid": "bafyreidwaiv"}}


def test_a_bluesky_reply_chain_from_jetstream_events_and_records(tmp_path):
    root = "at://did:plc:ana/app.bsky.feed.post/3k1"
    mid = "at://did:plc:bea/app.bsky.feed.post/3k2"
    events = jsonl(tmp_path / "jetstream.jsonl", [
        jetstream("did:plc:ana", "3k1", "¿Alguien en Bluesky?"),
        jetstream("did:plc:bea", "3k2", "¡Aquí!", parent=root),
        {"did": "did:plc:bea", "time_us": 1, "kind": "identity", "identity": {"did": "did:plc:bea"}},
        jetstream("did:plc:cid", "3k9", "", collection="app.bsky.feed.repost"),
        jetstream("did:plc:eve", "3k5", "Hello there", langs=("en",)),
    ])
    records = jsonl(tmp_path / "records.jsonl", [  # com.atproto.repo.listRecords: uri, cid, value
        {"uri": "at://did:plc:dan/app.bsky.feed.post/3k3", "cid": "bafy",
         "value": {"$type": "app.bsky.feed.post", "text": "Y yo", "langs": ["es-MX"], "createdAt": "x",
                   "reply": {"root": {"uri": root, "cid": "b"}, "parent": {"uri": mid, "cid": "b"}}}},
    ])
    summary, rows = run(tmp_path, "bluesky", [events, records], lang="es")
    assert rows == [("¿Alguien en Bluesky?", "¡Aquí!"), ("¡Aquí!", "Y yo")]
    assert summary["reply_chains"] == 1 and summary["events_skipped"] == 1
    assert summary["retweets_dropped"] == 1 and summary["other_language_dropped"] == 1


def test_a_bluesky_event_without_rkey_names_its_line(tmp_path):
    bad = jetstream("did:plc:ana", "3k1", "hola")
    del bad["commit"]["rkey"]
    f = jsonl(tmp_path / "j.jsonl", [jetstream("did:plc:b", "3k2", "ok"), bad])
    with pytest.raises(DataFormatError, match=r"j\.jsonl:2: not a Bluesky post"):
        run(tmp_path, "bluesky", [f])


def test_csv_follows_rfc_4180_and_joins_replies(tmp_path):
    f = tmp_path / "posts.csv"
    f.write_bytes(b'id,text,in_reply_to,lang\r\n'
                  b'1,"Hola, mundo",,es\r\n'
                  b'2,"una respuesta\r\ncon salto y ""comillas""",1,es\r\n'
                  b'3,otra,,en\r\n')
    summary, rows = run(tmp_path, "csv", [f], id_column="id", reply_to_column="in_reply_to", lang_column="lang",
                        lang="es")
    assert rows == [("Hola, mundo", 'una respuesta con salto y "comillas"')]
    assert summary["other_language_dropped"] == 1


def test_a_bad_csv_row_names_its_line_or_is_skipped_and_counted(tmp_path):
    f = tmp_path / "posts.csv"
    f.write_text('id,text\n1,hola\n2,"sin cerrar,x,y\n')
    with pytest.raises(DataFormatError, match=r"posts\.csv:3: not an RFC 4180 CSV row"):
        run(tmp_path, "csv", [f], id_column="id")
    summary, rows = run(tmp_path, "csv", [f], id_column="id", max_bad_rows=1)
    assert rows == [("hola", None)] and summary["bad_rows_skipped"] == 1


def test_a_missing_column_names_the_key(tmp_path):
    f = tmp_path / "posts.csv"
    f.write_text("id,body\n1,hola\n")
    with pytest.raises(DataFormatError, match=r"posts\.csv:1: no column 'text' \(set by data\.text_column\)"):
        run(tmp_path, "csv", [f])


def test_parquet_posts_with_replies_in_another_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "text": ["padre", "suelto"], "parent_id": [None, None]}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": [3], "text": ["hijo"], "parent_id": [1]}), tmp_path / "b.parquet")
    summary, rows = run(tmp_path, "parquet", [tmp_path / "*.parquet"], id_column="id", reply_to_column="parent_id")
    assert rows == [("suelto", None), ("padre", "hijo")]
    assert summary["pretrain_pairs_with_reply"] == 1


def test_the_data_stage_on_a_twitter_v2_folder(tmp_path, twitter_folder):
    workdir = tmp_path / "work"
    write_params(workdir, ["data.source=twitter", f"data.posts_file={twitter_folder}/*",
                           f"data.corpus_dir={twitter_folder}", "data.lang=es", "runtime.threads=2"])
    ok(run_stage("data.py", ["--out", "data"], workdir))
    summary = json.loads((workdir / "data" / "pretrain" / "summary.json").read_text())
    assert summary["source"] == "twitter" and summary["files"] == 3
    lines = (workdir / "data" / "pretrain" / "corpus.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["b"] is not None for line in lines) == summary["pretrain_pairs_with_reply"] == 4
    assert not any(p.name.startswith(".join-") for p in (workdir / "data").iterdir())  # the engine's files gone


TRICKY = ["Hola  mundo", "hola mundo", "HOLA\tMUNDO\n", "RT @ana: hola mundo", "RT @José_1: hola mundo",
          "mira https://t.co/abc123", "mira www.ejemplo.es", "mira http://x.co/zz", "@Ñandú hola", "@pepe hola",
          "comillas \" y \\ barra", "salto\u2028de línea\u00a0y\x0bmás", "emoji 😂🇲🇽", "\u200b", "\x01\x02",
          "tab\tdentro", "solo"]


def test_sql_dedup_and_whitespace_agree_with_the_python_rules(tmp_path):
    from twilbert.data.corpus import has_printable
    from twilbert.data.dedup import normalized

    f = tmp_path / "posts.csv"
    with f.open("w", encoding="utf-8", newline="") as fh:
        import csv

        csv.writer(fh).writerows([["text"], *[[t] for t in TRICKY]])
    summary, rows = run(tmp_path, "csv", [f])
    texts = [" ".join(t.split()) for t in TRICKY]
    texts = [t for t in texts if t]
    printable = [t for t in texts if has_printable(t)]
    expected = sorted({normalized(t): t for t in sorted(printable, reverse=True)}.values())
    assert sorted(a for a, _ in rows) == expected  # the same texts survive, each written as Python splits it
    assert summary["unprintable_removed"] == len(texts) - len(printable)
    assert summary["duplicates_removed"] == len(printable) - len(expected)
    assert summary["empty_texts_dropped"] == len(TRICKY) - len(texts)


def test_running_out_of_engine_memory_is_one_line_naming_the_key(tmp_path, twitter_folder):
    from twilbert.data.social_read import EngineError

    with pytest.raises(EngineError, match=r"DuckDB ran out of data\.engine_memory=1MB .*raise data\.engine_memory"):
        run(tmp_path, "twitter", [twitter_folder / "*"], engine_memory="1MB")
    assert not (tmp_path / "out-1" / "pretrain" / "corpus.jsonl").exists()
    assert not list((tmp_path / "out-1").glob(".join-*"))  # the engine's folder is gone too


def test_every_character_lower_changes_is_in_the_lowercase_guard():
    """The dedup form lowercases only texts that match social.LOWERED: sound only if every code point
    DuckDB's lower() changes is in it (checked here for every code point, with DuckDB's own regexp)."""
    import duckdb

    from twilbert.data.social import LOWERED

    con = duckdb.connect()
    changed, missed = con.execute(f"""
        SELECT count(*), count(*) FILTER (WHERE NOT regexp_matches(ch, '{LOWERED}'))
        FROM (SELECT chr(c::INTEGER) AS ch FROM (SELECT range AS c FROM range(0, 55296)  -- no surrogates
                                                  UNION ALL SELECT range FROM range(57344, 1114112)))
        WHERE lower(ch) <> ch""").fetchall()[0]
    assert changed > 1000 and missed == 0


def test_pair_rows_are_duplicates_only_when_both_dedup_forms_agree(tmp_path):
    """A row's dedup key is its parent's and its reply's dedup forms together (case, URLs, @users as
    placeholders): the first row in output order of each key is kept; a single text like a pair's
    parent is no duplicate of the pair."""
    d = tmp_path / "corpus"
    d.mkdir()
    jsonl(d / "a.jsonl", [{"data": [
        v2("100", "HOLA Ⅻ Ⓐ https://t.co/x @Ana"), v2("101", "Bien, ¿y TÚ?", reply_to="100"),
        v2("200", "hola ⅻ ⓐ http://ejemplo.es @luis"), v2("201", "bien, ¿y tú?", reply_to="200"),
        v2("300", "hola ⅻ ⓐ url @user"), v2("301", "bien, ¿y tú? otra", reply_to="300"),
        v2("400", "HOLA Ⅻ Ⓐ www.x.org @pepe"),
    ]}])
    summary, rows = run(tmp_path, "twitter", [d / "a.jsonl"])
    assert rows == [("HOLA Ⅻ Ⓐ https://t.co/x @Ana", "Bien, ¿y TÚ?"),
                    ("hola ⅻ ⓐ url @user", "bien, ¿y tú? otra"), ("HOLA Ⅻ Ⓐ www.x.org @pepe", None)]
    assert summary["duplicates_removed"] == 1 and summary["pretrain_pairs_with_reply"] == 2
