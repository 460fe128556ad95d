"""Checking a detector's memo (models/memo.py): verdicts must not depend on how windows are batched."""
from __future__ import annotations

import copy
import random

from models.memo import RowMemo


def memo_agrees_with_computing(detector, items: list, rng: random.Random, largest_batch: int,
                               view=lambda verdict: verdict, rounds: int = 3):
    """Scores ``items`` one at a time without a memo, then ``rounds`` times in shuffled batches of
    random sizes with a memo (each round after the others: other histories first); asserts every
    verdict (as ``view`` shows it) equals the computed one. Returns the memoising copy."""
    computing = copy.deepcopy(detector)
    computing.memo = RowMemo(0)                                # keeps nothing: computes every time
    reference = [view(computing.score([item])[0]) for item in items]
    assert len(computing.memo) == 0
    memoised = copy.deepcopy(detector)
    memoised.memo.clear()
    for _ in range(rounds):
        order = list(range(len(items)))
        rng.shuffle(order)
        got = {}
        while order:
            size = rng.randint(1, largest_batch)
            batch, order = order[:size], order[size:]
            for i, verdict in zip(batch, memoised.score([items[i] for i in batch])):
                got[i] = view(verdict)
        assert [got[i] for i in range(len(items))] == reference
    assert memoised.memo.hits > 0
    return memoised
