"""Helpers for end-to-end tests of the stages through the real broker."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from confluent_kafka import Consumer

from services.records import Alert, Window, decode
from services.settings import Settings

BLOCK = re.compile(r"blk_-?\d+")
REPO = Path(__file__).resolve().parent.parent


def lines_by_block(src: Path) -> dict[str, list[str]]:
    """Ground truth: every line naming a block, per block (a line naming two belongs to both)."""
    blocks: dict[str, list[str]] = defaultdict(list)
    with open(src, encoding="utf-8", newline="") as fh:
        for line in fh:
            text = line.rstrip("\r\n")
            for blk in dict.fromkeys(BLOCK.findall(text)):
                blocks[blk].append(text)
    return dict(blocks)


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that gives a `logwarden` subprocess exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGWARDEN_")}
    return env | settings.environment() | extra


def logwarden(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("logwarden")
    return subprocess.Popen([str(exe), *args], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            cwd=REPO)


def collect(settings: Settings, topic: str, record_type, stop: threading.Event, out: list) -> None:
    """Consume ``topic`` from the beginning into `out` (decoded as ``record_type``) until `stop`."""
    consumer = Consumer(settings.kafka_config() | {
        "group.id": f"{settings.group_prefix}.test-reader-{topic}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False})
    consumer.subscribe([topic])
    try:
        while not stop.is_set():
            for msg in consumer.consume(500, timeout=0.2):
                if not msg.error():
                    out.append(decode(msg.value(), record_type))
    finally:
        consumer.close()


class Collector(threading.Thread):
    """Reads a topic from the beginning in the background; ``items`` grows as records come."""

    def __init__(self, settings: Settings, topic: str, record_type):
        super().__init__(daemon=True)
        self.settings, self.topic, self.record_type = settings, topic, record_type
        self.stop, self.items = threading.Event(), []

    def run(self) -> None:
        collect(self.settings, self.topic, self.record_type, self.stop, self.items)

    def close(self) -> list:
        self.stop.set()
        self.join(30)
        return self.items


def alerts_collector(settings: Settings) -> Collector:
    c = Collector(settings, settings.alerts_topic, Alert)
    c.start()
    return c


def windows_collector(settings: Settings) -> Collector:
    c = Collector(settings, settings.windows_topic, Window)
    c.start()
    return c


def wait_until(predicate, timeout: float, every: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def unique_sessions(windows: list[Window]) -> dict[str, Window]:
    """Closed session windows by key, replays (same window id) counted once; a key closed twice
    with different content is a failure the caller sees as a duplicate key."""
    by_id = {w.window_id: w for w in windows}
    by_key: dict[str, list[Window]] = defaultdict(list)
    for w in by_id.values():
        by_key[w.key].append(w)
    dupes = {k: len(v) for k, v in by_key.items() if len(v) > 1}
    assert not dupes, f"keys with more than one distinct session window: {list(dupes.items())[:5]}"
    return {k: v[0] for k, v in by_key.items()}
