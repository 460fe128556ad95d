"""Operator feedback on alerts, and DeepLog's online update from false positives.

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

A version made from feedback lists, in its manifest, every feedback it has learned
(``feedback``: alert id, verdict, time) and the version it came from (``parent``). A feedback
record replayed after a crash is recognised there and not applied twice. Updates of one detector
are serialised with a lock file in MODEL_DIR, so replicas of this stage cannot both build on the
same version and lose one update.
"""
from __future__ import annotations

import fcntl
import logging
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from models import artifacts
from services import metrics
from services.records import Alert, Feedback
from services.settings import Settings, UsageError, load_settings
from services.shell import BadRecord, Out, Record, StageSpec

log = logging.getLogger(__name__)

# Detectors with an online update; a false positive of another detector is counted and logged
# (it is on FEEDBACK_TOPIC for the next training run) but changes no model.
UPDATABLE = ("deeplog",)


class FeedbackError(Exception):
    """Feedback that cannot be applied; ``reason`` is a dead-letter category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def feedback_identity(fb: Feedback) -> dict:
    return {"alert_id": fb.alert_id, "verdict": fb.verdict, "time": fb.time}


class FeedbackCore:
    """Pure core (no Kafka): applies one Feedback to the model versions in ``model_dir``."""

    def __init__(self, model_dir: Path, device: str = "auto", epochs: int = 10):
        self.model_dir = Path(model_dir)
        self.device = device
        self.epochs = epochs

    def apply(self, fb: Feedback) -> dict:
        """What was done, as a dict with ``action`` in: recorded (true positive, or a detector
        without online update), duplicate (already learned by the newest version), updated."""
        detector = fb.detector or ""
        if fb.verdict != "false_positive" or detector not in UPDATABLE:
            return {"action": "recorded", "detector": detector, "verdict": fb.verdict}
        if fb.sequence is None or not fb.sequence.keys:
            raise FeedbackError("no_sequence", f"feedback on alert {fb.alert_id} carries no key sequence")
        with _locked(self.model_dir / detector / ".feedback.lock"):
            base = artifacts.latest(self.model_dir, detector)
            if base is None:
                raise FeedbackError("no_model", f"no {detector} version in {self.model_dir} to update")
            manifest = artifacts.read_manifest(base)
            learned = manifest.get("feedback", [])
            if feedback_identity(fb) in learned:
                return {"action": "duplicate", "detector": detector, "version": base.name}
            return self._update(fb, detector, base, learned)

    def _update(self, fb: Feedback, detector: str, base: Path, learned: list[dict]) -> dict:
        from models.base import Sequence

        model = artifacts.load(base, device=self.device)
        seq = fb.sequence
        sequence = Sequence(keys=list(seq.keys), templates=[seq.templates.get(k, "") for k in seq.keys],
                            complete=seq.complete, start=seq.start)
        started = time.perf_counter()
        stats = model.update([sequence], epochs=self.epochs)
        with tempfile.TemporaryDirectory(prefix=f"feedback-{detector}-") as tmp:
            model.save(Path(tmp))
            artifacts.update_manifest(tmp, parent=base.name, feedback=[*learned, feedback_identity(fb)])
            version = artifacts.publish(tmp, self.model_dir, detector)
        result = {"action": "updated", "detector": detector, "parent": base.name, "version": version.name,
                  "seconds": round(time.perf_counter() - started, 2), **stats}
        log.info("feedback on alert %s: %s %s -> %s (%d epochs, still flagged: %d)", fb.alert_id, detector,
                 base.name, version.name, stats.get("epochs", 0), stats.get("still_flagged", 0))
        return result


class FeedbackStage:
    """Kafka adapter: FEEDBACK_TOPIC -> FeedbackCore. Produces nothing; its output is a model
    version. Feedback that cannot be applied goes to the dead-letter topic."""
    dead_letter_reasons = ("bad_feedback", "no_sequence", "no_model")
    name = "feedback"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.core = FeedbackCore(settings.model_dir, settings.device)

    def handle(self, rec: Record) -> list[Out]:
        try:
            fb = Feedback.model_validate_json(rec.value or b"")
        except ValidationError as err:
            first = err.errors()[0]
            raise BadRecord("bad_feedback", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        try:
            result = self.core.apply(fb)
        except FeedbackError as err:
            raise BadRecord(err.reason, err.detail) from None
        if result["action"] != "duplicate":
            metrics.FEEDBACK.labels(fb.detector or "unknown", fb.verdict).inc()
        if result["action"] == "recorded":
            log.info("feedback on alert %s: %s %s (no model change)", fb.alert_id, fb.detector, fb.verdict)
        return []

    def tick(self, now: float) -> list[Out]:
        return []

    def spec(self) -> StageSpec:
        # Small batches: each false positive is a model update of seconds.
        return StageSpec(self.name, [self.settings.feedback_topic], self, batch_size=10)


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
                        found = Alert.model_validate_json(msg.value() or b"")
                    except ValidationError:
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
    producer.produce(settings.feedback_topic, fb.model_dump_json().encode(), fb.alert_id,
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
