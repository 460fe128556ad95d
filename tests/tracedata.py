"""A real slice of the TrainTicket 2023-01-30 day (traces + metrics) and the timeline records a
collector and the OTLP stage would make of it, for the assemble and join tests.

The slice is written to a temporary directory in TrainTicket's layout (trace/, metric/), so the
reference builder (models.chunks.read_observations) and the stream read exactly the same rows."""
from __future__ import annotations

import csv
import gzip
import random
from collections import defaultdict
from pathlib import Path

from models.faults import service_of
from models.microservices import read_logs, read_metrics, read_traces
from services.records import LogSample, MetricSample, SpanGroup, SpanRecord

DAY = "trainticket_2023-01-30"
SLICE_START = 1675078800          # 2023-01-30 11:40:00 UTC, in trace/11.csv.gz


def write_slice(datasets: Path, out: Path, start: float = SLICE_START, minutes: int = 6, logs: bool = False) -> Path:
    """Traces whose first span starts in [start, start + minutes) (all their spans) and every
    pod's metric rows stamped in [start, start + minutes + 1 min), in ``out``/trace, ``out``/metric.

    The day's CSV repeats some span rows exactly (the same trace and span id written twice: 33
    rows in the default slice). The stream counts a repeated span once (it is what an
    at-least-once replay looks like), the reference builder would count it twice, so the slice
    keeps each (trace id, span id) row once."""
    day = datasets / DAY
    end = start + minutes * 60
    (out / "trace").mkdir(parents=True, exist_ok=True)
    (out / "metric").mkdir(parents=True, exist_ok=True)
    with gzip.open(day / "trace" / "11.csv.gz", "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    first: dict[str, int] = {}
    for r in rows:
        first[r[0]] = min(first.get(r[0], int(r[5])), int(r[5]))
    keep = {t for t, s in first.items() if start * 1e9 <= s < end * 1e9}
    seen: set[tuple[str, str]] = set()
    with open(out / "trace" / "slice.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            if r[0] in keep and (r[0], r[1]) not in seen:
                seen.add((r[0], r[1]))
                w.writerow(r)
    for path in sorted((day / "metric").glob("*_metric.csv")):
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            ts = header.index("TimeStamp")
            kept = [r for r in reader if start <= float(r[ts]) < end + 60]
        if kept:
            with open(out / "metric" / path.name, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(header)
                w.writerows(kept)
    if logs:            # the day's log CSVs (a file per minute, some minutes missing) of the slice
        (out / "log").mkdir(parents=True, exist_ok=True)
        with open(out / "log" / "slice.csv", "w", newline="") as dst:
            w = csv.writer(dst)
            for n, path in enumerate(sorted((day / "log").glob("*_log.csv.gz"))):
                with gzip.open(path, "rt", newline="") as fh:
                    reader = csv.reader(fh)
                    header = next(reader)
                    if n == 0:
                        w.writerow(header)
                    at = header.index("TimeUnixNano")
                    w.writerows(r for r in reader if start * 1e9 <= int(r[at]) < end * 1e9)
    return out


def log_samples(data: Path) -> list[LogSample]:
    """The slice's log lines as the parse stage templates them (the reference's order: time, pod,
    line), one LogSample per line."""
    from services.cores.parse import ParseCore, ParseError
    from services.records import Source

    core = ParseCore()
    records = sorted(read_logs(sorted((data / "log").glob("*.csv"))), key=lambda r: (r.timestamp, r.pod, r.message))
    samples = []
    for offset, r in enumerate(records):
        source = Source(host=r.pod, topic="logs", partition=0, offset=offset, file_path=f"{r.pod}.log",
                        file_offset=offset)
        try:
            event = core.parse(r.message, r.pod, source, r.timestamp)[0]
        except ParseError:
            continue
        samples.append(LogSample(entity=r.pod, service=service_of(r.pod), events=[(r.timestamp, event.template_id)], levels=[event.level],
                                 templates={event.template_id: event.template}, source=f"otlp_logs:0:{offset}"))
    return samples


def span_groups(data: Path, seed: int = 7, jitter_s: float = 0.5, sources: int = 3) -> list[SpanGroup]:
    """Every trace of the slice as a collector ships it: one group per (trace, pod) (each service
    exports its own spans), a pod's spans split further into groups of at most 4, in the order
    they would arrive (by the group's newest span end) shuffled by up to ``jitter_s``."""
    rng = random.Random(seed)
    groups = []
    for trace in read_traces(sorted((data / "trace").glob("*.csv"))):
        by_pod: dict[str, list] = defaultdict(list)
        for s in trace.spans:
            by_pod[s.pod].append(SpanRecord(span_id=s.span_id, service=s.service, pod=s.pod, operation=s.operation,
                                            start_ns=s.start_ns, end_ns=s.end_ns, parent_id=s.parent_id))
        for pod, spans in sorted(by_pod.items()):
            rng.shuffle(spans)
            for i in range(0, len(spans), 4):
                part = spans[i:i + 4]
                arrival = max(s.end_ns for s in part) / 1e9 + rng.uniform(0, jitter_s)
                groups.append((arrival, trace.trace_id, part))
    groups.sort(key=lambda g: g[0])
    out = []
    for n, (_, tid, part) in enumerate(groups):
        out.append(SpanGroup(trace_id=tid, spans=part, source=f"otlp_spans:{n % sources}:{n // sources}"))
    return out


def metric_samples(data: Path) -> list[MetricSample]:
    """Every metric row of the slice as a MetricSample (by time, then pod)."""
    samples = []
    for pod, rows in read_metrics(sorted((data / "metric").glob("*.csv"))).items():
        for i, ts in enumerate(rows.timestamps):
            samples.append(MetricSample(entity=pod, service=service_of(pod), timestamp=ts,
                                        values={c: v[i] for c, v in rows.channels.items()}))
    samples.sort(key=lambda m: (m.timestamp, m.entity))
    for n, m in enumerate(samples):
        m.source = f"otlp_metrics:0:{n}"
    return samples
