"""The window core without Kafka: sliding, session and time windows, duplicates, closing rules,
and crash safety (snapshot/restore + replay equals an uninterrupted run)."""
from __future__ import annotations

import functools
import json
import math
import os
import random
import re
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest

from services.records import ParsedEvent, Source, Step, Window, numeric_params, stable_id
from services.settings import REPO_ROOT
from services.cores.window import SnapshotError, WindowCore, WindowInputError, measure_open_sessions

DATASETS = Path(os.environ.get("LOGWARDEN_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
HDFS_LOG = DATASETS / "hdfs" / "HDFS_20000.log"
needs_hdfs = pytest.mark.skipif(not HDFS_LOG.exists(), reason=f"{HDFS_LOG} not found")

NOW = 1_700_000_000.0          # a wall clock that never runs into the idle limit unless told


# ------------------------------------------------------------------------------------------
# factories
def event(key: str | None = None, ts: float = 0.0, *, host: str = "dn1", offset: int = 0,
          keys: list[str] | None = None, template_id: str = "E1", path: str = "/var/log/hdfs.log",
          params: list[str] | None = None) -> ParsedEvent:
    """A ParsedEvent for `key` (None: a line without session key, keyed by its host)."""
    if keys is None:
        keys = [] if key is None else [key]
    return ParsedEvent(
        event_id=stable_id(host, path, offset), key=key if key is not None else host, keys=keys,
        timestamp=ts, level="INFO", component="dfs.DataNode", template_id=template_id,
        template=f"template {template_id} <*>", params=params if params is not None else [str(offset)],
        message=f"line at {offset} of {host}", source=Source(host=host, topic=f"logs.{host}", partition=0,
                                                              offset=offset, file_path=path, file_offset=offset))


_HDFS_HEADER = re.compile(r"^(\d{6}) (\d{6}) (\d+) (\w+) ([^:]+): (.*)$")
_BLOCK = re.compile(r"blk_-?\d+")
_VARIABLE = re.compile(r"(?<![A-Za-z_])[-/.:\w]*\d[-/.:\w]*")


def hdfs_events(limit: int | None = None) -> list[ParsedEvent]:
    return list(_hdfs_events(limit))


@functools.lru_cache(maxsize=4)
def _hdfs_events(limit: int | None, hosts: int = 3) -> tuple[ParsedEvent, ...]:
    """Real HDFS lines dealt round-robin across `hosts` hosts, one ParsedEvent per block named
    (a test stand-in for the parse core: header split, digits masked into a template)."""
    out: list[ParsedEvent] = []
    file_offsets = [0] * hosts
    with open(HDFS_LOG, encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            if limit is not None and number >= limit:
                break
            line = line.rstrip("\r\n")
            header = _HDFS_HEADER.match(line)
            assert header, line
            when = datetime.strptime(header[1] + header[2], "%y%m%d%H%M%S").replace(tzinfo=timezone.utc)
            host_index = number % hosts
            host, offset = f"dn{host_index}", file_offsets[host_index]
            file_offsets[host_index] += len(line) + 1
            template = _VARIABLE.sub("<*>", header[6])
            keys = list(dict.fromkeys(_BLOCK.findall(line)))
            source = Source(host=host, topic=f"logs.{host}", partition=0, offset=number // hosts,
                            file_path="/var/log/hadoop/hdfs.log", file_offset=offset)
            for key in keys or [host]:
                out.append(ParsedEvent(
                    event_id=stable_id(host, source.file_path, offset), key=key, keys=keys,
                    timestamp=when.timestamp(), level=header[4], component=header[5],
                    template_id="T" + stable_id(template, size=8), template=template,
                    params=_VARIABLE.findall(header[6]), message=line, source=source))
    return tuple(out)


def feed(core: WindowCore, events, now: float = NOW) -> list:
    out = []
    for e in events:
        out += core.process(e, now)
    return out


def of_kind(windows, kind):
    return [w for w in windows if w.kind == kind]


def ids(window) -> list[str]:
    return [e.event_id for e in window.events]


def elements(window) -> list[tuple]:
    """(template id, time, numeric params, template text) of every element of a window, oldest
    first: a sliding window's context Steps, then its full events."""
    return [(s.template_id, s.timestamp, s.values, s.template or window.templates[s.template_id])
            for s in window.context] + as_steps(window.events)


def as_steps(events) -> list[tuple]:
    return [(e.template_id, e.timestamp, numeric_params(e.params), e.template) for e in events]


def ends(window) -> tuple[str, str]:
    """Event ids of a window's first element and of its last event (what window_id names)."""
    return (window.first_event_id or window.events[0].event_id, window.events[-1].event_id)


# ------------------------------------------------------------------------------------------
# sliding windows
def test_sliding_windows_hold_the_newest_event_and_up_to_h_before_it():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    stream = [event("blk_1", ts=float(i), offset=i) for i in range(8)]
    windows = feed(core, stream)

    assert [w.kind for w in windows] == ["sliding"] * 8
    for i, window in enumerate(windows):
        first = max(0, i - 3)
        assert window.events == [stream[i]] and len(window.context) == i - first
        assert elements(window) == as_steps(stream[first:i + 1])
        assert ends(window) == (stream[first].event_id, stream[i].event_id)
        assert window.first_event_id == (stream[first].event_id if i else None)
        assert window.first_index == first
        assert window.key == "blk_1" and window.hosts == ["dn1"]
        assert window.window_id == stable_id("sliding", "blk_1", stream[first].event_id, stream[i].event_id)
        assert (window.start, window.end) == (float(first), float(i))
    assert core.open_sessions == 1


def test_sliding_windows_follow_arrival_order_and_keys_do_not_mix():
    core = WindowCore(window_size=2, session_gap_s=600, idle_close_s=60)
    a = [event("blk_a", ts=t, offset=i) for i, t in enumerate([5.0, 3.0, 4.0])]   # late lines
    b = [event("blk_b", ts=1.0, offset=10 + i, host="dn2") for i in range(2)]
    windows = feed(core, [a[0], b[0], a[1], b[1], a[2]])

    last_a = [w for w in windows if w.key == "blk_a"][-1]
    assert elements(last_a) == as_steps(a)                      # arrival order, not time order
    assert ends(last_a) == (a[0].event_id, a[2].event_id)
    assert [w.key for w in windows] == ["blk_a", "blk_b", "blk_a", "blk_b", "blk_a"]
    last_b = [w for w in windows if w.key == "blk_b"][-1]
    assert elements(last_b) == as_steps(b) and ends(last_b) == (b[0].event_id, b[1].event_id)


def test_sliding_windows_stay_correct_when_many_sessions_interleave():
    # More active sessions than the decoded-tail cache holds: tails must be rebuilt correctly.
    core = WindowCore(window_size=4, session_gap_s=1e9, idle_close_s=60)
    rng = random.Random(7)
    history: dict[str, list[ParsedEvent]] = defaultdict(list)
    for offset in range(6000):
        key = f"blk_{rng.randrange(400)}"
        e = event(key, ts=float(offset), offset=offset)
        history[key].append(e)
        (window,) = core.process(e, NOW)
        assert elements(window) == as_steps(history[key][-5:])
        assert ends(window) == (history[key][-5:][0].event_id, e.event_id)
        assert window.first_index == len(history[key]) - len(window.context) - len(window.events)


def sliding_with_full_events(stream, **options) -> list[tuple[Window, list[ParsedEvent]]]:
    """Each sliding window the core emits for ``stream`` with the full events it stands for: the
    event ids of its elements (the session's events in arrival order, tracked here), taken from
    the closed session windows the same run emits (which list them by event time)."""
    core = WindowCore(**options)
    arrived: dict[str, list[str]] = defaultdict(list)    # key -> ids of its open session so far
    pending, full = [], {}
    for e in stream:
        for w in core.process(e, NOW):
            if w.kind == "sliding":
                arrived[w.key].append(w.events[0].event_id)
                pending.append((w, arrived[w.key][-core.window_size - 1:]))
            elif w.kind == "session":
                full.update({(w.key, x.event_id): x for x in w.events})
                del arrived[w.key]
    for w in core.close_all():
        full.update({(w.key, x.event_id): x for x in w.events})
    return [(w, [full[w.key, i] for i in event_ids]) for w, event_ids in pending]


def full_event_window(window: Window, events: list[ParsedEvent]) -> Window:
    """A sliding window as it was before context Steps: every element a full event."""
    return Window(window_id=window.window_id, session_id=window.session_id, kind="sliding", key=window.key,
                  hosts=sorted({e.source.host for e in events}), events=events, first_index=window.first_index,
                  start=min(e.timestamp for e in events), end=max(e.timestamp for e in events))


@needs_hdfs
def test_sliding_context_steps_are_the_events_before_the_newest_one():
    pairs = sliding_with_full_events(hdfs_events(4000), window_size=10, session_gap_s=600, idle_close_s=1e9)
    assert len(pairs) > 3000 and any(len(w.context) == 10 for w, _ in pairs)
    assert any(s.values for w, _ in pairs for s in w.context)        # some params are numbers
    for w, full in pairs:
        *before, newest = full
        assert [e.model_dump_json(by_alias=True) for e in w.events] == [newest.model_dump_json(by_alias=True)]
        assert len(w.context) == len(before) <= 10
        assert elements(w) == as_steps(full)
        assert set(w.templates) == {s.template_id for s in w.context}
        assert w.first_event_id == (full[0].event_id if before else None)
        assert w.window_id == stable_id("sliding", w.key, full[0].event_id, newest.event_id)
        twin = full_event_window(w, full)
        assert (w.hosts, w.start, w.end) == (twin.hosts, twin.start, twin.end)


@needs_hdfs
def test_compact_sliding_windows_are_much_smaller_than_full_event_ones():
    pairs = sliding_with_full_events(hdfs_events(4000), window_size=10, session_gap_s=600, idle_close_s=1e9)
    compact = sum(len(w.model_dump_json(by_alias=True)) for w, _ in pairs)
    # the record as it was: every element a full event, no context fields
    before = sum(len(full_event_window(w, full).model_dump_json(
        by_alias=True, exclude={"context", "templates", "first_event_id"})) for w, full in pairs)
    assert before >= 2.5 * compact, f"{before / len(pairs):.0f} -> {compact / len(pairs):.0f} bytes per window"


def test_a_template_id_with_several_texts_keeps_each_steps_text():
    # A frozen vocabulary maps every unmatched line to id "unknown", each with its own text.
    texts = ["disk <*> full", "fan <*> off", "disk <*> full", "fan <*> off", "temp <*>"]
    stream = [event("blk_1", ts=float(i), offset=i, template_id="unknown").model_copy(update={"template": t})
              for i, t in enumerate(texts)]
    last = feed(WindowCore(window_size=4, session_gap_s=600, idle_close_s=60), stream)[-1]
    assert elements(last) == as_steps(stream)
    assert last.templates == {"unknown": "disk <*> full"}
    assert [s.template for s in last.context] == [None, "fan <*> off", None, "fan <*> off"]
    assert '"template"' not in last.context[0].model_dump_json()      # no text: not in the JSON
    assert Window.model_validate_json(last.model_dump_json(by_alias=True)) == last


def test_sliding_can_be_switched_off():
    core = WindowCore(window_size=3, sliding=False, session_gap_s=600, idle_close_s=60)
    assert feed(core, [event("blk_1", ts=i, offset=i) for i in range(3)]) == []
    assert core.open_sessions == 1


# ------------------------------------------------------------------------------------------
# session windows: gap, max length, idle, shutdown
def test_session_closes_when_the_watermark_passes_its_last_event_by_the_gap():
    core = WindowCore(window_size=10, session_gap_s=100, idle_close_s=60)
    a = [event("blk_a", ts=0.0, offset=0), event("blk_a", ts=10.0, offset=1)]
    feed(core, a)
    # Another key moves the watermark; exactly gap after a's last event is not yet a gap.
    assert of_kind(feed(core, [event("blk_b", ts=110.0, offset=2)]), "session") == []
    closed = of_kind(feed(core, [event("blk_b", ts=110.5, offset=3)]), "session")

    assert len(closed) == 1
    window = closed[0]
    assert (window.key, window.closed_reason, window.start, window.end) == ("blk_a", "gap", 0.0, 10.0)
    assert ids(window) == [e.event_id for e in a]
    assert window.window_id == stable_id("session", "blk_a", a[0].event_id, a[1].event_id)
    assert core.open_sessions == 1 and core.watermark == 110.5


def test_an_event_after_the_gap_starts_a_new_session_of_the_same_key():
    core = WindowCore(window_size=10, session_gap_s=100, idle_close_s=60)
    feed(core, [event("blk_a", ts=0.0, offset=0)])
    out = core.process(event("blk_a", ts=500.0, offset=1), NOW)

    assert [(w.kind, w.closed_reason) for w in out] == [("session", "gap"), ("sliding", None)]
    assert out[1].first_index == 0 and len(out[1].events) == 1 and out[1].context == []
    assert core.open_sessions == 1


def test_an_event_older_than_the_gap_allows_forms_a_session_that_is_already_over():
    core = WindowCore(window_size=10, session_gap_s=100, idle_close_s=60)
    feed(core, [event("blk_new", ts=1000.0, offset=0)])
    out = core.process(event("blk_old", ts=10.0, offset=1), NOW)

    assert [(w.kind, w.key, w.closed_reason) for w in out] == [
        ("sliding", "blk_old", None), ("session", "blk_old", "gap")]
    assert core.open_sessions == 1


def test_session_closes_at_its_maximum_length_and_the_key_continues_in_a_new_one():
    core = WindowCore(window_size=2, session_gap_s=600, session_max_events=5, idle_close_s=60)
    stream = [event("blk_1", ts=float(i), offset=i) for i in range(12)]
    windows = feed(core, stream)

    sessions = of_kind(windows, "session")
    assert [(w.closed_reason, ids(w)) for w in sessions] == [
        ("max_events", [e.event_id for e in stream[0:5]]),
        ("max_events", [e.event_id for e in stream[5:10]])]
    assert [w.first_index for w in of_kind(windows, "sliding")][5:8] == [0, 0, 0]
    rest = core.close_all()
    assert [(w.closed_reason, ids(w)) for w in rest] == [("shutdown", [e.event_id for e in stream[10:]])]
    assert core.open_sessions == 0


def test_tick_closes_everything_after_idle_wall_time_and_gap_expiry_needs_no_tick():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=5, time_window_s=60)
    feed(core, [event("blk_1", ts=0.0, offset=0), event("blk_2", ts=1.0, offset=1),
                event(None, ts=2.0, host="bgl1", offset=2)], now=1000.0)
    assert core.tick(1004.9) == []
    assert (core.open_sessions, core.open_time_windows) == (2, 1)

    closed = core.tick(1005.0)
    assert sorted((w.kind, w.key, w.closed_reason) for w in closed) == [
        ("session", "blk_1", "idle"), ("session", "blk_2", "idle"), ("time", "bgl1", "idle")]
    assert (core.open_sessions, core.open_time_windows) == (0, 0)
    assert core.tick(2000.0) == []


def test_input_after_an_idle_pause_closes_the_old_sessions_first_even_without_tick():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=5)
    feed(core, [event("blk_1", ts=0.0, offset=0)], now=1000.0)
    out = core.process(event("blk_1", ts=1.0, offset=1), 1010.0)
    assert [(w.kind, w.closed_reason, len(w.events)) for w in out] == [
        ("session", "idle", 1), ("sliding", None, 1)]


def test_stage_input_time_keeps_a_quiet_partition_open():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=5)
    feed(core, [event("blk_1", ts=0.0, offset=0)], now=1000.0)
    assert core.tick(1008.0, stage_input_at=1007.0) == []     # other partitions had input
    assert [w.closed_reason for w in core.tick(1012.0)] == ["idle"]


# ------------------------------------------------------------------------------------------
# time windows for lines without a session key
def test_time_windows_per_host_close_when_that_hosts_event_time_passes_their_end():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60, time_window_s=60)
    first = [event(None, ts=t, host="bgl1", offset=i) for i, t in enumerate([0.0, 30.0, 59.9])]
    other = event(None, ts=61.0, host="bgl2", offset=100)
    assert feed(core, first + [other]) == []            # no sliding windows, nothing due yet

    out = core.process(event(None, ts=60.0, host="bgl1", offset=3), NOW)
    assert len(out) == 1
    window = out[0]
    assert (window.kind, window.key, window.hosts, window.closed_reason) == ("time", "bgl1", ["bgl1"], "time")
    assert (window.start, window.end, window.first_index) == (0.0, 60.0, 0)
    assert ids(window) == [e.event_id for e in first]
    assert all(e.keys == [] and e.key == "bgl1" for e in window.events)
    assert core.open_time_windows == 2


def test_a_quiet_hosts_time_window_closes_once_the_watermark_passes_its_end_by_the_gap():
    core = WindowCore(window_size=3, session_gap_s=100, idle_close_s=60, time_window_s=60)
    feed(core, [event(None, ts=10.0, host="quiet", offset=0)])
    assert feed(core, [event("blk_1", ts=160.0, offset=1)])[-1].kind == "sliding"
    out = core.process(event("blk_1", ts=160.5, offset=2), NOW)
    assert [(w.kind, w.key, w.closed_reason) for w in out] == [("time", "quiet", "time"), ("sliding", "blk_1", None)]


def test_a_late_line_for_a_closed_time_window_comes_out_on_its_own():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60, time_window_s=60)
    feed(core, [event(None, ts=10.0, host="bgl1", offset=0), event(None, ts=70.0, host="bgl1", offset=1)])
    out = core.process(event(None, ts=20.0, host="bgl1", offset=2), NOW)
    assert [(w.kind, w.start, len(w.events)) for w in out] == [("time", 0.0, 1)]
    assert core.open_time_windows == 1


# ------------------------------------------------------------------------------------------
# duplicates (at-least-once upstream)
def test_a_repeated_event_gives_no_second_sliding_window_and_is_kept_once():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    e0, e1 = event("blk_1", ts=0.0, offset=0), event("blk_1", ts=1.0, offset=1)
    windows = feed(core, [e0, e1, e0.model_copy(), e1])
    assert len(of_kind(windows, "sliding")) == 2
    assert core.duplicates == 2
    (closed,) = core.close_all()
    assert ids(closed) == [e0.event_id, e1.event_id]


def test_a_repeat_after_its_session_closed_is_still_recognised():
    core = WindowCore(window_size=3, session_gap_s=100, session_max_events=2, idle_close_s=60)
    e0, e1 = event("blk_1", ts=0.0, offset=0), event("blk_1", ts=1.0, offset=1)
    feed(core, [e0, e1])                                  # closed at max length
    assert core.open_sessions == 0
    assert feed(core, [e1, e0]) == []
    assert core.open_sessions == 0 and core.duplicates == 2


def test_a_line_naming_two_blocks_belongs_to_both_and_is_no_duplicate():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    keys = ["blk_1", "blk_2"]
    for_1 = event("blk_1", ts=0.0, offset=0, keys=keys)
    for_2 = for_1.model_copy(update={"key": "blk_2"})
    windows = feed(core, [for_1, for_2])
    assert [w.key for w in windows] == ["blk_1", "blk_2"] and core.duplicates == 0
    closed = core.close_all()
    assert [(w.key, w.events[0].keys) for w in closed] == [("blk_1", keys), ("blk_2", keys)]


def test_duplicate_time_window_lines_are_ignored():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60, time_window_s=60)
    line = event(None, ts=5.0, host="bgl1", offset=0)
    feed(core, [line, line, event(None, ts=65.0, host="bgl1", offset=1), line])
    assert core.duplicates == 2
    (closed,) = [w for w in core.close_all() if w.start == 60.0]
    assert len(closed.events) == 1


# ------------------------------------------------------------------------------------------
# ordering of closed windows
def test_closed_session_orders_interleaved_hosts_by_event_time_with_deterministic_ties():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    lines = [event("blk_1", ts=ts, host=host, offset=off)
             for ts, host, off in [(5.0, "dn2", 7), (1.0, "nn", 40), (5.0, "dn1", 9), (3.0, "dn1", 8),
                                   (5.0, "dn1", 2), (0.5, "dn3", 1)]]
    expected = sorted(lines, key=lambda e: (e.timestamp, e.source.host, e.source.file_path, e.source.file_offset))
    for order in range(4):
        shuffled = lines[:]
        random.Random(order).shuffle(shuffled)
        core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
        feed(core, shuffled)
        (closed,) = core.close_all()
        assert ids(closed) == [e.event_id for e in expected]
        assert closed.hosts == ["dn1", "dn2", "dn3", "nn"]
        assert (closed.start, closed.end) == (0.5, 5.0)
        assert closed.window_id == stable_id("session", "blk_1", expected[0].event_id, expected[-1].event_id)


def test_windows_carry_every_field_of_their_events_byte_for_byte():
    core = WindowCore(window_size=1, session_gap_s=600, idle_close_s=60)
    first = event("blk_1", ts=12.25, host="dn7", offset=77, template_id="E5", params=["a", "é"],
                  keys=["blk_1", "blk_9"])
    first = first.model_copy(update={"level": None, "source": first.source.model_copy(update={"kafka_timestamp": 99.5})})
    rest = [event("blk_1", ts=13.0 + i, offset=100 + i) for i in range(3)]
    windows = feed(core, [first] + rest) + core.close_all()

    # Every event of a closed window comes from the compact form; it must serialise exactly
    # like the event that came in. A sliding window's context is decoded from it too.
    assert windows[1].context == [Step(template_id="E5", timestamp=12.25, values=[])]
    assert windows[1].templates == {"E5": first.template} and windows[1].first_event_id == first.event_id
    assert windows[1].hosts == ["dn1", "dn7"]
    closed = windows[-1]
    assert [e.model_dump_json(by_alias=True) for e in closed.events] == [
        e.model_dump_json(by_alias=True) for e in [first] + rest]
    dumped = json.loads(closed.model_dump_json(by_alias=True))["events"][0]
    assert dumped["source"]["log.file.path"] == "/var/log/hdfs.log" and dumped["source"]["log.offset"] == 77


def test_session_id_names_a_session_in_all_its_windows():
    core = WindowCore(window_size=2, session_gap_s=600, session_max_events=3, idle_close_s=60)
    stream = [event("blk_1", ts=float(i), offset=i) for i in range(5)]
    windows = feed(core, stream) + core.close_all()
    first_session = stable_id("blk_1", stream[0].event_id)
    second_session = stable_id("blk_1", stream[3].event_id)
    assert [(w.kind, w.session_id) for w in windows] == (
        [("sliding", first_session)] * 3 + [("session", first_session)]
        + [("sliding", second_session)] * 2 + [("session", second_session)])


@pytest.mark.slow
@needs_hdfs
def test_hdfs_20000_lines_dealt_across_three_hosts_give_one_session_per_block():
    stream = hdfs_events()
    core = WindowCore(window_size=10, session_gap_s=600, idle_close_s=60, sliding=False)
    closed = feed(core, stream) + core.close_all()
    sessions = of_kind(closed, "session")

    lines_per_block: dict[str, set[str]] = defaultdict(set)
    for e in stream:
        if e.keys:
            lines_per_block[e.key].add(e.event_id)
    assert len(sessions) == len(lines_per_block) == 1782
    for window in sessions:
        assert set(ids(window)) == lines_per_block[window.key]
        assert len(window.events) == len(lines_per_block[window.key])
        times = [e.timestamp for e in window.events]
        assert times == sorted(times)


# ------------------------------------------------------------------------------------------
# crash safety
def _stream_with_disorder_and_repeats(seed: int, limit: int) -> list[ParsedEvent]:
    """Real HDFS events, hosts slightly out of step (local shuffles) and some events repeated,
    as at-least-once delivery from several host topics produces."""
    rng = random.Random(seed)
    stream = hdfs_events(limit)
    for start in range(0, len(stream), 8):                 # lines of neighbouring hosts swap
        chunk = stream[start:start + 8]
        rng.shuffle(chunk)
        stream[start:start + 8] = chunk
    for _ in range(len(stream) // 20):
        i = rng.randrange(len(stream))
        stream.insert(min(len(stream), i + rng.randrange(1, 30)), stream[i])
    return stream


def _closed(windows) -> dict[str, str]:
    return {w.window_id: w.model_dump_json() for w in windows if w.kind != "sliding"}


def _sliding(windows) -> dict[str, str]:
    return {w.window_id: w.model_dump_json() for w in windows if w.kind == "sliding"}


# A short gap and length make sessions close by gap and by length inside the stream.
CRASH_OPTIONS = dict(window_size=4, session_gap_s=20, session_max_events=12, idle_close_s=1e9, time_window_s=30)


def _uninterrupted(stream):
    reference = WindowCore(**CRASH_OPTIONS)
    windows = feed(reference, stream) + reference.close_all()
    assert {"gap", "max_events", "shutdown"} <= {w.closed_reason for w in windows}
    return reference, windows


def _assert_same_windows(produced, expected):
    assert _closed(produced) == _closed(expected)
    assert _sliding(produced) == _sliding(expected)


@needs_hdfs
@pytest.mark.parametrize("seed", range(6))
def test_restore_and_replay_equals_an_uninterrupted_run(seed):
    rng = random.Random(seed)
    stream = _stream_with_disorder_and_repeats(seed, limit=2500)
    reference, expected = _uninterrupted(stream)

    cut = rng.randrange(1, len(stream))
    crash = rng.randrange(cut, len(stream) + 1)            # the input after cut is uncommitted
    before = WindowCore(**CRASH_OPTIONS)
    produced = feed(before, stream[:cut])
    saved = before.snapshot()
    produced += feed(before, stream[cut:crash])            # produced, then lost with the process
    after = WindowCore(**CRASH_OPTIONS)
    after.restore(saved)
    assert after.snapshot() == saved
    produced += feed(after, stream[cut:]) + after.close_all()

    _assert_same_windows(produced, expected)
    assert after.duplicates == reference.duplicates


@needs_hdfs
@pytest.mark.parametrize("seed", range(4))
def test_a_snapshot_and_the_changes_after_it_restore_to_the_same_state(seed):
    rng = random.Random(seed)
    stream = _stream_with_disorder_and_repeats(seed, limit=2000)
    _, expected = _uninterrupted(stream)

    # snapshot at one point, changes() at later commits, a crash somewhere after the last one
    points = sorted(rng.sample(range(1, len(stream)), 5))
    core = WindowCore(**CRASH_OPTIONS)
    produced = feed(core, stream[:points[0]])
    base, changes = core.snapshot(), []
    for start, end in zip(points, points[1:]):
        produced += feed(core, stream[start:end])
        changes.append(core.changes())
    live_snapshot = core.snapshot()
    produced += feed(core, stream[points[-1]:])             # lost with the crash

    restored = WindowCore(**CRASH_OPTIONS)
    restored.restore(base, changes)
    assert restored.snapshot() == live_snapshot
    produced += feed(restored, stream[points[-1]:]) + restored.close_all()
    _assert_same_windows(produced, expected)


def test_changes_cost_what_came_in_not_the_open_state():
    core = WindowCore(window_size=3, session_gap_s=1e9, idle_close_s=60)
    feed(core, [event(f"blk_{i}", ts=float(i), offset=i) for i in range(500)])
    base = core.snapshot()
    feed(core, [event("blk_new", ts=600.0, offset=600)])
    delta = core.changes()
    assert len(delta) < len(base) / 50
    assert json.loads(core.changes())["ops"] == []          # nothing new since the last call


def test_changes_that_do_not_follow_the_state_are_refused_and_old_ones_skipped():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    with pytest.raises(RuntimeError, match="take one first"):
        core.changes()
    feed(core, [event("blk_1", ts=0.0, offset=0)])
    base = core.snapshot()
    feed(core, [event("blk_1", ts=1.0, offset=1)])
    first = core.changes()
    feed(core, [event("blk_1", ts=2.0, offset=2)])
    second = core.changes()
    later_base = core.snapshot()

    with pytest.raises(SnapshotError, match="a changes\\(\\) record is missing"):
        WindowCore().restore(base, [second])
    restored = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    restored.restore(later_base, [first, second])           # both already in the snapshot
    assert restored.snapshot() == later_base
    (closed,) = restored.close_all()
    assert len(closed.events) == 3


def test_without_snapshots_no_journal_is_kept():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    feed(core, [event("blk_1", ts=float(i), offset=i) for i in range(50)])
    assert core._journal is None


@needs_hdfs
def test_snapshot_restore_at_every_step_of_a_stream_changes_nothing():
    stream = _stream_with_disorder_and_repeats(11, limit=300)
    options = dict(window_size=3, session_gap_s=15, session_max_events=8, idle_close_s=1e9)
    reference = WindowCore(**options)
    expected = feed(reference, stream) + reference.close_all()

    core, produced = WindowCore(**options), []
    for e in stream:
        restored = WindowCore(**options)
        restored.restore(core.snapshot())
        core = restored
        produced += core.process(e, NOW)
    produced += core.close_all()
    assert [w.model_dump_json() for w in produced] == [w.model_dump_json() for w in expected]


def test_a_snapshot_from_an_older_event_layout_restores_with_defaults():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    feed(core, [event("blk_1", ts=1.0, offset=0), event("blk_1", ts=2.0, offset=1)])
    state = json.loads(core.snapshot())
    events_layout, source_layout = state["layout"]
    dropped = len(events_layout) + source_layout.index("kafka_timestamp")
    state["layout"][1] = [name for name in source_layout if name != "kafka_timestamp"]
    for _, rows in state["sessions"]:
        for row in rows:
            del row[dropped]

    restored = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    restored.restore(json.dumps(state).encode())
    (closed,) = restored.close_all()
    (expected,) = core.close_all()
    assert closed.model_dump_json() == expected.model_dump_json()


def test_restore_restarts_the_idle_clock():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=5)
    feed(core, [event("blk_1", ts=0.0)], now=1000.0)
    restored = WindowCore(window_size=3, session_gap_s=600, idle_close_s=5)
    restored.restore(core.snapshot())
    assert restored.tick(5000.0) == [] and restored.open_sessions == 1
    assert [w.closed_reason for w in restored.tick(5005.0)] == ["idle"]


def test_snapshot_of_an_unchanged_core_is_reused_and_changes_after_input():
    core = WindowCore(window_size=3, session_gap_s=600, idle_close_s=60)
    feed(core, [event("blk_1", ts=0.0, offset=0)])
    first = core.snapshot()
    assert core.snapshot() is first
    core.process(event("blk_1", ts=1.0, offset=1), NOW)
    assert core.snapshot() != first


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a logwarden.window/1 record"),
    (b'{"format": "logwarden.parse/1"}', "not a logwarden.window/1 record"),
    (b'{"format": "logwarden.window/1", "strings": []}', "damaged window snapshot"),
])
def test_a_bad_snapshot_is_refused_with_a_clear_error(data, message):
    with pytest.raises(SnapshotError, match=message):
        WindowCore().restore(data)


# ------------------------------------------------------------------------------------------
# bad input, ids
@pytest.mark.parametrize("bad, message", [
    (event("blk_1").model_copy(update={"key": "blk_2"}), "not one of its keys"),
    (event(None, host="dn1").model_copy(update={"key": "dn9"}), "must be its host"),
    (event("blk_1").model_copy(update={"timestamp": math.nan}), "not finite"),
])
def test_events_the_core_cannot_place_are_refused(bad, message):
    core = WindowCore()
    with pytest.raises(WindowInputError, match=message):
        core.process(bad, NOW)
    assert core.open_sessions == 0 and core.watermark is None


@needs_hdfs
def test_window_ids_are_deterministic_and_distinct():
    stream = hdfs_events(1500)
    runs = []
    for _ in range(2):
        core = WindowCore(window_size=5, session_gap_s=30, idle_close_s=1e9)
        runs.append(feed(core, stream) + core.close_all())
    assert [w.window_id for w in runs[0]] == [w.window_id for w in runs[1]]
    assert len({w.window_id for w in runs[0]}) == len(runs[0])
    for w in runs[0]:
        assert w.window_id == stable_id(w.kind, w.key, *ends(w))


# ------------------------------------------------------------------------------------------
# memory
@needs_hdfs
def test_open_session_state_is_small_and_the_estimate_is_close():
    result = measure_open_sessions(hdfs_events(2500), n_sessions=150)
    assert result["open_sessions"] == 150
    # A ParsedEvent object alone takes over 2 KB; the compact form must stay well under 1 KB.
    bytes_per_event = result["bytes_per_open_session"] / result["events_per_session"]
    assert bytes_per_event < 1000, result
    assert 0.5 < result["estimated_bytes_per_open_session"] / result["bytes_per_open_session"] < 2, result
