"""The session book: parsed events in, in event-time order; open sessions kept where they are
judged. Pure: no Kafka, no models. One book per input partition of logwarden.events (a session
key lives in exactly one partition).

Event time, not arrival order. A session's lines come from several hosts (an HDFS block: the
namenode and three datanodes), and they arrive interleaved in whatever order the hosts shipped
them; the models learned them in event-time order. So every event waits in a reorder buffer
until the *watermark* passes it, and events are released in one order:

    watermark = min over the active *sources* of the newest event time each has reached
                - allowed lateness (LOGWARDEN_ALLOWED_LATENESS_S)
    release   every buffered event with time < watermark, ordered by EVENT_ORDER:
                (event time, host, log.file.path, log.offset)

A source is one partition of a logs topic (``logs.dn1:0``): an ordered stream, a host's log
written in time order. Its progress comes from its own events and from the *watermark records*
the parse stage sends to every partition of the events topic after each batch (as stream
processors carry watermarks across a repartition): so a partition knows how far every host has
got even when that host's lines for it are rare, and knows a host exists (parse announces each
source when it is assigned, before reading it) before its first line arrives. Once every source
has passed time t, no event at t can still come (lateness covers a host's own small disorder).
A source parse reports idle (read to its end and silent), or that sends nothing for
LOGWARDEN_HOST_IDLE_S of wall time, stops holding the watermark back. A source nobody has
announced yet cannot hold it: a host topic that parse discovers only after others have run far
ahead in event time (a backlog replayed into a topic created while parse was already running)
has its first lines counted late — they still go into the final verdicts. Host topics of a
deployment exist before parse starts, and a host that joins later ships in real time. when the whole stage has had no input for LOGWARDEN_IDLE_CLOSE_S,
everything is released and every session closes (a finished replay). Ties in the log's clock (HDFS_v1 has whole seconds) are
broken by EVENT_ORDER, and training, evaluation (models.data.sessions_from_logs) and the stream
all use it, so the sequence judged in the stream is the one judged in evaluation.

An event that arrives after the watermark passed its time is *late*: counted, put into its
session in event-time order for the final verdict, and not judged early (the history it would
have been judged with was already judged). So an early verdict only ever concerns an event whose
history is final — the reason an early alert is one the final verdict also holds.

Sessions. An event with session keys joins the open session of its key; a key quiet (in event
time) for longer than LOGWARDEN_SESSION_GAP_S closes — at the first newer event of that key, or
when the watermark passes its last event + gap; LOGWARDEN_SESSION_MAX_EVENTS closes a session too;
past LOGWARDEN_MAX_OPEN_SESSIONS the least recently active session is closed (``evicted``).
Events without a key go to per-host tumbling time windows [k*T, (k+1)*T) (BGL style), closed
when the watermark passes their end. Each release yields an action for the judge (the event with
the up to h released events before it), each close one with every event of the session.

State, small and in changelog entries (services.state). Each open session is one compact
record: its released events as msgpack rows (template index, time delta in ms, host, topic and
path indices, file offset, logs-topic partition and offset, numeric values) framed by their
length, the 8-byte event ids (duplicates are dropped), and its open alerts (set by the judge).
Strings that repeat (templates, hosts, topics, paths) live once in partition tables. Partition
meta (``next`` input offset, which offsets are still buffered, the hosts' event times) is one
more entry. The reorder buffer is not state: the commit offset stays at its oldest event, and
after a restore exactly the still-buffered offsets are consumed again (services.shell,
StatefulCore.commit_offset).
"""
from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import msgspec

from services.cores.watermark import SourceClock
from services.records import ParsedEvent, Source, numeric_params, stable_id

FORMAT = 1
_LENGTH = [bytes((n,)) for n in range(256)]
_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
MAX_VALUES = 16                 # numeric params kept per event (a row must stay < 256 bytes)
TAIL_CACHE_SESSIONS = 4096      # decoded history of this many recently active sessions
CLOSED_MEMORY = 1000            # event ids of this many recently closed sessions (late repeats)
CUT_MEMORY = 1000               # cut sessions whose next part may still come
# Closes that cut a session rather than end it: at session_max_events, or evicted to bound memory.
# Its end is not judged, and events of it that come later go on in a next part (OpenSession.before).
CUT_REASONS = frozenset({"max_events", "evicted"})

META = b"\x00M"
STRING = b"\x00S"               # + index -> string (hosts, topics, paths)
TEMPLATE = b"\x00T"             # + index -> template id \x00 template text
SESSION = b"S"                  # + session slot -> session record


def EVENT_ORDER(ts: float, host: str, path: str, file_offset: int) -> tuple:
    """The one order of events with equal times, shared by training, evaluation and the stream."""
    return (ts, host, path, file_offset)


@dataclass(frozen=True)
class SessionConfig:
    window_size: int = 10            # h: events of history the judge sees
    session_gap_s: float = 600.0
    session_max_events: int = 5000
    idle_close_s: float = 5.0
    time_window_s: float = 60.0
    allowed_lateness_s: float = 2.0
    host_idle_s: float = 30.0
    watermark_grace_s: float = 2.0   # after the book's first tick or input (assigned, restored), no release for this long
    reorder_max_events: int = 100_000
    max_open_sessions: int = 500_000

    def __post_init__(self):
        if self.window_size < 1 or self.session_max_events < 1:
            raise ValueError("window_size and session_max_events must be >= 1")
        if not (self.session_gap_s > 0 and self.idle_close_s > 0 and self.time_window_s > 0 and self.host_idle_s > 0):
            raise ValueError("session_gap_s, idle_close_s, time_window_s and host_idle_s must be > 0")
        if self.allowed_lateness_s < 0 or self.reorder_max_events < 1 or self.max_open_sessions < 1:
            raise ValueError("allowed_lateness_s must be >= 0, reorder_max_events and max_open_sessions >= 1")


class SessionInputError(ValueError):
    """An event the book cannot place (inconsistent keys, a non-finite time)."""


class StateError(ValueError):
    """Entries that are not a session book's state."""


# --------------------------------------------------------------------------------------------
# what the book hands the judge
@dataclass(slots=True)
class StepView:
    """One event as the judge and the windows topic see it."""
    template_id: str
    template: str
    timestamp: float
    values: list[float]
    host: str
    topic: str
    path: str
    file_offset: int
    partition: int
    offset: int                      # of its logs.<host> record

    def source(self) -> Source:
        return Source(host=self.host, topic=self.topic, partition=self.partition, offset=self.offset,
                      file_path=self.path, file_offset=self.file_offset)


@dataclass(slots=True)
class Released:
    """An event released in event-time order, with the up to h events of its session before it."""
    session: "OpenSession"
    index: int                       # its position in the session
    history: list[StepView]
    step: StepView
    message: str                     # its line, for an alert
    event_id: str
    kafka_timestamp: float | None


@dataclass(slots=True)
class Closed:
    """A closed session (or time window), every event in event-time order."""
    session: "OpenSession"
    steps: list[StepView]
    reason: str


class OpenSession:
    """An open session: released events as framed msgpack rows, their ids, the judge's alerts."""
    __slots__ = ("slot", "key", "sid", "first_ts", "last_ts", "rows", "ids", "n", "late",
                 "alerts", "bucket", "serial", "time_window", "before")

    def __init__(self, slot: str, key: str, session_id: str, serial: int, bucket: float | None = None):
        self.slot = slot                 # state key: the session key, or host + window start
        self.key = slot if key == slot else key   # session key (or host, for a time window)
        self.sid = bytes.fromhex(session_id)      # stable_id(...) is 16 hex digits
        self.first_ts = math.nan
        self.last_ts = -math.inf
        self.rows = bytearray()
        self.ids = bytearray()
        self.n = 0
        self.late = 0
        self.alerts: dict | None = None  # the judge's open alerts, detector -> state
        self.bucket = bucket             # time windows: their start
        self.serial = serial
        self.time_window = bucket is not None
        # Events of the same session before this part: a cut session (CUT_REASONS) goes on in a new
        # part, which does not start where the session started (not judged as a start).
        self.before = 0

    @property
    def session_id(self) -> str:
        return self.sid.hex()


def _event_id_bytes(event_id: str) -> bytes:
    """8 bytes of an event id (16 hex digits, as the parse stage makes them; else a hash)."""
    try:
        raw = bytes.fromhex(event_id)
    except ValueError:
        raw = b""
    return raw if len(raw) == 8 else hashlib.sha1(event_id.encode("utf-8", "surrogatepass")).digest()[:8]


def _find_id(ids: bytearray, eid: bytes) -> bool:
    start = 0
    while True:
        at = ids.find(eid, start)
        if at < 0:
            return False
        if at % 8 == 0:
            return True
        start = at + 1


def _compact_values(values: list[float]) -> list:
    return [int(v) if v.is_integer() and abs(v) < 2 ** 53 else v for v in values[:MAX_VALUES]]


class SessionBook:
    def __init__(self, config: SessionConfig | None = None):
        self.config = config or SessionConfig()
        self.sessions: dict[str, OpenSession] = {}
        # (due time when filed, slot, serial): a lower bound of when each session may close (its
        # last event + gap, a time window's end), refreshed only when it reaches the top
        self._gap_heap: list[tuple[float, str, int]] = []
        self._serial = 0
        self._buffer: list[tuple] = []                 # heap of buffered events (see _buffered)
        self._buffered_ids: set[bytes] = set()
        self._buffered_offsets: set[int] = set()
        self._sources = SourceClock(self.config.allowed_lateness_s, self.config.host_idle_s,
                                    self.config.watermark_grace_s)
        self._watermark = -math.inf                     # the highest watermark released so far
        self._newest = -math.inf
        self._next = None                              # input offset after the last one handed in
        self._replay_until: int | None = None          # after a restore: offsets below are skipped ...
        self._replay_keep: set[int] = set()            # ... unless they were still buffered
        self._strings: list[str] = []
        self._string_index: dict[str, int] = {}
        self._templates: list[tuple[str, str]] = []
        self._template_index: dict[tuple[str, str], int] = {}
        self._place_index: dict[tuple[str, str, str], tuple[int, int, int]] = {}   # (host, topic, path) -> indices
        self._source_names: dict[tuple[str, int], str] = {}                          # (topic, partition) -> source
        self._new_entries: dict[bytes, bytes] = {}     # table entries not yet handed out
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._tails: OrderedDict[str, list[StepView]] = OrderedDict()
        self._closed_ids: OrderedDict[str, bytes] = OrderedDict()
        self._cut: OrderedDict[str, tuple[float, int]] = OrderedDict()   # cut slot -> (last ts, events so far)
        self._last_input: float | None = None
        self.duplicates = self.late_events = self.forced = 0

    # ---------------------------------------------------------------------------------------
    @property
    def open_sessions(self) -> int:
        return len(self.sessions)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def watermark(self) -> float | None:
        return None if self._watermark == -math.inf else self._watermark

    def watermark_lag(self) -> float:
        if self._newest == -math.inf or self._watermark == -math.inf:
            return 0.0
        return max(0.0, self._newest - self._watermark)

    # ---------------------------------------------------------------------------------------
    # input
    def add(self, event: ParsedEvent, offset: int, now: float) -> list[Released | Closed]:
        """One event (``offset``: its position in the input partition); returns what it lets go
        (released events, closed sessions), in order."""
        out = self.take(event, offset, now)
        out += self._release(now)
        return out

    def add_batch(self, events: Iterable[tuple[ParsedEvent, int]], now: float) -> list[Released | Closed]:
        """A batch of (event, offset): all are taken in, then what the watermark lets go is
        released once — the same order as one at a time, for a fraction of the work."""
        out: list[Released | Closed] = []
        for event, offset in events:
            out += self.take(event, offset, now)
        out += self._release(now)
        return out

    def take(self, event: ParsedEvent, offset: int, now: float) -> list[Released | Closed]:
        """Buffer one event without releasing anything (late events are placed at once); raises
        SessionInputError for an event that cannot be placed."""
        # The stage's hot path (once per event): the helpers' common cases are written inline.
        if self._replay_until is None:
            if self._next is None or offset >= self._next:
                self._next = offset + 1
        elif not self._fresh(offset):
            return []                  # applied to the restored state already
        ts = event.timestamp
        if not math.isfinite(ts):
            raise SessionInputError(f"event {event.event_id}: timestamp {ts} is not finite")
        key, src = event.key, event.source
        host = src.host
        if event.keys:
            if key not in event.keys:
                raise SessionInputError(f"event {event.event_id}: key {key!r} is not one of its keys")
            slot = key
        elif key != host:
            raise SessionInputError(f"event {event.event_id}: no session keys, so its key must be its host "
                                    f"{host!r}, got {key!r}")
        else:
            slot = self._slot(event)
        out: list[Released | Closed] = []
        if self._last_input is not None and now - self._last_input >= self.config.idle_close_s:
            out += self.close_all("idle")        # the pause already happened; tick was not called
        self._last_input = now
        event_id = event.event_id
        try:
            eid = bytes.fromhex(event_id)
        except ValueError:
            eid = b""
        if len(eid) != 8:
            eid = _event_id_bytes(event_id)
        if (eid, slot) in self._buffered_ids or self._is_released(slot, eid):
            self.duplicates += 1
            return out
        where = (src.topic, src.partition)
        name = self._source_names.get(where)
        if name is None:
            name = self._source_names[where] = f"{src.topic}:{src.partition}"
        self._sources.observe(name, ts, now)
        if ts > self._newest:
            self._newest = ts
        path, file_offset = src.file_path, src.file_offset
        places = self._place_index.get((host, src.topic, path))
        if places is None:
            places = self._place_index[(host, src.topic, path)] = (
                self._string(host), self._string(src.topic), self._string(path))
        tidx = self._template_index.get((event.template_id, event.template))
        if tidx is None:
            tidx = self._template(event.template_id, event.template)
        values = numeric_params(event.params) if event.params else []
        if len(values) > MAX_VALUES:
            values = values[:MAX_VALUES]
        self._serial += 1
        entry = ((ts, host, path, file_offset), self._serial,   # (EVENT_ORDER, inline)
                 offset, slot, key, bool(event.keys), eid, event_id,
                 tidx, values, *places, file_offset, src.partition, src.offset, event.message, src.kafka_timestamp)
        if ts < self._watermark:
            self.late_events += 1
            out += self._place_late(entry)
            return out
        heapq.heappush(self._buffer, entry)
        self._buffered_ids.add((eid, slot))
        self._buffered_offsets.add(offset)
        return out

    def _fresh(self, offset: int) -> bool:
        """Whether input at ``offset`` is new to this state (after a restore, input below the
        restored position was applied already, but for what was still buffered)."""
        if self._next is None or offset >= self._next:
            self._next = offset + 1
        if self._replay_until is not None:
            if offset < self._replay_until:
                if offset not in self._replay_keep:
                    return False
                self._replay_keep.discard(offset)
            else:
                self._replay_until, self._replay_keep = None, set()
        return True

    def mark(self, source: str, ts: float | None, idle: bool, now: float, offset: int) -> None:
        """A watermark record from the parse stage: ``source`` has reached ``ts`` (None: it was
        just assigned and holds the watermark until it reports), or is ``idle`` (nothing to read).
        Releasing what it lets go is left to the next add_batch / tick."""
        if not self._fresh(offset):
            return
        if ts is not None and not math.isfinite(ts):
            raise SessionInputError(f"watermark of {source}: time {ts} is not finite")
        self._sources.mark(source, ts, idle, now)

    def hold(self, now: float) -> None:
        """Input stopped for a reason that is not the sources' (the broker is away): neither the
        stage's idle clock nor any source's silence counts this time."""
        self._last_input = now
        self._sources.hold(now)

    def tick(self, now: float, stage_input_at: float | None = None) -> list[Released | Closed]:
        """What is due without input: hosts gone idle stop holding the watermark; no input at all
        for idle_close_s releases everything and closes every session. ``stage_input_at``: the
        stage's last input on any partition (one idle clock for the stage)."""
        if stage_input_at is not None and (self._last_input is None or stage_input_at > self._last_input):
            self._last_input = stage_input_at
        if self._last_input is None:            # fresh or just restored: the idle clock starts now
            self._last_input = now
        if now - self._last_input >= self.config.idle_close_s and (self.sessions or self._buffer):
            return self.close_all("idle")
        return self._release(now)

    def close_all(self, reason: str = "shutdown") -> list[Released | Closed]:
        """Release every buffered event, then close every open session (idle, shutdown)."""
        out = self._release(None, everything=True)
        for slot in sorted(self.sessions, key=lambda s: (self.sessions[s].last_ts, s)):
            out.append(self._close(slot, reason))
        return out

    # ---------------------------------------------------------------------------------------
    def _serial_next(self) -> int:
        self._serial += 1
        return self._serial

    def _slot(self, event: ParsedEvent) -> str:
        if event.keys:
            return event.key
        start = math.floor(event.timestamp / self.config.time_window_s) * self.config.time_window_s
        return f"{event.key}\x00{start!r}"

    def _is_released(self, slot: str, eid: bytes) -> bool:
        session = self.sessions.get(slot)
        # ``in`` (a C search) first: an id found at no 8-byte boundary is a coincidence
        if session is not None and eid in session.ids and _find_id(session.ids, eid):
            return True
        closed = self._closed_ids.get(slot)
        return closed is not None and eid in closed and _find_id(closed, eid)

    def _current_watermark(self, now: float | None) -> float:
        return self._sources.watermark(now, self._watermark)

    def _release(self, now: float | None, everything: bool = False) -> list[Released | Closed]:
        out: list[Released | Closed] = []
        limit = math.inf if everything else self._current_watermark(now)
        buffer = self._buffer
        while buffer and (buffer[0][0][0] < limit or len(buffer) > self.config.reorder_max_events):
            entry = heapq.heappop(buffer)
            if entry[0][0] >= limit:           # the buffer is full: judged before its time
                self.forced += 1
            self._buffered_ids.discard((entry[6], entry[3]))
            self._buffered_offsets.discard(entry[2])
            if entry[0][0] > self._watermark:
                self._watermark = entry[0][0]
                # what the event-time frontier has passed closes before the event joins: the
                # same interleaving of releases and closes whatever the batch boundaries
                out += self._close_expired()
            out += self._apply(entry)
        if limit != math.inf and limit > self._watermark:
            self._watermark = limit
        if not buffer and len(self._buffered_offsets) == 0:
            # A set keeps its largest table when emptied: after a burst (a backlog, a restore)
            # the two would hold megabytes for good. Fresh ones cost nothing when small.
            self._buffered_ids, self._buffered_offsets = set(), set()
        out += self._close_expired()
        return out

    def _apply(self, entry: tuple) -> list[Released | Closed]:
        """A released event joins its session (after closing what it shows has ended)."""
        (order, _serial, _offset, slot, key, keyed, eid, event_id, tidx, values, hidx, topic_idx, pidx,
         file_offset, partition, logs_offset, message, kafka_ts) = entry
        ts = order[0]
        out: list[Released | Closed] = []
        session = self.sessions.get(slot)
        if session is not None and keyed and ts - session.last_ts > self.config.session_gap_s:
            out.append(self._close(slot, "gap"))
            session = None
        opened = session is None
        if opened:
            session = self._open(slot, key, event_id, None if keyed else float(slot.rsplit("\x00", 1)[1]), ts)
        index = session.n
        history = self._tail(session)
        step = self._append(session, ts, tidx, hidx, topic_idx, pidx, file_offset, partition, logs_offset, values, eid)
        out.append(Released(session, index, history, step, message, event_id, kafka_ts))
        if opened:
            out += self._evict(keep=slot)
        if session.n >= self.config.session_max_events:
            out.append(self._close(slot, "max_events"))
        return out

    def _place_late(self, entry: tuple) -> list[Released | Closed]:
        """A late event goes straight into its session, at its event-time position; not judged."""
        order, slot = entry[0], entry[3]
        session = self.sessions.get(slot)
        if session is None:
            # Its session closed already (or never had an event): it starts one, judged at close.
            session = self._open(slot, entry[4], entry[7], None if entry[5] else float(slot.rsplit("\x00", 1)[1]),
                                 order[0])
        steps = self.steps(session)
        step_rows = [(EVENT_ORDER(s.timestamp, s.host, s.path, s.file_offset), s) for s in steps]
        new = self._step_of(entry)
        step_rows.append((order, new))
        step_rows.sort(key=lambda pair: pair[0])
        ids = bytes(session.ids) + entry[6]
        if step_rows[0][1] is new and not session.time_window:
            # A session's id is its earliest event's, whatever order its events came in: a
            # replica that re-reads a partition after a failover may see them in another order
            # (the window and alert ids must equal an uninterrupted run's).
            session.sid = bytes.fromhex(stable_id(session.key, entry[7]))
        session.rows, session.ids, session.n = bytearray(), bytearray(), 0
        first = step_rows[0][1].timestamp
        session.first_ts = first
        for _, s in step_rows:
            self._append(session, s.timestamp, self._template(s.template_id, s.template), self._string(s.host),
                         self._string(s.topic), self._string(s.path), s.file_offset, s.partition, s.offset,
                         s.values[:MAX_VALUES], b"")
        session.ids = bytearray(ids)
        session.late += 1
        self._tails.pop(slot, None)
        return []

    def _step_of(self, entry: tuple) -> StepView:
        (order, _s, _o, _slot, _key, _keyed, _eid, _event_id, tidx, values, hidx, topic_idx, pidx,
         file_offset, partition, logs_offset, _message, _kts) = entry
        template_id, template = self._templates[tidx]
        return StepView(template_id, template, order[0], values, self._strings[hidx],
                        self._strings[topic_idx], self._strings[pidx], file_offset, partition, logs_offset)

    def _open(self, slot: str, key: str, first_event_id: str, bucket: float | None, ts: float) -> OpenSession:
        self._serial += 1
        sid = stable_id(key, first_event_id) if bucket is None else stable_id("time", key, bucket)
        session = self.sessions[slot] = OpenSession(slot, key, sid, self._serial, bucket)
        self._deleted.discard(slot)
        cut = self._cut.pop(slot, None)
        if cut is not None and (bucket is not None or ts - cut[0] <= self.config.session_gap_s):
            session.before = cut[1]          # the next part of a cut session
        return session

    def _append(self, session: OpenSession, ts: float, tidx: int, hidx: int, topic_idx: int, pidx: int,
                file_offset: int, partition: int, logs_offset: int, values: list, eid: bytes) -> StepView:
        if session.n == 0:
            session.first_ts = ts
            heapq.heappush(self._gap_heap, (self._due(session, ts), session.slot, session.serial))
        # values: the event's numeric params as floats (numeric_params), at most MAX_VALUES; the
        # row keeps whole numbers as msgpack ints (smaller), the StepView the floats themselves
        row = _pack((tidx, round((ts - session.first_ts) * 1000), hidx, topic_idx, pidx, file_offset,
                     partition, logs_offset, _compact_values(values) if values else values))
        if len(row) > 255:
            row = _pack((tidx, round((ts - session.first_ts) * 1000), hidx, topic_idx, pidx, file_offset,
                         partition, logs_offset, []))
        size = _LENGTH[len(row)]
        rows = session.rows
        rows += size
        rows += row
        rows += size
        session.ids += eid
        session.n += 1
        if ts > session.last_ts:
            session.last_ts = ts
        self._dirty.add(session.slot)
        template_id, template = self._templates[tidx]
        step = StepView(template_id, template, session.first_ts + round((ts - session.first_ts) * 1000) / 1000,
                        values, self._strings[hidx], self._strings[topic_idx],
                        self._strings[pidx], file_offset, partition, logs_offset)
        tail = self._tails.get(session.slot)
        if tail is not None:
            tail.append(step)
            if len(tail) > self.config.window_size:
                del tail[0]
            self._tails.move_to_end(session.slot)
        return step

    def _tail(self, session: OpenSession) -> list[StepView]:
        """The up to h newest events of a session (before the one being released)."""
        h = self.config.window_size
        tail = self._tails.get(session.slot)
        if tail is None:
            tail = self._decode_tail(session, h)
            self._tails[session.slot] = tail
            if len(self._tails) > TAIL_CACHE_SESSIONS:
                self._tails.popitem(last=False)
        return list(tail)

    def _decode_tail(self, session: OpenSession, h: int) -> list[StepView]:
        rows, end, found = session.rows, len(session.rows), []
        while end > 0 and len(found) < h:
            size = rows[end - 1]
            start = end - 1 - size
            found.append(self._view(session, bytes(rows[start:end - 1])))
            end = start - 1
        found.reverse()
        return found

    def _view(self, session: OpenSession, row: bytes) -> StepView:
        tidx, dt, hidx, topic_idx, pidx, file_offset, partition, logs_offset, values = _unpack(row)
        template_id, template = self._templates[tidx]
        s = self._strings
        return StepView(template_id, template, session.first_ts + dt / 1000, [float(v) for v in values], s[hidx],
                        s[topic_idx], s[pidx], file_offset, partition, logs_offset)

    def steps(self, session: OpenSession) -> list[StepView]:
        """Every event of a session, in event-time order."""
        rows, pos, out, n = session.rows, 0, [], len(session.rows)
        while pos < n:
            size = rows[pos]
            out.append(self._view(session, bytes(rows[pos + 1:pos + 1 + size])))
            pos += size + 2
        return out

    def _close(self, slot: str, reason: str) -> Closed:
        session = self.sessions.pop(slot)
        self._tails.pop(slot, None)
        self._dirty.discard(slot)
        self._deleted.add(slot)
        self._closed_ids.pop(slot, None)
        self._closed_ids[slot] = bytes(session.ids)
        while len(self._closed_ids) > CLOSED_MEMORY:
            self._closed_ids.popitem(last=False)
        if reason in CUT_REASONS:
            self._cut[slot] = (session.last_ts, session.before + session.n)
            while len(self._cut) > CUT_MEMORY:
                self._cut.popitem(last=False)
        return Closed(session, self.steps(session), reason)

    def _due(self, session: OpenSession, last_ts: float) -> float:
        if session.time_window:
            return session.bucket + self.config.time_window_s
        return last_ts + self.config.session_gap_s

    def _close_expired(self) -> list[Closed]:
        """Sessions whose last event the watermark has left behind by more than the gap, and time
        windows whose end it has passed, closed in a deterministic order."""
        wm, heap, due, closing = self._watermark, self._gap_heap, [], set()
        while heap and heap[0][0] < wm:
            _, slot, serial = heapq.heappop(heap)
            session = self.sessions.get(slot)
            if session is None or session.serial != serial:
                continue                       # closed already
            when = self._due(session, session.last_ts)
            if when < wm:
                if slot not in closing:        # a late event may have filed it twice
                    closing.add(slot)
                    due.append((session.last_ts, slot, "time" if session.time_window else "gap"))
            else:                              # newer events since it was filed
                heapq.heappush(heap, (when, slot, serial))
        return [self._close(slot, reason) for _, slot, reason in sorted(due)]

    def _evict(self, keep: str) -> list[Closed]:
        over = len(self.sessions) - self.config.max_open_sessions
        if over <= 0:
            return []
        oldest = sorted((s for s in self.sessions.values() if s.slot != keep), key=lambda s: (s.last_ts, s.slot))[:over]
        return [self._close(s.slot, "evicted") for s in oldest]

    # ---------------------------------------------------------------------------------------
    # tables
    def _string(self, text: str) -> int:
        index = self._string_index.get(text)
        if index is None:
            index = self._string_index[text] = len(self._strings)
            self._strings.append(text)
            self._new_entries[STRING + index.to_bytes(4, "big")] = text.encode("utf-8", "surrogatepass")
        return index

    def _template(self, template_id: str, text: str) -> int:
        pair = (template_id, text)
        index = self._template_index.get(pair)
        if index is None:
            index = self._template_index[pair] = len(self._templates)
            self._templates.append(pair)
            self._new_entries[TEMPLATE + index.to_bytes(4, "big")] = (
                template_id + "\x00" + text).encode("utf-8", "surrogatepass")
        return index

    # ---------------------------------------------------------------------------------------
    # state (services.state): entries of this partition
    def commit_offset(self, processed: int) -> int:
        """The offset to commit: the oldest still-buffered input, else all that was handed in."""
        if self._buffered_offsets:
            return min(min(self._buffered_offsets), processed)
        return processed

    def _meta(self) -> bytes:
        low = min(self._buffered_offsets) if self._buffered_offsets else None
        bitmap = b""
        if low is not None and self._next is not None:
            bits = bytearray((self._next - low + 7) // 8)
            for o in self._buffered_offsets:
                bits[(o - low) >> 3] |= 1 << ((o - low) & 7)
            bitmap = bytes(bits)
        return _pack({"format": FORMAT, "next": self._next, "low": low, "buffered": bitmap,
                      **self._sources.to_state(), "watermark": None if self._watermark == -math.inf else self._watermark,
                      "newest": None if self._newest == -math.inf else self._newest,
                      **({"cut": [[slot, ts, n] for slot, (ts, n) in self._cut.items()]} if self._cut else {})})

    def _session_record(self, s: OpenSession) -> bytes:
        return _pack((s.key, s.session_id, s.first_ts, s.last_ts, s.n, s.late, s.bucket, bytes(s.rows),
                      bytes(s.ids), s.alerts, s.before))

    def changes(self) -> dict[bytes, bytes | None]:
        """Entries changed since the last call (None: deleted)."""
        out: dict[bytes, bytes | None] = dict(self._new_entries)
        self._new_entries.clear()
        for slot in self._dirty:
            session = self.sessions.get(slot)
            if session is not None:
                out[SESSION + slot.encode("utf-8", "surrogatepass")] = self._session_record(session)
        for slot in self._deleted:
            if slot not in self.sessions:
                out[SESSION + slot.encode("utf-8", "surrogatepass")] = None
        self._dirty.clear()
        self._deleted.clear()
        out[META] = self._meta()
        return out

    def mark_dirty(self, session: OpenSession) -> None:
        """The judge changed a session's alerts."""
        if session.slot in self.sessions:
            self._dirty.add(session.slot)

    def entries(self) -> dict[bytes, bytes]:
        """All of this partition's state."""
        out = {STRING + i.to_bytes(4, "big"): s.encode("utf-8", "surrogatepass") for i, s in enumerate(self._strings)}
        out.update({TEMPLATE + i.to_bytes(4, "big"): (t + "\x00" + x).encode("utf-8", "surrogatepass")
                    for i, (t, x) in enumerate(self._templates)})
        out.update({SESSION + slot.encode("utf-8", "surrogatepass"): self._session_record(s)
                    for slot, s in self.sessions.items()})
        out[META] = self._meta()
        return out

    def restore(self, entries: dict[bytes, bytes], committed: int | None) -> int | None:
        """Rebuild from entries (an empty dict: a fresh partition); returns the input offset to
        resume from. Input below the restored ``next`` offset is applied to this state already,
        but for the offsets that were still buffered: those are consumed again."""
        try:
            strings: dict[int, str] = {}
            templates: dict[int, tuple[str, str]] = {}
            sessions: dict[str, tuple] = {}
            meta = None
            for key, value in entries.items():
                if key == META:
                    meta = _unpack(value)
                elif key.startswith(STRING):
                    strings[int.from_bytes(key[2:], "big")] = value.decode("utf-8", "surrogatepass")
                elif key.startswith(TEMPLATE):
                    template_id, _, text = value.decode("utf-8", "surrogatepass").partition("\x00")
                    templates[int.from_bytes(key[2:], "big")] = (template_id, text)
                elif key.startswith(SESSION):
                    sessions[key[1:].decode("utf-8", "surrogatepass")] = _unpack(value)
            self._strings = [strings[i] for i in range(len(strings))]
            self._templates = [templates[i] for i in range(len(templates))]
        except (KeyError, ValueError, TypeError, msgspec.DecodeError) as err:
            raise StateError(f"not a session book's state ({type(err).__name__}: {err})") from None
        self._string_index = {s: i for i, s in enumerate(self._strings)}
        self._template_index = {t: i for i, t in enumerate(self._templates)}
        self._place_index = {}
        self.sessions.clear()
        self._gap_heap = []
        for slot, (key, sid, first_ts, last_ts, n, late, bucket, rows, ids, alerts, *rest) in sorted(sessions.items()):
            self._serial += 1
            s = OpenSession(slot, key, sid, self._serial, bucket)
            s.first_ts, s.last_ts, s.n, s.late = first_ts, last_ts, n, late
            s.before = rest[0] if rest else 0             # (records written before parts existed have none)
            s.rows, s.ids, s.alerts = bytearray(rows), bytearray(ids), alerts
            self.sessions[slot] = s
            heapq.heappush(self._gap_heap, (self._due(s, s.last_ts), slot, s.serial))
        self._tails.clear()
        resume = committed
        if meta is not None:
            self._next = meta["next"]
            self._sources.from_state(meta)
            self._watermark = -math.inf if meta["watermark"] is None else meta["watermark"]
            self._newest = -math.inf if meta["newest"] is None else meta["newest"]
            self._cut = OrderedDict((slot, (ts, n)) for slot, ts, n in meta.get("cut", ()))
            low, bitmap = meta["low"], meta["buffered"]
            keep = {low + i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1} if low is not None else set()
            if self._next is not None:
                self._replay_until, self._replay_keep = self._next, keep
                resume = min(keep) if keep else self._next
        self._new_entries.clear()
        self._dirty.clear()
        self._deleted.clear()
        return resume


# --------------------------------------------------------------------------------------------
def sessions_in_order(events: Iterable[ParsedEvent], config: SessionConfig | None = None) -> list[Closed]:
    """Closed sessions of a finite event stream, built exactly as the stream builds them (the same
    book, the same order of events; no watermark needed: everything is known). What evaluation
    (models.data.sessions_from_logs) and the demo's offline check use."""
    book = SessionBook(config or SessionConfig(idle_close_s=1e18))
    closed: list[Closed] = []
    ordered = sorted(events, key=lambda e: EVENT_ORDER(e.timestamp, e.source.host, e.source.file_path,
                                                       e.source.file_offset))
    for offset, event in enumerate(ordered):
        for action in book.add(event, offset, 0.0):
            if isinstance(action, Closed):
                closed.append(action)
    closed += [a for a in book.close_all("shutdown") if isinstance(a, Closed)]
    return closed
