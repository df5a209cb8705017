"""Length-grouped batch order: batches of rows of similar length, so a batch padded to its longest row
carries little padding.

Tweets are short and uneven: random batches of pairs are about half padding. The epoch order
(``batch.epoch_order``, a pure function of seed and epoch) is cut into windows of
:data:`WINDOW_BATCHES` batches; each window is sorted by row length (stable, so ties keep the
shuffled order), cut into batches, and its batches are shuffled by a generator seeded by
(seed, epoch, window). Every example still appears once per epoch, every batch but the last one of
the epoch is full, and a batch can be rebuilt from its number alone (resume reads one window's
lengths). The lengths are read per window from the shards' index (``PairShards.lengths``), never
for the whole corpus.

Without shuffling (evaluation), the windows of the natural order are sorted and their batches kept
in order.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

WINDOW_BATCHES = 64  # batches sorted together: wide enough to find equal lengths, narrow enough to stay random
_STREAM = 0x4C454E  # "LEN": keeps the batch shuffle's seed apart from the epoch order's ([seed, epoch])

Lengths = Callable[[np.ndarray], np.ndarray]  # example indices -> their row lengths (tokens)


def window_batches(order: np.ndarray, lengths: Lengths, batch_size: int, seed: int, epoch: int, window: int,
                   shuffle: bool = True) -> list[np.ndarray]:
    """The batches of window ``window`` of ``order`` (each a slice of the window sorted by length)."""
    span = WINDOW_BATCHES * batch_size
    chunk = order[window * span : (window + 1) * span]
    rows = chunk[np.argsort(np.asarray(lengths(chunk)), kind="stable")]
    batches = [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]
    if shuffle:
        full = len(rows) // batch_size  # a short last batch stays last: the epoch's only partial batch
        perm = np.random.default_rng([seed, epoch, window, _STREAM]).permutation(full)
        batches = [batches[i] for i in perm] + batches[full:]
    return batches


def grouped_batches(order: np.ndarray, lengths: Lengths, batch_size: int, seed: int, epoch: int,
                    shuffle: bool = True, start: int = 0) -> Iterator[np.ndarray]:
    """Example indices of each batch of the epoch order ``order`` (``batch.epoch_order(n, seed, epoch,
    shuffle)``), from batch ``start`` on, grouped by length.

    The same number of batches as plain batching (``ceil(n / batch_size)``), each ``batch_size``
    long but the last.
    """
    first = start // WINDOW_BATCHES
    for window in range(first, -(-len(order) // (WINDOW_BATCHES * batch_size))):
        batches = window_batches(order, lengths, batch_size, seed, epoch, window, shuffle)
        yield from batches[start - window * WINDOW_BATCHES if window == first else 0 :]


def padding_share(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Pad tokens over all tokens when each batch is padded to its longest row."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return 1.0 - real / total if total else 0.0
