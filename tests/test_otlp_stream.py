"""Through the real broker: TrainTicket's fault-free minute (traces + logs) and the metrics of a
few pods cut to the same minutes, replayed as a Collector writes them (`logwarden replay`), then
the otlp stage: spans on logwarden.spans equal the CSV's, one metric sample per pod per row,
log samples with the reference's template ids, malformed OTLP dead-lettered with its reason."""
from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from models.faults import service_of
from models.microservices import read_metrics, read_spans
from services import stages
from services.records import DeadLetter, LogSample, MetricSample, SpanGroup, TimelineItem, decode
from tests.kafkautil import consume, produce_values, record_count
from tests.streamutil import settings_env
from toolkit.otlp_replay import replay_otlp

PODS = ("ts-order-service", "ts-auth-service", "ts-travel-service")
MINUTES = (1675078680, 1675078920)        # 11:38:00 - 11:42:00 UTC, around the fault-free minute 11:39


def cut_metrics(metric_dir: Path, out: Path) -> Path:
    """The rows of a few pods' metric CSVs in MINUTES (as whole CSV lines, header kept)."""
    out.mkdir()
    for prefix in PODS:
        src = next(metric_dir.glob(f"{prefix}-*_metric.csv"))
        lines = src.read_text().splitlines()
        kept = [lines[0]] + [l for l in lines[1:] if MINUTES[0] <= float(l.split(",")[1]) < MINUTES[1]]
        assert len(kept) > 2, f"{src.name}: no rows in the test's minutes"
        (out / src.name).write_text("\n".join(kept) + "\n")
    return out


def run_stage(settings, idle_s: float = 6.0) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stages.run, args=(["otlp"], settings, idle_s, stop), daemon=True)
    thread.start()
    thread.join(120)
    stop.set()
    assert not thread.is_alive(), "the otlp stage did not stop when idle"


def read_all(settings, topic: str) -> list:
    return consume(settings, topic, record_count(settings, topic), timeout=30)


@pytest.mark.slow
def test_replayed_minute_through_the_otlp_stage_equals_the_csvs(kafka_settings, datasets, tmp_path):
    settings = kafka_settings
    day = datasets / "trainticket_2023-01-30"
    traces = day / "fault_free" / "trace_11_39_trace.csv.gz"
    logs = day / "fault_free" / "log_11_39_log.csv.gz"
    metrics = cut_metrics(day / "metric", tmp_path / "metric")

    # One partition of logs: the stage then parses the lines in the order the replay sent them,
    # event time, as models.chunks does (drain's mined ids depend on the order lines come in).
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(settings.kafka_config())
    admin.create_topics([NewTopic(settings.otlp_logs_topic, 1, 1)])[settings.otlp_logs_topic].result(30)

    # the CLI, as a user runs it (json here; the proto default is replayed in-process below)
    exe = Path(sys.executable).with_name("logwarden")
    run = subprocess.run([str(exe), "replay", "--traces", str(traces), "--metrics", str(metrics), "--logs", str(logs),
                          "--fast", "--encoding", "otlp_json", "--no-progress"],
                         env=settings_env(settings), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "4595 spans" in run.stderr
    counts = replay_otlp(settings, [traces], metrics, [logs], speed=None)      # otlp_proto, partitioned anyhow
    malformed = [b"not otlp at all", b'{"resourceSpans": [{"scopeSpans": 7}]}',
                 b'{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"s"}}]},'
                 b'"scopeSpans":[{"spans":[{"traceId":"abcd","spanId":"0102030405060708",'
                 b'"startTimeUnixNano":"1675078742856000000","endTimeUnixNano":"1675078742856000001"}]}]}]}']
    produce_values(settings, settings.otlp_spans_topic, malformed)
    produce_values(settings, settings.otlp_metrics_topic, [b"\x0a\x05junk!"])

    run_stage(settings)

    # spans: every CSV span, twice (two replays), each copy once; keyed by trace id
    expected = {(tid, s.span_id): s for tid, s in read_spans([traces])}
    assert counts.spans == len(expected) == 4595
    messages = read_all(settings, settings.spans_topic)
    groups = [decode(m.value(), SpanGroup) for m in messages]
    assert all(m.key().decode() == g.trace_id for m, g in zip(messages, groups))
    got = Counter((g.trace_id, s.span_id) for g in groups for s in g.spans)
    assert set(got) == set(expected) and set(got.values()) == {2}
    for g in groups:
        for s in g.spans:
            want = expected[(g.trace_id, s.span_id)]
            assert (s.pod, s.service, s.operation, s.start_ns, s.end_ns, s.parent_id) == (
                want.pod, service_of(want.pod), want.operation, want.start_ns, want.end_ns, want.parent_id)
    # a trace's spans all sit in one partition (the assemble stage relies on it)
    partitions: dict[str, set[int]] = {}
    for m, g in zip(messages, groups):
        partitions.setdefault(g.trace_id, set()).add(m.partition())
    assert all(len(p) == 1 for p in partitions.values())

    # timeline: one metric sample per pod per row (per replay), values as in the CSV; log samples
    timeline = [decode(m.value(), TimelineItem) for m in read_all(settings, settings.timeline_topic)]
    samples = [t for t in timeline if type(t) is MetricSample]
    rows = read_metrics(sorted(metrics.iterdir()))
    want_rows = Counter((pod, ts) for pod, pm in rows.items() for ts in pm.timestamps)
    assert Counter((s.entity, s.timestamp) for s in samples) == Counter({k: 2 for k in want_rows})
    for s in samples:
        pm = rows[s.entity]
        i = pm.timestamps.index(s.timestamp)
        assert s.values == {c: v[i] for c, v in pm.channels.items()}
    assert counts.metric_points == sum(len(s.values) for s in samples) // 2
    log_samples = [t for t in timeline if type(t) is LogSample]
    from models.chunks import _parsed_logs
    reference, skipped = _parsed_logs([logs], None)
    assert sum(len(s.events) for s in log_samples) == 2 * (counts.logs - skipped)
    per_pod: dict[str, list[str]] = {}
    for s in log_samples:
        per_pod.setdefault(s.entity, []).extend(e[1] for e in s.events)
    assert set(per_pod) == set(reference)
    # every log record arrives, per pod, with the reference's template id (twice: two replays)
    for pod, ids in per_pod.items():
        assert Counter(ids) == Counter({k: 2 * v for k, v in Counter(e.template_id for e in reference[pod]).items()})

    # dead letters: each malformed record once, with its reason
    letters = [decode(m.value(), DeadLetter) for m in read_all(settings, settings.deadletter_topic)]
    assert sorted((d.topic, d.reason) for d in letters) == sorted([
        (settings.otlp_spans_topic, "not_otlp"), (settings.otlp_spans_topic, "bad_json"),
        (settings.otlp_spans_topic, "bad_id"), (settings.otlp_metrics_topic, "not_otlp")])
    assert all(d.stage == "otlp" for d in letters)


def test_replay_arguments_are_checked_in_one_line(tmp_path):
    exe = Path(sys.executable).with_name("logwarden")

    def fails(*args: str) -> str:
        run = subprocess.run([str(exe), "replay", *args], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "LOGWARDEN_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, run.stderr
        return lines[0]

    assert "no such file or directory" in fails("--traces", str(tmp_path / "missing.csv"), "--fast")
    assert "not allowed with argument" in fails("--traces", "x", "--fast", "--speed", "2")
    assert "must be greater than 0" in fails("--traces", "x", "--speed", "0")
    assert "separate replays" in fails("some.log", "--host", "h", "--traces", "x")
    assert "--host" in fails("some.log")
    assert "go with --traces" in fails("some.log", "--host", "h", "--fast")
    assert "not a directory" in fails("--metrics", str(tmp_path / "nope"))


def test_the_otlp_stage_is_registered_with_its_topics_and_reasons(tmp_path):
    from services.cores.otlp import DEAD_LETTER_REASONS
    from services.settings import Settings

    settings = Settings(kafka_bootstrap="127.0.0.1:1", state_dir=tmp_path)
    assert "otlp" in stages.STAGES and "otlp" in stages.ALL_STAGES
    spec = stages.build("otlp", settings)
    assert spec.name == "otlp"
    assert spec.topics == [settings.otlp_spans_topic, settings.otlp_metrics_topic, settings.otlp_logs_topic]
    assert set(spec.dead_letter_reasons) == set(DEAD_LETTER_REASONS)
    assert spec.core.core.spans_topic == settings.spans_topic
    assert spec.core.core.timeline_topic == settings.timeline_topic
    for topic in ("OTLP_SPANS_TOPIC", "OTLP_METRICS_TOPIC", "OTLP_LOGS_TOPIC"):
        assert f"{topic}" in stages.__doc__ and "--otlp-" in stages.__doc__
