"""`logwarden alerts tail`: follow ALERTS_TOPIC and print alerts as they arrive.

    logwarden alerts tail [--host H]... [--detector D] [--json] [--from-beginning] [--max N] [--timeout S]

The reader assigns itself every partition of the topic (no consumer group join, no commits), so
any number of tails can follow the topic side by side without taking records from each other or
from real subscribers, and a tail starts printing at once instead of after a group rebalance.
Partitions added to the topic after the tail started are not followed.

The alert record's JSON Schema is ``schemas/alert.v<SCHEMA_VERSION>.json`` (every record on a
topic has one there); regenerate them after changing services.records with
``python -m services.records --write-schemas`` (a test fails while a file and its Struct
disagree; bump SCHEMA_VERSION for incompatible changes).
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Iterable, TextIO

import msgspec

from services.records import SCHEMA_VERSION, Alert, ExpectedKey, published_schema
from services.settings import REPO_ROOT, Settings, UsageError, load_settings

SCHEMA_PATH = REPO_ROOT / "schemas" / f"alert.v{SCHEMA_VERSION}.json"


# --------------------------------------------------------------------------------------------
# schema
def alert_schema() -> dict:
    """The Alert record's JSON Schema as the file in schemas/ holds it (field names as on the
    wire, e.g. ``log.file.path``)."""
    return published_schema("alert")


# --------------------------------------------------------------------------------------------
# pure parts: filter and format
def matches(alert: Alert, hosts: Iterable[str] | None = None, detector: str | None = None) -> bool:
    """True when the alert touches one of ``hosts`` (any, when none given) and comes from
    ``detector`` (any, when None)."""
    if detector and alert.detector != detector:
        return False
    wanted = set(hosts or ())
    return not wanted or bool(wanted & set(alert.hosts))


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _key_line(k: ExpectedKey) -> str:
    p = f"{k.probability:6.3f}  " if k.probability is not None else ""
    text = k.template or ("(end of session)" if k.template_id == "<end>" else "(template text unknown)")
    return f"{k.template_id:<10} {p}{text}"


def _format_traces_or_chunks(alert: Alert) -> str:
    """A trace's or an entity episode's alert (the detect stage, services.cores.score)."""
    first = alert.first_anomaly
    episode = alert.kind == "episode"
    items = "traces" if alert.modality == "traces" else "chunks"
    lines = [
        f"{_when(alert.event_time)}  {alert.severity.upper():<8}  {alert.detector} {alert.model_version}  "
        f"{alert.status}  score {alert.score:.3f}  alert {alert.alert_id}",
        f"  entity    {alert.entity or '-'}  ({alert.modality}{', episode' if episode else ''})",
        f"  key       {alert.key}",
        f"  anomaly   {alert.anomalies} anomalous {items if episode else 'span(s)'}"
        f"{' so far' if episode and alert.status != 'final' else ''}, detected {_when(alert.detection_time)}",
    ]
    if alert.modality == "traces":
        lines.append(f"  span      {first.message} (position {first.position}): {first.template}")
        if alert.expected:
            lines.append("  expected  " + ", ".join(f"{k.template_id} ({k.probability:.3f})" if k.probability is not None
                                                     else k.template_id for k in alert.expected))
    for c in alert.details.get("channels") or []:
        lines.append(f"  channel   {c['channel']}  deviation {c['deviation']:.2f}")
    if not alert.details.get("channels") and first.template and alert.modality == "chunks":
        lines.append(f"  channels  {first.template}")
    if alert.details.get("threshold") is not None:
        lines.append(f"  threshold {json.dumps(alert.details['threshold'])}")
    return "\n".join(lines)


def format_alert(alert: Alert) -> str:
    """One readable block per alert (no trailing newline)."""
    if alert.modality != "logs":
        return _format_traces_or_chunks(alert)
    first = alert.first_anomaly
    lines = [
        f"{_when(alert.event_time)}  {alert.severity.upper():<8}  {alert.detector} {alert.model_version}  "
        f"{alert.status}  score {alert.score:.3f}  alert {alert.alert_id}",
        f"  key       {alert.key}",
        f"  hosts     {', '.join(alert.hosts) or '-'}",
        f"  anomaly   {alert.kind} at event {first.position} ({alert.anomalies} anomalous so far), "
        f"detected {_when(alert.detection_time)}",
        f"  line      {first.message or '(not kept: the line arrived late or is the end of the session; see below)'}",
    ]
    src = first.source
    if src is not None:
        lines.append(f"  from      {src.host} {src.file_path}:{src.file_offset}  "
                     f"(Kafka {src.topic}[{src.partition}]@{src.offset})")
    lines.append(f"  observed  {_key_line(alert.observed)}")
    for n, k in enumerate(alert.expected):
        lines.append(f"  {'expected' if n == 0 else '':<8}  {_key_line(k)}")
    if not alert.expected:
        lines.append("  expected  -")
    window = " ".join(k.template_id for k in alert.window)
    lines.append(f"  window    {window or '(session start)'}")
    diagnosis = alert.details.get("diagnosis")
    if diagnosis:
        lines.append(f"  why       {diagnosis}")
    return "\n".join(lines)


def render(alert: Alert, raw: dict, as_json: bool) -> str:
    """What tail prints for one alert: compact JSON of the record as received (fields a newer
    producer added are kept), or the readable block followed by a blank line."""
    if as_json:
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    return format_alert(alert) + "\n"


# --------------------------------------------------------------------------------------------
# Kafka
def _partitions(consumer, topic: str, wait_s: float | None, log: TextIO) -> list[int]:
    """Partition ids of ``topic``, waiting for it to exist (up to wait_s; None = forever)."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    announced = False
    while True:
        described = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if described is not None and described.error is None and described.partitions:
            return sorted(described.partitions)
        if deadline is not None and time.monotonic() >= deadline:
            raise UsageError(f"topic {topic} does not exist (waited {wait_s:g} s)")
        if not announced:
            print(f"waiting for topic {topic} ...", file=log, flush=True)
            announced = True
        time.sleep(1.0)


def watermarks(consumer, tp, patience_s: float = 15.0) -> tuple[int, int]:
    """(low, high) of a partition. A topic created a moment ago is listed before its leader
    serves it (NOT_LEADER_FOR_PARTITION): such errors are retried for ``patience_s``."""
    from confluent_kafka import KafkaError, KafkaException

    not_yet = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART)
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=10)
        except KafkaException as err:
            if err.args[0].code() not in not_yet or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def reader(settings: Settings, from_beginning: bool, wait_s: float | None = None, log: TextIO = sys.stderr):
    """A consumer assigned to every partition of ALERTS_TOPIC at concrete offsets: the
    beginning, or the end as it is now (resolved here, so nothing produced after this returns
    is missed)."""
    from confluent_kafka import Consumer, TopicPartition

    from services.shell import consumer_config

    consumer = Consumer(consumer_config(settings, f"{settings.group_prefix}.alerts-tail.{uuid.uuid4().hex[:12]}"))
    try:
        topic = settings.alerts_topic
        assignment = []
        for p in _partitions(consumer, topic, wait_s, log):
            low, high = watermarks(consumer, TopicPartition(topic, p))
            assignment.append(TopicPartition(topic, p, low if from_beginning else high))
        consumer.assign(assignment)
    except BaseException:
        consumer.close()
        raise
    return consumer


def tail(settings: Settings, hosts: list[str] | None = None, detector: str | None = None,
         as_json: bool = False, from_beginning: bool = False, max_alerts: int | None = None,
         timeout: float | None = None, out: TextIO = sys.stdout, log: TextIO = sys.stderr,
         stop: Callable[[], bool] = lambda: False) -> int:
    """Print matching alerts until ``max_alerts`` were printed, ``timeout`` seconds passed
    without one, or ``stop()``; returns how many were printed."""
    consumer = reader(settings, from_beginning, wait_s=timeout, log=log)
    printed = 0
    last = time.monotonic()
    try:
        where = "the beginning" if from_beginning else "the end"
        print(f"following {settings.alerts_topic} from {where}", file=log, flush=True)
        while not stop():
            if max_alerts is not None and printed >= max_alerts:
                break
            if timeout is not None and time.monotonic() - last >= timeout:
                break
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error():
                    print(f"alerts tail: consume error: {msg.error()}", file=log, flush=True)
                    continue
                try:
                    raw = json.loads(msg.value() or b"")
                    alert = msgspec.convert(raw, Alert)
                except (ValueError, msgspec.ValidationError) as err:
                    reason = str(err).splitlines()[0]
                    print(f"alerts tail: skipping {msg.topic()}[{msg.partition()}]@{msg.offset()}: "
                          f"not an alert ({reason})", file=log, flush=True)
                    continue
                if not matches(alert, hosts, detector):
                    continue
                print(render(alert, raw, as_json), file=out, flush=True)
                printed += 1
                last = time.monotonic()
                if max_alerts is not None and printed >= max_alerts:
                    break
    finally:
        consumer.close()
    return printed


def main(args) -> int:
    if args.action != "tail":
        raise UsageError(f"unknown action {args.action!r}")
    settings = load_settings()
    printed = tail(settings, hosts=args.host, detector=args.detector, as_json=args.json,
                   from_beginning=args.from_beginning, max_alerts=args.max, timeout=args.timeout)
    if args.max is not None and printed < args.max:
        # A script waiting for N alerts learns from the exit code that they did not come.
        print(f"logwarden alerts: {printed} of {args.max} alerts within the {args.timeout:g} s timeout",
              file=sys.stderr)
        return 1
    return 0
