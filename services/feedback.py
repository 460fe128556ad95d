"""Operator feedback on alerts: the `logwarden feedback` command (the stage that applies it is
services.stages.FeedbackStage, its core services.cores.feedback).

    logwarden feedback ALERT_ID --false-positive|--true-positive [--note TEXT]
        finds the alert on ALERTS_TOPIC (the newest record with that id: a closed session's final
        alert carries the whole session) and publishes a `Feedback` carrying the template-id
        sequence the detector judged to FEEDBACK_TOPIC.

    logwarden run feedback
        FEEDBACK_TOPIC -> FeedbackCore: a false positive of DeepLog loads the newest DeepLog
        version in MODEL_DIR, fine-tunes it on that sequence (`DeepLog.update`, which replays the
        training windows next to the reported ones so the rest is not forgotten), and publishes
        the result as the next version. The previous version stays: `logwarden model rollback
        --detector deeplog` serves it again. Detect workers pick the new version up on their
        next reload check (DetectStage.tick -> ModelSet.refresh).

"""
from __future__ import annotations

import logging
import time
import uuid

import msgspec

from services.cores.feedback import UPDATABLE
from services.records import Alert, Feedback, decode, encode
from services.settings import Settings, UsageError, load_settings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# the command
def find_alert(settings: Settings, alert_id: str, timeout: float = 30.0) -> Alert | None:
    """The newest record of ``alert_id`` on ALERTS_TOPIC (records are keyed by alert id, so all
    of an alert's records sit in one partition, newest last), reading every partition up to its
    end as it was when the search began."""
    from confluent_kafka import Consumer, TopicPartition

    from services.shell import consumer_config

    topic = settings.alerts_topic
    consumer = Consumer(consumer_config(settings, f"{settings.group_prefix}.feedback-cli.{uuid.uuid4().hex[:12]}"))
    try:
        described = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if described is None or described.error is not None:
            return None
        ends, assignment = {}, []
        for p in sorted(described.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        if not assignment:
            return None
        consumer.assign(assignment)
        wanted = alert_id.encode()
        found: Alert | None = None
        deadline = time.monotonic() + timeout
        while ends:
            if time.monotonic() > deadline:
                raise UsageError(f"reading {topic} took longer than {timeout:g} s; try again")
            for msg in consumer.consume(5000, timeout=0.5):
                if msg.error():
                    continue
                if msg.key() == wanted:
                    try:
                        found = decode(msg.value() or b"", Alert)
                    except (msgspec.DecodeError, RecursionError):
                        log.warning("%s[%d]@%d: a record keyed %s that is not an alert", topic,
                                    msg.partition(), msg.offset(), alert_id)
            # By position, not by the last offset seen: the end can be a gap (deleted records).
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
        return found
    finally:
        consumer.close()


def send(settings: Settings, fb: Feedback) -> tuple[int, int]:
    """Produce ``fb`` (key = alert id) and wait for the broker's ack; returns (partition, offset)."""
    from confluent_kafka import Producer

    from services.shell import ensure_topics, producer_config

    ensure_topics(settings)
    producer = Producer(producer_config(settings, **{"linger.ms": 0}))
    delivered: dict = {}
    producer.produce(settings.feedback_topic, encode(fb), fb.alert_id,
                     on_delivery=lambda err, msg: delivered.update(err=err, msg=msg))
    producer.flush(30)
    if delivered.get("err") is not None or "msg" not in delivered:
        raise UsageError(f"could not publish to {settings.feedback_topic}: {delivered.get('err', 'no ack in 30 s')}")
    return delivered["msg"].partition(), delivered["msg"].offset()


def main(args) -> int:
    settings = load_settings()
    alert = find_alert(settings, args.alert_id)
    if alert is None:
        raise UsageError(f"no alert {args.alert_id} on {settings.alerts_topic}")
    verdict = "false_positive" if args.false_positive else "true_positive"
    if verdict == "false_positive" and alert.detector in UPDATABLE and alert.sequence is None:
        raise UsageError(f"alert {args.alert_id} carries no key sequence: {alert.detector} cannot learn from it")
    fb = Feedback(alert_id=alert.alert_id, verdict=verdict, detector=alert.detector, key=alert.key,
                  sequence=alert.sequence, time=time.time(), note=args.note)
    partition, offset = send(settings, fb)
    events = len(alert.sequence.keys) if alert.sequence else 0
    print(f"{verdict} on alert {alert.alert_id} ({alert.detector} {alert.model_version}, key {alert.key}, "
          f"{events} events) -> {settings.feedback_topic}[{partition}]@{offset}")
    return 0
