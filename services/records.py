"""Every record that crosses a topic, in one module (pydantic v2).

    logs.<host>           FilebeatEvent   what Filebeat's Kafka output writes (ECS JSON)
    logwarden.events      ParsedEvent     one per (line, session key); Kafka key = session key
    logwarden.windows     Window          sliding | session | time; Kafka key = session key
    logwarden.alerts      Alert           Kafka key = alert id (updates reuse it)
    logwarden.deadletter  DeadLetter      original bytes + source + reason
    logwarden.feedback    Feedback        operator verdicts on alerts

Ids are deterministic (hashes of where a record came from) so a record replayed after a crash
is recognisable downstream as the same record.
"""
from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def stable_id(*parts: object, size: int = 16) -> str:
    """A short deterministic id: hex sha1 of the parts joined by NUL."""
    h = hashlib.sha1("\x00".join(str(p) for p in parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:size]


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


class Window(BaseModel):
    """A group of a key's events in event-time order.

    sliding: the newest event of an open session and up to h events before it
             (``first_index`` = index of events[0] within the session; 0 means the session start);
    session: every event of a closed session;
    time:    a host's events in [start, end) for logs with no session key.
    """
    window_id: str                 # stable_id(kind, key, first event id, last event id)
    session_id: str | None = None  # stable_id(key, the session's first event id): same for every
                                   # sliding window of a session and its closed session window
    kind: WindowKind
    key: str
    hosts: list[str]
    events: list[ParsedEvent]
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
