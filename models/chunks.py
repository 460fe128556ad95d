"""The reference builder of ``models.base.Chunk``s from a data directory (TrainTicket's layout,
read by models.microservices): what AnoFusion and Hades train and are evaluated on, and what the
stream's join stage is tested equal to. Deterministic: the same files and options give the same
chunks, whatever the files are called or the order they are listed in.

Entities and steps. The entity is a pod (``service`` = ``models.faults.service_of(pod)``, so a
model finds a renamed pod of another day by its service). Time is cut into steps of ``step_s``
seconds aligned to the epoch: step ``k`` covers ``[k * step_s, (k + 1) * step_s)``. Per pod and
step the builder holds:

  metrics  one value per metric channel (the CSV's columns besides Time, TimeStamp, PodName).
           A metric row summarises the ``metric_window_s`` seconds *before* its TimeStamp (rates
           and latency percentiles over the last minute), so it goes to the step holding the
           middle of that interval, ``floor((TimeStamp - metric_window_s / 2) / step_s)``: a row
           stamped 08:44:09 describes 08:43:09-08:44:09, mostly the minute 08:43. Two rows in one
           step: the later one counts. An empty or NaN cell stays None.
  traces   ``TraceStats`` of the spans on the pod that *start* in the step: count, errors
           (OTLP status 2; TrainTicket's CSVs carry no status, so 0 there), the duration
           percentiles p50/p90/p99 in ms, and the call-gap percentiles: for each of those spans
           whose parent span is on another pod, parent duration minus span duration (the time
           the caller waits beyond the pod's own work: network, queueing). Percentiles are
           numpy's default (linear interpolation between closest ranks). No span: None; no
           span called from another pod: gap percentiles None.
  logs     the pod's log records, each parsed by the stream's parse core
           (services.cores.parse.ParseCore: the template id and text the parse stage emits),
           timed by the record's TimeUnixNano (the line's own clock is UTC+8 and has no date).
           Lines are parsed in (time, pod, line text) order, so mined template ids do not depend
           on file order. A line the core rejects is skipped and counted (``skipped_log_lines``).

A step with no data for a modality stays None (metrics, traces) or empty (logs): nothing is
filled with zeros, so ``Chunk.present()`` tells what was observed.

Chunks. ``chunk(pod, k)`` covers the ``steps`` consecutive steps ending at step ``k`` (a sliding
window, one chunk per (pod, step): the newest step is the one judged, the steps before it are its
history, as DeepLog's window is). ``units()`` lists the (pod, step) pairs an evaluation judges:
steps in which the data holds at least one span (of any pod), for every pod with data in that
step. ``ChunkOptions.modalities`` leaves whole modalities out (Hades: logs and metrics).
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from models.base import Chunk, LogEvent, TraceStats
from models.faults import service_of
from models.microservices import find_layout, read_logs, read_metrics, read_traces

MODALITIES = ("metrics", "traces", "logs")


@dataclass(frozen=True)
class ChunkOptions:
    step_s: float = 60.0                 # one step: TrainTicket's metric rows are a minute apart
    steps: int = 10                      # steps per chunk, the judged one included
    modalities: tuple[str, ...] = MODALITIES
    metric_window_s: float = 60.0        # the interval a metric row summarises, ending at its TimeStamp

    def __post_init__(self):
        if not (self.step_s > 0 and math.isfinite(self.step_s)):
            raise ValueError(f"step_s must be a positive number of seconds, got {self.step_s!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be some of {', '.join(MODALITIES)}, got {self.modalities!r}")
        if self.metric_window_s < 0:
            raise ValueError(f"metric_window_s must be >= 0, got {self.metric_window_s!r}")

    def step_of(self, timestamp: float) -> int:
        return math.floor(timestamp / self.step_s)

    def metric_step_of(self, timestamp: float) -> int:
        return math.floor((timestamp - self.metric_window_s / 2) / self.step_s)

    def as_dict(self) -> dict:
        return {"step_s": self.step_s, "steps": self.steps, "modalities": list(self.modalities),
                "metric_window_s": self.metric_window_s}

    @classmethod
    def from_dict(cls, doc: dict) -> "ChunkOptions":
        return cls(step_s=float(doc["step_s"]), steps=int(doc["steps"]),
                   modalities=tuple(doc["modalities"]), metric_window_s=float(doc["metric_window_s"]))


def _percentiles(values: list[float]) -> list[float]:
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99])]


def trace_stats(durations_ms: list[float], gaps_ms: list[float] = (), errors: int = 0) -> TraceStats:
    """The summary of one pod's spans in one step (``durations_ms`` must not be empty)."""
    p50, p90, p99 = _percentiles(durations_ms)
    g50, g90, g99 = _percentiles(gaps_ms) if len(gaps_ms) else (None, None, None)
    return TraceStats(spans=len(durations_ms), errors=int(errors), p50_ms=p50, p90_ms=p90, p99_ms=p99,
                      gap_p50_ms=g50, gap_p90_ms=g90, gap_p99_ms=g99)


@dataclass
class Observations:
    """Everything observed per pod and step; ``chunk``/``chunks``/``units`` cut it into Chunks."""
    options: ChunkOptions
    channels: list[str] = field(default_factory=list)                            # metric channels
    metrics: dict[str, dict[int, dict[str, float | None]]] = field(default_factory=dict)
    traces: dict[str, dict[int, TraceStats]] = field(default_factory=dict)
    logs: dict[str, list[LogEvent]] = field(default_factory=dict)                # by time
    traced_steps: list[int] = field(default_factory=list)                        # steps holding a span
    skipped_log_lines: int = 0
    _log_times: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def entities(self) -> list[str]:
        return sorted(set(self.metrics) | set(self.traces) | set(self.logs))

    def has_data(self, pod: str, step: int) -> bool:
        if step in self.metrics.get(pod, {}) or step in self.traces.get(pod, {}):
            return True
        times = self._times(pod)
        i = bisect.bisect_left(times, step * self.options.step_s)
        return i < len(times) and times[i] < (step + 1) * self.options.step_s

    def units(self) -> list[tuple[str, int]]:
        """(pod, step) pairs judged: steps with a span in the data, pods with data there."""
        return [(pod, step) for step in self.traced_steps for pod in self.entities() if self.has_data(pod, step)]

    def chunk(self, pod: str, step: int) -> Chunk:
        """The chunk of ``pod`` whose newest step is ``step``."""
        o = self.options
        first = step - o.steps + 1
        rows = self.metrics.get(pod, {})
        metrics: dict[str, list[float | None]] = {}
        if "metrics" in o.modalities:
            metrics = {c: [rows.get(k, {}).get(c) for k in range(first, step + 1)] for c in self.channels}
        spans = self.traces.get(pod, {})
        traces = [spans.get(k) for k in range(first, step + 1)] if "traces" in o.modalities else []
        logs: list[LogEvent] = []
        if "logs" in o.modalities:
            times = self._times(pod)
            lo = bisect.bisect_left(times, first * o.step_s)
            hi = bisect.bisect_left(times, (step + 1) * o.step_s)
            logs = self.logs[pod][lo:hi] if pod in self.logs else []
        return Chunk(entity=pod, service=service_of(pod), start=first * o.step_s, end=(step + 1) * o.step_s,
                     step_s=o.step_s, metrics=metrics, traces=traces, logs=list(logs))

    def chunks(self, units: Iterable[tuple[str, int]] | None = None) -> Iterator[Chunk]:
        for pod, step in (self.units() if units is None else units):
            yield self.chunk(pod, step)

    def _times(self, pod: str) -> list[float]:
        times = self._log_times.get(pod)
        if times is None:
            times = self._log_times[pod] = [e.timestamp for e in self.logs.get(pod, ())]
        return times


def read_observations(data: str | Path, options: ChunkOptions | None = None, parse_core=None) -> Observations:
    """Everything below ``data`` (metric/, trace/, log/ folders anywhere below it) per pod and
    step. ``parse_core``: the ParseCore to map log lines with (default: a fresh one with the
    packaged parse config); it is advanced by the lines it parses, as the parse stage's is."""
    options = options or ChunkOptions()
    layout = find_layout(data)
    obs = Observations(options)

    # traces are read even when the model leaves them out: they decide which steps are judged
    durations: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    gaps: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    errors: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    traced: set[int] = set()
    for trace in read_traces(layout.trace):                 # spans in (start, span id) order
        by_id = {span.span_id: span for span in trace.spans}
        for span in trace.spans:
            step = options.step_of(span.start_ns / 1e9)
            traced.add(step)
            durations[span.pod][step].append(span.duration_ns / 1e6)
            if span.status == 2:
                errors[span.pod][step] += 1
            parent = by_id.get(span.parent_id) if span.parent_id else None
            if parent is not None and parent.pod != span.pod:
                gaps[span.pod][step].append((parent.duration_ns - span.duration_ns) / 1e6)
    obs.traced_steps = sorted(traced)
    if "traces" in options.modalities:
        obs.traces = {pod: {step: trace_stats(values, gaps[pod].get(step, []), errors[pod].get(step, 0))
                            for step, values in sorted(by_step.items())}
                      for pod, by_step in sorted(durations.items())}

    if "metrics" in options.modalities:
        for pod, rows in sorted(read_metrics(layout.metric).items()):
            for channel in rows.channels:
                if channel not in obs.channels:
                    obs.channels.append(channel)
            by_step: dict[int, dict[str, float | None]] = {}
            for i, ts in enumerate(rows.timestamps):          # by time: a later row overwrites
                by_step[options.metric_step_of(ts)] = {c: values[i] for c, values in rows.channels.items()}
            obs.metrics[pod] = by_step

    if "logs" in options.modalities:
        obs.logs, obs.skipped_log_lines = _parsed_logs(layout.log, parse_core)
    return obs


def _parsed_logs(paths: list[Path], parse_core) -> tuple[dict[str, list[LogEvent]], int]:
    from services.cores.parse import ParseCore, ParseError
    from services.records import Source

    core = parse_core if parse_core is not None else ParseCore()
    records = sorted(read_logs(paths), key=lambda r: (r.timestamp, r.pod, r.message))
    logs: dict[str, list[LogEvent]] = defaultdict(list)
    skipped = 0
    for offset, record in enumerate(records):
        source = Source(host=record.pod, topic="logs", partition=0, offset=offset,
                        file_path=f"{record.pod}.log", file_offset=offset)
        try:
            event = core.parse(record.message, record.pod, source, record.timestamp)[0]
        except ParseError:
            skipped += 1
            continue
        logs[record.pod].append(LogEvent(record.timestamp, event.template_id, event.template, event.level))
    return dict(sorted(logs.items())), skipped


# --------------------------------------------------------------------------------------------
# Normalising chunk values: what AnoFusion and Hades share. Each service (a pod's name without its
# hash: a renamed pod of another day keeps its statistics) gets the robust center and scale of
# every channel; a service or channel with too few training values uses the pooled ones.
POOLED = "*"                      # the statistics' row for services the training data did not hold
MIN_SAMPLES = 20                  # values per service and channel, else the pooled statistics are used
MIN_SCALE = 0.05                  # robust units: a channel that never varies still has a scale


def signed_log(values: np.ndarray) -> np.ndarray:
    """sign(x) log(1 + |x|): counts and byte rates of very different sizes on one scale."""
    return np.sign(values) * np.log1p(np.abs(values))


def robust(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and IQR/1.349 per column, ignoring NaN; columns without data: 0 and 1."""
    center = np.zeros(rows.shape[1])
    scale = np.ones(rows.shape[1])
    for j in range(rows.shape[1]):
        column = rows[:, j][~np.isnan(rows[:, j])]
        if len(column):
            q25, q50, q75 = np.percentile(column, [25, 50, 75])
            center[j] = q50
            spread = (q75 - q25) / 1.349
            if spread < MIN_SCALE:            # nearly constant: fall back on the mean deviation
                spread = np.mean(np.abs(column - q50)) * 1.2533
            scale[j] = max(spread, MIN_SCALE)
    return center, scale


def per_service_robust(values: np.ndarray, services: Iterable[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(service names, centers, scales) of ``values`` (one row per chunk, NaN where absent) whose
    rows belong to ``services``: row 0 of the tables is POOLED (every row), then each service in
    sorted order, a column of fewer than MIN_SAMPLES values taking the pooled figures."""
    services = np.asarray(list(services), dtype=object)
    names = [POOLED] + sorted(set(services))
    pooled_center, pooled_scale = robust(values)
    centers, scales = [pooled_center], [pooled_scale]
    for service in names[1:]:
        rows = values[services == service]
        center, scale = robust(rows)
        few = (~np.isnan(rows)).sum(0) < MIN_SAMPLES
        center[few], scale[few] = pooled_center[few], pooled_scale[few]
        centers.append(center)
        scales.append(scale)
    return names, np.stack(centers), np.stack(scales)
