"""Stage adapters without Kafka: the Filebeat envelope checks, the parse stage on a batch, its
watermark records, and its dedup marks (services.cores.dedup) as partition state."""
import json
import time

import pytest

from services.cores.dedup import FileMarks
from services.records import WATERMARK_KEY, DeadLetter, Watermark, decode
from services.shell import Out, Record, Reject
from services.stages import ParseStage, classify_envelope, looks_binary

GOOD = {"@timestamp": "2008-11-09T20:35:18.123Z", "message": "081109 203518 143 INFO dfs.DataNode: x",
        "host": {"name": "dn1"}, "log": {"file": {"path": "/var/log/a.log"}, "offset": 42},
        "input": {"type": "filestream"}, "agent": {"type": "filebeat"}, "ecs": {"version": "8.0.0"},
        "@metadata": {"beat": "filebeat", "type": "_doc", "version": "8.19.0"}}


def changed(path, value) -> bytes:
    doc = json.loads(json.dumps(GOOD))
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return json.dumps(doc).encode()


def without(field) -> bytes:
    doc = dict(GOOD)
    del doc[field]
    return json.dumps(doc).encode()


@pytest.mark.parametrize("value,reason", [
    (b"{nope", "not_json"),
    (json.dumps(GOOD).encode()[:40], "truncated_json"),
    (json.dumps(GOOD).encode().replace(b"dn1", b"dn\xe9"), "not_utf8"),
    (b"[1, 2]", "not_json_object"),
    (b"null", "not_json_object"),
    (b'"a string"', "not_json_object"),
    (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "too_deep"),
    (without("message"), "missing_message"),
    (changed(("message",), 5), "bad_message"),
    (without("host"), "bad_host"),
    (changed(("host", "name"), None), "bad_host"),
    (changed(("log", "offset"), -1), "bad_offset"),
    (changed(("log", "offset"), "12"), "bad_offset"),
    (changed(("log", "offset"), 1.5), "bad_offset"),
    (changed(("log", "offset"), 2 ** 63), "bad_offset"),
    (changed(("@timestamp",), "yesterday"), "bad_timestamp"),
    (changed(("@timestamp",), 1226262918), "bad_timestamp"),
    (without("@timestamp"), "bad_envelope"),
    (without("log"), "bad_envelope"),
    # found by tests/test_fuzz.py: a mistyped field is not a mistyped document, a record that
    # is no JSON stays "not JSON" though msgspec meets a field error first, no host is no host,
    # and a time without a zone would be read in the stage machine's zone
    (changed(("host",), "dn1"), "bad_host"),
    (changed(("host",), None), "bad_host"),
    (changed(("log",), []), "bad_envelope"),
    (b"{}}", "not_json"),
    (b'{"message": 5}}', "not_json"),
    (changed(("host", "name"), ""), "bad_host"),
    (changed(("@timestamp",), "2008-11-09T20:35:18.123"), "bad_timestamp"),
    (changed(("@timestamp",), "2008-11-09 20:35:18"), "bad_timestamp"),
])
def test_envelope_rejections_name_their_reason(value, reason):
    got = classify_envelope(value)
    assert isinstance(got, tuple), "accepted a bad record"
    assert got[0] == reason, got
    assert got[1]


def test_a_good_record_decodes_with_its_fields():
    doc = classify_envelope(json.dumps(GOOD).encode())
    assert (doc.message, doc.host.name, doc.log.file.path, doc.log.offset) == (GOOD["message"], "dn1", "/var/log/a.log", 42)
    assert doc.timestamp.timestamp() == pytest.approx(1226262918.123)


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
    from services.shell import StageRunner, StageSpec

    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path, group_prefix="zero-test")
    stage = ParseStage(settings)
    spec = stage.spec()
    StageRunner(settings, StageSpec(spec.name, spec.topics, stage))    # stateless: no broker needed to build it
    for reason in (*ParseStage.dead_letter_reasons, "stage_error", "output_too_large", "output_rejected"):
        assert REGISTRY.get_sample_value("logwarden_deadletter_total", {"stage": "parse", "reason": reason}) is not None


LINE = "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_1 src: /10.0.0.1:1 dest: /10.0.0.2:2"


def filebeat(offset: int, message: str = LINE, host: str = "dn1", path: str = "/var/log/hdfs.log", **file) -> bytes:
    return json.dumps({"@timestamp": "2008-11-09T20:35:18.000Z", "message": message, "host": {"name": host},
                       "log": {"offset": offset, "file": {"path": path, **file}}}).encode()


def test_parse_stage_turns_a_batch_into_events_and_rejects(tmp_path):
    from services.settings import load_settings

    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path, max_line_bytes=200, max_line_tokens=20)
    stage = ParseStage(settings)
    batch = [Record("logs.dn1", 0, 0, None, filebeat(0), 1000),
             Record("logs.dn1", 0, 1, None, b"", 1000),
             Record("logs.dn1", 0, 2, None, filebeat(200, "x" * 300), 1000),
             Record("logs.dn1", 0, 3, None, filebeat(600, "081109 203518 143 INFO a: " + "t " * 30), 1000),
             Record("logs.dn1", 0, 4, None, filebeat(900, "\x00\x01binary"), 1000),
             Record("logs.dn1", 0, 5, None, filebeat(1000, "no header here"), 1000),
             Record("logs.dn1", 0, 6, None, filebeat(0), 1000)]                 # Filebeat's re-send
    stage.output_partitions({settings.events_topic: 4})
    out = stage.process(batch)
    events = [o for o in out if isinstance(o, Out) and o.key != WATERMARK_KEY]
    rejects = [(r.record.offset, r.reason) for r in out if isinstance(r, Reject)]
    assert rejects == [(1, "empty"), (2, "line_too_long"), (3, "too_many_tokens"), (4, "binary"), (5, "bad_header")]
    assert len(events) == 1 and events[0].key == "blk_1" and events[0].source.offset == 0
    assert b'"log.offset":0' in events[0].value
    # after the events: how far the source has got, to every events partition
    marks = [o for o in out if isinstance(o, Out) and o.key == WATERMARK_KEY]
    assert [o.partition for o in marks] == [0, 1, 2, 3] and out.index(marks[0]) > out.index(events[0])
    assert [decode(o.value, Watermark) for o in marks] == [Watermark(source="logs.dn1:0", ts=1226262918.0)] * 4


def test_parse_announces_a_source_when_assigned_and_reports_it_idle(tmp_path, monkeypatch):
    from services.settings import load_settings

    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path, source_idle_s=0.5)
    stage = ParseStage(settings)
    stage.output_partitions({settings.events_topic: 2})
    stage.assign(("logs.dn9", 3), {}, None)
    marks = [decode(o.value, Watermark) for o in stage.tick(0.0)]
    assert marks == [Watermark(source="logs.dn9:3", ts=None)] * 2         # holds the watermark
    assert stage.tick(0.0) == []
    time.sleep(0.6)
    assert stage.tick(0.0) == []                 # silent, but not known to be caught up
    stage.at_end(("logs.dn9", 3))
    marks = [decode(o.value, Watermark) for o in stage.tick(0.0)]
    assert marks == [Watermark(source="logs.dn9:3", ts=None, idle=True)] * 2
    assert stage.tick(0.0) == []


def test_an_empty_partition_beside_a_shipping_one_stops_holding_the_watermark_soon(tmp_path, monkeypatch):
    """Filebeat keys a host's records by file, so most partitions of its topic stay empty: they
    must not hold the watermark back for source_idle_s (a shipper's backoff), while a topic with
    no line at all still does (its host may be starting)."""
    from services.settings import load_settings

    monkeypatch.setattr(ParseStage, "EMPTY_SIBLING_IDLE_S", 0.3)
    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path, source_idle_s=30.0)
    stage = ParseStage(settings)
    stage.output_partitions({settings.events_topic: 1})
    for tp in (("logs.dn1", 0), ("logs.dn1", 1), ("logs.dn2", 0)):
        stage.assign(tp, {}, None)
        stage.at_end(tp)
    stage.process([Record("logs.dn1", 0, 0, None, filebeat(0), 1000)])
    stage.at_end(("logs.dn1", 0))
    stage.tick(0.0)
    time.sleep(0.4)
    idle = [decode(o.value, Watermark).source for o in stage.tick(0.0) if decode(o.value, Watermark).idle]
    assert idle == ["logs.dn1:1"]       # dn1:0 has lines (30 s), dn2 has none anywhere (30 s)


def test_parse_calls_no_source_idle_while_the_broker_is_away_and_just_after(tmp_path):
    """A broker outage is not silence: every shipper reconnects with backoff, and a host called
    idle before its shipper is back would have its backlog late for every session it touches."""
    from services.settings import load_settings

    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path, source_idle_s=0.2,
                             outage_grace_s=0.6)
    stage = ParseStage(settings)
    stage.output_partitions({settings.events_topic: 1})
    stage.assign(("logs.dn9", 0), {}, None)
    stage.tick(0.0)
    stage.at_end(("logs.dn9", 0))
    stage.hold_idle(0.0)                          # the shell: no input, no broker
    time.sleep(0.3)
    assert stage.tick(0.0) == []                  # past source_idle_s, but within the grace
    time.sleep(0.4)
    assert [decode(o.value, Watermark).idle for o in stage.tick(0.0)] == [True]


def test_dedup_marks_follow_the_partition_to_another_replica(tmp_path):
    from services.settings import load_settings

    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path)
    one, two = ParseStage(settings), ParseStage(settings.model_copy(update={"state_dir": tmp_path / "other"}))
    tp = ("logs.dn1", 0)

    def events(out):
        return [o for o in out if o.key != WATERMARK_KEY]

    one.assign(tp, {}, None)
    assert len(events(one.process([Record(*tp, 0, None, filebeat(0), 1)]))) == 1
    state = one.changes()[tp]
    two.assign(tp, {k: v for k, v in state.items() if v is not None}, 1)        # the new owner
    assert events(two.process([Record(*tp, 1, None, filebeat(0), 1)])) == []    # a re-send: dropped
    assert len(events(two.process([Record(*tp, 2, None, filebeat(len(LINE) + 1), 1)]))) == 1


@pytest.mark.parametrize("native", [False, True])
def test_a_line_the_parse_stage_fails_on_costs_only_itself(tmp_path, native):
    # A bug on one line: that line is dead-lettered and every other line of the batch comes out
    # once. (Raising out of the batch instead would make the shell retry record by record, and the
    # dedup marks would take the lines before it for re-sends.)
    from services.settings import load_settings

    settings = load_settings(kafka_bootstrap="127.0.0.1:9", state_dir=tmp_path, native_parse=native)
    stage = ParseStage(settings)
    poison = LINE.replace("blk_1", "blk_666")

    def failing_on_poison(fn):
        def wrapped(message, *args):
            if message == poison:
                raise RuntimeError("bug")
            return fn(message, *args)
        return wrapped

    if stage._hot is not None:
        stage._hot = failing_on_poison(stage._hot)
    stage.core.parse = failing_on_poison(stage.core.parse)
    texts = [LINE.replace("blk_1", f"blk_{n}") for n in (1, 2)] + [poison] + [LINE.replace("blk_1", f"blk_{n}") for n in (3, 4)]
    offsets = [sum(len(t) + 1 for t in texts[:i]) for i in range(len(texts))]
    batch = [Record("logs.dn1", 0, i, None, filebeat(o, t), 1000) for i, (o, t) in enumerate(zip(offsets, texts))]
    for _ in range(2):                        # the hot path has learnt the shape the second time
        out = stage.process(batch)
        stage.marks = {}
        keys = [o.key for o in out if isinstance(o, Out) and o.key != WATERMARK_KEY]
        assert keys == ["blk_1", "blk_2", "blk_3", "blk_4"]
        assert [(r.record.offset, r.reason) for r in out if isinstance(r, Reject)] == [(2, "stage_error")]


def test_file_marks_are_ranges_and_know_a_rotated_file():
    marks = FileMarks()
    key = FileMarks.file_key("dn1", "/var/log/a.log", None)
    lines = [f"line number {i}" for i in range(100)]
    offsets, at = [], 0
    for text in lines:
        offsets.append(at)
        at += len(text) + 1
    assert not any(marks.seen(key, o, t) for o, t in zip(offsets, lines))
    assert all(marks.seen(key, o, t) for o, t in zip(offsets, lines))          # every re-send dropped
    assert marks.duplicates == 100
    (record,) = marks.changes().values()
    assert len(record) < 40                                                   # one range for 100 lines
    # out of order: a gap stays open until its line comes
    other = FileMarks.file_key("dn1", "/var/log/b.log", None)
    assert not marks.seen(other, 0, "first") and not marks.seen(other, 20, "third")
    assert not marks.seen(other, 6, "second line") and marks.seen(other, 6, "second line")
    # the same path starting again with another first line is another file
    assert not marks.seen(key, 0, "a new file after rotation")
    assert not marks.seen(key, len("a new file after rotation") + 1, "its second line")
    # a file identity (fingerprint) tells files apart without looking at lines
    assert not marks.seen(FileMarks.file_key("dn1", "/var/log/a.log", "fp2"), offsets[5], lines[5])


def test_file_marks_in_order_shortcut_decides_as_the_general_rule():
    import random

    rng = random.Random(7)
    fast, general = FileMarks(), FileMarks()
    general.in_order_shortcut = False
    files = [FileMarks.file_key("dn1", f"/var/log/{n}.log", None) for n in range(3)]
    at = dict.fromkeys(files, 0)
    for _ in range(5000):
        key = rng.choice(files)
        text = rng.choice(["a line", "another line", "x", "é accent", ""])
        move = rng.random()
        if move < 0.6:                      # the next line
            offset = at[key]
        elif move < 0.7:                    # the next line after a CRLF
            offset = at[key] + 1
        elif move < 0.85:                   # a re-send of something recent
            offset = max(0, at[key] - rng.randint(1, 60))
        else:                               # a gap: lines still to come
            offset = at[key] + rng.randint(3, 40)
        at[key] = max(at[key], offset + len(text.encode()) + 1)
        assert fast.seen(key, offset, text) == general.seen(key, offset, text)
    assert fast.duplicates == general.duplicates > 0
    assert fast.entries() == general.entries()


def test_a_dead_letter_keeps_the_head_size_and_hash_and_always_fits():
    big = b"x" * 3_000_000
    letter = DeadLetter.of(stage="parse", reason="record_too_large", detail="d" * 2000, topic="logs.dn1",
                           partition=0, offset=7, value=big, key=b"k" * 5000, time=1.0)
    assert letter.size == 3_000_000 and letter.truncated and len(letter.head()) == 16 * 1024
    assert letter.sha256 == __import__("hashlib").sha256(big).hexdigest()
    from services.records import encode

    assert len(encode(letter)) < 40_000 and len(letter.detail) == 500
    assert decode(encode(letter), DeadLetter) == letter
