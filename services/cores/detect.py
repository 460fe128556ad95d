"""detect core: windows -> alerts (the GPU worker's work; its Kafka adapter is services.stages.DetectStage).

`DetectCore` is pure (windows in, alerts out; no Kafka): it turns each window into a
`models.base.Sequence` (a sliding window's compact context Steps, then its full newest event),
batches them across keys per detector, calls `Detector.score` — the very call evaluation makes —
and keeps one alert per (session, detector):

  sliding window, anomalous  -> alert "open" at the first anomalous event, "update" after that
                                (same alert id: stable_id(detector, session id))
  closed session window      -> "final": the verdict on the whole session, which is exactly the
                                batch evaluation verdict; a session that was never flagged and is
                                normal produces no alert (only a metric)

`ModelSet` serves the newest version of each detector in MODEL_DIR and reloads when a newer
version appears (or the newest is rolled back).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

from models import artifacts
from models.base import Detector, Sequence, Verdict, limit_cpu_threads, pick_device
from services import metrics
from services.records import (Alert, AlertEvent, ExpectedKey, KeySequence, ParsedEvent, Window,
                              numeric_params, stable_id)

log = logging.getLogger(__name__)


def _context_texts(window: Window) -> list[str]:
    texts = window.templates
    return [step.template or texts[step.template_id] for step in window.context]


def to_sequence(window: Window) -> Sequence:
    """The detector's view of a window; the same function builds sequences for evaluation. A
    sliding window's context Steps come first (their values are ``numeric_params`` of their
    params, computed by the window stage), then its events."""
    events, context = window.events, window.context
    if window.kind == "sliding":
        complete, judge_from = False, max(0, len(context) + len(events) - 1)
    else:
        complete, judge_from = True, 0
    keys = [s.template_id for s in context]
    keys += [e.template_id for e in events]
    params = [s.values for s in context]
    params += [numeric_params(e.params) for e in events]
    timestamps = [s.timestamp for s in context]
    timestamps += [e.timestamp for e in events]
    templates = _context_texts(window) if context else []
    templates += [e.template for e in events]
    return Sequence(keys=keys, templates=templates, params=params, timestamps=timestamps,
                    complete=complete, start=window.first_index == 0, judge_from=judge_from)


def _keys(window: Window) -> list[str]:
    return [s.template_id for s in window.context] + [e.template_id for e in window.events]


def key_sequence(window: Window) -> KeySequence:
    """What the detector judged, as an alert carries it for feedback's online update."""
    texts = dict(zip(_keys(window), _context_texts(window) + [e.template for e in window.events]))
    return KeySequence(keys=_keys(window), start=window.first_index == 0,
                       complete=window.kind != "sliding", templates=texts)


def session_id(window: Window) -> str:
    if window.session_id:
        return window.session_id
    first = window.first_event_id or (window.events[0].event_id if window.events else "")
    return stable_id(window.key, first)


class ModelSet:
    """The newest model version of each detector found in MODEL_DIR."""

    def __init__(self, model_dir: Path, device: str = "auto", detectors: tuple[str, ...] = tuple(artifacts.DETECTORS)):
        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        if self.device == "cpu":
            limit_cpu_threads()
        self.names = detectors
        self.loaded: dict[str, tuple[str, Detector]] = {}   # name -> (version dir name, detector)

    def refresh(self) -> bool:
        """Load any detector whose newest version changed; True when something changed."""
        changed = False
        for name in self.names:
            newest = artifacts.latest(self.model_dir, name)
            current = self.loaded.get(name)
            if newest is None:
                if current:
                    log.warning("%s: no model version left in %s; detector stopped", name, self.model_dir)
                    metrics.MODEL_VERSION.labels(name, current[0]).set(0)
                    del self.loaded[name]
                    changed = True
                continue
            if current and current[0] == newest.name:
                continue
            try:
                detector = artifacts.load(newest, device=self.device)
            except Exception:
                log.exception("%s: cannot load %s; keeping the current version", name, newest)
                continue
            if current:
                metrics.MODEL_VERSION.labels(name, current[0]).set(0)
            metrics.MODEL_VERSION.labels(name, newest.name).set(1)
            self.loaded[name] = (newest.name, detector)
            log.info("%s: serving %s on %s", name, newest, self.device)
            changed = True
        return changed


class DetectCore:
    def __init__(self, models: dict[str, tuple[str, Detector]], max_alerts: int = 100_000,
                 dedup_windows: int = 200_000):
        self.models = models
        self.open: OrderedDict[tuple[str, str], Alert] = OrderedDict()   # (detector, session) -> alert
        self.max_alerts = max_alerts
        self.texts: dict[str, str] = {}                                  # template id -> text
        self._seen: OrderedDict[str, None] = OrderedDict()               # window ids (at-least-once)
        self._dedup_windows = dedup_windows
        self._hosts: set[tuple[str, str]] = set()                        # (host, detector) counters made

    def _fresh(self, window: Window) -> bool:
        if window.window_id in self._seen:
            return False
        self._seen[window.window_id] = None
        if len(self._seen) > self._dedup_windows:
            self._seen.popitem(last=False)
        return True

    def process(self, windows: list[Window], now: float | None = None) -> list[Alert]:
        windows = [w for w in windows if w.events and self._fresh(w)]
        texts = self.texts
        for w in windows:
            for template_id, text in w.templates.items():   # first text of each context id
                texts.setdefault(template_id, text)
            for e in w.events:
                texts.setdefault(e.template_id, e.template)
        alerts: list[Alert] = []
        if not windows:
            return alerts
        sequences = [to_sequence(w) for w in windows]
        for name, (version, detector) in self.models.items():
            started = time.perf_counter()
            verdicts = detector.score(sequences)
            metrics.SCORE_SECONDS.labels(name).observe(time.perf_counter() - started)
            kinds: dict[str, int] = {}
            for window, verdict in zip(windows, verdicts):
                kinds[window.kind] = kinds.get(window.kind, 0) + 1
                for host in window.hosts:
                    if (host, name) not in self._hosts:
                        # The anomaly counter of a host exists at 0 from its first window:
                        # rate() ignores a series' first sample, so a series born at its first
                        # anomaly would hide that anomaly from the spike alert.
                        self._hosts.add((host, name))
                        metrics.ANOMALIES.labels(host, name)
                alert = self._alert(name, version, window, verdict, now or time.time())
                if alert:
                    alerts.append(alert)
            for kind, n in kinds.items():
                metrics.WINDOWS_SCORED.labels(name, kind).inc(n)
        return alerts

    # ------------------------------------------------------------------------------------
    def _alert(self, name: str, version: str, window: Window, verdict: Verdict, now: float) -> Alert | None:
        sid = session_id(window)
        slot = (name, sid)
        previous = self.open.get(slot)
        closed = window.kind != "sliding"
        if closed:
            self.open.pop(slot, None)
            metrics.SESSIONS_JUDGED.labels(name, "anomalous" if verdict.anomalous else "normal").inc()
            if not verdict.anomalous and previous is None:
                return None
            status = "final"
        else:
            if not verdict.anomalous:
                return None
            status = "update" if previous else "open"
        alert = self._build(name, version, window, verdict, status, previous, now)
        if not closed:
            self.open[slot] = alert
            if len(self.open) > self.max_alerts:       # sessions that never closed: forget the oldest
                self.open.popitem(last=False)
        if verdict.anomalous and previous is None:
            metrics.ANOMALIES.labels(alert.hosts[0] if alert.hosts else "", name).inc()
            metrics.ANOMALOUS_TEMPLATES.labels(name, alert.first_anomaly.template_id).inc()
        metrics.ALERTS.labels(name, status).inc()
        return alert

    def _key(self, template_id: str, probability: float | None = None, known: dict | None = None) -> ExpectedKey:
        # known: texts the detector has for keys this stream has not shown yet (its vocabulary)
        text = self.texts.get(template_id) or (known or {}).get(template_id)
        return ExpectedKey(template_id=template_id, template=text, probability=probability)

    def _build(self, name, version, window: Window, verdict: Verdict, status, previous: Alert | None,
               now: float) -> Alert:
        # Positions count the context Steps first, then the full events (as to_sequence lists
        # them); detectors judge only from judge_from (the newest event of a sliding window), so
        # the anomalous event is a full one.
        events, skipped = window.events, len(window.context)
        last = skipped + len(events) - 1
        if verdict.anomalies:
            first = verdict.anomalies[0]
            pos = max(skipped, min(first.position, last))   # position last + 1 = the session end
            kind, expected, observed = first.kind, first.expected, first.observed
            details = dict(first.details)
        else:                                               # a cleared alert: nothing anomalous
            pos, kind, expected, observed, details = last, "none", [], events[-1].template_id, {}
        details.update({k: v for k, v in verdict.details.items() if k not in details})
        event: ParsedEvent = events[pos - skipped]
        anomaly_event = event if previous is None or status == "final" else None
        if anomaly_event is None:      # an update keeps the first anomalous event of the alert
            first_event = previous.first_anomaly
        else:
            first_event = AlertEvent(position=window.first_index + pos, template_id=event.template_id,
                                     template=event.template, message=event.message,
                                     timestamp=event.timestamp, source=event.source)
        count = (previous.anomalies + 1) if previous and status != "final" else max(1, len(verdict.anomalies))
        return Alert(
            alert_id=stable_id(name, session_id(window)), status=status, detector=name,
            model_version=version, key=window.key,
            hosts=sorted(set(window.hosts) | set(previous.hosts if previous else [])),
            anomalous=verdict.anomalous,
            severity="critical" if status == "final" and verdict.anomalous else ("warning" if verdict.anomalous else "info"),
            score=float(verdict.score), kind=kind, first_anomaly=first_event,
            expected=[self._key(k, p, details.get("expected_templates")) for k, p in expected],
            observed=self._key(observed),
            window=[self._key(k) for k in _keys(window)[max(0, pos - 10):pos]],
            anomalies=count, event_time=event.timestamp, detection_time=now, details=details,
            sequence=key_sequence(window))
