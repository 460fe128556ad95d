"""Every record that crosses a topic, in one module, as msgspec Structs.

    logs.<host>           FilebeatDoc    what Filebeat's Kafka output writes (ECS JSON); only the
                                         fields the stream reads are declared, the rest is skipped
    logwarden.events      ParsedEvent    one per (line, session key); Kafka key = session key
                          Watermark      how far each source (logs-topic partition) has got, sent
                                         by parse to every partition; Kafka key WATERMARK_KEY
    logwarden.windows     Window         closed session | time windows (sliding windows on demand);
                                         Kafka key = session key
    logwarden.alerts      Alert          Kafka key = alert id (every record of one alert shares it)
    logwarden.deadletter  DeadLetter     head of the original bytes + size + sha256 + reason
    logwarden.feedback    Feedback       operator verdicts on alerts, with who sent them
    logwarden.spans       SpanGroup      decoded OTLP spans of one trace from one record; key = trace id
    logwarden.traces      TraceRecord    one complete trace, spans by start time; key = trace id
    logwarden.timeline    MetricSample | TraceSample | LogSample (tagged): what one modality saw of
                                         one entity (pod / host) at a time; key = entity
    logwarden.chunks      ChunkRecord    one entity over a window of steps, every modality, each
                                         masked where absent (models.base.Chunk); key = entity

Why msgspec: the hot path decodes a Filebeat record and encodes a ParsedEvent per log line.
msgspec decodes *and type-checks* a Filebeat record in ~0.9 µs where pydantic-core's untyped
JSON parse alone took 2.0 µs, and it builds records without re-validation or reaching into a
library's private slots (pydantic needed that trick). The JSON Schemas are still published
(``python -m services.alerts --write-schema`` writes schemas/*.json from these Structs; a test
fails while file and Struct disagree). pydantic stays for settings and the parse configuration.

Ids are deterministic (hashes of where a record came from) so a record replayed after a crash
is recognisable downstream as the same record.
"""
from __future__ import annotations

import base64
import hashlib
import math
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

SCHEMA_VERSION = 2
INT64_MAX = 2 ** 63 - 1
NonNegative = Annotated[int, Meta(ge=0, le=INT64_MAX)]


def stable_id(*parts: object, size: int = 16) -> str:
    """A short deterministic id: hex sha1 of the parts joined by NUL."""
    h = hashlib.sha1("\x00".join(str(p) for p in parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:size]


# --------------------------------------------------------------------------------------------
# Filebeat (input)
class FileRef(Struct):
    path: str
    fingerprint: str | None = None     # filestream's file identity (filebeat.yml: fingerprint)
    inode: str | None = None


class LogRef(Struct):
    file: FileRef
    offset: NonNegative


class HostRef(Struct):
    name: Annotated[str, Meta(min_length=1)]    # a line of no host cannot be told apart or keyed


class FilebeatDoc(Struct):
    """The JSON document Filebeat's Kafka output writes for one line (codec.json default); the
    fields logwarden reads. Filebeat also writes @metadata, input, agent, ecs and more of log.*:
    they are accepted and skipped."""
    message: str
    host: HostRef
    log: LogRef
    # Filebeat writes UTC with a Z; a time without a zone would be read in this machine's zone
    timestamp: Annotated[datetime, Meta(tz=True)] = field(name="@timestamp")


# --------------------------------------------------------------------------------------------
# Parsed events
class Source(Struct):
    """Where a line came from: the Kafka record and the place in the host's log file."""
    host: str
    topic: str
    partition: int
    offset: int
    file_path: str = field(name="log.file.path")
    file_offset: int = field(name="log.offset")
    kafka_timestamp: float | None = None   # when the line was produced to logs.<host> (epoch s)


class ParsedEvent(Struct):
    """One log line mapped to a template, for one session key (a line naming two blocks gives
    two ParsedEvents with the same event_id and different keys)."""
    event_id: str                  # stable_id(host, log.file.path, log.offset): the dedup key
    key: str                       # session key: blk_..., else the host
    keys: list[str]                # every session key of the line
    timestamp: float               # event time (epoch seconds) from the log header
    level: str | None
    component: str | None
    template_id: str               # "E5" for a known template, "T<hash>" for a mined one, "unknown"
    template: str
    params: list[str]
    message: str                   # the raw line (no CR/LF)
    source: Source


WATERMARK_KEY = b"\x00watermark"     # no session key starts with NUL


class Watermark(Struct, omit_defaults=True):
    """The parse stage's word on one of its sources (a partition of a logs topic, an ordered
    stream of one host's lines): it has parsed everything up to event time ``ts`` (None: just
    assigned, nothing yet), or it is ``idle`` (caught up, nothing arriving). Sent to every
    partition of the events topic, after the events it covers (the sessions stage's event-time
    watermark is the minimum over the active sources)."""
    source: str                    # "<topic>:<partition>"
    ts: float | None = None
    idle: bool = False


# float() accepts a string only if, past ASCII whitespace, it starts with a digit, a sign or a
# point (or with a non-ASCII digit or space, which it converts): "blk_...", "/10.0.0.1:50010" and
# other words fail this first-character check without paying for float()'s exception.
_NUMBER_START = frozenset("0123456789+-. \t\n\r\f\v")


def numeric_params(params: list[str]) -> list[float]:
    """The numeric parameters of an event, in order: what detectors read of its params. The one
    definition for training, the stream's judging and the windows it publishes.

    A param counts when ``float()`` accepts it and the value is finite: "7", "-3", " 7", "1e5",
    "1_000", ".5" count; "nan", "inf", "1e999" (overflows) do not: a non-finite value cannot
    travel in JSON and would poison a parameter model's normalisation. Most params are not
    numbers (block ids, addresses): two cheap checks skip most of them before float() is tried."""
    out = []
    isfinite = math.isfinite
    for p in params:
        first = p[:1]
        # a number has at most one "."; an IPv4 address has three
        if (first in _NUMBER_START or first > "\x7f") and p.count(".") < 2:
            try:
                value = float(p)
            except ValueError:
                continue
            if isfinite(value):
                out.append(value)
    return out


# --------------------------------------------------------------------------------------------
# Windows
WindowKind = Literal["sliding", "session", "time"]
CloseReason = Literal["gap", "max_events", "idle", "time", "shutdown", "evicted"]


class Step(Struct, omit_defaults=True):
    """One event of a window, as detectors and subscribers read it."""
    template_id: str
    timestamp: float
    values: list[float] = []           # its numeric parameters, in order
    # Its template text only where it differs from Window.templates[template_id] (the "unknown"
    # id of a frozen vocabulary names many texts: each such line's masked text).
    template: str | None = None
    host: str | None = None            # where the line came from (host, its log.offset)
    file_offset: int | None = field(default=None, name="log.offset")


class Window(Struct, omit_defaults=True):
    """A group of a key's events, in event-time order (ties broken as services.cores.sessions
    orders them, which training and evaluation share).

    session: every event of a closed session;
    time:    a host's events in [start, end) for logs with no session key (BGL style);
    sliding: (only when LOGWARDEN_SLIDING_WINDOWS is on, for subscribers) the newest event of an
             open session in full (``event``) and the up to h events before it as ``steps``;
             ``first_index`` = index within the session of steps[0].
    A session cut (``closed_reason`` max_events: longer than LOGWARDEN_SESSION_MAX_EVENTS; or evicted)
    goes on in a next part; a part's ``first_index`` is the events of the session before it.
    """
    window_id: str                 # stable_id(kind, key, session id or start, number of events)
    kind: WindowKind
    key: str
    hosts: list[str]
    steps: list[Step]
    templates: dict[str, str] = {}     # template id -> text
    session_id: str | None = None      # stable_id(key, the session's first event id)
    event: ParsedEvent | None = None   # sliding: the judged event in full
    first_index: int = 0
    closed_reason: CloseReason | None = None
    start: float | None = None
    end: float | None = None
    late_events: int = 0               # events that arrived after the watermark had passed them

    @property
    def host(self) -> str:
        return self.hosts[0] if self.hosts else ""


# --------------------------------------------------------------------------------------------
# Alerts, feedback, dead letters
class ExpectedKey(Struct, omit_defaults=True):
    template_id: str
    template: str | None = None
    probability: float | None = None


class AlertEvent(Struct, omit_defaults=True):
    """The first anomalous item of an alert (a log line, a span, a time step), with where to
    find it."""
    position: int                  # index within the session / trace / chunk
    template_id: str
    template: str
    message: str
    timestamp: float
    source: Source | None = None


class KeySequence(Struct, omit_defaults=True):
    """The template ids a detector judged, so feedback can teach the model that exact sequence:
    the whole session for a final alert, the history and the event for an open/update alert."""
    keys: list[str]
    start: bool = True             # keys[0] is the session's first event
    complete: bool = True          # the session is closed (its end was judged too)
    templates: dict[str, str] = {}     # template id -> text, for new ids


AlertStatus = Literal["open", "update", "final", "cleared"]


class Alert(Struct, omit_defaults=True):
    """One record of an alert. ``open``: the first anomaly of a session that is still open (in
    event time, so it is one the final verdict holds unless input comes later than the allowed
    lateness); ``update``: more anomalies of the same open session; ``final``: the verdict on the
    closed session (or trace, or chunk episode); ``cleared``: the closed session turned out
    normal after an early alert (late input changed the picture) — the early alert is retracted."""
    alert_id: str                  # stable_id(detector, session id): every record of one alert
    status: AlertStatus
    detector: str
    model_version: str
    key: str                       # session key, trace id, or entity
    hosts: list[str]
    anomalous: bool
    severity: Literal["info", "warning", "critical"]
    score: float
    kind: str                      # "key" | "parameter" | "end" | "window" | "structural" | ...
    first_anomaly: AlertEvent
    observed: ExpectedKey
    event_time: float
    detection_time: float
    schema_version: int = SCHEMA_VERSION
    modality: Literal["logs", "traces", "chunks"] = "logs"
    entity: str | None = None      # the pod / host an alert of traces or chunks is about
    expected: list[ExpectedKey] = []
    window: list[ExpectedKey] = []     # the events before the anomaly
    anomalies: int = 1             # anomalous events seen so far
    details: dict[str, Any] = {}
    sequence: KeySequence | None = None   # what was judged (feedback's online update learns it)


class Feedback(Struct, omit_defaults=True):
    alert_id: str
    verdict: Literal["false_positive", "true_positive"]
    time: float
    detector: str | None = None
    key: str | None = None
    sequence: KeySequence | None = None   # the alert's judged keys, for the online update
    note: str | None = None
    # Who sent it (`logwarden feedback`: the SASL user, else the OS user). Kafka does not stamp
    # records with their producer's principal; who may write FEEDBACK_TOPIC at all is the ACLs'
    # business (services/security.py), this is the audit trail kept in model manifests.
    sender: str | None = None


DEAD_LETTER_HEAD_BYTES = 16 * 1024


class DeadLetter(Struct, omit_defaults=True):
    """A record a stage could not process (or whose output could not be produced). It always
    fits the broker: it keeps the head of the original bytes, their size and sha256, and why."""
    stage: str
    reason: str                    # short machine-friendly category, e.g. "not_json"
    detail: str                    # one human line
    topic: str
    partition: int
    offset: int
    size: int                      # bytes of the original value
    sha256: str                    # of the original value
    head_b64: str                  # its first DEAD_LETTER_HEAD_BYTES bytes
    time: float
    key_b64: str | None = None     # the original key (its head, likewise)
    truncated: bool = False        # head_b64 holds less than the whole value

    @classmethod
    def of(cls, *, stage: str, reason: str, detail: str, topic: str, partition: int, offset: int,
           value: bytes | None, key: bytes | None, time: float) -> "DeadLetter":
        value = value or b""
        head = value[:DEAD_LETTER_HEAD_BYTES]
        return cls(stage=stage, reason=reason, detail=detail[:500], topic=topic, partition=partition,
                   offset=offset, size=len(value), sha256=hashlib.sha256(value).hexdigest(),
                   head_b64=base64.b64encode(head).decode("ascii"), time=time,
                   key_b64=None if key is None else base64.b64encode(key[:1024]).decode("ascii"),
                   truncated=len(head) < len(value))

    def head(self) -> bytes:
        return base64.b64decode(self.head_b64)


# --------------------------------------------------------------------------------------------
# Traces and metrics (issue 13): what the OTLP, assemble and join stages carry
class SpanRecord(Struct, omit_defaults=True):
    """One span (models.base.Span's fields): service = resource service.name, pod =
    k8s.pod.name (else host.name), operation = span name, status = OTLP status code."""
    span_id: str
    service: str
    pod: str
    operation: str
    start_ns: int
    end_ns: int
    parent_id: str | None = None       # None: a root span
    status: int | None = None          # 0 unset, 1 ok, 2 error; None: not known


class SpanGroup(Struct):
    """The spans of one trace found in one OTLP record (a trace's spans come from every service
    it crossed, in many records): re-keyed by trace id so one assemble partition sees them all."""
    trace_id: str
    spans: list[SpanRecord]
    source: str                        # "<topic>:<partition>:<offset>" of the OTLP record (replays)


class TraceRecord(Struct, omit_defaults=True):
    """A complete trace: closed when its root span has ended and no span came for the gap, in
    event time (or when the assembler had to: evicted, shutdown)."""
    trace_id: str
    spans: list[SpanRecord]            # ordered by (start_ns, span_id)
    start_ns: int
    end_ns: int
    closed_reason: Literal["complete", "gap", "evicted", "shutdown"] = "complete"
    late_spans: int = 0                # spans that came after it had closed (counted, not added)


class MetricSample(Struct, tag="metrics", omit_defaults=True):
    """Metric values of one entity at one time (a TrainTicket metric row; a scrape of a Hadoop
    daemon's /prom; a point of an OTLP gauge)."""
    entity: str
    service: str
    timestamp: float                   # epoch s the values were taken at
    values: dict[str, float | None]
    source: str = ""


class TraceSample(Struct, tag="traces", omit_defaults=True):
    """What one complete trace did on one entity in one step: the durations of its spans there
    that start in the step, and their call gaps (parent on another entity: parent duration minus
    span duration) — models.chunks' inputs of TraceStats."""
    entity: str
    service: str
    step_start: float
    trace_id: str
    durations_ms: list[float]
    gaps_ms: list[float] = []
    errors: int = 0


class LogSample(Struct, tag="logs", omit_defaults=True):
    """Log events of one entity, as the parse stage made them (template ids the sessions stage
    sees too): (event time, template id) pairs, with the texts of their ids."""
    entity: str
    service: str
    events: list[tuple[float, str]]
    templates: dict[str, str]
    source: str = ""                   # "<topic>:<partition>:<first offset>" (replays)
    levels: list[str | None] = []      # each event's log level (parse's), aligned with events; [] = not known


TimelineItem = MetricSample | TraceSample | LogSample


class TraceStatsRecord(Struct, omit_defaults=True):
    spans: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    gap_p50_ms: float | None = None
    gap_p90_ms: float | None = None
    gap_p99_ms: float | None = None


class ChunkRecord(Struct, omit_defaults=True):
    """models.base.Chunk on the wire: one entity over [start, end) in steps of step_s; absent
    modalities stay None / empty per step (never zeros)."""
    chunk_id: str                      # stable_id(entity, start, end)
    entity: str
    service: str | None
    start: float
    end: float
    step_s: float
    metrics: dict[str, list[float | None]] = {}
    traces: list[TraceStatsRecord | None] = []
    logs: list[tuple[float, str, str]] = []     # (event time, template id, template text)
    # The level of each log event, parallel to ``logs`` (empty: none known). AnoFusion counts
    # WARN/ERROR lines as a channel, so a chunk without them would be judged unlike evaluation's.
    log_levels: list[str | None] = []


# --------------------------------------------------------------------------------------------
# codec
encode = msgspec.json.Encoder().encode          # any record -> JSON bytes
DecodeError = (msgspec.DecodeError, msgspec.ValidationError)
_decoders: dict[type, msgspec.json.Decoder] = {}


def decoder(record_type: type) -> msgspec.json.Decoder:
    """One typed JSON decoder per record type (decoding validates types and constraints)."""
    found = _decoders.get(record_type)
    if found is None:
        found = _decoders[record_type] = msgspec.json.Decoder(record_type)
    return found


def decode(data: bytes, record_type: type):
    return decoder(record_type).decode(data)


def to_dict(record) -> dict:
    """A record as plain JSON values (field names as on the wire)."""
    return msgspec.to_builtins(record)


def schema(record_type: type) -> dict:
    return msgspec.json.schema(record_type)


# --------------------------------------------------------------------------------------------
# published JSON Schemas: schemas/<name>.v<SCHEMA_VERSION>.json, one per record on a topic
SCHEMAS = {"filebeat": FilebeatDoc, "event": ParsedEvent, "watermark": Watermark, "window": Window,
           "alert": Alert, "deadletter": DeadLetter, "feedback": Feedback, "spans": SpanGroup,
           "trace": TraceRecord, "timeline": TimelineItem, "chunk": ChunkRecord}


def published_schema(name: str) -> dict:
    """The JSON Schema of a record as schemas/ holds it (field names as on the wire)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://logwarden.invalid/schemas/{name}.v{SCHEMA_VERSION}.json", **schema(SCHEMAS[name])}


def write_schemas(directory) -> list:
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMAS:
        path = directory / f"{name}.v{SCHEMA_VERSION}.json"
        path.write_text(json.dumps(published_schema(name), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    from services.settings import REPO_ROOT

    if sys.argv[1:] != ["--write-schemas"]:
        sys.exit("usage: python -m services.records --write-schemas")
    for written_path in write_schemas(REPO_ROOT / "schemas"):
        print(written_path)
