"""Every record that crosses a topic, in one module (pydantic v2).

    logs.<host>           FilebeatEvent   what Filebeat's Kafka output writes (ECS JSON)
    logwarden.events      ParsedEvent     one per (line, session key); Kafka key = session key
    logwarden.windows     Window          sliding | session | time; Kafka key = session key
                                          (sliding: the newest event in full + compact Steps
                                          of the h before it; session/time: full events)
    logwarden.alerts      Alert           Kafka key = alert id (updates reuse it)
    logwarden.deadletter  DeadLetter      original bytes + source + reason
    logwarden.feedback    Feedback        operator verdicts on alerts

Ids are deterministic (hashes of where a record came from) so a record replayed after a crash
is recognisable downstream as the same record.
"""
from __future__ import annotations

import base64
import hashlib
import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def stable_id(*parts: object, size: int = 16) -> str:
    """A short deterministic id: hex sha1 of the parts joined by NUL."""
    h = hashlib.sha1("\x00".join(str(p) for p in parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:size]


# BaseModel's slots, set directly: what model_construct does, minus its per-field loop.
_new_object = object.__new__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def trusted(cls: type[BaseModel], fields: frozenset[str], values: dict):
    """An instance of ``cls`` holding ``values`` (every field of ``fields``, each already of the
    right type: validated where it first arrived, or built by the caller) without validating
    again. pydantic's model_construct cost as much as parsing a line; the result equals a
    validated instance (tests/test_parse_core.py, tests/test_window_core.py)."""
    instance = _new_object(cls)
    object.__setattr__(instance, "__dict__", values)
    _set_fields_set(instance, set(fields))      # a set of its own, as pydantic gives each instance
    _set_extra(instance, None)
    _set_private(instance, None)
    return instance


# --------------------------------------------------------------------------------------------
# Filebeat (input)
class _Named(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class _LogFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str


class _Log(BaseModel):
    model_config = ConfigDict(extra="allow")
    file: _LogFile
    offset: int = Field(ge=0)


class FilebeatEvent(BaseModel):
    """The JSON document Filebeat's Kafka output writes for one line (codec.json default)."""
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    timestamp: datetime = Field(alias="@timestamp")
    metadata: dict[str, Any] = Field(default_factory=dict, alias="@metadata")
    message: str
    host: _Named
    log: _Log
    input: dict[str, Any] | None = None
    agent: dict[str, Any] | None = None
    ecs: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# Parsed events and windows
class Source(BaseModel):
    """Where a line came from: the Kafka record and the place in the host's log file."""
    model_config = ConfigDict(populate_by_name=True)

    host: str
    topic: str
    partition: int
    offset: int
    file_path: str = Field(alias="log.file.path")
    file_offset: int = Field(alias="log.offset")
    kafka_timestamp: float | None = None   # when the line was produced to logs.<host> (epoch s)


class ParsedEvent(BaseModel):
    """One log line mapped to a template, for one session key (a line naming two blocks gives
    two ParsedEvents with the same event_id and different keys)."""
    model_config = ConfigDict(populate_by_name=True)

    event_id: str                  # stable_id(host, log.file.path, log.offset): the dedup key
    key: str                       # session key: blk_..., else the host
    keys: list[str]                # every session key of the line
    timestamp: float               # event time (epoch seconds) from the log header
    level: str | None = None
    component: str | None = None
    template_id: str               # "E5" for a known template, "T<hash>" for a mined one, "unknown"
    template: str
    params: list[str] = Field(default_factory=list)
    message: str                   # the raw line (no CR/LF)
    source: Source


WindowKind = Literal["sliding", "session", "time"]
CloseReason = Literal["gap", "max_events", "idle", "time", "shutdown"]


# float() accepts a string only if, past ASCII whitespace, it starts with a digit, a sign or a
# point (or with a non-ASCII digit or space, which it converts): "blk_...", "/10.0.0.1:50010" and
# other words fail this first-character check without paying for float()'s exception.
_NUMBER_START = frozenset("0123456789+-. \t\n\r\f\v")


def numeric_params(params: list[str]) -> list[float]:
    """The numeric parameters of an event, in order: what detectors read of its params. The one
    definition for training (models.data builds sequences with services.cores.detect.to_sequence),
    sliding-window context (Step.values) and the judged event.

    A param counts when ``float()`` accepts it and the value is finite: "7", "-3", " 7", "1e5",
    "1_000", ".5" count; "nan", "inf", "1e999" (overflows) do not: a non-finite value cannot
    travel in window JSON (pydantic writes null) and would poison a parameter model's
    normalisation. Most params are not numbers (block ids, addresses): two cheap checks skip
    most of them before float() is tried."""
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


class Step(BaseModel):
    """An earlier event of a sliding window: what a detector reads of it."""
    template_id: str
    timestamp: float
    values: list[float] = Field(default_factory=list)   # its numeric parameters, in order
    # Its template text only where it differs from Window.templates[template_id] (the "unknown"
    # id of a frozen vocabulary names many texts: each such line's masked text); left out of the
    # JSON when None, so the usual step costs nothing for it.
    template: str | None = Field(default=None, exclude_if=lambda text: text is None)


class Window(BaseModel):
    """A group of a key's events.

    sliding: the newest event of an open session, in full (``events`` = [it]: the one judged,
             whose message and source an alert shows), and the up to h events before it in
             arrival order as compact ``context`` Steps, oldest first, with ``templates`` (id ->
             text) for their ids. ``first_index`` = index within the session of the window's
             first element (context[0], else events[0]); 0 means the session start.
             ``first_event_id`` is context[0]'s event id (None without context);
    session: every event of a closed session, by event time;
    time:    a host's events in [start, end) for logs with no session key, by event time.
    Session and time windows have no context.
    """
    window_id: str                 # stable_id(kind, key, first element's event id, last event id)
    session_id: str | None = None  # stable_id(key, the session's first event id): same for every
                                   # sliding window of a session and its closed session window
    kind: WindowKind
    key: str
    hosts: list[str]               # every host of the window's elements, context included
    events: list[ParsedEvent]
    context: list[Step] = Field(default_factory=list)
    templates: dict[str, str] = Field(default_factory=dict)   # template id -> text, context ids
    # The one event id of the context a window needs (for window_id): one field per window
    # rather than an event_id in each of h Steps (~30 bytes each).
    first_event_id: str | None = None
    first_index: int = 0
    closed_reason: CloseReason | None = None
    start: float | None = None
    end: float | None = None

    @property
    def host(self) -> str:
        return self.hosts[0] if self.hosts else ""


# --------------------------------------------------------------------------------------------
# Alerts, feedback, dead letters
class ExpectedKey(BaseModel):
    template_id: str
    template: str | None = None
    probability: float | None = None


class AlertEvent(BaseModel):
    """The first anomalous event of an alert, with where to find its line."""
    position: int                  # index within the session
    template_id: str
    template: str
    message: str
    timestamp: float
    source: Source | None = None


class KeySequence(BaseModel):
    """The template ids a detector judged, so feedback can teach the model that exact sequence:
    the whole session for a final alert, the sliding window for an open/update alert."""
    keys: list[str]
    start: bool = True             # keys[0] is the session's first event
    complete: bool = True          # the session is closed (its end was judged too)
    templates: dict[str, str] = Field(default_factory=dict)   # template id -> text, for new ids


class Alert(BaseModel):
    schema_version: int = SCHEMA_VERSION
    alert_id: str                  # stable_id(detector, key, first event id of the session)
    status: Literal["open", "update", "final"]
    detector: str
    model_version: str
    key: str
    hosts: list[str]
    anomalous: bool
    severity: Literal["info", "warning", "critical"]
    score: float
    kind: str                      # "key" | "parameter" | "end" | "window" ...
    first_anomaly: AlertEvent
    expected: list[ExpectedKey] = Field(default_factory=list)
    observed: ExpectedKey
    window: list[ExpectedKey] = Field(default_factory=list)   # the events before the anomaly
    anomalies: int = 1             # anomalous events seen so far in this session
    event_time: float
    detection_time: float
    details: dict[str, Any] = Field(default_factory=dict)
    sequence: KeySequence | None = None   # what was judged (feedback's online update learns it)


class Feedback(BaseModel):
    alert_id: str
    verdict: Literal["false_positive", "true_positive"]
    detector: str | None = None
    key: str | None = None
    sequence: KeySequence | None = None   # the alert's judged keys, for the online update
    time: float
    note: str | None = None
    # Who sent it (`logwarden feedback`: the SASL user, else the OS user). Kafka does not stamp
    # records with their producer's principal; who may write FEEDBACK_TOPIC at all is the ACLs'
    # business (services/security.py), this is the audit trail kept in model manifests.
    sender: str | None = None


class DeadLetter(BaseModel):
    """A record a stage could not process. ``value_b64`` is the original bytes, exactly."""
    stage: str
    reason: str                    # short machine-friendly category, e.g. "not_json"
    detail: str                    # one human line
    topic: str
    partition: int
    offset: int
    key_b64: str | None = None
    value_b64: str
    time: float

    @staticmethod
    def encode(raw: bytes | None) -> str | None:
        return None if raw is None else base64.b64encode(raw).decode("ascii")

    def original(self) -> bytes:
        return base64.b64decode(self.value_b64)
