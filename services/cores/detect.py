"""The detect cores: verdicts -> alerts, for every modality. Pure (no Kafka); the adapters in
services.stages run them.

`SessionJudge` judges log sessions as the session book (services.cores.sessions) releases them
in event time, calling `Detector.score` — the very call evaluation makes:

  released event   -> a Sequence of the up to h events before it and the event (judge_from =
                      the event): anomalous -> alert ``open`` (the first anomaly of the session),
                      later anomalies -> ``update`` only when a new kind of anomaly appears or the
                      count doubles (2, 4, 8, ...), so a pager sees one alert per session
  closed session   -> the Sequence of the whole session (complete): the final verdict, exactly
                      evaluation's. Anomalous -> ``final``. Normal after an early alert ->
                      ``cleared`` (the early alert is retracted; only late input can cause it)

Because the book releases events in event-time order and judges each with its final history, an
early anomaly is one the final verdict holds (same event, same reason) unless input came later
than the allowed lateness; an early alert the final verdict does not hold is counted as a
retraction (logwarden_early_alerts_retracted_total). Alert ids are stable_id(detector, session
id): every record of one session and detector shares it. The judge's open-alert state lives in
the session's own state (OpenSession.alerts), so it moves with the partition.

`ModelSet` serves the newest version of each detector of a modality in MODEL_DIR and reloads
when a newer version appears (or the newest is rolled back).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec

from models import artifacts
from models.base import Detector, Sequence, Verdict, limit_cpu_threads, pick_device
from services import metrics
from services.cores.sessions import CUT_REASONS, Closed, Released, StepView
from services.records import (Alert, AlertEvent, ExpectedKey, KeySequence, Source, Step, Window,
                              stable_id, to_dict)

log = logging.getLogger(__name__)
END = "<end>"


class ModelSet:
    """The newest model version of each detector of one modality found in MODEL_DIR."""

    def __init__(self, model_dir: Path, device: str = "auto", modality: str | None = "logs",
                 detectors: tuple[str, ...] = tuple(artifacts.DETECTORS)):
        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        if self.device == "cpu":
            limit_cpu_threads()
        self.names = detectors
        self.modality = modality
        self.loaded: dict[str, tuple[str, Detector]] = {}   # name -> (version dir name, detector)
        self._other: set[str] = set()                       # versions of another modality (not served here)

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
            if (current and current[0] == newest.name) or str(newest) in self._other:
                continue
            try:
                detector = artifacts.load(newest, device=self.device)
            except Exception:
                log.exception("%s: cannot load %s; keeping the current version", name, newest)
                continue
            if self.modality is not None and getattr(detector, "modality", "logs") != self.modality:
                self._other.add(str(newest))
                continue
            if current:
                metrics.MODEL_VERSION.labels(name, current[0]).set(0)
            metrics.MODEL_VERSION.labels(name, newest.name).set(1)
            self.loaded[name] = (newest.name, detector)
            log.info("%s: serving %s on %s", name, newest, self.device)
            changed = True
        return changed

    def close(self) -> None:
        """A stopped worker serves no model version any more."""
        for name, (version, _) in self.loaded.items():
            metrics.MODEL_VERSION.labels(name, version).set(0)


# --------------------------------------------------------------------------------------------
# sequences: the one definition, for the stream and for evaluation
def steps_sequence(steps: list[StepView] | list[Step], templates: dict[str, str] | None = None, *,
                   complete: bool, start: bool, judge_from: int) -> Sequence:
    """A detector's view of events in event-time order (StepViews of the session book, or Steps
    of a published Window with its template texts)."""
    if templates is None:
        texts = [s.template for s in steps]
    else:
        texts = [s.template or templates.get(s.template_id, "") for s in steps]
    # each step's values list itself, not a copy: detectors only read a Sequence (a copy per step
    # per released event was a tenth of the sessions stage)
    return Sequence(keys=[s.template_id for s in steps], templates=texts,
                    params=[s.values for s in steps], timestamps=[s.timestamp for s in steps],
                    complete=complete, start=start, judge_from=judge_from)


def released_sequence(r: Released) -> Sequence:
    steps = [*r.history, r.step]
    # the history reaches the session's start only in its first part (a cut session goes on in another)
    start = r.index == len(r.history) and r.session.before == 0
    return steps_sequence(steps, complete=False, start=start, judge_from=len(r.history))


# A session the book closed for one of CUT_REASONS did not end: it was cut at
# LOGWARDEN_SESSION_MAX_EVENTS or dropped to bound memory (evicted). Where it stops is no event of the
# session, so its end is not judged (a model would see a session that "stopped early"). Every other
# close is its end: the gap in event time, a time window's end, idle input or the end of a finite
# input (evaluation). The part that goes on after a cut does not start where the session started
# (``OpenSession.before`` > 0; a window's ``first_index``), so it is not judged as a session's start.


def closed_sequence(c: Closed) -> Sequence:
    return steps_sequence(c.steps, complete=c.reason not in CUT_REASONS, start=c.session.before == 0, judge_from=0)


def window_sequence(window: Window) -> Sequence:
    """A published window as a detector sees it (subscribers can score windows themselves)."""
    steps = list(window.steps)
    if window.kind == "sliding" and window.event is not None:
        e = window.event
        from services.records import numeric_params
        steps.append(Step(template_id=e.template_id, timestamp=e.timestamp, values=numeric_params(e.params),
                          template=e.template))
        return steps_sequence(steps, window.templates, complete=False, start=window.first_index == 0,
                              judge_from=len(steps) - 1)
    return steps_sequence(steps, window.templates, complete=window.closed_reason not in CUT_REASONS,
                          start=window.first_index == 0, judge_from=0)


def session_window(c: Closed, time_window_s: float) -> Window:
    """A closed session (or time window) as the windows topic carries it (compact steps, each
    template text once)."""
    s = c.session
    templates: dict[str, str] = {}
    steps = []
    for v in c.steps:
        known = templates.setdefault(v.template_id, v.template)
        steps.append(Step(template_id=v.template_id, timestamp=v.timestamp, values=v.values,
                          template=None if known == v.template else v.template, host=v.host,
                          file_offset=v.file_offset))
    hosts = sorted({v.host for v in c.steps})
    kind = "time" if s.time_window else "session"
    if s.time_window:
        start, end = s.bucket, s.bucket + time_window_s
    else:
        start = c.steps[0].timestamp if c.steps else None
        end = max(v.timestamp for v in c.steps) if c.steps else None
    return Window(window_id=stable_id(kind, s.key, s.session_id, len(steps)), kind=kind, key=s.key, hosts=hosts,
                  steps=steps, templates=templates, session_id=s.session_id, closed_reason=c.reason,
                  start=start, end=end, late_events=s.late, first_index=s.before)


# --------------------------------------------------------------------------------------------
def _expected(pairs, texts) -> list[ExpectedKey]:
    return [ExpectedKey(template_id=k, template=texts.get(k), probability=p) for k, p in pairs]


def _doubling(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


# Windows and sessions remembered as normal, per detector: an entry (its key's tuple, the verdict
# and its details) is ~540 bytes for an 11-key window (tracemalloc), up to ~1 KB for a session of
# MEMO_MAX_STEPS keys: a full memo holds 27-50 MB. HDFS meets ~1,400 (bench.sessions_bench).
NORMAL_MEMO_SIZE = 50_000
MEMO_MAX_STEPS = 64            # closed sessions longer than this are not remembered


class NormalMemo:
    """The normal verdicts a detector gave the stream's released events, by what decides them.

    Nearly every released event and closed session is judged normal, and logs repeat
    themselves: HDFS's sessions meet a few hundred distinct windows, and its complete sessions
    repeat too. A detector that says which Sequence fields decide a normal verdict
    (``Detector.normal_depends_on``) is asked once per distinct window or session; one it judged
    normal before gets that verdict without a Sequence being built or a model called. Only
    normal verdicts are kept: an anomalous one is scored afresh every time, so an alert's
    details are always its own. Sessions longer than MEMO_MAX_STEPS are always scored (a key
    that long costs memory and rarely repeats). Emptied when full; a new model version starts a
    new memo."""

    def __init__(self, detector: Detector, size: int = NORMAL_MEMO_SIZE):
        depends = getattr(detector, "normal_depends_on", None)      # (a scorer may be no Detector)
        fields = depends() if depends is not None else None
        self.fields = tuple(fields) if fields is not None else None
        self.size = size
        self.verdicts: dict[tuple, Verdict] = {}
        self.hits = self.misses = 0

    @property
    def active(self) -> bool:
        return self.fields is not None and self.size > 0

    def key(self, steps: list[StepView], flags: tuple) -> tuple:
        """What decides the verdict of a sequence of ``steps``: ``flags`` (the unit, ``start``,
        ``complete``: judge_from follows from the unit) and the fields of every step."""
        if self.fields == ("keys",):
            return (*flags, *[s.template_id for s in steps])
        parts: list = [*flags, len(steps)]
        for name in self.fields:
            if name == "keys":
                parts += [s.template_id for s in steps]
            elif name == "templates":
                parts += [s.template for s in steps]
            elif name == "params":
                parts += [tuple(s.values) for s in steps]
            elif name == "timestamps":
                parts += [s.timestamp for s in steps]
            else:
                raise ValueError(f"normal_depends_on: no Sequence field {name!r}")
        return tuple(parts)

    def remember(self, key: tuple, verdict: Verdict) -> None:
        if verdict.anomalous:
            return
        if len(self.verdicts) >= self.size:
            self.verdicts.clear()
        self.verdicts[key] = verdict


class SessionJudge:
    """Early and final verdicts on log sessions, and the alert records they make."""

    def __init__(self, models: dict[str, tuple[str, Detector]], on_change=None, memo_size: int = NORMAL_MEMO_SIZE):
        self.models = models
        self.on_change = on_change or (lambda session: None)   # a session's alert state changed
        self.texts: dict[str, str] = {}                           # template id -> text (expected keys)
        self._hosts: set[tuple[str, str]] = set()                 # (host, detector) counters made
        self.memo_size = memo_size
        self._memos: dict[str, tuple[str, Detector, NormalMemo]] = {}   # name -> (version, detector, memo)

    def judge(self, actions: list[Released | Closed], now: float | None = None) -> list[Alert]:
        released = [a for a in actions if type(a) is Released]
        closed = [a for a in actions if type(a) is Closed]
        now = time.time() if now is None else now
        for r in released:
            self.texts.setdefault(r.step.template_id, r.step.template)
        # Every model's verdicts before any session's alert state changes: a detector that raises
        # leaves the state as it was, so the actions can be judged again (the sessions stage does).
        early = self._memo_verdicts(released, "event", released_sequence) if released else []
        final = self._memo_verdicts(closed, "session", closed_sequence) if closed else []
        alerts: list[Alert] = []
        for name, version, sequences, verdicts in early:
            for i, (r, verdict) in enumerate(zip(released, verdicts)):
                if verdict.anomalous:
                    seq = sequences[i] or released_sequence(r)      # (an anomalous verdict was scored)
                    alert = self._early(name, version, r, seq, verdict, now)
                    if alert is not None:
                        alerts.append(alert)
        for name, version, sequences, verdicts in final:
            for i, (c, verdict) in enumerate(zip(closed, verdicts)):
                seq = sequences[i]
                if seq is None and (verdict.anomalous or (c.session.alerts or {}).get(name)):
                    seq = sequences[i] = closed_sequence(c)         # a normal one clears an open alert
                alert = self._final(name, version, c, seq, verdict, now)
                if alert is not None:
                    alerts.append(alert)
        return alerts

    def _memo(self, name: str, version: str, detector: Detector) -> NormalMemo:
        held = self._memos.get(name)
        if held is None or held[0] != version or held[1] is not detector:
            held = self._memos[name] = (version, detector, NormalMemo(detector, self.memo_size))
        return held[2]

    def _memo_verdicts(self, actions: list, unit: str, sequence_of) -> list[tuple[str, str, list, list[Verdict]]]:
        """Every model's verdict on each action (released events, unit "event", or closed
        sessions, "session"; its Sequence: ``sequence_of``), the ones its NormalMemo holds taken
        from there, the others scored in one call. The sequences list (shared by the models)
        holds the Sequence of every action some model scored, else None (judge builds one where
        an alert needs it)."""
        sequences: list[Sequence | None] = [None] * len(actions)
        out = []
        for name, (version, detector) in self.models.items():
            memo = self._memo(name, version, detector)
            verdicts: list[Verdict | None] = [None] * len(actions)
            keys: list | None = None
            missing: list[int] | range = range(len(actions))
            if memo.active:
                if unit == "event":
                    keys = [memo.key([*r.history, r.step], ("event", r.index == len(r.history) and r.session.before == 0))
                            for r in actions]
                else:
                    keys = [memo.key(c.steps, ("session", c.session.before == 0, c.reason not in CUT_REASONS))
                            if len(c.steps) <= MEMO_MAX_STEPS else None for c in actions]
                held, missing = memo.verdicts, []
                for i, key in enumerate(keys):
                    verdict = held.get(key) if key is not None else None
                    if verdict is None:
                        missing.append(i)
                    else:
                        verdicts[i] = verdict
                memo.hits += len(actions) - len(missing)
                memo.misses += len(missing)
            if missing:
                for i in missing:
                    if sequences[i] is None:
                        sequences[i] = sequence_of(actions[i])
                started = time.perf_counter()
                scored = detector.score([sequences[i] for i in missing])
                metrics.SCORE_SECONDS.labels(name).observe(time.perf_counter() - started)
                for i, verdict in zip(missing, scored):
                    verdicts[i] = verdict
                    if keys is not None and keys[i] is not None:
                        memo.remember(keys[i], verdict)
            metrics.WINDOWS_SCORED.labels(name, unit).inc(len(actions))
            out.append((name, version, sequences, verdicts))
        return out

    # ------------------------------------------------------------------------------------
    def _count_host(self, host: str, name: str) -> None:
        if (host, name) not in self._hosts:
            # The anomaly counter of a host exists at 0 from its first window: rate() ignores a
            # series' first sample, so a series born at its first anomaly would hide it.
            self._hosts.add((host, name))
            metrics.ANOMALIES.labels(host, name)

    def _early(self, name, version, r: Released, seq: Sequence, verdict: Verdict, now: float) -> Alert | None:
        session = r.session
        state = (session.alerts or {}).get(name)
        first = verdict.anomalies[0] if verdict.anomalies else None
        kind = first.kind if first else "window"
        hosts = sorted({h.host for h in r.history} | {r.step.host} | set(state["hosts"] if state else ()))
        for h in hosts:
            self._count_host(h, name)
        if state is None:
            source = r.step.source()
            source.kafka_timestamp = r.kafka_timestamp
            state = {"first": {"position": r.index, "kind": kind, "template_id": r.step.template_id,
                               "template": r.step.template, "message": r.message, "timestamp": r.step.timestamp,
                               "source": to_dict(source),
                               "observed": first.observed if first else r.step.template_id,
                               "expected": [list(p) for p in (first.expected if first else [])],
                               "window": [s.template_id for s in r.history]},
                     "count": 1, "kinds": [kind], "hosts": hosts, "score": float(verdict.score), "updates": 0}
            session.alerts = {**(session.alerts or {}), name: state}
            self.on_change(session)
            metrics.ANOMALIES.labels(hosts[0] if hosts else "", name).inc()
            metrics.ANOMALOUS_TEMPLATES.labels(name, r.step.template_id).inc()
            status = "open"
        else:
            state["count"] += 1
            state["score"] = max(state["score"], float(verdict.score))
            state["hosts"] = hosts
            new_kind = kind not in state["kinds"]
            if new_kind:
                state["kinds"].append(kind)
            self.on_change(session)
            if not (new_kind or _doubling(state["count"])):
                return None
            state["updates"] += 1
            status = "update"
        metrics.ALERTS.labels(name, status).inc()
        return self._alert(name, version, session.key, session.session_id, status, True, state, verdict,
                           seq, now, complete=False)

    def _final(self, name, version, c: Closed, seq: Sequence, verdict: Verdict, now: float) -> Alert | None:
        session = c.session
        state = (session.alerts or {}).get(name)
        metrics.SESSIONS_JUDGED.labels(name, "anomalous" if verdict.anomalous else "normal").inc()
        if state is not None:
            early = (state["first"]["position"], state["first"]["kind"])
            if not any((a.position, a.kind) == early for a in verdict.anomalies) or not verdict.anomalous:
                metrics.RETRACTIONS.labels(name).inc()
        if not verdict.anomalous:
            if state is None:
                return None
            metrics.ALERTS.labels(name, "cleared").inc()
            return self._alert(name, version, session.key, session.session_id, "cleared", False, state, verdict,
                               seq, now, complete=True)
        hosts = sorted({v.host for v in c.steps})
        for h in hosts:
            self._count_host(h, name)
        if state is None:
            metrics.ANOMALIES.labels(hosts[0] if hosts else "", name).inc()
        confirmed = state is not None and any((a.position, a.kind) == (state["first"]["position"], state["first"]["kind"])
                                              for a in verdict.anomalies)
        if not confirmed:
            first = verdict.anomalies[0] if verdict.anomalies else None
            pos = min(first.position, len(c.steps) - 1) if first else len(c.steps) - 1
            step = c.steps[pos] if c.steps else None
            at_end = first is not None and first.position >= len(c.steps)
            state = {"first": {"position": first.position if first else pos, "kind": first.kind if first else "window",
                               "template_id": END if at_end else (step.template_id if step else END),
                               "template": "the end of the session" if at_end else (step.template if step else ""),
                               # the line itself is kept only for an event judged while the session was
                               # open; the source says where to find this one
                               "message": "",
                               "timestamp": step.timestamp if step else 0.0,
                               "source": to_dict(step.source()) if step else None,
                               "observed": first.observed if first else "",
                               "expected": [list(p) for p in (first.expected if first else [])],
                               "window": [s.template_id for s in c.steps[max(0, pos - 10):pos]]},
                     "count": len(verdict.anomalies), "kinds": sorted({a.kind for a in verdict.anomalies}),
                     "hosts": hosts, "score": float(verdict.score), "updates": (state or {}).get("updates", 0)}
        else:
            state = {**state, "count": max(1, len(verdict.anomalies)), "hosts": hosts, "score": float(verdict.score)}
        metrics.ALERTS.labels(name, "final").inc()
        return self._alert(name, version, session.key, session.session_id, "final", True, state, verdict,
                           seq, now, complete=True)

    def _alert(self, name, version, key, session_id, status, anomalous, state, verdict: Verdict, seq: Sequence,
               now: float, complete: bool) -> Alert:
        f = state["first"]
        src = f.get("source")
        source = msgspec.convert(src, Source) if src else None
        first = verdict.anomalies[0] if verdict.anomalies else None
        details = dict(first.details) if first else {}
        details.update({k: v for k, v in verdict.details.items() if k not in details})
        texts = self.texts
        known = details.get("expected_templates") or {}
        expected = [ExpectedKey(template_id=k, template=texts.get(k) or known.get(k), probability=p)
                    for k, p in f["expected"]]
        severity = ("critical" if status == "final" else "warning") if anomalous else "info"
        keys = seq.keys
        templates = dict(zip(keys, seq.templates or []))
        return Alert(
            alert_id=stable_id(name, session_id), status=status, detector=name, model_version=version, key=key,
            hosts=state["hosts"], anomalous=anomalous, severity=severity, score=float(verdict.score),
            kind=f["kind"],
            first_anomaly=AlertEvent(position=f["position"], template_id=f["template_id"], template=f["template"],
                                     message=f["message"], timestamp=f["timestamp"], source=source),
            observed=ExpectedKey(template_id=f["observed"], template=texts.get(f["observed"])),
            expected=expected, window=[ExpectedKey(template_id=k, template=texts.get(k)) for k in f["window"][-10:]],
            anomalies=state["count"], event_time=f["timestamp"], detection_time=now, details=details,
            sequence=KeySequence(keys=list(keys), start=seq.start, complete=complete, templates=templates))
