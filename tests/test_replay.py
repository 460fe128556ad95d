"""Replay: log files -> logs.<host> records shaped like Filebeat 8.x's Kafka output."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest

from services.records import FilebeatDoc
from tests.kafkautil import consume, consume_json
from toolkit import replay

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def expected_lines(path: Path) -> list[tuple[int, str]]:
    """(byte offset, text) of every non-empty line, read independently of toolkit.replay."""
    data = path.read_bytes()
    out, offset = [], 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        end = len(data) if end < 0 else end
        text = data[offset:end]
        if text.endswith(b"\r"):
            text = text[:-1]
        if text:
            out.append((offset, text.decode("utf-8")))
        offset = end + 1
    return out


def assert_filebeat_document(doc: dict, host: str, path: Path, since: datetime) -> None:
    """Every field Filebeat 8.x (filestream, codec.json, fingerprint identity) writes, with the
    value it writes."""
    assert set(doc) == {"@timestamp", "@metadata", "log", "message", "input", "ecs", "host", "agent"}
    assert TIMESTAMP.match(doc["@timestamp"]), doc["@timestamp"]
    stamp = datetime.fromisoformat(doc["@timestamp"].replace("Z", "+00:00"))
    assert since - timedelta(seconds=1) <= stamp <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert doc["@metadata"] == {"beat": "filebeat", "type": "_doc", "version": replay.FILEBEAT_VERSION}
    stat = path.stat()
    with open(path, "rb") as fh:
        head = fh.read(1024)
    assert doc["log"]["file"] == {"path": os.path.abspath(path), "device_id": str(stat.st_dev),
                                  "inode": str(stat.st_ino),
                                  "fingerprint": hashlib.sha256(head).hexdigest()}
    assert doc["input"] == {"type": "filestream"}
    assert doc["ecs"] == {"version": "8.0.0"}
    assert doc["host"] == {"name": host}
    agent = doc["agent"]
    assert set(agent) == {"ephemeral_id", "id", "name", "type", "version"}
    assert agent["type"] == "filebeat" and agent["name"] == host
    assert agent["version"] == replay.FILEBEAT_VERSION
    uuid.UUID(agent["id"]), uuid.UUID(agent["ephemeral_id"])
    msgspec.convert(doc, FilebeatDoc)


# --------------------------------------------------------------------------------------------
# The pure part: lines, offsets, JSON
def test_lines_lose_lf_and_crlf_keep_byte_offsets_and_empty_lines_are_not_sent():
    chunk = "a\r\n\nbé\n\r\nc\rd\ntail".encode()
    lines, consumed = replay.split_lines(chunk, 100)
    assert lines == [(100, "a"), (104, "bé"), (110, "c\rd")]
    assert consumed == len(chunk) - len(b"tail")        # the unterminated rest waits


def test_invalid_utf8_becomes_the_replacement_character_like_go():
    lines, _ = replay.split_lines(b"ok \xff\xfe end\n", 0)
    assert lines == [(0, "ok \ufffd\ufffd end")]


def test_json_strings_are_written_byte_for_byte_as_beats_encoder_does():
    # codec.json's escape_html is false in 8.x: <, > and & stay as they are.
    assert replay.json_string('<a href="x">&amp;</a>') == r'"<a href=\"x\">&amp;</a>"'
    # UTF-8 unescaped; JavaScript line separators and \b \f as \u escapes, like go-structform.
    assert replay.json_string("é\u2028\t\b\f\x01") == r'"é\u2028\t\u0008\u000c\u0001"'
    for text in ("quote\" back\\slash \x01 ctrl <tag>", "sep\u2029 \\b \b", "plain"):
        assert json.loads(replay.json_string(text)) == text


def test_timestamp_is_utc_with_milliseconds():
    assert replay.filebeat_timestamp(1_700_000_000.1239) == "2023-11-14T22:13:20.123Z"


def test_encoded_line_is_a_complete_filebeat_document(tmp_path):
    path = tmp_path / "hdfs.log"
    path.write_bytes(b"x" * 2000 + b"\n")
    with open(path, "rb") as fh:
        encoder = replay.open_encoder(fh, replay.Agent("dn7"), Path(os.path.abspath(path)))
    since = datetime.now(timezone.utc)
    doc = json.loads(encoder.encode(42, "081109 203518 143 INFO <b> & é"))
    assert_filebeat_document(doc, "dn7", path, since)
    assert doc["log"]["offset"] == 42 and doc["message"] == "081109 203518 143 INFO <b> & é"


def test_agent_id_is_stable_per_host_and_ephemeral_id_per_run():
    assert replay.Agent("dn1").id == replay.Agent("dn1").id != replay.Agent("dn2").id
    assert replay.Agent("dn1").ephemeral_id != replay.Agent("dn1").ephemeral_id


# --------------------------------------------------------------------------------------------
# Through the broker
def logwarden_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGWARDEN_")}
    return env | {"LOGWARDEN_KAFKA_BOOTSTRAP": settings.bootstrap()}


@pytest.mark.slow
def test_two_hosts_round_trip_every_line_once_intact_in_file_order(kafka_settings, datasets):
    """HDFS_5k.log (CRLF) and HDFS_20000.log replayed as two hosts at once with the CLI."""
    files = {kafka_settings.host("nn"): datasets / "hdfs" / "HDFS_5k.log",
             kafka_settings.host("dn"): datasets / "hdfs" / "HDFS_20000.log"}
    assert b"\r\n" in files[kafka_settings.host("nn")].read_bytes()[:1000]
    exe = Path(sys.executable).with_name("logwarden")
    since = datetime.now(timezone.utc)
    runs = [subprocess.run([str(exe), "replay", str(path), "--host", host, "--no-progress"],
                           env=logwarden_env(kafka_settings), capture_output=True, text=True, timeout=300)
            for host, path in files.items()]
    for run in runs:
        assert run.returncode == 0, run.stderr
    for host, path in files.items():
        expected = expected_lines(path)
        messages = consume(kafka_settings, replay.logs_topic(host), len(expected), timeout=60, settle=1.0)
        assert len(messages) == len(expected), f"{host}: {len(messages)} records for {len(expected)} lines"
        # Keyed by file path: one partition, so consumption order is file order.
        assert {m.partition() for m in messages} == {messages[0].partition()}
        assert {m.key() for m in messages} == {os.path.abspath(path).encode()}
        docs = [json.loads(m.value()) for m in messages]
        assert [(d["log"]["offset"], d["message"]) for d in docs] == expected
        offsets = [d["log"]["offset"] for d in docs]
        assert all(a < b for a, b in zip(offsets, offsets[1:]))
        assert not any("\r" in d["message"] for d in docs)
        for doc in docs[:50] + docs[-50:]:
            assert_filebeat_document(doc, host, path, since)
        assert len({d["agent"]["ephemeral_id"] for d in docs}) == 1


def test_follow_sends_appended_lines_waits_for_newlines_and_restarts_truncated_files(kafka_settings, tmp_path):
    host = kafka_settings.host("follow")
    topic = replay.logs_topic(host)
    path = tmp_path / "app.log"
    path.write_bytes(b"first\nsecond\r\n")
    stop = threading.Event()
    result = {}
    worker = threading.Thread(target=lambda: result.update(count=replay.replay_file(
        kafka_settings, path, host, follow=True, stop=stop)))
    worker.start()
    try:
        assert [d["message"] for d in consume_json(kafka_settings, topic, 2, timeout=30)] == ["first", "second"]
        with open(path, "ab") as fh:
            fh.write(b"third\nfou")
        time.sleep(4 * replay.FOLLOW_POLL_S)            # "fou" has no newline yet: not sent
        with open(path, "ab") as fh:
            fh.write(b"rth\n")
        docs = consume_json(kafka_settings, topic, 4, timeout=30, settle=1.0)
        assert [(d["log"]["offset"], d["message"]) for d in docs] == [
            (0, "first"), (6, "second"), (14, "third"), (20, "fourth")]
        path.write_bytes(b"new\n")                     # truncated: read again from 0
        docs = consume_json(kafka_settings, topic, 5, timeout=30)
        assert (docs[-1]["log"]["offset"], docs[-1]["message"]) == (0, "new")
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive() and result["count"] == 5


def test_rate_limits_lines_per_second(kafka_settings, tmp_path):
    host = kafka_settings.host("slow")
    path = tmp_path / "rate.log"
    path.write_text("".join(f"line {i}\n" for i in range(600)))
    started = time.monotonic()
    assert replay.replay_file(kafka_settings, path, host, rate=1500) == 600
    elapsed = time.monotonic() - started
    assert elapsed >= 0.35, f"600 lines at 1500/s took {elapsed:.2f} s"
    docs = consume_json(kafka_settings, replay.logs_topic(host), 600, timeout=30)
    assert [d["message"] for d in docs] == [f"line {i}" for i in range(600)]


def test_last_line_without_newline_is_sent_at_the_end_of_a_replay(kafka_settings, tmp_path):
    host = kafka_settings.host("tail")
    path = tmp_path / "tail.log"
    path.write_bytes("one\r\nform\x0cfeed \u2028 <&>\r\ntwo".encode())
    assert replay.replay_file(kafka_settings, path, host) == 3
    records = consume(kafka_settings, replay.logs_topic(host), 3, timeout=30)
    docs = [json.loads(r.value()) for r in records]
    assert [(d["log"]["offset"], d["message"]) for d in docs] == [
        (0, "one"), (5, "form\x0cfeed \u2028 <&>"), (24, "two")]
    assert b'"message":"form\\u000cfeed \\u2028 <&>"' in records[1].value()   # as Beats writes it
    assert "fingerprint" not in docs[0]["log"]["file"]   # under 1024 bytes: no fingerprint


def test_follow_finishes_a_rotated_file_before_reading_its_successor(kafka_settings, tmp_path):
    host = kafka_settings.host("rotate")
    path = tmp_path / "app.log"
    path.write_bytes(b"old 1\n")
    stop = threading.Event()
    worker = threading.Thread(target=replay.replay_file, args=(kafka_settings, path, host),
                              kwargs={"follow": True, "stop": stop})
    worker.start()
    try:
        consume_json(kafka_settings, replay.logs_topic(host), 1, timeout=30)
        rotated = path.rename(tmp_path / "app.log.1")
        with open(rotated, "ab") as fh:                # the writer had not let go yet
            fh.write(b"old 2\n")
        path.write_bytes(b"new 1\n")
        docs = consume_json(kafka_settings, replay.logs_topic(host), 3, timeout=30, settle=1.0)
    finally:
        stop.set()
        worker.join(30)
    assert [(d["log"]["offset"], d["message"]) for d in docs] == [(0, "old 1"), (6, "old 2"), (0, "new 1")]
    assert docs[0]["log"]["file"]["inode"] == docs[1]["log"]["file"]["inode"] != docs[2]["log"]["file"]["inode"]
