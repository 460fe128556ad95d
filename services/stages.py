"""The dataflow, in one place: which topic feeds which stage and what comes out.

    logs.<host>  (LOGS_PATTERN)  --parse-->   EVENTS_TOPIC   key = session key (blk_..., else host)
    EVENTS_TOPIC                 --window-->  WINDOWS_TOPIC  key = session key
    WINDOWS_TOPIC                --detect-->  ALERTS_TOPIC   key = alert id
    FEEDBACK_TOPIC               --feedback-> new model version in MODEL_DIR (workers reload it)
    any bad record               ----------> DEADLETTER_TOPIC

Each stage below is a thin adapter from Kafka `Record`s to a pure core (services.cores: parse,
window, detect, feedback) run by the one shell (services.shell). `logwarden run all`
runs every stage in one process, each in its own thread with its own consumer group member.
"""
from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

import pydantic_core
from pydantic import ValidationError

from services import checkpoint, metrics
from services.cores.parse import ParseError
from services.cores.window import WindowInputError
from services.cores.feedback import FEEDBACK_REASONS, FeedbackError
from services.records import Feedback, FilebeatEvent, ParsedEvent, Source, Window, trusted
from services.settings import Settings, UsageError, load_settings
from services.shell import BadRecord, Out, Record, StageRunner, StageSpec, ensure_topics

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# parse: logs.<host> -> events
def classify_envelope_error(value: bytes, err: ValidationError) -> BadRecord:
    """Name why a Filebeat record was rejected, in the dead-letter vocabulary."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as bad:
        return BadRecord("not_utf8", f"invalid UTF-8 at byte {bad.start}")
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return BadRecord("not_json", f"not JSON: {first['msg']}")
    if first["type"] == "model_type":
        return BadRecord("not_json_object", "JSON value is not an object")
    where = ".".join(str(p) for p in first["loc"])
    if where == "message" and first["type"] == "missing":
        return BadRecord("missing_message", "Filebeat record has no 'message'")
    return BadRecord("bad_envelope", f"{where}: {first['msg']}")


_SOURCE_FIELDS = frozenset(Source.model_fields)
LATENCY_SAMPLE = 32     # parse latency is observed on every 32nd line
# The parser state (drain's tree, the dedup marks) is saved at most this often. It is not tied
# to input offsets (template ids come from template text), so a crash only forgets the last
# seconds of dedup marks; the window stage still drops those repeats by event id.
PARSE_CHECKPOINT_S = 10.0
_from_json = pydantic_core.from_json


def decode_filebeat(value: bytes) -> tuple[str, str, str, int, float]:
    """(message, host.name, log.file.path, log.offset, @timestamp epoch) of a Filebeat record.

    The fast path reads the fields `FilebeatEvent` requires with pydantic-core's JSON parser (the
    one the model validates with; 2.3x faster than json.loads on a Filebeat record) and type
    checks; anything it does not accept is decided by the pydantic model itself, which also names
    the reason a record is rejected. tests/test_stages.py checks that both paths agree."""
    try:
        doc = _from_json(value)
        message, host = doc["message"], doc["host"]["name"]
        log_ = doc["log"]
        path, offset, stamp = log_["file"]["path"], log_["offset"], doc["@timestamp"]
        if (type(message) is str and type(host) is str and type(path) is str and type(offset) is int
                and offset >= 0 and type(stamp) is str):
            return message, host, path, offset, datetime.fromisoformat(stamp).timestamp()
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    try:
        event = FilebeatEvent.model_validate_json(value)
    except ValidationError as err:
        raise classify_envelope_error(value, err) from None
    return event.message, event.host.name, event.log.file.path, event.log.offset, event.timestamp.timestamp()


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")   # not \t \n \r: multiline stack traces


def looks_binary(text: str) -> bool:
    """NUL or many control characters: not a log line a template can describe."""
    if _CONTROL.search(text) is None:      # the common case, one C-level scan
        return False
    return "\x00" in text or len(_CONTROL.findall(text)) > max(2, len(text) // 10)


class ParseStage:
    name = "parse"
    dead_letter_reasons = ("empty", "not_json", "not_utf8", "not_json_object", "missing_message", "bad_envelope",
                           "line_too_long", "binary", "bad_header")

    def __init__(self, settings: Settings):
        from services.cores.parse import Deduper, ParseConfig, ParseCore, ParseStateError, load_catalog

        self.settings = settings
        catalog = load_catalog(settings.template_catalog) if settings.template_catalog else None
        self.core = ParseCore(ParseConfig.load(settings.parse_config), catalog=catalog,
                              frozen=settings.freeze_templates)
        self.dedup = Deduper()
        # One file per replica: replicas scaled in one deployment share the state volume.
        replica = settings.instance_id or socket.gethostname()
        self.state_path = Path(settings.state_dir) / "parse" / f"{settings.group('parse')}-{replica}.ckpt"
        saved = checkpoint.load(self.state_path)
        if saved:
            try:
                self.restore(saved[0])
            except ParseStateError as err:   # masking or drain options changed: mine afresh
                log.warning("parse: discarding saved parser state (%s)", err)
        self._templates_seen = 0
        self._lines: dict[str, int] = {}        # host -> lines since the last tick (exported there)
        self._sample = 0
        self._last_checkpoint = time.monotonic()

    # state = miner + dedup marks; template ids are derived from template text, so a replica
    # that starts without this file still gives every template the same id.
    def snapshot(self) -> bytes:
        import json

        return json.dumps({"core": self.core.snapshot().decode(), "dedup": self.dedup.snapshot().decode()}).encode()

    def restore(self, data: bytes) -> None:
        import json

        state = json.loads(data)
        self.core.restore(state["core"].encode())
        self.dedup.restore(state["dedup"].encode())

    def checkpoint(self, offsets: dict[tuple[str, int], int], final: bool = False) -> None:
        # Called after every output so far is acknowledged (so the dedup marks saved are of
        # delivered lines only); `final` at shutdown and on revoke.
        if not final and time.monotonic() - self._last_checkpoint < PARSE_CHECKPOINT_S:
            return
        checkpoint.save(self.state_path, self.snapshot(), {f"{t}:{p}": o for (t, p), o in offsets.items()})
        self._last_checkpoint = time.monotonic()

    def handle(self, rec: Record) -> list[Out]:
        value = rec.value
        if not value:
            raise BadRecord("empty", "record has no value")
        if len(value) > self.settings.max_line_bytes + 16384:   # envelope around the line
            raise BadRecord("line_too_long", f"record of {len(value)} bytes")
        message, host, path, file_offset, event_time = decode_filebeat(value)
        message = message.rstrip("\r\n")
        if len(message) > self.settings.max_line_bytes:
            raise BadRecord("line_too_long", f"line of {len(message)} characters > LOGWARDEN_MAX_LINE_BYTES")
        if looks_binary(message):
            raise BadRecord("binary", "line holds NUL or control bytes")
        if self.dedup.seen(host, path, file_offset, message):
            metrics.DUPLICATES.labels(self.name).inc()
            return []
        source = trusted(Source, _SOURCE_FIELDS, {   # fields checked by decode_filebeat: no second validation
            "host": host, "topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
            "file_path": path, "file_offset": file_offset,
            "kafka_timestamp": rec.timestamp_ms / 1000 if rec.timestamp_ms > 0 else None})
        self._sample += 1
        timed = self._sample % LATENCY_SAMPLE == 0     # a histogram observation costs as much as a parse
        started = time.perf_counter() if timed else 0.0
        try:
            parsed = self.core.parse(message, host, source, event_time)
        except ParseError as err:
            raise BadRecord(err.reason, err.detail) from None
        if timed:
            metrics.PARSE_SECONDS.observe(time.perf_counter() - started)
        self._lines[host] = self._lines.get(host, 0) + 1
        topic = self.settings.events_topic
        return [Out(topic, ev.model_dump_json(by_alias=True).encode(), ev.key) for ev in parsed]

    def tick(self, now: float) -> list[Out]:
        self._export_counters()
        return []

    def _export_counters(self) -> None:
        for host, n in self._lines.items():       # a Counter.inc per line cost 4% of the stage
            metrics.LINES.labels(host).inc(n)
        self._lines.clear()
        stats = self.core.stats() if hasattr(self.core, "stats") else {}
        if "catalog_templates" in stats:
            metrics.TEMPLATES.labels("catalog").set(stats["catalog_templates"])
        if "mined_templates" in stats:
            mined = stats["mined_templates"]
            metrics.TEMPLATES.labels("mined").set(mined)
            if mined > self._templates_seen:
                metrics.NEW_TEMPLATES.inc(mined - self._templates_seen)
                self._templates_seen = mined
        if "unknown" in stats:
            unknown = stats["unknown"]
            delta = unknown - getattr(self, "_unknown_seen", 0)
            if delta > 0:
                metrics.UNKNOWN_LINES.inc(delta)
            self._unknown_seen = unknown

    def spec(self) -> StageSpec:
        # No seek to checkpointed offsets: the parser's state need not match its position
        # (template ids come from template text; the window stage drops repeated event ids).
        return StageSpec(self.name, [self.settings.logs_pattern], self, checkpoint=self.checkpoint)

# A window partition's whole state is written at most this often (and when its change log has
# grown larger than the state); in between, checkpoints append only what changed.
WINDOW_SNAPSHOT_S = 60.0


# ------------------------------------------------------------------------------------------
# window: events -> windows (one WindowCore per input partition: a key lives in one partition)
class WindowStage:
    name = "window"
    dead_letter_reasons = ("bad_event",)

    def __init__(self, settings: Settings):
        self.settings = settings
        self.cores: dict[tuple[str, int], object] = {}
        self.next_offset: dict[tuple[str, int], int] = {}
        self.last_input: float | None = None       # wall time of the stage's last event, any partition
        self._kinds: dict[str, int] = {}           # windows produced per kind since the last tick
        self._saved: dict[tuple[str, int], dict] = {}   # per partition: the last checkpoint written
        self.state_dir = Path(settings.state_dir) / "window" / settings.group("window")

    def _new_core(self):
        from services.cores.window import WindowCore

        s = self.settings
        return WindowCore(window_size=s.window_size, session_gap_s=s.session_gap_s,
                          session_max_events=s.session_max_events, idle_close_s=s.idle_close_s,
                          time_window_s=s.time_window_s)

    def _path(self, tp: tuple[str, int]) -> Path:
        return self.state_dir / f"{tp[0]}-{tp[1]}.ckpt"

    def on_assign(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        resume = {}
        for tp in partitions:
            core = self._new_core()
            saved = checkpoint.load(self._path(tp))
            if saved:
                changes = checkpoint.load_log(self._log_path(tp))
                # Changes older than the snapshot (a crash between writing a snapshot and
                # removing the log) are skipped by restore(); offsets only grow, so the newest
                # of all is where this state ends.
                core.restore(saved[0], [delta for delta, _ in changes])
                resume[tp] = max([saved[1]["next"], *(meta["next"] for _, meta in changes)])
                self.next_offset[tp] = resume[tp]
            self.cores[tp] = core
            self._saved.pop(tp, None)      # the next checkpoint starts with a full snapshot
        self._export_open()
        return resume

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        for tp in partitions:          # their state was checkpointed by the commit on revoke
            self.cores.pop(tp, None)
            self.next_offset.pop(tp, None)
            self._saved.pop(tp, None)

    def _log_path(self, tp: tuple[str, int]) -> Path:
        return self.state_dir / f"{tp[0]}-{tp[1]}.changes"

    def checkpoint(self, offsets: dict[tuple[str, int], int], final: bool = False) -> None:
        """At every commit (on assignment the stage seeks to the checkpointed offsets, so a rarer
        checkpoint would only mean more input to replay), but cheaply: a full snapshot now and
        then, and in between only the changes since, appended to a log. Writing the whole open
        state every second cost time in proportion to the open sessions, not to the input."""
        now = time.monotonic()
        for tp, core in self.cores.items():
            if tp not in self.next_offset:
                continue
            meta = {"next": self.next_offset[tp]}
            saved = self._saved.get(tp)
            if saved is not None and saved["version"] == core.version and saved["next"] == meta["next"]:
                continue                   # nothing changed since the last checkpoint
            if (final or saved is None or now - saved["at"] >= WINDOW_SNAPSHOT_S
                    or saved["log_bytes"] > saved["snapshot_bytes"]):
                state = core.snapshot()
                checkpoint.save(self._path(tp), state, meta)
                self._log_path(tp).unlink(missing_ok=True)
                self._saved[tp] = {"at": now, "snapshot_bytes": len(state), "log_bytes": 0}
            else:
                delta = core.changes()
                checkpoint.append(self._log_path(tp), delta, meta)
                saved["log_bytes"] += len(delta)
            self._saved[tp].update(version=core.version, next=meta["next"])

    def handle(self, rec: Record) -> list[Out]:
        try:
            event = ParsedEvent.model_validate_json(rec.value or b"")
        except ValidationError as err:
            first = err.errors()[0]
            raise BadRecord("bad_event", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        tp = (rec.topic, rec.partition)
        core = self.cores.get(tp)
        if core is None:               # assignment without callback (manual assign in tests)
            core = self.cores[tp] = self._new_core()
        self.next_offset[tp] = rec.offset + 1
        self.last_input = time.time()
        try:
            return self._outs(core.process(event, self.last_input))
        except WindowInputError as err:
            raise BadRecord("bad_event", str(err)) from None

    def tick(self, now: float) -> list[Out]:
        outs = []
        for core in self.cores.values():   # one idle clock for the stage, not one per partition
            outs.extend(self._outs(core.tick(now, stage_input_at=self.last_input)))
        self._export_open()
        return outs

    def _outs(self, windows) -> list[Out]:
        topic = self.settings.windows_topic
        outs = []
        for w in windows:
            self._kinds[w.kind] = self._kinds.get(w.kind, 0) + 1
            if w.kind == "session":
                metrics.SESSIONS_CLOSED.labels(w.closed_reason or "unknown").inc()
            outs.append(Out(topic, w.model_dump_json(by_alias=True).encode(), w.key))
        return outs

    def _export_open(self) -> None:
        for kind, n in self._kinds.items():         # counted per window, exported per tick
            metrics.WINDOWS.labels(kind).inc(n)
        self._kinds.clear()
        metrics.OPEN_SESSIONS.set(sum(c.open_sessions for c in self.cores.values()))

    def spec(self) -> StageSpec:
        return StageSpec(self.name, [self.settings.events_topic], self, on_assign=self.on_assign,
                         on_revoke=self.on_revoke, checkpoint=self.checkpoint)


# ------------------------------------------------------------------------------------------
# detect: windows -> alerts (the GPU worker; the core is services.cores.detect)
class DetectStage:
    """Kafka adapter: buffers windows of a consumed batch, scores them together in tick()."""
    name = "detect"
    dead_letter_reasons = ("bad_window",)

    def __init__(self, settings: Settings):
        from services.cores.detect import DetectCore, ModelSet    # torch: only where detect runs

        self.settings = settings
        self.models = ModelSet(settings.model_dir, settings.device)
        self.models.refresh()
        if not self.models.loaded:
            log.warning("no model in %s yet: windows are consumed only once a model appears", settings.model_dir)
        self.core = DetectCore(self.models.loaded)
        self.buffer: list[Window] = []
        self.last_check = time.monotonic()

    def ready(self) -> bool:
        return bool(self.models.loaded)

    def handle(self, rec: Record) -> list[Out]:
        try:
            window = Window.model_validate_json(rec.value or b"")
        except ValidationError as err:
            first = err.errors()[0]
            raise BadRecord("bad_window", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if window.context:
            textless = {s.template_id for s in window.context if s.template is None}.difference(window.templates)
            if textless:
                raise BadRecord("bad_window", f"templates: no text for context template id(s) {sorted(textless)}")
        self.buffer.append(window)
        return self.drain() if len(self.buffer) >= self.settings.detect_batch else []

    def drain(self) -> list[Out]:
        windows, self.buffer = self.buffer, []
        alerts = self.core.process(windows)
        topic = self.settings.alerts_topic
        outs = []
        for a in alerts:
            src = a.first_anomaly.source
            if src is not None and src.kafka_timestamp and a.status == "open":
                metrics.ALERT_LATENCY.labels(a.detector).observe(max(0.0, time.time() - src.kafka_timestamp))
            outs.append(Out(topic, a.model_dump_json(by_alias=True).encode(), a.alert_id))
        return outs

    def tick(self, now: float) -> list[Out]:
        if time.monotonic() - self.last_check >= self.settings.reload_check_s:
            self.last_check = time.monotonic()
            if self.models.refresh():
                self.core.models = self.models.loaded
        return self.drain()

    def close(self) -> None:
        """A stopped worker serves no model version any more."""
        for name, (version, _) in self.models.loaded.items():
            metrics.MODEL_VERSION.labels(name, version).set(0)

    def spec(self) -> StageSpec:
        return StageSpec(self.name, [self.settings.windows_topic], self, batch_size=self.settings.detect_batch)


# ------------------------------------------------------------------------------------------
# feedback: operator verdicts -> new model versions (the core is services.cores.feedback)
class FeedbackStage:
    """Kafka adapter: FEEDBACK_TOPIC -> FeedbackCore. Produces nothing; its output is a model
    version. Feedback that cannot be applied goes to the dead-letter topic."""
    dead_letter_reasons = ("bad_feedback", *FEEDBACK_REASONS)
    name = "feedback"

    def __init__(self, settings: Settings):
        from services.feedback import CheckedFeedback   # FeedbackCore behind the alert-id check

        self.settings = settings
        self.core = CheckedFeedback(settings)

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


# ------------------------------------------------------------------------------------------
def build(stage: str, settings: Settings) -> StageSpec:
    if stage == "parse":
        return ParseStage(settings).spec()
    if stage == "window":
        return WindowStage(settings).spec()
    if stage == "detect":
        return DetectStage(settings).spec()
    if stage == "feedback":
        return FeedbackStage(settings).spec()
    raise UsageError(f"unknown stage {stage!r}")


ALL_STAGES = ("parse", "window", "detect", "feedback")


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
    settings = load_settings()
    stages = list(ALL_STAGES) if args.stage == "all" else [args.stage]
    metrics.serve(settings.metrics_bind, settings.metrics_port)
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run(stages, settings, getattr(args, "exit_when_idle", None), stop)
    return 0
