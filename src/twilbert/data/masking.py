"""Dynamic masked-LM corruption (BERT word masking, SpanBERT-style span masking) as batched tensor ops.

Per sequence ``round(budget * n_maskable)`` tokens are chosen (at least one when any is maskable;
round-half-to-even). Each becomes [MASK], a random non-special id or itself with ``probs.mask`` /
``probs.random`` / ``probs.keep``, per token for word masking, per span for span masking (as SpanBERT
does). Labels hold the original id where chosen, -100 elsewhere.

Whole-word masking: given ``word_start`` (a Hugging Face tokenizer's word boundaries, stored by the
pairs stage), word masking chooses whole words, every piece of a word or none, in a random order
until the next word would pass the budget (always at least one word), with one mask/random/keep
draw per word; span masking makes SpanBERT's spans of whole words (lengths counted in words)."""

from __future__ import annotations

from typing import Optional

import torch

from twilbert.config import MaskedLMConfig
from twilbert.data.special import IGNORE_INDEX

SPAN_GEOMETRIC_P = 0.2  # SpanBERT's span length distribution


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    cfg: MaskedLMConfig,
    vocab_size: int,
    mask_id: int,
    n_special: int,
    generator: torch.Generator,
    word_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_ids, labels)``, both (B, T); ``special_mask`` is True where nothing may be masked
    ([CLS], [SEP], [PAD]). Random replacements are drawn from ``[n_special, vocab_size)``.
    ``word_start`` (B, T) bool, True on the first piece of each word: word masking masks whole words."""
    _check_args(input_ids, special_mask, vocab_size, mask_id, n_special)
    if word_start is not None and (word_start.shape != input_ids.shape or word_start.dtype != torch.bool):
        raise ValueError(f"word_start must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                         f"got {word_start.dtype} {tuple(word_start.shape)}")
    maskable = ~special_mask  # (B, T)
    n_target = _budget(maskable, cfg.budget)  # (B,)
    if cfg.type == "span" and word_start is not None:
        chosen, unit = _choose_word_spans(maskable, word_start, n_target, cfg.max_span, generator)
    elif cfg.type == "span":
        chosen, unit = _choose_spans(maskable, n_target, cfg.max_span, generator)
    elif cfg.type == "word" and word_start is not None:
        chosen, unit = _choose_whole_words(maskable, word_start, n_target, generator)
    elif cfg.type == "word":
        chosen, unit = _choose_words(maskable, n_target, generator), None
    else:
        raise ValueError(f"masked_lm.type must be 'word' or 'span', got {cfg.type!r}")

    # One uniform draw per decision unit (token, span or word) picks mask / random / keep.
    B, T = input_ids.shape
    u = torch.rand(B, T + 1 if unit is not None else T, generator=generator, device=input_ids.device)
    if unit is not None:
        u = u.gather(1, unit)  # (B, T): each token takes its span's draw
    random_ids = torch.randint(n_special, vocab_size, (B, T), generator=generator, device=input_ids.device)
    to_mask = chosen & (u < cfg.probs.mask)
    to_random = chosen & (u >= cfg.probs.mask) & (u < cfg.probs.mask + cfg.probs.random)

    masked = input_ids.masked_fill(to_mask, mask_id)
    masked = torch.where(to_random, random_ids, masked)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    return masked, labels


def _budget(maskable: torch.Tensor, budget: float) -> torch.Tensor:
    """Tokens to choose per row: round(budget * n_maskable), at least 1 when any is maskable. (B,)"""
    n = maskable.sum(1)
    target = torch.round(n.double() * budget).long()
    return torch.maximum(target, (n > 0).long())


def _choose_words(maskable: torch.Tensor, n_target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exactly n_target maskable positions per row, uniformly at random. (B, T) bool"""
    scores = torch.rand(maskable.shape, generator=generator, device=maskable.device)
    scores = scores.masked_fill(~maskable, 2.0)  # specials sort last
    rank = scores.argsort(1).argsort(1)  # (B, T): position's rank in a random order
    return maskable & (rank < n_target[:, None])


def _choose_whole_words(maskable: torch.Tensor, word_start: torch.Tensor, n_target: torch.Tensor,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole words in a uniformly random order, while their pieces stay within n_target (the first word
    always), and each token's word id (T: in no word), which shares one mask/random/keep decision.

    A word is a maskable token marked in ``word_start`` with the unmarked maskable tokens after it; a
    maskable token right after a special one starts a word whatever the mark says."""
    B, T = maskable.shape
    device = maskable.device
    prev_maskable = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)
    starts = maskable & (word_start | ~prev_maskable)  # (B, T)
    word = torch.where(maskable, starts.long().cumsum(1) - 1, torch.full((B, T), T, dtype=torch.long, device=device))
    word_len = torch.zeros(B, T + 1, dtype=torch.long, device=device).scatter_add_(1, word, maskable.long())
    word_len[:, T] = 0  # the slot of the tokens in no word
    order = torch.rand(B, T + 1, generator=generator, device=device).argsort(1)  # (B, T+1)
    sorted_len = word_len.gather(1, order)
    through = sorted_len.cumsum(1)  # pieces of the words up to this one, in that order
    # a prefix of the order: the sums only grow; ids without a word have no pieces and change nothing
    taken_sorted = (sorted_len > 0) & ((through <= n_target[:, None]) | (through == sorted_len))
    taken = torch.empty_like(taken_sorted).scatter_(1, order, taken_sorted)  # (B, T+1) by word id
    return maskable & taken.gather(1, word), word


def span_length_probs(max_span: int, p: float = SPAN_GEOMETRIC_P) -> torch.Tensor:
    """P(length = 1..max_span): geometric(p) truncated to max_span and renormalized. (max_span,)"""
    lengths = torch.arange(max_span, dtype=torch.float64)
    weights = p * (1 - p) ** lengths
    return weights / weights.sum()


def _choose_word_spans(maskable: torch.Tensor, word_start: torch.Tensor, n_target: torch.Tensor, max_span: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SpanBERT's spans of whole words: :func:`_choose_spans` on the row seen as units, each word one
    unit (as long as its pieces) and each special token one, so spans count words, never cut one and
    never cross a special; the budget counts tokens. Returns the chosen tokens and each one's span id."""
    B, T = maskable.shape
    prev_maskable = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)
    starts = maskable & (word_start | ~prev_maskable)
    unit = (starts | ~maskable).long().cumsum(1) - 1  # (B, T): the unit of each token, 0.. in order
    unit_maskable = torch.zeros_like(maskable).scatter_(1, unit, maskable)  # a word's tokens agree
    unit_len = torch.zeros(B, T, dtype=torch.long, device=maskable.device).scatter_add_(1, unit, maskable.long())
    chosen, span = _choose_spans(unit_maskable, n_target, max_span, generator, weight=unit_len)
    return maskable & chosen.gather(1, unit), torch.where(maskable, span.gather(1, unit), T)


def _choose_spans(
    maskable: torch.Tensor, n_target: torch.Tensor, max_span: int, generator: torch.Generator,
    weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous spans covering n_target tokens per row, and each token's span id (T: in no span),
    which shares one mask/random/keep decision per span. From a random start the row is cut into
    segments of ``length + 1`` tokens (lengths from :func:`span_length_probs`), clipped at special
    tokens; each segment ends in a never-chosen gap, so spans never merge or cross [SEP]. Spans are
    taken in random order until the budget is met exactly (the last cut at a random offset); the gaps
    cap the masked share at about 1 / (1 + 1/E[length]) (>= 1/2).

    ``weight`` (B, T): tokens per position (positions are then words, :func:`_choose_word_spans`).
    Spans are taken in random order while their tokens fit; the one crossing the budget gives the
    positions from a random offset while they fit (the row's first span at least its first position),
    so a row gets at most n_target tokens, or one word."""
    B, T = maskable.shape
    device = maskable.device
    positions = torch.arange(T, device=device).expand(B, T)  # (B, T)

    # Segmentation: segment k = span_len[k] tokens followed by one gap token. The row starts at a
    # random point of a stationary segmentation (first segment length-biased, random offset in it),
    # so no position is favoured, e.g. the token after [CLS] is not always a span start.
    probs = span_length_probs(max_span)
    n_segments = (T + max_span) // 2 + 1  # every segment has >= 2 tokens, so these cover the shifted row
    draws = torch.rand(B, n_segments, generator=generator, device=device)
    span_len = _sample(probs, draws)  # (B, K) in 1..max_span
    biased = probs * torch.arange(2, max_span + 2, dtype=probs.dtype)  # P(t in a segment of length l) ∝ (l+1) p_l
    span_len[:, 0] = _sample(biased / biased.sum(), draws[:, 0].contiguous())
    shift = (torch.rand(B, generator=generator, device=device) * (span_len[:, 0] + 1)).long()  # (B,)
    shifted = (positions + shift[:, None]).contiguous()  # (B, T)
    seg_end = (span_len + 1).cumsum(1)  # (B, K): exclusive end of each segment
    seg = torch.searchsorted(seg_end, shifted, right=True)  # (B, T): segment of each token
    seg_start = seg_end.gather(1, seg) - (span_len.gather(1, seg) + 1)  # (B, T)
    in_span = (shifted - seg_start) < span_len.gather(1, seg)  # (B, T): False on gap tokens

    # Pieces: the span part of a segment, cut at special tokens.
    eligible = in_span & maskable  # (B, T)
    prev_eligible = torch.nn.functional.pad(eligible[:, :-1], (1, 0), value=False)
    prev_seg = torch.nn.functional.pad(seg[:, :-1], (1, 0), value=-1)
    starts = eligible & ~(prev_eligible & (prev_seg == seg))  # (B, T): first token of a piece
    piece = torch.where(eligible, starts.long().cumsum(1) - 1, torch.full_like(seg, T))  # (B, T) in 0..T
    piece_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(1).values
    offset = positions - piece_start  # (B, T): position inside its piece (valid where eligible)

    # Take pieces in a uniformly random order (SpanBERT: a span, then another, until the budget).
    piece_len = torch.zeros(B, T + 1, dtype=torch.long, device=device).scatter_add_(1, piece, eligible.long())
    size = eligible.long() if weight is None else torch.where(eligible, weight, 0)  # (B, T): tokens per position
    piece_size = piece_len if weight is None else torch.zeros_like(piece_len).scatter_add_(1, piece, size)
    order = torch.rand(B, T + 1, generator=generator, device=device).argsort(1)  # (B, T+1)
    sorted_len = piece_size.gather(1, order)
    before_sorted = sorted_len.cumsum(1) - sorted_len  # tokens in earlier pieces, in that order
    before = torch.empty_like(before_sorted).scatter_(1, order, before_sorted)  # (B, T+1) by piece id

    # Pieces that fit are taken whole; the one crossing the budget gives a sub-run at a random offset
    # (always its first tokens would favour the token after each [CLS]/[SEP]).
    room = (n_target[:, None] - before).clamp(min=0)  # (B, T+1): budget left for each piece
    draw = torch.rand(B, T + 1, generator=generator, device=device)
    if weight is None:
        take = torch.minimum(room, piece_len)
        lo = (draw * (piece_len - take + 1)).long().gather(1, piece)  # (B, T)
        chosen = eligible & (offset >= lo) & (offset < lo + take.gather(1, piece))
        return chosen, piece
    # Weighted: as many positions as fit from the piece's start (``fit``: all of a piece that fits) give
    # the range of the random offset, as above; from it, positions while their tokens fit the room.
    through = size.cumsum(1)  # (B, T): tokens up to and including each position
    room_here = room.gather(1, piece)  # (B, T)
    from_start = through - (through - size).gather(1, piece_start)
    fit = torch.zeros_like(piece_len).scatter_add_(1, piece, (eligible & (from_start <= room_here)).long())
    lo = (draw * (piece_len - fit + (fit > 0).long())).long().gather(1, piece)  # (B, T); fit 0: any position
    first = (piece_start + lo).clamp(max=T - 1)  # the position the piece's taken run starts at
    tokens = through - (through - size).gather(1, first)  # tokens from there through this position
    first_piece = (before == 0).gather(1, piece)  # the first span of the order: at least one word
    chosen = eligible & (offset >= lo) & ((tokens <= room_here) | ((offset == lo) & first_piece))
    return chosen, piece


def _sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws of 1..len(probs) from uniforms in [0, 1), same shape as ``uniform``."""
    cdf = probs.cumsum(0).to(device=uniform.device, dtype=uniform.dtype)
    return torch.searchsorted(cdf, uniform, right=True).clamp_(max=len(probs) - 1) + 1


def _check_args(
    input_ids: torch.Tensor, special_mask: torch.Tensor, vocab_size: int, mask_id: int, n_special: int
) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (B, T) LongTensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if special_mask.shape != input_ids.shape or special_mask.dtype != torch.bool:
        raise ValueError(
            f"special_mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
            f"got {special_mask.dtype} {tuple(special_mask.shape)}"
        )
    if not 0 <= n_special < vocab_size:
        raise ValueError(f"need 0 <= n_special < vocab_size, got n_special={n_special}, vocab_size={vocab_size}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} is outside the vocabulary (size {vocab_size})")
