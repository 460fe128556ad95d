"""Parse and window stages end to end through the real broker (issue 3)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from confluent_kafka import KafkaException, Producer

from services import stages
from services.records import DeadLetter, ParsedEvent
from tests.kafkautil import consume, record_count
from toolkit.replay import deal_lines
from tests.streamutil import (collect_windows, lines_by_block, logwarden, settings_env,
                              unique_sessions, wait_until)

pytestmark = pytest.mark.slow
HOSTS = ["dn1", "dn2", "dn3"]


def stream_settings(kafka_settings, datasets, tmp_path, **overrides):
    return kafka_settings.model_copy(update={
        "template_catalog": datasets / "hdfs" / "HDFS_templates.csv",
        "state_dir": tmp_path / "state",
        "session_gap_s": 1e9,            # close only on idle: HDFS blocks of the sample span hours
        "metrics_port": 0,
        **overrides})


def replay_hosts(settings, files: dict, rate: float | None = None, log=None) -> list[subprocess.Popen]:
    env = settings_env(settings)
    procs = []
    for host, path in files.items():
        args = ["replay", str(path), "--host", host, "--no-progress"]
        if rate:
            args += ["--rate", str(rate)]
        procs.append(logwarden(*args, env=env, log=log))
    return procs


def assert_sessions_match(sessions, truth):
    assert set(sessions) == set(truth), (
        f"{len(set(truth) - set(sessions))} blocks missing, {len(set(sessions) - set(truth))} unexpected")
    for blk, window in sessions.items():
        messages = [e.message for e in window.events]
        assert sorted(messages) == sorted(truth[blk]), f"{blk}: lines differ"
        stamps = [e.timestamp for e in window.events]
        assert stamps == sorted(stamps), f"{blk}: events not in event-time order"
        assert all(e.key == blk for e in window.events)


def test_hdfs_20000_as_three_hosts_gives_one_session_window_per_block(kafka_settings, datasets, tmp_path):
    src = datasets / "hdfs" / "HDFS_20000.log"
    truth = lines_by_block(src)
    assert len(truth) == 1782
    settings = stream_settings(kafka_settings, datasets, tmp_path, idle_close_s=3.0)
    files = deal_lines(src, [settings.host(h) for h in HOSTS], tmp_path / "logs")
    for p in replay_hosts(settings, files, log=tmp_path / "replay.log"):
        assert p.wait(120) == 0, (tmp_path / "replay.log").read_text()[-2000:]

    stages.run(["parse", "window"], settings, exit_when_idle=6.0)

    windows, stop = [], threading.Event()
    reader = threading.Thread(target=collect_windows, args=(settings, stop, windows))
    reader.start()
    try:
        wait_until(lambda: len({w.window_id for w in windows}) >= 1782, 60, what="1782 session windows")
        time.sleep(1)                   # nothing more may arrive
    finally:
        stop.set()
        reader.join()
    sessions = unique_sessions(windows)
    assert_sessions_match(sessions, truth)
    # blocks really span hosts, and the window says which
    assert sum(len(w.hosts) > 1 for w in sessions.values()) > 1000
    for w in list(sessions.values())[:50]:
        assert set(w.hosts) == {e.source.host for e in w.events}
        assert all(e.template_id.startswith("E") for e in w.events)


def test_sigkill_of_parse_then_window_mid_replay_loses_and_duplicates_nothing(kafka_settings, datasets, tmp_path):
    src = datasets / "hdfs" / "HDFS_20000.log"
    truth = lines_by_block(src)
    # Idle close must outlast a restart. Static membership gives the restarted window stage its
    # partitions back at once; parse (a regex subscription, so no static membership) waits for the
    # dead member's session timeout (6 s) first. The third host's topic appears only after parse
    # has subscribed: it must be picked up too.
    settings = stream_settings(kafka_settings, datasets, tmp_path, idle_close_s=20.0, instance_id="e2e")
    env = settings_env(settings)
    log = tmp_path / "stages.log"
    files = deal_lines(src, [settings.host(h) for h in HOSTS], tmp_path / "logs")
    parse = logwarden("run", "parse", env=env, log=log)
    window = logwarden("run", "window", env=env, log=log)
    events_seen = _counter(settings, settings.events_topic)
    try:
        replays = replay_hosts(settings, files, rate=2000, log=tmp_path / "replay.log")   # ~3.3 s per host
        wait_until(lambda: events_seen() > 4000, 60, what="parse to make progress")
        parse.send_signal(signal.SIGKILL)
        parse.wait()
        parse = logwarden("run", "parse", env=env, log=log)
        wait_until(lambda: events_seen() > 12000, 60, what="restarted parse to make progress")
        window.send_signal(signal.SIGKILL)
        window.wait()
        window = logwarden("run", "window", env=env, log=log)
        for p in replays:
            assert p.wait(120) == 0

        windows, stop = [], threading.Event()
        reader = threading.Thread(target=collect_windows, args=(settings, stop, windows))
        reader.start()
        try:
            wait_until(lambda: len({w.key for w in windows}) >= len(truth), 90, what="every block closed")
            time.sleep(2)
        finally:
            stop.set()
            reader.join()
    finally:
        for p in (parse, window):
            p.terminate()
            p.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert_sessions_match(unique_sessions(windows), truth)


def _counter(settings, topic):
    """A callable returning how many records `topic` holds; 0 while the topic is still being
    created (its partitions have no leader yet)."""
    def count() -> int:
        try:
            return record_count(settings, topic)
        except KafkaException:
            return 0
    return count


MALFORMED_KINDS = ["not_json", "not_utf8", "binary", "missing_message", "line_too_long", "bad_header"]


def malformed(kind: str, i: int, max_line: int) -> bytes:
    envelope = {"@timestamp": "2008-11-09T20:35:18.000Z", "host": {"name": "fuzz"},
                "log": {"file": {"path": "/var/log/hadoop/fuzz.log"}, "offset": i * 100},
                "input": {"type": "filestream"}, "message": None}
    if kind == "not_json":
        return b"{not json " + str(i).encode()
    if kind == "not_utf8":
        return b'{"message": "\xff\xfe bad ' + str(i).encode() + b'"}'
    if kind == "binary":
        envelope["message"] = "\x00\x01\x02\x03" * 10 + str(i)
    elif kind == "missing_message":
        del envelope["message"]
    elif kind == "line_too_long":
        envelope["message"] = "081109 203518 143 INFO dfs.DataNode: " + "x" * (max_line + 10)
    elif kind == "bad_header":
        envelope["message"] = f"garbage without any header {i}"
    return json.dumps(envelope).encode()


def test_ten_thousand_malformed_records_each_dead_lettered_and_stage_keeps_consuming(kafka_settings, datasets, tmp_path):
    settings = stream_settings(kafka_settings, datasets, tmp_path, max_line_bytes=1024)
    topic = settings.logs_topic("fuzz")
    producer = Producer(settings.kafka_config() | {"enable.idempotence": True, "linger.ms": 20})
    sent = {}
    for i in range(10_000):
        kind = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
        sent[i] = kind
        producer.produce(topic, malformed(kind, i, settings.max_line_bytes), key=str(i))
        if i % 1000 == 0:
            producer.poll(0)
    good = ("081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_42 "
            "src: /10.250.19.102:54106 dest: /10.250.19.102:50010")
    good_record = {"@timestamp": "2008-11-09T20:35:18.000Z", "message": good, "host": {"name": "fuzz"},
                   "log": {"file": {"path": "/var/log/hadoop/fuzz.log"}, "offset": 10**7},
                   "input": {"type": "filestream"}}
    producer.produce(topic, json.dumps(good_record).encode(), key="good")
    assert producer.flush(30) == 0

    runner = threading.Thread(target=stages.run, args=(["parse"], settings), kwargs={"exit_when_idle": 5.0})
    runner.start()
    letters, events = _drain(settings, settings.deadletter_topic, 10_000), None
    runner.join(120)
    events = _drain(settings, settings.events_topic, 1)
    assert len(letters) == 10_000
    by_key = {}
    for raw in letters:
        letter = DeadLetter.model_validate_json(raw)
        by_key[letter.key_b64] = letter
        assert letter.topic == topic and letter.stage == "parse" and letter.detail
    reasons = {}
    for i, kind in sent.items():
        letter = by_key[DeadLetter.encode(str(i).encode())]
        assert letter.original() == malformed(kind, i, settings.max_line_bytes)   # bytes kept exactly
        reasons[kind] = letter.reason
    assert reasons == {k: k for k in MALFORMED_KINDS}
    parsed = ParsedEvent.model_validate_json(events[0])
    assert parsed.key == "blk_42" and parsed.template_id == "E5"


def _drain(settings, topic, expected: int, timeout: float = 90) -> list[bytes]:
    return [m.value() for m in consume(settings, topic, expected, timeout=timeout)]


def test_host_topic_created_after_parse_started_and_restarted_is_picked_up(kafka_settings, datasets, tmp_path):
    settings = stream_settings(kafka_settings, datasets, tmp_path, instance_id="later")
    env = settings_env(settings)
    log = tmp_path / "parse.log"
    lines = (datasets / "hdfs" / "HDFS_20000.log").read_text().splitlines(keepends=True)
    early, late = tmp_path / "early.log", tmp_path / "late.log"
    early.write_text("".join(lines[:50]))
    late.write_text("".join(lines[50:80]))
    events = _counter(settings, settings.events_topic)
    assert replay_hosts(settings, {settings.host("early"): early}, log=log)[0].wait(60) == 0
    parse = logwarden("run", "parse", env=env, log=log)
    try:
        wait_until(lambda: events() >= 50, 60, what="the early host's lines")
        # A host starts shipping, and the group's only member dies while it reacts to the new
        # topic (the rebalance it started is in flight); its replacement must still pick it up.
        assert replay_hosts(settings, {settings.host("late"): late}, log=log)[0].wait(60) == 0
        time.sleep(1.5)
        parse.send_signal(signal.SIGKILL)
        parse.wait()
        parse = logwarden("run", "parse", env=env, log=log)
        wait_until(lambda: events() >= 80, 60, what="the late host's lines")
    finally:
        parse.terminate()
        parse.wait(30)
    hosts = {ParsedEvent.model_validate_json(m.value()).source.host
             for m in consume(settings, settings.events_topic, 80, timeout=30)}
    assert hosts == {settings.host("early"), settings.host("late")}
