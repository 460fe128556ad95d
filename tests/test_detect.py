"""The detect stage: DetectCore (pure) and serving through the real broker with hot reload.

DeepLog is trained on the tiny grammar of tests/test_deeplog.py (a -> b -> (c | d c) -> e+ -> f);
sessions become windows through the real WindowCore, as in the stream.
"""
from __future__ import annotations

import random
import threading
import time

import pytest
from prometheus_client import REGISTRY

from models import artifacts
from models.base import Sequence
from models.deeplog import DeepLog
from services import stages
from services.detect import DetectCore, to_sequence
from services.records import Alert, ParsedEvent, Source, stable_id
from services.window import WindowCore
from tests.kafkautil import consume, produce_values
from tests.test_attgru import TEMPLATES as ATTGRU_TEXTS
from tests.test_attgru import trained as attgru_model  # noqa: F401  (a fixture)
from tests.test_deeplog import SMALL, grammar_session

TEXTS = {"a": "Receiving block <*>", "b": "Allocate block <*>", "c": "Received block <*>", "d": "Retry <*>",
         "e": "PacketResponder <*> terminating", "f": "Deleting block <*>"}


@pytest.fixture(scope="module")
def model_v1() -> DeepLog:
    rng = random.Random(0)
    detector = DeepLog(**SMALL)
    detector.fit([Sequence(grammar_session(rng)) for _ in range(200)], templates=TEXTS)
    return detector


def events(key: str, keys: list[str], host: str = "dn1", t0: float = 1000.0, texts=TEXTS) -> list[ParsedEvent]:
    out = []
    for i, k in enumerate(keys):
        src = Source(host=host, topic=f"logs.{host}", partition=0, offset=i, file_path="/var/log/x.log",
                     file_offset=i * 80, kafka_timestamp=time.time())
        out.append(ParsedEvent(event_id=stable_id(host, key, i), key=key, keys=[key], timestamp=t0 + i, level="INFO",
                               component="dfs.DataNode", template_id=k, template=texts[k], params=[key],
                               message=f"081109 2035{i:02d} 1 INFO dfs.DataNode: {texts[k].replace('<*>', key)}",
                               source=src))
    return out


def windows_of(sessions: dict[str, list[str]], h: int, texts=TEXTS):
    """Sliding windows as events arrive, then every session closed (as idle close does)."""
    core = WindowCore(window_size=h, session_gap_s=1e9, idle_close_s=1.0)
    out = []
    for key, keys in sessions.items():
        for e in events(key, keys, texts=texts):
            out.extend(core.process(e, 0.0))
    return out + core.close_all("idle")


def test_anomalous_session_opens_one_alert_updates_it_and_closes_it_final(model_v1):
    core = DetectCore({"deeplog": ("v0001", model_v1)})
    alerts = core.process(windows_of({"blk_1": ["a", "b", "e", "f"]}, SMALL["h"]))
    assert [a.status for a in alerts][0] == "open" and alerts[-1].status == "final"
    assert len({a.alert_id for a in alerts}) == 1                           # one alert per session
    first = alerts[0]
    assert first.alert_id == stable_id("deeplog", stable_id("blk_1", events("blk_1", ["a"])[0].event_id))
    assert (first.first_anomaly.position, first.observed.template_id, first.kind) == (2, "e", "key")
    assert first.first_anomaly.message.endswith("PacketResponder blk_1 terminating")
    assert first.first_anomaly.source.file_offset == 160
    assert {k.template_id for k in first.expected} >= {"c", "d"}
    assert all(k.template == TEXTS[k.template_id] for k in first.expected if k.template_id in TEXTS)
    assert [k.template_id for k in first.window] == ["a", "b"]
    final = alerts[-1]
    assert final.anomalous and final.severity == "critical" and final.model_version == "v0001"
    assert final.first_anomaly.position == 2
    # the final verdict is the batch verdict of the same model on the same session
    batch = model_v1.score([Sequence(["a", "b", "e", "f"])])[0]
    assert final.score == pytest.approx(batch.score) and final.anomalies == len(batch.anomalies)


def test_normal_sessions_give_no_alert_and_replayed_windows_are_ignored(model_v1):
    core = DetectCore({"deeplog": ("v0001", model_v1)})
    wins = windows_of({"blk_2": ["a", "b", "c", "e", "f"], "blk_3": ["a", "b", "d", "c", "e", "e", "f"]}, SMALL["h"])
    assert core.process(wins) == []
    bad = windows_of({"blk_4": ["a", "b", "e", "f"]}, SMALL["h"])
    assert core.process(bad)
    assert core.process(bad) == []          # at-least-once: the same window ids again


def test_sliding_verdicts_in_the_stream_equal_the_session_verdict(model_v1):
    wins = windows_of({"blk_5": ["a", "b", "d", "e", "f"]}, SMALL["h"])   # d -> e skips c
    sliding = [w for w in wins if w.kind == "sliding"]
    flagged = [w.first_index + len(w.events) - 1 for w in sliding
               if model_v1.score([to_sequence(w)])[0].anomalous]
    closed = [w for w in wins if w.kind == "session"][0]
    positions = [a.position for a in model_v1.score([to_sequence(closed)])[0].anomalies if a.kind == "key"]
    assert flagged == positions and positions


@pytest.mark.slow
def test_detect_stage_serves_through_the_broker_and_hot_reloads(model_v1, kafka_settings, tmp_path):
    model_dir = tmp_path / "models"
    first = tmp_path / "v1"
    model_v1.save(first)
    artifacts.publish(first, model_dir)
    settings = kafka_settings.model_copy(update={"model_dir": model_dir, "reload_check_s": 0.5, "device": "cpu",
                                                 "detect_batch": 16})
    stop = threading.Event()
    runner = threading.Thread(target=stages.run, args=(["detect"], settings), kwargs={"stop": stop})
    runner.start()
    try:
        def send(sessions):
            wins = windows_of(sessions, SMALL["h"])
            produce_values(settings, settings.windows_topic,
                           [w.model_dump_json(by_alias=True) for w in wins])

        send({"blk_10": ["a", "b", "e", "f"], "blk_11": ["a", "b", "c", "e", "f"]})
        alerts = [Alert.model_validate_json(m.value()) for m in consume(settings, settings.alerts_topic, 2, timeout=60,
                                                                        settle=2)]
        assert {a.key for a in alerts} == {"blk_10"}
        assert {a.status for a in alerts} >= {"open", "final"}
        assert {a.model_version for a in alerts} == {"v0001"}

        # An operator says b -> e is fine: a new version learns it; the worker reloads it.
        second = tmp_path / "v2"
        updated = DeepLog.load(first, device="cpu")
        updated.update([Sequence(["a", "b", "e", "f"])], epochs=30)
        assert not updated.score([Sequence(["a", "b", "e", "f"])])[0].anomalous
        updated.save(second)
        artifacts.publish(second, model_dir)
        time.sleep(2.0)                                # > reload_check_s
        before = len(alerts)
        send({"blk_12": ["a", "b", "e", "f"], "blk_13": ["a", "b", "d", "e", "f"]})
        every = [Alert.model_validate_json(m.value())
                 for m in consume(settings, settings.alerts_topic, before + 2, timeout=60, settle=2)]
        later = [a for a in every if a.key in ("blk_12", "blk_13")]     # records come in partition order
        assert {a.key for a in later} == {"blk_13"}, "blk_12 must pass under the reloaded model"
        assert {a.model_version for a in later} == {"v0002"}
    finally:
        stop.set()
        runner.join(30)
    assert REGISTRY.get_sample_value("logwarden_model_version_info", {"detector": "deeplog", "version": "v0002"}) == 0


@pytest.mark.slow
def test_attgru_is_served_through_the_broker_and_its_alert_shows_the_attention(attgru_model, kafka_settings, tmp_path):
    saved = tmp_path / "attgru"
    attgru_model.save(saved)
    settings = kafka_settings.model_copy(update={"model_dir": tmp_path / "models", "device": "cpu", "detect_batch": 16})
    artifacts.publish(saved, settings.model_dir)
    normal = ["E1", "E2", "E2", "E2", "E3", "E4", "E4", "E3", "E3", "E4", "E5", "E5", "E5"]
    broken = normal[:6] + ["E6"] + normal[6:]
    assert not attgru_model.score([Sequence(normal, templates=[ATTGRU_TEXTS[k] for k in normal])])[0].anomalous
    stop = threading.Event()
    runner = threading.Thread(target=stages.run, args=(["detect"], settings), kwargs={"stop": stop})
    runner.start()
    try:
        wins = windows_of({"blk_20": normal, "blk_21": broken}, 10, texts=ATTGRU_TEXTS)
        produce_values(settings, settings.windows_topic, [w.model_dump_json(by_alias=True) for w in wins])
        alerts = [Alert.model_validate_json(m.value()) for m in consume(settings, settings.alerts_topic, 2, timeout=60,
                                                                        settle=2)]
    finally:
        stop.set()
        runner.join(30)
    assert {a.key for a in alerts} == {"blk_21"}
    final = [a for a in alerts if a.status == "final"][0]
    assert final.detector == "attgru" and final.anomalous
    weights = final.details["attention"]
    assert len(weights) == len(final.details["window_keys"]) and abs(sum(weights) - 1) < 1e-4
