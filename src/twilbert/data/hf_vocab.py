"""A Hugging Face checkpoint's own tokenizer as the pipeline's vocabulary (``training.init_from: hf``).

The ``vocab`` stage saves the checkpoint's fast tokenizer into ``data/vocab`` with a ``meta.json``
(``kind: hf``) that holds what later stages need without transformers: the vocabulary size, the
template of special ids around a pair of texts, the mask id, the ids random replacements may take
and the checkpoint's usable positions. ``pairs`` then tokenizes with the ``tokenizers`` library alone
(:class:`HFVocab`), which is what transformers' fast tokenizers run underneath.

:func:`open_vocab` opens either kind of vocabulary directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from twilbert.data.preprocess import PreprocessConfig, Preprocessor
from twilbert.data.tokenizer import META_FILE, Tokenizer, VocabError, read_vocab_meta
from twilbert.errors import one_line
from twilbert.io_utils import publish_dir

if TYPE_CHECKING:
    from twilbert.data.batch import Template

log = logging.getLogger(__name__)

KIND = "hf"
TOKENIZER_FILE = "tokenizer.json"
META_KEYS = ("vocab_size", "mask_id", "n_special", "template")  # what the later stages read from meta.json


# Not data.batch's Template here: the data stages never import torch (data/special.py says why).
def template_to_json(template: "Template") -> dict:
    return {"single": [list(p) for p in template.single], "pair": [list(p) for p in template.pair],
            "pad_id": template.pad_id}


def template_from_json(data: dict) -> "Template":
    from twilbert.data.batch import Template

    return Template(single=tuple(tuple(p) for p in data["single"]), pair=tuple(tuple(p) for p in data["pair"]),
                    pad_id=int(data["pad_id"]))


def leading_specials(special_ids: Sequence[int]) -> int:
    """How many ids from 0 up are special: random MLM replacements are drawn above them."""
    ids, n = set(special_ids), 0
    while n in ids:
        n += 1
    return n


def take_hf_vocab(hf_path: Union[str, Path], out_dir: Path, preprocess: Optional[PreprocessConfig] = None,
                  max_len: Optional[int] = None) -> Path:
    """Save the fast tokenizer of the local checkpoint ``hf_path`` into ``out_dir`` (atomically) with its meta;
    with ``max_len``, refuse first when pairs of ``max_len``-token texts would not fit its positions."""
    from twilbert.data.hf_checkpoint import MASKED_LM, load_hf_checkpoint
    from twilbert.data.packers import HFPacker, hf_max_positions

    path = Path(hf_path)
    # The whole checkpoint, weights included: the pretraining stage continues it, so a checkpoint whose
    # weights do not fit its config or that lacks tokenizer files is refused here, before data/vocab is written.
    checkpoint = load_hf_checkpoint(path, "training.hf_path", MASKED_LM)
    tokenizer, config = checkpoint.tokenizer, checkpoint.config
    if not getattr(tokenizer, "is_fast", False):
        raise VocabError(f"training.hf_path {str(hf_path)!r}: {type(tokenizer).__name__} has no fast (Rust) "
                         "version; the pairs stage needs its tokenizer.json")
    if tokenizer.mask_token_id is None:
        raise VocabError(f"training.hf_path {str(hf_path)!r}: the tokenizer has no mask token; masked-LM "
                         "pretraining needs one")
    prep = Preprocessor(preprocess or PreprocessConfig())
    packer = HFPacker(tokenizer, prep, hf_max_positions(checkpoint.model.base_model))
    del checkpoint
    vocab_size = len(tokenizer)
    if vocab_size > config.vocab_size:
        raise VocabError(f"training.hf_path {str(hf_path)!r}: the tokenizer has {vocab_size} ids, more than the "
                         f"{config.vocab_size} rows of the model's embeddings")
    specials = sorted(set(tokenizer.all_special_ids))
    meta = {
        "kind": KIND,
        "vocab_size": vocab_size,
        "mask_id": tokenizer.mask_token_id,
        "unk_id": tokenizer.unk_token_id,
        "special_ids": specials,
        "n_special": leading_specials(specials),
        "template": template_to_json(packer.template),
        "max_positions": packer.max_positions,
        "model_type": config.model_type,
        "type_vocab_size": getattr(config, "type_vocab_size", None),
        "source": {"hf_path": str(hf_path), "config_sha256": hashlib.sha256((path / "config.json").read_bytes())
                   .hexdigest() if (path / "config.json").is_file() else None},
        "preprocess": prep.to_dict(),
    }
    if max_len is not None:
        check_positions(meta, max_len, f"training.hf_path {hf_path}")
    with publish_dir(out_dir) as staged:
        tokenizer.save_pretrained(staged)
        if not (staged / TOKENIZER_FILE).is_file():
            raise VocabError(f"training.hf_path {str(hf_path)!r}: saving its tokenizer wrote no {TOKENIZER_FILE}")
        (staged / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("vocab: the tokenizer of %s (%s, %d ids) -> %s", hf_path, config.model_type, vocab_size, out_dir)
    return Path(out_dir)


class HFVocab:
    """The saved tokenizer of a checkpoint: ``encode`` like :class:`Tokenizer`, with the ``tokenizers`` library."""

    def __init__(self, vocab_dir: Path, num_threads: Optional[int] = None):
        from tokenizers import Tokenizer as RustTokenizer

        if num_threads == 1:  # a worker among processes: the processes are the parallelism
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.vocab_dir = vocab_dir = Path(vocab_dir)
        self.meta = read_meta(vocab_dir)
        if self.meta.get("kind") != KIND:
            raise VocabError(f"{vocab_dir / META_FILE}: not a Hugging Face vocabulary (kind {self.meta.get('kind')!r})")
        lacking = [key for key in META_KEYS if key not in self.meta]
        if lacking:
            raise VocabError(f"{vocab_dir / META_FILE}: no {', '.join(lacking)}; rerun the vocab stage")
        try:
            self.rust = RustTokenizer.from_file(str(vocab_dir / TOKENIZER_FILE))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
            raise VocabError(f"{vocab_dir / TOKENIZER_FILE}: not a tokenizers file ({one_line(str(err))}); rerun the "
                             "vocab stage") from None
        self.preprocess = Preprocessor(PreprocessConfig.from_dict(self.meta.get("preprocess", {})))
        self.template_json = self.meta["template"]  # the special ids around a pair, for the shards' manifest
        fallback = self.meta.get("unk_id")
        self.empty_id = fallback if fallback is not None else self.meta["mask_id"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def mask_id(self) -> int:
        return int(self.meta["mask_id"])

    @property
    def n_special(self) -> int:
        return int(self.meta["n_special"])

    @property
    def files(self) -> tuple[str, ...]:
        """The directory's files, in a fixed order: what identifies this vocabulary."""
        return tuple(sorted(p.name for p in self.vocab_dir.iterdir() if p.is_file()))

    def _encodings(self, texts: Sequence[str]) -> list:
        return self.rust.encode_batch([self.preprocess(t) for t in texts], add_special_tokens=False)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Preprocess and tokenize without special tokens, untruncated; every text yields at least one id."""
        return [e.ids or [self.empty_id] for e in self._encodings(texts)]

    def encode_words(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """:meth:`encode`'s ids, and whether each token (flat, text after text) starts a word: its word id
        (the pre-tokenizer's word: whitespace, punctuation, a byte-level or Metaspace split) differs
        from the previous token's. A text's first token starts one; so does a token without a word id."""
        encodings = self._encodings(texts)
        ids = [e.ids or [self.empty_id] for e in encodings]
        # None (no word) becomes NaN, unequal to everything: such a token is a word of its own
        words = np.array(list(itertools.chain.from_iterable(e.word_ids or [None] for e in encodings)),
                         dtype=np.float64)
        starts = np.ones(len(words), dtype=bool)
        starts[1:] = words[1:] != words[:-1]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        starts[np.cumsum(lengths) - lengths] = True
        return ids, starts

    def decode_ids(self, ids: Sequence[int]) -> list[str]:
        return [self.rust.id_to_token(int(i)) or "" for i in ids]

    def copy_to(self, directory: Path) -> None:
        for name in self.files:
            shutil.copyfile(self.vocab_dir / name, Path(directory) / name)


def read_meta(vocab_dir: Path) -> dict:
    path = Path(vocab_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {vocab_dir} a twilbert vocab or model directory?")
    return read_vocab_meta(path)


def is_hf_vocab(vocab_dir: Path) -> bool:
    path = Path(vocab_dir) / META_FILE
    return path.is_file() and read_vocab_meta(path).get("kind") == KIND


def open_vocab(vocab_dir: Path, num_threads: Optional[int] = None) -> Union[Tokenizer, HFVocab]:
    """The vocabulary of ``vocab_dir``: a checkpoint's tokenizer (``kind: hf``) or twilbert's SentencePiece."""
    return HFVocab(vocab_dir, num_threads) if is_hf_vocab(vocab_dir) else Tokenizer(vocab_dir, num_threads)


def vocab_preprocessor(vocab_dir: Path) -> Preprocessor:
    """The preprocessing a vocabulary (or a model directory carrying one) was made with."""
    return Preprocessor(PreprocessConfig.from_dict(read_meta(vocab_dir).get("preprocess", {})))


def check_positions(meta: dict, max_len: int, where: str) -> None:
    """A pair of ``max_len``-token texts in the checkpoint's template must fit its position embeddings."""
    from twilbert.config import ConfigError

    limit = meta.get("max_positions")
    width = sum(len(part) for part in meta["template"]["pair"]) + 2 * max_len
    if limit is not None and width > limit:
        fits = (limit - sum(len(part) for part in meta["template"]["pair"])) // 2
        raise ConfigError(f"representation.max_len={max_len} gives pairs of {width} tokens, more than the {limit} "
                          f"positions of {where}; set representation.max_len <= {fits}")
