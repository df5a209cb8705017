import threading

import pytest

from twilbert.data.prefetch import prefetch


def test_prefetched_items_arrive_in_order_and_complete():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))


def test_items_are_produced_on_another_thread():
    producers = []

    def items():
        for i in range(3):
            producers.append(threading.current_thread().name)
            yield i

    assert list(prefetch(items())) == [0, 1, 2]
    assert set(producers) == {"twilbert-prefetch"}


def test_an_error_while_producing_is_raised_at_the_consumer_after_the_good_items():
    def items():
        yield 1
        yield 2
        raise ValueError("shard-00003.tokens.npy: truncated")

    got = []
    with pytest.raises(ValueError, match="truncated"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]


def test_closing_early_stops_the_producer():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert len(produced) <= 5  # one consumed, two queued, at most one more blocked on the queue
    assert not [t for t in threading.enumerate() if t.name == "twilbert-prefetch"]
