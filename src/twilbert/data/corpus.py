"""The `data` stage: the embedded default corpus (EvoMSA's TASS tweets) or the user's corpus (see
:mod:`twilbert.data.sources`), streamed into ``<out>/default/{train,dev,test}.tsv`` (the default task,
a seeded stratified split), ``<out>/pretrain/corpus.jsonl`` (one ``{"a": text, "b": reply|null}`` a line;
for the default only the train split's texts, so pretraining never sees dev/test tweets; exact
duplicates dropped when ``data.dedup``) and ``<out>/pretrain/summary.json`` (what was read, removed, skipped)."""

from __future__ import annotations

import contextlib
import itertools
import json
import json.scanner
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from twilbert.config import DataConfig
from twilbert.data.dedup import Deduplicator, cut_lines, row_digests
from twilbert.data.formats import has_printable, write_table
from twilbert.data.social import SOCIAL_SOURCES, social_corpus
from twilbert.data.sources import (
    BadRowBudget,
    BlankLines,
    budget_message,
    iter_corpus_rows,
    resolve_corpus_files,
    untracked_files,
)
from twilbert.errors import TwilbertError
from twilbert.io_utils import atomic_write, sha256_file

log = logging.getLogger(__name__)

EVOMSA_MEMBER = "EvoMSA/tests/tweets.json"
CHUNK_ROWS = 65_536  # rows deduplicated and written at a time
_encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps would build an encoder per row


class DataStageError(TwilbertError, RuntimeError):
    """The data stage cannot produce its outputs; the message says what to do."""


@dataclass
class LabelledTweet:
    id: str
    text: str
    label: str


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "twilbert"


def fetch_evomsa_sdist(cfg: DataConfig, cache: Optional[Path] = None) -> Path:
    """The EvoMSA sdist from the package registry (cached), checked against its sha256."""
    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"evomsa-{cfg.evomsa_version}.tar.gz"
    if target.is_file() and sha256_file(target) == cfg.evomsa_sha256:
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # --no-build-isolation: otherwise pip builds EvoMSA's build dependencies just to read metadata.
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", f"evomsa=={cfg.evomsa_version}", "-d", tmp, "--quiet",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not found:
            raise DataStageError(
                f"could not download evomsa=={cfg.evomsa_version} from the package registry "
                f"(pip said: {proc.stderr.strip()[-400:] or 'nothing'}).\n"
                "Offline? Place the sdist at "
                f"{target}, or use your own data: set data.source=pairs_file and data.pairs_file=<your "
                "pairs TSV> (or data.source=text_file and data.text_file=<one tweet per line>), and point "
                "tasks.<name>.dataset.data_dir at your task files (see README)."
            )
        digest = sha256_file(found[0])
        if digest != cfg.evomsa_sha256:
            raise DataStageError(
                f"{found[0].name}: sha256 {digest} does not match data.evomsa_sha256 {cfg.evomsa_sha256}"
            )
        os.replace(found[0], target)
    return target


def read_evomsa_tweets(sdist: Path, version: str) -> list[LabelledTweet]:
    """Extract only ``tweets.json`` from the sdist; tabs/newlines inside tweets become spaces."""
    member = f"evomsa-{version}/{EVOMSA_MEMBER}"
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            raw = tar.extractfile(member)
        except KeyError:
            raise DataStageError(f"{sdist}: has no member {member}") from None
        lines = raw.read().decode("utf-8").splitlines()
    tweets = []
    for lineno, line in enumerate(lines, 1):
        where = f"{sdist}!{EVOMSA_MEMBER}:{lineno}"
        try:
            row = json.loads(line)
            text, label = row["text"], row["klass"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataStageError(f"{where}: not a JSON object with 'text' and 'klass' ({err})") from None
        # TSV cells cannot hold tabs or newlines; whitespace is all they are in a tweet.
        text = " ".join(str(text).split())
        if not text:
            raise DataStageError(f"{where}: empty text")
        tweets.append(LabelledTweet(f"evomsa-{lineno:04d}", text, str(label)))
    return tweets


def stratified_split(
    tweets: list[LabelledTweet], fractions: list[float], seed: int
) -> tuple[list[LabelledTweet], list[LabelledTweet], list[LabelledTweet]]:
    """Seeded train/dev/test split that keeps each label's share."""
    # imported here: sklearn costs ~140 MiB and seconds, and the pairs stage reads its corpus through
    # this module (every forked tokenizer worker would share those pages)
    from sklearn.model_selection import train_test_split

    train_frac, dev_frac, test_frac = fractions
    labels = [t.label for t in tweets]
    train, rest = train_test_split(tweets, train_size=train_frac, stratify=labels, random_state=seed)
    rest_labels = [t.label for t in rest]
    dev, test = train_test_split(
        rest, test_size=test_frac / (dev_frac + test_frac), stratify=rest_labels, random_state=seed
    )
    return train, dev, test


def write_task_split(path: Path, tweets: list[LabelledTweet]) -> None:
    write_table(path, ["ID", "TEXT", "CLASS"], [[t.id, t.text, t.label] for t in tweets])


def write_pretrain_corpus(
    path: Path, rows: Iterable[tuple[str, Optional[str]]], dedup: bool = False, source: str = "the corpus",
    engine_memory: str = "768MB",
) -> dict[str, int]:
    """Stream ``rows`` into the corpus file (atomically), without exact duplicates when ``dedup``;
    return the counts read, written and removed. Memory holds one chunk of rows plus a bounded digest
    table (:class:`twilbert.data.dedup.Deduplicator`; DuckDB within ``engine_memory`` past it, whose
    later copies are cut from the file at the end). No rows at all is an error naming ``source``, and
    leaves ``path`` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {"rows_read": 0, "unprintable_removed": 0, "duplicates_removed": 0, "pretrain_texts": 0,
              "pretrain_pairs_with_reply": 0}
    rows = iter(rows)
    with atomic_write(path) as fh, (Deduplicator(path.parent, memory_limit=engine_memory) if dedup
                                    else contextlib.nullcontext()) as seen:
        spill_offset = None  # where the first row noted by DuckDB starts in the file
        while chunk := list(itertools.islice(rows, CHUNK_ROWS)):
            counts["rows_read"] += len(chunk)
            printable = [(a, b) for a, b in chunk if has_printable(a) and (b is None or has_printable(b))]
            counts["unprintable_removed"] += len(chunk) - len(printable)
            if seen is not None:
                keep = seen.add(row_digests(printable), np.fromiter((b is not None for _, b in printable), bool))
                if seen.spilled and spill_offset is None:
                    fh.flush()
                    spill_offset = os.lseek(fh.fileno(), 0, os.SEEK_CUR)
            else:
                keep = itertools.repeat(True)
            kept = [(a, b) for (a, b), new in zip(printable, keep) if new]
            fh.writelines(_encode({"a": a, "b": b}) + "\n" for a, b in kept)
            counts["duplicates_removed"] += len(printable) - len(kept)
            counts["pretrain_texts"] += len(kept)
            counts["pretrain_pairs_with_reply"] += sum(1 for _, b in kept if b is not None)
        if not counts["rows_read"]:
            raise DataStageError(f"{source}: no well-formed rows; nothing to pretrain on")
        if spill_offset is not None:
            fh.flush()

            def counted(batches):
                for lines, replies in batches:
                    counts["duplicates_removed"] += len(lines)
                    counts["pretrain_texts"] -= len(lines)
                    counts["pretrain_pairs_with_reply"] -= int(replies.sum())
                    yield lines

            cut_lines(fh.fileno(), spill_offset, seen.first_spilled_line, counted(seen.later_copies()))
    if counts["unprintable_removed"]:
        log.warning("data: %d row(s) of %s held a text with no printable character (only controls, NULs or "
                    "blanks); removed (summary.json: unprintable_removed)", counts["unprintable_removed"], source)
    return counts


_scan_json = json.scanner.make_scanner(json.JSONDecoder())


def _parse_row(line: str) -> object:
    # The C scanner directly, as the corpus file is written (one object, then a newline): half the
    # cost of json.loads, which the pairs stage's parent pays per row. Anything else goes to json.loads.
    try:
        row, end = _scan_json(line, 0)
    except StopIteration:
        return json.loads(line)  # raises, naming the column
    if end == len(line) or (end == len(line) - 1 and line[end] == "\n"):
        return row
    return json.loads(line)


def iter_pretrain_corpus(path: Path) -> Iterator[tuple[str, Optional[str]]]:
    """The corpus's (text, reply or None) rows, streamed: memory does not grow with the corpus."""
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                row = _parse_row(line)
                pair = (row["a"], row["b"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataStageError(f"{path}:{lineno}: not a pretraining corpus row ({err})") from None
            if type(pair[0]) is not str or not (pair[1] is None or type(pair[1]) is str):
                raise DataStageError(f"{path}:{lineno}: not a pretraining corpus row (\"a\" must be a string, "
                                     f"\"b\" a string or null; got {pair[0]!r:.40}, {pair[1]!r:.40})")
            yield pair


def read_pretrain_corpus(path: Path) -> list[tuple[str, Optional[str]]]:
    return list(iter_pretrain_corpus(path))


def iter_corpus_texts(path: Path) -> Iterator[str]:
    """Every text of the corpus, streamed: each row's text, then its reply when it has one."""
    for a, b in iter_pretrain_corpus(path):
        yield a
        if b is not None:
            yield b


def run_data_stage(cfg: DataConfig, seed: int, out: Path, threads: Optional[int] = None) -> dict:
    """Write the default task split and the pretraining corpus under ``out``; return a summary.

    The summary is also written to ``<out>/pretrain/summary.json``: rows read, duplicates removed,
    malformed rows skipped (the first of them listed), blank lines of plain-text files skipped, files
    read and those DVC does not track. ``threads`` is the join engine's (social-media sources only:
    their output does not depend on it).
    """
    out = Path(out)
    summary: dict = {"source": cfg.source}
    corpus_file = out / "pretrain" / "corpus.jsonl"
    if cfg.source == "evomsa":
        tweets = read_evomsa_tweets(fetch_evomsa_sdist(cfg), cfg.evomsa_version)
        train, dev, test = stratified_split(tweets, cfg.split, seed)
        (out / "default").mkdir(parents=True, exist_ok=True)
        for name, part in (("train", train), ("dev", dev), ("test", test)):
            write_task_split(out / "default" / f"{name}.tsv", part)
            summary[f"default_{name}"] = len(part)
        summary.update(write_pretrain_corpus(corpus_file, ((t.text, None) for t in train), cfg.dedup))
    else:
        files = resolve_corpus_files(cfg)
        untracked = untracked_files(files, cfg.corpus_dir)
        if untracked:
            shown = ", ".join(str(f) for f in untracked[:5]) + (", ..." if len(untracked) > 5 else "")
            log.warning(
                "%d corpus file(s) lie outside data.corpus_dir=%s (%s): DVC does not track them, so editing "
                "them reruns nothing; move or link them into %s, or set data.corpus_dir to their folder",
                len(untracked), cfg.corpus_dir, shown, cfg.corpus_dir,
            )
        budget = BadRowBudget(cfg.max_bad_rows)
        blank = BlankLines()
        source = f"data.{cfg.source} ({len(files)} file(s))"
        if cfg.source in SOCIAL_SOURCES:
            with budget_message(budget):
                counts = social_corpus(cfg, files, budget, threads, corpus_file, source)
        else:
            counts = write_pretrain_corpus(corpus_file, iter_corpus_rows(cfg, files, budget, blank), cfg.dedup, source,
                                           cfg.engine_memory)
        summary.update(files=len(files), untracked_files=len(untracked), **counts, bad_rows_skipped=budget.skipped)
        if cfg.source == "text_file":
            summary["blank_lines_skipped"] = blank.count
        if budget.listed:
            summary["bad_rows"] = budget.listed
        # DVC needs the declared output to exist even when the default task is not used.
        (out / "default").mkdir(parents=True, exist_ok=True)
        (out / "default" / "README.txt").write_text(
            f"data.source is {cfg.source}: the embedded default task is not produced.\n", encoding="utf-8"
        )
    with atomic_write(out / "pretrain" / "summary.json") as fh:
        fh.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("data: %s", {k: v for k, v in summary.items() if k != "bad_rows"})
    return summary
