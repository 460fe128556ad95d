"""`logwarden replay --traces FILE_OR_DIR... [--metrics DIR] [--logs FILE_OR_DIR...] [--speed S | --fast]`:
TrainTicket's CSVs (models.microservices reads them, plain or .gz) written to Kafka as an
OpenTelemetry Collector with the batch processor and the Kafka exporter would write them.

What a collector would write, and what this copies:
  * Resources. Every pod is a resource: ``service.name`` = the pod's service
    (models.faults.service_of), ``k8s.pod.name`` = the pod (the k8sattributes processor's name
    for it). One instrumentation scope, ``logwarden.replay``.
  * Spans as OTLP spans (ids as bytes; ParentID ``root`` -> no parent; status unset: the CSVs
    carry none), exported when they end: in end-time order, as an SDK's span processor hands a
    span over at its end.
  * Metrics as OTLP gauges per pod: one data point per column per row, at the row's TimeStamp;
    an empty cell is a point flagged "no recorded value". The metric is named by its column
    (``CpuUsageRate(%)``...), so the channels on the timeline are the CSV's, as models.chunks
    reads them. front_service.csv (the gateway's view, no pod) is skipped, as there.
  * Logs as OTLP log records: body = the container's line (inside Docker's JSON),
    time_unix_nano = observed_time_unix_nano = TimeUnixNano, the record's trace and span ids;
    a record whose TimeUnixNano is no time is left out and counted (log_records).
  * Batching as the batch processor's defaults do it: per signal, items are sent once 8192 have
    gathered or 200 ms (of event time) after the first of them; one batch is one export request
    with one ResourceX per pod, and one Kafka record (the exporter's default: no key; with
    ``--by-trace-id`` one record per trace, keyed by its hex id, as ``partition_traces_by_id``).
  * Encoding ``otlp_proto`` (the exporter's default) or ``otlp_json`` (``--encoding``).
  * Topics: LOGWARDEN_OTLP_SPANS_TOPIC / _METRICS_ / _LOGS_ (the exporter's defaults
    ``otlp_spans``, ``otlp_metrics``, ``otlp_logs``).

Pacing: all signals merged in event time; a batch is produced when the data's clock, scaled by
``--speed``, reaches its send time (``--speed 60``: an hour in a minute); ``--fast``: as fast as
the broker takes it. A tqdm progress bar on stderr counts spans, points and log records.

Memory: trace files are read one at a time (in the order given; a directory's files by name,
TrainTicket's hours): a file's spans wait in a heap by end time until the next file's first
start shows no earlier span can follow. A span that ends before one already sent (files given out
of time order) is sent at once and counted in ``late_spans``.
"""
from __future__ import annotations

import heapq
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from models.faults import service_of
from services.cores.otlp import encode_request
from services.settings import Settings, UsageError

log = logging.getLogger(__name__)

SCOPE_NAME = "logwarden.replay"
BATCH_SIZE = 8192            # the batch processor's send_batch_size default
BATCH_TIMEOUT_S = 0.2        # and its timeout default
ENCODINGS = ("otlp_proto", "otlp_json")
NO_RECORDED_VALUE = 1
MIN_TIME_S, MAX_TIME_S = 946_684_800, 4_102_444_800     # services.cores.otlp's bounds (2000-2100)


@dataclass(slots=True)
class SpanRow:
    trace_id: str
    span_id: str
    parent_id: str | None
    pod: str
    operation: str
    start_ns: int
    end_ns: int


@dataclass(slots=True)
class MetricRow:
    pod: str
    timestamp: float
    values: dict[str, float | None]


@dataclass
class ReplayCounts:
    spans: int = 0
    metric_points: int = 0
    metric_rows: int = 0
    logs: int = 0
    messages: dict[str, int] = field(default_factory=lambda: {"spans": 0, "metrics": 0, "logs": 0})
    late_spans: int = 0
    bad_time_logs: int = 0                 # log records whose time is no time: left out
    first_time: float | None = None
    last_time: float | None = None


# --------------------------------------------------------------------------------------------
# building requests
def _resource(resource, pod: str) -> None:
    for key, value in (("service.name", service_of(pod)), ("k8s.pod.name", pod)):
        kv = resource.attributes.add()
        kv.key = key
        kv.value.string_value = value


def _id(text: str | None, size: int) -> bytes:
    """A hex id as bytes; b"" when it is not ``size`` bytes of hex (TrainTicket's logs have rows
    without ids)."""
    if not text or len(text) != 2 * size:
        return b""
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""


def span_request(spans: Iterable[SpanRow]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    scopes: dict[str, object] = {}
    for row in spans:
        scope = scopes.get(row.pod)
        if scope is None:
            resource_spans = request.resource_spans.add()
            _resource(resource_spans.resource, row.pod)
            scope = scopes[row.pod] = resource_spans.scope_spans.add()
            scope.scope.name = SCOPE_NAME
        span = scope.spans.add()
        span.trace_id = bytes.fromhex(row.trace_id)
        span.span_id = bytes.fromhex(row.span_id)
        if row.parent_id:
            span.parent_span_id = bytes.fromhex(row.parent_id)
        span.name = row.operation
        span.kind = 2 if row.parent_id is None else 1      # SERVER at the entry, INTERNAL below
        span.start_time_unix_nano = row.start_ns
        span.end_time_unix_nano = row.end_ns
    return request


def metric_request(rows: Iterable[MetricRow]) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    per_pod: dict[str, tuple[object, dict[str, object]]] = {}
    for row in rows:
        found = per_pod.get(row.pod)
        if found is None:
            resource_metrics = request.resource_metrics.add()
            _resource(resource_metrics.resource, row.pod)
            scope = resource_metrics.scope_metrics.add()
            scope.scope.name = SCOPE_NAME
            found = per_pod[row.pod] = (scope, {})
        scope, metrics = found
        time_ns = round(row.timestamp * 1e9)
        for channel, value in row.values.items():
            metric = metrics.get(channel)
            if metric is None:
                metric = metrics[channel] = scope.metrics.add()
                metric.name = channel
                metric.gauge.SetInParent()
            point = metric.gauge.data_points.add()
            point.time_unix_nano = time_ns
            if value is None:
                point.flags = NO_RECORDED_VALUE
            else:
                point.as_double = value
    return request


def log_request(records) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    scopes: dict[str, object] = {}
    for rec in records:
        scope = scopes.get(rec.pod)
        if scope is None:
            resource_logs = request.resource_logs.add()
            _resource(resource_logs.resource, rec.pod)
            scope = scopes[rec.pod] = resource_logs.scope_logs.add()
            scope.scope.name = SCOPE_NAME
        item = scope.log_records.add()
        time_ns = round(rec.timestamp * 1e9)
        item.time_unix_nano = item.observed_time_unix_nano = time_ns
        item.body.string_value = rec.message
        item.trace_id = _id(rec.trace_id, 16)
        item.span_id = _id(rec.span_id, 8)
    return request


# --------------------------------------------------------------------------------------------
# reading, in event time
def spans_by_end(paths: list[Path], counts: ReplayCounts | None = None) -> Iterator[tuple[float, str, SpanRow]]:
    """(end time s, "spans", row) of every span, by end time, one file in memory at a time."""
    from models.microservices import read_spans

    heap: list[tuple[int, int, SpanRow]] = []
    seq = 0
    sent_up_to = None
    for path in paths:
        rows = [SpanRow(tid, s.span_id, s.parent_id, s.pod, s.operation, s.start_ns, s.end_ns)
                for tid, s in read_spans([path])]
        if not rows:
            continue
        first_start = min(r.start_ns for r in rows)
        while heap and heap[0][0] <= first_start:     # nothing in this file (or later) ends before
            end, _, row = heapq.heappop(heap)
            sent_up_to = end
            yield end / 1e9, "spans", row
        for row in rows:
            if sent_up_to is not None and row.end_ns < sent_up_to:
                if counts is not None:
                    counts.late_spans += 1
                yield sent_up_to / 1e9, "spans", row
                continue
            heapq.heappush(heap, (row.end_ns, seq, row))
            seq += 1
    while heap:
        end, _, row = heapq.heappop(heap)
        yield end / 1e9, "spans", row


def metric_rows(metric_dir: Path) -> list[tuple[float, str, MetricRow]]:
    from models.microservices import expand, read_metrics

    if not metric_dir.is_dir():
        raise UsageError(f"--metrics {metric_dir}: not a directory")
    paths = expand([metric_dir], "metric")
    events = []
    for pod, pm in sorted(read_metrics(paths).items()):
        for i, ts in enumerate(pm.timestamps):
            events.append((ts, "metrics", MetricRow(pod, ts, {c: v[i] for c, v in pm.channels.items()})))
    events.sort(key=lambda e: (e[0], e[2].pod))
    return events


def log_records(paths: list[Path], counts: ReplayCounts | None = None) -> list[tuple[float, str, object]]:
    """(time, "logs", record) by (time, pod, line). Records whose TimeUnixNano is no time (79 of
    2023-01-30's, all ERROR lines of one pod at 12:01, carry Go's zero time.Time as
    -6795364578871345152) are left out and counted in ``bad_time_logs``: OTLP's times are unsigned,
    and models.chunks, timing them by the same field, puts them in no chunk either."""
    from models.microservices import read_logs

    records, bad = [], 0
    for r in read_logs(paths):
        if MIN_TIME_S <= r.timestamp <= MAX_TIME_S:
            records.append(r)
        else:
            bad += 1
    if counts is not None:
        counts.bad_time_logs += bad
    records.sort(key=lambda r: (r.timestamp, r.pod, r.message))
    return [(r.timestamp, "logs", r) for r in records]


def timeline(traces: list[Path], metrics: Path | None, logs: list[Path],
             counts: ReplayCounts | None = None) -> Iterator[tuple[float, str, object]]:
    streams: list[Iterable] = []
    if traces:
        streams.append(spans_by_end(traces, counts))
    if metrics is not None:
        streams.append(metric_rows(metrics))
    if logs:
        streams.append(log_records(logs, counts))
    return heapq.merge(*streams, key=lambda e: e[0])


# --------------------------------------------------------------------------------------------
class Pacer:
    """Holds the producer back to event time / speed (None: no holding back)."""

    def __init__(self, speed: float | None):
        self.speed = speed
        self.event0: float | None = None
        self.wall0 = 0.0

    def wait_until(self, event_time: float) -> None:
        if not self.speed:
            return
        if self.event0 is None:
            self.event0, self.wall0 = event_time, time.monotonic()
            return
        ahead = self.wall0 + (event_time - self.event0) / self.speed - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


class OtlpWriter:
    """Batches per signal as the batch processor does and produces each batch as one request."""

    def __init__(self, producer, settings: Settings, encoding: str = "otlp_proto", by_trace_id: bool = False,
                 pacer: Pacer | None = None, counts: ReplayCounts | None = None, progress=None):
        if encoding not in ENCODINGS:
            raise UsageError(f"--encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")
        self.producer, self.encoding, self.by_trace_id = producer, encoding, by_trace_id
        self.topics = {"spans": settings.otlp_spans_topic, "metrics": settings.otlp_metrics_topic,
                       "logs": settings.otlp_logs_topic}
        self.pacer = pacer or Pacer(None)
        self.counts = counts or ReplayCounts()
        self.progress = progress
        self.batches: dict[str, list] = {"spans": [], "metrics": [], "logs": []}
        self.started: dict[str, float] = {}

    def add(self, event_time: float, signal: str, item) -> None:
        c = self.counts
        if c.first_time is None:
            c.first_time = event_time
        c.last_time = event_time
        for other, opened in list(self.started.items()):       # the batch processor's timers
            if event_time - opened >= BATCH_TIMEOUT_S:
                self.flush(other, opened + BATCH_TIMEOUT_S)
        batch = self.batches[signal]
        if not batch:
            self.started[signal] = event_time
        batch.append(item)
        size = len(item.values) if signal == "metrics" else 1
        if signal == "metrics":
            c.metric_rows += 1
            c.metric_points += size
        elif signal == "spans":
            c.spans += 1
        else:
            c.logs += 1
        if self.progress is not None:
            self.progress.update(size)
        if len(batch) >= BATCH_SIZE or (signal == "metrics" and sum(len(r.values) for r in batch) >= BATCH_SIZE):
            self.flush(signal, event_time)

    def flush(self, signal: str, send_time: float | None = None) -> None:
        batch = self.batches[signal]
        opened = self.started.pop(signal, None)
        if not batch:
            return
        self.batches[signal] = []
        self.pacer.wait_until(send_time if send_time is not None else opened)
        topic = self.topics[signal]
        if signal == "spans":
            if self.by_trace_id:
                per_trace: dict[str, list[SpanRow]] = {}
                for row in batch:
                    per_trace.setdefault(row.trace_id, []).append(row)
                for trace_id, rows in per_trace.items():
                    self._produce(topic, encode_request(span_request(rows), self.encoding), trace_id.encode(), signal)
            else:
                self._produce(topic, encode_request(span_request(batch), self.encoding), None, signal)
        elif signal == "metrics":
            self._produce(topic, encode_request(metric_request(batch), self.encoding), None, signal)
        else:
            self._produce(topic, encode_request(log_request(batch), self.encoding), None, signal)

    def _produce(self, topic: str, value: bytes, key: bytes | None, signal: str) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key)
                break
            except BufferError:              # local queue full: let librdkafka send some
                self.producer.poll(0.05)
        self.producer.poll(0)
        self.counts.messages[signal] += 1

    def close(self) -> None:
        for signal in ("spans", "metrics", "logs"):
            self.flush(signal)


def replay_otlp(settings: Settings, traces: Iterable[str | Path] = (), metrics: str | Path | None = None,
                logs: Iterable[str | Path] = (), *, speed: float | None = 1.0, encoding: str = "otlp_proto",
                by_trace_id: bool = False, progress: bool = False, producer=None) -> ReplayCounts:
    """Replay TrainTicket CSVs as a collector would (module docstring); returns what was sent
    (every record acknowledged). ``speed`` None: as fast as the broker takes it."""
    from models.microservices import expand
    from toolkit.replay import ensure_topic, make_producer

    trace_paths = expand(traces, "trace") if traces else []
    log_paths = expand(logs, "log") if logs else []
    metric_dir = Path(metrics) if metrics is not None else None
    if not trace_paths and metric_dir is None and not log_paths:
        raise UsageError("replay: give --traces, --metrics or --logs (or log FILEs with --host)")
    if speed is not None and not speed > 0:
        raise UsageError(f"--speed {speed!r}: must be greater than 0")
    if encoding not in ENCODINGS:
        raise UsageError(f"--encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")
    if metric_dir is not None and not metric_dir.is_dir():
        raise UsageError(f"--metrics {metric_dir}: not a directory")
    wanted = [t for t, on in ((settings.otlp_spans_topic, trace_paths), (settings.otlp_metrics_topic, metric_dir),
                              (settings.otlp_logs_topic, log_paths)) if on]
    for topic in wanted:
        ensure_topic(settings, topic)
    producer = producer or make_producer(settings)
    counts = ReplayCounts()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit=" items", unit_scale=True, desc="otlp replay", file=sys.stderr, mininterval=0.5)
    writer = OtlpWriter(producer, settings, encoding, by_trace_id, Pacer(speed), counts, bar)
    try:
        for event_time, signal, item in timeline(trace_paths, metric_dir, log_paths, counts):
            writer.add(event_time, signal, item)
        writer.close()
        producer.flush()
    finally:
        if bar is not None:
            bar.close()
    if counts.bad_time_logs:
        log.warning("replay: %d log records have no valid TimeUnixNano; left out", counts.bad_time_logs)
    if counts.late_spans:
        log.warning("replay: %d spans ended before spans already sent (trace files out of time order)",
                    counts.late_spans)
    return counts
