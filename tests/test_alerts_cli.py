"""The alert record's JSON Schema, and `logwarden alerts tail` (formatting, filters, and reading
the real broker's ALERTS_TOPIC)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import jsonschema
import pytest

from services import alerts
import msgspec

from services.records import (SCHEMAS, SCHEMA_VERSION, Alert, AlertEvent, ExpectedKey, KeySequence, Source,
                              encode, published_schema, stable_id)
from tests.kafkautil import produce_values
from tests.streamutil import REPO, settings_env

TEMPLATES = {
    "E5": "Receiving block <*> src: /<*> dest: /<*>",
    "E22": "BLOCK* NameSystem.allocateBlock: <*>",
    "E11": "PacketResponder <*> for block <*> terminating",
    "E9": "Received block <*> of size <*> from /<*>",
    "E26": "BLOCK* NameSystem.addStoredBlock: blockMap updated: <*> is added to <*> size <*>",
    "E3": "<*> Served block <*> to /<*>",
}


def make_alert(n: int, hosts: list[str], detector: str = "deeplog", status: str = "final") -> Alert:
    key = f"blk_-{1000 + n}"
    message = f"081109 203518 143 INFO dfs.DataNode$DataXceiver: 10.250.19.102:50010 Served block {key} to /10.250.19.102"
    return Alert(
        alert_id=stable_id(detector, key), status=status, detector=detector, model_version="v0003",
        key=key, hosts=hosts, anomalous=True, severity="critical", score=0.97, kind="key",
        first_anomaly=AlertEvent(position=4, template_id="E3", template=TEMPLATES["E3"], message=message,
                                 timestamp=1226262918.0 + n,
                                 source=Source(host=hosts[0], topic=f"logs.{hosts[0]}", partition=0,
                                               offset=4711 + n, file_path=f"/var/log/hadoop/{hosts[0]}.log",
                                               file_offset=90210 + n, kafka_timestamp=1700000000.5)),
        expected=[ExpectedKey(template_id="E11", template=TEMPLATES["E11"], probability=0.81),
                  ExpectedKey(template_id="E26", template=TEMPLATES["E26"], probability=0.12)],
        observed=ExpectedKey(template_id="E3", template=TEMPLATES["E3"]),
        window=[ExpectedKey(template_id=k, template=TEMPLATES[k]) for k in ("E22", "E5", "E5", "E9")],
        event_time=1226262918.0 + n, detection_time=1700000001.25,
        details={"diagnosis": "after E9 expected E11|E26, saw E3"},
        sequence=KeySequence(keys=["E22", "E5", "E5", "E9", "E3"], templates={k: TEMPLATES[k] for k in TEMPLATES}))


# --------------------------------------------------------------------------------------------
# schema
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_schema_file_is_its_records_schema_of_this_schema_version(name):
    path = REPO / "schemas" / f"{name}.v{SCHEMA_VERSION}.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == published_schema(name), (
        f"schemas/ disagrees with services.records.{SCHEMAS[name].__name__}: run "
        "`python -m services.records --write-schemas` (and bump SCHEMA_VERSION if old readers cannot read the new record)")
    assert alerts.SCHEMA_PATH == REPO / "schemas" / f"alert.v{SCHEMA_VERSION}.json"


def test_no_stale_schema_files():
    wanted = {f"{name}.v{SCHEMA_VERSION}.json" for name in SCHEMAS}
    assert {p.name for p in (REPO / "schemas").glob("*.json")} == wanted


def test_alert_records_as_produced_validate_against_the_schema_file_and_broken_ones_do_not():
    schema = json.loads(alerts.SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    wire = json.loads(encode(make_alert(1, ["dn1", "dn2"])))
    assert not list(validator.iter_errors(wire))
    assert wire["first_anomaly"]["source"]["log.file.path"] == "/var/log/hadoop/dn1.log"   # wire names

    broken = dict(wire)
    del broken["alert_id"]
    assert any("alert_id" in e.message for e in validator.iter_errors(broken))
    wrong = dict(wire, severity="apocalyptic")
    assert list(validator.iter_errors(wrong))


def test_alert_id_is_the_same_for_every_record_of_a_session_and_detector():
    assert make_alert(1, ["dn1"], status="open").alert_id == make_alert(1, ["dn1"], status="final").alert_id
    assert make_alert(1, ["dn1"]).alert_id != make_alert(2, ["dn1"]).alert_id
    assert make_alert(1, ["dn1"], detector="deeplog").alert_id != make_alert(1, ["dn1"], detector="attgru").alert_id


# --------------------------------------------------------------------------------------------
# formatting and filters (pure)
def test_readable_block_says_what_where_and_what_was_expected():
    alert = make_alert(7, ["dn2", "nn1"])
    text = alerts.format_alert(alert)
    head, *body = text.splitlines()
    assert head.startswith("2008-11-09 20:35:25.000Z")          # event time, UTC
    for part in ("CRITICAL", "deeplog v0003", "final", "score 0.970", alert.alert_id):
        assert part in head
    joined = "\n".join(body)
    assert "blk_-1007" in joined and "dn2, nn1" in joined
    assert alert.first_anomaly.message in joined                 # the unexpected line itself
    assert "/var/log/hadoop/dn2.log:90217" in joined             # where it is in the host's file
    assert "logs.dn2[0]@4718" in joined                          # and on Kafka
    observed = next(line for line in body if line.strip().startswith("observed"))
    assert "E3" in observed and TEMPLATES["E3"] in observed
    expected = [line for line in body if "E11" in line or "E26" in line]
    assert TEMPLATES["E11"] in expected[0] and "0.810" in expected[0] and TEMPLATES["E26"] in expected[1]
    assert "E22 E5 E5 E9" in joined
    assert "after E9 expected E11|E26, saw E3" in joined


def test_readable_block_names_the_session_end_and_keys_without_text():
    alert = msgspec.structs.replace(make_alert(1, ["dn1"]), expected=[
        ExpectedKey(template_id="<end>", probability=0.6), ExpectedKey(template_id="T3fa9", probability=0.2)])
    lines = alerts.format_alert(alert).splitlines()
    assert any("<end>" in line and "(end of session)" in line for line in lines)
    assert any("T3fa9" in line and "(template text unknown)" in line for line in lines)


def test_json_rendering_is_one_line_and_keeps_fields_a_newer_producer_added():
    raw = json.loads(encode(make_alert(1, ["dn1"]))) | {"added_later": {"x": 1}}
    line = alerts.render(msgspec.convert(raw, Alert), raw, as_json=True)
    assert "\n" not in line and json.loads(line) == raw


@pytest.mark.parametrize("hosts, detector, expected", [
    (None, None, True), (["dn1"], None, True), (["dn3", "nn1"], None, True), (["dn3"], None, False),
    (None, "deeplog", True), (None, "attgru", False), (["nn1"], "deeplog", True), (["nn1"], "attgru", False),
])
def test_filters_match_any_given_host_and_the_detector(hosts, detector, expected):
    assert alerts.matches(make_alert(1, ["dn1", "nn1"]), hosts, detector) is expected


# --------------------------------------------------------------------------------------------
# through the broker
def _wire(alert: Alert) -> bytes:
    return encode(alert)


def _produce_alerts(settings, produced: list[Alert]) -> None:
    from confluent_kafka import Producer

    producer = Producer(settings.kafka_config() | {"enable.idempotence": True})
    for alert in produced:
        producer.produce(settings.alerts_topic, _wire(alert), alert.alert_id)
    assert producer.flush(30) == 0


def _cli(settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = [sys.executable, "-m", "services.cli"]
    return subprocess.run([*exe, *args], env=settings_env(settings), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_tail_json_prints_the_alerts_on_the_topic_and_filters_them(kafka_settings):
    from services.shell import ensure_topics

    ensure_topics(kafka_settings)
    produced = [make_alert(1, ["dn1"]), make_alert(2, ["dn2", "nn1"]), make_alert(3, ["dn1", "dn3"], "attgru"),
                make_alert(4, ["dn3"], "attgru")]
    # junk keyed like the first alert lands in its partition before it: tail must read past it
    produce_values(kafka_settings, kafka_settings.alerts_topic, [b"not an alert"], key=produced[0].alert_id)
    _produce_alerts(kafka_settings, produced)

    everything = _cli(kafka_settings, "alerts", "tail", "--json", "--from-beginning", "--max", "4", "--timeout", "20")
    assert everything.returncode == 0, everything.stderr
    printed = sorted((json.loads(line) for line in everything.stdout.splitlines()), key=lambda a: a["key"])
    assert printed == [json.loads(_wire(a)) for a in produced]
    assert "not an alert" in everything.stderr                 # the junk record is named, not printed

    def tail(hosts=None, detector=None) -> list[str]:
        out = io.StringIO()
        alerts.tail(kafka_settings, hosts=hosts, detector=detector, as_json=True, from_beginning=True,
                    timeout=3, out=out, log=io.StringIO())
        return sorted(json.loads(line)["key"] for line in out.getvalue().splitlines())

    assert tail(hosts=["dn1"]) == ["blk_-1001", "blk_-1003"]
    assert tail(hosts=["nn1", "dn3"]) == ["blk_-1002", "blk_-1003", "blk_-1004"]
    assert tail(detector="attgru") == ["blk_-1003", "blk_-1004"]
    assert tail(hosts=["dn1"], detector="attgru") == ["blk_-1003"]

    # A script waiting for more alerts than come is told so by the exit code.
    short = _cli(kafka_settings, "alerts", "tail", "--json", "--from-beginning", "--detector", "deeplog",
                 "--max", "3", "--timeout", "3")
    assert short.returncode == 1 and len(short.stdout.splitlines()) == 2
    assert "2 of 3 alerts" in short.stderr


@pytest.mark.slow
def test_tail_follows_new_alerts_from_the_end_in_readable_form(kafka_settings):
    from services.shell import ensure_topics

    ensure_topics(kafka_settings)
    _produce_alerts(kafka_settings, [make_alert(1, ["dn1"])])             # before the tail: not shown
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "alerts", "tail", "--host", "dn2",
                             "--max", "1", "--timeout", "60"], env=settings_env(kafka_settings), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert first.startswith(f"following {kafka_settings.alerts_topic}"), first
        fresh = make_alert(9, ["dn2"])
        _produce_alerts(kafka_settings, [make_alert(8, ["dn1"]), fresh])  # dn1 is filtered out
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.count("alert ") == 1 and fresh.alert_id in out and fresh.first_anomaly.message in out
    assert "blk_-1001" not in out and "blk_-1008" not in out


@pytest.mark.slow
def test_tail_waits_for_a_missing_topic_only_as_long_as_the_timeout(kafka_settings):
    started = time.monotonic()
    result = _cli(kafka_settings.model_copy(update={"alerts_topic": f"{kafka_settings.test_id}.nothing"}),
                  "alerts", "tail", "--timeout", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"logwarden alerts: topic {kafka_settings.test_id}.nothing does not exist (waited 2 s)")
    assert time.monotonic() - started < 30
