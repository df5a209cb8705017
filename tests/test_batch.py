"""The one packer of rows and the batches made from them, for TWilBert's template and another tokenizer's."""

import numpy as np
import pytest

from twilbert.data.batch import TWILBERT, Template, make_batch, pack_pairs
from twilbert.data.special import CLS_ID, PAD_ID, SEP_ID

# A RoBERTa-like template: two-token prefix, ``</s></s>`` between the texts, padding id 1.
ROBERTA_LIKE = Template(single=((0, 7), (2,)), pair=((0, 7), (2, 2), (2,)), pad_id=1)


def reference_pack(a, b, max_len, template):
    """Row by row, the way the template reads: prefix a (middle b) suffix, then padding."""
    width = template.width(max_len, b is not None)
    ids = np.full((len(a), width), template.pad_id, dtype=np.int32)
    len_a, length = np.zeros(len(a), np.int32), np.zeros(len(a), np.int32)
    for i, text in enumerate(a):
        if b is None:
            prefix, suffix = template.single
            row = [*prefix, *text[:max_len], *suffix]
        else:
            prefix, middle, suffix = template.pair
            row = [*prefix, *text[:max_len], *middle, *b[i][:max_len], *suffix]
        ids[i, : len(row)] = row
        len_a[i], length[i] = min(len(text), max_len), len(row)
    return {"input_ids": ids, "len_a": len_a, "length": length}


def test_pack_pairs_builds_cls_a_sep_b_sep_and_truncates_each_text():
    packed = pack_pairs([[10, 11, 12, 13]], [[20, 21]], max_len=3)
    assert packed["input_ids"].shape == (1, 2 * 3 + 3)
    assert packed["input_ids"][0].tolist() == [CLS_ID, 10, 11, 12, SEP_ID, 20, 21, SEP_ID, PAD_ID]
    assert packed["len_a"].tolist() == [3] and packed["length"].tolist() == [8]


def test_pack_single_texts_has_no_second_segment():
    packed = pack_pairs([[7], [7, 8]], None, max_len=4)
    assert packed["input_ids"].shape == (2, 6)
    assert np.array_equal(packed["length"], [3, 4])


@pytest.mark.parametrize("template", [TWILBERT, ROBERTA_LIKE], ids=["twilbert", "roberta_like"])
@pytest.mark.parametrize("with_b", [False, True])
def test_vectorised_packing_equals_the_row_by_row_reference(template, with_b):
    rng = np.random.default_rng(0)
    a = [list(rng.integers(10, 100, size=n)) for n in (0, 1, 3, 7, 12, 40)]
    b = [list(rng.integers(10, 100, size=n)) for n in (9, 0, 30, 2, 6, 1)] if with_b else None
    ours, reference = pack_pairs(a, b, 8, template), reference_pack(a, b, 8, template)
    assert set(ours) == set(reference)
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
        assert ours[key].dtype == reference[key].dtype


def test_no_texts_pack_into_no_rows():
    packed = pack_pairs([], [], 4)
    assert packed["input_ids"].shape == (0, 11) and len(packed["len_a"]) == len(packed["length"]) == 0


def test_batch_segments_and_special_tokens_follow_the_template():
    packed = pack_pairs([[10, 11]], [[20]], 4, ROBERTA_LIKE)
    batch = make_batch(packed["input_ids"], packed["len_a"], packed["length"], np.zeros(1, np.int64), ROBERTA_LIKE)
    # <s> 7 10 11 </s> </s> 20 </s>: segment 1 from the b text on
    assert batch.input_ids[0].tolist() == [0, 7, 10, 11, 2, 2, 20, 2]
    assert batch.segment_ids[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert batch.special_mask[0].tolist() == [True, True, False, False, True, True, False, True]


def test_twilbert_batch_marks_cls_sep_and_padding_as_special():
    packed = pack_pairs([[10, 11], [12]], [[20], [21, 22, 23]], 4)
    batch = make_batch(packed["input_ids"], packed["len_a"], packed["length"], np.array([1, 0]))
    assert batch.input_ids[1].tolist() == [CLS_ID, 12, SEP_ID, 21, 22, 23, SEP_ID]
    assert batch.input_ids[0].tolist() == [CLS_ID, 10, 11, SEP_ID, 20, SEP_ID, PAD_ID] and batch.padded
    assert batch.segment_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert batch.special_mask[0].tolist() == [True, False, False, True, False, True, True]
