"""The trace assembler and the per-entity join (services.cores.traces, services.cores.join): pure
cores, on a real TrainTicket slice against the reference builder models.chunks, and on small
hand-made inputs for the rules (closing, late, evicted, duplicates, restore)."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest

from models.chunks import ChunkOptions, read_observations
from services.cores.join import JoinConfig, Joiner, TimelineInputError, join_in_order
from services.cores.traces import SpanInputError, TraceAssembler, TraceConfig, assemble_in_order, trace_samples
from services.records import LogSample, MetricSample, SpanGroup, SpanRecord, TraceSample
from tests.tracedata import metric_samples, span_groups, write_slice

STEPS = 5
S = 10**9


@pytest.fixture(scope="module")
def slice_dir(datasets, tmp_path_factory) -> Path:
    return write_slice(datasets, tmp_path_factory.mktemp("tt-slice"))


@pytest.fixture(scope="module")
def reference(slice_dir):
    return read_observations(slice_dir, ChunkOptions(steps=STEPS, modalities=("metrics", "traces")))


def truth(slice_dir: Path) -> dict[str, set[str]]:
    spans: dict[str, set[str]] = defaultdict(set)
    with open(slice_dir / "trace" / "slice.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            spans[row["TraceID"]].add(row["SpanID"])
    return spans


def span(sid, start_s, end_s, parent=None, pod="pod-a", status=None) -> SpanRecord:
    return SpanRecord(span_id=sid, service=pod.rsplit("-", 1)[0], pod=pod, operation="op", start_ns=int(start_s * S),
                      end_ns=int(end_s * S), parent_id=parent, status=status)


def group(tid, *spans, source="up:0:0") -> SpanGroup:
    return SpanGroup(trace_id=tid, spans=list(spans), source=source)


def config(**kw) -> TraceConfig:
    base = dict(trace_gap_s=5.0, root_wait_s=50.0, allowed_lateness_s=0.0, grace_s=0.0, source_idle_s=1e9)
    return TraceConfig(**(base | kw))


# ---------------------------------------------------------------------------------------------
# trace assembly
def test_every_trace_of_a_real_slice_is_assembled_whole(slice_dir):
    groups = span_groups(slice_dir)
    want = truth(slice_dir)
    closed = assemble_in_order(groups)
    assert len(groups) > 3 * len(want)                      # traces really come in pieces
    assert sorted(c.trace.trace_id for c in closed) == sorted(want)
    for c in closed:
        t = c.trace
        assert {s.span_id for s in t.spans} == want[t.trace_id]
        assert [(s.start_ns, s.span_id) for s in t.spans] == sorted((s.start_ns, s.span_id) for s in t.spans)
        assert t.closed_reason == "complete"
        ids = {s.span_id for s in t.spans}
        assert all(s.parent_id is None or s.parent_id in ids for s in t.spans)
        assert t.start_ns == min(s.start_ns for s in t.spans) and t.end_ns == max(s.end_ns for s in t.spans)


def test_streamed_in_event_time_the_traces_equal_the_all_known_ones(slice_dir):
    """Fed as they arrive (shuffled by 0.5 s; lateness 1 s), every trace closes in event time,
    whole, none late, whatever the batch size."""
    groups = span_groups(slice_dir, jitter_s=0.5)
    want = {c.trace.trace_id: c for c in assemble_in_order(groups)}
    for batch in (1, 97):
        a = TraceAssembler(config(trace_gap_s=10.0, allowed_lateness_s=1.0))
        got = []
        for i in range(0, len(groups), batch):
            for g in groups[i:i + batch]:
                a.add(g, now=float(i))
            got += a.advance(now=float(i))
        in_time = len(got)
        got += a.advance(None)
        assert in_time > 0.9 * len(want)                     # most closed by the watermark alone
        assert a.late_spans == 0 and a.open_traces == 0
        assert sorted(c.trace.trace_id for c in got) == sorted(want)
        for c in got:
            assert c.trace == want[c.trace.trace_id].trace
            assert c.samples == want[c.trace.trace_id].samples


def test_a_trace_closes_when_its_root_has_ended_and_no_span_came_for_the_gap():
    a = TraceAssembler(config())
    a.add(group("t1", span("c", 1, 2, parent="r")), now=0)
    a.add(group("x", span("x", 3, 30)), now=0)             # another trace moves the watermark to 30
    # no root yet: waits root_wait_s (50) after its last span end (2), not trace_gap_s
    assert [c.trace.trace_id for c in a.advance(0)] == []
    a.add(group("t1", span("r", 0.5, 2.5)), now=0)
    closed = a.advance(0)                                  # root ended at 2.5, watermark 30 > 2.5 + 5
    assert [c.trace.trace_id for c in closed] == ["t1"]
    assert [s.span_id for s in closed[0].trace.spans] == ["r", "c"]
    assert closed[0].trace.closed_reason == "complete"


def test_a_trace_stays_open_within_the_gap_and_a_rootless_one_closes_after_root_wait():
    a = TraceAssembler(config())
    a.add(group("t", span("r", 0, 10)), now=0)
    a.add(group("u", span("orphan", 0, 10, parent="gone")), now=0)
    a.add(group("clock", span("k", 14, 14.9, parent="zz")), now=0)
    assert a.advance(0) == []                              # watermark 14.9 < 10 + 5
    a.add(group("clock", span("k2", 15, 15.1, parent="zz")), now=0)
    assert [c.trace.trace_id for c in a.advance(0)] == ["t"]
    a.add(group("clock2", span("k3", 60, 61)), now=0)
    closed = a.advance(0)                                  # 61 > 10 + 50: the orphan gives up waiting
    # 61 > 10 + 50: the orphan gives up waiting; "clock" (rootless too, last end 15.1) waits on
    assert [(c.trace.trace_id, c.trace.closed_reason) for c in closed] == [("u", "gap")]


def test_spans_after_close_are_counted_late_and_open_no_second_trace():
    a = TraceAssembler(config())
    a.add(group("t", span("r", 0, 1)), now=0)
    a.add(group("w", span("w", 50, 51)), now=0)
    assert [c.trace.trace_id for c in a.advance(0)] == ["t"]
    a.add(group("t", span("late1", 0.2, 0.4, parent="r"), span("late2", 0.3, 0.5, parent="r")), now=0)
    assert a.late_spans == 2 and "t" not in a.traces
    assert all(c.trace.trace_id != "t" for c in a.advance(None))


def test_repeated_spans_are_dropped_and_bad_spans_refused():
    a = TraceAssembler(config())
    a.add(group("t", span("r", 0, 1), span("c", 0.1, 0.2, parent="r")), now=0)
    a.add(group("t", span("c", 0.1, 0.2, parent="r")), now=0)        # an at-least-once repeat
    assert a.duplicate_spans == 1
    assert len(a.advance(None)[0].trace.spans) == 2
    with pytest.raises(SpanInputError, match="ends before it starts"):
        a.add(group("b", span("x", 5, 4)), now=0)
    with pytest.raises(SpanInputError, match="empty trace id"):
        a.add(group("", span("x", 1, 2)), now=0)
    with pytest.raises(SpanInputError, match="own parent"):
        a.add(group("b", span("x", 1, 2, parent="x")), now=0)
    assert "b" not in a.traces


def test_past_max_open_traces_the_least_recently_active_is_evicted():
    a = TraceAssembler(config(max_open_traces=2))
    a.add(group("old", span("a", 0, 1)), now=0)
    a.add(group("mid", span("b", 0, 3)), now=0)
    a.add(group("new", span("c", 0, 2)), now=0)
    closed = a.advance(now=0)
    assert [(c.trace.trace_id, c.trace.closed_reason) for c in closed] == [("old", "evicted")]
    assert a.evicted == 1 and sorted(a.traces) == ["mid", "new"]


def test_trace_samples_are_the_reference_inputs_per_pod_and_step():
    spans = [span("r", 59.5, 60.5, pod="gw-1"), span("c1", 59.6, 59.9, parent="r", pod="db-1", status=2),
             span("c2", 60.1, 60.3, parent="r", pod="db-1"), span("c3", 60.15, 60.2, parent="c2", pod="db-1")]
    samples = trace_samples(sorted(spans, key=lambda s: (s.start_ns, s.span_id)), "t", 60.0)
    by = {(s.entity, s.step_start): s for s in samples}
    assert sorted(by) == [("db-1", 0.0), ("db-1", 60.0), ("gw-1", 0.0)]
    assert by[("db-1", 0.0)].durations_ms == pytest.approx([300.0]) and by[("db-1", 0.0)].errors == 1
    assert by[("db-1", 0.0)].gaps_ms == pytest.approx([700.0])            # 1000 - 300
    assert by[("db-1", 60.0)].durations_ms == pytest.approx([200.0, 50.0])
    assert by[("db-1", 60.0)].gaps_ms == pytest.approx([800.0])           # c3's parent is on its pod
    assert by[("gw-1", 0.0)].gaps_ms == [] and by[("gw-1", 0.0)].service == "gw"


def test_restored_mid_stream_the_assembler_gives_what_an_uninterrupted_one_gives(slice_dir):
    groups = span_groups(slice_dir)
    cfg = config(trace_gap_s=10.0, allowed_lateness_s=1.0, closed_memory=50)

    def run(assembler, part, start):
        out = []
        for i, g in enumerate(part, start):
            assembler.add(g, now=float(i))
            if i % 20 == 0:
                out += assembler.advance(now=float(i))
        return out

    whole = TraceAssembler(cfg)
    expected = run(whole, groups, 0) + whole.advance(None)
    first = TraceAssembler(cfg)
    half = len(groups) // 2
    got = run(first, groups[:half], 0)
    log: dict[bytes, bytes] = {}                 # a changelog: changes applied in order
    for k, v in first.changes().items():
        if v is None:
            log.pop(k, None)
        else:
            log[k] = v
    assert log == first.entries()
    second = TraceAssembler(cfg)
    second.restore(log)
    got += run(second, groups[half:], half) + second.advance(None)
    assert [c.trace for c in got] == [c.trace for c in expected]
    assert second.late_spans == whole.late_spans == 0


# ---------------------------------------------------------------------------------------------
# the join
def chunk_equals_reference(chunk, ref) -> None:
    assert (chunk.entity, chunk.service, chunk.start, chunk.end, chunk.step_s) == \
           (ref.entity, ref.service, ref.start, ref.end, ref.step_s)
    assert [None if t is None else msgspec.structs.asdict(t) for t in chunk.traces] == \
           [None if t is None else t.__dict__ for t in ref.traces]
    assert chunk.logs == [(e.timestamp, e.template_id, e.template) for e in ref.logs]
    # and each event's level (AnoFusion's WARN/ERROR channel), as the reference parses it
    assert (chunk.log_levels or [None] * len(chunk.logs)) == [e.level for e in ref.logs]
    if chunk.metrics:
        assert chunk.metrics == ref.metrics
    else:       # an entity no metric sample named: the reference has every channel, all None
        assert all(v is None for values in ref.metrics.values() for v in values)


def expected_units(obs) -> set[tuple[str, int]]:
    step_s = obs.options.step_s
    return {(pod, step) for pod in obs.entities()
            for step in set(obs.metrics.get(pod, {})) | set(obs.traces.get(pod, {}))
            | {math.floor(e.timestamp / step_s) for e in obs.logs.get(pod, ())}}


def stream(groups, metrics, jcfg: JoinConfig, metrics_first: bool = False, restore_at: int | None = None, logs=()):
    """The assembler and the joiner as the stages run them: the assembler's frontier as a
    watermark source of the joiner, metric samples interleaved by time (or all first)."""
    a = TraceAssembler(config(trace_gap_s=10.0, allowed_lateness_s=1.0, step_s=jcfg.step_s))
    j = Joiner(jcfg)
    events = ([(m.timestamp, 1, m) for m in metrics] + [(g.spans[0].end_ns / 1e9, 0, g) for g in groups]
              + [(x.events[0][0], 1, x) for x in logs])
    events.sort(key=lambda e: (e[1] != 1, 0) if metrics_first else (e[0], e[1]))
    chunks = []
    j.mark("spans:0", None, False, 0.0)              # announced: holds the join until it reports
    for n, (_, kind, item) in enumerate(events):
        now = float(n)
        if kind == 1:
            j.add(item, now)
        else:
            a.add(item, now)
            for closed in a.advance(now):
                for sample in closed.samples:
                    j.add(sample, now)
            j.mark("spans:0", a.frontier(), False, now)
        chunks += j.advance(now)
        if restore_at is not None and n == restore_at:
            restored = Joiner(jcfg)
            restored.restore(j.entries())
            j = restored
    for closed in a.advance(None):
        for sample in closed.samples:
            j.add(sample, 1e6)
    j.mark("spans:0", a.frontier(), True, 1e6)
    chunks += j.advance(1e6)
    chunks += j.flush()            # the end of the input: what the metric source still holds
    return chunks, j


@pytest.mark.parametrize("metrics_first", [False, True], ids=["interleaved", "metrics-ahead"])
def test_streamed_chunks_equal_the_reference_builder_on_a_real_slice(slice_dir, reference, metrics_first):
    """Every (pod, step) with metrics or spans gets one chunk, equal to models.chunks' chunk(pod,
    step) — also when the metrics run far ahead of trace assembly (a fast replay)."""
    chunks, joiner = stream(span_groups(slice_dir), metric_samples(slice_dir),
                            JoinConfig(steps=STEPS, lateness_s=2.0, grace_s=0.0, source_idle_s=1e9),
                            metrics_first=metrics_first)
    units = [(c.entity, round(c.end / 60) - 1) for c in chunks]
    assert len(units) == len(set(units))
    assert set(units) == expected_units(reference)
    assert any(c.metrics for c in chunks) and any(t for c in chunks for t in c.traces)
    for c, (pod, step) in zip(chunks, units):
        chunk_equals_reference(c, reference.chunk(pod, step))
    assert joiner.late == 0 and joiner.dropped == 0


def test_with_logs_every_modality_of_a_chunk_equals_the_reference(datasets, tmp_path):
    """A slice with log lines too (11:51-11:54; the day's logs start at 11:51): LogSamples as the
    parse stage templates the lines, joined with metrics and traces."""
    from tests.tracedata import log_samples

    data = write_slice(datasets, tmp_path / "slice", start=1675079460, minutes=3, logs=True)
    ref = read_observations(data, ChunkOptions(steps=STEPS))
    logs = log_samples(data)
    assert len(logs) > 1000 and ref.skipped_log_lines == 0
    chunks, joiner = stream(span_groups(data), metric_samples(data),
                            JoinConfig(steps=STEPS, lateness_s=2.0, grace_s=0.0, source_idle_s=1e9), logs=logs)
    units = [(c.entity, round(c.end / 60) - 1) for c in chunks]
    assert len(units) == len(set(units)) and set(units) == expected_units(ref)
    assert sum(len(c.logs) for c in chunks) > 1000
    assert sum(level in ("WARN", "ERROR") for c in chunks for level in c.log_levels) > 0   # levels do reach chunks
    for c, (pod, step) in zip(chunks, units):
        chunk_equals_reference(c, ref.chunk(pod, step))
    assert joiner.late == 0


def test_chunks_wait_for_the_slowest_source_and_a_restore_changes_nothing(slice_dir, reference):
    jcfg = JoinConfig(steps=STEPS, lateness_s=2.0, grace_s=0.0, source_idle_s=1e9)
    groups, metrics = span_groups(slice_dir), metric_samples(slice_dir)
    plain, _ = stream(groups, metrics, jcfg)
    restored, _ = stream(groups, metrics, jcfg, restore_at=len(groups) // 2)
    assert restored == plain


def test_a_pause_past_source_idle_s_lets_open_traces_go_which_a_replay_from_before_it_closes_whole():
    """Why tests/test_assemble_stream.py's crash test keeps its input's pause under host_idle_s
    (it failed 1 run in 8 on a loaded machine with host_idle_s=3 s). A pause shorter than
    source_idle_s keeps an open trace open. A longer one makes the source idle (by design): the
    assembler lets the open trace go, partial ("gap"), and reports itself idle, so the join cuts
    the chunk with it. That is a wall-clock decision: a stage SIGKILLed before its next
    checkpoint restores the trace open, replays, and closes it whole — a different TraceRecord and
    TraceSample for the same trace id, and the join, recognising the replay by trace id, keeps the
    partial one it had."""
    cfg = config(source_idle_s=3.0)
    before_pause = group("t", span("c1", 10, 11, parent="r", pod="pod-b"))
    after_pause = group("t", span("r", 9.5, 12, pod="pod-a"), span("c2", 11, 11.5, parent="r", pod="pod-b"))
    a = TraceAssembler(cfg)
    a.add(before_pause, now=0.0)
    assert a.advance(0.0) == []
    checkpoint = a.entries()                                  # the last checkpoint before the crash
    assert a.advance(2.9) == [] and a.open_traces == 1 and a.frontier() == 11 - 5  # a short pause: held
    (partial,) = a.advance(3.5)                               # silent for source_idle_s: idle
    assert (partial.trace.closed_reason, len(partial.trace.spans)) == ("gap", 1) and a.frontier() == math.inf

    replayed = TraceAssembler(cfg)                            # SIGKILL, restore, replay
    replayed.restore(checkpoint)
    assert replayed.open_traces == 1
    replayed.add(after_pause, now=100.0)
    (whole,) = replayed.advance(None)
    assert (whole.trace.closed_reason, len(whole.trace.spans)) == ("complete", 3)
    assert whole.trace != partial.trace                       # not "the same record again"

    j = Joiner(JoinConfig(steps=3, lateness_s=0.0, grace_s=0.0, source_idle_s=3.0))
    j.mark("spans:0", None, False, 0.0)
    for sample in partial.samples:
        j.add(sample, 3.5)
    j.mark("spans:0", None, True, 3.5)                         # the partition said idle
    (chunk,) = j.advance(3.5)
    assert (chunk.entity, chunk.traces[-1].spans) == ("pod-b", 1)
    for sample in whole.samples:                              # the restarted stage's samples
        j.add(sample, 110.0)
    assert j.duplicates == 1                                  # pod-b's: a replay by its trace id
    whole_b = next(s for s in whole.samples if s.entity == "pod-b")
    assert len(whole_b.durations_ms) == 2 and chunk.traces[-1].spans != len(whole_b.durations_ms)


def metric(entity, ts, cpu, source="m:0:0") -> MetricSample:
    return MetricSample(entity=entity, service="svc", timestamp=ts, values={"cpu": cpu}, source=source)


def tsample(entity, step_start, tid, durations, gaps=(), errors=0) -> TraceSample:
    return TraceSample(entity=entity, service="svc", step_start=step_start, trace_id=tid,
                       durations_ms=list(durations), gaps_ms=list(gaps), errors=errors)


def test_metric_rows_go_to_the_step_they_describe_and_the_later_one_counts():
    j = Joiner(JoinConfig(steps=3, lateness_s=0.0, grace_s=0.0))
    j.add(metric("p", 60 + 52, 1.0), 0)       # describes 0:52..1:52: step 1 (1:22 is its middle)
    j.add(metric("p", 120 + 20, 2.0), 0)      # describes 1:20..2:20: step 1 as well; later: counts
    j.add(metric("p", 120 + 40, 3.0), 0)      # describes 1:40..2:40: step 2
    chunks = j.flush()
    assert [(c.start, c.end) for c in chunks] == [(-60.0, 120.0), (0.0, 180.0)]
    assert chunks[0].metrics == {"cpu": [None, None, 2.0]}
    assert chunks[1].metrics == {"cpu": [None, 2.0, 3.0]}
    assert chunks[1].traces == [None, None, None]


def test_a_step_is_emitted_once_every_source_has_passed_its_end():
    j = Joiner(JoinConfig(steps=2, lateness_s=1.0, grace_s=0.0))
    j.mark("spans:0", None, False, 0)
    j.add(metric("p", 95, 1.0), 0)                      # step 1, metric source at 65
    j.add(metric("p", 400, 1.0), 0)                     # metrics far ahead: step 6
    j.add(tsample("p", 60, "t1", [10.0, 30.0], [1.0]), 0)
    assert j.advance(0) == []                          # the trace source has not reported
    j.mark("spans:0", 120.5, False, 0)                 # 120.5 - 1 < 120: step 1 not yet
    assert j.advance(0) == []
    j.add(tsample("p", 60, "t2", [20.0]), 0)
    j.add(tsample("p", 60, "t2", [20.0]), 0)           # a replayed sample: once
    j.mark("spans:0", 130.0, False, 0)
    (chunk,) = j.advance(0)
    assert (chunk.entity, chunk.start, chunk.end) == ("p", 0.0, 120.0)
    assert chunk.traces[0] is None and chunk.traces[1].spans == 3 and chunk.traces[1].p50_ms == 20.0
    assert chunk.traces[1].gap_p50_ms == 1.0 and j.duplicates == 1
    j.mark("spans:0", None, True, 0)                   # the trace source is idle: metrics lead,
    assert j.advance(0) == []                          # but step 6's metric source is at 370 - 1
    j.add(metric("p", 460, 1.0), 0)                    # 430 - 1 > 420
    assert [c.end for c in j.advance(0)] == [420.0]


def test_late_input_is_counted_kept_for_later_chunks_and_dropped_when_too_old():
    j = Joiner(JoinConfig(steps=3, lateness_s=0.0, grace_s=0.0))
    j.add(metric("p", 60 * 10 + 40, 1.0), 0)          # step 10
    j.add(metric("p", 60 * 12 + 40, 1.0), 0)          # step 12 -> source at 12:10: step 11 passed
    assert [c.end for c in j.advance(0)] == [660.0]
    j.add(tsample("p", 60 * 11, "t", [5.0]), 0)       # late for step 11 (no chunk yet): emitted now
    (late,) = j.advance(0)
    assert late.end == 720.0 and late.traces[2].spans == 1 and j.late == 1
    j.add(tsample("p", 60 * 2, "old", [5.0]), 0)      # older than every chunk still to come
    assert j.dropped == 1
    j.add(metric("p", 60 * 14 + 40, 1.0), 0)
    chunk = [c for c in j.advance(0) if c.end == 780.0][0]
    assert chunk.traces[1].spans == 1                  # step 11's late span is in step 12's history


def test_log_samples_land_in_their_steps_by_time():
    j = Joiner(JoinConfig(steps=2, lateness_s=0.0, grace_s=0.0))
    j.add(LogSample(entity="p", service="svc", events=[(61.0, "E2"), (59.0, "E1"), (62.0, "E1")],
                    templates={"E1": "a <*>", "E2": "b"}, source="logs:0:5"), 0)
    chunks = j.flush()
    assert [c.end for c in chunks] == [60.0, 120.0]
    assert chunks[1].logs == [(59.0, "E1", "a <*>"), (61.0, "E2", "b"), (62.0, "E1", "a <*>")]
    assert chunks[0].logs == [(59.0, "E1", "a <*>")] and chunks[1].metrics == {}


def test_bad_timeline_items_are_refused():
    j = Joiner()
    with pytest.raises(TimelineInputError, match="empty entity"):
        j.add(metric("", 1.0, 1.0), 0)
    with pytest.raises(TimelineInputError, match="not finite"):
        j.add(metric("p", math.nan, 1.0), 0)
    with pytest.raises(TimelineInputError, match="no span durations"):
        j.add(tsample("p", 0.0, "t", []), 0)
    assert j.entities == {}


def test_join_state_restores_from_its_changes():
    j = Joiner(JoinConfig(steps=3, lateness_s=0.0, grace_s=0.0))
    log: dict[bytes, bytes] = {}
    for m in range(12):
        j.add(metric("p", 60 * m + 40, float(m)), 0)
        j.add(tsample("p", 60 * m, f"t{m}", [float(m + 1)]), 0)
        j.advance(0)
        for k, v in j.changes().items():
            if v is None:
                log.pop(k, None)
            else:
                log[k] = v
    assert log == j.entries()
    assert len([k for k in log if k.startswith(b"S")]) <= 3 + 1    # old steps pruned
    r = Joiner(j.config)
    r.restore(log)
    assert r.flush() == j.flush()
    assert join_in_order([metric("q", 100, 1.0)], JoinConfig(steps=1))[0].metrics == {"cpu": [1.0]}


def test_the_frontier_is_the_earliest_open_start_or_the_watermark_less_the_gap():
    a = TraceAssembler(config())
    assert a.frontier() == -math.inf
    a.add(group("t", span("r", 3, 4)), now=0)
    a.add(group("u", span("r2", 1, 2, parent="x")), now=0)       # rootless: stays open
    a.add(group("w", span("k", 20, 21)), now=0)
    a.advance(0)                                                  # watermark 21: "t" closed
    assert "t" not in a.traces and a.frontier() == 1.0
    a.add(group("u", span("early", 0.5, 0.6, parent="x")), now=0)
    assert a.frontier() == 0.5
    a.add(group("w", span("k2", 30, 31)), now=0)
    a.advance(0)                                                  # watermark 31 < 2 + 50: "u" stays
    assert a.frontier() == 0.5
    a.add(group("w", span("k3", 60, 61)), now=0)
    a.advance(0)                                                  # 61 > 2 + 50: "u" closed; "w" (61 + 5) open
    assert sorted(a.traces) == ["w"] and a.frontier() == 20.0
    a.advance(None)                                               # everything known: nothing more comes
    assert a.frontier() == math.inf


# ---------------------------------------------------------------------------------------------
# the stage adapters (services.stages): records in, outputs / dead letters out, no broker
def adapter(kind, **overrides):
    from services import stages
    from services.settings import load_settings

    settings = load_settings(kafka_bootstrap="127.0.0.1:1", watermark_grace_s=0.0, trace_gap_s=5.0,
                             trace_lateness_s=0.0, topic_partitions=2, **overrides)
    return settings, stages.STAGES[kind](settings)


def rec(topic, value, key=None, offset=0, partition=0):
    from services.shell import Record

    return Record(topic, partition, offset, key, value, 0)


def test_assemble_stage_dead_letters_bad_records_and_sends_traces_samples_and_its_frontier():
    from services.records import WATERMARK_KEY, TraceRecord, Watermark, decode, encode
    from services.shell import Out, Reject

    settings, stage = adapter("assemble")
    t = settings.spans_topic
    stage.assign((t, 0), {}, None)
    good = [group("t1", span("r", 0, 1, pod="gw-1"), source="up:0:1"),
            group("clock", span("k", 10, 20), source="up:0:2")]
    batch = [rec(t, b"{not json", b"x", 0), rec(t, encode(group("b", span("x", 5, 4))), b"b", 1),
             rec(t, b'{"source": "s", "ts": "late"}', WATERMARK_KEY, 2)]
    batch += [rec(t, encode(g), g.trace_id.encode(), 3 + i) for i, g in enumerate(good)]
    outs = stage.process(batch)
    rejects = [(o.record.offset, o.reason) for o in outs if isinstance(o, Reject)]
    assert rejects == [(0, "bad_spans"), (1, "bad_span"), (2, "bad_watermark")]
    traces = [decode(o.value, TraceRecord) for o in outs if isinstance(o, Out) and o.topic == settings.traces_topic]
    assert [tr.trace_id for tr in traces] == ["t1"]                # watermark 20 > 1 + 5
    samples = [o for o in outs if isinstance(o, Out) and o.topic == settings.timeline_topic and o.key != WATERMARK_KEY]
    assert [(o.key, msgspec.json.decode(o.value)["type"]) for o in samples] == [("gw-1", "traces")]
    marks = [o for o in outs if isinstance(o, Out) and o.key == WATERMARK_KEY]
    assert sorted(o.partition for o in marks) == [0, 1]            # to every timeline partition
    assert decode(marks[0].value, Watermark) == Watermark(source=f"{t}:0", ts=10.0)   # "clock" starts at 10
    entries = stage.changes()[(t, 0)]
    assert any(k.startswith(b"T") for k in entries) and stage.commit_offset((t, 0), 5) == 5


def test_join_stage_dead_letters_bad_items_and_cuts_chunks_keyed_by_entity():
    from services.records import WATERMARK_KEY, ChunkRecord, Watermark, decode, encode
    from services.shell import Out, Reject

    settings, stage = adapter("join", chunk_steps=2, chunk_lateness_s=0.0)
    t = settings.timeline_topic
    stage.assign((t, 0), {}, None)
    batch = [rec(t, b'{"type": "nonsense", "entity": "p"}', b"p", 0),
             rec(t, encode(metric("", 100, 1.0)), b"", 1),
             rec(t, encode(Watermark(source="spans:0", ts=1000.0)), WATERMARK_KEY, 2),
             rec(t, encode(metric("p", 100, 1.0, source="m:0:1")), b"p", 3),
             rec(t, encode(metric("p", 400, 2.0, source="m:0:2")), b"p", 4)]
    outs = stage.process(batch)
    assert [(o.record.offset, o.reason) for o in outs if isinstance(o, Reject)] == [(0, "bad_timeline"), (1, "bad_timeline")]
    chunks = [decode(o.value, ChunkRecord) for o in outs if isinstance(o, Out)]
    assert [(c.entity, c.end, c.metrics) for c in chunks] == [("p", 120.0, {"cpu": [None, 1.0]})]
    assert [o.key for o in outs if isinstance(o, Out)] == ["p"]


def test_an_assemble_partition_without_input_holds_the_join_for_host_idle_s_then_says_idle():
    import time as _time

    from services.records import WATERMARK_KEY, Watermark, decode

    settings, stage = adapter("assemble", host_idle_s=0.3)
    tp = (settings.spans_topic, 1)
    stage.assign(tp, {}, None)

    def marks():
        return [decode(o.value, Watermark) for o in stage.tick(_time.time()) if o.key == WATERMARK_KEY]

    assert marks()[0] == Watermark(source=f"{settings.spans_topic}:1", ts=None, idle=False)   # announced
    _time.sleep(0.45)
    assert marks()[0] == Watermark(source=f"{settings.spans_topic}:1", ts=None, idle=True)


def test_a_group_or_sample_naming_no_stream_counts_as_its_input_partition():
    a = TraceAssembler(config())
    a.add(group("t", span("r", 0, 1), source="collector-7"), now=0, fallback_source="spans:3")
    a.add(group("u", span("r", 0, 2), source="also odd"), now=0, fallback_source="spans:3")
    assert list(a.clock.progress) == ["spans:3"]
    j = Joiner()
    j.add(metric("p", 100, 1.0, source="scrape of p"), 0, fallback_source="timeline:0")
    assert list(j.clock.progress) == ["timeline:0"]


def test_a_rows_channels_in_several_samples_merge_and_a_replayed_log_sample_counts_once():
    j = Joiner(JoinConfig(steps=1, lateness_s=0.0, grace_s=0.0))
    j.add(MetricSample(entity="p", service="s", timestamp=100.0, values={"cpu": 1.0}, source="m:0:1"), 0)
    j.add(MetricSample(entity="p", service="s", timestamp=100.0, values={"mem": 2.0}, source="m:0:2"), 0)
    logs = LogSample(entity="p", service="s", events=[(70.0, "E1")], templates={"E1": "x"}, source="otlp_logs:0:9")
    j.add(logs, 0)
    j.add(logs, 0)                                    # at least once: the same record again
    (chunk,) = j.flush()
    assert chunk.metrics == {"cpu": [1.0], "mem": [2.0]} and chunk.logs == [(70.0, "E1", "x")]
    assert j.duplicates == 1


def test_an_unmoved_frontier_is_sent_again_within_host_idle_s_so_the_join_keeps_holding():
    """The join lets a writer silent for host_idle_s stop holding the watermark; an assemble
    partition whose frontier is held by an open trace must be heard again before that (its
    heartbeat was a fixed 5 s, longer than the stream tests' host_idle_s of 3 s)."""
    import time as _time

    from services.records import WATERMARK_KEY, Watermark, decode, encode

    settings, stage = adapter("assemble", host_idle_s=0.9)
    t = settings.spans_topic
    stage.assign((t, 0), {}, None)
    held = group("open", span("c", 10, 11, parent="lost"), source="up:0:1")       # rootless: stays open
    first = [decode(o.value, Watermark) for o in stage.process([rec(t, encode(held), b"open")])
             if o.key == WATERMARK_KEY and o.partition == 0]
    assert first == [Watermark(source=f"{t}:0", ts=6.0)]       # watermark 11 - gap 5
    j = Joiner(JoinConfig(steps=1, lateness_s=0.0, grace_s=0.0, source_idle_s=settings.host_idle_s))
    j.mark(first[0].source, first[0].ts, False, _time.time())
    upstream_alive = rec(t, encode(Watermark(source="up:0", ts=11.0)), WATERMARK_KEY)   # no progress
    heard = []
    deadline = _time.time() + 2 * settings.host_idle_s
    while _time.time() < deadline:
        j.add(metric("p", 95, 1.0), _time.time())              # step 1 ...
        j.add(metric("p", 500, 1.0), _time.time())             # ... and the metrics far ahead of it
        for o in stage.process([upstream_alive]):
            if o.key == WATERMARK_KEY and o.partition == 0:
                mark = decode(o.value, Watermark)
                heard.append(mark)
                j.mark(mark.source, mark.ts, mark.idle, _time.time())
        assert j.advance(_time.time()) == []                   # step 1 waits for the open trace
        _time.sleep(0.05)
    assert len(heard) >= 2 and all(m == first[0] for m in heard)
