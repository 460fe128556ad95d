"""The detector interface: one small contract shared by training, evaluation and serving, for
every modality.

A detector declares the ``modality`` of the items it judges and scores a batch of them:

  logs     ``Sequence``: template ids ("E5", "T3fa9...", "unknown") of a closed session
           (``complete=True``), or the tail of an open one (``complete=False``) where only the
           events from ``judge_from`` on are judged and the rest is context (DeepLog, ATT-GRU);
  traces   ``Trace``: one complete trace, its spans ordered by start time with parent links;
  chunks   ``Chunk``: one entity (pod or host) over a time window: its metrics per time step,
           a summary of the spans on it per step, and its log events; each modality masked
           where it is absent (a step with no data is not a step with zeros).

Training, evaluation and the stream's detect stage call the same ``score``, so a verdict in the
stream equals the verdict in evaluation. ``Verdict``/``Anomaly`` are shared by all modalities.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence as Seq

UNKNOWN = "unknown"
MODALITIES = ("logs", "traces", "chunks")


@dataclass
class Sequence:
    keys: list[str]                                  # template ids in event-time order
    templates: list[str] | None = None               # template texts (unseen ids still have text)
    params: list[list[float]] | None = None          # numeric parameters per event (optional)
    timestamps: list[float] | None = None            # event times (epoch s), for time deltas
    complete: bool = True                            # closed session: judge the end of it too
    start: bool = True                               # keys[0] is the session's first event
    judge_from: int = 0                              # events before this index are context only


@dataclass(slots=True)
class Span:
    """One span of a trace (OpenTelemetry's fields, as the assemble stage and the data readers
    give them)."""
    span_id: str
    parent_id: str | None                            # None: a root span
    service: str                                     # resource service.name
    pod: str                                         # resource k8s.pod.name (else the host)
    operation: str                                   # span name
    start_ns: int
    end_ns: int
    status: int | None = None                        # OTLP status code 0 unset, 1 ok, 2 error; None: unknown

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass
class Trace:
    trace_id: str
    spans: list[Span]                                # ordered by (start_ns, span_id)
    # False for a trace the assembler closed before its own end (evicted to bound memory, or at
    # shutdown): where its spans stop is no event of the trace, so its end is not judged
    ended: bool = True

    @property
    def start_ns(self) -> int:
        return min(s.start_ns for s in self.spans)

    @property
    def end_ns(self) -> int:
        return max(s.end_ns for s in self.spans)


@dataclass
class TraceStats:
    """The spans on one entity in one time step of a chunk."""
    spans: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    # Calls into the entity as its callers see them: for each span on the entity whose parent is
    # on another entity, the parent's duration minus the span's (network and queueing between
    # the two; a delay injected on the entity shows here, not in its own spans). None: no such
    # span in the step.
    gap_p50_ms: float | None = None
    gap_p90_ms: float | None = None
    gap_p99_ms: float | None = None


@dataclass
class LogEvent:
    timestamp: float                                 # event time, epoch s
    template_id: str
    template: str
    level: str | None = None


@dataclass
class Chunk:
    """One entity over ``[start, end)`` in steps of ``step_s``: what Hades and AnoFusion judge.

    ``metrics[channel][i]`` is the value at step i, None where the entity had no sample;
    ``traces[i]`` the spans on the entity in step i, None where it had none; ``logs`` its log
    events in the window by event time. A modality is *present* in a step only where it has data
    (``present()``): detectors mask what is absent instead of reading it as zeros, so the presence
    of data never becomes a feature."""
    entity: str                                      # the instance: pod or host
    service: str | None                              # what it is an instance of (pods are renamed between days)
    start: float
    end: float
    step_s: float
    metrics: dict[str, list[float | None]] = field(default_factory=dict)
    traces: list[TraceStats | None] = field(default_factory=list)
    logs: list[LogEvent] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return max(1, round((self.end - self.start) / self.step_s))

    def step_of(self, timestamp: float) -> int:
        return min(self.steps - 1, max(0, int((timestamp - self.start) // self.step_s)))

    def present(self) -> dict[str, list[bool]]:
        """Per modality, per step: does the chunk hold data there."""
        n = self.steps
        metrics = [any(values[i] is not None for values in self.metrics.values() if i < len(values))
                   for i in range(n)]
        traces = [i < len(self.traces) and self.traces[i] is not None for i in range(n)]
        logs = [False] * n
        for event in self.logs:
            logs[self.step_of(event.timestamp)] = True
        return {"metrics": metrics, "traces": traces, "logs": logs}


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
    details: dict[str, Any] = field(default_factory=dict)   # e.g. attention weights, deviating channels


class Detector(ABC):
    """``fit``/``score``/``save``/``load`` for every modality. Detectors of traces and chunks also
    read their own training and evaluation data from the CLI's arguments (``train_from_args``,
    ``evaluate_from_args``: `logwarden train|evaluate --detector NAME ...` calls them); log
    detectors share the session-file and raw-log readers of models.cli."""
    name: ClassVar[str]
    modality: ClassVar[str] = "logs"                 # one of MODALITIES

    @abstractmethod
    def fit(self, sequences: Seq[Sequence], labels: Seq[int] | None = None, **options) -> dict:
        """Train; returns training statistics for the manifest."""

    @abstractmethod
    def score(self, sequences: Seq[Sequence]) -> list[Verdict]:
        """Batched verdicts, one per sequence, on the detector's device."""

    def normal_depends_on(self) -> tuple[str, ...] | None:
        """The Sequence fields that, with ``start``, ``complete`` and ``judge_from``, decide a
        *normal* verdict entirely (its score included), or None (the default): nothing short of
        the whole sequence does. The stream remembers the normal verdicts of the windows it
        judges by these fields (services.cores.detect.NormalMemo): most of a log's windows are
        ones met before. A detector that returns fields promises that score() gives the same
        verdict for the same fields whatever batch it comes in (models.memo's fixed shapes)."""
        return None

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
