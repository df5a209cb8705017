"""SentencePiece vocabulary with TWilBert's special tokens (their ids: ``data/batch.py``).

The vocab directory carries its own metadata (``meta.json``: size, special-token ids, the
preprocessing applied before tokenization), so later stages never re-derive them.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

from twilbert.config import VocabConfig
from twilbert.data.preprocess import PreprocessConfig, Preprocessor
from twilbert.data.special import CLS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from twilbert.errors import TwilbertError, one_line
from twilbert.io_utils import publish_dir

log = logging.getLogger(__name__)

# Cut points inside a typed control-token string: after its '[' ("[" | "MASK]").
SPECIAL_TEXT = re.compile(r"(?<=\[)(?=(?:PAD|UNK|MASK|CLS|SEP)\])")


class VocabError(TwilbertError, ValueError):
    """A vocabulary cannot be trained or used; the message says what to do."""


def read_vocab_meta(path: Path) -> dict:
    """A vocabulary's ``meta.json``: a JSON object, or one line naming the file."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VocabError(f"{path}: not valid JSON ({err}); rerun the vocab stage") from None
    if not isinstance(meta, dict):
        raise VocabError(f"{path}: a JSON {type(meta).__name__}, not the object the vocab stage writes; rerun it")
    return meta


MODEL_FILE = "spm.model"
META_FILE = "meta.json"
# SentencePiece's unigram trainer mines its seed pieces from a suffix array of the whole sample, 20 bytes
# per character (sentencepiece_model.proto, on mining_sentence_size): 500k texts of ~200 characters took
# 2.07 GB. The sample is capped in characters too, so the stage stays near 0.9 GB whatever the texts'
# length. A constant, not a vocab.* key: meta.json records the vocab config, and a new key would change
# the default vocabulary's bytes, which never reaches this cap.
SAMPLE_MAX_CHARS = 40_000_000


def train_vocab(
    texts: Iterable[str],
    out_dir: Path,
    cfg: VocabConfig,
    preprocess: Optional[PreprocessConfig] = None,
    seed: int = 0,
) -> Path:
    """Train a SentencePiece model on ``texts`` (pretraining texts only) into ``out_dir``, atomically.

    ``texts`` is streamed once: SentencePiece sees a seeded uniform sample of at most
    ``cfg.max_sentences`` of them and :data:`SAMPLE_MAX_CHARS` characters once preprocessed, so memory
    is bounded by the sample, not by the corpus. The same
    texts, config and seed write the same bytes: ``spm.model`` records no path (the trainer reads an
    iterator and hands the model back), and its own random generator is seeded.
    """
    out_dir = Path(out_dir)
    prep = Preprocessor(preprocess or PreprocessConfig())
    started = time.perf_counter()
    sample, n_texts = sample_texts(texts, cfg.max_sentences, seed)
    # The one part of the stage that grows with the corpus past the sample's size: logged, never written.
    log.info("vocab: drew a sample of %d of %d texts in %.3f s", len(sample), n_texts, time.perf_counter() - started)
    if n_texts == 0:
        raise VocabError("vocab: the pretraining corpus is empty; nothing to train a vocabulary on")
    for i, text in enumerate(sample):  # in place: the sample is held once
        sample[i] = prep(text).replace("\n", " ")
    sample = within_characters(sample, SAMPLE_MAX_CHARS, seed)
    n_sample = len(sample)
    with publish_dir(out_dir) as new_dir:
        # The sample waits on disk, preprocessed, while SentencePiece holds its own copy; it is
        # removed before the directory is published (a killed run's copy goes with its work folder).
        sample_file = new_dir / "sample.txt"
        with sample_file.open("w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(line + "\n" for line in sample)
        del sample
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        with sample_file.open(encoding="utf-8", newline="\n") as fh:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(line[:-1] for line in fh),
                model_writer=model,
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                character_coverage=cfg.character_coverage,
                normalization_rule_name="nmt_nfkc_cf" if cfg.lowercase else "nmt_nfkc",
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=-1,
                eos_id=-1,
                pad_piece="[PAD]",
                unk_piece="[UNK]",
                user_defined_symbols=list(SPECIAL_TOKENS[2:]),
                # A small corpus cannot always fill vocab_size; the real size is recorded in meta.json.
                hard_vocab_limit=False,
                # One thread keeps the trained vocabulary identical across reruns.
                num_threads=1,
                minloglevel=2,
            )
        sample_file.unlink()
        (new_dir / MODEL_FILE).write_bytes(model.getvalue())
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        meta = {
            "vocab_size": sp.get_piece_size(),
            "requested_vocab_size": cfg.vocab_size,
            "special_tokens": {tok: i for i, tok in enumerate(SPECIAL_TOKENS)},
            "n_training_texts": n_sample,
            "n_corpus_texts": n_texts,
            "sample_seed": seed,
            "vocab": asdict(cfg),
            "preprocess": prep.to_dict(),
        }
        (new_dir / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("vocab: %d pieces from a sample of %d of %d texts -> %s", meta["vocab_size"], n_sample, n_texts, out_dir)
    return out_dir


def sample_texts(texts: Iterable[str], k: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of at most ``k`` of ``texts`` (reservoir sampling, one pass) and how many
    there were. Integer draws only, so the same seed picks the same texts on every platform."""
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    for n, text in enumerate(texts, 1):
        if n <= k:
            sample.append(text)
        else:
            j = rng.randrange(n)
            if j < k:
                sample[j] = text
    return sample, n


def within_characters(lines: list[str], budget: int, seed: int) -> list[str]:
    """``lines`` as they are when they hold at most ``budget`` characters; else a seeded uniform subset
    that does: ``lines`` shuffled, then taken while they fit (a reservoir's slots are not in random
    order until the stream is much longer than the reservoir, so its prefix would favour early texts)."""
    if sum(map(len, lines)) <= budget:
        return lines
    random.Random(seed).shuffle(lines)
    total = 0
    for n, line in enumerate(lines):
        total += len(line)
        if total > budget:
            del lines[n:]
            break
    log.info("vocab: sample cut to %d texts, %d characters at most (SentencePiece's suffix array: 20 bytes "
             "a character)", len(lines), budget)
    return lines


class Tokenizer:
    """SentencePiece pieces plus the preprocessing the vocabulary was trained with."""

    def __init__(self, vocab_dir: Path, num_threads: Optional[int] = None):
        # num_threads: SentencePiece's threads per batched encode (None: its default, every core). A
        # process among several workers wants 1: idle threads spin, at ~3x the CPU of one (measured).
        self.num_threads = num_threads
        self.vocab_dir = vocab_dir = Path(vocab_dir)
        model, meta = vocab_dir / MODEL_FILE, vocab_dir / META_FILE
        for path in (model, meta):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; is {vocab_dir} a twilbert vocab or model directory?")
        self.meta = read_vocab_meta(meta)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model))
        except (RuntimeError, OSError) as err:  # SentencePiece's own words for a file it cannot parse
            raise VocabError(f"{model}: not a SentencePiece model ({one_line(str(err))}); rerun the vocab stage") from None
        self.preprocess = Preprocessor(PreprocessConfig.from_dict(self.meta.get("preprocess", {})))
        if self.sp.piece_to_id("[CLS]") != CLS_ID or self.sp.pad_id() != PAD_ID:
            raise VocabError(f"{model}: special tokens are not at the ids twilbert expects {SPECIAL_TOKENS}")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Preprocess and tokenize, untruncated; every text yields at least one token."""
        prepped = [self.preprocess(t) for t in texts]
        threads = {} if self.num_threads is None else {"num_threads": self.num_threads}
        ids = self.sp.encode(prepped, **threads)
        for i, row in enumerate(ids):
            if "[" in prepped[i] and SPECIAL_TEXT.search(prepped[i]):  # the scan in C spares most regex calls
                row = ids[i] = self._encode_literal_specials(prepped[i])
            if not row:  # e.g. a lone '▁' or U+FFFD: SentencePiece keeps nothing of it
                ids[i] = [UNK_ID]
        return ids

    def _encode_literal_specials(self, text: str) -> list[int]:
        """A tweet that types '[MASK]' means the characters, not the control token: encode the
        text in parts cut inside each such string, so SentencePiece never sees it whole."""
        parts = SPECIAL_TEXT.split(text)
        return [i for part in parts if part for i in self.sp.encode(part)]

    def decode_ids(self, ids: Sequence[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def copy_to(self, directory: Path) -> None:
        """Embed the vocabulary in a model directory so the model is self-contained."""
        directory = Path(directory)
        shutil.copyfile(self.vocab_dir / MODEL_FILE, directory / MODEL_FILE)
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=2, ensure_ascii=False), encoding="utf-8")
