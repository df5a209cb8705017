"""Batches prepared on a background thread, a few ahead of the training step that consumes them.

Reading a batch from memory-mapped shards (page faults, the gather, the tensors) then overlaps with
the step. The items and their order are those of the wrapped iterator: prefetching changes when a
batch is built, never which, so resume stays exact.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order, produced on a daemon thread at most ``depth`` ahead.

    An exception raised while producing is raised here, at the item it stopped; closing the
    generator early (a break, an error in the consumer) stops the thread.
    """
    if depth <= 0:
        yield from items
        return
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, which raises it
            put(_Failure(err))

    thread = threading.Thread(target=produce, name="twilbert-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
