"""Sentence embeddings (TWilBert's ``get_embeddings``): pooled encoder states of a text file, to ``.npy``.

Any model directory works, pretrained or finetuned: only its encoder is used. Pooling is the
classification head's (``collapse_mode`` avg or cls, ``use_special_tokens``), so a vector is what a
finetuned head would see. Rows follow the input's lines, one each (a blank line embeds the
preprocessing placeholder); the file is streamed in chunks straight into the ``.npy`` body, atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from twilbert.data.batch import make_batch, pack_pairs
from twilbert.data.tokenizer import Tokenizer
from twilbert.device import resolve_device
from twilbert.inference.inputs import CHUNK_SIZE, PredictError, chunked, iter_lines, open_input, text_rows, tsv_rows
from twilbert.inference.predict import check_vocab_fits, read_model_config
from twilbert.io_utils import atomic_write
from twilbert.model import ClassificationHead, TWilBertModel
from twilbert.model.card import HeadConfig, ModelCard
from twilbert.model.io import load_into, load_pretrained_state

log = logging.getLogger(__name__)


def load_encoder(directory: Union[str, Path], device: str = "cpu") -> tuple[TWilBertModel, Tokenizer, ModelCard]:
    """(encoder in eval mode, tokenizer, model card) of a pretrained or finetuned model directory."""
    directory = Path(directory)
    card = read_model_config(directory, backbones=("twilbert",), command="embeddings")
    encoder = TWilBertModel(card.model_config, card.vocab_size, card.max_positions)
    _, state = load_pretrained_state(directory)
    load_into(encoder, state, strict=True)  # a full model's heads are dropped, the encoder must be complete
    try:
        tokenizer = Tokenizer(directory)
    except (OSError, RuntimeError, ValueError) as err:
        raise PredictError(f"{directory}: unreadable vocabulary ({err})") from None
    check_vocab_fits(directory, tokenizer, card.vocab_size)
    return encoder.to(resolve_device(device)).eval(), tokenizer, card


class Embedder:
    """Texts -> (N, H) float32 vectors, in input order, through length-bucketed batches."""

    def __init__(self, encoder: TWilBertModel, tokenizer: Tokenizer, max_len: int, collapse_mode: str = "avg",
                 use_special_tokens: bool = True):
        self.encoder, self.tokenizer, self.max_len = encoder, tokenizer, max_len
        self.hidden_size = encoder.cfg.hidden_size
        # Only its pool() is used: the same pooling finetuning applies.
        self.pooler = ClassificationHead(self.hidden_size, 1, collapse_mode, use_special_tokens)
        self.device = next(encoder.parameters()).device

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        data = pack_pairs(self.tokenizer.encode(texts), None, self.max_len)
        order = np.argsort(data["length"], kind="stable")
        out = np.empty((len(texts), self.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for begin in range(0, len(order), batch_size):
                idx = order[begin : begin + batch_size]
                batch = make_batch(data["input_ids"][idx], data["len_a"][idx], data["length"][idx],
                                   np.zeros(len(idx), dtype=np.int64)).to(self.device)
                hidden = self.encoder(batch.input_ids, batch.segment_ids, batch.attention_mask)  # (B, T, H)
                pooled = self.pooler.pool(hidden, batch.attention_mask, batch.special_mask)  # (B, H)
                out[idx] = pooled.float().cpu().numpy()
        return out


def write_embeddings(model_dir: Union[str, Path], input_path: str, output: Union[str, Path],
                     collapse_mode: Optional[str] = None, use_special_tokens: Optional[bool] = None,
                     column: Optional[str] = None, batch_size: int = 64, chunk_size: int = CHUNK_SIZE,
                     device: str = "cpu") -> tuple[int, int]:
    """Embed every line (or TSV ``column`` row) of ``input_path`` into ``output`` (.npy); returns its shape.

    ``collapse_mode``/``use_special_tokens`` default to a finetuned model's head settings, else avg/True.
    """
    if input_path == "-":
        raise PredictError("embeddings reads a file, not stdin: it counts the lines first to size the .npy")
    encoder, tokenizer, card = load_encoder(model_dir, device)
    head = card.head or HeadConfig()  # a pretrained model has no head: avg over all tokens
    mode = collapse_mode or head.collapse_mode
    special = head.use_special_tokens if use_special_tokens is None else use_special_tokens
    embedder = Embedder(encoder, tokenizer, card.text_len(n_segments=1), mode, special)

    with open_input(input_path) as fh:
        n = sum(1 for _ in fh) - (1 if column else 0)
    if n <= 0:
        raise PredictError(f"{input_path}: empty input; nothing to embed")
    shape = (n, embedder.hidden_size)
    written = 0
    with atomic_write(output, "wb") as out, open_input(input_path) as fh:
        np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": shape})
        lines = iter_lines(fh, input_path)
        rows = tsv_rows(lines, input_path, column) if column else text_rows(lines)
        for chunk in chunked(rows, input_path, chunk_size):
            vectors = embedder.embed(chunk.texts, batch_size)
            out.write(vectors.astype("<f4", copy=False).tobytes())
            written += len(vectors)
        if written != n:
            raise PredictError(f"{input_path}: changed while being read ({n} lines, then {written})")
    log.info("embeddings: %d x %d (%s, special tokens %s) -> %s", *shape, mode, special, output)
    return shape
