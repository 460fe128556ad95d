"""The per-entity join: everything logwarden.timeline says of one entity (pod / host) — metric
samples, per-trace span summaries, log events — per time step, cut into ChunkRecords (the
"chunk" Hades and AnoFusion read). Pure: no Kafka. One joiner per timeline partition (the topic
is keyed by entity, so one partition holds all of an entity).

Steps, exactly as models.chunks builds them (the reference this core is tested equal to): step
``k`` covers ``[k * step_s, (k + 1) * step_s)``.

  metrics  a MetricSample stamped ``t`` describes the ``metric_window_s`` before ``t``, so it
           goes to step ``floor((t - metric_window_s / 2) / step_s)``; two in one step: the later
           ``t`` counts. Channels: the entity's, in the order they first appeared.
  traces   TraceSamples (one per trace, per step the trace's spans on the entity start in; from
           the assemble stage) are pooled per step; the step's TraceStatsRecord is
           models.chunks.trace_stats of the pooled durations, gaps and errors. A trace counts
           once per step (a replayed sample is recognised by its trace id).
  logs     LogSample events (time, template id) by the step of their time.

A chunk for ``(entity, k)`` covers the ``steps`` steps ending at ``k`` (models.chunks'
``chunk(pod, k)``); one is emitted for every step in which the entity has data, id
``stable_id(entity, start, end)``.

When. Step ``k`` is emitted once the partition's *watermark* has passed its end: the watermark is
services.cores.watermark.SourceClock's over the timeline's writers, each a source — a metric or
log source (the "<topic>:<partition>" of a sample's ``source``; a metric sample's event time is
the middle of the interval it describes, ``t - metric_window_s / 2``), and each assemble
partition, which broadcasts (Watermark records) the time before which it will send no more
TraceSample (services.cores.traces: every trace that started before it has closed) — minus the
allowed lateness. So a step waits for the slowest modality: a fast replay whose metrics run ahead
of trace assembly does not cut chunks before their traces are in. A source silent for
``source_idle_s`` (wall) stops holding the watermark; when every source is idle, every pending
step is emitted.

Late input (for a step already passed): counted (``late``); kept for the chunks still to come
that hold the step in their history, and, if the step had no chunk yet, its chunk is emitted at
the next advance; a step older than every chunk still to come is dropped.

State, per partition (services.state entries): each retained (entity, step) one entry, each
entity one (service, channels, how far it is emitted), the partition meta one (source clock,
counters). Input takes effect in state at once, so the committed offset is all handed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

from services.cores.watermark import SourceClock
from services.records import ChunkRecord, LogSample, MetricSample, TraceSample, TraceStatsRecord, stable_id

FORMAT = 1
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode

META = b"\x00M"
ENTITY = b"E"          # + entity -> (service, channels, due_through)
STEP = b"S"            # + entity \x00 step -> step data


class StateError(ValueError):
    """Entries that are not a joiner's state."""


class TimelineInputError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class JoinConfig:
    step_s: float = 60.0
    steps: int = 10                      # steps per chunk, the newest (judged) one included
    metric_window_s: float = 60.0        # the interval a metric sample summarises, ending at its time
    lateness_s: float = 5.0              # disorder tolerated between the sources
    source_idle_s: float = 30.0
    grace_s: float = 2.0

    def __post_init__(self):
        if not (self.step_s > 0 and math.isfinite(self.step_s)):
            raise ValueError(f"step_s must be a positive number of seconds, got {self.step_s!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.metric_window_s < 0 or self.lateness_s < 0:
            raise ValueError("metric_window_s and lateness_s must be >= 0")

    def step_of(self, ts: float) -> int:
        return math.floor(ts / self.step_s)

    def metric_step_of(self, ts: float) -> int:
        return math.floor((ts - self.metric_window_s / 2) / self.step_s)


class StepData:
    __slots__ = ("metric_ts", "metric", "durations", "gaps", "errors", "trace_ids", "logs", "log_sources", "emitted",
                 "stats")

    def __init__(self):
        self.metric_ts: float | None = None
        self.metric: dict[str, float | None] | None = None
        self.durations: list[float] = []
        self.gaps: list[float] = []
        self.errors = 0
        self.trace_ids: set[str] = set()
        self.logs: list[tuple] = []     # (time, template id, template, level)
        self.log_sources: set[str] = set()       # the LogSamples in it (a replayed one is recognised)
        self.emitted = False
        # The step's TraceStatsRecord, computed once for the ``steps`` chunks that hold the step
        # (percentiles were most of the join's time), dropped when a trace sample is added.
        self.stats: TraceStatsRecord | None = None

    def pack(self) -> bytes:
        return _pack((self.metric_ts, self.metric, self.durations, self.gaps, self.errors, sorted(self.trace_ids),
                      self.logs, sorted(self.log_sources), self.emitted))

    @classmethod
    def unpack(cls, raw: bytes) -> "StepData":
        d = cls()
        (d.metric_ts, d.metric, d.durations, d.gaps, d.errors, ids, logs, sources, d.emitted) = _unpack(raw)
        d.trace_ids, d.log_sources = set(ids), set(sources)
        d.logs = [tuple(e) for e in logs]
        return d


class Entity:
    __slots__ = ("name", "service", "channels", "steps", "due_through")

    def __init__(self, name: str):
        self.name = name
        self.service: str | None = None
        self.channels: list[str] = []
        self.steps: dict[int, StepData] = {}
        self.due_through: int | None = None     # every step <= it has been let go


def source_of(source: str, fallback: str) -> str:
    """"<topic>:<partition>" of a sample's "<topic>:<partition>:<offset>" (else ``fallback``, the
    timeline partition: one source per record would hold the watermark forever)."""
    head, sep, offset = source.rpartition(":")
    if sep and head and ":" in head and offset.isdigit():
        return head
    return fallback


class Joiner:
    def __init__(self, config: JoinConfig | None = None):
        self.config = config or JoinConfig()
        c = self.config
        self.clock = SourceClock(c.lateness_s, c.source_idle_s, c.grace_s)
        self.entities: dict[str, Entity] = {}
        self.watermark_s = -math.inf
        self.late = self.dropped = self.duplicates = 0
        self._dirty_steps: set[tuple[str, int]] = set()
        self._deleted_steps: set[tuple[str, int]] = set()
        self._dirty_entities: set[str] = set()
        self._pending: set[tuple[str, int]] = set()        # steps with data and no chunk yet
        self._restored_sources = False

    # -- input --------------------------------------------------------------------------------
    def add(self, item: MetricSample | TraceSample | LogSample, now: float, fallback_source: str = "") -> None:
        if not item.entity:
            raise TimelineInputError("bad_timeline", "empty entity")
        c = self.config
        kind = type(item)
        if kind is MetricSample:
            if not math.isfinite(item.timestamp):
                raise TimelineInputError("bad_timeline", f"metric sample of {item.entity}: time {item.timestamp} is not finite")
            step = c.metric_step_of(item.timestamp)
            self.clock.observe(source_of(item.source, fallback_source), item.timestamp - c.metric_window_s / 2, now)
        elif kind is TraceSample:
            if not math.isfinite(item.step_start):
                raise TimelineInputError("bad_timeline", f"trace sample of {item.entity}: step {item.step_start} is not finite")
            if not item.durations_ms:
                raise TimelineInputError("bad_timeline", f"trace sample of {item.entity}: no span durations")
            step = c.step_of(item.step_start + c.step_s / 2)      # the step it starts, robust to rounding
        else:
            if any(not math.isfinite(ts) for ts, _ in item.events):
                raise TimelineInputError("bad_timeline", f"log sample of {item.entity}: an event time is not finite")
            if not item.events:
                return
            self.clock.observe(source_of(item.source, fallback_source), max(ts for ts, _ in item.events), now)
            by_step: dict[int, list] = {}
            levels = item.levels if len(item.levels) == len(item.events) else [None] * len(item.events)
            for (ts, template_id), level in zip(item.events, levels):
                # the level rides along (AnoFusion's WARN/ERROR channel): the chunk gives it as log_levels
                by_step.setdefault(c.step_of(ts), []).append((ts, template_id, item.templates.get(template_id, ""), level))
            entity = self._entity(item)
            for step, events in sorted(by_step.items()):
                data = self._step(entity, step)
                if data is None:
                    continue
                if item.source:
                    if item.source in data.log_sources:
                        self.duplicates += 1
                        continue
                    data.log_sources.add(item.source)
                data.logs.extend(events)
                data.logs.sort(key=lambda e: e[0])          # by time; a sample's own order for ties
            return
        entity = self._entity(item)
        data = self._step(entity, step)
        if data is None:
            return
        if kind is MetricSample:
            if data.metric_ts is None or item.timestamp > data.metric_ts:
                data.metric_ts, data.metric = item.timestamp, dict(item.values)
            elif item.timestamp == data.metric_ts:      # one row's channels in several samples
                data.metric.update(item.values)
            for channel in item.values:
                if channel not in entity.channels:
                    entity.channels.append(channel)
                    self._dirty_entities.add(entity.name)
        else:
            if item.trace_id in data.trace_ids:
                self.duplicates += 1
                return
            data.trace_ids.add(item.trace_id)
            data.stats = None
            data.durations.extend(item.durations_ms)
            data.gaps.extend(item.gaps_ms)
            data.errors += item.errors

    def mark(self, source: str, ts: float | None, idle: bool, now: float) -> None:
        if ts is not None and not math.isfinite(ts) and not idle:
            raise TimelineInputError("bad_watermark", f"watermark of {source}: time {ts} is not finite")
        self.clock.mark(source, ts if ts is None or math.isfinite(ts) else None, idle, now)

    def hold(self, now: float) -> None:
        self.clock.hold(now)

    def _entity(self, item) -> Entity:
        entity = self.entities.get(item.entity)
        if entity is None:
            entity = self.entities[item.entity] = Entity(item.entity)
            self._dirty_entities.add(item.entity)
        if entity.service is None and item.service:
            entity.service = item.service
            self._dirty_entities.add(item.entity)
        return entity

    def _step(self, entity: Entity, step: int) -> StepData | None:
        """The step's data to add to (None: older than every chunk still to come: dropped)."""
        due = entity.due_through
        if due is not None and step <= due:
            self.late += 1
            if step < due - self.config.steps + 2:
                self.dropped += 1
                return None
        data = entity.steps.get(step)
        if data is None:
            data = entity.steps[step] = StepData()
        if not data.emitted:
            self._pending.add((entity.name, step))
        self._dirty_steps.add((entity.name, step))
        return data

    # -- output -------------------------------------------------------------------------------
    def advance(self, now: float | None) -> list[ChunkRecord]:
        """Chunks of every step the watermark (``now``: wall clock; None: everything is known)
        has passed, by (step, entity)."""
        if not self._restored_sources and now is not None:
            for source in self.clock.progress:
                self.clock.seen.setdefault(source, now)
            self._restored_sources = True
        limit = math.inf if now is None else self.clock.watermark(now, self.watermark_s)
        if self.watermark_s < limit < math.inf:
            self.watermark_s = limit
        limit = max(limit, self.watermark_s)
        if limit == -math.inf or not self._pending:
            return []
        through = math.inf if limit == math.inf else math.floor(limit / self.config.step_s) - 1
        ready = sorted(((step, name) for name, step in self._pending if step <= through))
        out = []
        for step, name in ready:
            entity = self.entities[name]
            entity.steps[step].emitted = True
            self._pending.discard((name, step))
            self._dirty_steps.add((name, step))
            out.append(self.chunk(entity, step))
        touched = {name for _, name in ready}
        if through != math.inf:
            touched |= set(self.entities)
        for name in touched:
            entity = self.entities[name]
            newest = through if through != math.inf else max(entity.steps)
            if entity.due_through is None or newest > entity.due_through:
                entity.due_through = newest
                self._dirty_entities.add(name)
                self._prune(entity)
        return out

    def flush(self) -> list[ChunkRecord]:
        """Everything pending, now (shutdown of a finite input)."""
        return self.advance(None)

    def chunk(self, entity: Entity, step: int) -> ChunkRecord:
        from models.chunks import trace_stats

        c = self.config
        first = step - c.steps + 1
        window = [entity.steps.get(k) for k in range(first, step + 1)]
        metrics = {ch: [(d.metric.get(ch) if d is not None and d.metric is not None else None) for d in window]
                   for ch in entity.channels}
        traces: list[TraceStatsRecord | None] = []
        for d in window:
            if d is None or not d.durations:
                traces.append(None)
                continue
            if d.stats is None:
                s = trace_stats(d.durations, d.gaps, d.errors)
                d.stats = TraceStatsRecord(spans=s.spans, errors=s.errors, p50_ms=s.p50_ms, p90_ms=s.p90_ms,
                                           p99_ms=s.p99_ms, gap_p50_ms=s.gap_p50_ms, gap_p90_ms=s.gap_p90_ms,
                                           gap_p99_ms=s.gap_p99_ms)
            traces.append(d.stats)
        events = [e for d in window if d is not None for e in d.logs]
        logs = [(e[0], e[1], e[2]) for e in events]
        levels = [e[3] if len(e) > 3 else None for e in events]      # (state from before levels: 3-tuples)
        start, end = first * c.step_s, (step + 1) * c.step_s
        return ChunkRecord(chunk_id=stable_id(entity.name, start, end), entity=entity.name, service=entity.service,
                           start=start, end=end, step_s=c.step_s, metrics=metrics, traces=traces, logs=logs,
                           log_levels=levels if any(level is not None for level in levels) else [])

    def _prune(self, entity: Entity) -> None:
        oldest = entity.due_through - self.config.steps + 2
        for step in [k for k in entity.steps if k < oldest]:
            del entity.steps[step]
            self._pending.discard((entity.name, step))
            self._dirty_steps.discard((entity.name, step))
            self._deleted_steps.add((entity.name, step))

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- state (services.state) ---------------------------------------------------------------
    @staticmethod
    def _step_key(name: str, step: int) -> bytes:
        return STEP + name.encode("utf-8", "surrogatepass") + b"\x00" + str(step).encode()

    def _entity_record(self, e: Entity) -> bytes:
        return _pack((e.service, e.channels, e.due_through))

    def _meta(self) -> bytes:
        return _pack({"format": FORMAT, **self.clock.to_state(),
                      "watermark": None if self.watermark_s == -math.inf else self.watermark_s,
                      "late": self.late, "dropped": self.dropped, "duplicates": self.duplicates})

    def changes(self) -> dict[bytes, bytes | None]:
        out: dict[bytes, bytes | None] = {}
        for name, step in self._dirty_steps:
            data = self.entities[name].steps.get(step)
            if data is not None:
                out[self._step_key(name, step)] = data.pack()
        for name, step in self._deleted_steps:
            if step not in self.entities[name].steps:
                out[self._step_key(name, step)] = None
        for name in self._dirty_entities:
            out[ENTITY + name.encode("utf-8", "surrogatepass")] = self._entity_record(self.entities[name])
        self._dirty_steps.clear()
        self._deleted_steps.clear()
        self._dirty_entities.clear()
        out[META] = self._meta()
        return out

    def entries(self) -> dict[bytes, bytes]:
        out = {ENTITY + n.encode("utf-8", "surrogatepass"): self._entity_record(e) for n, e in self.entities.items()}
        for n, e in self.entities.items():
            for step, data in e.steps.items():
                out[self._step_key(n, step)] = data.pack()
        out[META] = self._meta()
        return out

    def restore(self, entries: dict[bytes, bytes]) -> None:
        entities: dict[str, Entity] = {}
        steps: list[tuple[str, int, StepData]] = []
        meta = None
        try:
            for key, value in entries.items():
                if key == META:
                    meta = _unpack(value)
                elif key.startswith(ENTITY):
                    name = key[1:].decode("utf-8", "surrogatepass")
                    e = entities[name] = Entity(name)
                    e.service, channels, e.due_through = _unpack(value)
                    e.channels = list(channels)
                elif key.startswith(STEP):
                    name, _, step = key[1:].decode("utf-8", "surrogatepass").rpartition("\x00")
                    steps.append((name, int(step), StepData.unpack(value)))
            if meta is not None and meta.get("format") != FORMAT:
                raise StateError(f"state format {meta.get('format')!r}, expected {FORMAT}")
            for name, step, data in steps:
                entities.setdefault(name, Entity(name)).steps[step] = data
        except StateError:
            raise
        except (TypeError, ValueError, UnicodeDecodeError, msgspec.DecodeError) as err:
            raise StateError(f"not a joiner's state ({type(err).__name__}: {err})") from None
        self.entities = entities
        self._pending = {(n, k) for n, e in entities.items() for k, d in e.steps.items() if not d.emitted}
        if meta is not None:
            self.clock.from_state(meta)
            self.watermark_s = -math.inf if meta["watermark"] is None else meta["watermark"]
            self.late, self.dropped, self.duplicates = meta["late"], meta["dropped"], meta["duplicates"]
        self._restored_sources = False
        for s in (self._dirty_steps, self._deleted_steps, self._dirty_entities):
            s.clear()


def join_in_order(items: list, config: JoinConfig | None = None) -> list[ChunkRecord]:
    """The chunks of a finite timeline, with everything known."""
    joiner = Joiner(config or JoinConfig())
    for item in items:
        joiner.add(item, 0.0)
    return joiner.flush()
