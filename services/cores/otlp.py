"""The OTLP core: records as the OpenTelemetry Collector's Kafka exporter writes them -> logwarden's
trace, metric and log records (pure Python; no Kafka here).

What arrives (opentelemetry-collector-contrib, exporter/kafkaexporter): one Kafka record per
export request the pipeline hands the exporter (after the batch processor: one batch, many
resources), on the topics ``otlp_spans`` / ``otlp_metrics`` / ``otlp_logs`` by default. The value
is an ``ExportTraceServiceRequest`` / ``ExportMetricsServiceRequest`` / ``ExportLogsServiceRequest``
serialised per the exporter's ``encoding``: ``otlp_proto`` (the default; protobuf bytes) or
``otlp_json`` (OTLP/JSON). With ``partition_traces_by_id`` the exporter splits a batch into one
record per trace, keyed by the trace id's hex; with ``partition_metrics_by_resource_attributes``
(or the logs one) one record per resource. The key is not needed here: a record is decoded from
its value alone, so every option is accepted.

Encoding is told from the first byte, so one topic may carry both: an OTLP/JSON document starts
with ``{`` (after whitespace), while every one of these protobuf messages starts with the tag of
field 1, length-delimited (``0x0a``); ``{`` (0x7b) would be field 15 as a start-group marker,
which none of these messages has.

OTLP/JSON is protobuf's JSON mapping with OTLP's differences (the OTLP specification, "JSON
Protobuf Encoding"): ``traceId``, ``spanId`` and ``parentSpanId`` are hex strings, not base64 (every
other bytes field stays base64); enums are integers; 64-bit integers may be strings or numbers;
unknown fields are ignored. The ids are turned back into protobuf's base64 and the document is
given to ``google.protobuf.json_format`` (both lowerCamelCase and snake_case keys are accepted,
as that parser does).

What comes out:

  spans    one ``SpanGroup`` per trace id per record (a trace crosses many records: the
           assemble stage joins them by its key, the trace id). Each span: service = resource
           ``service.name``, pod = the entity (below), operation = span name, status = the OTLP
           status code (0 unset, 1 ok, 2 error), parent_id None for a root span.
  metrics  one ``MetricSample`` per (entity, timestamp) of the gauges and sums in the record
           (a sum's points are values like a gauge's: a counter's running total). The channel is
           the metric name, with the point's attributes in Prometheus style when it has any
           (``name{k="v",...}``, keys sorted: promtext.Sample.series, the lab CSVs' column names). A point flagged "no recorded value" (or NaN / inf)
           gives None. Histograms, exponential histograms and summaries carry no single value:
           they are skipped (counted in ``skipped_points``).
  logs     one ``LogSample`` per entity per record: each log record's body line is mapped to a
           template by the stream's parse core (services.cores.parse.ParseCore, the same
           configuration and template ids as the parse stage; a time-only header is dated from
           the record's time), timed by the record's ``time_unix_nano`` (else its
           ``observed_time_unix_nano``): the clock of the collector's record, not the line's
           own (TrainTicket's lines carry UTC+8 times without a date). A body the parse core
           rejects (e.g. no header where one is required) is skipped and counted
           (``skipped_logs``); an empty body is skipped. Mined template ids depend on the order
           drain sees lines in: read in event time (one logs partition, records in time order,
           as the replay writes them) they equal models.chunks' for the same data; spread over
           partitions, a few differ (a test measured 86-90% the same on the fault-free minute).

The entity (OpenTelemetry's resource semantic conventions, most specific first):
``k8s.pod.name``, else ``host.name``, else ``service.instance.id``, else the service itself. The
service: ``service.name``, else ``unknown_service`` (the SDKs' default when it is unset).

Malformed input raises BadRecord (the shell dead-letters the record with the reason); a record
is taken whole or not at all, so a broken producer's batch is visible in the dead-letter topic
rather than half of it silently in the stream. Reasons:

  empty            no value
  not_otlp         neither OTLP/JSON nor a protobuf message of this signal (nothing of it decodes
                   to a known field)
  bad_json         starts like JSON but is not valid JSON, or its fields have the wrong types
  empty_request    a valid request with no span / data point / log record in it
  missing_resource a resource with neither service.name nor any entity attribute
  missing_ids      a span without trace id or span id
  bad_id           an id of the wrong length (trace 16 bytes, span 8), all zeros, or not hex in JSON
  bad_timestamp    a start, end or point time of 0, before 2000-01-01, after 2100-01-01, or a
                   span that ends before it starts
  bad_metric       a metric without a name
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from services.cores.promtext import Sample
from services.records import LogSample, MetricSample, Source, SpanGroup, SpanRecord, encode
from services.shell import BadRecord, Out, Record, Reject

SIGNALS = ("spans", "metrics", "logs")
REQUESTS = {"spans": ExportTraceServiceRequest, "metrics": ExportMetricsServiceRequest,
            "logs": ExportLogsServiceRequest}
DEAD_LETTER_REASONS = ("empty", "not_otlp", "bad_json", "empty_request", "missing_resource", "missing_ids",
                       "bad_id", "bad_timestamp", "bad_metric")

# Event times outside these bounds are a producer's bug (a 0, seconds taken for nanoseconds), not
# telemetry: fixed bounds keep the core deterministic (no wall clock).
MIN_TIME_NS = 946_684_800 * 10**9          # 2000-01-01T00:00:00Z
MAX_TIME_NS = 4_102_444_800 * 10**9        # 2100-01-01T00:00:00Z
TRACE_ID_BYTES, SPAN_ID_BYTES = 16, 8
NO_RECORDED_VALUE = 1                      # DataPointFlags.FLAG_NO_RECORDED_VALUE_MASK
UNKNOWN_SERVICE = "unknown_service"
ENTITY_ATTRIBUTES = ("k8s.pod.name", "host.name", "service.instance.id")

# OTLP/JSON's hex-encoded id fields, per container of them (both key spellings json_format takes)
_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


# --------------------------------------------------------------------------------------------
# decoding a record's value into its request message
def decode_request(value: bytes | None, signal: str):
    """The export request of ``signal`` in ``value`` (otlp_proto or otlp_json), or BadRecord."""
    if not value:
        raise BadRecord("empty", "record has no value")
    message = REQUESTS[signal]()
    if value.lstrip()[:1] == b"{":
        _parse_json(value, message, signal)
    else:
        try:
            message.ParseFromString(value)
        except DecodeError as err:
            raise BadRecord("not_otlp", f"neither OTLP/JSON nor an {type(message).__name__} in protobuf ({err})") from None
        # Random bytes often parse as unknown fields only: a request of which nothing is known
        # is not this signal's OTLP (or not OTLP at all).
        message.DiscardUnknownFields()
        if message.ByteSize() == 0:
            raise BadRecord("not_otlp", f"{len(value)} bytes hold no field of an {type(message).__name__}")
    return message


def _parse_json(value: bytes, message, signal: str) -> None:
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError) as err:      # (UnicodeDecodeError is a ValueError)
        raise BadRecord("bad_json", f"not valid JSON: {str(err)[:200]}") from None
    if not isinstance(doc, dict):
        raise BadRecord("bad_json", f"OTLP/JSON must be an object, got {type(doc).__name__}")
    _each_id(doc, _hex_to_base64)
    try:
        json_format.ParseDict(doc, message, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError, RecursionError) as err:
        raise BadRecord("bad_json", f"not OTLP/JSON {signal}: {str(err)[:200]}") from None


def _each_id(node, convert) -> None:
    """OTLP/JSON writes trace and span ids as hex, protobuf's JSON mapping as base64: every id
    field of a JSON document (spans, links, log records, exemplars) becomes ``convert(key, text)``
    in place; other bytes fields (an attribute's bytesValue) are base64 in both and stay."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if key in _ID_KEYS and isinstance(child, str):
                    item[key] = convert(key, child)
                elif isinstance(child, (dict, list)):
                    stack.append(child)
        elif isinstance(item, list):
            stack.extend(c for c in item if isinstance(c, (dict, list)))


def _hex_to_base64(key: str, text: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(text)).decode("ascii")
    except ValueError:
        raise BadRecord("bad_id", f"{key} {text[:40]!r} is not hex (OTLP/JSON ids are hex strings)") from None


def encode_request(request, encoding: str) -> bytes:
    """An export request as the Collector's Kafka exporter writes it: ``otlp_proto``, or
    ``otlp_json`` (protobuf's JSON mapping with lowerCamelCase keys, enums as integers, trace
    and span ids as hex). What replay and scrape produce and what decode_request reads."""
    if encoding == "otlp_proto":
        return request.SerializeToString()
    doc = json_format.MessageToDict(request, use_integers_for_enums=True)
    _each_id(doc, lambda _key, text: base64.b64decode(text).hex())
    return json.dumps(doc, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# resources
def any_value_text(value) -> str | None:
    """An AnyValue as text (None when unset): strings as they are, others as JSON."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "string_value":
        return value.string_value
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if kind in ("array_value", "kvlist_value"):
        return json.dumps(json_format.MessageToDict(value), sort_keys=True, separators=(",", ":"))
    return str(getattr(value, kind)).lower() if kind == "bool_value" else str(getattr(value, kind))


def resource_identity(resource, where: str) -> tuple[str, str]:
    """(service, entity) of a resource (see the module docstring), or BadRecord."""
    attributes = {kv.key: kv.value for kv in resource.attributes}
    service = any_value_text(attributes["service.name"]) if "service.name" in attributes else None
    entity = None
    for name in ENTITY_ATTRIBUTES:
        if name in attributes:
            entity = any_value_text(attributes[name])
            if entity:
                break
    if not service and not entity:
        raise BadRecord("missing_resource", f"{where}: resource has no service.name, "
                                            f"{', '.join(ENTITY_ATTRIBUTES)}")
    return service or UNKNOWN_SERVICE, entity or service


def check_time(ns: int, what: str) -> None:
    if not MIN_TIME_NS <= ns <= MAX_TIME_NS:
        raise BadRecord("bad_timestamp", f"{what} {ns} ns is not a time between 2000 and 2100")


def _check_id(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size:
        raise BadRecord("bad_id", f"{what} of {len(raw)} bytes (OTLP: {size})")
    if not any(raw):
        raise BadRecord("bad_id", f"{what} is all zeros (an invalid id)")
    return raw.hex()


# --------------------------------------------------------------------------------------------
# the three signals
def spans_of(request, source: str) -> list[SpanGroup]:
    """One SpanGroup per trace id, in the order trace ids first appear; spans in record order."""
    groups: dict[str, list[SpanRecord]] = {}
    for r, resource_spans in enumerate(request.resource_spans):
        service, pod = resource_identity(resource_spans.resource, f"resource_spans[{r}]")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if not span.trace_id or not span.span_id:
                    raise BadRecord("missing_ids", f"span {span.name!r} in resource {pod!r} has no "
                                                   f"{'trace id' if not span.trace_id else 'span id'}")
                trace_id = _check_id(span.trace_id, TRACE_ID_BYTES, "trace id")
                span_id = _check_id(span.span_id, SPAN_ID_BYTES, "span id")
                parent = _check_id(span.parent_span_id, SPAN_ID_BYTES, "parent span id") if span.parent_span_id else None
                start, end = span.start_time_unix_nano, span.end_time_unix_nano
                check_time(start, f"span {span_id} start")
                check_time(end, f"span {span_id} end")
                if end < start:
                    raise BadRecord("bad_timestamp", f"span {span_id} ends {start - end} ns before it starts")
                group = groups.get(trace_id)
                if group is None:
                    group = groups[trace_id] = []
                group.append(SpanRecord(span_id=span_id, service=service, pod=pod, operation=span.name,
                                        start_ns=start, end_ns=end, parent_id=parent, status=span.status.code))
    if not groups:
        raise BadRecord("empty_request", "the request holds no span")
    return [SpanGroup(trace_id=tid, spans=spans, source=source) for tid, spans in groups.items()]


def _channel(name: str, attributes) -> str:
    if not attributes:
        return name
    # exactly promtext.Sample.series(): the lab's metric CSVs (what Hades trains on) name a
    # series so, and a model must find its channels under the same names in the stream
    return Sample(name, {kv.key: any_value_text(kv.value) or "" for kv in attributes}, 0.0).series()


def _point_value(point) -> float | None:
    kind = point.WhichOneof("value")
    if kind is None or point.flags & NO_RECORDED_VALUE:
        return None
    value = point.as_double if kind == "as_double" else float(point.as_int)
    return value if value - value == 0.0 else None           # NaN and +-inf: no value


def metrics_of(request, source: str) -> tuple[list[MetricSample], int]:
    """MetricSamples by (entity, timestamp), and the points skipped (no single value)."""
    samples: dict[tuple[str, int], MetricSample] = {}
    skipped = points = 0
    for r, resource_metrics in enumerate(request.resource_metrics):
        service, entity = resource_identity(resource_metrics.resource, f"resource_metrics[{r}]")
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if not metric.name:
                    raise BadRecord("bad_metric", f"a metric of {entity!r} has no name")
                kind = metric.WhichOneof("data")
                if kind not in ("gauge", "sum"):
                    skipped += _point_count(metric, kind)
                    continue
                name = metric.name
                # (the hot loop: a field read on a protobuf message costs as much as a dict
                # lookup, so each is read once)
                for point in getattr(metric, kind).data_points:
                    points += 1
                    time_ns = point.time_unix_nano
                    if not MIN_TIME_NS <= time_ns <= MAX_TIME_NS:
                        check_time(time_ns, f"point of {name!r} on {entity!r}")
                    sample = samples.get((entity, time_ns))
                    if sample is None:
                        sample = samples[(entity, time_ns)] = MetricSample(
                            entity=entity, service=service, timestamp=time_ns / 1e9, values={}, source=source)
                    attributes = point.attributes
                    sample.values[_channel(name, attributes) if attributes else name] = _point_value(point)
    if not points and not skipped:
        raise BadRecord("empty_request", "the request holds no data point")
    return [samples[k] for k in sorted(samples)], skipped


def _point_count(metric, kind: str | None) -> int:
    return len(getattr(metric, kind).data_points) if kind else 0


@dataclass
class LogLine:
    """One OTLP log record before parsing: what the parse core and the timeline need."""
    entity: str
    service: str
    time_ns: int
    body: str


def log_lines(request) -> list[LogLine]:
    lines: list[LogLine] = []
    records = 0
    for r, resource_logs in enumerate(request.resource_logs):
        service, entity = resource_identity(resource_logs.resource, f"resource_logs[{r}]")
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                records += 1
                time_ns = record.time_unix_nano or record.observed_time_unix_nano
                check_time(time_ns, f"log record of {entity!r}")
                body = any_value_text(record.body)
                if body:
                    lines.append(LogLine(entity, service, time_ns, body.rstrip("\r\n")))
    if not records:
        raise BadRecord("empty_request", "the request holds no log record")
    return lines


# --------------------------------------------------------------------------------------------
@dataclass
class OtlpCounters:
    spans: int = 0
    points: int = 0
    skipped_points: int = 0
    logs: int = 0
    skipped_logs: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class OtlpCore:
    """Batch of Collector records -> SpanGroups (spans_topic, key trace id) and MetricSamples /
    LogSamples (timeline_topic, key entity). ``topics`` maps each input topic to its signal."""
    name = "otlp"
    dead_letter_reasons = DEAD_LETTER_REASONS

    def __init__(self, topics: dict[str, str], spans_topic: str, timeline_topic: str, parse_core=None):
        unknown = {s for s in topics.values() if s not in SIGNALS}
        if unknown:
            raise ValueError(f"unknown OTLP signal(s) {sorted(unknown)}; expected {SIGNALS}")
        self.topics, self.spans_topic, self.timeline_topic = dict(topics), spans_topic, timeline_topic
        self.parse_core = parse_core
        self.counters = OtlpCounters()

    def process(self, batch: list[Record]) -> list[Out | Reject]:
        out: list[Out | Reject] = []
        for rec in batch:
            try:
                out += self.decode(rec)
            except BadRecord as err:
                self.counters.by_reason[err.reason] = self.counters.by_reason.get(err.reason, 0) + 1
                out.append(Reject(rec, err.reason, err.detail))
        return out

    def decode(self, rec: Record) -> list[Out]:
        """The outputs of one record (BadRecord when it is malformed)."""
        signal = self.topics.get(rec.topic)
        if signal is None:                        # a subscription error, not the record's fault
            raise ValueError(f"otlp: no signal configured for topic {rec.topic!r}")
        request = decode_request(rec.value, signal)
        source = f"{rec.topic}:{rec.partition}:{rec.offset}"
        if signal == "spans":
            groups = spans_of(request, source)
            self.counters.spans += sum(len(g.spans) for g in groups)
            return [Out(self.spans_topic, encode(g), g.trace_id, rec) for g in groups]
        if signal == "metrics":
            samples, skipped = metrics_of(request, source)
            self.counters.points += sum(len(s.values) for s in samples)
            self.counters.skipped_points += skipped
            return [Out(self.timeline_topic, encode(s), s.entity, rec) for s in samples]
        return [Out(self.timeline_topic, encode(s), s.entity, rec) for s in self.log_samples(request, rec, source)]

    def log_samples(self, request, rec: Record, source: str) -> list[LogSample]:
        from services.cores.parse import ParseCore, ParseError

        if self.parse_core is None:
            self.parse_core = ParseCore()
        parse = self.parse_core.parse
        by_entity: dict[str, LogSample] = {}
        # Parsed in (time, entity, body) order, as models.chunks parses a data directory's logs:
        # drain's mined templates depend on the order it sees lines in, so a replay in event
        # time gives the templates the reference gives.
        lines = sorted(log_lines(request), key=lambda l: (l.time_ns, l.entity, l.body))
        for index, line in enumerate(lines):
            ts = line.time_ns / 1e9
            origin = Source(host=line.entity, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                            file_path=f"otlp:{line.entity}", file_offset=index)
            try:
                event = parse(line.body, line.entity, origin, ts)[0]
            except ParseError:
                self.counters.skipped_logs += 1
                continue
            sample = by_entity.get(line.entity)
            if sample is None:
                sample = by_entity[line.entity] = LogSample(entity=line.entity, service=line.service, events=[],
                                                            templates={}, source=source)
            sample.events.append((ts, event.template_id))
            sample.levels.append(event.level)
            sample.templates[event.template_id] = event.template
            self.counters.logs += 1
        return [by_entity[e] for e in sorted(by_entity)]

    def tick(self, now: float) -> list[Out]:
        return []
