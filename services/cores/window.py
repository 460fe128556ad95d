"""The window core: parsed events in, sliding / session / time windows out. Pure: no Kafka.

One core serves the events of one input partition (a key lives in exactly one partition, so a
core sees every event of its keys). For each event it

* appends events with session keys (``event.keys`` non-empty) to the open session of
  ``event.key`` and emits a **sliding** window: the newest event in full and the up to h events
  before it, in arrival order, as compact ``records.Step``s (template id, time, numeric params)
  plus the texts of their template ids (``first_index`` = index within the session of the
  window's first element);
* closes a **session** window when its key has been quiet in event time (its last event is older
  than ``watermark - session_gap_s``, the watermark being the newest event time this core has
  seen), when it reaches ``session_max_events``, when no input has arrived for ``idle_close_s``
  of wall time (``tick``), or at shutdown (``close_all``). A closed session lists its events by
  event time, ties broken by (host, log.file.path, log.offset), because lines from several hosts
  arrive interleaved and not in time order;
* puts events without a session key (``keys == []``, ``key`` = host) into per-host tumbling
  **time** windows ``[k*T, (k+1)*T)`` of event time (BGL style); a host's window closes when that
  host's own event time reaches its end, or when the watermark passes ``end + session_gap_s``
  (the host went quiet).

Every close that depends on event time happens inside ``process`` (before or after the event it
is caused by), never later in ``tick``, so what a window contains depends only on the input order,
not on when the shell happened to call ``tick``: a restored core that replays the same input
closes the same windows. Window ids are ``stable_id(kind, key, first event id, last event id)``,
so a replayed window is recognisable downstream as a duplicate.

At-least-once input means an event (same ``event_id`` and key) can arrive twice: the repeat is
dropped, whether its session is still open or one of the ``closed_memory`` most recently closed.

State is kept small: each event of an open session is held as one compact JSON array string
(repeated strings such as templates, hosts and paths are replaced by indices into a shared
table), which is also its snapshot form, so ``snapshot()`` is a join of stored strings with
no re-encoding. Sliding windows decode the tail of a session on demand, straight from the stored
rows into Steps (no full events are rebuilt); a small LRU of the Steps of recently active
sessions' tails avoids decoding the same events h times.

Checkpoints: ``snapshot()`` gives all open state; ``changes()`` gives only what changed since
the last snapshot()/changes() (proportional to the input, not to the open state), and
``restore(snapshot, [changes, ...])`` rebuilds the state from both. Restoring a checkpoint taken
at input offset X and replaying the input from X yields the windows of an uninterrupted run.
"""
from __future__ import annotations

import heapq
import json
import math
import sys
import time
import tracemalloc
from collections import OrderedDict
from typing import Iterable

from services.records import ParsedEvent, Source, Step, Window, numeric_params, stable_id, trusted

SNAPSHOT_FORMAT = "logwarden.window/1"
CHANGES_FORMAT = "logwarden.window-changes/1"

# Strings that repeat across events (templates, hosts, topics, paths, levels, components) are
# stored once; the table is capped so that a flood of one-off "templates" cannot grow it forever
# (past the cap such strings are simply stored inline).
STRING_TABLE_MAX = 20_000

# The tails (as Steps) of this many recently active sessions are cached for sliding windows.
TAIL_CACHE_SESSIONS = 256

# An encoded event is a JSON array: the ParsedEvent's fields in model order (but ``key``, which
# is the session's, and ``source``), then the Source's fields. Derived from the models, so a field
# added to records.py is kept; a snapshot names its layout, so one from an older layout restores.
_EVENT_LAYOUT = tuple(name for name in ParsedEvent.model_fields if name not in ("key", "source"))
_SOURCE_LAYOUT = tuple(Source.model_fields)
_SHARED_FIELDS = frozenset({"level", "component", "template_id", "template", "host", "topic", "file_path"})
_SHARED_POSITIONS = tuple(i for i, name in enumerate(_EVENT_LAYOUT + _SOURCE_LAYOUT) if name in _SHARED_FIELDS)
_ID = _EVENT_LAYOUT.index("event_id")
# One encoder/decoder for all rows: json.dumps with options builds a new encoder per call, and
# json.loads runs a whitespace regex twice per call; rows have no surrounding whitespace.
_encode_row = json.JSONEncoder(separators=(",", ":")).encode
_raw_decode_row = json.JSONDecoder().raw_decode
_TS = _EVENT_LAYOUT.index("timestamp")
# What a sliding window's context reads of a stored row (records.Step, and the window's texts,
# hosts and first event id).
_TEMPLATE_ID = _EVENT_LAYOUT.index("template_id")
_TEMPLATE = _EVENT_LAYOUT.index("template")
_PARAMS = _EVENT_LAYOUT.index("params")
_HOST = len(_EVENT_LAYOUT) + _SOURCE_LAYOUT.index("host")


class WindowInputError(ValueError):
    """An event the window core cannot place (inconsistent keys, a non-finite timestamp)."""


class SnapshotError(ValueError):
    """A snapshot that is not a window-core snapshot, or is damaged."""


class _Session:
    """An open session: its events in arrival order, as encoded strings."""
    __slots__ = ("key", "serial", "session_id", "events", "ids", "last_ts")

    def __init__(self, key: str, serial: int, first_event_id: str):
        self.key = key
        self.serial = serial                # tells this session's heap entries from a closed one's
        # Names the session in all its sliding windows and its closed window (records.Window).
        self.session_id = stable_id(key, first_event_id)
        self.events: list[str] = []
        self.ids: set[str] = set()
        self.last_ts = -math.inf           # newest event time in the session


class _Bucket:
    """An open time window of one host."""
    __slots__ = ("host", "start", "events", "ids")

    def __init__(self, host: str, start: float):
        self.host = host
        self.start = start
        self.events: list[str] = []
        self.ids: set[str] = set()


class WindowCore:
    def __init__(self, window_size: int = 10, session_gap_s: float = 600.0,
                 session_max_events: int = 5000, idle_close_s: float = 5.0,
                 time_window_s: float = 60.0, sliding: bool = True, closed_memory: int = 1000):
        if window_size < 1 or session_max_events < 1 or closed_memory < 0:
            raise ValueError("window_size and session_max_events must be >= 1, closed_memory >= 0")
        if not (session_gap_s > 0 and idle_close_s > 0 and time_window_s > 0):
            raise ValueError("session_gap_s, idle_close_s and time_window_s must be > 0")
        self.window_size = window_size
        self.session_gap_s = float(session_gap_s)
        self.session_max_events = session_max_events
        self.idle_close_s = float(idle_close_s)
        self.time_window_s = float(time_window_s)
        self.sliding = sliding
        self.closed_memory = closed_memory

        self._sessions: dict[str, _Session] = {}
        # (last_ts when filed, key, serial): a lower bound of each session's last event time,
        # refreshed only when it reaches the top, so an event costs no heap work.
        self._session_heap: list[tuple[float, str, int]] = []
        self._serial = 0
        self._buckets: dict[tuple[str, float], _Bucket] = {}
        self._host_buckets: dict[str, set[float]] = {}       # open time-window starts per host
        self._bucket_heap: list[tuple[float, str, float]] = []  # (end, host, start)
        self._host_time: dict[str, float] = {}               # newest keyless event time per host
        self._watermark = -math.inf
        # ids of recently closed windows, per slot (session key, or (host, start) of a time
        # window): a duplicate that arrives after its window closed is still recognised.
        self._closed: OrderedDict[str | tuple[str, float], set[str]] = OrderedDict()
        self._strings: list[str] = []
        self._string_index: dict[str, int] = {}
        # session key -> the up to h newest events of the session, as _tail_entry() gives them:
        # the context of its next sliding window
        self._tails: OrderedDict[str, list[tuple[Step, str, str, str, float, str]]] = OrderedDict()
        self._last_input: float | None = None                # wall clock; not part of a snapshot
        self._snapshot_cache: bytes | None = None
        self._version = 0                                    # state changes so far
        self._journal: list[str] | None = None               # changes since the last hand-out
        self._journal_version = 0                            # the version the journal starts at
        self._journal_strings = 0                            # string-table size at that point
        self.duplicates = 0

    # ---------------------------------------------------------------------------------------
    # public state
    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    @property
    def open_time_windows(self) -> int:
        return len(self._buckets)

    @property
    def version(self) -> int:
        """Counts state changes: equal versions, equal state (a checkpoint can be skipped)."""
        return self._version

    @property
    def watermark(self) -> float | None:
        return None if self._watermark == -math.inf else self._watermark

    # ---------------------------------------------------------------------------------------
    # input
    def process(self, event: ParsedEvent, now: float) -> list[Window]:
        """Place one event; return the windows it closes and its sliding window."""
        self._check(event)
        out: list[Window] = []
        if self._last_input is not None and now - self._last_input >= self.idle_close_s:
            out += self.close_all("idle")       # the pause already happened; tick was not called
        self._last_input = now
        if event.keys:
            out += self._process_keyed(event)
        else:
            out += self._process_keyless(event)
        return out

    def tick(self, now: float, stage_input_at: float | None = None) -> list[Window]:
        """Close what is due without input: gap-expired sessions, and everything once no input
        has arrived for idle_close_s. ``stage_input_at`` (wall time the stage last saw input on
        any partition) lets the cores of one stage share one idle clock."""
        if stage_input_at is not None and (self._last_input is None or stage_input_at > self._last_input):
            self._last_input = stage_input_at
        if self._last_input is None:            # fresh or just restored: the idle clock starts now
            self._last_input = now
        out = self._close_expired()
        if now - self._last_input >= self.idle_close_s and (self._sessions or self._buckets):
            out += self.close_all("idle")
        return out

    def close_all(self, reason: str = "shutdown") -> list[Window]:
        """Close every open session and time window (shutdown, idle)."""
        out = [self._close_session(key, reason) for key in sorted(self._sessions)]
        out += [self._close_bucket(slot, reason) for slot in sorted(self._buckets)]
        return out

    def _check(self, event: ParsedEvent) -> None:
        if not math.isfinite(event.timestamp):
            raise WindowInputError(f"event {event.event_id}: timestamp {event.timestamp} is not finite")
        if event.keys:
            if event.key not in event.keys:
                raise WindowInputError(f"event {event.event_id}: key {event.key!r} is not one of its keys")
        elif event.key != event.source.host:
            raise WindowInputError(
                f"event {event.event_id}: no session keys, so its key must be its host "
                f"{event.source.host!r}, got {event.key!r}")

    def _is_duplicate(self, ids: set[str] | None, slot, event_id: str) -> bool:
        if (ids is not None and event_id in ids) or event_id in self._closed.get(slot, ()):
            self.duplicates += 1
            return True
        return False

    def _process_keyed(self, event: ParsedEvent) -> list[Window]:
        key = event.key
        session = self._sessions.get(key)
        if self._is_duplicate(session.ids if session else None, key, event.event_id):
            return []
        self._watermark = max(self._watermark, event.timestamp)
        out = self._close_expired()             # may close this key's session: then start anew
        session = self._add_to_session(key, self._encode(event, default_keys=[key]),
                                       event.event_id, event.timestamp)
        if self.sliding:
            out.append(self._sliding_window(session, event))
        if len(session.events) >= self.session_max_events:
            out.append(self._close_session(key, "max_events"))
        elif session.last_ts < self._watermark - self.session_gap_s:
            # A late event (older than the watermark allows) forms a session already over.
            out.append(self._close_session(key, "gap"))
        return out

    # State changes. Each one is counted in the state's version and, after a snapshot, written
    # to the journal that changes() hands out, so that a snapshot plus changes rebuilds the state.
    def _record(self, kind: str, *parts) -> None:
        self._version += 1
        self._snapshot_cache = None
        if self._journal is not None:            # parts: JSON values, and a row already encoded
            self._journal.append(f'["{kind}",' + ",".join(
                p if kind in "eb" and i == len(parts) - 1 else json.dumps(p) for i, p in enumerate(parts)) + "]")

    def _add_to_session(self, key: str, row: str, event_id: str, ts: float) -> _Session:
        session = self._sessions.get(key)
        if session is None:
            session = self._new_session(key, event_id)
        session.events.append(row)
        session.ids.add(event_id)
        if session.last_ts == -math.inf:
            session.last_ts = ts
            self._file_session(session)
        elif ts > session.last_ts:
            session.last_ts = ts
        if ts > self._watermark:
            self._watermark = ts
        self._record("e", key, row)
        return session

    def _drop_session(self, key: str) -> _Session:
        session = self._sessions.pop(key)
        self._tails.pop(key, None)
        self._remember_closed(key, session.ids)
        self._record("c", key)
        return session

    def _add_to_bucket(self, host: str, start: float, row: str, event_id: str, ts: float) -> None:
        bucket = self._buckets.get((host, start)) or self._new_bucket(host, start)
        bucket.events.append(row)
        bucket.ids.add(event_id)
        if ts > self._watermark:
            self._watermark = ts
        if ts > self._host_time.get(host, -math.inf):
            self._host_time[host] = ts
        self._record("b", host, start, row)

    def _drop_bucket(self, slot: tuple[str, float]) -> _Bucket:
        bucket = self._buckets.pop(slot)
        starts = self._host_buckets[bucket.host]
        starts.discard(bucket.start)
        if not starts:
            del self._host_buckets[bucket.host]
        self._remember_closed(slot, bucket.ids)
        self._record("x", *slot)
        return bucket

    def _new_session(self, key: str, first_event_id: str) -> _Session:
        self._serial += 1
        session = self._sessions[key] = _Session(key, self._serial, first_event_id)
        return session

    def _file_session(self, session: _Session) -> None:
        heapq.heappush(self._session_heap, (session.last_ts, session.key, session.serial))

    def _process_keyless(self, event: ParsedEvent) -> list[Window]:
        host = event.key
        start = math.floor(event.timestamp / self.time_window_s) * self.time_window_s
        slot = (host, start)
        bucket = self._buckets.get(slot)
        if self._is_duplicate(bucket.ids if bucket else None, slot, event.event_id):
            return []
        self._add_to_bucket(host, start, self._encode(event, default_keys=[]), event.event_id, event.timestamp)
        return self._close_expired(moved_host=host)

    def _new_bucket(self, host: str, start: float) -> _Bucket:
        bucket = self._buckets[(host, start)] = _Bucket(host, start)
        self._host_buckets.setdefault(host, set()).add(start)
        heapq.heappush(self._bucket_heap, (start + self.time_window_s, host, start))
        return bucket

    # ---------------------------------------------------------------------------------------
    # closing
    def _close_expired(self, moved_host: str | None = None) -> list[Window]:
        """Close, in a deterministic order, the sessions quiet for longer than the gap, and the
        time windows that ``moved_host``'s event time has reached the end of or that the
        watermark passed by more than the gap (their host went quiet)."""
        limit = self._watermark - self.session_gap_s
        due: dict[str, float] = {}
        heap = self._session_heap
        while heap and heap[0][0] < limit:
            _, key, serial = heapq.heappop(heap)
            session = self._sessions.get(key)
            if session is None or session.serial != serial:
                continue                         # that session was closed already
            if session.last_ts < limit:
                due[key] = session.last_ts
            else:                                # it got newer events since it was filed
                self._file_session(session)
        out = [self._close_session(key, "gap") for key in sorted(due, key=lambda k: (due[k], k))]

        due_buckets = set()
        bheap = self._bucket_heap
        while bheap and bheap[0][0] + self.session_gap_s < self._watermark:
            _, host, start = heapq.heappop(bheap)
            if (host, start) in self._buckets:
                due_buckets.add((host, start))
        if moved_host is not None:
            host_time = self._host_time[moved_host]
            due_buckets |= {(moved_host, start) for start in self._host_buckets.get(moved_host, ())
                            if start + self.time_window_s <= host_time}
        out += [self._close_bucket(slot, "time") for slot in sorted(due_buckets)]
        return out

    def _remember_closed(self, slot, ids: set[str]) -> None:
        if self.closed_memory == 0:
            return
        self._closed.pop(slot, None)
        self._closed[slot] = ids                 # the closed window's own set: no longer changes
        while len(self._closed) > self.closed_memory:
            self._closed.popitem(last=False)

    def _close_session(self, key: str, reason: str) -> Window:
        session = self._drop_session(key)
        events = sorted((self._decode(text, key, keyless=False) for text in session.events),
                        key=_event_time_order)
        return _window("session", key, events, session_id=session.session_id, closed_reason=reason,
                       start=events[0].timestamp, end=max(e.timestamp for e in events))

    def _close_bucket(self, slot: tuple[str, float], reason: str) -> Window:
        bucket = self._drop_bucket(slot)
        events = sorted((self._decode(text, bucket.host, keyless=True) for text in bucket.events),
                        key=_event_time_order)
        return _window("time", bucket.host, events, closed_reason=reason,
                       start=bucket.start, end=bucket.start + self.time_window_s)

    def _sliding_window(self, session: _Session, newest: ParsedEvent) -> Window:
        h = self.window_size
        total = len(session.events)              # the newest event is already in it
        tail = self._tails.pop(session.key, None)
        if tail is None or len(tail) != min(total - 1, h):   # not cached: decode the stored rows
            tail = [self._tail_entry(text) for text in session.events[-h - 1:-1]]
        host, ts = newest.source.host, newest.timestamp
        if tail:
            steps, ids, texts, hosts, times, event_ids = zip(*tail)
            context = list(steps)
            templates = dict(zip(reversed(ids), reversed(texts)))   # the oldest text of each id
            if len(templates) != len(set(zip(ids, texts))):   # an id with several texts ("unknown")
                context = [step if templates[step.template_id] == text
                           else step.model_copy(update={"template": text}) for step, text in zip(steps, texts)]
            hosts = sorted({host, *hosts})
            start, end = min(ts, *times), max(ts, *times)
            first_event_id = event_ids[0]
        else:
            context, templates, hosts, start, end, first_event_id = [], {}, [host], ts, ts, None
        # Built from values that are already valid (records.trusted): validating them again was a large
        # share of a sliding window's cost.
        window = trusted(Window, _WINDOW_FIELDS, {
            "window_id": stable_id("sliding", session.key, first_event_id or newest.event_id, newest.event_id),
            "session_id": session.session_id, "kind": "sliding", "key": session.key, "hosts": hosts,
            "events": [newest], "context": context, "templates": templates, "first_event_id": first_event_id,
            "first_index": total - 1 - len(context), "closed_reason": None, "start": start, "end": end})
        step = trusted(Step, _STEP_FIELDS, {"template_id": newest.template_id, "timestamp": ts,
                                             "values": numeric_params(newest.params), "template": None})
        tail.append((step, newest.template_id, newest.template, host, ts, newest.event_id))
        if len(tail) > h:
            del tail[0]
        self._tails[session.key] = tail
        if len(self._tails) > TAIL_CACHE_SESSIONS:
            self._tails.popitem(last=False)
        return window

    def _tail_entry(self, text: str) -> tuple[Step, str, str, str, float, str]:
        """A stored row as a cached tail entry: (Step, template id, template text, host, time,
        event id)."""
        row = _raw_decode_row(text)[0]
        table = self._strings
        template_id, template, host, ts = row[_TEMPLATE_ID], row[_TEMPLATE], row[_HOST], row[_TS]
        if type(template_id) is int:
            template_id = table[template_id]
        if type(template) is int:
            template = table[template]
        if type(host) is int:
            host = table[host]
        step = trusted(Step, _STEP_FIELDS, {"template_id": template_id, "timestamp": ts,
                                             "values": numeric_params(row[_PARAMS]), "template": None})
        return step, template_id, template, host, ts, row[_ID]

    # ---------------------------------------------------------------------------------------
    # compact event form
    def _ref(self, value: str | None):
        if value is None:
            return None
        index = self._string_index.get(value)
        if index is None:
            if len(self._strings) >= STRING_TABLE_MAX:
                return value
            index = self._string_index[value] = len(self._strings)
            self._strings.append(value)
        return index

    def _encode(self, e: ParsedEvent, default_keys: list[str]) -> str:
        ref = self._ref
        row = []
        for record, layout in ((e, _EVENT_LAYOUT), (e.source, _SOURCE_LAYOUT)):
            values = record.__dict__
            for name in layout:
                value = values[name]
                if name in _SHARED_FIELDS:
                    value = ref(value)
                elif name == "keys" and value == default_keys:
                    value = None                # the usual case: the line names only this key
                row.append(value)
        return _encode_row(row)

    def _decode(self, text: str, key: str, keyless: bool) -> ParsedEvent:
        row = _raw_decode_row(text)[0]
        table = self._strings
        for i in _SHARED_POSITIONS:
            if type(row[i]) is int:
                row[i] = table[row[i]]
        fields = dict(zip(_EVENT_LAYOUT, row))
        if fields["keys"] is None:
            fields["keys"] = [] if keyless else [key]
        fields["key"] = key
        fields["source"] = trusted(Source, _SOURCE_FIELDS, dict(zip(_SOURCE_LAYOUT, row[len(_EVENT_LAYOUT):])))
        # In model order: serialisation follows it, and a replayed window must be byte-identical.
        return trusted(ParsedEvent, _EVENT_FIELDS, {name: fields[name] for name in _EVENT_ORDER})

    # ---------------------------------------------------------------------------------------
    # crash safety
    def snapshot(self) -> bytes:
        """All open state as JSON bytes. Events are stored in snapshot form already, so this is a
        join of strings; an unchanged core returns the previous bytes without any work.

        A snapshot also starts the journal of changes(): snapshot() once, then changes() at each
        commit, is the cheap way to checkpoint often."""
        if self._journal is None or self._journal:
            self._start_journal()
        if self._snapshot_cache is not None:
            return self._snapshot_cache
        dumps = json.dumps
        parts = [
            '{"format":', dumps(SNAPSHOT_FORMAT),
            ',"version":', str(self._version),
            ',"watermark":', dumps(self.watermark),
            ',"duplicates":', str(self.duplicates),
            ',"layout":', dumps([_EVENT_LAYOUT, _SOURCE_LAYOUT]),
            ',"strings":', dumps(self._strings),
            ',"host_time":', dumps(self._host_time),
            ',"sessions":[',
            ",".join(f'[{dumps(s.key)},[{",".join(s.events)}]]' for s in self._sessions.values()),
            '],"buckets":[',
            ",".join(f'[{dumps(b.host)},{dumps(b.start)},[{",".join(b.events)}]]'
                     for b in self._buckets.values()),
            '],"closed":',
            dumps([[list(slot) if isinstance(slot, tuple) else slot, sorted(ids)]
                   for slot, ids in self._closed.items()]),
            "}",
        ]
        self._snapshot_cache = "".join(parts).encode("ascii")
        return self._snapshot_cache

    def changes(self) -> bytes:
        """The state changes since the last snapshot() or changes(), as JSON bytes: with the
        snapshot before them, ``restore(snapshot, [changes, ...])`` rebuilds the state. Cheap:
        proportional to the input since the last call, not to the open state."""
        if self._journal is None:
            raise RuntimeError("changes() follow a snapshot(): take one first")
        dumps = json.dumps
        data = "".join([
            '{"format":', dumps(CHANGES_FORMAT),
            ',"from":', str(self._journal_version), ',"to":', str(self._version),
            ',"duplicates":', str(self.duplicates),
            ',"layout":', dumps([_EVENT_LAYOUT, _SOURCE_LAYOUT]),
            ',"strings_from":', str(self._journal_strings),
            ',"strings":', dumps(self._strings[self._journal_strings:]),
            ',"ops":[', ",".join(self._journal), "]}",
        ]).encode("ascii")
        self._start_journal()
        return data

    def _start_journal(self) -> None:
        self._journal = []
        self._journal_version = self._version
        self._journal_strings = len(self._strings)

    def restore(self, data: bytes, changes: Iterable[bytes] = ()) -> None:
        """Replace all state by a snapshot's, then apply the changes() taken after it, in order
        (changes the snapshot already includes are skipped; a gap is an error). The idle clock
        restarts at the next call."""
        state = _load(data, SNAPSHOT_FORMAT, "window snapshot")
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise SnapshotError(f"damaged window snapshot ({type(err).__name__}: {err})") from None
        for number, payload in enumerate(changes, start=1):
            delta = _load(payload, CHANGES_FORMAT, f"window changes #{number}")
            try:
                self._apply_changes(delta)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise SnapshotError(f"damaged window changes #{number} ({type(err).__name__}: {err})") from None
        self._snapshot_cache = None
        self._journal = None

    def _restore(self, state: dict) -> None:
        convert = _layout_converter(*state["layout"])
        self._strings = [str(s) for s in state["strings"]]
        self._string_index = {s: i for i, s in enumerate(self._strings)}
        watermark = state["watermark"]
        self._watermark = -math.inf if watermark is None else float(watermark)
        self.duplicates = int(state["duplicates"])
        self._host_time = {str(h): float(t) for h, t in state["host_time"].items()}
        self._sessions, self._session_heap = {}, []
        for key, events in state["sessions"]:
            session = self._new_session(key, events[0][_ID])
            for row in events:
                session.events.append(convert(row))
                session.ids.add(row[_ID])
                session.last_ts = max(session.last_ts, float(row[_TS]))
            self._file_session(session)
        self._buckets, self._bucket_heap, self._host_buckets = {}, [], {}
        for host, start, events in state["buckets"]:
            bucket = self._new_bucket(host, float(start))
            for row in events:
                bucket.events.append(convert(row))
                bucket.ids.add(row[_ID])
        self._closed = OrderedDict(
            ((tuple(slot) if isinstance(slot, list) else slot), set(ids))
            for slot, ids in state["closed"])
        self._version = int(state["version"])
        self._tails = OrderedDict()
        self._last_input = None

    def _apply_changes(self, delta: dict) -> None:
        first, last = int(delta["from"]), int(delta["to"])
        if last <= self._version:
            return                               # already in the state restored so far
        if first != self._version:
            raise SnapshotError(f"window changes from state version {first} cannot follow version "
                                f"{self._version}: a changes() record is missing")
        if last - first != len(delta["ops"]):
            raise ValueError(f"{len(delta['ops'])} changes where {last - first} were recorded")
        known = int(delta["strings_from"])
        self._strings[known:] = [str(v) for v in delta["strings"]]
        self._string_index = {v: i for i, v in enumerate(self._strings)}
        convert = _layout_converter(*delta["layout"])
        self._journal = None
        for op in delta["ops"]:
            kind = op[0]
            if kind == "e":
                _, key, row = op
                self._add_to_session(key, convert(row), row[_ID], float(row[_TS]))
            elif kind == "c":
                self._drop_session(op[1])
            elif kind == "b":
                _, host, start, row = op
                self._add_to_bucket(host, float(start), convert(row), row[_ID], float(row[_TS]))
            elif kind == "x":
                self._drop_bucket((op[1], float(op[2])))
            else:
                raise ValueError(f"unknown change {kind!r}")
        self.duplicates = int(delta["duplicates"])

    # ---------------------------------------------------------------------------------------
    # memory
    def bytes_per_open_session(self) -> float:
        """Estimated bytes held per open session (sys.getsizeof over the session objects and
        their events and ids; shared tables and caches are not counted). 0 when none is open."""
        if not self._sessions:
            return 0.0
        size = sys.getsizeof
        total = size(self._sessions)
        for key, session in self._sessions.items():
            total += size(key) + size(session) + size(session.events) + size(session.ids)
            total += sum(size(text) for text in session.events)
            total += sum(size(event_id) for event_id in session.ids)
        return total / len(self._sessions)


_EVENT_ORDER = tuple(ParsedEvent.model_fields)
_EVENT_FIELDS = frozenset(_EVENT_ORDER)
_SOURCE_FIELDS = frozenset(Source.model_fields)
_STEP_FIELDS = frozenset(Step.model_fields)
_WINDOW_FIELDS = frozenset(Window.model_fields)


def _load(data: bytes, expected_format: str, what: str) -> dict:
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise SnapshotError(f"{what} is not JSON ({err})") from None
    if not isinstance(state, dict) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SnapshotError(f"{what}: not a {expected_format} record (format {found!r})")
    return state


def _layout_converter(event_layout: list[str], source_layout: list[str]):
    """Encoded rows of a snapshot -> rows of the current layout (fields the snapshot lacks get
    the model's default)."""
    if (tuple(event_layout), tuple(source_layout)) == (_EVENT_LAYOUT, _SOURCE_LAYOUT):
        return _encode_row
    missing = object()

    def convert(row: list) -> str:
        split = len(event_layout)
        old = dict(zip(event_layout, row[:split])), dict(zip(source_layout, row[split:]))
        new = []
        for values, layout, model in zip(old, (_EVENT_LAYOUT, _SOURCE_LAYOUT), (ParsedEvent, Source)):
            for name in layout:
                value = values.get(name, missing)
                if value is missing:
                    field = model.model_fields[name]
                    if field.is_required():
                        raise ValueError(f"snapshot events lack the required field {name!r}")
                    value = field.get_default(call_default_factory=True)
                new.append(value)
        return _encode_row(new)

    return convert


def _event_time_order(e: ParsedEvent):
    return (e.timestamp, e.source.host, e.source.file_path, e.source.file_offset)


def _window(kind: str, key: str, events: list[ParsedEvent], **fields) -> Window:
    return Window(window_id=stable_id(kind, key, events[0].event_id, events[-1].event_id),
                  kind=kind, key=key, hosts=sorted({e.source.host for e in events}),
                  events=events, **fields)


# -------------------------------------------------------------------------------------------
# measurement (issue 8: window.bytes_per_open_session)
def measure_open_sessions(events: Iterable[ParsedEvent], n_sessions: int = 2000,
                          changes_after: int = 200, **core_options) -> dict[str, float]:
    """Feed events until ``n_sessions`` sessions are open (gap and idle closing disabled) and
    measure with tracemalloc the real memory the core holds per open session, apart from the
    fixed-size cache of decoded tails (reported on its own), plus snapshot size and time, and
    the size and time of changes() after ``changes_after`` more events.

    Events of keys beyond the first ``n_sessions`` are skipped, so every measured session holds
    all of its events that the input has."""
    options = {"session_gap_s": 1e12, "idle_close_s": 1e12} | core_options
    materialised = list(events)                 # built before tracing: only the core is measured
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        core = WindowCore(**options)
        chosen: set[str] = set()
        fed = 0
        later: list[ParsedEvent] = []           # events of other keys, to measure changes()
        for event in materialised:
            if not event.keys:
                continue
            if event.key not in chosen:
                if len(chosen) >= n_sessions:
                    if len(later) < changes_after:
                        later.append(event)
                    continue
                chosen.add(event.key)
            core.process(event, 0.0)             # its sliding windows are dropped at once
            fed += 1
        with_cache = tracemalloc.get_traced_memory()[0] - before
        core._tails.clear()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    started = time.perf_counter()
    snap = core.snapshot()
    snapshot_s = time.perf_counter() - started
    core._snapshot_cache = None
    started = time.perf_counter()
    core.snapshot()
    snapshot_again_s = time.perf_counter() - started
    started = time.perf_counter()
    WindowCore(**options).restore(snap)
    restore_s = time.perf_counter() - started
    sessions = max(1, core.open_sessions)
    estimate = core.bytes_per_open_session()
    for event in later:
        core.process(event, 0.0)
    started = time.perf_counter()
    delta = core.changes()
    changes_s = time.perf_counter() - started
    return {
        "open_sessions": sessions,
        "events": fed,
        "events_per_session": fed / sessions,
        "bytes_per_open_session": held / sessions,
        "estimated_bytes_per_open_session": estimate,
        "tail_cache_bytes": with_cache - held,
        "snapshot_bytes": len(snap),
        "snapshot_s": min(snapshot_s, snapshot_again_s),
        "restore_s": restore_s,
        "changes_events": len(later),
        "changes_bytes": len(delta),
        "changes_s": changes_s,
    }


def hdfs_parsed_events(log_path, hosts: int = 3, copies: int = 1) -> list[ParsedEvent]:
    """Real ParsedEvents for measurements: an HDFS log's lines dealt round-robin across
    ``hosts`` hosts (as the end-to-end replay does) and parsed by the parse core. ``copies`` > 1
    appends the log again with every block id renamed (a digit inserted), for more sessions than
    the log has blocks."""
    import re

    from services.cores.parse import ParseCore

    parser = ParseCore()
    events: list[ParsedEvent] = []
    file_offsets = [0] * hosts
    with open(log_path, encoding="utf-8") as fh:
        lines = fh.readlines()
    block = re.compile(r"blk_(-?)(\d+)")
    for copy in range(copies):
        renamed = lines if copy == 0 else [block.sub(rf"blk_\g<1>{copy}\g<2>", line) for line in lines]
        for number, line in enumerate(renamed, start=copy * len(lines)):
            index = number % hosts
            host = f"host{index}"
            source = Source(host=host, topic=f"logs.{host}", partition=0, offset=number // hosts,
                            file_path="/var/log/hadoop/hdfs.log", file_offset=file_offsets[index])
            file_offsets[index] += len(line.encode("utf-8"))
            events += parser.parse(line, host, source, 0.0)
    return events


def _main(argv: list[str] | None = None) -> int:
    """`python -m services.cores.window`: memory per open session, snapshot cost and core throughput
    on real HDFS events (issue 8's window.bytes_per_open_session)."""
    import argparse
    import os

    from services.settings import REPO_ROOT

    datasets = os.environ.get("LOGWARDEN_DATASETS", str(REPO_ROOT.parent / "shared" / "datasets"))
    parser = argparse.ArgumentParser(prog="python -m services.cores.window", description=_main.__doc__)
    parser.add_argument("--log", default=os.path.join(datasets, "hdfs", "HDFS_20000.log"))
    parser.add_argument("--sessions", type=int, default=2000, help="open sessions to measure")
    args = parser.parse_args(argv)
    if not os.path.exists(args.log):
        print(f"no such log: {args.log} (set LOGWARDEN_DATASETS)", file=sys.stderr)
        return 2
    events, copies = [], 0
    while len({e.key for e in events if e.keys}) < args.sessions:
        copies += 1
        events = hdfs_parsed_events(args.log, copies=copies)
    result = {"log": args.log, "copies": copies} | measure_open_sessions(events, n_sessions=args.sessions)

    # Throughput of process() with sliding windows on, every closing rule at its default, on
    # the log itself (a renamed copy would go back in time and be all late events).
    events = hdfs_parsed_events(args.log)
    core = WindowCore()
    started = time.perf_counter()
    emitted = sum(len(core.process(e, 0.0)) for e in events) + len(core.close_all())
    elapsed = time.perf_counter() - started
    result |= {"throughput_events": len(events), "throughput_windows": emitted,
               "events_per_s": len(events) / elapsed}
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
