"""The feedback core: applies one operator verdict to the model versions in MODEL_DIR (DeepLog's
online update from a false positive). Pure: no Kafka; its adapter is services.stages.FeedbackStage.

A version made from feedback lists, in its manifest, every feedback it has learned
(``feedback``: alert id, verdict, time, sender) and the version it came from (``parent``). A feedback
record replayed after a crash is recognised there and not applied twice. Updates of one detector
are serialised with a lock file in MODEL_DIR, so replicas of the stage cannot both build on the
same version and lose one update.

Feedback retrains a model, so it is believed only about alerts detect produced: AlertIndex holds
the ids (and what each alert judged) that the stage has seen on ALERTS_TOPIC; feedback naming
another id, or another detector, key or sequence than the alert's, is refused (its adapter reads
the topic: services.feedback.AlertsOnTopic).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import tempfile
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import msgspec

from models import artifacts
from services.records import Alert, Feedback, KeySequence

log = logging.getLogger(__name__)

# Detectors with an online update; a false positive of another detector is counted and logged
# (it is on FEEDBACK_TOPIC for the next training run) but changes no model.
UPDATABLE = ("deeplog",)


# Dead-letter reasons of feedback that is refused or cannot be applied.
FEEDBACK_REASONS = ("no_sequence", "no_model", "unknown_alert", "alert_mismatch")


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


_IDENTITY = ("alert_id", "verdict", "time")


def feedback_identity(fb: Feedback) -> dict:
    return {"alert_id": fb.alert_id, "verdict": fb.verdict, "time": fb.time}


def learned_entry(fb: Feedback) -> dict:
    """What a manifest's ``feedback`` list keeps of one feedback: its identity and its sender."""
    return feedback_identity(fb) | ({"sender": fb.sender} if fb.sender else {})


def judged_fingerprint(detector: str | None, key: str | None, sequence: KeySequence | None) -> bytes:
    """What feedback must agree on with one alert record: the detector (whose model it changes),
    the key and the sequence judged (what the model learns)."""
    doc = json.dumps([detector, key, msgspec.to_builtins(sequence) if sequence else None],
                     sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).digest()[:16]


class AlertIndex:
    """The alerts detect produced: id -> the fingerprints of its records (an alert is updated as
    its session goes on: open, update..., final), the ``max_alerts`` newest alerts, each with its
    ``max_records`` newest records."""

    def __init__(self, max_alerts: int = 100_000, max_records: int = 64):
        self.max_alerts, self.max_records = max_alerts, max_records
        self._alerts: OrderedDict[str, dict[bytes, None]] = OrderedDict()
        self.forgotten = 0                     # alerts dropped to keep the bound

    def __len__(self) -> int:
        return len(self._alerts)

    def add(self, alert: Alert) -> None:
        records = self._alerts.pop(alert.alert_id, None) or {}
        fingerprint = judged_fingerprint(alert.detector, alert.key, alert.sequence)
        records.pop(fingerprint, None)
        records[fingerprint] = None            # newest last
        while len(records) > self.max_records:
            del records[next(iter(records))]
        self._alerts[alert.alert_id] = records
        while len(self._alerts) > self.max_alerts:
            self._alerts.popitem(last=False)
            self.forgotten += 1

    def check(self, fb: Feedback) -> None:
        """Raise FeedbackError unless ``fb`` names a known alert and agrees with one of its records."""
        records = self._alerts.get(fb.alert_id)
        if records is None:
            older = f" (nor among the {self.forgotten} older ones it forgot)" if self.forgotten else ""
            raise FeedbackError("unknown_alert", f"feedback on alert {fb.alert_id}, which detect never produced"
                                                 f"{older}")
        if judged_fingerprint(fb.detector, fb.key, fb.sequence) not in records:
            raise FeedbackError("alert_mismatch", f"feedback on alert {fb.alert_id} names another detector, key "
                                                  "or sequence than the alert did")


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
            if feedback_identity(fb) in [{k: entry.get(k) for k in _IDENTITY} for entry in learned]:
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
            artifacts.update_manifest(tmp, parent=base.name, feedback=[*learned, learned_entry(fb)])
            version = artifacts.publish(tmp, self.model_dir, detector)
        result = {"action": "updated", "detector": detector, "parent": base.name, "version": version.name,
                  "seconds": round(time.perf_counter() - started, 2), **stats}
        log.info("feedback on alert %s from %s: %s %s -> %s (%d epochs, still flagged: %d)", fb.alert_id,
                 fb.sender or "an unnamed sender", detector, base.name, version.name, stats.get("epochs", 0),
                 stats.get("still_flagged", 0))
        return result
