"""Hostile text through the tokenizer and the reader -> tokenizer path: no crash, every row accounted for.

The readers' own unit tests live in test_formats.py and the normalization's in test_preprocess.py;
here: the tokenizer on arbitrary unicode, and whole files of hostile rows read and tokenized, where
every malformed row must be reported at its line and no row may vanish.
"""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import make_tweets
from twilbert.config import TaskDataset, VocabConfig
from twilbert.data.batch import pack_pairs
from twilbert.data.corpus_files import read_pairs, read_texts
from twilbert.data.formats import DataFormatError, has_printable
from twilbert.data.special import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from twilbert.data.tasks import read_task_split
from twilbert.data.tokenizer import Tokenizer, train_vocab

pytestmark = pytest.mark.reliability

LABELS = {"N": 0, "NEU": 1, "P": 2}
HOSTILE = [
    "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇪🇸", "👍🏽", "1️⃣",  # ZWJ sequences, flags, modifiers, keycaps
    "مرحبا بالعالم", "שלום", "\u202e", "\u200f", "\u200e",  # RTL text and direction overrides
    "\u200b", "\u200c", "\u200d", "\ufeff", "\u00ad", "\u2060",  # zero-width and invisible
    "e\u0301", "Z\u0335\u0321\u031b\u0358", "ﷺ", "𝕳𝖔𝖑𝖆", "ß", "İ", "\u212a",  # combining, NFKC expanders, case folds
    "\ud800", "\udfff", "\ud83d",  # lone surrogates
    "\x00", "\x07", "\x1c", "\x85", "\u2028", "\u2029", "\t", "\r", "\n", "\r\n",  # controls, separators
    '"', "'", '""', "\\", "▁", "\ufffd", "<unk>", "[MASK]",  # quotes, SentencePiece's meta symbol
    "@usuario", "#HashTagLargo", "https://t.co/x", "jajajaja", "holaaaaa", " ", "  ",
]
hostile_text = st.one_of(
    st.text(max_size=120),
    st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=3)), max_size=30).map("".join),
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("vocab") / "vocab"
    train_vocab([t for t, _ in make_tweets(200)], out, VocabConfig(vocab_size=100))
    return Tokenizer(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


_names = itertools.count()


def write(workdir, content: bytes):
    path = workdir / f"f{next(_names)}.tsv"
    path.write_bytes(content)
    return path


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@FUZZ
@given(texts=st.lists(hostile_text, min_size=1, max_size=4))
def test_the_tokenizer_maps_any_text_to_ids_inside_the_vocabulary(tokenizer, texts):
    batch = tokenizer.encode(texts)
    assert len(batch) == len(texts)
    for text, ids in zip(texts, batch):
        assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.encode([text]) == [ids]  # a text's ids do not depend on its batch
        tokenizer.decode_ids(ids)


@FUZZ
@given(a=st.lists(hostile_text, min_size=1, max_size=3), max_len=st.integers(1, 8))
def test_hostile_texts_pack_into_well_formed_rows(tokenizer, a, max_len):
    ids = tokenizer.encode(a)
    packed = pack_pairs(ids, ids[::-1], max_len)
    for row, n, n_a in zip(packed["input_ids"], packed["length"], packed["len_a"]):
        assert row[0] == CLS_ID and row[n_a + 1] == SEP_ID and row[n - 1] == SEP_ID
        assert (row[n:] == PAD_ID).all() and n <= 2 * max_len + 3


def test_a_huge_text_tokenizes_in_bounded_time(tokenizer):
    text = ("jajaja 😂 👨\u200d👩\u200d👧 مرحبا \u200b#HashTag " * 12_000)[:400_000]
    start = time.monotonic()
    ids = tokenizer.encode([text])[0]
    assert ids and time.monotonic() - start < 10.0


@pytest.mark.parametrize("typed", ["[CLS]", "[SEP]", "[MASK]"])
def test_control_tokens_typed_in_a_tweet_are_plain_text(tokenizer, typed):
    ids = tokenizer.encode([f"hola {typed} que tal"])[0]
    assert not {CLS_ID, SEP_ID, MASK_ID, PAD_ID} & set(ids)


@pytest.mark.parametrize("text", ["\ud800", "\ufffd", "▁", "▁ ▁"])
def test_every_text_yields_at_least_one_token(tokenizer, text):
    assert tokenizer.encode([text])[0]


# --------------------------------------------------------------------------------------------
# Reader -> tokenizer, on whole files
# --------------------------------------------------------------------------------------------

field_text = st.text(st.characters(exclude_characters="\t\n", exclude_categories=("Cs",)), min_size=1,
                     max_size=40).filter(lambda s: s.strip())
good_text = field_text.filter(has_printable)  # a text of NULs or controls alone is refused (unprintable_text)
good_row = st.tuples(st.just("good"), field_text, good_text, st.sampled_from(sorted(LABELS)))
broken_row = st.one_of(
    st.tuples(st.just("extra_field"), field_text, field_text.map(lambda s: s + "\t" + s), st.just("N")),
    st.tuples(st.just("missing_field"), field_text, st.just(""), st.just("N")),
    st.tuples(st.just("blank"), st.sampled_from(["", " ", "  \u3000"]), st.just(""), st.just("")),
    st.tuples(st.just("empty_text"), field_text, st.sampled_from(["", " ", "\u200a\u3000"]), st.just("P")),
    st.tuples(st.just("unknown_label"), field_text, good_text, st.sampled_from(["X", "n", "POS"])),
    st.tuples(st.just("unprintable_text"), field_text, st.sampled_from(["\x00", "\x00" * 5, "\x01\x7f", "\u200b"]),
              st.just("N")),
    st.tuples(st.just("bad_utf8"), field_text, st.sampled_from(["\ud800", "\udcff"]).map(lambda s: "a" + s),
              st.just("N")),
)


def render(kind: str, id_: str, text: str, label: str) -> bytes:
    if kind == "blank":
        return id_.encode()
    if kind == "missing_field":
        return f"{id_}\t{label}".encode()
    return f"{id_}\t{text}\t{label}".encode("utf-8", "surrogatepass")  # lone surrogates: invalid UTF-8


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.one_of(good_row, good_row, broken_row), min_size=1, max_size=15),
    bom=st.booleans(), crlf=st.booleans(), final_newline=st.booleans(),
)
def test_every_row_of_a_hostile_file_is_either_read_or_reported_at_its_line(
    workdir, tokenizer, rows, bom, crlf, final_newline
):
    eol = b"\r\n" if crlf else b"\n"
    lines = [b"ID\tTEXT\tCLASS"] + [render(*row) for row in rows]
    final_newline = final_newline or rows[-1][0] == "blank"  # without it a last blank line is no line at all
    path = write(workdir, (b"\xef\xbb\xbf" if bom else b"") + eol.join(lines) + (eol if final_newline else b""))
    broken = {line for line, row in enumerate(rows, 2) if row[0] != "good"}

    try:
        ex = read_task_split(path, TaskDataset(), LABELS)
    except DataFormatError as err:
        assert broken, f"a good file was rejected: {err}"
        reported = [line for line, _ in err.problems]
        assert sorted(reported) == sorted(broken)  # each broken row once, no good row, nothing else
        assert err.total == len(broken)
        assert all(f"{path}:{line}:" in str(err) for line in broken)
        return
    assert not broken, f"broken rows at lines {sorted(broken)} slipped through"
    assert len(ex) == len(rows) and ex.line_numbers == list(range(2, len(rows) + 2))
    assert ex.texts == [text for _, _, text, _ in rows]
    assert ex.labels == [LABELS[label] for *_, label in rows]
    ids = tokenizer.encode(ex.texts)
    assert len(ids) == len(rows) and all(0 <= i < tokenizer.vocab_size for row in ids for i in row)


def physical_lines(content: bytes) -> int:
    body = content[3:] if content.startswith(b"\xef\xbb\xbf") else content
    parts = body.split(b"\n")
    return len(parts) - (1 if parts[-1] == b"" else 0)


hostile_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.sampled_from([b"\t", b"\n", b"\r\n", b"\r", b"\xef\xbb\xbf", b'"', b"\xff", b"\xc3",
                                        b"\xed\xa0\x80", b"ID", b"TEXT", b"CLASS", b"ORIG_TEXT", b"REPLY_TEXT",
                                        b"N", b"P", " 😂".encode()]),
                       hostile_text.map(lambda s: s.encode("utf-8", "surrogatepass"))), max_size=40).map(b"".join),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=hostile_bytes)
def test_arbitrary_bytes_are_read_or_reported_never_a_traceback(workdir, tokenizer, content):
    path = write(workdir, content)
    n_lines = physical_lines(content)
    readers = {
        "task": lambda: read_task_split(path, TaskDataset(), LABELS).texts,
        "pairs": lambda: read_pairs(path).orig_texts,
        "pairs_headerless": lambda: read_pairs(path, header=False).orig_texts,
        "texts": lambda: read_texts(path),
    }
    for name, read in readers.items():
        try:
            texts = read()
        except DataFormatError as err:
            assert err.problems and err.total >= len(err.problems), name
            assert all(line is None or 1 <= line <= max(n_lines, 1) for line, _ in err.problems), name
            assert str(err).startswith(str(path)), name
            continue
        data_lines = n_lines - (0 if name in ("pairs_headerless", "texts") else 1)
        assert len(texts) == data_lines, f"{name}: {data_lines} lines in, {len(texts)} rows out, none reported"
        assert len(tokenizer.encode(texts)) == len(texts)
