"""The session book (services.cores.sessions): event-time release through a watermark, sessions,
late events, duplicates, and state that restores to exactly an uninterrupted run."""
from __future__ import annotations

import math
import random
import tracemalloc

import pytest

from services.cores.parse import ParseCore
from services.cores.sessions import (EVENT_ORDER, Closed, Released, SessionBook, SessionConfig,
                                     SessionInputError, sessions_in_order)
from services.records import ParsedEvent, Source, stable_id


def event(key: str | None, ts: float, host: str = "dn1", offset: int = 0, template: str = "E1",
          values: list[str] | None = None, path: str = "/var/log/hdfs.log") -> ParsedEvent:
    keys = [key] if key else []
    src = Source(host=host, topic=f"logs.{host}", partition=0, offset=offset, file_path=path, file_offset=offset)
    return ParsedEvent(event_id=stable_id(host, path, offset), key=key or host, keys=keys, timestamp=ts, level="INFO",
                       component="c", template_id=template, template=f"text of {template}", params=values or [],
                       message=f"line {host} {offset}", source=src)


def run(book: SessionBook, items, now: float = 0.0) -> list:
    out = []
    for offset, e in items:
        out += book.add(e, offset, now)
    return out


def released(actions) -> list[Released]:
    return [a for a in actions if isinstance(a, Released)]


def closed(actions) -> list[Closed]:
    return [a for a in actions if isinstance(a, Closed)]


NO_GRACE = dict(watermark_grace_s=0.0)


def test_events_wait_for_every_host_and_come_out_in_event_time_order():
    book = SessionBook(SessionConfig(allowed_lateness_s=0.0, watermark_grace_s=2.0))
    # dn1 ships ahead of dn2: its later events arrive first (all within the start-up grace, in
    # which both hosts show up)
    arrivals = [event("blk_1", 10, "dn1", 0, "A"), event("blk_1", 12, "dn1", 1, "C"),
                event("blk_1", 11, "dn2", 0, "B"), event("blk_1", 13, "dn2", 1, "D"),
                event("blk_1", 20, "dn1", 2, "E"), event("blk_1", 20, "dn2", 2, "F")]
    out = run(book, enumerate(arrivals))
    assert released(out) == []
    out = book.tick(now=3.0)
    # in event time, up to the slower host: 20 is not passed yet
    assert [r.step.template_id for r in released(out)] == ["A", "B", "C", "D"]
    assert book.buffered == 2
    out = book.close_all()
    assert [r.step.template_id for r in released(out)] == ["E", "F"]      # tie at 20: dn1 before dn2
    (c,) = closed(out)
    assert [s.template_id for s in c.steps] == ["A", "B", "C", "D", "E", "F"]


def test_allowed_lateness_holds_events_back_and_history_is_what_came_before():
    book = SessionBook(SessionConfig(allowed_lateness_s=5.0, window_size=2, **NO_GRACE))
    out = run(book, enumerate([event("blk_1", t, "dn1", i, f"K{i}") for i, t in enumerate([10, 11, 12, 16, 17])]))
    # watermark = 17 - 5 = 12: events before 12 are released
    rs = released(out)
    assert [r.step.template_id for r in rs] == ["K0", "K1"]
    assert [[h.template_id for h in r.history] for r in rs] == [[], ["K0"]]
    assert [r.index for r in rs] == [0, 1]
    rs = released(run(book, [(5, event("blk_1", 30, "dn1", 5, "K5"))]))
    assert [r.step.template_id for r in rs] == ["K2", "K3", "K4"]
    assert [h.template_id for h in rs[-1].history] == ["K2", "K3"]          # h = 2


def test_a_silent_host_stops_holding_the_watermark_back():
    book = SessionBook(SessionConfig(allowed_lateness_s=0.0, host_idle_s=10.0, idle_close_s=1e9, **NO_GRACE))
    run(book, [(0, event("blk_1", 100, "dn2", 0, "A"))], now=0.0)
    out = run(book, [(1, event("blk_1", 110, "dn1", 0, "B")), (2, event("blk_1", 120, "dn1", 1, "C"))], now=5.0)
    assert released(out) == []                    # dn2's newest (100) holds everything at 100 and later
    out = book.tick(now=12.0)                     # dn2 silent for 12 s (> 10), dn1 for 7 s
    assert [r.step.template_id for r in released(out)] == ["A", "B"]


def test_the_watermark_waits_for_hosts_to_show_up_after_start():
    book = SessionBook(SessionConfig(allowed_lateness_s=0.0, watermark_grace_s=2.0))
    run(book, [(0, event("blk_1", 10, "dn1", 0, "A")), (1, event("blk_1", 50, "dn1", 1, "C"))], now=0.0)
    out = run(book, [(2, event("blk_1", 20, "dn2", 0, "B"))], now=1.0)     # dn2 shows up within the grace
    assert released(out) == [] and book.late_events == 0
    out = run(book, [(3, event("blk_1", 60, "dn2", 1, "D"))], now=3.0)
    assert [r.step.template_id for r in released(out)] == ["A", "B"]          # C (50) is not passed yet


def test_a_late_event_is_counted_placed_in_event_time_and_not_judged_early():
    book = SessionBook(SessionConfig(allowed_lateness_s=0.0, host_idle_s=10.0, idle_close_s=1e9, **NO_GRACE))
    run(book, [(0, event("blk_1", 10, "dn1", 0, "A")), (1, event("blk_1", 30, "dn1", 1, "C"))], now=0.0)
    book.tick(now=100.0)          # only dn1 is known, and it is idle: everything before 30 is out
    out = run(book, [(2, event("blk_1", 20, "dn2", 0, "B"))], now=100.0)   # dn2 was never seen: late
    assert released(out) == [] and book.late_events == 1
    (c,) = closed(book.close_all())
    assert [s.template_id for s in c.steps] == ["A", "B", "C"]
    assert c.session.late == 1


def test_a_session_id_is_its_earliest_events_whatever_order_the_events_came_in():
    # A replica that re-reads a partition after a failover can see a session's earliest event
    # late; the window (and alert) ids must still be those of an uninterrupted run.
    config = SessionConfig(allowed_lateness_s=0.0, host_idle_s=10.0, idle_close_s=1e9, **NO_GRACE)
    a, b, c = event("blk_1", 10, "dn2", 0, "A"), event("blk_1", 20, "dn1", 0, "B"), event("blk_1", 30, "dn1", 1, "C")
    in_order = SessionBook(config)
    run(in_order, [(0, a), (1, b), (2, c)], now=0.0)
    (expected,) = closed(in_order.close_all())
    late_first = SessionBook(config)
    run(late_first, [(0, b), (1, c)], now=0.0)
    late_first.tick(now=100.0)
    run(late_first, [(2, a)], now=100.0)             # A, the earliest, comes last: late
    assert late_first.late_events == 1
    (got,) = closed(late_first.close_all())
    assert [s.template_id for s in got.steps] == ["A", "B", "C"]
    assert got.session.session_id == expected.session.session_id == stable_id("blk_1", a.event_id)


def test_sessions_close_on_gap_max_events_and_time_windows_on_their_end():
    book = SessionBook(SessionConfig(session_gap_s=100.0, session_max_events=3, time_window_s=60.0,
                                     allowed_lateness_s=0.0, **NO_GRACE))
    items = [event("blk_1", 0, offset=0), event("blk_1", 50, offset=1), event("blk_1", 200, offset=2),   # gap
             event("blk_2", 201, offset=3), event("blk_2", 202, offset=4), event("blk_2", 203, offset=5),  # max
             event(None, 205, offset=6), event(None, 230, offset=7), event(None, 290, offset=8)]       # time
    out = run(book, enumerate(items))
    out += book.close_all()
    got = [(c.session.key, c.reason, len(c.steps)) for c in closed(out)]
    assert ("blk_1", "gap", 2) in got and ("blk_2", "max_events", 3) in got and ("blk_1", "shutdown", 1) in got
    windows = [c for c in closed(out) if c.session.time_window]
    assert sorted((c.session.bucket, len(c.steps)) for c in windows) == [(180.0, 2), (240.0, 1)]
    assert all(c.session.key == "dn1" for c in windows)


def test_idle_closes_everything_and_the_oldest_sessions_are_evicted_past_the_cap():
    book = SessionBook(SessionConfig(idle_close_s=5.0, max_open_sessions=2, **NO_GRACE))
    out = run(book, enumerate([event(f"blk_{i}", 10 + i, offset=i) for i in range(3)]), now=0.0)
    out += book.tick(now=1.0)
    out += book.tick(now=7.0)
    reasons = sorted((c.session.key, c.reason) for c in closed(out))
    assert reasons == [("blk_0", "evicted"), ("blk_1", "idle"), ("blk_2", "idle")]


def test_duplicates_are_dropped_while_buffered_while_open_and_after_close():
    book = SessionBook(SessionConfig(allowed_lateness_s=0.0, **NO_GRACE))
    e = event("blk_1", 10, offset=0)
    run(book, [(0, e), (1, e)])                                  # repeat while buffered
    run(book, [(2, event("blk_1", 20, offset=1))])               # releases e
    run(book, [(3, e)])                                          # repeat while open
    (c,) = closed(book.close_all())
    assert len(c.steps) == 2
    run(book, [(4, e)])                                          # repeat after close
    assert book.duplicates == 3 and closed(book.close_all()) == []
    # a line naming two blocks is one event per key: not a duplicate
    two = [event("blk_a", 30, offset=9), event("blk_b", 30, offset=9)]
    run(book, [(5, two[0]), (6, two[1])])
    assert sorted(c.session.key for c in closed(book.close_all())) == ["blk_a", "blk_b"]


def test_events_it_cannot_place_are_errors():
    book = SessionBook()
    with pytest.raises(SessionInputError, match="not finite"):
        book.add(event("blk_1", math.nan), 0, 0.0)
    bad = event("blk_1", 1.0)
    bad.key = "blk_2"
    with pytest.raises(SessionInputError, match="not one of its keys"):
        book.add(bad, 1, 0.0)


# --------------------------------------------------------------------------------------------
def hdfs_events(path, hosts=3, limit=None):
    parser = ParseCore()
    events, offsets = [], [0] * hosts
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()[:limit]
    for number, line in enumerate(lines):
        i = number % hosts
        src = Source(host=f"host{i}", topic=f"logs.host{i}", partition=0, offset=number // hosts,
                     file_path="/var/log/hdfs.log", file_offset=offsets[i])
        offsets[i] += len(line.encode())
        events += parser.parse(line, f"host{i}", src, 0.0)
    return events


def arrival_order(events, hosts=3, seed=1):
    """The events as several hosts' concurrent shipping interleaves them: each host's in its own
    (file) order, the hosts mixed at random."""
    per_host = {}
    for e in events:
        per_host.setdefault(e.source.host, []).append(e)
    rng, out = random.Random(seed), []
    queues = [list(q) for q in per_host.values()]
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


def key_sequences(closed_sessions) -> dict[str, list[str]]:
    return {c.session.key: [s.template_id for s in c.steps] for c in closed_sessions if not c.session.time_window}


def test_interleaved_hosts_give_the_offline_sessions_on_hdfs_5k(datasets):
    events = hdfs_events(datasets / "hdfs" / "HDFS_5k.log")
    config = SessionConfig(session_gap_s=1e9, allowed_lateness_s=0.0, watermark_grace_s=0.0)
    offline = key_sequences(sessions_in_order(events, config))
    assert len(offline) == 110
    book = SessionBook(config)
    actions = []
    shuffled = arrival_order(events)
    for i in range(0, len(shuffled), 250):
        actions += book.add_batch([(e, i + j) for j, e in enumerate(shuffled[i:i + 250])], 0.0)
    actions += book.close_all()
    assert book.late_events == 0
    assert key_sequences(closed(actions)) == offline
    order = [EVENT_ORDER(r.step.timestamp, r.step.host, r.step.path, r.step.file_offset) for r in released(actions)]
    assert order == sorted(order)


def test_restored_state_and_replayed_input_give_the_uninterrupted_run(datasets):
    """Checkpoint at every batch as the shell does (entries written, commit at commit_offset);
    crash after any of them, restore a fresh book from the entries and consume again from the
    committed offset: the released events and closed sessions from there on are the same."""
    events = arrival_order(hdfs_events(datasets / "hdfs" / "HDFS_20000.log", limit=6000))
    config = SessionConfig(session_gap_s=30.0, allowed_lateness_s=1.0, watermark_grace_s=0.0, window_size=4)
    batches = [list(enumerate(events))[i:i + 300] for i in range(0, len(events), 300)]

    def summary(actions):
        return ([(r.session.session_id, r.index, r.step.template_id, [h.template_id for h in r.history])
                 for r in released(actions)],
                [(c.session.session_id, c.reason, [s.template_id for s in c.steps]) for c in closed(actions)])

    reference, entries_at, committed_at, outputs_at = SessionBook(config), [], [], []
    state: dict[bytes, bytes] = {}
    for batch in batches:
        outputs_at.append(reference.add_batch([(e, o) for o, e in batch], 0.0))
        for k, v in reference.changes().items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
        entries_at.append(dict(state))
        committed_at.append(reference.commit_offset(batch[-1][0] + 1))
    tail = reference.close_all()
    for crash in (3, 9, 15):
        book = SessionBook(config)
        resume = book.restore(entries_at[crash], committed_at[crash])
        assert resume == committed_at[crash]
        replayed = book.add_batch([(e, o) for o, e in enumerate(events) if o >= resume], 0.0) + book.close_all()
        expected = [a for out in outputs_at[crash + 1:] for a in out] + tail
        assert summary(replayed) == summary(expected), f"crash after batch {crash}"


def test_memory_per_open_hdfs_session_is_under_a_kilobyte(datasets):
    """What an open session costs the stage (issue 18: < 1 KB per open HDFS session), with the
    decoded-history cache off (it is bounded separately: TAIL_CACHE_SESSIONS)."""
    from services.cores import sessions as module

    events = sorted(hdfs_events(datasets / "hdfs" / "HDFS_20000.log"), key=lambda e: e.timestamp)
    book = SessionBook(SessionConfig(session_gap_s=1e9, allowed_lateness_s=0.0, watermark_grace_s=0.0))
    cache, module.TAIL_CACHE_SESSIONS = module.TAIL_CACHE_SESSIONS, 0
    try:
        for i in range(0, len(events), 500):
            book.add_batch([(e, i + j) for j, e in enumerate(events[i:i + 500])], 0.0)
        book._release(None, everything=True)
        book._tails.clear()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        restored = SessionBook(book.config)
        restored.restore(book.entries(), None)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    finally:
        module.TAIL_CACHE_SESSIONS = cache
    per_session = sum(s.size_diff for s in after.compare_to(before, "filename")) / restored.open_sessions
    assert restored.open_sessions > 1500
    assert per_session < 1024, f"{per_session:.0f} bytes per open session"
