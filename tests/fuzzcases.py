"""Seeded generators of malformed records for the fuzz suite (tests/test_fuzz.py), each with the
dead-letter reason the stage that reads it must give.

    parse_cases(rng, n, host, path)    Filebeat records for a logs.<host> topic, of PARSE_KINDS
    event_cases(rng, n, good_events)   records for the events topic (events and watermarks), of
                                       EVENT_KINDS, built from real events so they differ from a
                                       good one in the one way a kind names

Kinds are drawn with weights: the large ones (over-limit lines, > 1 MB records, deep nesting)
are rare so the suite stays fast, but every kind appears at least ``min_each`` times. A kind is
a name, a builder and the reason; the builder gets the random generator and returns the value
(None: a Kafka record without a value, a tombstone).

Bad records that pass the envelope checks (unknown header, binary or over-long lines) name a
file of their own (``path``) with offsets that follow each other as a real file's would: the
parse stage's dedup marks (services.cores.dedup) see them before the header is checked, and a
record that reused a good line's file and offset would be dropped as its re-send instead.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

from services.records import WATERMARK_KEY

INT64_MAX = 2 ** 63 - 1
HDFS_HEADER = "081109 203518 143 INFO dfs.DataNode$DataXceiver: "


@dataclass(frozen=True)
class Case:
    kind: str
    value: bytes | None
    reason: str
    key: bytes | None = None


@dataclass(frozen=True)
class Kind:
    name: str
    reason: str
    weight: float
    build: Callable


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(("block", "blk_1", "src:", "/10.0.0.1:50010", "size", "67108864", "ok"))
                    for _ in range(n))


class _FilebeatFile:
    """Filebeat documents of one fuzz file: offsets advance by each line's bytes + newline."""

    def __init__(self, host: str, path: str):
        self.host, self.path, self.offset = host, path, 0

    def doc(self, text, /, **changes) -> dict:
        """A document of line ``text`` with ``changes`` (dotted field -> value; _DELETE removes
        the field, ``message=`` replaces the line) applied; the next one starts after it."""
        doc = {"@timestamp": "2008-11-09T20:35:18.123Z", "@metadata": {"beat": "filebeat", "type": "_doc"},
               "log": {"offset": self.offset, "file": {"path": self.path}}, "message": text,
               "input": {"type": "filestream"}, "host": {"name": self.host}}
        for dotted, value in changes.items():
            node, parts = doc, dotted.split(".")
            for part in parts[:-1]:
                node = node[part]
            if value is _DELETE:
                del node[parts[-1]]
            else:
                node[parts[-1]] = value
        message = doc.get("message")
        self.offset += (len(message.encode("utf-8", "surrogatepass")) if isinstance(message, str) else 8) + 1
        return doc

    def good_line(self, rng: random.Random) -> str:
        return HDFS_HEADER + _words(rng, rng.randint(3, 12))

    def encoded(self, rng: random.Random, /, **changes) -> bytes:
        """A document of a good line with ``changes`` applied (see doc), as UTF-8 JSON."""
        return json.dumps(self.doc(self.good_line(rng), **changes),
                          ensure_ascii=False).encode("utf-8", "surrogatepass")


_DELETE = object()


def _raw(value: bytes) -> Callable:
    return lambda rng, f: value


def parse_kinds(max_line_bytes: int, max_line_tokens: int) -> list[Kind]:
    """Every malformed Filebeat record the parse stage must dead-letter, with its reason."""
    max_record = max_line_bytes + 16384        # ParseStage: the envelope around the line

    def enc(**changes):
        return lambda rng, f: f.encoded(rng, **changes)

    def truncated(rng, f):
        whole = f.encoded(rng)
        return whole[:rng.randint(1, len(whole) - 1)]

    def invalid_json(rng, f):
        whole = f.encoded(rng).decode()
        return rng.choice([
            "{nope", "{'message': 'single quotes'}", '{"message": "x",}', '{"message" "x"}',
            whole.replace('":', '"=', 1), "<xml>not json</xml>", "message=hello host=dn1",
            whole.replace("{", "(", 1), "{" + "}" * rng.randint(2, 3)]).encode()

    def trailing(rng, f):
        return f.encoded(rng) + rng.choice([b"x", b"}", b",{}", b" garbage", b"\x00"])

    def invalid_utf8(rng, f):
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        return f.encoded(rng, message=HDFS_HEADER + "MARK" + _words(rng, 3)).replace(b"MARK", bad)

    def invalid_utf8_host(rng, f):
        return f.encoded(rng, **{"host.name": "MARK"}).replace(b'"MARK"', b'"dn\xe9"')

    def random_binary(rng, f):
        first = bytes([rng.choice(list(range(0, 9)) + list(range(0x80, 0x100)))])
        return first + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))

    def utf16(rng, f):
        return f.encoded(rng).decode("utf-8").encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))

    def lone_surrogate(rng, f):
        return f.encoded(rng, message=HDFS_HEADER + "MARK").replace(b"MARK", rng.choice([b"\\ud800", b"\\udfff x"]))

    def deep(rng, f):
        depth = rng.randint(3_000, min(30_000, (max_record - 1000) // 2))
        opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        if opener == b"[":
            nest = opener * depth + closer * depth
        else:
            depth = min(depth, (max_record - 1000) // 6)
            nest = opener * depth + b"1" + closer * depth
        return b'{"extra":' + nest + b"," + f.encoded(rng)[1:]

    def message_line(text_of: Callable) -> Callable:
        return lambda rng, f: f.encoded(rng, message=text_of(rng))

    def too_long(rng):
        # over max_line_bytes, but the record under the envelope limit: the line check names it
        return HDFS_HEADER + "x" * rng.randint(max_line_bytes + 1, max_record - 2000)

    def too_large(rng, f):
        return f.encoded(rng, message=HDFS_HEADER + "y" * rng.randint(max_record, max_record * 2))

    def over_1mb(rng, f):
        return f.encoded(rng, message=HDFS_HEADER + "z" * rng.randint(1_048_577, 1_300_000))

    def many_tokens(rng):
        n = rng.randint(max(max_line_tokens + 1, 10_000), min(30_000, max_line_bytes // 2 - 100))
        return HDFS_HEADER + " ".join("t" for _ in range(n))

    def binary_line(rng):
        return HDFS_HEADER + "a\x00b" + _words(rng, 2)

    def control_line(rng):
        return "".join(rng.choice("\x01\x02\x03\x04\x05\x06\x07\x0b\x0e\x1f") for _ in range(rng.randint(8, 40)))

    def no_header(rng):
        return rng.choice(["hello world", "", "   ", "\t", _words(rng, 5), "INFO something happened",
                           "2008/11/09 not quite a header", "### banner ###"])

    def bad_header_date(rng):
        return rng.choice(["081399 203518 143 INFO dfs.DataNode: x", "081109 256199 143 INFO dfs.DataNode: x",
                           "081132 203518 143 INFO dfs.DataNode: x"])

    K = Kind
    return [
        K("empty_value", "empty", 3, _raw(b"")),
        K("null_value", "empty", 3, lambda rng, f: None),
        K("json_null", "not_json_object", 2, _raw(b"null")),
        K("json_array", "not_json_object", 2, lambda rng, f: json.dumps([f.doc("x")]).encode()),
        K("json_scalar", "not_json_object", 2, lambda rng, f: rng.choice([b"42", b"-1.5e3", b'"a string"', b"true", b"false"])),
        K("truncated_json", "truncated_json", 6, truncated),
        K("invalid_json", "not_json", 5, invalid_json),
        K("trailing_garbage", "not_json", 3, trailing),
        K("nan_literal", "not_json", 1, lambda rng, f: f.encoded(rng, **{"log.offset": 7}).replace(b'"offset": 7', rng.choice([b'"offset": NaN', b'"offset": Infinity']))),
        K("byte_order_mark", "not_json", 1, lambda rng, f: b"\xef\xbb\xbf" + f.encoded(rng)),
        K("utf16_json", "not_json", 1, utf16),
        K("random_binary", "not_json", 4, random_binary),
        K("lone_surrogate", "not_json", 1, lone_surrogate),
        K("invalid_utf8_message", "not_utf8", 4, invalid_utf8),
        K("invalid_utf8_host", "not_utf8", 1, invalid_utf8_host),
        K("absurd_nesting", "too_deep", 0.4, deep),
        K("missing_message", "missing_message", 3, enc(message=_DELETE)),
        K("message_not_string", "bad_message", 3, lambda rng, f: f.encoded(rng, message=rng.choice([5, None, ["a"], {"a": 1}, True]))),
        K("missing_host", "bad_host", 2, enc(host=_DELETE)),
        K("host_not_object", "bad_host", 1, lambda rng, f: f.encoded(rng, host=rng.choice([None, "dn1", 3]))),
        K("host_name_missing", "bad_host", 1, enc(**{"host.name": _DELETE})),
        K("host_name_not_string", "bad_host", 1, lambda rng, f: f.encoded(rng, **{"host.name": rng.choice([None, 7, ["dn1"]])})),
        K("host_name_empty", "bad_host", 1, enc(**{"host.name": ""})),
        K("offset_string", "bad_offset", 2, lambda rng, f: f.encoded(rng, **{"log.offset": str(rng.randint(0, 10**6))})),
        K("offset_negative", "bad_offset", 2, lambda rng, f: f.encoded(rng, **{"log.offset": -rng.randint(1, 10**12)})),
        K("offset_beyond_int64", "bad_offset", 2, lambda rng, f: f.encoded(rng, **{"log.offset": INT64_MAX + rng.randint(1, 10**6)})),
        K("offset_float", "bad_offset", 1, lambda rng, f: f.encoded(rng, **{"log.offset": rng.choice([1.5, 1e3, -0.5])})),
        K("offset_null", "bad_offset", 1, enc(**{"log.offset": None})),
        K("timestamp_garbage", "bad_timestamp", 2, lambda rng, f: f.encoded(rng, **{"@timestamp": rng.choice(
            ["yesterday", "", "2008-13-45T25:61:00Z", "0000-01-01T00:00:00Z", "2008-11-09 20:35:18", "NaN"])})),
        K("timestamp_not_string", "bad_timestamp", 1, lambda rng, f: f.encoded(rng, **{"@timestamp": rng.choice([1226262918, None, [], 1.5])})),
        K("timestamp_without_zone", "bad_timestamp", 1, enc(**{"@timestamp": "2008-11-09T20:35:18.123"})),
        K("missing_timestamp", "bad_envelope", 1, enc(**{"@timestamp": _DELETE})),
        K("missing_log", "bad_envelope", 1, enc(log=_DELETE)),
        K("missing_log_file", "bad_envelope", 1, enc(**{"log.file": _DELETE})),
        K("path_not_string", "bad_envelope", 1, lambda rng, f: f.encoded(rng, **{"log.file.path": rng.choice([1, None, {}])})),
        K("binary_line", "binary", 3, message_line(binary_line)),
        K("control_bytes", "binary", 3, message_line(control_line)),
        K("line_over_limit", "line_too_long", 0.3, message_line(too_long)),
        K("record_over_limit", "record_too_large", 0.2, too_large),
        K("record_over_1mb", "record_too_large", 0.0, over_1mb),      # only the minimum: they are big
        K("tens_of_thousands_of_tokens", "too_many_tokens", 0.3, message_line(many_tokens)),
        K("no_known_header", "bad_header", 5, message_line(no_header)),
        K("header_bad_date", "bad_header", 2, message_line(bad_header_date)),
    ]


def _draw(rng: random.Random, kinds: list[Kind], n: int, min_each: int) -> list[Kind]:
    """n kinds: every kind min_each times, the rest by weight, shuffled (seeded)."""
    drawn = [k for k in kinds for _ in range(min_each)]
    weighted = [k for k in kinds if k.weight > 0]
    drawn += rng.choices(weighted, weights=[k.weight for k in weighted], k=max(0, n - len(drawn)))
    rng.shuffle(drawn)
    return drawn


def parse_cases(rng: random.Random, n: int, host: str, path: str, *, max_line_bytes: int,
                max_line_tokens: int, min_each: int = 3) -> list[Case]:
    """n malformed Filebeat records for host ``host`` (its bad lines in file ``path``)."""
    f = _FilebeatFile(host, path)
    return [Case(k.name, k.build(rng, f), k.reason, path.encode())
            for k in _draw(rng, parse_kinds(max_line_bytes, max_line_tokens), n, min_each)]


# ------------------------------------------------------------------------------------------
# the events topic (what the sessions stage reads)
def _mutated(event: dict, **changes) -> dict:
    """A copy of ``event`` with ``changes`` (field path with "/" -> value; _DELETE removes it:
    the wire names hold dots, "source/log.offset")."""
    doc = json.loads(json.dumps(event))
    for path, value in changes.items():
        node, parts = doc, path.split("/")
        for part in parts[:-1]:
            node = node[part]
        if value is _DELETE:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    return doc


def event_kinds() -> list[Kind]:
    """Every malformed events-topic record the sessions stage must dead-letter. Builders get
    (rng, a real event as a dict). An event that differs from a real one only in a field must
    not be taken for it: each carries an event id of its own."""

    def with_changes(pick):
        def build(rng, ev):
            return json.dumps(_mutated(ev, event_id=f"fuzz{rng.getrandbits(48):012x}", **pick(rng))).encode()
        return build

    def truncated(rng, ev):
        whole = json.dumps(ev).encode()
        return whole[:rng.randint(1, len(whole) - 1)]

    def deep(rng, ev):
        depth = rng.randint(3_000, 20_000)
        return json.dumps(_mutated(ev, params=["MARK"])).encode().replace(b'"MARK"', b"[" * depth + b"]" * depth)

    def infinite_ts(rng, ev):
        return json.dumps(_mutated(ev, timestamp=123.0, event_id=f"fuzz{rng.getrandbits(48):012x}")).encode() \
            .replace(b'"timestamp": 123.0', rng.choice([b'"timestamp": 1e999', b'"timestamp": -1e999']))

    K = Kind
    return [
        K("empty_value", "bad_event", 2, _raw(b"")),
        K("null_value", "bad_event", 2, lambda rng, ev: None),
        K("json_null", "bad_event", 1, _raw(b"null")),
        K("not_json", "bad_event", 3, lambda rng, ev: rng.choice([b"{nope", b"\x00\x01\x02", b"hello", b"{'a': 1}"])),
        K("truncated_json", "bad_event", 3, truncated),
        K("not_object", "bad_event", 2, lambda rng, ev: rng.choice([b"[]", b"42", b'"event"', json.dumps([ev]).encode()])),
        K("invalid_utf8", "bad_event", 2, lambda rng, ev: json.dumps(_mutated(ev, message="MARK")).encode().replace(b"MARK", b"\xff\xfe")),
        K("absurd_nesting", "bad_event", 0.5, deep),
        K("missing_field", "bad_event", 3, with_changes(lambda rng: {rng.choice(
            ["key", "keys", "timestamp", "template_id", "template", "params", "message", "source"]): _DELETE})),
        K("timestamp_not_number", "bad_event", 2, with_changes(lambda rng: {"timestamp": rng.choice(["2008-11-09", None, [], {}])})),
        K("timestamp_not_finite", "bad_event", 1, infinite_ts),
        K("keys_not_list", "bad_event", 1, with_changes(lambda rng: {"keys": rng.choice(["blk_1", 1, {"a": 1}])})),
        K("key_not_string", "bad_event", 1, with_changes(lambda rng: {"key": rng.choice([1, None, ["blk_1"]])})),
        K("key_not_among_keys", "bad_event", 2, with_changes(lambda rng: {"key": f"blk_{rng.getrandbits(40)}"})),
        K("hostless_key_not_host", "bad_event", 1, with_changes(lambda rng: {"keys": [], "key": "not-the-host"})),
        K("params_not_strings", "bad_event", 1, with_changes(lambda rng: {"params": rng.choice([[1, 2], "a", [None]])})),
        K("source_not_object", "bad_event", 1, with_changes(lambda rng: {"source": rng.choice([None, "logs.dn1", 3])})),
        K("source_offset_string", "bad_event", 1, with_changes(lambda rng: {"source/offset": "12"})),
        K("source_file_offset_string", "bad_event", 1, with_changes(lambda rng: {"source/log.offset": "12"})),
        # watermark records (the WATERMARK_KEY key)
        K("watermark_not_json", "bad_watermark", 2, lambda rng, ev: rng.choice([b"", b"{", b"watermark", b"\xff"])),
        K("watermark_not_object", "bad_watermark", 1, lambda rng, ev: rng.choice([b"null", b"[1]", b"7"])),
        K("watermark_missing_source", "bad_watermark", 1, lambda rng, ev: json.dumps({"ts": 1.0}).encode()),
        K("watermark_ts_not_number", "bad_watermark", 1, lambda rng, ev: json.dumps({"source": "logs.x:0", "ts": rng.choice(["soon", [], {}])}).encode()),
        K("watermark_ts_not_finite", "bad_watermark", 1, lambda rng, ev: rng.choice([b'{"source":"logs.x:0","ts":1e999}', b'{"source":"logs.x:0","ts":-1e999}'])),
        K("watermark_idle_not_bool", "bad_watermark", 1, lambda rng, ev: json.dumps({"source": "logs.x:0", "idle": rng.choice(["yes", 1, None])}).encode()),
    ]


def event_cases(rng: random.Random, n: int, good_events: list[dict], min_each: int = 3) -> list[Case]:
    """n malformed events-topic records, each built from one of ``good_events`` (dicts of real
    ParsedEvents); watermark kinds carry WATERMARK_KEY, the others a session key."""
    out = []
    for k in _draw(rng, event_kinds(), n, min_each):
        ev = rng.choice(good_events)
        key = WATERMARK_KEY if k.reason == "bad_watermark" else ev["key"].encode()
        out.append(Case(k.name, k.build(rng, ev), k.reason, key))
    return out
