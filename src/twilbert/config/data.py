"""The data side: where the corpus comes from, the vocabulary, text lengths, pair shards and tweet
normalization (``data``, ``vocab``, ``representation``, ``pairs``, ``preprocess``)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from twilbert.config.strict import (
    ConfigError,
    check_delimiter,
    check_nonempty,
    check_positive,
    check_probability,
    from_dict,
)

MAX_LEN_LIMIT = 512  # tokens per text: a 280-character tweet, with room for emoji names and subword splits
MAX_VOCAB_SIZE = 1_000_000  # SentencePiece pieces (XLM-R has 250k); an embedding table beyond is a mistake
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class RepresentationConfig:
    max_len: int = 64  # tokens per text; the input is [CLS] a [SEP] b [SEP] (2*max_len+3)
    max_len_test: Optional[int] = None

    @property
    def test_len(self) -> int:
        """Tokens per text at evaluation and prediction (``max_len_test``, else ``max_len``)."""
        return self.max_len_test or self.max_len

    def validate(self, where: str = "representation") -> None:
        check_positive(self, where, "max_len", "max_len_test")
        if self.max_len > MAX_LEN_LIMIT:
            raise ConfigError(
                f"{where}.max_len must be <= {MAX_LEN_LIMIT} tokens per text (a tweet is at most 280 characters; "
                f"the model gets 2*max_len+3 positions), got {self.max_len}"
            )
        if self.max_len_test is not None and self.max_len_test > self.max_len:
            raise ConfigError(
                f"{where}.max_len_test ({self.max_len_test}) must be <= {where}.max_len ({self.max_len})"
            )


@dataclass
class DataConfig:
    """Where the pretraining corpus comes from (the ``data`` stage)."""

    # evomsa: the embedded default | pairs_file: TWilBert pair TSVs | text_file: one tweet per line |
    # twitter, bluesky, parquet, csv: posts (posts_file), replies joined to their parents (docs/own-data.md)
    source: Literal["evomsa", "pairs_file", "text_file", "twitter", "bluesky", "parquet", "csv"] = "evomsa"
    # A path, a glob or a list of them (read in order, each glob sorted); ``.gz`` files are gunzipped.
    pairs_file: Union[str, list[str], None] = None
    text_file: Union[str, list[str], None] = None
    posts_file: Union[str, list[str], None] = None  # twitter/bluesky JSON lines, Parquet or CSV; .gz, .zst read as such
    lang: Optional[str] = None  # keep only posts in this language (e.g. es; es-MX counts); None keeps all
    keep_untagged: bool = True  # with lang set: keep posts that carry no language tag ('und' included)
    text_column: str = "text"  # parquet/csv: the post's text
    id_column: Optional[str] = None  # parquet/csv: the post's id (needed for replies)
    reply_to_column: Optional[str] = None  # parquet/csv: the id of the post it replies to
    lang_column: Optional[str] = None  # parquet/csv: the post's language tag
    csv_delimiter: str = ","
    engine_memory: str = "768MB"  # DuckDB's memory limit for the join; beyond it, it spills to disk
    pairs_header: bool = True  # False for headerless pair files (TWilBert's own dumps)
    delimiter: str = "\t"
    orig_text_header: str = "ORIG_TEXT"
    reply_text_header: str = "REPLY_TEXT"
    # The folder DVC tracks as the corpus (dvc.yaml's data stage depends on it): editing a file in it
    # reruns the pipeline. Corpus files outside it are read, with a warning that DVC cannot see them.
    corpus_dir: str = "corpus"
    dedup: bool = True  # drop exact duplicates (after normalizing case, spaces, @users, URLs, 'RT @x:')
    max_bad_rows: int = 0  # malformed rows reported and skipped before the stage fails instead
    evomsa_version: str = "2.0.14"
    evomsa_sha256: str = "948955df920578c668d1c19cf7051f2034a1c968ced6275284d9082b8c6cd8c4"
    split: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train/dev/test

    def corpus_files(self) -> list[str]:
        """The configured paths and globs of the selected source, unexpanded."""
        spec = {"pairs_file": self.pairs_file, "text_file": self.text_file}.get(self.source, self.posts_file)
        if self.source == "evomsa":
            spec = None
        return [] if spec is None else [spec] if isinstance(spec, str) else list(spec)

    def validate(self, where: str = "data") -> None:
        if self.source != "evomsa":
            key = f"{where}.{self.source if self.source in ('pairs_file', 'text_file') else 'posts_file'}"
            if not self.corpus_files():
                raise ConfigError(f"{key} must be set when {where}.source is '{self.source}' (a path, glob or list)")
            if any(not p.strip() for p in self.corpus_files()):
                raise ConfigError(f"{key} holds an empty path")
        if not self.corpus_dir.strip():
            raise ConfigError(f"{where}.corpus_dir must be a folder (DVC tracks it as the corpus), got ''")
        if os.path.normpath(self.corpus_dir) in (".", "..", "data", "models", "results"):
            raise ConfigError(
                f"{where}.corpus_dir {self.corpus_dir!r} would hold the pipeline's own outputs or the whole "
                "repository; use a folder of its own such as 'corpus', or an absolute path"
            )
        check_delimiter(self, where, "delimiter")
        check_nonempty(self, where, "orig_text_header", "reply_text_header", "evomsa_version", "text_column")
        check_delimiter(self, where, "csv_delimiter")
        if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)", self.engine_memory):
            raise ConfigError(f"{where}.engine_memory must be a size such as 768MB or 2GB, got {self.engine_memory!r}")
        if self.lang is not None and not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]+)*", self.lang):
            raise ConfigError(f"{where}.lang must be a language tag such as es (or null: every language), got {self.lang!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.evomsa_sha256):
            raise ConfigError(f"{where}.evomsa_sha256 must be 64 lowercase hex digits, got {self.evomsa_sha256!r}")
        if self.max_bad_rows < 0:
            raise ConfigError(f"{where}.max_bad_rows must be >= 0, got {self.max_bad_rows}")
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ConfigError(f"{where}.split must be three positive fractions summing to 1, got {self.split}")


@dataclass
class VocabConfig:
    vocab_size: int = 8000
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 0.9995
    lowercase: bool = False
    # SentencePiece trains on a seeded uniform sample of at most this many texts, and of at most
    # 40M characters (twilbert.data.tokenizer.SAMPLE_MAX_CHARS): its memory grows with the sample
    # (about 20 bytes per character, ~0.9 GB at the cap), never with the corpus.
    max_sentences: int = 500_000

    def validate(self, where: str = "vocab") -> None:
        if not 16 <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ConfigError(f"{where}.vocab_size must be in [16, {MAX_VOCAB_SIZE}], got {self.vocab_size}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"{where}.character_coverage must be in (0, 1], got {self.character_coverage}")
        if self.max_sentences < 1:
            raise ConfigError(f"{where}.max_sentences must be >= 1, got {self.max_sentences}")


@dataclass
class PairsConfig:
    heldout_fraction: float = 0.05  # share of corpus rows kept aside for held-out MLM/ROP evaluation
    shard_size: int = 100_000  # corpus rows per shard: the unit a crashed pairs stage resumes from
    workers: Optional[int] = None  # tokenizer processes; None or 0: one per core

    def validate(self, where: str = "pairs") -> None:
        check_positive(self, where, "shard_size")
        check_probability(self, where, "heldout_fraction")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"{where}.workers must be >= 0 (0 or null: one per core), got {self.workers}")


@dataclass
class PreprocessConfig:
    """How tweets are normalized (``twilbert.data.preprocess``); stored with each model so predictions
    see the same text."""

    users: Optional[str] = "@usuario"  # placeholder for @mentions; None keeps them
    urls: Optional[str] = "url"  # placeholder for links; None keeps them
    hashtags: Literal["keep", "strip", "split"] = "keep"
    laughter: bool = True
    laughter_token: str = "jaja"
    elongation: bool = True
    max_repeat: int = 3  # elongations are cut to this many repeats
    emoji: Literal["keep", "text", "remove"] = "keep"
    lowercase: bool = False  # applied after the entities are replaced, so it lowercases placeholders too
    empty_text: str = "[vacío]"  # returned when normalization leaves nothing

    def validate(self, where: str = "preprocess") -> "PreprocessConfig":
        if self.max_repeat < 1:
            raise ConfigError(f"{where}.max_repeat must be >= 1, got {self.max_repeat}")
        if not self.empty_text.split():  # what normalization's whitespace collapse would leave
            raise ConfigError(f"{where}.empty_text must hold visible text, got {self.empty_text!r}")
        for key in ("users", "urls", "laughter_token", "empty_text"):
            value = getattr(self, key)
            # Any surrogate code point: a lone one, or a pair that normalization would join into one character.
            if value is not None and _SURROGATE.search(value):
                raise ConfigError(f"{where}.{key} contains a lone surrogate: {value!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]], where: str = "preprocess") -> "PreprocessConfig":
        """Strict load (unknown or mistyped keys raise ConfigError), then validate."""
        return from_dict(cls, data, where).validate(where)
