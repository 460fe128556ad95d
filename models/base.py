"""The detector interface: one small contract shared by training, evaluation and serving.

A detector sees *sequences of template ids* ("E5", "T3fa9...", "unknown"): a closed session
(``complete=True``) or the tail of an open one (sliding window, ``complete=False``) where only the
events from ``judge_from`` on are judged and the rest is context. Evaluation scores closed
sessions; the detect stage scores sliding windows while a session is open and the closed session
at the end, with the same ``score``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence as Seq

UNKNOWN = "unknown"


@dataclass
class Sequence:
    keys: list[str]                                  # template ids in event-time order
    templates: list[str] | None = None               # template texts (unseen ids still have text)
    params: list[list[float]] | None = None          # numeric parameters per event (optional)
    timestamps: list[float] | None = None            # event times (epoch s), for time deltas
    complete: bool = True                            # closed session: judge the end of it too
    start: bool = True                               # keys[0] is the session's first event
    judge_from: int = 0                              # events before this index are context only


@dataclass
class Anomaly:
    position: int                                    # index in Sequence.keys (len(keys) = end)
    kind: str                                        # "key" | "parameter" | "end" | "window"
    observed: str                                    # template id seen ("<end>" for the end)
    expected: list[tuple[str, float]] = field(default_factory=list)   # top-g (id, probability)
    score: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    anomalous: bool
    score: float                                     # higher = more anomalous
    anomalies: list[Anomaly] = field(default_factory=list)   # in position order
    details: dict[str, Any] = field(default_factory=dict)   # e.g. attention weights


class Detector(ABC):
    name: ClassVar[str]

    @abstractmethod
    def fit(self, sequences: Seq[Sequence], labels: Seq[int] | None = None, **options) -> dict:
        """Train; returns training statistics for the manifest."""

    @abstractmethod
    def score(self, sequences: Seq[Sequence]) -> list[Verdict]:
        """Batched verdicts, one per sequence, on the detector's device."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write weights (safetensors, no pickle) and the detector's part of manifest.json."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, device: str = "auto") -> "Detector":
        """Read what save() wrote."""


def pick_device(setting: str = "auto") -> str:
    """'cuda' when asked or when auto finds a GPU; else 'cpu'."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("LOGWARDEN_DEVICE=cuda but torch finds no CUDA device")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def limit_cpu_threads() -> None:
    """Leave a core to the broker and the other stages: with every core busy, torch's worker
    threads spin against them (measured on 2 shared cores: 1 thread trains ~10x faster than 2,
    and the detect stage scores ~40x more windows/s; BENCHMARKS.md, detect section)."""
    import os

    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))
