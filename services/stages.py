"""The dataflow, in one place: which topic feeds which stage and what comes out.

  logs
    logs.<host>  (LOGS_PATTERN)  --parse-->     EVENTS_TOPIC   key = session key (blk_..., application_..., else host);
                                                               + a Watermark per source to every partition
    EVENTS_TOPIC                 --sessions-->  ALERTS_TOPIC   key = alert id   (DeepLog, ATT-GRU: judged in event time)
                                            --> WINDOWS_TOPIC  key = session key (closed session / time windows;
                                                                sliding windows when LOGWARDEN_SLIDING_WINDOWS)
  traces, metrics, logs of services (the Collector's Kafka exporter, otlp_proto or otlp_json)
    OTLP_SPANS_TOPIC             --otlp------>  SPANS_TOPIC    key = trace id   (SpanGroup: a record's spans of one trace)
    OTLP_METRICS_TOPIC           --otlp------>  TIMELINE_TOPIC key = entity     (MetricSample per pod / host and time)
    OTLP_LOGS_TOPIC              --otlp------>  TIMELINE_TOPIC key = entity     (LogSample: template ids by the parse core)
    SPANS_TOPIC                  --assemble-->  TRACES_TOPIC   key = trace id   (one complete trace, in event time)
                                            --> TIMELINE_TOPIC key = entity     (TraceSample per pod and step; Watermark)
    TIMELINE_TOPIC               --join------>  CHUNKS_TOPIC   key = entity     (ChunkRecord per entity and step)
    TRACES_TOPIC + CHUNKS_TOPIC  --detect-->    ALERTS_TOPIC   key = alert id   (TraceLSTM per trace, AnoFusion
                                                                per chunk; per-entity episodes)
  every modality
    FEEDBACK_TOPIC               --feedback-->  a new model version in MODEL_DIR (workers reload it)
    any bad record / output      ------------>  DEADLETTER_TOPIC (head of the bytes + size + sha256 + reason)
    every stateful stage         <----------->  <group>-changelog (compacted): its partition state

A log line crosses the broker once after parsing: the sessions stage keeps each open session's
events (and so the h keys DeepLog judges the next one from) as partition state, and judges every
event as the watermark releases it, in event-time order.

Each stage below is a thin adapter from a batch of Kafka `Record`s to a pure core
(services.cores: parse, dedup, sessions, detect, otlp, traces, join, score, feedback), run by the one shell
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
from services.records import (WATERMARK_KEY, Feedback, FilebeatDoc, ParsedEvent, Source, SpanGroup, TimelineItem,
                              Watermark, decoder, encode)
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
        # the compiled hot path for lines of shapes the core has seen (None: Python does all)
        self._hot = self.core.hot_events() if settings.native_parse else None
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
        parse, lines, marks_of, hot = self.core.parse, self._lines, self.marks, self._hot
        decode_filebeat, control = _filebeat.decode, _CONTROL.search
        timed_every = LATENCY_SAMPLE
        for rec in batch:
            try:
                value = rec.value
                if not value:
                    out.append(Reject(rec, "empty", "record has no value"))
                    continue
                if len(value) > max_record:
                    out.append(Reject(rec, "record_too_large", f"record of {len(value)} bytes > LOGWARDEN_MAX_LINE_BYTES + envelope"))
                    continue
                try:
                    doc = decode_filebeat(value)
                except (msgspec.DecodeError, RecursionError):    # (ValidationError is a DecodeError)
                    out.append(Reject(rec, *classify_envelope(value)))   # the same decoder again: why it failed
                    continue
                message = doc.message.rstrip("\r\n")
                if len(message) > max_line:
                    out.append(Reject(rec, "line_too_long", f"line of {len(message)} characters > LOGWARDEN_MAX_LINE_BYTES"))
                    continue
                if control(message) is not None and looks_binary(message):   # control(): one C-level scan
                    out.append(Reject(rec, "binary", "line holds NUL or control bytes"))
                    continue
                if len(message) > max_tokens and message.count(" ") > max_tokens:
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
                self._sample += 1
                timed = self._sample % timed_every == 0     # a histogram observation costs as much as a parse
                started = time.perf_counter() if timed else 0.0
                got = hot(message, host, rec.topic, rec.partition, rec.offset, path, file_offset,
                          rec.timestamp_ms) if hot is not None else None
                if got is not None:                      # the compiled path: the same bytes as below
                    ts, events = got
                    out += [Out(topic, value, key, rec) for value, key in events]
                else:
                    source = Source(host=host, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                                    file_path=path, file_offset=file_offset,
                                    kafka_timestamp=rec.timestamp_ms / 1000 if rec.timestamp_ms > 0 else None)
                    try:
                        parsed = parse(message, host, source, doc.timestamp.timestamp())
                    except ParseError as err:
                        out.append(Reject(rec, err.reason, err.detail))
                        continue
                    out += [Out(topic, encode(ev), ev.key, rec) for ev in parsed]     # all or none of them
                    ts = parsed[0].timestamp if parsed else None
                if timed:
                    metrics.PARSE_SECONDS.observe(time.perf_counter() - started)
                lines[host] = lines.get(host, 0) + 1
                if ts is not None:
                    state = self._sources.get(tp)
                    if state is None:
                        state = self._sources[tp] = [None, 0.0, 0.0, True, False, False]
                    if state[0] is None or ts > state[0]:
                        state[0] = ts
                    state[1], state[3], state[4], state[5] = time.monotonic(), True, False, False
            except Exception as err:    # a bug must not stop the stream, nor lose the batch's other lines
                # (the shell's record-by-record retry would find them marked as seen by the dedup marks)
                log.exception("parse: failed on %s[%d]@%d", rec.topic, rec.partition, rec.offset)
                out.append(Reject(rec, "stage_error", f"{type(err).__name__}: {err}"))
        out += self._watermarks(time.monotonic())
        return out

    WATERMARK_EVERY_S = 0.02     # a source's progress is sent at most this often
    EMPTY_SIBLING_IDLE_S = 1.0   # an empty partition of a topic whose host ships (_watermarks)

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
        # A host's shipper keys its records by file (Filebeat), so most partitions of its topic
        # never get a line: a partition with nothing while a sibling has lines is not a shipper
        # in backoff, and waits only EMPTY_SIBLING_IDLE_S (not source_idle_s) before it stops
        # holding the watermark back. A topic with no line at all waits the full source_idle_s:
        # its host may just be starting.
        shipping = {topic for (topic, _), state in self._sources.items() if state[0] is not None}
        for (topic, partition), state in self._sources.items():
            ts, last_line, sent, pending, idle, at_end = state
            quiet_for = idle_after if ts is not None or topic not in shipping else self.EMPTY_SIBLING_IDLE_S
            if pending and mono - sent >= self.WATERMARK_EVERY_S:
                mark = Watermark(source=f"{topic}:{partition}", ts=ts)
                state[2], state[3] = mono, False
            elif not pending and not idle and at_end and not held and mono - last_line >= quiet_for:
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
class PartitionBooks:
    """One book (a pure core that holds state) per input partition, as the shell's StatefulCore
    calls want it: restored from the changelog on assign (a book that cannot be restored starts
    empty, said in the log), dropped on revoke, its changes and entries handed to the changelog.
    A stage says how to make a book (``_new_book``), how to restore one and which error means
    its saved state is unusable; ``BUFFERS_INPUT``: the book holds input it has not turned into
    state yet (the sessions' reorder buffer), so it says how far the offset may be committed."""
    name: str
    BUFFERS_INPUT = False
    books: dict[TP, object]

    def _new_book(self, tp: TP):
        raise NotImplementedError

    def _state_error(self) -> type[Exception]:
        raise NotImplementedError

    def _restore(self, book, entries: dict[bytes, bytes], committed: int | None) -> int | None:
        book.restore(entries)
        return None

    def _book(self, tp: TP):
        book = self.books.get(tp)
        if book is None:                           # assigned without the callback (manual assign in tests)
            book = self.books[tp] = self._new_book(tp)
        return book

    def assign(self, tp: TP, entries: dict[bytes, bytes], committed: int | None) -> int | None:
        book = self.books[tp] = self._new_book(tp)
        try:
            resume = self._restore(book, entries, committed)
        except self._state_error() as err:
            log.error("%s: %s[%d]: %s; starting empty", self.name, tp[0], tp[1], err)
            self.books[tp] = self._new_book(tp)
            resume = None
        self._assigned(tp)
        return resume

    def _assigned(self, tp: TP) -> None:
        pass

    def revoke(self, tp: TP) -> None:
        self.books.pop(tp, None)
        self._revoked(tp)

    def _revoked(self, tp: TP) -> None:
        pass

    def changes(self) -> dict[TP, dict[bytes, bytes | None]]:
        return {tp: book.changes() for tp, book in self.books.items()}

    def entries(self, tp: TP) -> dict[bytes, bytes]:
        book = self.books.get(tp)
        return book.entries() if book else {}

    def commit_offset(self, tp: TP, processed: int) -> int:
        book = self.books.get(tp) if self.BUFFERS_INPUT else None
        return book.commit_offset(processed) if book else processed

    def hold_idle(self, now: float) -> None:
        """The shell says input stopped because the broker is away: not an idle source."""
        for book in self.books.values():
            book.hold(now)


# sessions: events -> alerts (+ windows). Window and detect on one partitioning: each open
# session's events are this stage's partition state, judged where they are kept.
class SessionsStage(PartitionBooks):
    name = "sessions"
    BUFFERS_INPUT = True            # the reorder buffer: committed up to its oldest event
    dead_letter_reasons = ("bad_event", "bad_watermark")

    def __init__(self, settings: Settings):
        from services.cores.detect import ModelSet, SessionJudge

        self.settings = settings
        self.config = settings.session_config()
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
        self.last_input = now
        super().hold_idle(now)

    # -- partition state (PartitionBooks) -------------------------------------------------
    def _new_book(self, tp: TP):
        from services.cores.sessions import SessionBook

        return SessionBook(self.config)

    def _state_error(self) -> type[Exception]:
        from services.cores.sessions import StateError

        return StateError

    def _restore(self, book, entries: dict[bytes, bytes], committed: int | None) -> int | None:
        return book.restore(entries, committed)

    def _assigned(self, tp: TP) -> None:
        self._export()

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

        outs: list[Out | Reject] = []
        if not actions:
            return outs
        alerts = self._judge(actions, outs)
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

    def _judge(self, actions, rejects: list) -> list:
        """The judge's alerts on actions the book has released. A judge that raises (a model bug,
        an input no model expected) must not cost the other actions their verdicts: the book has
        already let them go, so the shell's record-by-record retry would take their events as
        duplicates. Each action is judged again alone (the judge scores with every model before it
        changes any session's alert state), and an action it still raises on is dead-lettered."""
        try:
            return self.judge.judge(actions)
        except Exception:
            log.exception("sessions: judging %d actions failed; judging them one at a time", len(actions))
        alerts = []
        for a in actions:
            try:
                alerts += self.judge.judge([a])
            except Exception as err:      # this action's verdict is lost: say so where it can be found
                log.exception("sessions: judging session %s failed", a.session.key)
                rejects.append(Reject(self._action_record(a), "stage_error", f"judge: {type(err).__name__}: {err}"))
        return alerts

    def _action_record(self, a) -> Record:
        """A dead letter's record for an action: a released event names its line (the logs.<host>
        record), a closed session its events' first line. The value says which session and event
        (the letter's size and sha256 are of this description: the stage never held that record's
        bytes, only the event parsed from it)."""
        from services.cores.sessions import Released

        step = a.step if type(a) is Released else (a.steps[0] if a.steps else None)
        value = {"session": a.session.key, "session_id": a.session.session_id,
                 "action": "event" if type(a) is Released else "session_end"}
        if type(a) is Released:
            value |= {"event_id": a.event_id, "index": a.index, "template_id": step.template_id,
                      "message": a.message}
        else:
            value |= {"events": len(a.steps), "reason": a.reason}
        return Record(step.topic if step else self.settings.events_topic, step.partition if step else -1,
                      step.offset if step else -1, a.session.key.encode("utf-8", "surrogatepass"),
                      msgspec.json.encode(value), 0)

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
                   session_id=r.session.session_id, event=event,
                   first_index=r.session.before + r.index - len(r.history))
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
# assemble: spans (SpanGroups keyed by trace id) -> traces (one TraceRecord per trace, keyed by
# trace id) + timeline (TraceSamples keyed by pod), and the partition's trace frontier as a
# Watermark to every timeline partition (after the samples it covers): the join cuts a step only
# once every trace that started in it has closed. Core: services.cores.traces.
class AssembleStage(PartitionBooks):
    name = "assemble"
    dead_letter_reasons = ("bad_spans", "bad_span", "bad_watermark")
    MARK_EVERY_S = 0.2          # a moved frontier is sent at most this often ...
    MARK_HEARTBEAT_S = 5.0      # ... and an unmoved one this often, at most a third of host_idle_s:
    #                             the join drops a writer silent for host_idle_s, so a heartbeat at
    #                             5 s with host_idle_s=3 s let it cut steps a held frontier still covered

    def __init__(self, settings: Settings):
        from services.cores.traces import TraceConfig

        self.settings = s = settings
        self.config = TraceConfig(trace_gap_s=s.trace_gap_s, root_wait_s=s.trace_root_wait_s,
                                  max_open_traces=s.max_open_traces, allowed_lateness_s=s.trace_lateness_s,
                                  source_idle_s=s.host_idle_s, grace_s=s.watermark_grace_s, step_s=s.step_s)
        self.books: dict[TP, object] = {}
        self._decode = decoder(SpanGroup).decode
        self._decode_mark = decoder(Watermark).decode
        self._timeline_partitions = s.topic_partitions
        self._sent: dict[TP, tuple[float, object]] = {}      # tp -> (monotonic sent, what was sent)
        self._quiet_since: dict[TP, float] = {}              # tp -> monotonic of assignment, while it has no input
        self._late_seen = 0

    # -- partition state (PartitionBooks) -------------------------------------------------
    def _new_book(self, tp: TP):
        from services.cores.traces import TraceAssembler

        return TraceAssembler(self.config, name=f"{tp[0]}:{tp[1]}")

    def _state_error(self) -> type[Exception]:
        from services.cores.traces import StateError

        return StateError

    def _assigned(self, tp: TP) -> None:
        self._sent.pop(tp, None)          # announced at the next batch or tick
        self._quiet_since[tp] = time.monotonic()

    def _revoked(self, tp: TP) -> None:
        self._sent.pop(tp, None)
        self._quiet_since.pop(tp, None)

    def output_partitions(self, counts: dict[str, int]) -> None:
        self._timeline_partitions = counts.get(self.settings.timeline_topic) or self._timeline_partitions

    # -- records --------------------------------------------------------------------------
    def process(self, batch: list[Record]) -> list[Out | Reject]:
        from services.cores.traces import SpanInputError

        out: list[Out | Reject] = []
        now = time.time()
        touched: set[TP] = set()
        for rec in batch:
            tp = (rec.topic, rec.partition)
            book = self._book(tp)
            touched.add(tp)
            self._quiet_since.pop(tp, None)
            try:
                if rec.key == WATERMARK_KEY:
                    mark = self._decode_mark(rec.value or b"")
                    book.mark(mark.source, mark.ts, mark.idle, now)
                    continue
                book.add(self._decode(rec.value or b""), now, fallback_source=f"{rec.topic}:{rec.partition}")
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
                out.append(Reject(rec, "bad_watermark" if rec.key == WATERMARK_KEY else "bad_spans", str(err)[:300]))
            except SpanInputError as err:
                out.append(Reject(rec, err.reason, err.detail))
        for tp in sorted(touched):
            out += self._closed(self.books[tp].advance(now))
        out += self._marks(time.monotonic())
        return out

    def _closed(self, closed) -> list[Out]:
        traces, timeline = self.settings.traces_topic, self.settings.timeline_topic
        outs: list[Out] = []
        for c in closed:
            metrics.TRACES_CLOSED.labels(c.trace.closed_reason).inc()
            outs.append(Out(traces, encode(c.trace), c.trace.trace_id))
            outs += [Out(timeline, encode(s), s.entity) for s in c.samples]
        return outs

    def _marks(self, mono: float) -> list[Out]:
        """Each partition's frontier to every timeline partition, when it moved (or as a heartbeat)."""
        import math

        out: list[Out] = []
        heartbeat_s = min(self.MARK_HEARTBEAT_S, self.settings.host_idle_s / 3)
        for tp, book in sorted(self.books.items()):
            frontier = book.frontier()
            # A partition that has had no input at all since it was assigned knows nothing of
            # upstream progress: it holds the join for host_idle_s (spans may be on their way),
            # then says it is idle, as a silent source does.
            quiet = self._quiet_since.get(tp)
            idle = frontier == math.inf or (quiet is not None and not book.open_traces
                                             and mono - quiet >= self.settings.host_idle_s)
            what = "idle" if idle else (None if frontier == -math.inf else frontier)
            sent = self._sent.get(tp)
            if sent is not None:
                since, last = sent
                if (last == what and mono - since < heartbeat_s) or mono - since < self.MARK_EVERY_S:
                    continue
            self._sent[tp] = (mono, what)
            mark = Watermark(source=book.name, ts=None if idle or what is None else frontier, idle=idle)
            value = encode(mark)
            out += [Out(self.settings.timeline_topic, value, WATERMARK_KEY, None, p)
                    for p in range(self._timeline_partitions)]
        return out

    def tick(self, now: float) -> list[Out]:
        out: list[Out] = []
        for tp in sorted(self.books):
            out += self._closed(self.books[tp].advance(now))
        out += self._marks(time.monotonic())
        books = list(self.books.values())
        metrics.OPEN_TRACES.set(sum(b.open_traces for b in books))
        late = sum(b.late_spans for b in books)
        if late > self._late_seen:
            metrics.LATE_SPANS.inc(late - self._late_seen)
        self._late_seen = late
        return out

    def spec(self) -> StageSpec:
        return StageSpec(self.name, [self.settings.spans_topic], self, stateful=True, co_partitioned=True,
                         broadcast_topics=[self.settings.timeline_topic])


# ------------------------------------------------------------------------------------------
# join: timeline (MetricSample | TraceSample | LogSample keyed by entity, Watermarks) -> chunks
# (ChunkRecord per (entity, step), keyed by entity). Core: services.cores.join.
class JoinStage(PartitionBooks):
    name = "join"
    dead_letter_reasons = ("bad_timeline", "bad_watermark")

    def __init__(self, settings: Settings):
        from services.cores.join import JoinConfig

        self.settings = s = settings
        self.config = JoinConfig(step_s=s.step_s, steps=s.chunk_steps, metric_window_s=s.metric_window_s,
                                 lateness_s=s.chunk_lateness_s, source_idle_s=s.host_idle_s, grace_s=s.watermark_grace_s)
        self.books: dict[TP, object] = {}
        self._decode = decoder(TimelineItem).decode
        self._decode_mark = decoder(Watermark).decode
        self._late_seen = self._dropped_seen = 0

    # -- partition state (PartitionBooks) -------------------------------------------------
    def _new_book(self, tp: TP):
        from services.cores.join import Joiner

        return Joiner(self.config)

    def _state_error(self) -> type[Exception]:
        from services.cores.join import StateError

        return StateError

    def process(self, batch: list[Record]) -> list[Out | Reject]:
        from services.cores.join import TimelineInputError

        out: list[Out | Reject] = []
        now = time.time()
        touched: set[TP] = set()
        for rec in batch:
            tp = (rec.topic, rec.partition)
            book = self._book(tp)
            touched.add(tp)
            try:
                if rec.key == WATERMARK_KEY:
                    mark = self._decode_mark(rec.value or b"")
                    book.mark(mark.source, mark.ts, mark.idle, now)
                    continue
                book.add(self._decode(rec.value or b""), now, fallback_source=f"{rec.topic}:{rec.partition}")
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
                out.append(Reject(rec, "bad_watermark" if rec.key == WATERMARK_KEY else "bad_timeline", str(err)[:300]))
            except TimelineInputError as err:
                out.append(Reject(rec, err.reason, err.detail))
        for tp in sorted(touched):
            out += self._chunks(self.books[tp].advance(now))
        return out

    def _chunks(self, chunks) -> list[Out]:
        if chunks:
            metrics.CHUNKS.inc(len(chunks))
        topic = self.settings.chunks_topic
        return [Out(topic, encode(c), c.entity) for c in chunks]

    def tick(self, now: float) -> list[Out]:
        out: list[Out] = []
        for tp in sorted(self.books):
            out += self._chunks(self.books[tp].advance(now))
        books = list(self.books.values())
        late, dropped = sum(b.late for b in books), sum(b.dropped for b in books)
        if late - dropped > self._late_seen - self._dropped_seen:
            metrics.LATE_TIMELINE.labels("yes").inc((late - dropped) - (self._late_seen - self._dropped_seen))
        if dropped > self._dropped_seen:
            metrics.LATE_TIMELINE.labels("no").inc(dropped - self._dropped_seen)
        self._late_seen, self._dropped_seen = late, dropped
        return out

    def spec(self) -> StageSpec:
        return StageSpec(self.name, [self.settings.timeline_topic], self, stateful=True, co_partitioned=True)


# ------------------------------------------------------------------------------------------
# detect: traces and chunks -> alerts (the core is services.cores.score)
SERVED_DETECTORS = ("tracelstm", "anofusion", "hades")     # detectors of traces and chunks


class DetectStage:
    """TRACES_TOPIC + CHUNKS_TOPIC -> ScoreCore -> ALERTS_TOPIC. The newest version of each trace
    and chunk detector in MODEL_DIR is served (CUDA when present) and reloaded when a newer one
    appears; open episodes are partition state in the stage's changelog."""
    name = "detect"

    def __init__(self, settings: Settings):
        from services.cores.detect import ModelSet
        from services.cores.score import DEAD_LETTER_REASONS, ScoreCore

        self.settings = settings
        self.dead_letter_reasons = DEAD_LETTER_REASONS
        self.models = ModelSet(settings.model_dir, settings.device, modality=None, detectors=SERVED_DETECTORS)
        self.models.refresh()
        if not self.models.loaded:
            log.warning("detect: no trace or chunk model in %s yet: records wait in Kafka until one appears",
                        settings.model_dir)
        self._served: dict[str, dict] = {}
        self._group()
        self.core = ScoreCore(lambda: self._served, traces_topic=settings.traces_topic,
                              chunks_topic=settings.chunks_topic, alerts_topic=settings.alerts_topic,
                              batch_size=settings.detect_batch)
        self._last_reload = time.monotonic()

    def _group(self) -> None:
        served: dict[str, dict] = {}
        for name, (version, detector) in self.models.loaded.items():
            served.setdefault(getattr(detector, "modality", "logs"), {})[name] = (version, detector)
        self._served = served

    def ready(self) -> bool:
        return bool(self.models.loaded)

    # the shell's StatefulCore calls, passed to the core
    def assign(self, tp, entries, committed):
        return self.core.assign(tp, entries, committed)

    def revoke(self, tp) -> None:
        self.core.revoke(tp)

    def changes(self):
        return self.core.changes()

    def entries(self, tp):
        return self.core.entries(tp)

    def commit_offset(self, tp, processed: int) -> int:
        return self.core.commit_offset(tp, processed)

    def process(self, batch: list[Record]) -> list[Out | Reject]:
        return self.core.process(batch)

    def tick(self, now: float) -> list[Out]:
        if time.monotonic() - self._last_reload >= self.settings.reload_check_s:
            self._last_reload = time.monotonic()
            if self.models.refresh():
                self._group()
        return self.core.tick(now)

    def close(self) -> None:
        self.models.close()

    def spec(self) -> StageSpec:
        return StageSpec(self.name, [self.settings.traces_topic, self.settings.chunks_topic], self, stateful=True,
                         co_partitioned=False, batch_size=self.settings.detect_batch * 4)


# otlp: the OpenTelemetry Collector's Kafka exporter records -> spans (by trace id) and the
# per-entity timeline (services.cores.otlp says what is decoded and how)
class OtlpStage:
    name = "otlp"

    def __init__(self, settings: Settings):
        from services.cores.otlp import DEAD_LETTER_REASONS, OtlpCore
        from services.cores.parse import ParseConfig, ParseCore, ParseStateError, load_catalog

        self.settings = settings
        self.dead_letter_reasons = DEAD_LETTER_REASONS
        # The log bodies get the parse stage's templates: its configuration and catalog, and
        # its own miner saved locally (template ids come from template text, as in parse).
        catalog = load_catalog(settings.template_catalog) if settings.template_catalog else None
        parse_core = ParseCore(ParseConfig.load(settings.parse_config), catalog=catalog,
                               frozen=settings.freeze_templates)
        replica = settings.instance_id or socket.gethostname()
        self.miner_path = Path(settings.state_dir) / "otlp" / f"{settings.group('otlp')}-{replica}.miner"
        saved = checkpoint.load(self.miner_path)
        if saved:
            try:
                parse_core.restore(saved[0])
            except ParseStateError as err:
                log.warning("otlp: discarding the saved miner (%s)", err)
        self.core = OtlpCore({settings.otlp_spans_topic: "spans", settings.otlp_metrics_topic: "metrics",
                              settings.otlp_logs_topic: "logs"}, settings.spans_topic, settings.timeline_topic,
                             parse_core)
        self._last_miner_save = time.monotonic()
        self._logs_seen = 0

    def process(self, batch: list[Record]) -> list[Out | Reject]:
        return self.core.process(batch)

    def tick(self, now: float) -> list[Out]:
        if self.core.counters.logs != self._logs_seen and time.monotonic() - self._last_miner_save >= PARSE_CHECKPOINT_S:
            self._save_miner()
        return []

    def _save_miner(self) -> None:
        checkpoint.save(self.miner_path, self.core.parse_core.snapshot(), {})
        self._last_miner_save, self._logs_seen = time.monotonic(), self.core.counters.logs

    def close(self) -> None:
        if self.core.counters.logs:
            self._save_miner()

    def spec(self) -> StageSpec:
        s = self.settings
        return StageSpec(self.name, [s.otlp_spans_topic, s.otlp_metrics_topic, s.otlp_logs_topic], self,
                         batch_size=200, dead_letter_reasons=self.dead_letter_reasons)


# ------------------------------------------------------------------------------------------
STAGES = {"parse": ParseStage, "sessions": SessionsStage, "feedback": FeedbackStage, "otlp": OtlpStage,
          "assemble": AssembleStage, "join": JoinStage, "detect": DetectStage}
# in the order of the dataflow: `run all` starts them so
ALL_STAGES = ("parse", "sessions", "otlp", "assemble", "join", "detect", "feedback")


def build(stage: str, settings: Settings) -> StageSpec:
    try:
        return STAGES[stage](settings).spec()
    except KeyError:
        raise UsageError(f"unknown stage {stage!r}") from None


def run(stages: list[str], settings: Settings, exit_when_idle: float | None = None,
        stop: threading.Event | None = None) -> None:
    """Run stages until stopped (SIGTERM/SIGINT, `stop`, or idle for exit_when_idle seconds)."""
    stop = stop or threading.Event()
    # The Collector's topics may not exist before its first export: created here, a subscription
    # to them starts at once instead of waiting for the consumer's next metadata refresh.
    otlp_inputs = [settings.otlp_spans_topic, settings.otlp_metrics_topic, settings.otlp_logs_topic]
    ensure_topics(settings, extra=otlp_inputs if "otlp" in stages else ())
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
