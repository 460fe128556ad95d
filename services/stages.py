"""The dataflow, in one place: which topic feeds which stage and what comes out.

    logs.<host>  (LOGS_PATTERN)  --parse-->     EVENTS_TOPIC   key = session key (blk_..., application_..., else host)
    EVENTS_TOPIC                 --sessions-->  ALERTS_TOPIC   key = alert id   (DeepLog, ATT-GRU: judged in event time)
                                            --> WINDOWS_TOPIC  key = session key (closed session / time windows;
                                                                sliding windows when LOGWARDEN_SLIDING_WINDOWS)
    FEEDBACK_TOPIC               --feedback-->  a new model version in MODEL_DIR (workers reload it)
    any bad record / output      ------------>  DEADLETTER_TOPIC (head of the bytes + size + sha256 + reason)
    every stateful stage         <----------->  <group>-changelog (compacted): its partition state

A log line crosses the broker once after parsing: the sessions stage keeps each open session's
events (and so the h keys DeepLog judges the next one from) as partition state, and judges every
event as the watermark releases it, in event-time order.

Each stage below is a thin adapter from a batch of Kafka `Record`s to a pure core
(services.cores: parse, dedup, sessions, detect, feedback), run by the one shell
(services.shell). `logwarden run all` runs every stage in one process, each in its own thread
with its own consumer group member.
"""
from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
from pathlib import Path

import msgspec

from services import checkpoint, metrics
from services.cores.dedup import FileMarks
from services.cores.feedback import FEEDBACK_REASONS, FeedbackError
from services.records import WATERMARK_KEY, Feedback, FilebeatDoc, ParsedEvent, Source, Watermark, decoder, encode
from services.settings import Settings, UsageError, load_settings
from services.shell import Out, Record, Reject, StageRunner, StageSpec, ensure_topics

log = logging.getLogger(__name__)
TP = tuple[str, int]


# ------------------------------------------------------------------------------------------
# parse: logs.<host> -> events
_filebeat = decoder(FilebeatDoc)


def classify_envelope(value: bytes) -> tuple[str, str] | FilebeatDoc:
    """The decoded Filebeat record, or (reason, detail) naming why it is not one, in the
    dead-letter vocabulary (each reason is a counter in /metrics)."""
    try:
        return _filebeat.decode(value)
    except RecursionError:
        return "too_deep", "JSON nested deeper than the decoder follows"
    except msgspec.ValidationError as err:
        # msgspec checks fields as it reads: a record can fail a field check before the decoder
        # reaches what makes it no JSON at all ("{}}" is "missing message" to it). Only on this
        # error path is it read again, untyped, to tell the two apart.
        try:
            msgspec.json.decode(value)
        except RecursionError:
            return "too_deep", "JSON nested deeper than the decoder follows"
        except msgspec.DecodeError as not_json:
            return _not_json(not_json)
        return _invalid_field(str(err))
    except msgspec.DecodeError as err:          # (ValidationError is one too: caught above)
        return _not_json(err)


def _invalid_field(text: str) -> tuple[str, str]:
    if text.startswith("Expected `object`, got") and " - at `$" not in text:    # the document itself
        return "not_json_object", f"JSON value is not an object ({text.removeprefix('Expected `object`, got ')})"
    if "missing required field `message`" in text and "$." not in text:
        return "missing_message", "Filebeat record has no 'message'"
    if "$.log.offset" in text:
        return "bad_offset", f"log.offset: {text.split(' - at ')[0]}"
    if "$.@timestamp" in text:
        return "bad_timestamp", f"@timestamp: {text.split(' - at ')[0]}"
    if "$.message" in text:
        return "bad_message", f"message: {text.split(' - at ')[0]}"
    if "$.host" in text or "missing required field `host`" in text:
        return "bad_host", f"host.name: {text[:120]}"
    return "bad_envelope", text[:200]


def _not_json(err: msgspec.DecodeError) -> tuple[str, str]:
    text = str(err)
    if "UTF-8" in text:
        return "not_utf8", "invalid UTF-8"
    if "truncated" in text:
        return "truncated_json", "the JSON ends before it is complete"
    return "not_json", f"not JSON: {text[:120]}"


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")   # not \t \n \r: multiline stack traces


def looks_binary(text: str) -> bool:
    """NUL or many control characters: not a log line a template can describe."""
    if _CONTROL.search(text) is None:      # the common case, one C-level scan
        return False
    return "\x00" in text or len(_CONTROL.findall(text)) > max(2, len(text) // 10)


LATENCY_SAMPLE = 32     # parse latency is observed on every 32nd line
# The miner (drain's tree of mined templates) is saved locally at most this often: template ids
# come from template text, so a replica without it still gives every template the same id.
PARSE_CHECKPOINT_S = 10.0


class ParseStage:
    name = "parse"
    dead_letter_reasons = ("empty", "record_too_large", "not_json", "truncated_json", "not_utf8", "too_deep",
                           "not_json_object", "missing_message", "bad_message", "bad_host", "bad_offset",
                           "bad_timestamp", "bad_envelope", "line_too_long", "too_many_tokens", "binary",
                           "bad_header")

    def __init__(self, settings: Settings):
        from services.cores.parse import ParseConfig, ParseCore, ParseStateError, load_catalog

        self.settings = settings
        catalog = load_catalog(settings.template_catalog) if settings.template_catalog else None
        self.core = ParseCore(ParseConfig.load(settings.parse_config), catalog=catalog,
                              frozen=settings.freeze_templates)
        self.marks: dict[TP, FileMarks] = {}
        replica = settings.instance_id or socket.gethostname()
        self.miner_path = Path(settings.state_dir) / "parse" / f"{settings.group('parse')}-{replica}.miner"
        saved = checkpoint.load(self.miner_path)
        if saved:
            try:
                self.core.restore(saved[0])
            except ParseStateError as err:   # masking or drain options changed: mine afresh
                log.warning("parse: discarding the saved miner (%s)", err)
        self._templates_seen = 0
        self._unknown_seen = 0
        self._lines: dict[str, int] = {}        # host -> lines since the last tick (exported there)
        self._sample = 0
        self._last_miner_save = time.monotonic()
        self._max_record = settings.max_line_bytes + 16384     # the envelope around the line
        # Watermarks: per source (a logs-topic partition) the newest event time parsed, sent to
        # every events partition (services.cores.sessions explains why). The shell tells the
        # events topic's real partition count (output_partitions) before the first batch.
        self._events_partitions = settings.topic_partitions
        # tp -> [newest ts | None, last line (wall), sent (wall), pending, idle reported, read to its end]
        self._sources: dict[TP, list] = {}
        self._idle_held_until = 0.0                # monotonic: no source falls idle before it

    # -- partition state: the dedup marks (services.state) --------------------------------
    def assign(self, tp: TP, entries: dict[bytes, bytes], committed: int | None) -> int | None:
        marks = self.marks[tp] = FileMarks()
        marks.restore(entries)
        # announced before its first line: the sessions stage holds its watermark for it
        self._sources[tp] = [None, time.monotonic(), 0.0, True, False, False]
        return None

    def revoke(self, tp: TP) -> None:
        self.marks.pop(tp, None)
        self._sources.pop(tp, None)

    def changes(self) -> dict[TP, dict[bytes, bytes | None]]:
        self._save_miner()
        return {tp: m.changes() for tp, m in self.marks.items()}

    def entries(self, tp: TP) -> dict[bytes, bytes]:
        marks = self.marks.get(tp)
        return marks.entries() if marks else {}

    def commit_offset(self, tp: TP, processed: int) -> int:
        return processed

    def _save_miner(self, final: bool = False) -> None:
        if final or time.monotonic() - self._last_miner_save >= PARSE_CHECKPOINT_S:
            checkpoint.save(self.miner_path, self.core.snapshot(), {})
            self._last_miner_save = time.monotonic()

    # -- records --------------------------------------------------------------------------
    def process(self, batch: list[Record]) -> list[Out | Reject]:
        from services.cores.parse import ParseError

        out: list[Out | Reject] = []
        topic = self.settings.events_topic
        max_line, max_tokens, max_record = self.settings.max_line_bytes, self.settings.max_line_tokens, self._max_record
        parse, lines, marks_of = self.core.parse, self._lines, self.marks
        timed_every = LATENCY_SAMPLE
        for rec in batch:
            value = rec.value
            if not value:
                out.append(Reject(rec, "empty", "record has no value"))
                continue
            if len(value) > max_record:
                out.append(Reject(rec, "record_too_large", f"record of {len(value)} bytes > LOGWARDEN_MAX_LINE_BYTES + envelope"))
                continue
            doc = classify_envelope(value)
            if type(doc) is tuple:
                out.append(Reject(rec, *doc))
                continue
            message = doc.message.rstrip("\r\n")
            if len(message) > max_line:
                out.append(Reject(rec, "line_too_long", f"line of {len(message)} characters > LOGWARDEN_MAX_LINE_BYTES"))
                continue
            if looks_binary(message):
                out.append(Reject(rec, "binary", "line holds NUL or control bytes"))
                continue
            if message.count(" ") > max_tokens:
                tokens = len(message.split())
                if tokens > max_tokens:
                    out.append(Reject(rec, "too_many_tokens", f"line of {tokens} tokens > LOGWARDEN_MAX_LINE_TOKENS"))
                    continue
            host, file_ = doc.host.name, doc.log.file
            path, file_offset = file_.path, doc.log.offset
            tp = (rec.topic, rec.partition)
            marks = marks_of.get(tp)
            if marks is None:                  # assigned without the callback (tests that assign by hand)
                marks = marks_of[tp] = FileMarks()
            if marks.seen(FileMarks.file_key(host, path, file_.fingerprint or file_.inode), file_offset, message):
                metrics.DUPLICATES.labels(self.name).inc()
                continue
            source = Source(host=host, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                            file_path=path, file_offset=file_offset,
                            kafka_timestamp=rec.timestamp_ms / 1000 if rec.timestamp_ms > 0 else None)
            self._sample += 1
            timed = self._sample % timed_every == 0     # a histogram observation costs as much as a parse
            started = time.perf_counter() if timed else 0.0
            try:
                parsed = parse(message, host, source, doc.timestamp.timestamp())
            except ParseError as err:
                out.append(Reject(rec, err.reason, err.detail))
                continue
            if timed:
                metrics.PARSE_SECONDS.observe(time.perf_counter() - started)
            lines[host] = lines.get(host, 0) + 1
            for ev in parsed:
                out.append(Out(topic, encode(ev), ev.key, rec))
            if parsed:
                state = self._sources.get(tp)
                if state is None:
                    state = self._sources[tp] = [None, 0.0, 0.0, True, False, False]
                ts = parsed[0].timestamp
                if state[0] is None or ts > state[0]:
                    state[0] = ts
                state[1], state[3], state[4], state[5] = time.monotonic(), True, False, False
        out += self._watermarks(time.monotonic())
        return out

    WATERMARK_EVERY_S = 0.02     # a source's progress is sent at most this often

    def at_end(self, tp: TP) -> None:
        """The shell read ``tp`` to its end: the source may fall idle now (not while it has a
        backlog: then its hosts' lines would all come late)."""
        state = self._sources.get(tp)
        if state is not None:
            state[5] = True

    def hold_idle(self, now: float) -> None:
        """The shell says input stopped because the broker is away: the hosts did not go quiet.
        No source is called idle until ``outage_grace_s`` after the broker is back, because
        shippers reconnect with backoff (librdkafka's reconnect.backoff.max.ms is 10 s, Filebeat's
        backoff.max 60 s): calling a host idle before its shipper is back would make its backlog
        late for every session it touches."""
        mono = time.monotonic()
        self._idle_held_until = mono + self.settings.outage_grace_s
        for state in self._sources.values():
            state[1] = mono

    def output_partitions(self, counts: dict[str, int]) -> None:
        self._events_partitions = counts.get(self.settings.events_topic) or self._events_partitions

    def _watermarks(self, mono: float) -> list[Out]:
        """Watermark records of the sources that moved (or fell idle), to every events partition."""
        out: list[Out] = []
        idle_after = self.settings.source_idle_s
        held = mono < self._idle_held_until
        for (topic, partition), state in self._sources.items():
            ts, last_line, sent, pending, idle, at_end = state
            if pending and mono - sent >= self.WATERMARK_EVERY_S:
                mark = Watermark(source=f"{topic}:{partition}", ts=ts)
                state[2], state[3] = mono, False
            elif not pending and not idle and at_end and not held and mono - last_line >= idle_after:
                mark = Watermark(source=f"{topic}:{partition}", ts=ts, idle=True)
                state[4] = True
            else:
                continue
            value = encode(mark)
            out += [Out(self.settings.events_topic, value, WATERMARK_KEY, None, p) for p in range(self._events_partitions)]
        return out

    def tick(self, now: float) -> list[Out]:
        self._export_counters()
        return self._watermarks(time.monotonic())

    def close(self) -> None:
        self._save_miner(final=True)

    def _export_counters(self) -> None:
        for host, n in self._lines.items():       # a Counter.inc per line cost 4% of the stage
            metrics.LINES.labels(host).inc(n)
        self._lines.clear()
        stats = self.core.stats()
        if "catalog_templates" in stats:
            metrics.TEMPLATES.labels("catalog").set(stats["catalog_templates"])
        if "mined_templates" in stats:
            mined = stats["mined_templates"]
            metrics.TEMPLATES.labels("mined").set(mined)
            if mined > self._templates_seen:
                metrics.NEW_TEMPLATES.inc(mined - self._templates_seen)
                self._templates_seen = mined
        if "unknown" in stats:
            delta = stats["unknown"] - self._unknown_seen
            if delta > 0:
                metrics.UNKNOWN_LINES.inc(delta)
            self._unknown_seen = stats["unknown"]

    def spec(self) -> StageSpec:
        return StageSpec(self.name, [self.settings.logs_pattern], self, stateful=True, co_partitioned=False,
                         broadcast_topics=[self.settings.events_topic])


# ------------------------------------------------------------------------------------------
# sessions: events -> alerts (+ windows). Window and detect on one partitioning: each open
# session's events are this stage's partition state, judged where they are kept.
class SessionsStage:
    name = "sessions"
    dead_letter_reasons = ("bad_event", "bad_watermark")

    def __init__(self, settings: Settings):
        from services.cores.detect import ModelSet, SessionJudge
        from services.cores.sessions import SessionConfig

        self.settings = settings
        s = settings
        self.config = SessionConfig(window_size=s.window_size, session_gap_s=s.session_gap_s,
                                    session_max_events=s.session_max_events, idle_close_s=s.idle_close_s,
                                    time_window_s=s.time_window_s, allowed_lateness_s=s.allowed_lateness_s,
                                    host_idle_s=s.host_idle_s, watermark_grace_s=s.watermark_grace_s,
                                    reorder_max_events=s.reorder_max_events,
                                    max_open_sessions=s.max_open_sessions)
        self.models = ModelSet(settings.model_dir, settings.device, modality="logs")
        self.models.refresh()
        if not self.models.loaded:
            log.warning("sessions: no log model in %s yet: events wait in Kafka until one appears", settings.model_dir)
        self.judge = SessionJudge(self.models.loaded)
        self.books: dict[TP, object] = {}
        self.last_input: float | None = None       # wall time of the stage's last event, any partition
        self._last_reload = time.monotonic()
        self._decode = decoder(ParsedEvent).decode
        self._decode_mark = decoder(Watermark).decode
        self._counts: dict[str, int] = {}
        self._late_seen = self._forced_seen = 0

    def ready(self) -> bool:
        return bool(self.models.loaded)

    def hold_idle(self, now: float) -> None:
        """The shell says input stopped because the broker is away: not an idle source."""
        self.last_input = now
        for book in self.books.values():
            book.hold(now)

    def _book(self, tp: TP):
        book = self.books.get(tp)
        if book is None:                           # assigned without the callback (manual assign in tests)
            from services.cores.sessions import SessionBook

            book = self.books[tp] = SessionBook(self.config)
        return book

    # -- partition state ------------------------------------------------------------------
    def assign(self, tp: TP, entries: dict[bytes, bytes], committed: int | None) -> int | None:
        from services.cores.sessions import SessionBook, StateError

        book = self.books[tp] = SessionBook(self.config)
        try:
            resume = book.restore(entries, committed)
        except StateError as err:
            log.error("sessions: %s[%d]: %s; starting empty", tp[0], tp[1], err)
            book = self.books[tp] = SessionBook(self.config)
            resume = None
        self._export()
        return resume

    def revoke(self, tp: TP) -> None:
        self.books.pop(tp, None)

    def changes(self) -> dict[TP, dict[bytes, bytes | None]]:
        return {tp: book.changes() for tp, book in self.books.items()}

    def entries(self, tp: TP) -> dict[bytes, bytes]:
        book = self.books.get(tp)
        return book.entries() if book else {}

    def commit_offset(self, tp: TP, processed: int) -> int:
        book = self.books.get(tp)
        return book.commit_offset(processed) if book else processed

    # -- records --------------------------------------------------------------------------
    def process(self, batch: list[Record]) -> list[Out | Reject]:
        from services.cores.sessions import SessionInputError

        out: list[Out | Reject] = []
        now = time.time()
        self.last_input = now
        decode = self._decode
        by_tp: dict[TP, list[tuple[ParsedEvent, int]]] = {}
        for rec in batch:
            if rec.key == WATERMARK_KEY:
                try:
                    mark = self._decode_mark(rec.value or b"")
                    self._book((rec.topic, rec.partition)).mark(mark.source, mark.ts, mark.idle, now, rec.offset)
                except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, SessionInputError) as err:
                    out.append(Reject(rec, "bad_watermark", str(err)[:300]))
                    continue
                by_tp.setdefault((rec.topic, rec.partition), [])
                continue
            try:
                event = decode(rec.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
                out.append(Reject(rec, "bad_event", str(err)[:300]))
                continue
            book = self._book((rec.topic, rec.partition))
            try:
                actions = book.take(event, rec.offset, now)
            except SessionInputError as err:
                out.append(Reject(rec, "bad_event", str(err)))
                continue
            if actions:
                out += self._judged(actions)
            by_tp.setdefault((rec.topic, rec.partition), [])
        actions = []
        for tp in by_tp:
            actions += self._book(tp).add_batch((), now)        # release what the batch lets go
        out += self._judged(actions)
        return out

    def _judged(self, actions) -> list[Out]:
        from services.cores.detect import session_window
        from services.cores.sessions import Closed

        outs: list[Out] = []
        if not actions:
            return outs
        alerts = self.judge.judge(actions)
        topic = self.settings.alerts_topic
        wall = time.time()
        for a in alerts:
            src = a.first_anomaly.source
            if a.status == "open" and src is not None and src.kafka_timestamp:
                metrics.ALERT_LATENCY.labels(a.detector).observe(max(0.0, wall - src.kafka_timestamp))
            outs.append(Out(topic, encode(a), a.alert_id))
        windows = self.settings.windows_topic
        for action in actions:
            if type(action) is Closed:
                w = session_window(action, self.config.time_window_s)
                self._counts[w.kind] = self._counts.get(w.kind, 0) + 1
                metrics.SESSIONS_CLOSED.labels(action.reason).inc()
                outs.append(Out(windows, encode(w), w.key))
            elif self.settings.sliding_windows:
                outs.append(self._sliding(action))
        return outs

    def _sliding(self, r) -> Out:
        from services.records import Step, Window, stable_id

        steps = [Step(template_id=h.template_id, timestamp=h.timestamp, values=h.values, host=h.host,
                      file_offset=h.file_offset) for h in r.history]
        templates = {h.template_id: h.template for h in r.history}
        event = ParsedEvent(event_id=r.event_id, key=r.session.key, keys=[r.session.key], timestamp=r.step.timestamp,
                            level=None, component=None, template_id=r.step.template_id, template=r.step.template,
                            params=[], message=r.message, source=r.step.source())
        w = Window(window_id=stable_id("sliding", r.session.session_id, r.index), kind="sliding", key=r.session.key,
                   hosts=sorted({h.host for h in r.history} | {r.step.host}), steps=steps, templates=templates,
                   session_id=r.session.session_id, event=event, first_index=r.index - len(r.history))
        self._counts["sliding"] = self._counts.get("sliding", 0) + 1
        return Out(self.settings.windows_topic, encode(w), w.key)

    def tick(self, now: float) -> list[Out]:
        if time.monotonic() - self._last_reload >= self.settings.reload_check_s:
            self._last_reload = time.monotonic()
            if self.models.refresh():
                self.judge.models = self.models.loaded
        actions = []
        for book in self.books.values():   # one idle clock for the stage, not one per partition
            actions += book.tick(now, stage_input_at=self.last_input)
        outs = self._judged(actions)
        self._export()
        return outs

    def _export(self) -> None:
        for kind, n in self._counts.items():       # counted per window, exported per tick
            metrics.WINDOWS.labels(kind).inc(n)
        self._counts.clear()
        books = list(self.books.values())
        metrics.OPEN_SESSIONS.set(sum(b.open_sessions for b in books))
        metrics.REORDER_BUFFERED.set(sum(b.buffered for b in books))
        metrics.WATERMARK_LAG.set(max([b.watermark_lag() for b in books] or [0.0]))
        late = sum(b.late_events for b in books)
        forced = sum(b.forced for b in books)
        if late > self._late_seen:
            metrics.LATE_EVENTS.inc(late - self._late_seen)
        if forced > self._forced_seen:
            metrics.FORCED_RELEASES.inc(forced - self._forced_seen)
        self._late_seen, self._forced_seen = late, forced

    def close(self) -> None:
        self.models.close()

    def spec(self) -> StageSpec:
        return StageSpec(self.name, [self.settings.events_topic], self, stateful=True, co_partitioned=True,
                         batch_size=self.settings.detect_batch * 8)


# ------------------------------------------------------------------------------------------
# feedback: operator verdicts -> new model versions (the core is services.cores.feedback)
class FeedbackStage:
    """FEEDBACK_TOPIC -> FeedbackCore. Produces nothing; its output is a model version. Feedback
    that cannot be applied goes to the dead-letter topic."""
    dead_letter_reasons = ("bad_feedback", *FEEDBACK_REASONS)
    name = "feedback"

    def __init__(self, settings: Settings):
        from services.feedback import CheckedFeedback   # FeedbackCore behind the alert-id check

        self.settings = settings
        self.core = CheckedFeedback(settings)
        self._decode = decoder(Feedback).decode

    def process(self, batch: list[Record]) -> list[Out | Reject]:
        out: list[Out | Reject] = []
        for rec in batch:
            try:
                fb = self._decode(rec.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
                out.append(Reject(rec, "bad_feedback", str(err)[:300]))
                continue
            try:
                result = self.core.apply(fb)
            except FeedbackError as err:
                out.append(Reject(rec, err.reason, err.detail))
                continue
            if result["action"] != "duplicate":
                metrics.FEEDBACK.labels(fb.detector or "unknown", fb.verdict).inc()
            if result["action"] == "recorded":
                log.info("feedback on alert %s: %s %s (no model change)", fb.alert_id, fb.detector, fb.verdict)
        return out

    def tick(self, now: float) -> list[Out]:
        return []

    def spec(self) -> StageSpec:
        # Small batches: each false positive is a model update of seconds.
        return StageSpec(self.name, [self.settings.feedback_topic], self, batch_size=10)


# ------------------------------------------------------------------------------------------
STAGES = {"parse": ParseStage, "sessions": SessionsStage, "feedback": FeedbackStage}
ALL_STAGES = ("parse", "sessions", "feedback")


def build(stage: str, settings: Settings) -> StageSpec:
    try:
        return STAGES[stage](settings).spec()
    except KeyError:
        raise UsageError(f"unknown stage {stage!r}") from None


def run(stages: list[str], settings: Settings, exit_when_idle: float | None = None,
        stop: threading.Event | None = None) -> None:
    """Run stages until stopped (SIGTERM/SIGINT, `stop`, or idle for exit_when_idle seconds)."""
    stop = stop or threading.Event()
    ensure_topics(settings)
    runners = [StageRunner(settings, build(name, settings), stop) for name in stages]
    if len(runners) == 1:
        runners[0].run(exit_when_idle)
        return
    errors: list[BaseException] = []

    def target(runner: StageRunner) -> None:
        try:
            runner.run(exit_when_idle)
        except BaseException as err:   # one stage failing stops the process: restart replays
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=target, args=(r,), name=r.spec.name, daemon=True) for r in runners]
    for t in threads:
        t.start()
    # With exit_when_idle, upstream idleness must not stop downstream stages that are still
    # draining: each stage decides for itself, and `all` ends when every stage has.
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.2)
    if errors:
        raise errors[0]


def main(args) -> int:
    from services.shell import FatalStageError

    settings = load_settings()
    stages = list(ALL_STAGES) if args.stage == "all" else [args.stage]
    metrics.serve(settings.metrics_bind, settings.metrics_port)
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        run(stages, settings, getattr(args, "exit_when_idle", None), stop)
    except FatalStageError as err:
        raise UsageError(str(err)) from None
    return 0
