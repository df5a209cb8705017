"""Readers and writers of TWilBert's delimited files: strict parsing, line-numbered errors, atomic writes."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twilbert.config import TaskDataset
from twilbert.data.corpus_files import iter_pairs, iter_texts, read_pairs, read_texts
from twilbert.data.formats import MAX_REPORTED, DataFormatError, read_table, write_table
from twilbert.data.tasks import read_task_split
from twilbert.io_utils import atomic_write

SENTIMENT = {"N": 0, "NEU": 1, "P": 2}


def write_bytes(tmp_path, content: bytes, name: str = "data.tsv"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def write_text(tmp_path, content: str, name: str = "data.tsv"):
    return write_bytes(tmp_path, content.encode("utf-8"), name)


def error_of(fn, *args, **kwargs) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        fn(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------
# Good files
# --------------------------------------------------------------------------------------------


def test_task_split_parses_ids_texts_labels_and_line_numbers(tmp_path):
    path = write_text(
        tmp_path,
        "ID\tTEXT\tCLASS\n"
        "1\t@chefidiaz no seas muy dura \tN\n"
        '2\tel "cómetelo" ahí | JAJAJA 😂\tP\n'
        "3\tvale\tNEU\n",
    )
    ex = read_task_split(path, TaskDataset(), SENTIMENT, multi_label=False, regression=False)
    assert ex.ids == ["1", "2", "3"]
    assert ex.texts == ["@chefidiaz no seas muy dura ", 'el "cómetelo" ahí | JAJAJA 😂', "vale"]
    assert ex.labels == [0, 2, 1]
    assert ex.line_numbers == [2, 3, 4]
    assert ex.aux_texts is None
    assert len(ex) == 3


def test_unbalanced_quotes_are_literal_text(tmp_path):
    path = write_text(tmp_path, 'ID\tTEXT\tCLASS\n1\tdijo "hola\tN\n2\t"\tP\n3\ty """ más\tN\n')
    ex = read_task_split(path, TaskDataset(), SENTIMENT)
    assert ex.texts == ['dijo "hola', '"', 'y """ más']
    assert ex.labels == [0, 2, 0]


def test_bom_and_crlf_are_accepted(tmp_path):
    path = write_bytes(tmp_path, b"\xef\xbb\xbfID\tTEXT\tCLASS\r\n1\thola\tN\r\n2\tadi\xc3\xb3s\tP\r\n")
    ex = read_task_split(path, TaskDataset(), SENTIMENT)
    assert ex.ids == ["1", "2"]
    assert ex.texts == ["hola", "adiós"]
    assert ex.labels == [0, 2]


def test_missing_final_newline_is_fine(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\n1\thola\tN")
    assert read_task_split(path, TaskDataset(), SENTIMENT).texts == ["hola"]


def test_tass19_tweet_header_and_numeric_labels(tmp_path):
    path = write_text(tmp_path, "ID\tTWEET\tCLASS\n7\tbuenas\t1\n8\tmalas\t0\n")
    ds = TaskDataset(text_header="TWEET")
    ex = read_task_split(path, ds, {"0": 0, "1": 1})
    assert ex.texts == ["buenas", "malas"]
    assert ex.labels == [1, 0]


def test_numeric_labels_map_through_categories_by_string(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\n1\ta\t0\n2\tb\t1\n")
    ex = read_task_split(path, TaskDataset(), {"1": 0, "0": 1})
    assert ex.labels == [1, 0]


def test_aux_column_is_read(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tPREV\tNEXT\tCLASS\n1\ttexto\tprevio\tsiguiente\tFAVOR\n")
    ds = TaskDataset(aux_header="PREV")
    ex = read_task_split(path, ds, {"AGAINST": 0, "FAVOR": 1, "NEUTRAL": 2})
    assert ex.aux_texts == ["previo"]
    assert ex.labels == [1]


def test_multi_label_flags_parse_to_indicator_vectors(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\na\tx\t0|1|0|0\nb\ty\t1|0|0|1\n")
    cats = {"anger": 0, "joy": 1, "fear": 2, "sadness": 3}
    ex = read_task_split(path, TaskDataset(), cats, multi_label=True)
    assert ex.labels == [[0, 1, 0, 0], [1, 0, 0, 1]]


def test_multi_label_without_categories_takes_the_first_rows_width(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\na\tx\t0|1\nb\ty\t1|0|1\n")
    err = error_of(read_task_split, path, TaskDataset(), None, multi_label=True)
    assert f"{path}:3: multi-label value '1|0|1' has 3 flags, expected 2" in str(err)


def test_regression_labels_are_floats(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\na\tx\t0.25\nb\ty\t-3\nc\tz\tnan\n")
    err = error_of(read_task_split, path, TaskDataset(), None, regression=True)
    assert f"{path}:4: regression label 'nan' is not a finite number" in str(err)
    path.write_text("ID\tTEXT\tCLASS\na\tx\t0.25\nb\ty\t-3\n")
    assert read_task_split(path, TaskDataset(), None, regression=True).labels == [0.25, -3.0]


def test_headerless_pairs_are_positional(tmp_path):
    path = write_text(tmp_path, "11\tDe muy buena fuente url\t12\tuser Esto huele a FAKE\n21\tY yo 🤣\t22\tuser Si\n")
    pairs = read_pairs(path, header=False, delimiter="\t")
    assert pairs.orig_texts == ["De muy buena fuente url", "Y yo 🤣"]
    assert pairs.reply_texts == ["user Esto huele a FAKE", "user Si"]
    assert pairs.line_numbers == [1, 2]


def test_pairs_with_header(tmp_path):
    path = write_text(tmp_path, "ORIG_ID\tORIG_TEXT\tREPLY_ID\tREPLY_TEXT\n1\thola\t2\tadiós\n")
    pairs = read_pairs(path, header=True)
    assert (pairs.orig_texts, pairs.reply_texts, pairs.line_numbers) == (["hola"], ["adiós"], [2])


def test_headerless_pairs_reject_a_header_line(tmp_path):
    path = write_text(tmp_path, "ORIG_ID\tORIG_TEXT\tREPLY_ID\tREPLY_TEXT\n1\thola\t2\tadiós\n")
    err = error_of(read_pairs, path, header=False)
    assert f"{path}:1: this line is a header" in str(err)


def test_headerless_file_read_with_header_hints_the_option(tmp_path):
    path = write_text(tmp_path, "11\thola\t12\tadiós\n")
    err = error_of(read_pairs, path, header=True)
    assert f"{path}:1: missing required column 'ORIG_TEXT'" in str(err)
    assert "header option to false" in str(err)


def test_read_texts_one_per_line(tmp_path):
    path = write_text(tmp_path, "hola\tcon tab\r\nadiós \"x\n")
    assert read_texts(path) == ["hola\tcon tab", 'adiós "x']


# --------------------------------------------------------------------------------------------
# Bad files: path, line and problem in every message
# --------------------------------------------------------------------------------------------


def test_missing_column_names_file_and_available_columns(tmp_path):
    path = write_text(tmp_path, "ID\tTWEET\tCLASS\n1\thola\tN\n")
    err = error_of(read_task_split, path, TaskDataset(), SENTIMENT)
    message = str(err)
    assert message.startswith(f"{path}:1: missing required column 'TEXT'")
    assert "'ID', 'TWEET', 'CLASS'" in message
    assert "text_header" in message


def test_wrong_delimiter_is_hinted(tmp_path):
    path = write_text(tmp_path, "ID,TEXT,CLASS\n1,hola,N\n")
    assert "is the delimiter '\\t' right?" in str(error_of(read_task_split, path, TaskDataset(), SENTIMENT))


def test_extra_and_missing_fields_are_reported_with_their_lines(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\n1\thola\tN\n2\tcon\ttab\tP\n3\tcorto\n4\tbien\tP\n")
    err = error_of(read_task_split, path, TaskDataset(), SENTIMENT)
    assert err.total == 2
    assert f"{path}:3: expected 3 fields, found 4" in str(err)
    assert f"{path}:4: expected 3 fields, found 2" in str(err)


def test_unknown_label_lists_known_labels(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\n1\thola\tN\n2\tqué\tNONE\n")
    err = error_of(read_task_split, path, TaskDataset(), SENTIMENT)
    assert str(err) == f"{path}:3: unknown label 'NONE' (known: 'N', 'NEU', 'P')"


def test_empty_text_is_an_error(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\n1\t \tN\n2\thola\tP\n")
    assert str(error_of(read_task_split, path, TaskDataset(), SENTIMENT)) == f"{path}:2: empty 'TEXT' field"


def test_empty_reply_is_an_error(tmp_path):
    path = write_text(tmp_path, "1\thola\t2\t\n3\ta\t4\tb\n")
    assert str(error_of(read_pairs, path, header=False)) == f"{path}:1: empty 'REPLY_TEXT' field"


def test_invalid_utf8_reports_line_and_byte_offset(tmp_path):
    content = b"ID\tTEXT\tCLASS\n1\thola\tN\n2\tadi\xf3s\tP\n"  # latin-1 'ó'
    path = write_bytes(tmp_path, content)
    offset = content.index(b"\xf3")
    err = error_of(read_task_split, path, TaskDataset(), SENTIMENT)
    assert str(err).startswith(f"{path}:3: invalid UTF-8 at byte offset {offset} ")


def test_invalid_utf8_after_a_bom_counts_the_bom_bytes(tmp_path):
    path = write_bytes(tmp_path, b"\xef\xbb\xbfID\tTEXT\tCLASS\n1\t\xff\tN\n")
    err = error_of(read_task_split, path, TaskDataset(), SENTIMENT)
    assert f"{path}:2: invalid UTF-8 at byte offset 19 " in str(err)


def test_blank_lines_are_errors_but_one_final_newline_is_not(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\n1\thola\tN\n\n2\tqué\tP\n\n")
    err = error_of(read_task_split, path, TaskDataset(), SENTIMENT)
    assert [line for line, _ in err.problems] == [3, 5]
    assert f"{path}:3: blank line" in str(err)


def test_blank_line_in_texts_file(tmp_path):
    path = write_text(tmp_path, "hola\n   \nadiós\n")
    assert str(error_of(read_texts, path)).startswith(f"{path}:2: blank line")


def test_all_problems_of_a_file_are_collected_and_capped(tmp_path):
    rows = "".join(f"{i}\ttexto\tMAL\n" for i in range(50))
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\n" + rows + "99\t\tN\n")
    err = error_of(read_task_split, path, TaskDataset(), SENTIMENT)
    assert err.total == 51
    message = str(err)
    assert message.splitlines()[0] == f"{path}: 51 problems, the first 20 shown:"
    assert len(message.splitlines()) == 21
    assert all(line.startswith(f"{path}:") for line in message.splitlines())


def test_header_only_file_has_no_examples(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\tCLASS\n")
    err = error_of(read_task_split, path, TaskDataset(), SENTIMENT)
    assert str(err) == f"{path}: no examples (the file has only a header)"


def test_missing_file(tmp_path):
    assert "file not found" in str(error_of(read_table, tmp_path / "nope.tsv", ["A"]))


def test_data_format_error_pickles(tmp_path):
    err = DataFormatError("f.tsv", [(3, "empty 'TEXT' field")])
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == "f.tsv:3: empty 'TEXT' field" and again.problems == err.problems


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def test_write_table_refuses_delimiter_or_newline_and_names_the_row(tmp_path):
    path = tmp_path / "out.tsv"
    path.write_text("old\n")
    err = error_of(write_table, path, ["ID", "TEXT"], [("1", "ok"), ("2", "con\ttab"), ("3", "dos\nlíneas")])
    assert f"{path}:3: row 2, field 2: contains the delimiter" in str(err)
    assert f"{path}:4: row 3, field 2:" in str(err)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.tsv"]


def test_write_table_refuses_rows_of_the_wrong_width(tmp_path):
    err = error_of(write_table, tmp_path / "out.tsv", ["ID", "TEXT"], [("1",)])
    assert "row 1 has 1 fields, expected 2" in str(err)
    assert not (tmp_path / "out.tsv").exists()


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "out.tsv"
    write_table(path, ["ID", "TEXT"], [("1", "viejo")])

    def rows():
        yield ("2", "nuevo")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_table(path, ["ID", "TEXT"], rows())
    assert path.read_text(encoding="utf-8") == "ID\tTEXT\n1\tviejo\n"
    assert os.listdir(tmp_path) == ["out.tsv"]


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"old")
    with atomic_write(path, "wb") as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"  # nothing visible until the block ends
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["blob.bin"]


field_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r"), max_size=30)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(field_text, field_text, field_text), max_size=20))
def test_write_then_read_round_trips_exactly(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("rt") / "t.tsv"
    written = write_table(path, ["ID", "TEXT", "CLASS"], rows)
    table = read_table(path, ["ID", "TEXT", "CLASS"], non_empty=())
    assert written == len(rows) == len(table)
    assert list(zip(table.columns["ID"], table.columns["TEXT"], table.columns["CLASS"])) == rows
    assert table.line_numbers == list(range(2, len(rows) + 2))


# --------------------------------------------------------------------------------------------
# Streaming readers: the rows and errors of the whole-file readers, one line in memory
# --------------------------------------------------------------------------------------------

SAMPLES = Path(os.environ.get("TWILBERT_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "data" / "twilbert-samples"))


def rows_of(pairs):
    return list(zip(pairs.line_numbers, pairs.orig_texts, pairs.reply_texts))


def outcome(read):
    """The rows a reader gives, or its error's (problems, total)."""
    try:
        return list(read()), None
    except DataFormatError as err:
        return None, err


def assert_same_outcome(old, new, stream_stops_at_line_1: bool):
    (old_rows, old_err), (new_rows, new_err) = old, new
    if old_err is None:
        assert new_err is None and new_rows == old_rows
        return
    assert new_err is not None and new_rows is None, f"streaming gave rows where the reader raised {old_err}"
    assert str(new_err).startswith(str(old_err.path))
    if stream_stops_at_line_1 and any(line == 1 for line, _ in old_err.problems):
        # A broken header stops the stream at once; the whole-file reader also lists later lines.
        assert set(new_err.problems) <= set(old_err.problems) and new_err.problems
    elif old_err.total <= MAX_REPORTED:
        assert (new_err.problems, new_err.total) == (old_err.problems, old_err.total)
    else:
        assert new_err.total == old_err.total


def test_streamed_pairs_equal_read_pairs_with_and_without_header(tmp_path):
    import random

    rng = random.Random(3)
    words = ["hola", "qué", "tal", "😂", '"citado"', "url", "@user", "#lunes", "ñandú"]
    rows = [(str(i), " ".join(rng.choices(words, k=rng.randint(1, 12))), str(i + 9000),
             " ".join(rng.choices(words, k=rng.randint(1, 12)))) for i in range(3000)]
    body = "".join("\t".join(r) + ("\r\n" if i % 7 == 0 else "\n") for i, r in enumerate(rows))
    plain = write_text(tmp_path, body, "plain.tsv")
    headed = write_text(tmp_path, "\ufeffORIG_ID\tORIG_TEXT\tREPLY_ID\tREPLY_TEXT\n" + body, "headed.tsv")
    for path, header in ((plain, False), (headed, True)):
        expected = rows_of(read_pairs(path, header=header))
        assert list(iter_pairs(path, header=header)) == expected
        assert [(a, b) for _, a, b in expected] == [(r[1], r[3]) for r in rows]
        gz = path.with_name(path.name + ".gz")
        gz.write_bytes(gzip.compress(path.read_bytes()))
        assert list(iter_pairs(gz, header=header)) == expected


def test_streamed_pairs_honour_the_delimiter_and_column_names(tmp_path):
    path = write_text(tmp_path, "id;tweet;rid;reply\n1;hola;2;adiós\n")
    kwargs = dict(header=True, delimiter=";", orig_text_header="tweet", reply_text_header="reply")
    assert list(iter_pairs(path, **kwargs)) == rows_of(read_pairs(path, **kwargs)) == [(2, "hola", "adiós")]


@pytest.mark.skipif(not (SAMPLES / "pretraining" / "pairs_sample.tsv").is_file(), reason="TWilBert's samples not at hand")
def test_streamed_sample_pairs_equal_read_pairs():
    path = SAMPLES / "pretraining" / "pairs_sample.tsv"
    expected = rows_of(read_pairs(path, header=False))
    assert len(expected) == 200 and list(iter_pairs(path, header=False)) == expected


def test_bad_pair_rows_keep_their_file_line_errors_when_streamed(tmp_path):
    content = b"1\thola\t2\tque tal\n3\tsolo tres\t4\n\n5\tmal \xff byte\t6\tok\n7\ta\t8\t \n9\tbien\t10\tbien\n"
    path = write_bytes(tmp_path, content)
    old = error_of(read_pairs, path, header=False)
    new = error_of(lambda: list(iter_pairs(path, header=False)))
    assert str(new) == str(old)
    assert [line for line, _ in new.problems] == [2, 3, 4, 5]


def test_skip_bad_is_asked_once_per_malformed_row_and_the_rest_streams(tmp_path):
    path = write_bytes(tmp_path, b"1\thola\t2\tque tal\n3\t\t4\t\n5\tmal \xff\t6\tok\n7\tbien\t8\tbien\n")
    asked = []
    rows = list(iter_pairs(path, header=False, skip_bad=lambda *bad: asked.append(bad) or True))
    assert rows == [(1, "hola", "que tal"), (4, "bien", "bien")]
    assert [(p, line) for p, line, _ in asked] == [(str(path), 2), (str(path), 3)]
    assert asked[0][2] == "empty 'ORIG_TEXT' field; empty 'REPLY_TEXT' field"  # one row, both problems


def test_a_declined_bad_row_fails_the_file_with_all_its_problems(tmp_path):
    path = write_text(tmp_path, "1\thola\t2\tq\n3\tx\n5\ty\t6\tz\n7\tw\n")
    answers = iter([True, False])
    err = error_of(lambda: list(iter_pairs(path, header=False, skip_bad=lambda *_: next(answers))))
    assert [line for line, _ in err.problems] == [2, 4]  # the skipped row is listed too


def test_a_broken_header_fails_at_once_whatever_skip_bad_says(tmp_path):
    path = write_text(tmp_path, "ID\tTEXT\n1\thola\n")
    err = error_of(lambda: list(iter_pairs(path, header=True, skip_bad=lambda *_: True)))
    assert f"{path}:1: missing required column 'ORIG_TEXT'" in str(err)


def test_truncated_gzip_names_the_file_and_the_line_reached(tmp_path):
    path = tmp_path / "tweets.txt.gz"
    path.write_bytes(gzip.compress("".join(f"tuit número {i}\n" for i in range(5000)).encode())[:-50])
    err = error_of(lambda: list(iter_texts(path)))
    assert str(err).startswith(f"{path}:") and "truncated or corrupt gzip" in str(err)


def test_streamed_texts_equal_read_texts(tmp_path):
    path = write_bytes(tmp_path, b"\xef\xbb\xbfhola\tcon tab\r\nadi\xc3\xb3s \"x\nlast line without newline")
    assert list(iter_texts(path)) == list(enumerate(read_texts(path), 1))
    bad = write_bytes(tmp_path, b"uno\n \ndos \xff\n", "bad.txt")
    assert str(error_of(lambda: list(iter_texts(bad)))) == str(error_of(read_texts, bad))
    empty = write_bytes(tmp_path, b"", "empty.txt")
    assert str(error_of(lambda: list(iter_texts(empty)))) == str(error_of(read_texts, empty))


corpus_bytes = st.lists(
    st.sampled_from([b"\t", b"\t", b"\n", b"\n", b"\r\n", b"\r", b"\xef\xbb\xbf", b"\xff", b"\xc3", b" ", b"hola",
                     b"qu\xc3\xa9", "😂".encode(), b"1", b"ORIG_ID", b"ORIG_TEXT", b"REPLY_ID", b"REPLY_TEXT",
                     b"ORIG_ID\tORIG_TEXT\tREPLY_ID\tREPLY_TEXT\n"]),
    max_size=80,
).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(content=corpus_bytes, header=st.booleans())
def test_any_bytes_stream_to_the_rows_or_errors_of_the_whole_file_readers(tmp_path_factory, content, header):
    path = tmp_path_factory.mktemp("stream") / "corpus.tsv"
    path.write_bytes(content)
    assert_same_outcome(outcome(lambda: rows_of(read_pairs(path, header=header))),
                        outcome(lambda: iter_pairs(path, header=header)), stream_stops_at_line_1=header)
    assert_same_outcome(outcome(lambda: enumerate(read_texts(path), 1)), outcome(lambda: iter_texts(path)),
                        stream_stops_at_line_1=False)
