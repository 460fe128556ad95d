"""Fuzz suite (issue 12): over 10,000 generated malformed Filebeat records of 43 kinds, interleaved
with real HDFS lines in the hosts' own logs topics, and over 10,000 malformed events-topic records
of 25 kinds, interleaved with parse's real events, through the real broker and one `logwarden run
all` process (parse, sessions, feedback). Every bad record must come back from the dead-letter
topic, once, with its kind's reason, its size and sha256 and the head of its bytes; every good
line must reach the events topic and its blocks' session windows and final alerts must be an
uninterrupted run's (toolkit.reference); each reason's counter on /metrics must equal the number
of records of that reason; and the process must still run at the end.

Generation is seeded (tests/fuzzcases.py): a failure names a kind, and the same records come
again on the next run."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from models import artifacts
from services.records import WATERMARK_KEY, DeadLetter, ParsedEvent, decode, to_dict
from services.shell import ensure_topics
from services.stages import ParseStage, SessionsStage
from tests.fuzzcases import event_cases, event_kinds, parse_cases, parse_kinds
from tests.kafkautil import consume, delete_topics, isolated_settings
from tests.streamutil import Collector, alerts_collector, logwarden, settings_env, wait_until, windows_collector
from tests.test_stream_e2e import assert_same_as_reference, stream_settings
from toolkit.localkafka import free_port
from toolkit.reference import parse_files, windows_and_finals
from toolkit.replay import Agent, deal_lines, open_encoder, split_lines

pytestmark = pytest.mark.slow
SEED = 20261202
HOSTS = ["dn1", "dn2", "dn3"]
GOOD_LINES = 3000                      # of HDFS_5k.log, dealt to the hosts by writer
BAD_PER_HOST = 3400                    # 10,200 malformed Filebeat records in all
BAD_EVENTS = 10_200
MAX_RECORD = 2_000_000                 # the logs topics take the > 1 MB records


class Sent:
    """Where each produced record landed (topic, partition, offset), from delivery reports."""

    def __init__(self, settings, max_bytes: int = 1_000_000):
        self.producer = Producer(settings.kafka_config() | {
            "enable.idempotence": True, "linger.ms": 20, "message.max.bytes": max_bytes,
            "queue.buffering.max.kbytes": 262_144})
        self.at: dict[int, tuple[str, int, int]] = {}
        self.errors: list[str] = []

    def send(self, tag: int, topic: str, value: bytes | None, key: bytes | None) -> None:
        def report(err, msg, tag=tag):
            if err is not None:
                self.errors.append(f"{tag}: {err}")
            else:
                self.at[tag] = (msg.topic(), msg.partition(), msg.offset())
        while True:
            try:
                self.producer.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)

    def flush(self) -> None:
        assert self.producer.flush(60) == 0, "records not acknowledged"
        assert not self.errors, self.errors[:5]


def interleave(rng: random.Random, good: list, bad: list) -> list:
    """good and bad merged at random places, each list's own order kept."""
    slots = [True] * len(good) + [False] * len(bad)
    rng.shuffle(slots)
    g, b = iter(good), iter(bad)
    return [next(g) if is_good else next(b) for is_good in slots]


def scrape(port: int) -> dict[tuple[str, str], float]:
    """(stage, reason) -> logwarden_deadletter_total, from the running process's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.labels["stage"], s.labels["reason"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "logwarden_deadletter"
            for s in family.samples if s.name == "logwarden_deadletter_total"}


@pytest.fixture(scope="module")
def fuzzed(kafka_bootstrap, datasets, tiny_deeplog, tmp_path_factory):
    """One run of the whole stream on fuzzed input; what came out of it."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(SEED)
    port = free_port()
    settings = stream_settings(isolated_settings(kafka_bootstrap), datasets, tmp_path, tiny_deeplog,
                               idle_close_s=4.0, metrics_port=port)
    sample = tmp_path / "sample.log"
    with open(datasets / "hdfs" / "HDFS_5k.log", "rb") as fh:
        sample.write_bytes(b"".join(fh.readline() for _ in range(GOOD_LINES)))
    files = deal_lines(sample, [settings.host(h) for h in HOSTS], tmp_path / "logs")
    ensure_topics(settings)
    admin = AdminClient(settings.kafka_config())
    created = admin.create_topics([NewTopic(f"logs.{host}", num_partitions=2, replication_factor=1,
                                            config={"max.message.bytes": str(MAX_RECORD)}) for host in files])
    for future in created.values():
        future.result(30)

    # the hosts' topics: each host's good lines (as `logwarden replay` writes them) with its
    # malformed records at random places between them, all in the one partition of its file
    logs, bad_logs = Sent(settings, MAX_RECORD), {}
    tag = 0
    for host, path in files.items():
        path = path.resolve()
        with open(path, "rb") as fh:
            encoder = open_encoder(fh, Agent(host), path)
            lines, _ = split_lines(fh.read(), 0)
        good = [("good", encoder.encode(offset, text).encode()) for offset, text in lines]
        bad = [("bad", case) for case in parse_cases(
            rng, BAD_PER_HOST, host, f"/var/log/fuzz/{host}.log",
            max_line_bytes=settings.max_line_bytes, max_line_tokens=settings.max_line_tokens)]
        for what, item in interleave(rng, good, bad):
            tag += 1
            if what == "bad":
                bad_logs[tag] = item = dataclasses.replace(item, key=str(path).encode())
                logs.send(tag, f"logs.{host}", item.value, item.key)
            else:
                logs.send(tag, f"logs.{host}", item, str(path).encode())
    logs.flush()

    # malformed records for the events topic, built from real events; half before the stages
    # start, half while parse writes its events among them
    reference_events = parse_files(settings, files)
    bad_events = event_cases(rng, BAD_EVENTS, [to_dict(e) for e in reference_events[:500]])
    events = Sent(settings)
    for i, case in enumerate(bad_events[:BAD_EVENTS // 2]):
        events.send(i, settings.events_topic, case.value, case.key)
    events.flush()

    def inject_rest():
        for i, case in enumerate(bad_events[BAD_EVENTS // 2:], start=BAD_EVENTS // 2):
            events.send(i, settings.events_topic, case.value, case.key)
            if i % 500 == 0:
                time.sleep(0.2)
        events.producer.flush(60)

    log = tmp_path / "stages.log"
    windows, alerts = windows_collector(settings), alerts_collector(settings)
    letters = Collector(settings, settings.deadletter_topic, DeadLetter)
    letters.start()
    model = artifacts.load(tiny_deeplog, device="cpu")
    ref_windows, ref_finals = windows_and_finals(settings, files, {"deeplog": model})
    stage = logwarden("run", "all", env=settings_env(settings), log=log)
    injector = threading.Thread(target=inject_rest, daemon=True)
    bad_total = len(bad_logs) + len(bad_events)
    try:
        injector.start()
        injector.join(120)
        events.flush()
        wait_until(lambda: len({w.window_id for w in windows.items}) >= len(ref_windows), 150,
                   what="every block's session window")
        wait_until(lambda: len(letters.items) >= bad_total, 90, what="every dead letter")
        time.sleep(2)                                      # duplicates, if any, come now
        counters = scrape(port)
        still_running = stage.poll() is None
        event_records = consume(settings, settings.events_topic, 10**9, timeout=15)
    finally:
        if stage.poll() is None:
            stage.terminate()
            stage.wait(60)
        got_windows, got_alerts, got_letters = windows.close(), alerts.close(), letters.close()
        delete_topics(settings, [t for t in admin.list_topics(timeout=10).topics if settings.owned_topic(t)])
    yield {
        "settings": settings, "log": log.read_text(), "still_running": still_running, "counters": counters,
        "bad_logs": {logs.at[t]: case for t, case in bad_logs.items()},
        "bad_events": {events.at[i]: case for i, case in enumerate(bad_events)},
        "deadletters": got_letters,
        "events": event_records, "reference_events": reference_events,
        "windows": got_windows, "alerts": got_alerts, "ref_windows": ref_windows, "ref_finals": ref_finals,
    }


def test_the_generated_records_are_many_and_of_many_kinds():
    rng = random.Random(SEED)
    cases = parse_cases(rng, BAD_PER_HOST * len(HOSTS), "h", "/p", max_line_bytes=65536, max_line_tokens=4096)
    kinds = Counter(c.kind for c in cases)
    assert len(cases) >= 10_000 and len(kinds) == len(parse_kinds(65536, 4096)) >= 20
    assert all(n >= 3 for n in kinds.values())
    assert sum(len(c.value or b"") > 1_048_576 for c in cases) >= 3
    assert max(c.value.count(b" t") for c in cases if c.kind == "tens_of_thousands_of_tokens") >= 10_000
    again = parse_cases(random.Random(SEED), BAD_PER_HOST * len(HOSTS), "h", "/p", max_line_bytes=65536,
                        max_line_tokens=4096)
    assert [c.value for c in again] == [c.value for c in cases]          # seeded: the same records
    event = {"event_id": "e1", "key": "blk_1", "keys": ["blk_1"], "timestamp": 1.0, "level": "INFO",
             "component": "c", "template_id": "E5", "template": "t", "params": [], "message": "m",
             "source": {"host": "h", "topic": "logs.h", "partition": 0, "offset": 0, "log.file.path": "/p",
                        "log.offset": 0}}
    events = event_cases(random.Random(SEED), BAD_EVENTS, [event])
    assert len(events) >= 10_000 and len({c.kind for c in events}) == len(event_kinds()) >= 20


def _by_place(letters: list[DeadLetter], stage: str) -> dict[tuple[str, int, int], list[DeadLetter]]:
    out: dict[tuple[str, int, int], list[DeadLetter]] = {}
    for letter in letters:
        if letter.stage == stage:
            out.setdefault((letter.topic, letter.partition, letter.offset), []).append(letter)
    return out


def _check_letters(letters: dict, expected: dict, stage: str) -> None:
    missing = [expected[p].kind for p in set(expected) - set(letters)]
    extra = [(p, ls[0].reason, ls[0].detail) for p, ls in letters.items() if p not in expected]
    assert not missing, f"{stage}: {len(missing)} bad records not dead-lettered: {Counter(missing).most_common(10)}"
    assert not extra, f"{stage}: {len(extra)} dead letters of records that were good: {extra[:5]}"
    twice = [p for p, ls in letters.items() if len(ls) > 1]
    assert not twice, f"{stage}: {len(twice)} records dead-lettered more than once"
    wrong = Counter((case.kind, case.reason, letters[p][0].reason) for p, case in expected.items()
                    if letters[p][0].reason != case.reason)
    assert not wrong, f"{stage}: (kind, expected, got): {wrong.most_common(10)}"
    for p, case in expected.items():        # the original is recognisable from its dead letter
        letter, value = letters[p][0], case.value or b""
        assert (letter.size, letter.sha256) == (len(value), hashlib.sha256(value).hexdigest()), case.kind
        assert letter.head() == value[:len(letter.head())] and len(letter.head()) == min(len(value), 16384)
        assert letter.detail and letter.key_b64 == (base64.b64encode(case.key[:1024]).decode() if case.key else None)


def test_every_malformed_filebeat_record_is_dead_lettered_with_its_reason_and_every_good_line_parsed(fuzzed):
    assert fuzzed["still_running"], "the stage process exited: " + fuzzed["log"][-3000:]
    assert "Traceback" not in fuzzed["log"], fuzzed["log"][-3000:]
    expected = fuzzed["bad_logs"]
    assert len(expected) >= 10_000
    _check_letters(_by_place(fuzzed["deadletters"], "parse"), expected, "parse")
    # /metrics: each reason's counter is the number of records of that reason (0 where none)
    want = Counter(case.reason for case in expected.values())
    got = {reason: value for (stage, reason), value in fuzzed["counters"].items() if stage == "parse"}
    assert set(want) <= set(ParseStage.dead_letter_reasons)
    assert got == {reason: float(want.get(reason, 0)) for reason in got} and set(want) <= set(got)
    # every good line reached the events topic (and nothing else did): its event ids are the
    # uninterrupted run's
    injected = set(fuzzed["bad_events"])
    parsed = [decode(m.value(), ParsedEvent) for m in fuzzed["events"]
              if m.key() != WATERMARK_KEY and (m.topic(), m.partition(), m.offset()) not in injected]
    mine = Counter((e.event_id, e.key) for e in parsed)
    reference = Counter((e.event_id, e.key) for e in fuzzed["reference_events"])
    assert mine == reference, f"{len(reference - mine)} events missing, {len(mine - reference)} extra"
    assert len({e.source.file_offset for e in parsed if e.source.host.endswith("dn1")}) > 500


def test_every_malformed_event_is_dead_lettered_and_the_sessions_are_an_uninterrupted_runs(fuzzed):
    assert fuzzed["still_running"], "the stage process exited: " + fuzzed["log"][-3000:]
    expected = fuzzed["bad_events"]
    assert len(expected) >= 10_000
    _check_letters(_by_place(fuzzed["deadletters"], "sessions"), expected, "sessions")
    want = Counter(case.reason for case in expected.values())
    got = {reason: value for (stage, reason), value in fuzzed["counters"].items() if stage == "sessions"}
    assert set(want) == set(SessionsStage.dead_letter_reasons)
    assert got == {reason: float(want.get(reason, 0)) for reason in got} and set(want) <= set(got)
    # malformed events changed no session: the windows and final alerts are the reference's
    assert len(fuzzed["ref_windows"]) > 100
    assert_same_as_reference(fuzzed["windows"], fuzzed["alerts"], fuzzed["ref_windows"], fuzzed["ref_finals"])
