"""A bounded memo of per-input model outputs, for scoring in the stream.

The stream scores one newly released event per session at a time, in batches of hundreds to
thousands, and HDFS histories repeat heavily: most windows a detector meets it has met before.
``RowMemo`` keeps the model's output row for each distinct input (keyed by its bytes), least
recently used out first. A memo only helps if it returns exactly what computing would, so that a
verdict never depends on which batch a window came in or on what was scored before it; the
detectors therefore compute every miss in batches of one fixed shape (``FIXED_ROWS``, padded),
whose rows do not depend on the other rows beside them (torch picks kernels by shape; measured:
on CPU a row computed alone can differ from the same row in a batch of 64 in the last bit).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import numpy as np

FIXED_ROWS = 64          # inputs per forward pass when scoring: one shape for every batch
DEFAULT_SIZE = 200_000   # rows kept (a DeepLog row of 20 keys is ~100 bytes + its key)


class RowMemo:
    """key -> output row (numpy), at most ``size`` of them; ``size`` 0 keeps nothing."""

    def __init__(self, size: int = DEFAULT_SIZE):
        if size < 0:
            raise ValueError(f"memo size must be >= 0, got {size!r}")
        self.size = size
        self._rows: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget every row: the model changed (trained, updated, grown, loaded)."""
        self._rows.clear()

    def lookup(self, keys: list[Hashable]) -> tuple[list[np.ndarray | None], list[int]]:
        """The memoised row of each key (None where absent) and the indices of the absent ones."""
        rows = self._rows
        found: list[np.ndarray | None] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            row = rows.get(key)
            if row is None:
                missing.append(i)
            else:
                rows.move_to_end(key)
            found.append(row)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return found, missing

    def store(self, keys: list[Hashable], values: np.ndarray) -> None:
        if not self.size:
            return
        rows = self._rows
        for key, value in zip(keys, values):
            rows[key] = value
        while len(rows) > self.size:
            rows.popitem(last=False)


def fixed_chunks(count: int, size: int = FIXED_ROWS):
    """(start, stop) of consecutive chunks of ``size`` rows covering ``count``; the caller pads
    the last one to ``size`` so that every forward pass has the same shape."""
    for start in range(0, count, size):
        yield start, min(count, start + size)
