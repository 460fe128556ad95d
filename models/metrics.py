"""Confusion counts and precision / recall / F1 for session verdicts (positive = anomalous)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Confusion:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        flagged = self.tp + self.fp
        return self.tp / flagged if flagged else 0.0

    @property
    def recall(self) -> float:
        anomalous = self.tp + self.fn
        return self.tp / anomalous if anomalous else 0.0

    @property
    def f1(self) -> float:
        # 2TP / (2TP + FP + FN): equal to the harmonic mean and defined when both are zero.
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def __add__(self, other: "Confusion") -> "Confusion":
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    def as_dict(self, digits: int = 4) -> dict:
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
                "precision": round(self.precision, digits), "recall": round(self.recall, digits),
                "f1": round(self.f1, digits)}


def confusion(truth: Iterable[int | bool], predicted: Iterable[int | bool]) -> Confusion:
    """Counts from paired labels (1/True = anomalous); the two must have the same length."""
    truth, predicted = list(truth), list(predicted)
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} labels but {len(predicted)} predictions")
    tp = fp = tn = fn = 0
    for actual, flagged in zip(truth, predicted):
        if actual and flagged:
            tp += 1
        elif flagged:
            fp += 1
        elif actual:
            fn += 1
        else:
            tn += 1
    return Confusion(tp, fp, tn, fn)
