"""Stage adapters without Kafka: the Filebeat decode fast path agrees with the pydantic model."""
import json

import pytest

from services.records import FilebeatEvent
from services.shell import BadRecord
from services.stages import decode_filebeat, looks_binary

GOOD = {"@timestamp": "2008-11-09T20:35:18.123Z", "message": "081109 203518 143 INFO dfs.DataNode: x",
        "host": {"name": "dn1"}, "log": {"file": {"path": "/var/log/a.log"}, "offset": 42},
        "input": {"type": "filestream"}, "agent": {"type": "filebeat"}, "ecs": {"version": "8.0.0"},
        "@metadata": {"beat": "filebeat", "type": "_doc", "version": "8.19.0"}}


def variants():
    yield "good", json.dumps(GOOD).encode()
    for path, value in [(("message",), 5), (("host", "name"), None), (("log", "offset"), -1),
                        (("log", "offset"), "12"), (("log", "offset"), 1.5), (("@timestamp",), "yesterday"),
                        (("@timestamp",), 1226262918)]:
        doc = json.loads(json.dumps(GOOD))
        node = doc
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        yield f"{'.'.join(path)}={value!r}", json.dumps(doc).encode()
    for field in ("message", "host", "log", "@timestamp"):
        doc = dict(GOOD)
        del doc[field]
        yield f"no {field}", json.dumps(doc).encode()
    yield "array", b"[1, 2]"
    yield "not json", b"{nope"
    yield "latin-1", json.dumps(GOOD).encode().replace(b"dn1", b"dn\xe9")


@pytest.mark.parametrize("name,value", list(variants()))
def test_fast_decode_accepts_exactly_what_the_model_accepts(name, value):
    try:
        model = FilebeatEvent.model_validate_json(value)
    except Exception:
        model = None
    try:
        fast = decode_filebeat(value)
    except BadRecord as bad:
        assert model is None, f"{name}: fast path rejected a valid record ({bad})"
        assert bad.reason and bad.detail
        return
    assert model is not None, f"{name}: fast path accepted an invalid record"
    assert fast == (model.message, model.host.name, model.log.file.path, model.log.offset,
                    model.timestamp.timestamp())


def test_rejections_name_their_reason():
    reasons = {}
    for name, value in variants():
        try:
            decode_filebeat(value)
        except BadRecord as bad:
            reasons[name] = bad.reason
    assert reasons["not json"] == "not_json"
    assert reasons["latin-1"] == "not_utf8"
    assert reasons["no message"] == "missing_message"
    assert reasons["array"] == "not_json_object"
    assert reasons["log.offset=-1"] == "bad_envelope"


def test_binary_lines_but_not_stack_traces():
    assert looks_binary("\x00\x01abc")
    assert looks_binary("\x01\x02\x03\x04\x05 short")
    assert not looks_binary("2015-10-18 ERROR x: java.io.IOException: boom\n\tat a.b(C.java:1)\r\n\tat d(E.java:2)")
    assert not looks_binary("one \x1b escape in a long enough ordinary line of text")


def test_dead_letter_series_exist_at_zero_before_the_first_bad_record(tmp_path):
    # rate() ignores a series' first sample: a series born at its first dead letter would hide
    # a burst of bad records from the dead-letter alert.
    from prometheus_client import REGISTRY

    from services.settings import load_settings
    from services.shell import StageRunner
    from services.stages import ParseStage

    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path, group_prefix="zero-test")
    stage = ParseStage(settings)
    StageRunner(settings, stage.spec())          # no broker needed until it runs
    for reason in (*ParseStage.dead_letter_reasons, "stage_error"):
        assert REGISTRY.get_sample_value("logwarden_deadletter_total", {"stage": "parse", "reason": reason}) is not None


def test_parse_state_is_saved_at_most_every_few_seconds_but_always_when_final(tmp_path, monkeypatch):
    # The parser's state (drain's tree, dedup marks) is not tied to offsets: saving it at every
    # commit cost the stage time for nothing; at shutdown and on revoke it must be saved.
    from services import stages
    from services.checkpoint import load
    from services.settings import load_settings
    from services.shell import Record
    from services.stages import ParseStage

    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path, group_prefix="ckpt-test")
    stage = ParseStage(settings)
    line = "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_1 src: /10.0.0.1:1 dest: /10.0.0.2:2"
    doc = json.dumps({"@timestamp": "2008-11-09T20:35:18.000Z", "message": line, "host": {"name": "dn1"},
                      "log": {"offset": 0, "file": {"path": "/var/log/hdfs.log"}}}).encode()
    assert stage.handle(Record("logs.dn1", 0, 0, None, doc, 1)), "the line was parsed"
    stage.checkpoint({("logs.dn1", 0): 1})                   # within PARSE_CHECKPOINT_S of start
    assert load(stage.state_path) is None
    stage.checkpoint({("logs.dn1", 0): 1}, final=True)
    restored = ParseStage(settings)                          # a restart: the line is a repeat now
    assert load(stage.state_path) is not None
    assert restored.handle(Record("logs.dn1", 0, 0, None, doc, 1)) == []
    monkeypatch.setattr(stages, "PARSE_CHECKPOINT_S", 0.0)   # once the interval has passed
    stage.state_path.unlink()
    stage.checkpoint({("logs.dn1", 0): 1})
    assert load(stage.state_path) is not None
