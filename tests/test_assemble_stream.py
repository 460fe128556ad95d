"""The assemble and join stages through the real broker (issue 13): a real TrainTicket slice's
spans, split into many records per trace and shuffled within a bound, go to logwarden.spans and
its metric rows to logwarden.timeline; out come one TraceRecord per trace (count = distinct trace
ids, span sets equal) and one chunk per (pod, minute) with metrics or spans, equal to the
reference builder models.chunks."""
from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest

from models.chunks import ChunkOptions, read_observations
from services import stages
from services.records import WATERMARK_KEY, ChunkRecord, TraceRecord, Watermark, decode, encode
from services.shell import ensure_topics
from tests.kafkautil import consume, isolated_settings, record_count
from tests.streamutil import logwarden, settings_env, wait_until
from tests.test_assemble_cores import chunk_equals_reference, expected_units, truth
from tests.tracedata import metric_samples, span_groups, write_slice

STEPS = 5
# The crash test's host_idle_s: longer than any pause of its input before the crash (see there),
# short enough that the last steps, which wait for the sources to fall idle, come within the test.
PAUSE_PROOF_IDLE_S = 15.0


@pytest.fixture(scope="module")
def slice_dir(datasets, tmp_path_factory):
    return write_slice(datasets, tmp_path_factory.mktemp("tt-slice"), minutes=5)


def stream_settings(kafka_bootstrap, tmp_path, **overrides):
    return isolated_settings(kafka_bootstrap, **({
        "state_dir": tmp_path / "state", "topic_partitions": 3, "host_idle_s": 3.0, "watermark_grace_s": 1.0,
        "trace_gap_s": 10.0, "trace_lateness_s": 1.0, "chunk_steps": STEPS, "chunk_lateness_s": 2.0,
        "metrics_port": 0} | overrides))


def produce_slice(settings, slice_dir) -> tuple[int, int]:
    """Span groups (keyed by trace id) and metric samples (keyed by pod) in event-time order, as
    the OTLP stage would write them."""
    from confluent_kafka import Producer

    groups, metrics = span_groups(slice_dir, jitter_s=0.5), metric_samples(slice_dir)
    items = sorted([(m.timestamp, 1, i) for i, m in enumerate(metrics)] +
                   [(max(s.end_ns for s in g.spans) / 1e9, 0, i) for i, g in enumerate(groups)])
    producer = Producer(settings.kafka_config() | {"enable.idempotence": True, "linger.ms": 5})
    for _, kind, i in items:
        if kind:
            producer.produce(settings.timeline_topic, encode(metrics[i]), metrics[i].entity)
        else:
            producer.produce(settings.spans_topic, encode(groups[i]), groups[i].trace_id)
        producer.poll(0)
    assert producer.flush(30) == 0
    return len(groups), len(metrics)


def announced(settings) -> bool:
    """Assemble holds its partitions and has told every timeline partition (a Watermark each)."""
    from confluent_kafka import KafkaException

    try:
        return record_count(settings, settings.timeline_topic) >= settings.topic_partitions ** 2
    except KafkaException:          # a topic just created: its leader is not elected yet
        return False


def read_all(settings, topic):
    """Everything in ``topic`` now (its records up to the partition ends)."""
    return consume(settings, topic, record_count(settings, topic), timeout=30)


def check_outputs(settings, slice_dir, traces_seen, chunks_seen, exact: bool):
    want = truth(slice_dir)
    traces = [decode(m.value(), TraceRecord) for m in traces_seen]
    by_id = {t.trace_id: t for t in traces}
    assert sorted(by_id) == sorted(want)
    if exact:
        assert len(traces) == len(want)
    for tid, t in by_id.items():
        assert {s.span_id for s in t.spans} == want[tid] and t.closed_reason == "complete"
    ref = read_observations(slice_dir, ChunkOptions(steps=STEPS, modalities=("metrics", "traces")))
    chunks = [decode(m.value(), ChunkRecord) for m in chunks_seen]
    units = Counter((c.entity, round(c.end / 60) - 1) for c in chunks)
    assert set(units) == expected_units(ref)
    if exact:
        assert max(units.values()) == 1
    for c in chunks:
        chunk_equals_reference(c, ref.chunk(c.entity, round(c.end / 60) - 1))
    return len(traces), len(chunks)


def test_a_real_slice_through_the_broker_gives_every_trace_and_every_chunk(kafka_bootstrap, slice_dir, tmp_path):
    settings = stream_settings(kafka_bootstrap, tmp_path)
    ensure_topics(settings)
    stop = threading.Event()
    runner = threading.Thread(target=stages.run, args=(["assemble", "join"], settings), kwargs={"stop": stop},
                              daemon=True)
    runner.start()
    try:
        wait_until(lambda: announced(settings), 60, what="assemble's watermark announcements")
        started = time.monotonic()
        n_groups, n_metrics = produce_slice(settings, slice_dir)
        want = truth(slice_dir)
        ref = read_observations(slice_dir, ChunkOptions(steps=STEPS, modalities=("metrics", "traces")))
        traces = consume(settings, settings.traces_topic, len(want), timeout=90, settle=1.0)
        chunks = consume(settings, settings.chunks_topic, len(expected_units(ref)), timeout=90, settle=1.0)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        runner.join(60)
    n_traces, n_chunks = check_outputs(settings, slice_dir, traces, chunks, exact=True)
    spans = sum(len(s) for s in want.values())
    print(f"\n{n_groups} span groups ({spans} spans) + {n_metrics} metric samples -> {n_traces} traces, "
          f"{n_chunks} chunks in {elapsed:.1f} s (including the 3 s idle wait for the last steps)")
    assert record_count(settings, settings.deadletter_topic) == 0


@pytest.mark.slow
def test_state_follows_its_partition_across_a_sigkill(kafka_bootstrap, slice_dir, tmp_path):
    """assemble and join (one process) are SIGKILLed mid-input and started again with another
    state directory (another machine): open traces and pending steps come back from the
    changelogs; every trace and chunk is still there, replays recognisable by their ids.

    The input pauses between the halves (the wait for a first chunk, the checkpoints, the
    restart). A source silent for host_idle_s is idle by design: the assembler then lets every
    open trace go (partial, reason "gap") — a wall-clock decision that a replay from a checkpoint
    taken before it does not repeat, so the restarted stage closes the same trace whole, a second,
    different TraceRecord and TraceSample (the join keeps the first: a chunk with the partial
    trace). With host_idle_s=3 s a loaded machine paused longer than that before the crash (1 run
    in 8 under 2 busy loops). host_idle_s here is well above any pause this test makes, and the
    test checks that no source had gone idle before the crash, so it tests what it says: a crash
    with traces still open."""
    settings = stream_settings(kafka_bootstrap, tmp_path, host_idle_s=PAUSE_PROOF_IDLE_S)
    ensure_topics(settings)
    env = settings_env(settings)
    log = tmp_path / "stages.log"
    first = logwarden("run", "assemble", env=env, log=log)
    second = logwarden("run", "join", env=env, log=log)
    try:
        wait_until(lambda: announced(settings), 90, what="assemble's watermark announcements")
        groups, metrics = span_groups(slice_dir, jitter_s=0.5), metric_samples(slice_dir)
        from confluent_kafka import Producer

        items = sorted([(m.timestamp, 1, i) for i, m in enumerate(metrics)] +
                       [(max(s.end_ns for s in g.spans) / 1e9, 0, i) for i, g in enumerate(groups)])
        producer = Producer(settings.kafka_config() | {"enable.idempotence": True, "linger.ms": 5})

        def send(part):
            for _, kind, i in part:
                if kind:
                    producer.produce(settings.timeline_topic, encode(metrics[i]), metrics[i].entity)
                else:
                    producer.produce(settings.spans_topic, encode(groups[i]), groups[i].trace_id)
                producer.poll(0)
            assert producer.flush(30) == 0

        half = len(items) // 2
        send(items[:half])
        # some traces closed and some chunks cut, the rest open: then the crash
        wait_until(lambda: record_count(settings, settings.chunks_topic) > 0, 60, what="a first chunk")
        time.sleep(1.5)                                   # a checkpoint or two
        first.send_signal(signal.SIGKILL)
        second.send_signal(signal.SIGKILL)
        first.wait(10)
        second.wait(10)
        idle_before_crash = [w for m in read_all(settings, settings.timeline_topic) if m.key() == WATERMARK_KEY
                             for w in [decode(m.value(), Watermark)] if w.idle]
        assert not idle_before_crash, (f"the input paused longer than host_idle_s={settings.host_idle_s} s before "
                                       f"the crash (idle: {idle_before_crash[:3]}): no trace was open any more")
        env2 = settings_env(settings, LOGWARDEN_STATE_DIR=str(tmp_path / "state-elsewhere"))
        first = logwarden("run", "assemble", env=env2, log=log)
        second = logwarden("run", "join", env=env2, log=log)
        send(items[half:])
        want = truth(slice_dir)
        ref = read_observations(slice_dir, ChunkOptions(steps=STEPS, modalities=("metrics", "traces")))
        units = expected_units(ref)

        def distinct(topic, record_type, key):
            return {key(decode(m.value(), record_type)) for m in read_all(settings, topic)}

        wait_until(lambda: len(distinct(settings.traces_topic, TraceRecord, lambda t: t.trace_id)) >= len(want)
                   and len(distinct(settings.chunks_topic, ChunkRecord, lambda c: c.chunk_id)) >= len(units),
                   120, every=1.0, what="every trace and chunk after the restart")
        time.sleep(1.0)
        traces = read_all(settings, settings.traces_topic)
        chunks = read_all(settings, settings.chunks_topic)
    finally:
        for p in (first, second):
            p.send_signal(signal.SIGTERM)
        for p in (first, second):
            try:
                p.wait(30)
            except Exception:
                p.kill()
    import re

    # the second machine rebuilt both stages' partitions from the changelogs, not from a cache
    restores = re.findall(r"(assemble|join): restored .*'entries': (\d+), 'from_cache': (\w+)", log.read_text())
    assert {stage for stage, n, cached in restores if int(n) > 0 and cached == "False"} == {"assemble", "join"}
    check_outputs(settings, slice_dir, traces, chunks, exact=False)
    # a replayed trace or chunk is the same record again, never a different one
    for topic_records, record_type, key in ((traces, TraceRecord, lambda r: r.trace_id),
                                            (chunks, ChunkRecord, lambda r: r.chunk_id)):
        seen: dict = {}
        for m in topic_records:
            r = decode(m.value(), record_type)
            assert seen.setdefault(key(r), r) == r


@pytest.mark.slow
def test_replayed_otlp_through_otlp_assemble_and_join_gives_every_trace_and_chunk(kafka_bootstrap, slice_dir, tmp_path):
    """The whole multimodal path on a real slice: `logwarden replay --traces --metrics --fast` writes
    OTLP as a Collector would, and the otlp, assemble and join stages make of it exactly the
    traces (one per distinct trace id, span sets equal) and chunks the reference builder makes."""
    from toolkit.otlp_replay import replay_otlp

    settings = stream_settings(kafka_bootstrap, tmp_path)
    ensure_topics(settings, extra=[settings.otlp_spans_topic, settings.otlp_metrics_topic, settings.otlp_logs_topic])
    stop = threading.Event()
    runner = threading.Thread(target=stages.run, args=(["otlp", "assemble", "join"], settings), kwargs={"stop": stop},
                              daemon=True)
    runner.start()
    try:
        wait_until(lambda: announced(settings), 90, what="assemble's watermark announcements")
        counts = replay_otlp(settings, [slice_dir / "trace"], slice_dir / "metric", speed=None)
        want = truth(slice_dir)
        ref = read_observations(slice_dir, ChunkOptions(steps=STEPS, modalities=("metrics", "traces")))
        traces = consume(settings, settings.traces_topic, len(want), timeout=120, settle=1.0)
        chunks = consume(settings, settings.chunks_topic, len(expected_units(ref)), timeout=120, settle=1.0)
    finally:
        stop.set()
        runner.join(60)
    assert counts.spans == sum(len(s) for s in want.values())
    check_outputs(settings, slice_dir, traces, chunks, exact=True)
    assert record_count(settings, settings.deadletter_topic) == 0
