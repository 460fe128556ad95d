"""Operator feedback on alerts: the `logwarden feedback` command (the stage that applies it is
services.stages.FeedbackStage, its core services.cores.feedback).

    logwarden feedback ALERT_ID --false-positive|--true-positive [--note TEXT]
        finds the alert on ALERTS_TOPIC (the newest record with that id: a closed session's final
        alert carries the whole session) and publishes a `Feedback` carrying the template-id
        sequence the detector judged to FEEDBACK_TOPIC.

    logwarden run feedback
        FEEDBACK_TOPIC -> CheckedFeedback: feedback whose alert id detect never produced (looked
        up on ALERTS_TOPIC by AlertsOnTopic), or whose detector, key or sequence is not the
        alert's, is dead-lettered (unknown_alert, alert_mismatch). Then FeedbackCore: a false
        positive of DeepLog loads the newest DeepLog version in MODEL_DIR, fine-tunes it on that
        sequence (`DeepLog.update`, which replays the
        training windows next to the reported ones so the rest is not forgotten), and publishes
        the result as the next version. The previous version stays: `logwarden model rollback
        --detector deeplog` serves it again. Detect workers pick the new version up on their
        next reload check (DetectStage.tick -> ModelSet.refresh).

"""
from __future__ import annotations

import getpass
import logging
import os
import time
import uuid
from typing import Iterator

import msgspec

from services.alerts import watermarks
from services.cores.feedback import UPDATABLE, AlertIndex, FeedbackCore, FeedbackError
from services.records import Alert, Feedback, decode, encode
from services.settings import Settings, UsageError, load_settings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# reading ALERTS_TOPIC
def read_to_end(consumer, topic: str, positions: dict[int, int], deadline: float | None = None) -> Iterator:
    """Every record of ``topic`` from ``positions`` (partition -> next offset; a partition not in
    it from its first record) up to each partition's end as it is when this starts; advances
    ``positions``. Nothing when the topic does not exist; UsageError when the client may not see it."""
    from confluent_kafka import KafkaError, TopicPartition

    described = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if described is not None and described.error is not None:
        if described.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            raise UsageError(f"not authorised to read {topic}: the Kafka ACLs do not let this user read alerts")
        return
    if described is None:
        return
    ends, assignment = {}, []
    for p in sorted(described.partitions):
        low, high = watermarks(consumer, TopicPartition(topic, p))
        start = max(positions.get(p, low), low)
        positions[p] = start
        if high > start:
            ends[p] = high
            assignment.append(TopicPartition(topic, p, start))
    if not assignment:
        return
    consumer.assign(assignment)
    try:
        while ends:
            if deadline is not None and time.monotonic() > deadline:
                raise UsageError(f"reading {topic} took too long; try again")
            for msg in consumer.consume(5000, timeout=0.5):
                if not msg.error():
                    positions[msg.partition()] = msg.offset() + 1
                    yield msg
            # By position, not by the last offset seen: the end can be a gap (deleted records).
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    positions[tp.partition] = max(positions[tp.partition], tp.offset)
                    del ends[tp.partition]
    finally:
        consumer.unassign()


def _alert_of(msg) -> Alert | None:
    try:
        return decode(msg.value() or b"", Alert)
    except (msgspec.DecodeError, RecursionError):
        log.warning("%s[%d]@%d: a record that is not an alert", msg.topic(), msg.partition(), msg.offset())
        return None


def find_alert(settings: Settings, alert_id: str, timeout: float = 30.0) -> Alert | None:
    """The newest record of ``alert_id`` on ALERTS_TOPIC (records are keyed by alert id, so all
    of an alert's records sit in one partition, newest last), reading every partition up to its
    end as it was when the search began."""
    from confluent_kafka import Consumer

    from services.shell import consumer_config

    consumer = Consumer(consumer_config(settings, f"{settings.group_prefix}.feedback-cli.{uuid.uuid4().hex[:12]}"))
    wanted = alert_id.encode()
    found: Alert | None = None
    try:
        for msg in read_to_end(consumer, settings.alerts_topic, {}, time.monotonic() + timeout):
            if msg.key() == wanted:
                found = _alert_of(msg) or found
        return found
    finally:
        consumer.close()


class AlertsOnTopic:
    """The feedback stage's alert check (services.cores.feedback.AlertIndex) fed from
    ALERTS_TOPIC: read up to the topic's end whenever feedback names an alert, or a record of
    one, the index does not know yet (the first feedback after a start reads the whole topic)."""

    def __init__(self, settings: Settings, index: AlertIndex | None = None):
        self.settings = settings
        self.index = index or AlertIndex(max_alerts=settings.feedback_alert_ids)
        self.positions: dict[int, int] = {}
        self._consumer = None

    def check(self, fb: Feedback) -> None:
        try:
            self.index.check(fb)
        except FeedbackError:
            self.catch_up()
            self.index.check(fb)

    def catch_up(self) -> int:
        """Index what detect produced since the last call; returns how many records were read."""
        if self._consumer is None:
            from confluent_kafka import Consumer

            from services.shell import consumer_config
            # No commits and no group join (assign): the id only names the reader for the ACLs.
            self._consumer = Consumer(consumer_config(self.settings, f"{self.settings.group('feedback')}.alerts"))
        read = 0
        for msg in read_to_end(self._consumer, self.settings.alerts_topic, self.positions):
            alert = _alert_of(msg)
            if alert is not None:
                self.index.add(alert)
            read += 1
        return read

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


class CheckedFeedback:
    """What the feedback stage applies: FeedbackCore behind the alert check, so feedback about an
    alert detect never produced (or disagreeing with it) is refused before any model changes."""

    def __init__(self, settings: Settings):
        self.alerts = AlertsOnTopic(settings)
        self.core = FeedbackCore(settings.model_dir, settings.device)

    def apply(self, fb: Feedback) -> dict:
        self.alerts.check(fb)
        return self.core.apply(fb)


# --------------------------------------------------------------------------------------------
# the command
def sender(settings: Settings) -> str:
    """Who is sending: the SASL user Kafka authenticates, else the OS user."""
    if settings.sasl_username:
        return settings.sasl_username
    try:
        return getpass.getuser()
    except (KeyError, OSError):               # no name for this uid (a bare container)
        return f"uid {os.getuid()}"


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
                  sequence=alert.sequence, time=time.time(), note=args.note, sender=sender(settings))
    partition, offset = send(settings, fb)
    events = len(alert.sequence.keys) if alert.sequence else 0
    print(f"{verdict} on alert {alert.alert_id} ({alert.detector} {alert.model_version}, key {alert.key}, "
          f"{events} events) -> {settings.feedback_topic}[{partition}]@{offset}")
    return 0
