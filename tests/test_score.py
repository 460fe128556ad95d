"""The detect stage for traces and chunks (services.cores.score, services.stages.DetectStage):
wire records become the detectors' own items, verdicts are the detectors' ``score``, alerts say
modality, entity, detector, score and threshold with deterministic ids, episodes per entity are
partition state, malformed input is dead-lettered with its reason, and — through the real broker
on TrainTicket's CSVs — the stream's verdicts equal the offline ``score`` verdicts."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import msgspec
import pytest

from models import artifacts
from models.base import Chunk, LogEvent, TraceStats, limit_cpu_threads
from services import stages
from services.cores.score import (EPISODE_GAP_S, ScoreCore, chunk_of, chunk_record, trace_of, trace_record)
from services.records import Alert, ChunkRecord, DeadLetter, TraceRecord, decode, encode, stable_id
from services.shell import Out, Record, Reject
from tests.test_anofusion import STEP, faulty, trained as anofusion_model  # noqa: F401  (fixtures)
from tests.tracegrammar import CONCURRENT
from tests.test_tracelstm import fresh, index_of, trained as tracelstm_model  # noqa: F401  (fixtures)

TRACES, CHUNKS, ALERTS = "t.traces", "t.chunks", "t.alerts"


def core_with(traces=None, chunks=None, **options) -> ScoreCore:
    served = {}
    if traces is not None:
        served["traces"] = {"tracelstm": ("v0001", traces)}
    if chunks is not None:
        served["chunks"] = {"anofusion": ("v0001", chunks)}
    return ScoreCore(lambda: served, traces_topic=TRACES, chunks_topic=CHUNKS, alerts_topic=ALERTS, **options)


def records(topic: str, values, partition: int = 0, first_offset: int = 0) -> list[Record]:
    return [Record(topic, partition, first_offset + i, None, v, 0) for i, v in enumerate(values)]


def alerts_of(outs) -> list[Alert]:
    return [decode(o.value, Alert) for o in outs if isinstance(o, Out) and o.topic == ALERTS]


def anomalous_traces():
    """A normal trace, one with a dropped span, one with a slow leaf."""
    normal, dropped = fresh(2, seed=11, get=False)
    dropped.spans = [s for s in dropped.spans if s.operation != "SELECT orders"]
    slow = fresh(1, seed=12, slow="price query", factor=8.0)[0]
    return [normal, dropped, slow]


# --------------------------------------------------------------------------------------------
# wire records <-> items
def test_trace_and_chunk_records_carry_the_items_unchanged():
    trace = fresh(1, seed=3)[0]
    wire = decode(encode(trace_record(trace)), TraceRecord)
    assert trace_of(wire) == trace
    chunk = Chunk(entity="ts-a-service-1-x", service="ts-a-service", start=600.0, end=780.0, step_s=60.0,
                  metrics={"cpu": [1.5, None, 2.25]},
                  traces=[None, TraceStats(3, 0, 1.0, 2.0, 3.0, 0.5, None, 0.7), None],
                  logs=[LogEvent(610.5, "T1", "a <*>", "INFO"), LogEvent(700.0, "T2", "b <*>", "ERROR")])
    wire = decode(encode(chunk_record(chunk)), ChunkRecord)
    assert chunk_of(wire) == chunk
    assert wire.chunk_id == stable_id(chunk.entity, chunk.start, chunk.end)
    # a producer that knows no levels (the field is optional) gives events without one
    bare = msgspec.structs.replace(wire, log_levels=[])
    assert [e.level for e in chunk_of(bare).logs] == [None, None]


# --------------------------------------------------------------------------------------------
# traces
def test_trace_verdicts_are_the_detectors_and_alerts_say_what_and_where(tracelstm_model):
    traces = anomalous_traces()
    offline = tracelstm_model.score(traces)
    assert [v.anomalous for v in offline] == [False, True, True]
    core = core_with(traces=tracelstm_model)
    outs = core.process(records(TRACES, [encode(trace_record(t)) for t in traces]))
    per_trace = [a for a in alerts_of(outs) if a.kind != "episode"]
    assert [a.key for a in per_trace] == [traces[1].trace_id, traces[2].trace_id]
    for alert, trace, verdict in zip(per_trace, traces[1:], offline[1:]):
        assert alert.modality == "traces" and alert.detector == "tracelstm" and alert.status == "final"
        assert alert.alert_id == stable_id("tracelstm", "trace", trace.trace_id)
        assert alert.score == verdict.score and alert.kind == verdict.anomalies[0].kind
        first = verdict.anomalies[0]
        assert alert.entity == trace.spans[first.position].pod
        assert alert.details["anomalies"][0]["kind"] == first.kind
        assert "concurrent_siblings" in alert.details
        assert alert.details["threshold"]["top_k"] == tracelstm_model.top_k
    dropped, slow = per_trace
    assert dropped.kind == "structural" and "db SELECT orders" in [e.template_id for e in dropped.expected]
    assert slow.kind == "response_time"
    # the slow leaf is named with its response time and the interval it left (its callers too)
    leaf = next(a for a in slow.details["anomalies"] if a["position"] == index_of(traces[2], "price query"))
    assert leaf["kind"] == "response_time" and leaf["response_time_ms"] > leaf["interval_ms"][1]
    assert leaf["pod"] == "price-0"


def test_trace_episodes_open_once_per_entity_and_close_in_event_time(tracelstm_model):
    core = core_with(traces=tracelstm_model)
    base = fresh(8, seed=21, get=False, concurrent=CONCURRENT)
    broken = []
    for t in base:
        t.spans = [s for s in t.spans if s.operation != "SELECT orders"]      # all flagged on orders-0
        broken.append(t)
    outs = core.process(records(TRACES, [encode(trace_record(t)) for t in broken]))
    episodes = [a for a in alerts_of(outs) if a.kind == "episode"]
    # 8 anomalies of one pod: open, then updates at 2, 4, 8
    assert [a.status for a in episodes] == ["open", "update", "update", "update"]
    assert len({a.alert_id for a in episodes}) == 1 and episodes[-1].anomalies == 8
    assert episodes[0].entity == "auth-0" and episodes[0].modality == "traces"     # the first anomalous span's pod
    # a trace far later in event time closes it: final, same id
    later = fresh(1, seed=22, get=False)[0]
    shift = int((EPISODE_GAP_S + 600) * 1e9)
    later = dataclasses.replace(later, spans=[dataclasses.replace(s, start_ns=s.start_ns + shift, end_ns=s.end_ns + shift)
                                              for s in later.spans])
    outs = core.process(records(TRACES, [encode(trace_record(later))], first_offset=8))
    finals = [a for a in alerts_of(outs) if a.kind == "episode" and a.status == "final"]
    assert [a.alert_id for a in finals] == [episodes[0].alert_id]
    assert finals[0].details["episode"]["closed_by"] == "event_time"
    assert [i["id"] for i in finals[0].details["items"]] == [t.trace_id for t in broken]


def test_batch_size_does_not_change_verdicts(tracelstm_model):
    traces = anomalous_traces() + fresh(6, seed=5)
    values = [encode(trace_record(t)) for t in traces]
    one = alerts_of(core_with(traces=tracelstm_model, batch_size=1).process(records(TRACES, values)))
    many = alerts_of(core_with(traces=tracelstm_model, batch_size=256).process(records(TRACES, values)))
    strip = lambda alerts: [msgspec.structs.replace(a, detection_time=0.0) for a in alerts]   # noqa: E731
    assert strip(one) == strip(many)


# --------------------------------------------------------------------------------------------
# chunks
def test_chunk_episode_is_one_alert_per_fault_with_the_deviating_channels(anofusion_model, faulty):
    obs, steps, at = faulty
    chunks = [obs.chunk(obs.entities()[0], s) for s in steps]
    offline = anofusion_model.score(chunks)
    core = core_with(chunks=anofusion_model)
    outs = []
    for i, c in enumerate(chunks):       # one by one, as they close
        outs += core.process(records(CHUNKS, [encode(chunk_record(c))], first_offset=i))
    outs += core.tick(time.time() + 10 * EPISODE_GAP_S)
    alerts = alerts_of(outs)
    assert all(a.modality == "chunks" and a.entity == chunks[0].entity and a.kind == "episode" for a in alerts)
    finals = [a for a in alerts if a.status == "final"]
    opened = [a for a in alerts if a.status == "open"]
    assert len(finals) == len(opened) == len({a.alert_id for a in alerts}) >= 3     # spike, burst, shift
    flagged = {chunk_record(c).chunk_id: v.score for c, v in zip(chunks, offline) if v.anomalous}
    seen = {i["id"]: i["score"] for a in finals for i in a.details["items"]}
    assert seen == flagged, "the stream's anomalous chunks are the offline score's"
    by_step = {round(a.details["episode"]["start"] / STEP) - 1: a for a in finals}
    assert {at["spike"], at["burst"], at["shift"]} <= set(by_step)
    assert by_step[at["spike"]].details["channels"][0]["channel"] == "metric:CpuUsageRate(%)"
    assert by_step[at["burst"]].details["channels"][0]["channel"].startswith("log:")
    assert by_step[at["shift"]].details["channels"][0]["channel"].startswith("trace:")
    threshold = anofusion_model.variants["all"].threshold
    assert all(a.details["latest"]["threshold"] == threshold for a in opened)
    assert all(a.score > threshold and a.details["threshold"] == threshold for a in finals)


def test_episodes_survive_a_restore_from_the_changelog_entries(anofusion_model, faulty):
    obs, steps, at = faulty
    pod = obs.entities()[0]
    spike = [obs.chunk(pod, at["spike"]), obs.chunk(pod, at["burst"])]     # one episode with a long gap
    assert all(v.anomalous for v in anofusion_model.score(spike))
    gap = 1e5
    first = core_with(chunks=anofusion_model, episode_gap_s=gap)
    tp = (CHUNKS, 0)
    first.assign(tp, {}, None)
    opened = alerts_of(first.process(records(CHUNKS, [encode(chunk_record(spike[0]))])))
    changes = first.changes()[tp]
    assert changes and all(v is not None for v in changes.values())
    # another replica takes the partition over with what the changelog holds
    second = core_with(chunks=anofusion_model, episode_gap_s=gap)
    second.assign(tp, first.entries(tp), 1)
    outs = second.process(records(CHUNKS, [encode(chunk_record(spike[1]))], first_offset=1))
    update = alerts_of(outs)
    assert [a.status for a in update] == ["update"] and update[0].alert_id == opened[0].alert_id
    closed = alerts_of(second.tick(time.time() + 10 * gap))
    assert [a.status for a in closed] == ["final"] and closed[0].anomalies == 2
    assert all(v is None for k, v in second.changes()[tp].items() if k.startswith(b"episode"))


# --------------------------------------------------------------------------------------------
# bad input
def test_malformed_records_are_rejected_with_their_reason(tracelstm_model, anofusion_model, faulty):
    obs, steps, _ = faulty
    good = chunk_record(obs.chunk(obs.entities()[0], steps[0]))
    no_spans = encode(TraceRecord(trace_id="x", spans=[], start_ns=0, end_ns=0))
    backwards = trace_record(fresh(1)[0])
    backwards.spans[0] = msgspec.structs.replace(backwards.spans[0], end_ns=backwards.spans[0].start_ns - 1)
    short = msgspec.structs.replace(good, metrics={k: v[:-1] for k, v in good.metrics.items()})
    wrong_steps = chunk_record(obs.chunk(obs.entities()[0], steps[0]))
    wrong_steps = msgspec.structs.replace(wrong_steps, start=wrong_steps.start - STEP,
                                          metrics={k: [None, *v] for k, v in wrong_steps.metrics.items()},
                                          traces=[None, *wrong_steps.traces])
    core = core_with(traces=tracelstm_model, chunks=anofusion_model)
    cases = [(TRACES, b"{not json", "bad_trace"), (TRACES, no_spans, "bad_trace"),
             (TRACES, encode(backwards), "bad_trace"), (TRACES, b'{"trace_id": 5}', "bad_trace"),
             (CHUNKS, b"[]", "bad_chunk"), (CHUNKS, encode(short), "bad_chunk"),
             (CHUNKS, encode(wrong_steps), "chunk_shape")]
    batch = [Record(topic, 0, i, None, value, 0) for i, (topic, value, _) in enumerate(cases)]
    outs = core.process(batch + [Record(CHUNKS, 0, 99, None, encode(good), 0)])
    rejects = [o for o in outs if isinstance(o, Reject)]
    assert [(r.record.offset, r.reason) for r in rejects] == [(i, reason) for i, (_, _, reason) in enumerate(cases)]
    assert all(r.detail for r in rejects)
    only_traces = core_with(traces=tracelstm_model)
    [reject] = only_traces.process([Record(CHUNKS, 0, 0, None, encode(good), 0)])
    assert reject.reason == "no_model"


# --------------------------------------------------------------------------------------------
# the stage adapter: artifacts from MODEL_DIR, hot reload
def test_detect_stage_serves_the_newest_versions_and_reloads(tracelstm_model, anofusion_model, tmp_path):
    from services.settings import Settings

    model_dir = tmp_path / "models"
    for detector in (tracelstm_model, anofusion_model):
        detector.save(tmp_path / detector.name)
        artifacts.publish(tmp_path / detector.name, model_dir)
    settings = Settings(model_dir=model_dir, device="cpu", reload_check_s=0.1, kafka_bootstrap="127.0.0.1:1")
    stage = stages.DetectStage(settings)
    spec = stage.spec()
    assert spec.stateful and set(spec.topics) == {settings.traces_topic, settings.chunks_topic}
    assert "detect" in stages.STAGES and "detect" in stages.ALL_STAGES
    assert stage.ready()
    assert {m: sorted(d) for m, d in stage._served.items()} == {"traces": ["tracelstm"], "chunks": ["anofusion"]}
    artifacts.publish(tmp_path / "tracelstm", model_dir)
    time.sleep(0.2)
    stage.tick(time.time())
    assert stage._served["traces"]["tracelstm"][0] == "v0002"
    stage.close()


# --------------------------------------------------------------------------------------------
# through the real broker, on TrainTicket's CSVs
def _trainticket_slice(datasets: Path, root: Path, pods: tuple[str, ...]) -> Path:
    """Links (not copies) to a few hours of 2023-01-30: traces of 11 and 16-18 h, three pods'
    metrics, the first log files (11:51-11:53, the first fault)."""
    day = datasets / "trainticket_2023-01-30"
    for kind in ("trace", "metric", "log"):
        (root / kind).mkdir(parents=True)
    for hour in ("11", "16", "17", "18"):
        os.symlink((day / "trace" / f"{hour}.csv.gz").resolve(), root / "trace" / f"{hour}.csv.gz")
    for path in sorted((day / "metric").iterdir()):
        if path.name.startswith(pods):
            os.symlink(path.resolve(), root / "metric" / path.name)
    for path in sorted((day / "log").iterdir())[:3]:
        os.symlink(path.resolve(), root / "log" / path.name)
    return root


@pytest.mark.slow
def test_detect_stage_through_the_broker_gives_the_offline_verdicts(datasets, kafka_settings, tmp_path):
    from models.anofusion import AnoFusion
    from models.chunks import ChunkOptions, read_observations
    from models.microservices import read_traces
    from models.tracelstm import TraceLSTM
    from services.cores.parse import ParseCore
    from services.shell import StageRunner, ensure_topics
    from confluent_kafka import Producer

    from tests.kafkautil import consume

    limit_cpu_threads()
    timings = {"start": time.monotonic()}
    day = datasets / "trainticket_2023-01-30"
    # TraceLSTM: trained on the 16 h traces (seconds), judged on 17 h's first 150
    tracelstm = TraceLSTM(hidden=32, embedding=16, epochs=20, lr=1e-2, device="cpu")
    tracelstm.fit(read_traces([day / "trace" / "16.csv.gz"]))
    traces = read_traces([day / "trace" / "17.csv.gz"])[:150]
    # AnoFusion: three pods' chunks of 16-18 h to train, 11 h's (with the first fault's logs) to judge
    pods = ("ts-basic-service", "ts-contacts-service", "ts-station-service")
    data = _trainticket_slice(datasets, tmp_path / "day", pods)
    core = ParseCore()
    obs = read_observations(data, ChunkOptions(step_s=60.0, steps=6), parse_core=core)
    units = [u for u in obs.units() if u[0].startswith(pods)]
    first = min(step for _, step in units)
    anofusion = AnoFusion(steps=6, hidden=8, epochs=2, variants=("all",), device="cpu", max_train_chunks=600)
    anofusion.parse_state = core.snapshot()
    anofusion.fit(list(obs.chunks([u for u in units if u[1] >= first + 120])))
    judged = sorted((u for u in units if u[1] < first + 120), key=lambda u: (u[1], u[0]))
    chunks = list(obs.chunks(judged))
    assert any(c.logs for c in chunks) and any(e.level for c in chunks for e in c.logs)

    timings["trained"] = time.monotonic()
    trace_verdicts = tracelstm.score(traces)
    chunk_verdicts = anofusion.score(chunks)
    assert 0 < sum(v.anomalous for v in trace_verdicts) < len(traces)
    assert 0 < sum(v.anomalous for v in chunk_verdicts) < len(chunks)

    model_dir = tmp_path / "models"
    for detector in (tracelstm, anofusion):
        detector.save(tmp_path / detector.name)
        artifacts.publish(tmp_path / detector.name, model_dir)
    settings = kafka_settings.model_copy(update={"model_dir": model_dir, "device": "cpu", "detect_batch": 32,
                                                 "state_dir": tmp_path / "state"})
    ensure_topics(settings)
    spec = stages.build("detect", settings)
    spec.core.core.episode_idle_s = 3.0       # episodes still open when input ends close soon after
    stop = threading.Event()
    runner = StageRunner(settings, spec, stop)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        producer = Producer(settings.kafka_config() | {"enable.idempotence": True, "linger.ms": 5})
        for t in traces:                      # keyed as the assemble stage keys them
            producer.produce(settings.traces_topic, encode(trace_record(t)), t.trace_id)
        producer.produce(settings.traces_topic, b"not a trace", b"bad")
        for c in chunks:
            producer.produce(settings.chunks_topic, encode(chunk_record(c)), c.entity)
        producer.produce(settings.chunks_topic, b'{"chunk_id": "x"}', b"bad")
        assert producer.flush(30) == 0
        timings["produced"] = time.monotonic()
        flagged_traces = sum(v.anomalous for v in trace_verdicts)
        deadline = time.monotonic() + 90
        while True:
            alerts = [decode(m.value(), Alert) for m in consume(settings, settings.alerts_topic, 1, timeout=2)]
            per_trace = {a.key: a for a in alerts if a.modality == "traces" and a.kind != "episode"}
            finals = [a for a in alerts if a.modality == "chunks" and a.status == "final"]
            opened = {a.alert_id for a in alerts if a.modality == "chunks" and a.status == "open"}
            if (len(per_trace) >= flagged_traces and opened and opened <= {a.alert_id for a in finals}) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        timings["alerts"] = time.monotonic()
        letters = [decode(m.value(), DeadLetter) for m in consume(settings, settings.deadletter_topic, 2, timeout=30)]
    finally:
        stop.set()
        thread.join(30)
    # one verdict in the stream equals the verdict in evaluation
    expected_traces = {t.trace_id: v.score for t, v in zip(traces, trace_verdicts) if v.anomalous}
    assert {k: a.score for k, a in per_trace.items()} == expected_traces
    assert all(a.entity and a.detector == "tracelstm" and a.model_version == "v0001" for a in per_trace.values())
    expected_chunks = {chunk_record(c).chunk_id: v.score for c, v in zip(chunks, chunk_verdicts) if v.anomalous}
    seen_chunks = {i["id"]: i["score"] for a in finals for i in a.details["items"]}
    assert seen_chunks == expected_chunks
    assert sum(a.anomalies for a in finals) == len(expected_chunks)
    assert {a.entity for a in finals} <= {c.entity for c in chunks}
    assert sorted(d.reason for d in letters) == ["bad_chunk", "bad_trace"]


def test_logwarden_run_detect_without_a_model_waits_then_ends_when_idle(kafka_settings, tmp_path):
    """The compose services' command: with no model the stage leaves input in Kafka, and
    --exit-when-idle still ends it (as `run all --exit-when-idle` needs)."""
    import subprocess

    from tests.streamutil import settings_env

    settings = kafka_settings.model_copy(update={"model_dir": tmp_path / "models", "state_dir": tmp_path / "state",
                                                 "metrics_port": 0})
    exe = Path(os.sys.executable).with_name("logwarden")
    done = subprocess.run([str(exe), "run", "detect", "--exit-when-idle", "2"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no trace or chunk model" in done.stderr


def test_alerts_tail_prints_entity_diagnosis_and_threshold(tracelstm_model, anofusion_model, faulty):
    from services.alerts import format_alert

    traces = anomalous_traces()
    core = core_with(traces=tracelstm_model)
    [per_trace, opened] = alerts_of(core.process(records(TRACES, [encode(trace_record(traces[1]))])))
    text = format_alert(per_trace)
    assert "entity    auth-0  (traces)" in text
    assert "expected db SELECT orders|" in text and "expected  db SELECT orders (" in text
    assert "threshold" in text and "(traces, episode)" in format_alert(opened)
    obs, steps, at = faulty
    chunk = obs.chunk(obs.entities()[0], at["spike"])
    [episode] = alerts_of(core_with(chunks=anofusion_model).process(records(CHUNKS, [encode(chunk_record(chunk))])))
    text = format_alert(episode)
    assert f"entity    {chunk.entity}  (chunks, episode)" in text
    assert "channel   metric:CpuUsageRate(%)" in text


def test_a_detector_that_raises_leaves_no_half_counted_episode(tracelstm_model):
    """The shell gives a batch that raised again record by record: the records before the one
    that raises must not count twice in their episode."""
    class Picky:
        name, modality = "tracelstm", "traces"

        def score(self, items):
            if any(t.trace_id == "poison" for t in items):
                raise RuntimeError("cannot judge this one")
            return tracelstm_model.score(items)

    served = {"traces": {"tracelstm": ("v0001", Picky())}}
    core = ScoreCore(lambda: served, traces_topic=TRACES, chunks_topic=CHUNKS, alerts_topic=ALERTS)
    broken = fresh(3, seed=31, get=False, concurrent=CONCURRENT)
    for t in broken:
        t.spans = [s for s in t.spans if s.operation != "SELECT orders"]
    poison = dataclasses.replace(fresh(1, seed=32)[0], trace_id="poison")
    batch = records(TRACES, [encode(trace_record(t)) for t in [*broken, poison]])
    with pytest.raises(RuntimeError):
        core.process(batch)
    outs = []
    for rec in batch[:-1]:                   # as StageRunner.process retries them
        outs += core.process([rec])
    episodes = [a for a in alerts_of(outs) if a.kind == "episode"]
    assert [(a.status, a.anomalies) for a in episodes] == [("open", 1), ("update", 2)]
    assert core.episodes[(TRACES, 0)][("tracelstm", "auth-0")].count == 3
