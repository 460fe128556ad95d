"""The whole TrainTicket day 2023-01-30 through the broker and the multimodal stages (issue 13's
"done when"): `replay --traces --metrics --fast` writes OTLP as a Collector would, the otlp,
assemble and join stages run (one process, a thread each), and what comes out is compared with
the CSVs.

    python -m bench.run --only day

Figures: spans and metric points replayed; trace records on logwarden.traces (distinct trace ids
against the CSVs' distinct trace ids, spans per trace against the CSVs' distinct (trace, span)
pairs: the day's trace CSV repeats 7,272 rows exactly, and the stream counts a repeat once);
chunks against the (pod, minute) units with metrics; spans/s and metric points/s from the
replay's start to the last output record (the whole path, not one stage).
"""
from __future__ import annotations

import gzip
import csv
import threading
import time
from collections import defaultdict
from pathlib import Path

SECTION = "day"
DAY = "trainticket_2023-01-30"


def truth(day: Path) -> dict[str, set[str]]:
    spans: dict[str, set[str]] = defaultdict(set)
    for path in sorted((day / "trace").glob("*.csv.gz")):
        with gzip.open(path, "rt", newline="") as fh:
            reader = csv.reader(fh)
            next(reader)
            for row in reader:
                spans[row[0]].add(row[1])
    return spans


def _read(settings, topic: str, record_type):
    """Every record of ``topic`` decoded, and the newest Kafka timestamp among them (ms)."""
    from bench.e2e_bench import _read_all
    from services.records import decode

    out, last_ms = [], 0
    for m in _read_all(settings.kafka_config(), topic, f"{settings.group_prefix}.reader"):
        out.append(decode(m.value(), record_type))
        last_ms = max(last_ms, m.timestamp()[1])
    return out, last_ms


def evaluate(data: Path, bootstrap: str, workdir: Path) -> dict:
    from bench.eval_assemble import isolated_settings
    from services import stages
    from services.records import ChunkRecord, TraceRecord
    from services.shell import ensure_topics
    from toolkit.otlp_replay import replay_otlp

    day = data / DAY
    run_settings = isolated_settings(bootstrap, state_dir=workdir / "state", metrics_port=0, host_idle_s=10.0)
    names = {f"otlp_{s}_topic": f"{run_settings.group_prefix}.otlp_{s}" for s in ("spans", "metrics", "logs")}
    settings = run_settings.model_copy(update=names)
    ensure_topics(settings, extra=list(names.values()))
    stop = threading.Event()
    runner = threading.Thread(target=stages.run, args=(["otlp", "assemble", "join"], settings),
                              kwargs={"exit_when_idle": 30.0, "stop": stop}, daemon=True)
    runner.start()
    time.sleep(10)                          # the three groups joined, assemble announced
    started = time.time()
    counts = replay_otlp(settings, [day / "trace"], day / "metric", speed=None, progress=True)
    replayed = time.time() - started
    runner.join(1800)                       # ends 30 s after its input did
    stop.set()
    traces, last_trace_ms = _read(settings, settings.traces_topic, TraceRecord)
    chunks, last_chunk_ms = _read(settings, settings.chunks_topic, ChunkRecord)
    want = truth(day)
    by_id: dict[str, set[str]] = {}
    repeats = 0
    for t in traces:
        if t.trace_id in by_id:
            repeats += 1
        by_id.setdefault(t.trace_id, set()).update(s.span_id for s in t.spans)
    whole = sum(1 for tid, spans in want.items() if by_id.get(tid) == spans)
    done_s = max(last_trace_ms, last_chunk_ms) / 1000 - started
    units = {(c.entity, round(c.end / 60)) for c in chunks}
    return {"spans_replayed": counts.spans, "metric_points_replayed": counts.metric_points,
            "metric_rows_replayed": counts.metric_rows, "replay_seconds": round(replayed, 1),
            "csv_trace_ids": len(want), "csv_distinct_spans": sum(len(s) for s in want.values()),
            "trace_records": len(traces), "distinct_trace_ids": len(by_id), "trace_records_repeated": repeats,
            "traces_with_every_span": whole,
            "traces_closed_reason": {r: sum(t.closed_reason == r for t in traces) for r in ("complete", "gap", "evicted", "shutdown")},
            "chunks": len(chunks), "chunk_units": len(units),
            "chunk_entities": len({c.entity for c in chunks}),
            "seconds_to_last_output": round(done_s, 1),
            "spans_per_s": round(counts.spans / done_s), "metric_points_per_s": round(counts.metric_points / done_s)}


def run(ctx) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="logwarden-day-") as tmp:
        report = evaluate(ctx.data, ctx.broker().bootstrap, Path(tmp))
    return {f"{SECTION}.report": report, f"{SECTION}.command": "python -m bench.run --only day"}


def render(results: dict):
    r = results.get(f"{SECTION}.report")
    yield "## The whole TrainTicket day through otlp, assemble and join"
    yield ""
    if not r:
        yield "Not measured."
        return
    yield (f"`replay --traces --metrics --fast` of 2023-01-30 ({r['spans_replayed']:,} spans, "
           f"{r['metric_points_replayed']:,} metric points in {r['metric_rows_replayed']:,} rows; replay "
           f"{r['replay_seconds']} s) into the otlp, assemble and join stages (one process, 2 shared cores, a local "
           "broker):")
    yield ""
    yield "| figure | stream | CSVs |"
    yield "| --- | ---: | ---: |"
    yield f"| distinct trace ids on logwarden.traces | {r['distinct_trace_ids']:,} | {r['csv_trace_ids']:,} |"
    yield f"| traces with exactly the CSVs' spans | {r['traces_with_every_span']:,} | {r['csv_trace_ids']:,} |"
    yield f"| trace records (repeated ids) | {r['trace_records']:,} ({r['trace_records_repeated']:,}) | |"
    yield f"| closed as | {r['traces_closed_reason']} | |"
    yield f"| chunks (pod, minute units; pods) | {r['chunks']:,} ({r['chunk_units']:,}; {r['chunk_entities']}) | |"
    yield (f"| spans/s, metric points/s, replay start to last output | {r['spans_per_s']:,}, "
           f"{r['metric_points_per_s']:,} | |")
    yield ""
    yield f"Command: `{results.get(f'{SECTION}.command')}`."
