"""models.chunks: the reference builder of Chunks from a TrainTicket-like data directory, and
the parse core's TrainTicket header (a time of day on UTC+8, dated by the record's own time)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.chunks import ChunkOptions, read_observations, trace_stats
from services.cores.parse import ParseCore
from services.records import Source
from services.settings import UsageError

M0 = 27_916_000                   # an epoch minute (2023-01-29 ...)
POD = "ts-contacts-service-866bd68c97-xcqfx"
CALLER = "ts-gateway-service-6f6cfc45b-h5m2n"
SPANS = ["TraceID", "SpanID", "ParentID", "PodName", "OperationName", "StartTimeUnixNano", "EndTimeUnixNano", "Duration"]
LOGS = ["Timestamp", "TimeUnixNano", "Node", "PodName", "Container", "TraceID", "SpanID", "Log"]


def java_line(t: float, text: str, level: str = "INFO") -> str:
    """A TrainTicket log record's Log field: Docker JSON around a line stamped in UTC+8."""
    clock = f"{(int(t) // 3600 + 8) % 24:02d}:{int(t) // 60 % 60:02d}:{int(t) % 60:02d}.{int(t * 1000) % 1000:03d}"
    line = f"{clock} {level}  c.s.ContactsServiceImpl#31 TraceID: 0123abcd SpanID: 4567ef {text}"
    return json.dumps({"log": line + "\n", "stream": "stdout", "time": "x"})


@pytest.fixture()
def day(tmp_path) -> Path:
    root = tmp_path / "day" / "deep" / "er"
    for folder in ("metric", "trace", "log"):
        (root / folder).mkdir(parents=True)
    # metric rows stamped at :09 describe the minute before: 08:41:09 -> minute M0 + 0
    rows = ["Time,TimeStamp,PodName,CpuUsageRate(%),MemoryUsage(Mi)\n"]
    for m, cpu in ((1, "10"), (2, ""), (3, "30"), (5, "NaN")):
        rows.append(f"x,{(M0 + m) * 60 + 9},{POD},{cpu},100\n")
    (root / "metric" / f"{POD}_metric.csv").write_text("".join(rows))
    (root / "metric" / "front_service.csv").write_text("Time,TimeStamp,ServiceName,SuccessRate(%)\nx,1,front,1\n")
    # minute 0: three calls into the pod (own 10/20/30 ms, callers wait 2/4/6 ms longer), one
    # internal child span; minute 2: one call; minute 1: no span of the pod, one of the caller
    spans = []
    for i, (own, extra) in enumerate(((10, 2), (20, 4), (30, 6))):
        start = (M0 * 60 + 5 + i) * 10**9
        spans.append([f"t{i}", f"r{i}", "root", CALLER, "/*", start, start + (own + extra) * 10**6, 0])
        spans.append([f"t{i}", f"c{i}", f"r{i}", POD, "GET", start + 10**6, start + (own + 1) * 10**6, 0])
    spans.append(["t0", "d0", "c0", POD, "SELECT", (M0 * 60 + 5) * 10**9 + 2 * 10**6, (M0 * 60 + 5) * 10**9 + 3 * 10**6, 0])
    start = ((M0 + 1) * 60 + 1) * 10**9
    spans.append(["t3", "r3", "root", CALLER, "/*", start, start + 5 * 10**6, 0])
    start = ((M0 + 2) * 60 + 1) * 10**9
    spans.append(["t4", "r4", "root", CALLER, "/*", start, start + 50 * 10**6, 0])
    spans.append(["t4", "c4", "r4", POD, "GET", start + 10**6, start + 41 * 10**6, 0])
    with open(root / "trace" / "a.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SPANS)
        w.writerows(spans[:4])
    with open(root / "trace" / "b.csv", "w", newline="") as fh:      # a trace straddles two files
        w = csv.writer(fh)
        w.writerow(SPANS)
        w.writerows(spans[4:])
    logs = []
    for k, (minute, text, level) in enumerate(((0, "[getContacts][found][id: 17]", "INFO"),
                                               (0, "[getContacts][found][id: 18]", "INFO"),
                                               (2, "[findContactsById][No contacts according to contactsId]", "ERROR"))):
        t = (M0 + minute) * 60 + 20 + k
        logs.append([f"{t}", str(int(t * 1e9)), "10.0.0.1", POD, "server", "", "", java_line(t, text, level)])
    logs.append(["x", "1", "n", POD, "server", "", "", "{\"log\": truncated"])          # malformed
    with open(root / "log" / "08_42_log.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(LOGS)
        w.writerows(logs)
    return tmp_path / "day"


def test_steps_hold_each_modality_where_it_has_data(day):
    obs = read_observations(day, ChunkOptions(steps=4))
    assert obs.entities() == [POD, CALLER]
    assert obs.traced_steps == [M0, M0 + 1, M0 + 2]
    assert obs.skipped_log_lines == 1                        # the truncated line, not a crash
    chunk = obs.chunk(POD, M0 + 2)                            # steps M0-1 .. M0+2
    assert (chunk.start, chunk.end, chunk.steps) == ((M0 - 1) * 60, (M0 + 3) * 60, 4)
    assert chunk.service == "ts-contacts-service"
    # a row stamped at (M0 + 1):09 is minute M0; an empty cell stays None, never 0
    assert chunk.metrics["CpuUsageRate(%)"] == [None, 10.0, None, 30.0]
    assert chunk.metrics["MemoryUsage(Mi)"] == [None, 100.0, 100.0, 100.0]
    first = chunk.traces[1]
    assert first.spans == 4 and first.errors == 0
    assert first.p50_ms == pytest.approx(np.percentile([10, 20, 30, 1], 50))
    assert first.gap_p50_ms == pytest.approx(4.0) and first.gap_p99_ms == pytest.approx(np.percentile([2, 4, 6], 99))
    assert chunk.traces[0] is None and chunk.traces[2] is None
    assert chunk.traces[3].gap_p50_ms == pytest.approx(10.0)
    assert chunk.present() == {"metrics": [False, True, True, True], "traces": [False, True, False, True],
                               "logs": [False, True, False, True]}
    # logs: timed by the record, templated by the stream's parse core, level from the header
    assert [e.level for e in chunk.logs] == ["INFO", "INFO", "ERROR"]
    assert chunk.logs[0].template_id == chunk.logs[1].template_id != chunk.logs[2].template_id
    assert "TraceID" not in chunk.logs[0].template and "<NUM>" in chunk.logs[0].template
    # the caller has traces only: judged where it has data
    assert obs.units() == [(POD, M0), (CALLER, M0), (POD, M0 + 1), (CALLER, M0 + 1), (POD, M0 + 2), (CALLER, M0 + 2)]


def test_file_names_and_order_do_not_change_the_chunks(day, tmp_path):
    other = tmp_path / "renamed"
    shutil.copytree(day, other)
    base = next(other.rglob("trace"))
    (base / "a.csv").rename(base / "zz.csv")
    (base / "b.csv").rename(base / "aa.csv")
    one, two = read_observations(day), read_observations(other)
    assert one.units() == two.units()
    assert [one.chunk(*u) for u in one.units()] == [two.chunk(*u) for u in two.units()]


def test_modalities_left_out_are_empty(day):
    obs = read_observations(day, ChunkOptions(steps=3, modalities=("metrics", "logs")))
    chunk = obs.chunk(POD, M0 + 2)
    assert chunk.traces == [] and chunk.metrics and chunk.logs
    assert obs.traced_steps == [M0, M0 + 1, M0 + 2]         # traces still decide what is judged


def test_options_are_checked():
    for bad in (dict(step_s=0), dict(steps=0), dict(modalities=("pictures",)), dict(modalities=())):
        with pytest.raises(ValueError):
            ChunkOptions(**bad)
    assert ChunkOptions.from_dict(ChunkOptions(steps=7).as_dict()) == ChunkOptions(steps=7)


def test_a_directory_without_data_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no metric/, trace/ or log/"):
        read_observations(tmp_path)


def test_trace_stats_without_calls_from_other_pods():
    stats = trace_stats([1.0, 2.0, 3.0])
    assert stats.gap_p50_ms is None and stats.p50_ms == 2.0 and stats.spans == 3


def test_trainticket_header_takes_its_date_from_the_record():
    core = ParseCore()
    source = Source(host="h", topic="logs.h", partition=0, offset=0, file_path="/x.log", file_offset=0)
    shipped = 1_675_079_459.9716                      # 2023-01-30 11:50:59.97 UTC = 19:50:59.97 UTC+8
    line = "19:50:59.971 INFO  t.s.TravelServiceImpl#457 TraceID: 2ffbc4a0 SpanID: 04ba577c [getTickets][Calculate distance]"
    event = core.parse(line, "h", source, shipped)[0]
    assert event.timestamp == pytest.approx(1_675_079_459.971)
    assert (event.level, event.component) == ("INFO", "t.s.TravelServiceImpl#457")
    assert event.template.startswith("[getTickets]")
    # stamped just before local midnight, shipped just after: the day before
    late = core.parse("23:59:59.500 WARN  a.B#1 TraceID: 1 SpanID: 2 [x]", "h", source, 1_675_008_001.0)[0]
    assert late.timestamp == pytest.approx(1_675_007_999.5)
