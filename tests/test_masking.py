"""Dynamic MLM masking: budget, mask/random/keep split, specials, spans, determinism."""

from __future__ import annotations

import pytest
import torch

from twilbert.config import MaskedLMConfig, MaskProbs
from twilbert.data.masking import mask_tokens, span_length_probs
from twilbert.data.special import IGNORE_INDEX

VOCAB, MASK_ID, N_SPECIAL = 1000, 4, 5  # ids 0..4 are special ([PAD] [UNK] [CLS] [SEP] [MASK])
PAD, CLS, SEP = 0, 2, 3


def make_batch(batch: int = 64, seed: int = 0):
    """Pair inputs `[CLS] a [SEP] b [SEP] [PAD]...` with random lengths; returns ids and special mask."""
    g = torch.Generator().manual_seed(seed)
    T = 40
    ids = torch.randint(N_SPECIAL, VOCAB, (batch, T), generator=g)
    len_a = torch.randint(1, 15, (batch,), generator=g)
    len_b = torch.randint(0, 15, (batch,), generator=g)
    pos = torch.arange(T).expand(batch, T)
    sep1 = (len_a + 1)[:, None]
    sep2 = (len_a + len_b + 2)[:, None]
    ids = torch.where(pos == 0, CLS, ids)
    ids = torch.where((pos == sep1) | (pos == sep2), SEP, ids)
    ids = torch.where(pos > sep2, PAD, ids)
    special = (pos == 0) | (pos == sep1) | (pos >= sep2)
    return ids, special


def run(cfg: MaskedLMConfig, ids, special, seed: int = 1):
    return mask_tokens(ids, special, cfg, VOCAB, MASK_ID, N_SPECIAL, torch.Generator().manual_seed(seed))


def expected_budget(special: torch.Tensor, budget: float) -> torch.Tensor:
    n = (~special).sum(1)
    return torch.maximum(torch.round(n.double() * budget).long(), (n > 0).long())


def runs_of(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D bool tensor."""
    out, start = [], None
    for t, v in enumerate(row.tolist() + [False]):
        if v and start is None:
            start = t
        elif not v and start is not None:
            out.append((start, t - start))
            start = None
    return out


@pytest.mark.parametrize("kind", ["word", "span"])
def test_each_sequence_gets_exactly_its_budget(kind):
    ids, special = make_batch(256)
    cfg = MaskedLMConfig(type=kind, budget=0.15)
    _, labels = run(cfg, ids, special)
    chosen = labels != IGNORE_INDEX
    assert torch.equal(chosen.sum(1), expected_budget(special, 0.15))


def test_a_single_maskable_token_is_always_chosen():
    ids = torch.tensor([[CLS, 50, SEP, SEP, PAD, PAD]])
    special = torch.tensor([[True, False, True, True, True, True]])
    for kind in ("word", "span"):
        _, labels = run(MaskedLMConfig(type=kind, budget=0.15), ids, special)
        assert labels.tolist() == [[-100, 50, -100, -100, -100, -100]]


def test_rows_without_maskable_tokens_are_left_alone():
    ids = torch.tensor([[CLS, SEP, SEP, PAD]])
    special = torch.ones_like(ids, dtype=torch.bool)
    for kind in ("word", "span"):
        masked, labels = run(MaskedLMConfig(type=kind), ids, special)
        assert torch.equal(masked, ids) and (labels == IGNORE_INDEX).all()


@pytest.mark.parametrize("kind", ["word", "span"])
def test_masked_share_matches_budget_over_many_draws(kind):
    ids, special = make_batch(512)
    cfg = MaskedLMConfig(type=kind, budget=0.3)
    _, labels = run(cfg, ids, special)
    share = (labels != IGNORE_INDEX).sum().item() / (~special).sum().item()
    assert abs(share - 0.3) < 0.01  # per-row rounding only


@pytest.mark.parametrize("kind", ["word", "span"])
def test_mask_random_keep_split_follows_probs(kind):
    ids, special = make_batch(2048)
    cfg = MaskedLMConfig(type=kind, budget=0.3, probs=MaskProbs(mask=0.6, random=0.3, keep=0.1))
    masked, labels = run(cfg, ids, special)
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    as_mask = (chosen & (masked == MASK_ID)).sum().item() / n
    unchanged = (chosen & (masked == ids)).sum().item() / n
    # a random draw equal to the original counts as 'unchanged' (1 in 995 chance)
    tol = 0.02 if kind == "word" else 0.04  # span decisions are shared, so fewer independent draws
    assert abs(as_mask - 0.6) < tol
    assert abs(unchanged - 0.1) < tol
    assert abs((1 - as_mask - unchanged) - 0.3) < tol


@pytest.mark.parametrize("kind", ["word", "span"])
def test_specials_and_padding_are_never_touched(kind):
    ids, special = make_batch(512)
    masked, labels = run(MaskedLMConfig(type=kind, budget=0.5), ids, special)
    assert torch.equal(masked[special], ids[special])
    assert (labels[special] == IGNORE_INDEX).all()


@pytest.mark.parametrize("kind", ["word", "span"])
def test_random_replacements_are_never_special(kind):
    ids, special = make_batch(512)
    cfg = MaskedLMConfig(type=kind, budget=0.4, probs=MaskProbs(mask=0.0, random=1.0, keep=0.0))
    masked, labels = run(cfg, ids, special)
    chosen = labels != IGNORE_INDEX
    assert (masked[chosen] >= N_SPECIAL).all() and (masked[chosen] < VOCAB).all()
    assert (masked[chosen] != ids[chosen]).float().mean() > 0.99


@pytest.mark.parametrize("kind", ["word", "span"])
def test_labels_are_the_original_ids_exactly_where_chosen(kind):
    ids, special = make_batch(256)
    masked, labels = run(MaskedLMConfig(type=kind), ids, special)
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing outside the chosen set changes
    assert (masked[chosen] != ids[chosen]).float().mean() > 0.8  # 80% [MASK] + most random ids


@pytest.mark.parametrize("max_span", [1, 3, 5])
def test_span_masking_produces_contiguous_runs_within_max_span(max_span):
    ids, special = make_batch(256)
    cfg = MaskedLMConfig(type="span", max_span=max_span, budget=0.3)
    _, labels = run(cfg, ids, special)
    chosen = labels != IGNORE_INDEX
    lengths = [n for row in chosen for _, n in runs_of(row)]
    assert max(lengths) == max_span
    assert torch.equal(chosen.sum(1), expected_budget(special, 0.3))
    if max_span > 1:  # spans, not scattered words: most chosen tokens sit in runs longer than 1
        assert sum(n for n in lengths if n > 1) > 0.5 * sum(lengths)


@pytest.mark.parametrize("kind", ["word", "span"])
def test_no_position_is_favoured(kind):
    T = 40
    ids = torch.randint(N_SPECIAL, VOCAB, (8192, T), generator=torch.Generator().manual_seed(3))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, [0, T // 2, T - 1]] = True  # [CLS] a [SEP] b [SEP]
    _, labels = run(MaskedLMConfig(type=kind, budget=0.15), ids, special)
    rate = (labels != IGNORE_INDEX).float().mean(0)[~special[0]]  # per maskable position
    assert (rate - rate.mean()).abs().max() < 0.02, rate


def test_spans_never_cross_special_tokens():
    ids, special = make_batch(256)
    _, labels = run(MaskedLMConfig(type="span", max_span=4, budget=0.45), ids, special)
    chosen = labels != IGNORE_INDEX
    for row_chosen, row_special in zip(chosen, special):
        for start, n in runs_of(row_chosen):
            assert not row_special[start : start + n].any()


def test_span_lengths_follow_the_truncated_geometric_law():
    probs = span_length_probs(3)
    assert torch.allclose(probs, torch.tensor([0.2, 0.16, 0.128], dtype=torch.float64) / 0.488)
    # in long unbroken rows with a small budget, most runs are whole spans
    ids = torch.randint(N_SPECIAL, VOCAB, (512, 200))
    special = torch.zeros_like(ids, dtype=torch.bool)
    _, labels = run(MaskedLMConfig(type="span", max_span=3, budget=0.1), ids, special)
    lengths = torch.tensor([n for row in labels != IGNORE_INDEX for _, n in runs_of(row)])
    observed = torch.stack([(lengths == k).float().mean() for k in (1, 2, 3)]).double()
    assert torch.allclose(observed, probs, atol=0.03)


@pytest.mark.parametrize("kind", ["word", "span"])
def test_masking_is_deterministic_under_a_seeded_generator(kind):
    ids, special = make_batch(64)
    cfg = MaskedLMConfig(type=kind)
    first = run(cfg, ids, special, seed=7)
    again = run(cfg, ids, special, seed=7)
    other = run(cfg, ids, special, seed=8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_masking_is_dynamic_across_calls_with_one_generator():
    ids, special = make_batch(64)
    g = torch.Generator().manual_seed(0)
    cfg = MaskedLMConfig()
    a = mask_tokens(ids, special, cfg, VOCAB, MASK_ID, N_SPECIAL, g)[1]
    b = mask_tokens(ids, special, cfg, VOCAB, MASK_ID, N_SPECIAL, g)[1]
    assert not torch.equal(a, b)


def test_inputs_are_not_modified():
    ids, special = make_batch(8)
    before = ids.clone()
    run(MaskedLMConfig(type="span"), ids, special)
    assert torch.equal(ids, before)


def test_bad_arguments_are_rejected():
    ids, special = make_batch(2)
    g = torch.Generator()
    with pytest.raises(ValueError, match="n_special"):
        mask_tokens(ids, special, MaskedLMConfig(), VOCAB, MASK_ID, VOCAB, g)
    with pytest.raises(ValueError, match="special_mask"):
        mask_tokens(ids, special.long(), MaskedLMConfig(), VOCAB, MASK_ID, N_SPECIAL, g)


# --------------------------------------------------------------------------------------------
# Whole-word masking (a Hugging Face tokenizer's word starts)
# --------------------------------------------------------------------------------------------


def make_words(special: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random word starts: words of 1-4 pieces, False on specials (as make_batch in data/batch.py gives)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(special.shape, generator=g) < 0.4) & ~special


def words_of(row_special: torch.Tensor, row_starts: torch.Tensor) -> list[list[int]]:
    """The positions of each word of one row: a start (or a token after a special) and the pieces after it."""
    out, previous_special = [], True
    for t, (sp, st) in enumerate(zip(row_special.tolist(), row_starts.tolist())):
        if not sp and (st or previous_special):
            out.append([t])
        elif not sp:
            out[-1].append(t)
        previous_special = sp
    return out


def test_whole_word_masking_chooses_every_piece_of_a_word_or_none_with_one_decision_per_word():
    ids, special = make_batch(256)
    starts = make_words(special)
    masked, labels = mask_tokens(ids, special, MaskedLMConfig(type="word"), VOCAB, MASK_ID, N_SPECIAL,
                                 torch.Generator().manual_seed(1), word_start=starts)
    chosen = labels != IGNORE_INDEX
    several = 0
    for b in range(len(ids)):
        for word in words_of(special[b], starts[b]):
            picked = chosen[b, word]
            assert picked.all() or not picked.any(), (b, word)
            if picked.all() and len(word) > 1:
                several += 1
                as_mask, kept = masked[b, word] == MASK_ID, masked[b, word] == ids[b, word]
                # one mask/random/keep draw per word: all pieces [MASK], or none of them
                assert as_mask.all() or not as_mask.any()
                assert not (kept.all() and as_mask.any())
    assert several > 50


def test_whole_word_masking_stops_before_the_budget_and_takes_at_least_one_word():
    ids, special = make_batch(256)
    starts = make_words(special)
    target = expected_budget(special, 0.15)
    _, labels = mask_tokens(ids, special, MaskedLMConfig(type="word"), VOCAB, MASK_ID, N_SPECIAL,
                            torch.Generator().manual_seed(2), word_start=starts)
    chosen = (labels != IGNORE_INDEX).sum(1)
    for b in range(len(ids)):
        words = words_of(special[b], starts[b])
        picked = [w for w in words if (labels[b, w] != IGNORE_INDEX).all()]
        assert len(picked) >= 1
        assert chosen[b] <= target[b] or len(picked) == 1, (b, chosen[b], target[b])
    # a prefix of a random order: short of the budget by less than a word on average
    assert chosen.double().mean() > 0.7 * target.double().mean()


def test_single_piece_words_mask_exactly_the_budget_as_token_masking_does():
    ids, special = make_batch(256)
    every = ~special  # each token its own word
    _, labels = mask_tokens(ids, special, MaskedLMConfig(type="word"), VOCAB, MASK_ID, N_SPECIAL,
                            torch.Generator().manual_seed(3), word_start=every)
    assert torch.equal((labels != IGNORE_INDEX).sum(1), expected_budget(special, 0.15))


def test_whole_word_masks_are_a_function_of_the_seed():
    ids, special = make_batch(64)
    starts = make_words(special)

    def draw(seed):
        return mask_tokens(ids, special, MaskedLMConfig(type="word"), VOCAB, MASK_ID, N_SPECIAL,
                           torch.Generator().manual_seed(seed), word_start=starts)

    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_span_masking_with_word_starts_makes_spans_of_whole_words_within_the_budget():
    ids, special = make_batch(256)
    starts = make_words(special)
    cfg = MaskedLMConfig(type="span", max_span=3)
    target = expected_budget(special, cfg.budget)
    masked, labels = mask_tokens(ids, special, cfg, VOCAB, MASK_ID, N_SPECIAL, torch.Generator().manual_seed(5),
                                 word_start=starts)
    chosen = labels != IGNORE_INDEX
    several = 0
    for b in range(len(ids)):
        words = words_of(special[b], starts[b])
        of = {t: k for k, w in enumerate(words) for t in w}
        for word in words:
            assert chosen[b, word].all() or not chosen[b, word].any(), (b, word)
        picked = [k for k, w in enumerate(words) if chosen[b, w].all()]
        assert picked and (chosen[b].sum() <= target[b] or len(picked) == 1)
        for start, length in runs_of(chosen[b]):  # a run of tokens: consecutive whole words, one decision
            run_words = {of[t] for t in range(start, start + length)}
            several += len(run_words) > 1
            assert len(run_words) <= cfg.max_span
            as_mask = masked[b, start:start + length] == MASK_ID
            assert as_mask.all() or not as_mask.any()
    assert several > 20
    # most of the budget is used: spans fill it, the last from a random word
    assert chosen.sum(1).double().mean() > 0.85 * target.double().mean()


def test_spans_of_single_piece_words_are_todays_token_spans():
    ids, special = make_batch(128)
    cfg = MaskedLMConfig(type="span")
    plain = run(cfg, ids, special, seed=4)
    as_words = mask_tokens(ids, special, cfg, VOCAB, MASK_ID, N_SPECIAL, torch.Generator().manual_seed(4),
                           word_start=~special)
    assert torch.equal(plain[0], as_words[0]) and torch.equal(plain[1], as_words[1])


def test_a_bad_word_start_is_refused():
    ids, special = make_batch(4)
    with pytest.raises(ValueError, match="word_start"):
        mask_tokens(ids, special, MaskedLMConfig(), VOCAB, MASK_ID, N_SPECIAL, torch.Generator(),
                    word_start=make_words(special).long())
