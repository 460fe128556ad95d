"""Feedback: the core that turns a false positive into a new DeepLog version, and the round trip
through the real broker (alert -> `logwarden feedback` -> update -> reload -> rollback)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
from prometheus_client import REGISTRY

from models import artifacts
from models.base import Sequence
from models.data import hdfs_test_split, read_hdfs_100k, read_sessions, read_templates, to_sequences
from services import stages
from services.alerts import reader as alerts_reader
from services.cores.feedback import AlertIndex, FeedbackCore, FeedbackError, feedback_identity, learned_entry
from services.stages import FeedbackStage
from services.records import Alert, Feedback, KeySequence, ParsedEvent, Source, decode, encode, stable_id
from services.shell import Record, Reject
from tests.kafkautil import produce_values
from tests.test_alerts_cli import make_alert
from tests.streamutil import REPO, settings_env, wait_until


# --------------------------------------------------------------------------------------------
# a small DeepLog and a normal session it wrongly flags
@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    """(model dir, templates, a held-out normal session the model flags) for this module."""
    import torch

    from models.deeplog import DeepLog

    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1)))
    hdfs = datasets / "hdfs"
    training = read_sessions(hdfs / "deeplog_hdfs_train")
    templates = read_templates(hdfs / "HDFS_templates.csv")
    model = DeepLog(g=5, hidden=32, embedding=8, epochs=3, device="cpu")
    model.fit(to_sequences(training[:400], templates), templates=templates)
    out = tmp_path_factory.mktemp("deeplog")
    model.save(out)
    normal, _ = hdfs_test_split(read_hdfs_100k(hdfs / "HDFS_100k_block_labels.csv"), training)
    candidates = to_sequences([list(b.keys) for b in normal[:1500]], templates)
    flagged = [s for s, v in zip(candidates, model.score(candidates)) if v.anomalous]
    assert flagged, "the small model flags none of 1500 normal sessions: pick another training size"
    return out, templates, flagged[0].keys


def published(model: Path, model_dir: Path) -> Path:
    return artifacts.publish(model, model_dir, "deeplog")


def flags(version: Path, keys: list[str]) -> bool:
    return artifacts.load(version, device="cpu").score([Sequence(keys=list(keys))])[0].anomalous


def false_positive(keys: list[str], templates: dict[str, str], alert_id: str = "a1", at: float = 1.0) -> Feedback:
    return Feedback(alert_id=alert_id, verdict="false_positive", detector="deeplog", key="blk_1", time=at,
                    sequence=KeySequence(keys=keys, templates={k: templates[k] for k in keys}))


# --------------------------------------------------------------------------------------------
# core
@pytest.mark.slow
def test_false_positive_becomes_a_new_version_that_no_longer_flags_it_and_rollback_restores(trained, tmp_path):
    model, templates, keys = trained
    v1 = published(model, tmp_path)
    assert flags(v1, keys)
    result = FeedbackCore(tmp_path, device="cpu").apply(false_positive(keys, templates))
    assert result["action"] == "updated" and result["parent"] == "v0001" and result["version"] == "v0002"
    v2 = artifacts.latest(tmp_path, "deeplog")
    assert v2.name == "v0002"
    manifest = artifacts.read_manifest(v2)
    assert manifest["parent"] == "v0001"
    assert manifest["feedback"] == [{"alert_id": "a1", "verdict": "false_positive", "time": 1.0}]
    assert not flags(v2, keys)
    assert flags(v2, [*keys, "E999"])            # an unseen template is still an anomaly
    assert flags(v1, keys)                       # the previous version is kept as it was
    artifacts.rollback(tmp_path, "deeplog")
    assert artifacts.latest(tmp_path, "deeplog") == v1


@pytest.mark.slow
def test_replayed_feedback_is_not_learned_twice_but_a_new_report_is(trained, tmp_path):
    model, templates, keys = trained
    published(model, tmp_path)
    core = FeedbackCore(tmp_path, device="cpu")
    fb = false_positive(keys, templates)
    assert core.apply(fb)["action"] == "updated"
    assert core.apply(fb) == {"action": "duplicate", "detector": "deeplog", "version": "v0002"}
    assert [p.name for p in artifacts.versions(tmp_path, "deeplog")] == ["v0001", "v0002"]
    again = core.apply(false_positive(keys, templates, alert_id="a2", at=2.0))
    assert again["action"] == "updated" and again["parent"] == "v0002"
    assert len(artifacts.read_manifest(artifacts.latest(tmp_path, "deeplog"))["feedback"]) == 2


def test_true_positives_and_detectors_without_online_update_change_no_model(tmp_path):
    core = FeedbackCore(tmp_path, device="cpu")
    seq = KeySequence(keys=["E5", "E22"])
    tp = Feedback(alert_id="a", verdict="true_positive", detector="deeplog", sequence=seq, time=1)
    fp_attgru = Feedback(alert_id="b", verdict="false_positive", detector="attgru", sequence=seq, time=1)
    assert core.apply(tp)["action"] == "recorded"
    assert core.apply(fp_attgru)["action"] == "recorded"
    assert not (tmp_path / "deeplog").exists() and not (tmp_path / "attgru").exists()


def test_feedback_that_cannot_be_applied_names_why(tmp_path):
    core = FeedbackCore(tmp_path, device="cpu")
    with pytest.raises(FeedbackError) as no_model:
        core.apply(Feedback(alert_id="a", verdict="false_positive", detector="deeplog",
                            sequence=KeySequence(keys=["E5"]), time=1))
    assert no_model.value.reason == "no_model" and str(tmp_path) in no_model.value.detail
    with pytest.raises(FeedbackError) as no_sequence:
        core.apply(Feedback(alert_id="a", verdict="false_positive", detector="deeplog", time=1))
    assert no_sequence.value.reason == "no_sequence"


def test_alert_index_knows_each_record_of_what_detect_produced_and_forgets_the_oldest():
    index = AlertIndex(max_alerts=2, max_records=2)
    first = make_alert(1, ["dn1"])
    index.add(msgspec.structs.replace(first, status="open", sequence=KeySequence(keys=["E22"])))
    index.add(first)
    told = Feedback(alert_id=first.alert_id, verdict="false_positive", detector="deeplog", key=first.key,
                    sequence=first.sequence, time=1)
    index.check(told)                                            # the final record
    index.check(msgspec.structs.replace(told, sequence=KeySequence(keys=["E22"])))   # the open one
    for forged in ({"sequence": KeySequence(keys=["E22", "E5"])}, {"detector": "attgru"}, {"key": "blk_9"}):
        with pytest.raises(FeedbackError) as refused:
            index.check(msgspec.structs.replace(told, **forged))
        assert refused.value.reason == "alert_mismatch", forged
    with pytest.raises(FeedbackError) as unknown:
        index.check(msgspec.structs.replace(told, alert_id="0123456789abcdef"))
    assert unknown.value.reason == "unknown_alert" and "never produced" in unknown.value.detail
    index.add(make_alert(2, ["dn1"]))
    index.add(make_alert(3, ["dn1"]))                            # over the bound: the oldest goes
    assert len(index) == 2 and index.forgotten == 1
    with pytest.raises(FeedbackError, match="1 older ones it forgot"):
        index.check(told)


def test_a_learned_feedback_names_its_sender_in_the_manifest_entry():
    fb = Feedback(alert_id="a", verdict="false_positive", time=1.0, sender="operator")
    assert learned_entry(fb) == {"alert_id": "a", "verdict": "false_positive", "time": 1.0, "sender": "operator"}
    assert learned_entry(msgspec.structs.replace(fb, sender=None)) == feedback_identity(fb)


@pytest.mark.slow
def test_stage_refuses_feedback_on_alerts_detect_never_produced_and_counts_applied_feedback(
        tmp_path, kafka_settings):
    """The alert check reads the real alerts topic: an id detect produced after the stage last
    looked is found too (it reads on from where it stopped)."""
    from services.shell import ensure_topics

    settings = kafka_settings.model_copy(update={"model_dir": tmp_path, "device": "cpu"})
    ensure_topics(settings)
    produced = make_alert(1, ["dn1"])
    produce_values(settings, settings.alerts_topic, [encode(produced)], key=produced.alert_id)
    stage = FeedbackStage(settings)

    def record(value: bytes) -> Record:
        return Record("fb", 0, 0, None, value, 0)

    def feedback(alert: Alert, **changes) -> bytes:
        return encode(msgspec.structs.replace(Feedback(
            alert_id=alert.alert_id, verdict="false_positive", detector=alert.detector, key=alert.key,
            sequence=alert.sequence, time=1, sender="operator"), **changes))

    def refused(value: bytes) -> Reject:
        (bad,) = stage.process([record(value)])
        assert isinstance(bad, Reject)
        return bad

    try:
        assert refused(b'{"alert_id": "x"}').reason == "bad_feedback"
        assert refused(feedback(produced, alert_id="0123456789abcdef")).reason == "unknown_alert"
        assert refused(feedback(produced, sequence=KeySequence(keys=["E5"]))).reason == "alert_mismatch"
        assert refused(feedback(produced)).reason == "no_model"          # known alert, no DeepLog to update
        later = make_alert(2, ["dn2"])
        produce_values(settings, settings.alerts_topic, [encode(later)], key=later.alert_id)
        labels = {"detector": "deeplog", "verdict": "true_positive"}
        before = REGISTRY.get_sample_value("logwarden_feedback_total", labels) or 0
        assert stage.process([record(feedback(later, verdict="true_positive"))]) == []
        assert REGISTRY.get_sample_value("logwarden_feedback_total", labels) == before + 1
        assert sum(stage.core.alerts.positions.values()) == 2          # each record read once
    finally:
        stage.core.alerts.close()


# --------------------------------------------------------------------------------------------
# through the broker
def session_events(key: str, keys: list[str], templates: dict[str, str], host: str = "dn1") -> list[ParsedEvent]:
    return [ParsedEvent(event_id=stable_id(host, key, i), key=key, keys=[key], timestamp=1226262918.0 + i,
                        level="INFO", component="dfs.DataNode", template_id=k, template=templates.get(k, k), params=[],
                        message=f"event {i} of {key}: {k}",
                        source=Source(host=host, topic=f"logs.{host}", partition=0, offset=i,
                                      file_path=f"/var/log/hadoop/{host}.log", file_offset=100 * i))
            for i, k in enumerate(keys)]


def alert_id_of(events: list[ParsedEvent]) -> str:
    return stable_id("deeplog", stable_id(events[0].key, events[0].event_id))


class AlertCollector(threading.Thread):
    """Reads ALERTS_TOPIC from the beginning into ``alerts`` (alert id -> records)."""

    def __init__(self, settings):
        super().__init__(daemon=True)
        self.settings, self.stop, self.alerts = settings, threading.Event(), {}

    def run(self):
        consumer = alerts_reader(self.settings, from_beginning=True, wait_s=30)
        try:
            while not self.stop.is_set():
                for msg in consumer.consume(100, timeout=0.2):
                    if not msg.error():
                        alert = decode(msg.value(), Alert)
                        self.alerts.setdefault(alert.alert_id, []).append(alert)
        finally:
            consumer.close()

    def wait(self, alert_id: str, timeout: float = 60) -> Alert:
        wait_until(lambda: alert_id in self.alerts, timeout, what=f"alert {alert_id}")
        return self.alerts[alert_id][-1]


def served(version: str) -> bool:
    return REGISTRY.get_sample_value("logwarden_model_version_info",
                                     {"detector": "deeplog", "version": version}) == 1


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=settings_env(settings), cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_false_positive_fed_back_through_kafka_is_not_flagged_by_the_reloaded_model_until_rollback(
        trained, kafka_settings, tmp_path):
    model, templates, keys = trained
    settings = kafka_settings.model_copy(update={
        "model_dir": tmp_path / "models", "device": "cpu", "reload_check_s": 0.5, "state_dir": tmp_path / "state",
        "session_gap_s": 1e9, "idle_close_s": 2.0, "allowed_lateness_s": 0.0, "watermark_grace_s": 0.5})
    published(model, settings.model_dir)
    stop = threading.Event()
    runner = threading.Thread(target=stages.run, args=(["sessions", "feedback"], settings), kwargs={"stop": stop})
    runner.start()
    collector = AlertCollector(settings)
    collector.start()

    def send(*sessions: list[ParsedEvent]) -> None:
        # closed by the stage's idle close, judged at once
        for events in sessions:
            produce_values(settings, settings.events_topic, [encode(e) for e in events], key=events[0].key)

    labels = {"detector": "deeplog", "verdict": "false_positive"}
    feedback_before = REGISTRY.get_sample_value("logwarden_feedback_total", labels) or 0
    try:
        first = session_events("blk_101", keys, templates)
        send(first)
        alert = collector.wait(alert_id_of(first))
        wait_until(lambda: collector.alerts[alert.alert_id][-1].status == "final", 60, what="the final alert")
        alert = collector.alerts[alert.alert_id][-1]
        assert alert.status == "final" and alert.anomalous and alert.model_version == "v0001"
        assert alert.sequence.keys == keys and alert.sequence.complete
        # texts of expected keys the stream has not shown come from the model's vocabulary
        assert all(k.template == templates[k.template_id] for k in alert.expected if k.template_id in templates)

        missing = cli(settings, "feedback", "0123456789abcdef", "--false-positive")
        assert missing.returncode == 2
        assert missing.stderr.strip() == f"logwarden feedback: no alert 0123456789abcdef on {settings.alerts_topic}"

        sent = cli(settings, "feedback", alert.alert_id, "--false-positive", "--note", "a normal block")
        assert sent.returncode == 0, sent.stderr
        assert alert.alert_id in sent.stdout and settings.feedback_topic in sent.stdout
        wait_until(lambda: served("v0002"), 90, what="detect to serve the version made from the feedback")
        assert artifacts.read_manifest(settings.model_dir / "deeplog" / "v0002")["parent"] == "v0001"
        assert REGISTRY.get_sample_value("logwarden_feedback_total", labels) == feedback_before + 1

        # The same sequence in another block is now normal: no alert. A block with a template the
        # model never saw, judged right after it, shows the detector has got that far.
        again, sentinel = session_events("blk_102", keys, templates), session_events("blk_103", [*keys, "E999"], templates)
        send(again, sentinel)
        assert collector.wait(alert_id_of(sentinel)).model_version == "v0002"
        time.sleep(2)
        assert alert_id_of(again) not in collector.alerts

        rollback = cli(settings, "model", "rollback", "--detector", "deeplog")
        assert rollback.returncode == 0, rollback.stderr
        wait_until(lambda: served("v0001"), 30, what="detect to serve v0001 again")
        third = session_events("blk_104", keys, templates)
        send(third)
        restored = collector.wait(alert_id_of(third))
        assert restored.anomalous and restored.model_version == "v0001"
    finally:
        stop.set()
        runner.join(60)
        collector.stop.set()
        collector.join(10)
