"""The feedback core: applies one operator verdict to the model versions in MODEL_DIR (DeepLog's
online update from a false positive). Pure: no Kafka; its adapter is services.stages.FeedbackStage.

A version made from feedback lists, in its manifest, every feedback it has learned
(``feedback``: alert id, verdict, time) and the version it came from (``parent``). A feedback
record replayed after a crash is recognised there and not applied twice. Updates of one detector
are serialised with a lock file in MODEL_DIR, so replicas of the stage cannot both build on the
same version and lose one update.
"""
from __future__ import annotations

import fcntl
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from models import artifacts
from services.records import Feedback

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
