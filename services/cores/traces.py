"""Trace assembly: SpanGroups (the spans of one trace found in one OTLP record, keyed by trace id)
in, one TraceRecord per trace out, plus what each trace did on each pod per time step
(TraceSample, for the per-entity join). Pure: no Kafka. One assembler per input partition of
logwarden.spans (a trace id lives in exactly one partition).

Event time, not arrival order. A trace's spans come from every service it crossed, each exported
when it *ends*, in records that arrive interleaved with other traces' in whatever order the
collectors shipped them. So a span's event time is its end, and each *source* (the upstream
partition named by SpanGroup.source, "<topic>:<partition>:<offset>") has reached the newest span
end it has sent; the watermark is services.cores.watermark.SourceClock's over those sources
(minus LOGWARDEN_ALLOWED_LATENESS_S; Watermark records from upstream move a source too).

Closing. An open trace closes when the watermark has passed

    its newest span end + trace_gap_s        once it has a root span (reason "complete"), or
    its newest span end + root_wait_s        while it has none (reason "gap": the root is lost
                                             or still running; its spans are published anyway)

so a root that has ended and no span of it for trace_gap_s in event time closes it. Traces due
at one watermark close in (due time, trace id) order, so the output does not depend on how input
was batched. A span of a trace that has closed (its id is in the memory of recently closed traces)
is *late*: counted (``late_spans``), not added, no second trace is opened for it. Past
``max_open_traces`` the trace with the oldest newest-span-end is closed early ("evicted").
Repeated spans (an at-least-once replay of a record) are recognised by span id and dropped.

Output, when a trace closes: its TraceRecord (spans ordered by (start_ns, span_id), parent links
as they came), and one TraceSample per (pod, step) its spans start in: the durations (ms) of the
trace's spans on that pod starting in the step, their call gaps (parent on another pod: parent
duration minus span duration) and error count (OTLP status 2) — exactly the per-trace part of
models.chunks' TraceStats, whose percentiles the join computes over all traces of the step.

Downstream progress. ``frontier()`` is the event time before which no more TraceSample can come
from this partition: min(watermark - trace_gap_s, the earliest start of an open trace). The stage
broadcasts it to every timeline partition as a Watermark record (after the samples it covers), so
the join emits a step only once every trace that started in it has closed.

State, per partition (services.state entries): each open trace one entry (its spans as msgpack
rows), each recently closed trace id one (empty) entry, the partition meta (source clock,
counters) one more. Every input record's effect is state at once (no reorder buffer), so the
committed offset is everything handed in.
"""
from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from services.cores.watermark import SourceClock
from services.records import SpanGroup, SpanRecord, TraceRecord, TraceSample

FORMAT = 1
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode

META = b"\x00M"
TRACE = b"T"          # + trace id -> open trace
CLOSED = b"C"         # + trace id -> b"" (a recently closed trace)


class StateError(ValueError):
    """Entries that are not a trace assembler's state."""


# Closed before the trace's own end: a detector does not judge where these stop (models.base.Trace.ended).
CUT_REASONS = frozenset({"evicted", "shutdown"})


class SpanInputError(ValueError):
    """A SpanGroup that cannot be assembled (reason, detail for the dead letter)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class TraceConfig:
    trace_gap_s: float = 10.0            # event time with no span after the root ended: complete
    root_wait_s: float = 300.0           # event time a trace without root waits for one
    max_open_traces: int = 100_000       # per input partition
    allowed_lateness_s: float = 2.0      # a source's own disorder (SourceClock)
    source_idle_s: float = 30.0          # a source silent this long (wall) no longer holds the watermark
    grace_s: float = 2.0                 # the watermark waits this long (wall) for sources to show up
    step_s: float = 60.0                 # the join's time step (TraceSample.step_start)
    closed_memory: int = 20_000          # closed trace ids remembered (late spans are recognised)

    def __post_init__(self):
        for name in ("trace_gap_s", "root_wait_s", "step_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_open_traces < 1 or self.closed_memory < 1:
            raise ValueError("max_open_traces and closed_memory must be at least 1")


class OpenTrace:
    __slots__ = ("trace_id", "spans", "last_end_ns", "first_start_ns", "roots")

    def __init__(self, trace_id: str):
        self.trace_id = trace_id
        self.spans: dict[str, SpanRecord] = {}
        self.last_end_ns = -(2 ** 63)
        self.first_start_ns = 2 ** 63 - 1
        self.roots = 0

    def add(self, span: SpanRecord) -> bool:
        if span.span_id in self.spans:
            return False
        self.spans[span.span_id] = span
        if span.end_ns > self.last_end_ns:
            self.last_end_ns = span.end_ns
        if span.start_ns < self.first_start_ns:
            self.first_start_ns = span.start_ns
        if span.parent_id is None:
            self.roots += 1
        return True


def _row(s: SpanRecord) -> tuple:
    return (s.span_id, s.service, s.pod, s.operation, s.start_ns, s.end_ns, s.parent_id, s.status)   # SpanRecord's field order


def source_of(group: SpanGroup, fallback: str) -> str:
    """The upstream stream a group came from: "<topic>:<partition>" of its "<topic>:<partition>:<offset>"
    (else ``fallback``: the input partition)."""
    head, sep, offset = group.source.rpartition(":")
    if sep and head and ":" in head and offset.isdigit():
        return head
    # any other form names no stream (one source per record would hold the watermark forever)
    return fallback


def trace_samples(spans: list[SpanRecord], trace_id: str, step_s: float) -> list[TraceSample]:
    """What one trace did per (pod, step): models.chunks.read_observations' per-span inputs of
    TraceStats, grouped (spans in (start_ns, span_id) order; output by (pod, step))."""
    by_id = {s.span_id: s for s in spans}
    groups: dict[tuple[str, int], list] = {}
    for span in spans:
        step = math.floor(span.start_ns / 1e9 / step_s)
        group = groups.get((span.pod, step))
        if group is None:
            group = groups[(span.pod, step)] = [span.service, [], [], 0]
        duration_ns = span.end_ns - span.start_ns
        group[1].append(duration_ns / 1e6)
        if span.status == 2:
            group[3] += 1
        parent = by_id.get(span.parent_id) if span.parent_id else None
        if parent is not None and parent.pod != span.pod:
            group[2].append(((parent.end_ns - parent.start_ns) - duration_ns) / 1e6)
    return [TraceSample(entity=pod, service=g[0], step_start=step * step_s, trace_id=trace_id,
                        durations_ms=g[1], gaps_ms=g[2], errors=g[3])
            for (pod, step), g in sorted(groups.items())]


@dataclass
class Closed:
    trace: TraceRecord
    samples: list[TraceSample]


class TraceAssembler:
    def __init__(self, config: TraceConfig | None = None, name: str = "spans"):
        self.config = config or TraceConfig()
        self.name = name                         # this partition, as a watermark source downstream
        c = self.config
        self.clock = SourceClock(c.allowed_lateness_s, c.source_idle_s, c.grace_s)
        self.traces: dict[str, OpenTrace] = {}
        self._due: list[tuple[float, str]] = []      # (due s, trace id), lazy: checked when popped
        self._age: list[tuple[int, str]] = []        # (last end ns, trace id), lazy: for eviction
        self._starts: list[tuple[int, str]] = []     # (first start ns, trace id), lazy: the frontier
        self._closed: OrderedDict[str, int] = OrderedDict()     # trace id -> serial
        self._closed_serial = 0
        self.watermark_s = -math.inf                 # the highest finite watermark so far
        self.sources_idle = False                    # every source idle: everything was let go
        self.late_spans = self.duplicate_spans = self.evicted = 0
        self.closed_count = 0
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._closed_added: set[str] = set()
        self._closed_dropped: set[str] = set()
        self._restored_sources = False

    # -- input --------------------------------------------------------------------------------
    def add(self, group: SpanGroup, now: float, fallback_source: str = "") -> None:
        """One SpanGroup (raises SpanInputError for spans that cannot be placed; nothing of the
        group is taken then). Closing is left to ``advance``."""
        if not group.trace_id:
            raise SpanInputError("bad_spans", "empty trace id")
        newest = -math.inf
        for s in group.spans:
            if not s.span_id:
                raise SpanInputError("bad_span", f"trace {group.trace_id}: a span without span id")
            if s.end_ns < s.start_ns:
                raise SpanInputError("bad_span", f"trace {group.trace_id} span {s.span_id}: ends before it starts")
            if s.parent_id == s.span_id:
                raise SpanInputError("bad_span", f"trace {group.trace_id} span {s.span_id}: its own parent")
            newest = max(newest, s.end_ns / 1e9)
        if not group.spans:
            return
        self.clock.observe(source_of(group, fallback_source), newest, now)
        tid = group.trace_id
        if tid in self._closed:
            self.late_spans += len(group.spans)
            return
        trace = self.traces.get(tid)
        if trace is None:
            trace = self.traces[tid] = OpenTrace(tid)
        start_before = trace.first_start_ns
        added = False
        for s in group.spans:
            if trace.add(s):
                added = True
            else:
                self.duplicate_spans += 1
        if added:
            self._dirty.add(tid)
            heapq.heappush(self._due, (self._due_s(trace), tid))
            heapq.heappush(self._age, (trace.last_end_ns, tid))
            if trace.first_start_ns != start_before:
                heapq.heappush(self._starts, (trace.first_start_ns, tid))

    def mark(self, source: str, ts: float | None, idle: bool, now: float) -> None:
        """A Watermark record from upstream."""
        if ts is not None and not math.isfinite(ts):
            raise SpanInputError("bad_watermark", f"watermark of {source}: time {ts} is not finite")
        self.clock.mark(source, ts, idle, now)

    def hold(self, now: float) -> None:
        self.clock.hold(now)

    def advance(self, now: float | None) -> list[Closed]:
        """Close what the watermark (``now``: wall clock; None: everything is known) and the
        open-trace bound let go, in order."""
        if not self._restored_sources and now is not None:
            # restored sources have no wall clock yet: their silence counts from now
            for source in self.clock.progress:
                self.clock.seen.setdefault(source, now)
            self._restored_sources = True
        out: list[Closed] = []
        while len(self.traces) > self.config.max_open_traces:
            last_end, tid = heapq.heappop(self._age)
            trace = self.traces.get(tid)
            if trace is None or trace.last_end_ns != last_end:
                continue
            self.evicted += 1
            out.append(self._close(tid, "evicted"))
        limit = math.inf if now is None else self.clock.watermark(now, self.watermark_s)
        self.sources_idle = limit == math.inf
        if self.watermark_s < limit < math.inf:
            self.watermark_s = limit
        limit = max(limit, self.watermark_s)
        due = self._due
        while due and due[0][0] <= limit:
            due_s, tid = heapq.heappop(due)
            trace = self.traces.get(tid)
            if trace is None or self._due_s(trace) != due_s:
                continue
            out.append(self._close(tid, "complete" if trace.roots else "gap"))
        if len(self._age) + len(self._starts) > 8 * len(self.traces) + 2048:     # lazy heaps: drop stale entries
            self._age = [(t.last_end_ns, tid) for tid, t in self.traces.items()]
            heapq.heapify(self._age)
            self._due = [(self._due_s(t), tid) for tid, t in self.traces.items()]
            heapq.heapify(self._due)
            self._starts = [(t.first_start_ns, tid) for tid, t in self.traces.items()]
            heapq.heapify(self._starts)
        return out

    def close_all(self, reason: str = "shutdown") -> list[Closed]:
        order = sorted(self.traces.values(), key=lambda t: (self._due_s(t), t.trace_id))
        return [self._close(t.trace_id, reason) for t in order]

    def frontier(self) -> float:
        """Event time (s) before which this partition will emit no more TraceSample."""
        if self.sources_idle and not self.traces:
            return math.inf
        bound = self.watermark_s - self.config.trace_gap_s
        starts, traces = self._starts, self.traces
        while starts:
            start, tid = starts[0]
            trace = traces.get(tid)
            if trace is not None and trace.first_start_ns == start:
                return min(bound, start / 1e9)
            heapq.heappop(starts)
        return bound

    @property
    def open_traces(self) -> int:
        return len(self.traces)

    # -- internals ----------------------------------------------------------------------------
    def _due_s(self, trace: OpenTrace) -> float:
        wait = self.config.trace_gap_s if trace.roots else self.config.root_wait_s
        return trace.last_end_ns / 1e9 + wait

    def _close(self, tid: str, reason: str) -> Closed:
        trace = self.traces.pop(tid)
        spans = sorted(trace.spans.values(), key=lambda s: (s.start_ns, s.span_id))
        record = TraceRecord(trace_id=tid, spans=spans, start_ns=trace.first_start_ns, end_ns=trace.last_end_ns,
                             closed_reason=reason)
        self._dirty.discard(tid)
        self._deleted.add(tid)
        self._remember_closed(tid)
        self.closed_count += 1
        return Closed(record, trace_samples(spans, tid, self.config.step_s))

    def _remember_closed(self, tid: str) -> None:
        self._closed_serial += 1
        self._closed[tid] = self._closed_serial
        self._closed_added.add(tid)
        self._closed_dropped.discard(tid)
        while len(self._closed) > self.config.closed_memory:
            old, _ = self._closed.popitem(last=False)
            self._closed_added.discard(old)
            self._closed_dropped.add(old)

    # -- state (services.state) ---------------------------------------------------------------
    def _meta(self) -> bytes:
        return _pack({"format": FORMAT, **self.clock.to_state(),
                      "watermark": None if self.watermark_s == -math.inf else self.watermark_s,
                      "late_spans": self.late_spans, "duplicate_spans": self.duplicate_spans,
                      "evicted": self.evicted, "closed_serial": self._closed_serial})

    @staticmethod
    def _trace_record(t: OpenTrace) -> bytes:
        return _pack([_row(s) for s in t.spans.values()])

    def changes(self) -> dict[bytes, bytes | None]:
        out: dict[bytes, bytes | None] = {}
        for tid in self._dirty:
            trace = self.traces.get(tid)
            if trace is not None:
                out[TRACE + tid.encode()] = self._trace_record(trace)
        for tid in self._deleted:
            if tid not in self.traces:
                out[TRACE + tid.encode()] = None
        for tid in self._closed_added:
            out[CLOSED + tid.encode()] = self._closed[tid].to_bytes(8, "big")
        for tid in self._closed_dropped:
            out[CLOSED + tid.encode()] = None
        self._dirty.clear()
        self._deleted.clear()
        self._closed_added.clear()
        self._closed_dropped.clear()
        out[META] = self._meta()
        return out

    def entries(self) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {TRACE + tid.encode(): self._trace_record(t) for tid, t in self.traces.items()}
        # the closed memory's order survives a restore: each entry holds its serial
        out.update({CLOSED + tid.encode(): n.to_bytes(8, "big") for tid, n in self._closed.items()})
        out[META] = self._meta()
        return out

    def restore(self, entries: dict[bytes, bytes]) -> None:
        traces: dict[str, OpenTrace] = {}
        closed: list[tuple[int, str]] = []
        meta = None
        try:
            for key, value in entries.items():
                if key == META:
                    meta = _unpack(value)
                elif key.startswith(TRACE):
                    tid = key[1:].decode()
                    trace = traces[tid] = OpenTrace(tid)
                    for row in _unpack(value):
                        trace.add(SpanRecord(*row))
                elif key.startswith(CLOSED):
                    closed.append((int.from_bytes(value, "big"), key[1:].decode()))
            if meta is not None and meta.get("format") != FORMAT:
                raise StateError(f"state format {meta.get('format')!r}, expected {FORMAT}")
        except (TypeError, ValueError, UnicodeDecodeError, msgspec.DecodeError) as err:
            if isinstance(err, StateError):
                raise
            raise StateError(f"not a trace assembler's state ({type(err).__name__}: {err})") from None
        self.traces = traces
        self._closed = OrderedDict((tid, n) for n, tid in sorted(closed))
        self._due = [(self._due_s(t), tid) for tid, t in traces.items()]
        heapq.heapify(self._due)
        self._age = [(t.last_end_ns, tid) for tid, t in traces.items()]
        heapq.heapify(self._age)
        self._starts = [(t.first_start_ns, tid) for tid, t in traces.items()]
        heapq.heapify(self._starts)
        if meta is not None:
            self.clock.from_state(meta)
            self.watermark_s = -math.inf if meta["watermark"] is None else meta["watermark"]
            self.late_spans, self.duplicate_spans = meta["late_spans"], meta["duplicate_spans"]
            self.evicted, self._closed_serial = meta["evicted"], meta["closed_serial"]
        self._restored_sources = False
        for s in (self._dirty, self._deleted, self._closed_added, self._closed_dropped):
            s.clear()


def assemble_in_order(groups: list[SpanGroup], config: TraceConfig | None = None) -> list[Closed]:
    """Every trace of a finite input, assembled as the stream assembles it with everything known
    (no watermark: each trace closes once all input is in)."""
    assembler = TraceAssembler(config or TraceConfig())
    for group in groups:
        assembler.add(group, 0.0)
    return assembler.advance(None)
