"""The detect stage: DetectCore (pure) and serving through the real broker with hot reload.

DeepLog is trained on the tiny grammar of tests/test_deeplog.py (a -> b -> (c | d c) -> e+ -> f);
sessions become windows through the real WindowCore, as in the stream.
"""
from __future__ import annotations

import math
import random
import threading
import time

import pytest
from prometheus_client import REGISTRY

from models import artifacts
from models.base import Sequence
from models.deeplog import DeepLog
from services import stages
from services.cores.detect import DetectCore, key_sequence, to_sequence
from services.stages import DetectStage
from services.records import Alert, ParsedEvent, Source, Step, numeric_params, stable_id
from services.settings import Settings
from services.shell import BadRecord, Record
from services.cores.window import WindowCore
from tests.kafkautil import consume, produce_values
from tests.test_window_core import event as window_event
from tests.test_window_core import full_event_window, hdfs_events, needs_hdfs, sliding_with_full_events
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
    flagged = [w.first_index + len(w.context) + len(w.events) - 1 for w in sliding   # the newest event
               if model_v1.score([to_sequence(w)])[0].anomalous]
    closed = [w for w in wins if w.kind == "session"][0]
    positions = [a.position for a in model_v1.score([to_sequence(closed)])[0].anomalies if a.kind == "key"]
    assert flagged == positions and positions


def _same_alerts(a: list[Alert], b: list[Alert]) -> None:
    assert [x.model_dump_json() for x in a] == [x.model_dump_json() for x in b]


@needs_hdfs
def test_compact_sliding_windows_give_the_sequences_and_alerts_of_full_event_windows(model_v1):
    pairs = sliding_with_full_events(hdfs_events(3000), window_size=SMALL["h"], session_gap_s=600, idle_close_s=1e9)
    twins = [full_event_window(w, full) for w, full in pairs]
    assert any(s.values for w, _ in pairs for s in w.context)
    for (w, _), twin in zip(pairs, twins):
        assert to_sequence(w) == to_sequence(twin)
        assert key_sequence(w) == key_sequence(twin)
    # the grammar model knows none of these keys: plenty of alerts to compare
    compact = DetectCore({"deeplog": ("v0001", model_v1)}).process([w for w, _ in pairs], now=5.0)
    full = DetectCore({"deeplog": ("v0001", model_v1)}).process(twins, now=5.0)
    assert len(compact) > 100
    _same_alerts(compact, full)


def test_a_template_id_with_several_texts_reaches_the_detector_per_event():
    texts = ["disk <*> full", "fan <*> off", "disk <*> full", "fan <*> off", "temp <*>"]
    stream = [window_event("blk_1", ts=float(i), offset=i, template_id="unknown").model_copy(update={"template": t})
              for i, t in enumerate(texts)]
    pairs = sliding_with_full_events(stream, window_size=4, session_gap_s=600, idle_close_s=1e9)
    w, full = pairs[-1]
    assert to_sequence(w).templates == texts
    assert to_sequence(w) == to_sequence(full_event_window(w, full))
    assert key_sequence(w) == key_sequence(full_event_window(w, full))


def test_sliding_alerts_point_at_the_newest_full_event(model_v1):
    wins = windows_of({"blk_6": ["a", "b", "c", "e", "e", "b", "f"]}, SMALL["h"])   # e -> b is unexpected
    sliding = [w for w in wins if w.kind == "sliding"]
    assert all(len(w.events) == 1 for w in sliding) and len(sliding[-1].context) == SMALL["h"]
    alerts = DetectCore({"deeplog": ("v0001", model_v1)}).process(sliding)
    opened = [a for a in alerts if a.status == "open"][0]
    assert (opened.first_anomaly.position, opened.observed.template_id) == (5, "b")
    assert opened.first_anomaly.message.endswith("Allocate block blk_6")
    assert [k.template_id for k in opened.window] == ["a", "b", "c", "e", "e"][-SMALL["h"]:]
    assert [k.template for k in opened.window] == [TEXTS[k] for k in ["a", "b", "c", "e", "e"][-SMALL["h"]:]]
    assert opened.sequence.keys == ["a", "b", "c", "e", "e", "b"][-SMALL["h"] - 1:]


def test_a_window_whose_context_lacks_template_texts_is_a_bad_record(tmp_path):
    stage = DetectStage(Settings(model_dir=tmp_path / "models", device="cpu"))
    wins = windows_of({"blk_7": ["a", "b", "c"]}, SMALL["h"])
    broken = wins[2].model_copy(update={"templates": {"a": TEXTS["a"]}})
    stage.handle(Record("w", 0, 0, None, wins[2].model_dump_json().encode(), 0))
    with pytest.raises(BadRecord, match=r"no text for context template id\(s\) \['b'\]"):
        stage.handle(Record("w", 0, 1, None, broken.model_dump_json().encode(), 0))


def _float_or_nothing(p: str) -> list[float]:
    """What numeric_params keeps of one param: float() of it, when that works and is finite."""
    try:
        value = float(p)
    except ValueError:
        return []
    return [value] if math.isfinite(value) else []


@pytest.mark.parametrize("param, values", [
    ("7", [7.0]), ("-3", [-3.0]), ("+2.5", [2.5]), (" 7", [7.0]), ("7\t\n", [7.0]), ("1e5", [1e5]),
    ("1E-3", [1e-3]), (".5", [0.5]), ("5.", [5.0]), ("1_000", [1000.0]), ("0x10", []), ("-0", [-0.0]),
    ("\u0661\u0662", [12.0]), ("\u00a07", [7.0]),                    # non-ASCII digits and spaces
    ("nan", []), ("-inf", []), ("Infinity", []), ("1e999", []),      # not finite: left out
    ("", []), ("-", []), (".", []), ("1_", []), ("_1", []), ("1__0", []), ("e5", []),
    ("blk_-1608999687919862906", []), ("10.250.19.102", []), ("/10.250.19.102:50010", []),
    ("1.2.3", []), ("12abc", []), ("\x1c7", []),
])
def test_numeric_params_is_float_of_the_finite_numbers(param, values):
    assert numeric_params([param]) == values == _float_or_nothing(param)
    if values:
        assert math.copysign(1, numeric_params([param])[0]) == math.copysign(1, values[0])


def test_numeric_params_agrees_with_float_on_random_strings():
    rng = random.Random(3)
    alphabet = list("0123456789.eE+-_ \t\n\x0b\x0c\r\x1cinfatyINFATY/:b") + ["\u0661", "\u00a0", "\u2003", "\uff17"]
    params = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 8))) for _ in range(50_000)]
    assert numeric_params(params) == [v for p in params for v in _float_or_nothing(p)]
    assert numeric_params(["a", "3", "b", "4.5"]) == [3.0, 4.5]          # order kept


def test_context_steps_carry_the_numeric_params_of_their_events():
    stream = [window_event("blk_1", ts=float(i), offset=i, params=["blk_1", str(10 * i), "10.0.0.1", "nan"])
              for i in range(3)]
    last = windows_of_events(stream)[-1]
    assert last.context == [Step(template_id="E1", timestamp=float(i), values=[10.0 * i]) for i in range(2)]
    assert to_sequence(last).params == [[0.0], [10.0], [20.0]]


def windows_of_events(stream: list[ParsedEvent], h: int = 4) -> list:
    core = WindowCore(window_size=h, session_gap_s=1e9, idle_close_s=1e9)
    return [w for e in stream for w in core.process(e, 0.0)]


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
