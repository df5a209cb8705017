"""Exact-duplicate removal: what counts as the same tweet, and the digest set behind it."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from twilbert.data.dedup import DIGEST_BYTES, DigestSet, normalized, row_digests


def test_retweets_and_copy_pastes_normalize_to_the_same_text():
    same = [
        "Hola  mundo https://t.co/AbC @Ana",
        "RT @pepe_99: hola mundo http://x.es/y @otra",
        "hola\tmundo\nwww.ejemplo.com @Z",
        "HOLA MUNDO url @user",
    ]
    assert {normalized(t) for t in same} == {"hola mundo url @user"}
    assert normalized("hola mundos url @user") != normalized(same[0])


def test_row_digests_tell_pairs_from_swapped_pairs_and_plain_texts():
    d = row_digests([("hola", "adiós"), ("adiós", "hola"), ("hola", None), ("HOLA ", None), ("hola adiós", None)])
    assert d.dtype == np.uint64 and len(d) == 5 and np.all(d != 0)
    assert len({int(x) for x in d}) == 4 and d[2] == d[3]


def test_digest_set_stores_eight_bytes_a_slot_and_stays_under_its_load_factor():
    s = DigestSet()
    s.add(np.arange(1, 200_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    assert len(s) == 200_000
    assert s.slots.itemsize == DIGEST_BYTES
    assert 8 / 0.7 <= s.nbytes / len(s) <= 2 * 8 / 0.7


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.integers(1, 300), max_size=200), max_size=12))
def test_digest_set_answers_like_a_python_set_through_growth(batches):
    s, seen = DigestSet(capacity=16), set()
    for batch in batches:
        new = s.add(np.array(batch, dtype=np.uint64))
        expected = []
        for x in batch:
            expected.append(x not in seen)
            seen.add(x)
        assert new.tolist() == expected
    assert len(s) == len(seen)
