"""The sessions core (services.cores.sessions.SessionBook + services.cores.detect.SessionJudge)
without Kafka: memory per open session, the changelog's bytes, and events/s with DeepLog judging.

    python -m bench.sessions_bench --data ../shared/datasets [--models MODEL_DIR] [--json OUT]

Input: HDFS_20000.log dealt over 3 hosts by writer thread, as `make demo` replays it
(toolkit.replay.deal_lines), parsed by the parse core with the HDFS catalog
(toolkit.reference.parse_files): 20,000 events of 1,782 blocks.

memory      the book with sessions that never close (gap and idle close at 1e12 s): every event
            taken in, every source then marked past the last event, so all of them are released
            into their open sessions; tracemalloc's traced bytes of the book / open sessions.
            ``changelog_bytes_per_open_session``: keys + values of book.entries() per session
            (what a new owner reads back from the changelog topic).
throughput  the stage's loop on batches of 2,000 events (take, add_batch's release, judge):
            events per CPU second of this process (time.process_time), with the default session
            rules (each block closes at its gap in event time) and DeepLog in MODEL_DIR judging
            every released event and every closed session; without MODEL_DIR, the book alone.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench import save_report

COMMAND = "python -m bench.sessions_bench --data ../shared/datasets --models MODEL_DIR"
HOSTS = ("nn1", "dn1", "dn2")
BATCH = 2000


def hdfs_events(data: Path, workdir: Path):
    from services.settings import load_settings
    from toolkit.reference import parse_files
    from toolkit.replay import deal_lines

    hdfs = data / "hdfs"
    settings = load_settings(template_catalog=hdfs / "HDFS_templates.csv")
    files = deal_lines(hdfs / "HDFS_20000.log", list(HOSTS), workdir)
    events = parse_files(settings, files)
    # the order parse's output has on one events partition: host by host is the worst case for
    # the reorder buffer; interleave by event time as live hosts ship
    events.sort(key=lambda e: (e.timestamp, e.source.host, e.source.offset))
    return settings, events


def measure_memory(events) -> dict:
    from services.cores.sessions import SessionBook, SessionConfig

    config = SessionConfig(session_gap_s=1e12, idle_close_s=1e18, max_open_sessions=10**7)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    book = SessionBook(config)
    now = time.time()
    book.add_batch((), now)              # the watermark's wall-clock grace starts here
    for offset, event in enumerate(events):
        book.take(event, offset, now)
    sources = {f"{e.source.topic}:{e.source.partition}" for e in events}
    last = max(e.timestamp for e in events) + 3600
    for i, source in enumerate(sorted(sources)):
        book.mark(source, last, False, now + 10, len(events) + i)
    released = book.add_batch((), now + 10)
    del released
    gc.collect()
    with_cache = tracemalloc.get_traced_memory()[0] - before
    book.changes()                       # a checkpoint: the dirty set and new table entries go
    tail_cache = len(book._tails)
    book._tails.clear()                  # the decoded-tail cache: bounded (TAIL_CACHE_SESSIONS), not per session
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    entries = book.entries()
    sessions = book.open_sessions
    return {"open_sessions": sessions, "events": len(events), "events_per_session": round(len(events) / sessions, 1),
            "buffered_after_release": book.buffered, "traced_bytes": traced,
            "bytes_per_open_session": round(traced / sessions),
            "tail_cache_sessions": tail_cache, "tail_cache_bytes": with_cache - traced,
            "changelog_bytes": sum(len(k) + len(v) for k, v in entries.items()),
            "changelog_bytes_per_open_session": round(sum(len(k) + len(v) for k, v in entries.items()) / sessions)}


def measure_throughput(events, models_dir: Path | None, repeats: int = 3, memo_size: int | None = None) -> dict:
    """Events per CPU second through a book (and a judge, with ``models_dir``; ``memo_size``: the
    judge's NormalMemo size, 0 = none; default: the stage's)."""
    from services.cores.detect import NORMAL_MEMO_SIZE, ModelSet, SessionJudge
    from services.cores.sessions import SessionBook, SessionConfig

    models = {}
    if models_dir is not None:
        served = ModelSet(models_dir, "cpu", modality="logs")
        served.refresh()
        models = {k: v for k, v in served.loaded.items() if k == "deeplog"}
    best = None
    for _ in range(repeats):
        book = SessionBook(SessionConfig())
        judge = SessionJudge(models, memo_size=NORMAL_MEMO_SIZE if memo_size is None else memo_size)
        now = time.time()
        book.add_batch((), now)          # the watermark's wall-clock grace starts here ...
        now += 10                        # ... and is over: batches come as from a running stage
        sources = sorted({f"{e.source.topic}:{e.source.partition}" for e in events})
        counts = {"released": 0, "closed": 0, "alerts": 0}
        started = time.process_time()
        for start in range(0, len(events), BATCH):
            batch = events[start:start + BATCH]
            for offset, event in enumerate(batch, start):
                actions = book.take(event, offset, now)
                if actions:
                    counts["alerts"] += len(judge.judge(actions, now))
            newest = batch[-1].timestamp
            for i, source in enumerate(sources):      # what parse's watermark records say
                book.mark(source, newest, False, now, len(events) + start + i)
            actions = book.add_batch((), now)
            counts["released"] += sum(1 for a in actions if type(a).__name__ == "Released")
            counts["closed"] += sum(1 for a in actions if type(a).__name__ == "Closed")
            counts["alerts"] += len(judge.judge(actions, now)) if models else 0
        actions = book.close_all("shutdown")
        counts["closed"] += sum(1 for a in actions if type(a).__name__ == "Closed")
        counts["alerts"] += len(judge.judge(actions, now)) if models else 0
        seconds = time.process_time() - started
        memo = {name: {"hits": m.hits, "misses": m.misses, "entries": len(m.verdicts)}
                for name, (_, _, m) in judge._memos.items()}
        if best is None or seconds < best[0]:
            best = (seconds, counts, memo)
    seconds, counts, memo = best
    return {"events": len(events), "cpu_seconds": round(seconds, 3), "events_per_cpu_s": round(len(events) / seconds),
            "detectors": sorted(models), **counts, **({"memo": memo} if memo else {})}


def run(data: Path, models_dir: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="logwarden-sessions-") as tmp:
        _, events = hdfs_events(data, Path(tmp))
        out = {f"sessions.memory.{k}": v for k, v in measure_memory(events).items()}
        out |= {f"sessions.core.{k}": v for k, v in measure_throughput(events, None).items()}
        if models_dir is not None:
            out |= {f"sessions.judged.{k}": v for k, v in measure_throughput(events, models_dir).items()}
            out |= {f"sessions.judged_no_memo.{k}": v
                    for k, v in measure_throughput(events, models_dir, memo_size=0).items()}
    out["sessions.bytes_per_open_session"] = out["sessions.memory.bytes_per_open_session"]
    out["sessions.gpu"] = "not measured: no GPU on this machine"
    out["sessions.command"] = COMMAND
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sessions_bench", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--models", type=Path, help="a MODEL_DIR with a DeepLog version (judged throughput)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    print(save_report(run(args.data, args.models), args.json, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
