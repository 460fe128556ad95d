"""The OTLP core without a broker: Collector records (otlp_proto and otlp_json) -> SpanGroups,
MetricSamples and LogSamples, and every kind of malformed record -> its dead-letter reason."""
from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from models.faults import service_of
from models.microservices import read_logs, read_metrics, read_spans
from services.cores.otlp import DEAD_LETTER_REASONS, OtlpCore, encode_request
from services.records import LogSample, MetricSample, SpanGroup, decode
from services.shell import Out, Record, Reject
from toolkit import otlp_replay
from toolkit.otlp_replay import MetricRow, SpanRow, log_request, metric_request, span_request

TOPICS = {"in.spans": "spans", "in.metrics": "metrics", "in.logs": "logs"}
TRACE_ID = "8344c6bbb62a68a3eaebf0077ca7f7e5"
SPAN_ID = "38009907060427dd"
T0 = 1_675_078_742_856_000_000


def core() -> OtlpCore:
    return OtlpCore(TOPICS, "out.spans", "out.timeline")


def record(topic: str, value: bytes | None, offset: int = 0) -> Record:
    return Record(topic, 0, offset, None, value, 0)


def outputs(value: bytes | None, topic: str = "in.spans", the_core: OtlpCore | None = None) -> list:
    return (the_core or core()).process([record(topic, value)])


def reason_of(value: bytes | None, topic: str = "in.spans") -> str:
    outs = outputs(value, topic)
    assert len(outs) == 1 and type(outs[0]) is Reject, outs
    return outs[0].reason


@pytest.fixture(scope="module")
def minute(datasets) -> Path:
    return datasets / "trainticket_2023-01-30" / "fault_free"


# --------------------------------------------------------------------------------------------
# round trips
@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_spans_round_trip_every_field_and_group_by_trace(minute, encoding):
    rows = [SpanRow(tid, s.span_id, s.parent_id, s.pod, s.operation, s.start_ns, s.end_ns)
            for tid, s in read_spans([minute / "trace_11_39_trace.csv.gz"])][:1500]
    outs = outputs(encode_request(span_request(rows), encoding))
    assert all(type(o) is Out and o.topic == "out.spans" for o in outs)
    groups = [decode(o.value, SpanGroup) for o in outs]
    assert [o.key for o in outs] == [g.trace_id for g in groups]
    assert len({g.trace_id for g in groups}) == len(groups)          # one group per trace id per record
    assert all(g.source == "in.spans:0:0" for g in groups)
    got = {(g.trace_id, s.span_id): s for g in groups for s in g.spans}
    assert len(got) == len(rows)
    for row in rows:
        span = got[(row.trace_id, row.span_id)]
        assert (span.service, span.pod, span.operation, span.start_ns, span.end_ns, span.parent_id, span.status) == (
            service_of(row.pod), row.pod, row.operation, row.start_ns, row.end_ns, row.parent_id, 0)


def test_otlp_json_is_what_the_spec_says_hex_ids_integer_enums_camel_case(minute):
    rows = [SpanRow(TRACE_ID, SPAN_ID, None, "ts-auth-service-7f8d7d756d-kzp47", "/*", T0, T0 + 5)]
    doc = json.loads(encode_request(span_request(rows), "otlp_json"))
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == TRACE_ID and span["spanId"] == SPAN_ID
    assert span["kind"] == 2                                          # SERVER, as an integer
    assert span["startTimeUnixNano"] == str(T0)
    attributes = {a["key"]: a["value"]["stringValue"] for a in doc["resourceSpans"][0]["resource"]["attributes"]}
    assert attributes == {"service.name": "ts-auth-service", "k8s.pod.name": "ts-auth-service-7f8d7d756d-kzp47"}


def test_otlp_json_writes_every_id_as_hex_metric_exemplars_too_and_reads_them_back():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from services.cores.otlp import decode_request

    request = ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add()
    metric.name = "latency"
    point = metric.gauge.data_points.add()
    point.as_double = 1.5
    exemplar = point.exemplars.add()
    exemplar.trace_id, exemplar.span_id, exemplar.as_double = bytes.fromhex(TRACE_ID), bytes.fromhex(SPAN_ID), 1.5
    value = encode_request(request, "otlp_json")
    written = json.loads(value)["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["gauge"]["dataPoints"][0]
    assert written["exemplars"][0]["traceId"] == TRACE_ID and written["exemplars"][0]["spanId"] == SPAN_ID
    assert decode_request(value, "metrics") == request                  # the decoder reads back what was written


def test_json_with_snake_case_keys_numbers_for_times_and_unknown_fields_is_read():
    doc = {"resource_spans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}},
                                                            {"key": "host.name", "value": {"stringValue": "h1"}}]},
                               "scope_spans": [{"spans": [{"trace_id": TRACE_ID, "span_id": SPAN_ID, "name": "op",
                                                           "start_time_unix_nano": T0, "end_time_unix_nano": T0 + 9,
                                                           "status": {"code": 2}, "someFutureField": 1}]}]}]}
    [out] = outputs(json.dumps(doc).encode())
    group = decode(out.value, SpanGroup)
    assert group.trace_id == TRACE_ID
    [span] = group.spans
    assert (span.service, span.pod, span.status, span.end_ns - span.start_ns) == ("svc", "h1", 2, 9)


def test_entity_falls_back_pod_then_host_then_instance_then_service():
    def entity_of(attributes: dict[str, str]) -> tuple[str, str]:
        request = ExportTraceServiceRequest()
        rs = request.resource_spans.add()
        for k, v in attributes.items():
            kv = rs.resource.attributes.add()
            kv.key, kv.value.string_value = k, v
        span = rs.scope_spans.add().spans.add()
        span.trace_id, span.span_id = bytes.fromhex(TRACE_ID), bytes.fromhex(SPAN_ID)
        span.start_time_unix_nano, span.end_time_unix_nano = T0, T0 + 1
        [out] = outputs(request.SerializeToString())
        s = decode(out.value, SpanGroup).spans[0]
        return s.service, s.pod

    full = {"service.name": "svc", "k8s.pod.name": "pod", "host.name": "host", "service.instance.id": "inst"}
    assert entity_of(full) == ("svc", "pod")
    assert entity_of({k: v for k, v in full.items() if k != "k8s.pod.name"}) == ("svc", "host")
    assert entity_of({"service.name": "svc", "service.instance.id": "inst"}) == ("svc", "inst")
    assert entity_of({"service.name": "svc"}) == ("svc", "svc")
    assert entity_of({"k8s.pod.name": "pod"}) == ("unknown_service", "pod")


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_metrics_round_trip_one_sample_per_pod_and_row(datasets, encoding):
    metric_dir = datasets / "trainticket_2023-01-30" / "metric"
    pods = read_metrics(sorted(metric_dir.glob("ts-order-service-*"))[:1] + sorted(metric_dir.glob("ts-auth-*"))[:1])
    rows = [MetricRow(pod, ts, {c: v[i] for c, v in pm.channels.items()})
            for pod, pm in pods.items() for i, ts in enumerate(pm.timestamps[:5])]
    samples = [decode(o.value, MetricSample) for o in outputs(encode_request(metric_request(rows), encoding), "in.metrics")]
    assert [(s.entity, s.timestamp) for s in samples] == sorted((r.pod, r.timestamp) for r in rows)
    by_key = {(s.entity, s.timestamp): s for s in samples}
    for row in rows:
        sample = by_key[(row.pod, row.timestamp)]
        assert sample.service == service_of(row.pod)
        assert sample.values == row.values                     # every column, None where the cell was empty


def test_sums_are_values_histograms_are_skipped_and_point_attributes_name_the_channel():
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    kv = rm.resource.attributes.add()
    kv.key, kv.value.string_value = "host.name", "dn1"
    scope = rm.scope_metrics.add()
    total = scope.metrics.add()
    total.name = "bytes_read"
    p = total.sum.data_points.add()
    p.time_unix_nano, p.as_int = T0, 42
    cpu = scope.metrics.add()
    cpu.name = "cpu"
    for state, value in (("user", 0.5), ("system", float("nan"))):
        p = cpu.gauge.data_points.add()
        p.time_unix_nano, p.as_double = T0, value
        a = p.attributes.add()
        a.key, a.value.string_value = "state", state
    hist = scope.metrics.add()
    hist.name = "latency"
    hist.histogram.data_points.add().time_unix_nano = T0
    the_core = core()
    [out] = outputs(request.SerializeToString(), "in.metrics", the_core)
    sample = decode(out.value, MetricSample)
    assert (sample.entity, sample.service, sample.timestamp) == ("dn1", "unknown_service", T0 / 1e9)
    assert sample.values == {"bytes_read": 42.0, "cpu{state=\"user\"}": 0.5, "cpu{state=\"system\"}": None}
    assert the_core.counters.skipped_points == 1 and the_core.counters.points == 3


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_logs_get_the_reference_template_ids_and_the_records_time(minute, encoding):
    from models.chunks import _parsed_logs

    records = sorted(read_logs([minute / "log_11_39_log.csv.gz"]), key=lambda r: (r.timestamp, r.pod, r.message))
    expected, skipped = _parsed_logs([minute / "log_11_39_log.csv.gz"], None)
    the_core = core()
    samples = [decode(o.value, LogSample)
               for o in outputs(encode_request(log_request(records), encoding), "in.logs", the_core)]
    assert [s.entity for s in samples] == sorted(expected)
    for sample in samples:
        want = expected[sample.entity]
        assert [e[1] for e in sample.events] == [w.template_id for w in want]
        assert [e[0] for e in sample.events] == pytest.approx([w.timestamp for w in want], abs=1e-6)
        # a mined template's text as drain last generalised it within the record
        assert sample.templates == {w.template_id: w.template for w in want}
        assert sample.service == service_of(sample.entity)
    assert the_core.counters.logs == len(records) - skipped


# --------------------------------------------------------------------------------------------
# malformed input -> reasons
def _span_request(**span_fields) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "svc"
    span = rs.scope_spans.add().spans.add()
    fields = {"trace_id": bytes.fromhex(TRACE_ID), "span_id": bytes.fromhex(SPAN_ID), "name": "op",
              "start_time_unix_nano": T0, "end_time_unix_nano": T0 + 10} | span_fields
    for k, v in fields.items():
        if v is not None:
            setattr(span, k, v)
    return request


def _as_json(request) -> dict:
    return json_format.MessageToDict(request)


@pytest.mark.parametrize("value, reason", [
    (None, "empty"),
    (b"", "empty"),
    (b"\xff\xfe\xfd\xfc garbage", "not_otlp"),
    (b"hello, not protobuf", "not_otlp"),
    (b"{\"resourceSpans\": [", "bad_json"),
    (b"{\"resourceSpans\": 5}", "bad_json"),
    (b"{\"resourceSpans\": [{\"scopeSpans\": [{\"spans\": [{\"startTimeUnixNano\": \"soon\"}]}]}]}", "bad_json"),
    (b"{}", "empty_request"),
    (b"{\"resourceSpans\": [{\"resource\": {\"attributes\": [{\"key\": \"service.name\", \"value\": "
     b"{\"stringValue\": \"s\"}}]}, \"scopeSpans\": [{\"spans\": []}]}]}", "empty_request"),
    (b"{\"resourceSpans\": [{\"resource\": {}, \"scopeSpans\": [{\"spans\": []}]}]}", "missing_resource"),
])
def test_undecodable_records_are_rejected_with_a_reason(value, reason):
    assert reason_of(value) == reason


@pytest.mark.parametrize("fields, reason", [
    ({"trace_id": None}, "missing_ids"),
    ({"span_id": None}, "missing_ids"),
    ({"trace_id": b"\x01" * 8}, "bad_id"),
    ({"span_id": b"\x01" * 16}, "bad_id"),
    ({"parent_span_id": b"\x01" * 3}, "bad_id"),
    ({"trace_id": b"\x00" * 16}, "bad_id"),
    ({"start_time_unix_nano": None}, "bad_timestamp"),
    ({"end_time_unix_nano": T0 - 1}, "bad_timestamp"),                   # ends before it starts
    ({"start_time_unix_nano": 1_675_078_742, "end_time_unix_nano": 1_675_078_743}, "bad_timestamp"),   # seconds
    ({"end_time_unix_nano": 5_000_000_000 * 10**9}, "bad_timestamp"),     # year 2128
])
@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_bad_spans_are_rejected_with_a_reason(fields, reason, encoding):
    assert reason_of(encode_request(_span_request(**fields), encoding)) == reason


def test_base64_ids_in_json_are_named_as_not_hex():
    doc = _as_json(_span_request())                 # protobuf's JSON mapping: base64 ids, not OTLP's hex
    value = json.dumps(doc).encode()
    outs = outputs(value)
    assert type(outs[0]) is Reject and outs[0].reason == "bad_id" and "not hex" in outs[0].detail


def test_resource_without_service_or_entity_is_missing_resource():
    request = _span_request()
    del request.resource_spans[0].resource.attributes[:]
    assert reason_of(request.SerializeToString()) == "missing_resource"


def test_bad_metric_and_log_records_are_rejected_with_a_reason():
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    kv = rm.resource.attributes.add()
    kv.key, kv.value.string_value = "k8s.pod.name", "p"
    metric = rm.scope_metrics.add().metrics.add()
    metric.gauge.data_points.add().time_unix_nano = T0
    assert reason_of(request.SerializeToString(), "in.metrics") == "bad_metric"
    metric.name = "m"
    metric.gauge.data_points[0].time_unix_nano = 0
    assert reason_of(request.SerializeToString(), "in.metrics") == "bad_timestamp"

    logs = ExportLogsServiceRequest()
    rl = logs.resource_logs.add()
    kv = rl.resource.attributes.add()
    kv.key, kv.value.string_value = "k8s.pod.name", "p"
    rl.scope_logs.add().log_records.add().body.string_value = "12:00:00.000 INFO x: no time on the record"
    assert reason_of(logs.SerializeToString(), "in.logs") == "bad_timestamp"


def test_a_bad_record_does_not_stop_the_good_ones_in_its_batch():
    good = _span_request().SerializeToString()
    outs = core().process([record("in.spans", good, 0), record("in.spans", b"junk!", 1), record("in.spans", good, 2)])
    assert [type(o).__name__ for o in outs] == ["Out", "Reject", "Out"]
    assert outs[1].record.offset == 1


def test_every_reason_is_registered():
    assert set(DEAD_LETTER_REASONS) >= {"empty", "not_otlp", "bad_json", "empty_request", "missing_resource",
                                        "missing_ids", "bad_id", "bad_timestamp", "bad_metric"}


# --------------------------------------------------------------------------------------------
# the replay's event-time order (no broker)
def test_replay_timeline_sends_spans_by_end_time_and_merges_signals(minute, datasets, tmp_path):
    paths = [minute / "trace_11_39_trace.csv.gz"]
    events = list(otlp_replay.spans_by_end(paths))
    ends = [e[0] for e in events]
    assert ends == sorted(ends) and len(events) == sum(1 for _ in read_spans(paths))
    metric_dir = tmp_path / "metric"
    metric_dir.mkdir()
    src = next((datasets / "trainticket_2023-01-30" / "metric").glob("ts-order-service-*"))
    lines = src.read_text().splitlines()
    (metric_dir / src.name).write_text("\n".join(lines[:4]) + "\n")
    merged = list(otlp_replay.timeline(paths, metric_dir, [minute / "log_11_39_log.csv.gz"]))
    assert [e[0] for e in merged] == sorted(e[0] for e in merged)
    assert Counter(e[1] for e in merged) == {"spans": len(events), "metrics": 3,
                                            "logs": sum(1 for _ in read_logs([minute / "log_11_39_log.csv.gz"]))}


def test_writer_batches_like_the_batch_processor(minute):
    class Sink:
        def __init__(self):
            self.sent = []

        def produce(self, topic, value, key):
            self.sent.append((topic, value, key))

        def poll(self, timeout):
            return 0

    from services.settings import Settings
    settings = Settings(kafka_bootstrap="127.0.0.1:1")
    events = list(otlp_replay.spans_by_end([minute / "trace_11_39_trace.csv.gz"]))
    sink = Sink()
    writer = otlp_replay.OtlpWriter(sink, settings)
    for t, signal, row in events:
        writer.add(t, signal, row)
    writer.close()
    requests = [ExportTraceServiceRequest.FromString(v) for _, v, _ in sink.sent]
    spans = [[(rs, s) for rs in r.resource_spans for s in rs.scope_spans[0].spans] for r in requests]
    assert sum(map(len, spans)) == len(events)
    for r, batch in zip(requests, spans):
        ends = [s.end_time_unix_nano for _, s in batch]
        assert max(ends) - min(ends) <= otlp_replay.BATCH_TIMEOUT_S * 1e9     # one batch: 200 ms of event time
        pods = [dict((a.key, a.value.string_value) for a in rs.resource.attributes)["k8s.pod.name"]
                for rs in r.resource_spans]
        assert len(pods) == len(set(pods))                                      # one ResourceSpans per pod
    assert all(key is None for _, _, key in sink.sent)

    sink = Sink()
    writer = otlp_replay.OtlpWriter(sink, settings, by_trace_id=True)
    for t, signal, row in events:
        writer.add(t, signal, row)
    writer.close()
    for _, value, key in sink.sent:
        ids = {s.trace_id.hex() for rs in ExportTraceServiceRequest.FromString(value).resource_spans
               for s in rs.scope_spans[0].spans}
        assert ids == {key.decode()}


def test_speed_paces_batches_by_event_time_and_fast_does_not():
    import time as _time

    class Sink:
        def __init__(self):
            self.at = []

        def produce(self, topic, value, key):
            self.at.append(_time.monotonic())

        def poll(self, timeout):
            return 0

    from services.settings import Settings
    settings = Settings(kafka_bootstrap="127.0.0.1:1")
    rows = [SpanRow(TRACE_ID, f"{i + 1:016x}", None, "p", "op", T0 + i * 10**9 // 2, T0 + i * 10**9 // 2 + 1)
            for i in range(5)]                       # one span every 0.5 s of event time: 2 s in all
    for speed, low, high in ((10.0, 0.18, 1.0), (None, 0.0, 0.1)):
        sink = Sink()
        writer = otlp_replay.OtlpWriter(sink, settings, pacer=otlp_replay.Pacer(speed))
        started = _time.monotonic()
        for row in rows:
            writer.add(row.end_ns / 1e9, "spans", row)
        writer.close()
        assert len(sink.at) == 5                     # 0.5 s apart > the 200 ms batch timeout: 5 batches
        assert low <= sink.at[-1] - started <= high, (speed, sink.at[-1] - started)


def test_log_records_without_a_valid_time_are_left_out_and_counted(datasets):
    paths = [datasets / "trainticket_2023-01-30" / "log" / "12_00_log.csv.gz",
             datasets / "trainticket_2023-01-30" / "log" / "12_01_log.csv.gz"]
    counts = otlp_replay.ReplayCounts()
    events = otlp_replay.log_records(paths, counts)
    assert counts.bad_time_logs > 0
    assert len(events) + counts.bad_time_logs == sum(1 for _ in read_logs(paths))
    log_request([e[2] for e in events])          # every time left fits OTLP's unsigned nanoseconds
