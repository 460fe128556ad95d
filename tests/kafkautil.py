"""Helpers for tests that talk to the real broker (the `kafka_bootstrap` / `kafka_settings`
fixtures in conftest.py): settings isolated per test, and reading a topic back."""
from __future__ import annotations

import json
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pydantic import Field

from services.settings import Settings


class IsolatedSettings(Settings):
    """Settings whose topics, consumer groups and host topics belong to one test.

    Host names must go through ``host()``: LOGS_PATTERN matches only ``logs.<test_id>-*``, so a
    stage run with these settings never sees another test's host topics."""
    test_id: str = Field("", exclude=True)

    def host(self, name: str) -> str:
        """The per-test host name for ``name`` (records go to ``logs.<test_id>-<name>``)."""
        return f"{self.test_id}-{name}"

    def logs_topic(self, name: str) -> str:
        return f"logs.{self.host(name)}"

    def owned_topic(self, topic: str) -> bool:
        return (topic.startswith(f"{self.test_id}.") or topic.startswith(f"logs.{self.test_id}-")
                or topic.startswith(f"{self.group_prefix}."))       # changelogs: <group>-changelog


def isolated_settings(bootstrap: str, **overrides) -> IsolatedSettings:
    test_id = "t" + uuid.uuid4().hex[:10]
    values = {
        "kafka_bootstrap": bootstrap,
        "test_id": test_id,
        "logs_pattern": rf"^logs\.{test_id}-.*",
        "events_topic": f"{test_id}.events",
        "windows_topic": f"{test_id}.windows",
        "alerts_topic": f"{test_id}.alerts",
        "deadletter_topic": f"{test_id}.deadletter",
        "feedback_topic": f"{test_id}.feedback",
        "otlp_spans_topic": f"{test_id}.otlp_spans",
        "otlp_metrics_topic": f"{test_id}.otlp_metrics",
        "otlp_logs_topic": f"{test_id}.otlp_logs",
        "spans_topic": f"{test_id}.spans",
        "traces_topic": f"{test_id}.traces",
        "timeline_topic": f"{test_id}.timeline",
        "chunks_topic": f"{test_id}.chunks",
        "group_prefix": test_id,
    }
    return IsolatedSettings(**(values | overrides))


def client_config(target: Settings | str) -> dict:
    """librdkafka config for a Settings (with its security options) or a bare bootstrap string."""
    if isinstance(target, Settings):
        return target.kafka_config()
    return {"bootstrap.servers": target}


def delete_topics(target: Settings | str, topics: list[str]) -> None:
    """Start deleting ``topics`` (no wait): keeps a session's broker from piling up partitions."""
    if topics:
        AdminClient(client_config(target)).delete_topics(topics, operation_timeout=0)


def topic_partitions(target: Settings | str, topic: str, timeout: float = 30.0) -> list[int]:
    """Partition ids of ``topic``, waiting until it exists."""
    admin = AdminClient(client_config(target))
    deadline = time.monotonic() + timeout
    while True:
        metadata = admin.list_topics(topic, timeout=10)
        described = metadata.topics.get(topic)
        if described is not None and described.error is None and described.partitions:
            return sorted(described.partitions)
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {topic} does not exist after {timeout:.0f} s")
        time.sleep(0.2)


def record_count(target: Settings | str, topic: str) -> int:
    """Records currently in ``topic`` (sum over partitions of high - low watermark)."""
    consumer = Consumer(client_config(target) | {"group.id": "logwarden-test-count"})
    try:
        total = 0
        for partition in topic_partitions(target, topic):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def consume(target: Settings | str, topic: str, count: int, timeout: float = 30.0,
            settle: float = 0.0) -> list[Message]:
    """Every record of ``topic`` from the beginning, until ``count`` have arrived or ``timeout``
    passed; then ``settle`` more seconds, so a test can see records beyond ``count``
    (duplicates). Returns what arrived (the caller asserts on the number), in partition order.
    Reads by assignment, not by a group: no rebalance wait, no committed offsets."""
    consumer = Consumer(client_config(target) | {
        "group.id": f"logwarden-test-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "enable.partition.eof": False, "fetch.wait.max.ms": 50})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in topic_partitions(target, topic, timeout)])
        received: list[Message] = []
        deadline = time.monotonic() + timeout
        settle_until = None
        while True:
            now = time.monotonic()
            if settle_until is None and len(received) >= count:
                settle_until = now + settle
            if (settle_until is not None and now >= settle_until) or now >= deadline:
                return received
            for message in consumer.consume(10_000, timeout=0.2):
                if message.error():
                    raise KafkaException(message.error())
                received.append(message)
    finally:
        consumer.close()


def consume_json(target: Settings | str, topic: str, count: int, timeout: float = 30.0,
                 settle: float = 0.0) -> list[dict]:
    """``consume`` with each value decoded as JSON."""
    return [json.loads(m.value()) for m in consume(target, topic, count, timeout, settle)]


def produce_values(target: Settings | str, topic: str, values, key: bytes | str | None = None) -> int:
    """Produce ``values`` (bytes, str, or anything JSON-serialisable) and wait for the acks."""
    producer = Producer(client_config(target) | {"enable.idempotence": True, "linger.ms": 5})
    sent = 0
    for value in values:
        if not isinstance(value, (bytes, str)):
            value = json.dumps(value)
        producer.produce(topic, value, key)
        sent += 1
        producer.poll(0)
    remaining = producer.flush(30)
    assert remaining == 0, f"{remaining} records to {topic} not acknowledged"
    return sent
