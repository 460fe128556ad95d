"""Readers of microservice data laid out as TrainTicket's days are (../shared/datasets/
trainticket_2023-01-30/, nezha_trainticket/): the one place that knows those CSVs.

A data directory holds, at any depth, folders named ``metric/`` (one CSV per pod, one row per
minute), ``trace/`` and ``log/`` (any number of CSV files of those columns, plain or .gz, under
any names). Every reader turns a malformed file into a one-line UsageError naming it.

    trace  TraceID,SpanID,ParentID,PodName,OperationName,StartTimeUnixNano,EndTimeUnixNano,Duration
           (ParentID "root" for a root span; Duration in µs)
    metric Time,TimeStamp,PodName,<channel>,...     (TimeStamp: epoch s; front_service.csv has
           ServiceName instead of PodName and is the gateway's view, not a pod's)
    log    Timestamp,TimeUnixNano,Node,PodName,Container,TraceID,SpanID,Log
           (Log: Docker's JSON {"log": "<line>\\n", "stream", "time"}; the line's own clock is UTC+8,
           TimeUnixNano is the record's true time)

A Hadoop lab recording (`logwarden lab record`, toolkit/lab/record.py) has the same metric/
folder and a log/ folder of raw log4j files instead, one per host: ``log/<host>.log`` (or
``.log.gz``), the daemon's lines as it wrote them (``2026-12-01 23:05:57,169 INFO <logger>: ...``,
UTC). ``find_layout`` lists those files in ``Layout.log`` beside any CSVs, and ``read_logs``
reads each by its name: a CSV as above, a ``.log`` as raw lines (``read_raw_log``), both as
``LogRecord``s. A raw line's record: timestamp from its header, pod = node = the host (the file
name without .log), no trace or span ids; lines without a header (a Java stack trace, a
multi-line message) are joined to the line above, as Filebeat's multiline setting joins them.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from models.base import Span, Trace
from models.faults import service_of
from services.settings import UsageError

KINDS = ("metric", "trace", "log")
TRACE_COLUMNS = ("TraceID", "SpanID", "ParentID", "PodName", "OperationName", "StartTimeUnixNano",
                 "EndTimeUnixNano", "Duration")
LOG_COLUMNS = ("Timestamp", "TimeUnixNano", "Node", "PodName", "Container", "TraceID", "SpanID", "Log")
METRIC_KEYS = ("Time", "TimeStamp", "PodName")

csv.field_size_limit(sys.maxsize)        # log lines with stack traces exceed csv's 128 KB default


@dataclass
class Layout:
    """The CSV files of a data directory, by kind, in a stable (sorted) order."""
    root: Path
    metric: list[Path] = field(default_factory=list)
    trace: list[Path] = field(default_factory=list)
    log: list[Path] = field(default_factory=list)


def _is_csv(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".csv") or path.name.endswith(".csv.gz"))


def _is_raw_log(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".log") or path.name.endswith(".log.gz"))


def find_layout(root: str | Path) -> Layout:
    """Every CSV under folders named metric/, trace/ or log/ anywhere below ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data directory {root}: no such directory")
    layout = Layout(root)
    for kind in KINDS:
        wanted = (lambda p: _is_csv(p) or _is_raw_log(p)) if kind == "log" else _is_csv
        files = {p for folder in root.rglob(kind) if folder.is_dir() for p in folder.iterdir() if wanted(p)}
        setattr(layout, kind, sorted(files))
    if not (layout.metric or layout.trace or layout.log):
        raise UsageError(f"data directory {root}: no metric/, trace/ or log/ folder with CSV (or raw .log) files below it")
    return layout


def expand(paths: Iterable[str | Path], kind: str = "trace") -> list[Path]:
    """FILE_OR_DIR arguments as CSV files: a file as it is, a directory as every CSV in it (and,
    when it holds a ``kind`` folder below it, in those)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(q for q in p.iterdir() if _is_csv(q))
            if not found:
                found = getattr(find_layout(p), kind)
            if not found:
                raise UsageError(f"{p}: no CSV files in it")
            out += found
        else:
            raise UsageError(f"{p}: no such file or directory")
    return out


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _rows(path: Path, required: tuple[str, ...]) -> Iterator[dict[str, str]]:
    try:
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or ())]
            if missing:
                raise UsageError(f"{path}: missing column(s) {', '.join(missing)}")
            yield from reader
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UsageError(f"{path}: cannot read ({err})") from None


# --------------------------------------------------------------------------------------------
# traces
def read_spans(paths: Iterable[str | Path]) -> Iterator[tuple[str, Span]]:
    """(trace id, Span) for every span row, in file order."""
    for path in map(Path, paths):
        for n, row in enumerate(_rows(path, TRACE_COLUMNS), 2):
            try:
                pod = row["PodName"]
                parent = row["ParentID"]
                yield row["TraceID"], Span(
                    span_id=row["SpanID"], parent_id=None if parent in ("root", "") else parent,
                    service=service_of(pod), pod=pod, operation=row["OperationName"],
                    start_ns=int(row["StartTimeUnixNano"]), end_ns=int(row["EndTimeUnixNano"]))
            except (TypeError, ValueError):
                raise UsageError(f"{path}:{n}: not a span row") from None


def read_traces(paths: Iterable[str | Path]) -> list[Trace]:
    """Whole traces (a trace that straddles two hourly files is joined), spans ordered by
    (start, span id), traces by their first span's start."""
    spans: dict[str, list[Span]] = defaultdict(list)
    for trace_id, span in read_spans(paths):
        spans[trace_id].append(span)
    traces = [Trace(tid, sorted(ss, key=lambda s: (s.start_ns, s.span_id))) for tid, ss in spans.items()]
    traces.sort(key=lambda t: (t.spans[0].start_ns, t.trace_id))
    return traces


# --------------------------------------------------------------------------------------------
# metrics
@dataclass
class PodMetrics:
    pod: str
    timestamps: list[float]                          # epoch s, one per row
    channels: dict[str, list[float | None]]          # channel -> value per row (None: empty cell)

    @property
    def service(self) -> str:
        return service_of(self.pod)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None


def read_metrics(paths: Iterable[str | Path]) -> dict[str, PodMetrics]:
    """Per pod, its metric rows by time. Files without a PodName column (front_service.csv, the
    gateway's view) are skipped: they describe no instance."""
    out: dict[str, PodMetrics] = {}
    for path in map(Path, paths):
        with _open_text(path) as fh:
            header = next(csv.reader(fh), [])
        if "PodName" not in header:
            continue
        channels = [c for c in header if c not in METRIC_KEYS]
        rows = []
        for n, row in enumerate(_rows(path, METRIC_KEYS), 2):
            ts = _number(row["TimeStamp"])
            if ts is None:
                raise UsageError(f"{path}:{n}: TimeStamp {row['TimeStamp']!r} is not a number")
            rows.append((ts, row["PodName"], [_number(row[c]) for c in channels]))
        for ts, pod, values in sorted(rows, key=lambda r: r[0]):
            pm = out.get(pod)
            if pm is None:
                pm = out[pod] = PodMetrics(pod, [], {c: [] for c in channels})
            pm.timestamps.append(ts)
            for c, v in zip(channels, values):
                pm.channels.setdefault(c, [None] * (len(pm.timestamps) - 1)).append(v)
    return out


# --------------------------------------------------------------------------------------------
# logs
@dataclass(slots=True)
class LogRecord:
    timestamp: float                                 # epoch s (TimeUnixNano)
    pod: str
    node: str
    trace_id: str | None
    span_id: str | None
    message: str                                     # the container's line, without its newline

    @property
    def service(self) -> str:
        return service_of(self.pod)


def docker_line(log_field: str) -> str:
    """The line inside Docker's JSON log record (the field itself when it is not such JSON)."""
    try:
        doc = json.loads(log_field)
    except ValueError:
        return log_field.rstrip("\r\n")
    if isinstance(doc, dict) and isinstance(doc.get("log"), str):
        return doc["log"].rstrip("\r\n")
    return log_field.rstrip("\r\n")


_LOG4J_TIME = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})[,.](\d{3})\b")


def _raw_host(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".log")


def read_raw_log(path: str | Path) -> Iterator[LogRecord]:
    """The records of one raw log4j file (see the module docstring); a line whose header time
    does not parse starts no record and is joined to the one above, like any line without one."""
    path = Path(path)
    host = _raw_host(path)
    current: LogRecord | None = None
    try:
        with _open_text(path) as fh:
            for line in fh:
                line = line.rstrip("\r\n")
                match = _LOG4J_TIME.match(line)
                timestamp = None
                if match:
                    try:
                        moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
                        timestamp = moment.replace(tzinfo=timezone.utc).timestamp() + int(match.group(2)) / 1000
                    except ValueError:
                        timestamp = None
                if timestamp is None:
                    if current is not None and line:
                        current.message += "\n" + line
                    continue
                if current is not None:
                    yield current
                current = LogRecord(timestamp, host, host, None, None, line)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UsageError(f"{path}: cannot read ({err})") from None
    if current is not None:
        yield current


def read_logs(paths: Iterable[str | Path]) -> Iterator[LogRecord]:
    """Every log record, in file order: CSV files as TrainTicket's, raw .log files as a lab's."""
    for path in map(Path, paths):
        if _is_raw_log(path):
            yield from read_raw_log(path)
            continue
        for n, row in enumerate(_rows(path, LOG_COLUMNS), 2):
            try:
                ts = int(row["TimeUnixNano"]) / 1e9
            except (TypeError, ValueError):
                raise UsageError(f"{path}:{n}: TimeUnixNano {row['TimeUnixNano']!r} is not an integer") from None
            yield LogRecord(ts, row["PodName"], row["Node"], row["TraceID"] or None, row["SpanID"] or None,
                            docker_line(row["Log"]))
