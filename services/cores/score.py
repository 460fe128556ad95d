"""The detect core for traces and chunks: TraceRecords and ChunkRecords -> alerts. Pure (no Kafka);
services.stages.DetectStage runs it in the shell.

    TRACES_TOPIC  TraceRecord (key trace id)  -> Trace -> TraceLSTM.score  (modality "traces")
    CHUNKS_TOPIC  ChunkRecord (key entity)    -> Chunk -> AnoFusion.score  (modality "chunks")

The wire records become the very ``models.base.Trace`` / ``Chunk`` the readers give evaluation
(``trace_of`` / ``chunk_of``; ``trace_record`` / ``chunk_record`` are their inverses, what the
assemble stage and the tests produce), and they are judged by the detector's own batched
``score``, the call `logwarden evaluate` makes: a verdict in the stream is the verdict in
evaluation. A batch is scored in slices of ``batch_size`` items per detector (every detector's
verdict on an item is independent of the rest of its batch).

Alerts (services.records.Alert, ``modality`` "traces" | "chunks", ``entity`` the pod):

  per trace     an anomalous trace -> one alert (status ``final``: a trace is judged once,
                complete), id stable_id(detector, "trace", trace id), key the trace id, entity the
                pod of the first anomalous span, the diagnosis of every anomaly (expected labels
                vs observed, response time vs its interval) and the concurrent siblings.
  per episode   anomalies of one entity that follow each other within ``episode_gap_s`` of
                event time form an episode: ``open`` at its first anomalous item, ``update`` when
                its count doubles (2, 4, 8, ...), ``final`` once event time has passed its last
                anomaly by ``episode_gap_s`` (or the partition had no input for
                ``episode_idle_s``: then ``closed_by`` "idle"). Id stable_id(detector, "episode",
                entity, first anomalous item id): one alert per (pod, fault episode) for chunks;
                for traces, per (pod, episode) while anomalies persist. Each record names the
                items judged anomalous so far (ids and scores, the first MAX_ITEMS) and, for
                chunks, the channels that deviate most.

Episodes are the core's partition state (a changelog entry per open episode, services.state),
so they move with their partition. Chunks are keyed by entity, so one entity's episode lives in
one partition. Traces are keyed by trace id, so a pod's anomalous traces may land in several
partitions; each partition then keeps its own episode of that pod (the id names the first trace,
so they stay distinct alerts) — per-trace alerts are exact either way.

Malformed input goes to the dead-letter topic with its reason: ``bad_trace`` / ``bad_chunk``
(not the record, or inconsistent: no spans, end before start, series of the wrong length),
``chunk_shape`` (steps or step length other than the model judges), ``no_model`` (no detector of
that modality is served: the record is kept, not silently dropped).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
import numpy as np

from models.base import Chunk, LogEvent, Span, Trace, TraceStats, Verdict
from services import metrics
from services.cores.traces import CUT_REASONS as TRACE_CUT_REASONS
from services.records import (Alert, AlertEvent, ChunkRecord, ExpectedKey, SpanRecord, TraceRecord,
                              TraceStatsRecord, decoder, encode, stable_id)
from services.shell import Out, Record, Reject

log = logging.getLogger(__name__)
TP = tuple[str, int]

EPISODE_GAP_S = 300.0        # event time without an anomaly that ends an episode (the evals' 5-minute margin)
EPISODE_IDLE_S = 600.0       # wall time without input on a partition that ends its episodes
MAX_ITEMS = 50               # items named per episode record
CLOCK_KEY = b"clock"
EPISODE_PREFIX = b"episode\x00"
DEAD_LETTER_REASONS = ("bad_trace", "bad_chunk", "chunk_shape", "no_model")


class CoreInputError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------------------------
# wire records <-> the detectors' items (one definition for the stream and its tests)
def trace_of(record: TraceRecord) -> Trace:
    """The ``Trace`` a TraceRecord carries, spans in (start, span id) order as the readers give."""
    if not record.spans:
        raise CoreInputError("bad_trace", f"trace {record.trace_id}: no spans")
    spans = []
    for s in record.spans:
        if s.end_ns < s.start_ns:
            raise CoreInputError("bad_trace", f"trace {record.trace_id}: span {s.span_id} ends before it starts")
        spans.append(Span(span_id=s.span_id, parent_id=s.parent_id, service=s.service, pod=s.pod,
                          operation=s.operation, start_ns=s.start_ns, end_ns=s.end_ns, status=s.status))
    spans.sort(key=lambda s: (s.start_ns, s.span_id))
    return Trace(record.trace_id, spans, ended=record.closed_reason not in TRACE_CUT_REASONS)


def trace_record(trace: Trace, closed_reason: str = "complete") -> TraceRecord:
    spans = [SpanRecord(span_id=s.span_id, service=s.service, pod=s.pod, operation=s.operation,
                        start_ns=s.start_ns, end_ns=s.end_ns, parent_id=s.parent_id, status=s.status)
             for s in sorted(trace.spans, key=lambda s: (s.start_ns, s.span_id))]
    return TraceRecord(trace_id=trace.trace_id, spans=spans, start_ns=trace.start_ns, end_ns=trace.end_ns,
                       closed_reason=closed_reason)


def _finite(value: float | None, what: str, entity: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise CoreInputError("bad_chunk", f"chunk of {entity}: {what} is not finite")
    return value


def chunk_of(record: ChunkRecord) -> Chunk:
    """The ``Chunk`` a ChunkRecord carries; inconsistent shapes are a ``bad_chunk``."""
    e = record.entity
    if not (record.step_s > 0 and math.isfinite(record.step_s) and math.isfinite(record.start)
            and math.isfinite(record.end) and record.end > record.start):
        raise CoreInputError("bad_chunk", f"chunk of {e}: [{record.start}, {record.end}) in steps of {record.step_s}")
    steps = max(1, round((record.end - record.start) / record.step_s))
    for channel, series in record.metrics.items():
        if len(series) != steps:
            raise CoreInputError("bad_chunk", f"chunk of {e}: metric {channel} has {len(series)} values for {steps} steps")
        for v in series:
            _finite(v, f"metric {channel}", e)
    if record.traces and len(record.traces) != steps:
        raise CoreInputError("bad_chunk", f"chunk of {e}: {len(record.traces)} trace steps for {steps} steps")
    if record.log_levels and len(record.log_levels) != len(record.logs):
        raise CoreInputError("bad_chunk", f"chunk of {e}: {len(record.log_levels)} log levels for {len(record.logs)} log events")
    traces: list[TraceStats | None] = []
    for t in record.traces:
        if t is None:
            traces.append(None)
            continue
        for name in ("p50_ms", "p90_ms", "p99_ms", "gap_p50_ms", "gap_p90_ms", "gap_p99_ms"):
            _finite(getattr(t, name), name, e)
        traces.append(TraceStats(spans=t.spans, errors=t.errors, p50_ms=t.p50_ms, p90_ms=t.p90_ms, p99_ms=t.p99_ms,
                                 gap_p50_ms=t.gap_p50_ms, gap_p90_ms=t.gap_p90_ms, gap_p99_ms=t.gap_p99_ms))
    levels = record.log_levels or [None] * len(record.logs)
    logs = []
    for (ts, template_id, template), level in zip(record.logs, levels):
        _finite(ts, "a log event time", e)
        logs.append(LogEvent(ts, template_id, template, level))
    return Chunk(entity=e, service=record.service, start=record.start, end=record.end, step_s=record.step_s,
                 metrics={c: list(v) for c, v in record.metrics.items()}, traces=traces, logs=logs)


def _number(value) -> float | None:
    return None if value is None else float(value)      # numpy scalars become plain floats


def chunk_record(chunk: Chunk) -> ChunkRecord:
    traces = [None if t is None else TraceStatsRecord(
        spans=int(t.spans), errors=int(t.errors), p50_ms=float(t.p50_ms), p90_ms=float(t.p90_ms),
        p99_ms=float(t.p99_ms), gap_p50_ms=_number(t.gap_p50_ms), gap_p90_ms=_number(t.gap_p90_ms),
        gap_p99_ms=_number(t.gap_p99_ms)) for t in chunk.traces]
    levels = [e.level for e in chunk.logs]
    return ChunkRecord(chunk_id=stable_id(chunk.entity, chunk.start, chunk.end), entity=chunk.entity,
                       service=chunk.service, start=float(chunk.start), end=float(chunk.end),
                       step_s=float(chunk.step_s),
                       metrics={c: [_number(x) for x in v] for c, v in chunk.metrics.items()}, traces=traces,
                       logs=[(float(e.timestamp), e.template_id, e.template) for e in chunk.logs],
                       log_levels=levels if any(level is not None for level in levels) else [])


# --------------------------------------------------------------------------------------------
class Episode(msgspec.Struct, omit_defaults=True):
    """An entity's run of anomalies for one detector (partition state)."""
    alert_id: str
    detector: str
    modality: str
    entity: str
    model_version: str
    first_item: str
    first_time: float                  # event time of the first anomalous item
    last_time: float                   # event time of the newest anomalous item
    count: int = 1
    score: float = 0.0                 # the highest so far
    kinds: list[str] = []
    items: list[tuple[str, float, float]] = []     # (item id, event time, score), first MAX_ITEMS
    channels: dict[str, float] = {}    # chunks: channel -> highest deviation in the episode
    hosts: list[str] = []
    first: dict[str, Any] = {}         # the first anomaly as AlertEvent fields
    updates: int = 0
    threshold: Any = None              # what the detector's score was held against (see _threshold)


_episode_codec = msgspec.json.Decoder(Episode)


@dataclass
class _Item:
    """One decoded input record, ready to score."""
    record: Record
    modality: str
    item: Trace | Chunk
    item_id: str                       # trace id | chunk id
    event_time: float


def _plain(value):
    """Verdict details as JSON values (detectors may hand numpy scalars over)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _threshold(detector, verdict: Verdict):
    """What a verdict was held against: a chunk detector's score threshold; for TraceLSTM its
    structural rule (top k, probability floor) — each response-time anomaly names its own
    per-label interval in the alert's ``anomalies``."""
    if "threshold" in verdict.details:
        return _plain(verdict.details["threshold"])
    rule = {name: getattr(detector, name) for name in ("top_k", "min_probability", "rt_confidence", "alarm_rate")
            if hasattr(detector, name)}
    return _plain(rule) or None


def _doubling(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


class ScoreCore:
    """Scores traces and chunks with the served detectors of their modality; keeps the open
    episodes of each input partition.

    ``models``: a callable giving ``{modality: {detector name: (version, detector)}}`` now (the
    stage's ModelSets, which hot-reload)."""

    name = "detect"
    dead_letter_reasons = DEAD_LETTER_REASONS

    def __init__(self, models: Callable[[], dict[str, dict[str, tuple[str, Any]]]], *, traces_topic: str,
                 chunks_topic: str, alerts_topic: str, batch_size: int = 256,
                 episode_gap_s: float = EPISODE_GAP_S, episode_idle_s: float = EPISODE_IDLE_S):
        self.models = models
        self.traces_topic, self.chunks_topic, self.alerts_topic = traces_topic, chunks_topic, alerts_topic
        self.batch_size, self.episode_gap_s, self.episode_idle_s = batch_size, episode_gap_s, episode_idle_s
        self._decode_trace = decoder(TraceRecord).decode
        self._decode_chunk = decoder(ChunkRecord).decode
        self.episodes: dict[TP, dict[tuple[str, str], Episode]] = {}
        self.clock: dict[TP, float] = {}                # newest event time seen per partition
        self.last_input: dict[TP, float] = {}           # wall time of the partition's last record
        self._dirty: dict[TP, dict[bytes, bytes | None]] = {}

    # -- partition state --------------------------------------------------------------------
    @staticmethod
    def _key(detector: str, entity: str) -> bytes:
        return EPISODE_PREFIX + f"{detector}\x00{entity}".encode("utf-8", "surrogatepass")

    def assign(self, tp: TP, entries: dict[bytes, bytes], committed: int | None) -> int | None:
        episodes: dict[tuple[str, str], Episode] = {}
        for key, value in entries.items():
            if key == CLOCK_KEY:
                self.clock[tp] = float(value)
            elif key.startswith(EPISODE_PREFIX):
                try:
                    ep = _episode_codec.decode(value)
                except msgspec.DecodeError as err:
                    log.error("detect: %s[%d]: unreadable episode %r (%s); dropped", tp[0], tp[1], key, err)
                    continue
                episodes[(ep.detector, ep.entity)] = ep
        self.episodes[tp] = episodes
        self.last_input[tp] = time.time()
        return None

    def revoke(self, tp: TP) -> None:
        self.episodes.pop(tp, None)
        self.clock.pop(tp, None)
        self.last_input.pop(tp, None)
        self._dirty.pop(tp, None)

    def changes(self) -> dict[TP, dict[bytes, bytes | None]]:
        changed, self._dirty = self._dirty, {}
        return changed

    def entries(self, tp: TP) -> dict[bytes, bytes]:
        out = {self._key(d, e): encode(ep) for (d, e), ep in self.episodes.get(tp, {}).items()}
        if tp in self.clock:
            out[CLOCK_KEY] = repr(self.clock[tp]).encode()
        return out

    def commit_offset(self, tp: TP, processed: int) -> int:
        return processed          # nothing is held back: every record is scored in its batch

    def _save(self, tp: TP, ep: Episode | None, detector: str, entity: str) -> None:
        self._dirty.setdefault(tp, {})[self._key(detector, entity)] = None if ep is None else encode(ep)

    # -- records ----------------------------------------------------------------------------
    def _decode(self, rec: Record) -> _Item:
        if rec.topic == self.traces_topic:
            try:
                record = self._decode_trace(rec.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
                raise CoreInputError("bad_trace", str(err)[:300]) from None
            trace = trace_of(record)
            return _Item(rec, "traces", trace, record.trace_id, trace.end_ns / 1e9)
        if rec.topic == self.chunks_topic:
            try:
                record = self._decode_chunk(rec.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
                raise CoreInputError("bad_chunk", str(err)[:300]) from None
            chunk = chunk_of(record)
            return _Item(rec, "chunks", chunk, record.chunk_id, chunk.end)
        raise CoreInputError("bad_trace", f"record of topic {rec.topic}, which the detect stage does not read")

    @staticmethod
    def _shape_error(detector, chunk: Chunk) -> str | None:
        """A chunk the detector cannot judge (another window than it was trained on)."""
        steps, step_s = getattr(detector, "steps", None), getattr(detector, "step_s", None)
        if steps is not None and chunk.steps != steps:
            return f"chunk of {chunk.entity} has {chunk.steps} steps; {detector.name} judges {steps}"
        if step_s is not None and abs(chunk.step_s - step_s) > 1e-9:
            return f"chunk of {chunk.entity} has steps of {chunk.step_s} s; {detector.name} judges {step_s} s"
        return None

    def process(self, batch: list[Record]) -> list[Out | Reject]:
        out: list[Out | Reject] = []
        served = self.models()
        items: dict[str, list[_Item]] = {"traces": [], "chunks": []}
        now = time.time()
        for rec in batch:
            tp = (rec.topic, rec.partition)
            self.last_input[tp] = now
            self.episodes.setdefault(tp, {})
            try:
                item = self._decode(rec)
            except CoreInputError as err:
                out.append(Reject(rec, err.reason, err.detail))
                continue
            if not served.get(item.modality):
                out.append(Reject(rec, "no_model", f"no {item.modality} detector in the model directory"))
                continue
            if item.modality == "chunks":
                problem = next(filter(None, (self._shape_error(d, item.item) for _, d in served["chunks"].values())), None)
                if problem:
                    out.append(Reject(rec, "chunk_shape", problem))
                    continue
            items[item.modality].append(item)
        # Every verdict first, state changes after: a detector that raises leaves no episode
        # half-updated when the shell gives the batch again record by record.
        judged = []
        for modality, todo in items.items():
            if not todo:
                continue
            for name, (version, detector) in served[modality].items():
                verdicts: list[Verdict] = []
                for i in range(0, len(todo), self.batch_size):
                    part = [it.item for it in todo[i:i + self.batch_size]]
                    started = time.perf_counter()
                    verdicts += detector.score(part)
                    metrics.SCORE_SECONDS.labels(name).observe(time.perf_counter() - started)
                judged.append((modality, name, version, detector, todo, verdicts))
        for modality, name, version, detector, todo, verdicts in judged:
            metrics.WINDOWS_SCORED.labels(name, modality[:-1]).inc(len(todo))
            for it, verdict in zip(todo, verdicts):
                out += self._alerts(name, version, modality, it, verdict, detector)
        for tp in {(rec.topic, rec.partition) for rec in batch}:
            times = [it.event_time for its in items.values() for it in its if (it.record.topic, it.record.partition) == tp]
            if times and max(times) > self.clock.get(tp, -math.inf):
                self.clock[tp] = max(times)
                self._dirty.setdefault(tp, {})[CLOCK_KEY] = repr(self.clock[tp]).encode()
            out += self._close(tp, self.clock.get(tp, -math.inf), "event_time")
        return out

    def tick(self, now: float) -> list[Out]:
        out: list[Out] = []
        for tp in list(self.episodes):
            if self.episodes[tp] and now - self.last_input.get(tp, now) >= self.episode_idle_s:
                out += self._close(tp, math.inf, "idle")
        return out

    # -- alerts -----------------------------------------------------------------------------
    def _alerts(self, name: str, version: str, modality: str, it: _Item, verdict: Verdict, detector) -> list[Out]:
        if not verdict.anomalous:
            return []
        out = []
        threshold = _threshold(detector, verdict)
        if modality == "traces":
            alert = self._trace_alert(name, version, it.item, verdict)
            alert.details["threshold"] = threshold
            metrics.ALERTS.labels(name, "final").inc()
            out.append(Out(self.alerts_topic, encode(alert), alert.alert_id, it.record))
            entity, kinds = alert.entity, sorted({a.kind for a in verdict.anomalies})
            first, hosts, channels = msgspec.to_builtins(alert.first_anomaly), alert.hosts, {}
        else:
            chunk: Chunk = it.item
            entity, kinds = chunk.entity, ["chunk"]
            channels = {c["channel"]: float(c["deviation"]) for c in verdict.details.get("channels", [])}
            top = verdict.details.get("channels", [{}])[0] if verdict.details.get("channels") else {}
            first = {"position": chunk.steps - 1, "template_id": top.get("channel", ""),
                     "template": ", ".join(f"{c['channel']} {c['observed']} (expected {c['expected']})"
                                           for c in verdict.details.get("channels", [])),
                     "message": "", "timestamp": chunk.end - chunk.step_s}
            hosts = [chunk.entity]
        tp = (it.record.topic, it.record.partition)
        episodes = self.episodes.setdefault(tp, {})
        ep = episodes.get((name, entity))
        score = float(verdict.score)
        if ep is None:
            ep = Episode(alert_id=stable_id(name, "episode", entity, it.item_id), detector=name, modality=modality,
                         entity=entity, model_version=version, first_item=it.item_id, first_time=it.event_time,
                         last_time=it.event_time, count=1, score=score, kinds=kinds,
                         items=[(it.item_id, it.event_time, score)], channels=channels, hosts=sorted(hosts),
                         first=first, threshold=threshold)
            episodes[(name, entity)] = ep
            status = "open"
        else:
            ep.count += 1
            ep.last_time = max(ep.last_time, it.event_time)
            ep.score = max(ep.score, score)
            ep.kinds = sorted(set(ep.kinds) | set(kinds))
            ep.hosts = sorted(set(ep.hosts) | set(hosts))
            for c, d in channels.items():
                ep.channels[c] = max(ep.channels.get(c, 0.0), d)
            if len(ep.items) < MAX_ITEMS:
                ep.items.append((it.item_id, it.event_time, score))
            status = "update" if _doubling(ep.count) else None
            if status:
                ep.updates += 1
        self._save(tp, ep, name, entity)
        if status:
            metrics.ALERTS.labels(name, status).inc()
            out.append(self._episode_alert(ep, status, it.record, verdict))
        return out

    def _close(self, tp: TP, clock: float, why: str) -> list[Out]:
        out = []
        episodes = self.episodes.get(tp, {})
        for key, ep in list(episodes.items()):
            if clock - ep.last_time > self.episode_gap_s:
                del episodes[key]
                self._save(tp, None, *key)
                metrics.ALERTS.labels(ep.detector, "final").inc()
                out.append(self._episode_alert(ep, "final", None, None, closed_by=why))
        return out

    def _episode_alert(self, ep: Episode, status: str, source: Record | None, verdict: Verdict | None,
                       closed_by: str | None = None) -> Out:
        top = sorted(ep.channels.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        f = ep.first
        details: dict[str, Any] = {
            "episode": {"first_item": ep.first_item, "start": ep.first_time, "last": ep.last_time,
                        "anomalous_items": ep.count, "closed_by": closed_by},
            "items": [{"id": i, "event_time": t, "score": s} for i, t, s in ep.items],
            "threshold": ep.threshold,
        }
        if ep.modality == "chunks":
            details["channels"] = [{"channel": c, "deviation": d} for c, d in top]
        if verdict is not None:
            details["latest"] = _plain(verdict.details)
        alert = Alert(alert_id=ep.alert_id, status=status, detector=ep.detector, model_version=ep.model_version,
                      key=ep.entity, hosts=ep.hosts, anomalous=True,
                      severity="critical" if status == "final" else "warning", score=ep.score,
                      kind="episode", modality=ep.modality, entity=ep.entity,
                      first_anomaly=AlertEvent(position=int(f.get("position", 0)), template_id=str(f.get("template_id", "")),
                                               template=str(f.get("template", "")), message=str(f.get("message", "")),
                                               timestamp=float(f.get("timestamp", ep.first_time))),
                      observed=ExpectedKey(template_id=str(f.get("template_id", ""))),
                      anomalies=ep.count, event_time=ep.first_time, detection_time=time.time(), details=details)
        return Out(self.alerts_topic, encode(alert), alert.alert_id, source)

    def _trace_alert(self, name: str, version: str, trace: Trace, verdict: Verdict) -> Alert:
        spans = trace.spans
        first = verdict.anomalies[0] if verdict.anomalies else None
        position = first.position if first else 0
        span = spans[position] if position < len(spans) else spans[0]     # the end: the root's pod
        expected = [ExpectedKey(template_id=str(label), probability=float(p)) for label, p in (first.expected if first else [])]
        diagnosis = [{"position": a.position, "kind": a.kind, "observed": a.observed,
                      "span": spans[a.position].span_id if a.position < len(spans) else None,
                      "pod": spans[a.position].pod if a.position < len(spans) else None, **_plain(a.details)}
                     for a in verdict.anomalies]
        # verdict.details has the first anomaly's one-line "diagnosis"; "anomalies" lists them all
        details = {**_plain(verdict.details), "trace_id": trace.trace_id, "anomalies": diagnosis}
        return Alert(
            alert_id=stable_id(name, "trace", trace.trace_id), status="final", detector=name, model_version=version,
            key=trace.trace_id, hosts=sorted({s.pod for s in spans}), anomalous=True, severity="critical",
            score=float(verdict.score), kind=first.kind if first else "trace", modality="traces", entity=span.pod,
            first_anomaly=AlertEvent(position=position, template_id=first.observed if first else "",
                                     template=str((first.details or {}).get("diagnosis", "")) if first else "",
                                     message=f"{span.pod} {span.operation}", timestamp=span.start_ns / 1e9),
            observed=ExpectedKey(template_id=first.observed if first else ""), expected=expected,
            anomalies=len(verdict.anomalies), event_time=trace.end_ns / 1e9, detection_time=time.time(),
            details=details)
