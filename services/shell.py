"""The one Kafka shell every stage runs in.

    poll a batch -> core.handle(record) -> produce outputs -> (checkpoint) -> wait for acks
    -> commit offsets; a record the core rejects -> dead-letter topic; metrics around each step.

Offsets are committed only after every output caused by the records before them is
acknowledged by the broker (idempotent producer, acks=all), so a SIGKILL anywhere replays input,
never loses it. Stateful cores checkpoint their state *with the input offsets it reflects*
(services.checkpoint); on assignment the shell seeks to the checkpoint's offsets, so state and
position always agree. Outputs carry deterministic ids, so the replayed part is recognisable
downstream as duplicates.

The core is plain Python: it never sees a Kafka object, only `Record`s, and returns `Out`s.
"""
from __future__ import annotations

import gc
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from services import metrics
from services.records import DeadLetter
from services.settings import Settings, load_settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Record:
    """What a core sees of a consumed Kafka record."""
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


@dataclass(slots=True)
class Out:
    topic: str
    value: bytes
    key: str | bytes | None = None


class BadRecord(Exception):
    """Raised by a core for input it cannot process; the record goes to the dead-letter topic."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DeliveryFailed(RuntimeError):
    """An output was not acknowledged; the stage stops without committing (input replays)."""


class Core(Protocol):
    name: str

    def handle(self, record: Record) -> list[Out]: ...
    def tick(self, now: float) -> list[Out]: ...


@dataclass
class StageSpec:
    """How to run a core: what it consumes and its consumer group."""
    name: str
    topics: list[str]                       # names, or one "^regex"
    core: Core
    commit_interval_s: float = 1.0
    batch_size: int = 2000
    # Stateful cores: called with the partitions being assigned, returns {(topic, partition):
    # offset to resume from}; checkpoint(offsets, final) saves state for the offsets just
    # processed (final: at shutdown or revoke, when a core that saves less often must save).
    on_assign: object = None
    on_revoke: object = None
    checkpoint: object = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Kafka clients
def producer_config(settings: Settings, **overrides) -> dict:
    conf = settings.kafka_config() | {
        "enable.idempotence": True,          # implies acks=all; retries cannot duplicate or reorder
        "acks": "all",
        "linger.ms": 10,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
    }
    return conf | overrides


def consumer_config(settings: Settings, group: str, **overrides) -> dict:
    conf = settings.kafka_config() | {
        "group.id": group,
        "enable.auto.commit": False,         # we commit after outputs are acknowledged
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        # A regex subscription sees topics created later only on a metadata refresh.
        "topic.metadata.refresh.interval.ms": 2000,
        "fetch.wait.max.ms": 50,
        "session.timeout.ms": 6_000,          # the broker's minimum: a dead replica is replaced fast
        "heartbeat.interval.ms": 1000,
    }
    return conf | overrides


def ensure_topics(settings: Settings, extra: Iterable[str] = ()) -> None:
    """Create logwarden's own topics when missing (idempotent)."""
    admin = AdminClient(settings.kafka_config())
    names = [settings.events_topic, settings.windows_topic, settings.alerts_topic,
             settings.deadletter_topic, settings.feedback_topic, *extra]
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [NewTopic(n, num_partitions=settings.topic_partitions,
                       replication_factor=settings.replication_factor)
              for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return
    for name, fut in admin.create_topics(wanted, operation_timeout=30).items():
        try:
            fut.result()
            log.info("created topic %s", name)
        except KafkaException as err:
            if "TOPIC_ALREADY_EXISTS" not in str(err):
                raise


def topics_main(args) -> int:
    ensure_topics(load_settings())
    return 0


def subscription(pattern_or_names: list[str]) -> list[str]:
    """librdkafka treats a topic starting with '^' as a regex."""
    out = []
    for t in pattern_or_names:
        if any(c in t for c in "*+?[](){}|\\") and not t.startswith("^"):
            t = "^" + t
        out.append(t)
    return out


# ------------------------------------------------------------------------------------------
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Make Python's cyclic garbage collector cheap for a stage.

    A stage allocates tens of objects per record (decoded JSON, pydantic models) that die young
    and hold no cycles, while it keeps many long-lived ones (models, open sessions and alerts).
    With the default thresholds (700, 10, 10) the collector ran so often, each time traversing
    the long-lived objects, that it took about half of the detect stage's time (measured:
    3.8k -> 7.1k windows/s). Objects alive after start-up are frozen (never traversed again),
    and collections start after 50,000 allocations instead of 700."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class StageRunner:
    """Runs one StageSpec: the poll/produce/ack/commit loop."""

    def __init__(self, settings: Settings, spec: StageSpec, stop: threading.Event | None = None):
        self.settings = settings
        self.spec = spec
        self.stop = stop or threading.Event()
        # Only failures come back as delivery reports: a Python callback per acknowledged record
        # cost as much as the record's parse. Successes are counted when flush() returns.
        self.producer = Producer(producer_config(settings, **{"delivery.report.only.error": True}))
        # Static membership only for fixed topic lists: a static member that rejoins after a
        # restart gets its cached assignment without a rebalance, so nobody re-evaluates a regex
        # subscription and host topics created afterwards would never be consumed.
        regex = any(t.startswith("^") for t in subscription(spec.topics))
        extra = ({"group.instance.id": f"{settings.instance_id}.{spec.name}"}
                 if settings.instance_id and not regex else {})
        self.consumer = Consumer(consumer_config(settings, settings.group(spec.name), **extra))
        # Known dead-letter reasons exist at 0 from the start: rate() ignores a series' first
        # sample, so a series born at its first dead letter would hide a single burst.
        for reason in (*getattr(spec.core, "dead_letter_reasons", ()), "stage_error"):
            metrics.DEADLETTERS.labels(spec.name, reason)
        self._delivery_error: str | None = None
        self._unacked: dict[str, int] = {}               # records produced per topic since the last flush
        self._records_out: dict[str, object] = {}        # topic -> metric child
        self._pending: dict[tuple[str, int], int] = {}   # next offset to commit per partition
        self._produced = False                            # outputs since the last checkpoint
        self._assigned: set[tuple[str, int]] = set()
        self.last_input = time.monotonic()

    # -- callbacks ----------------------------------------------------------------------------
    def _on_delivery(self, err, msg) -> None:
        # Called for failed records only (delivery.report.only.error).
        if err is not None:
            self._delivery_error = f"{msg.topic()}: {err}"

    def _on_assign(self, consumer, partitions) -> None:
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        if self.spec.on_assign:
            resume = self.spec.on_assign([(p.topic, p.partition) for p in partitions])
            for p in partitions:
                if (p.topic, p.partition) in resume:
                    p.offset = resume[(p.topic, p.partition)]
            consumer.assign(partitions)
        log.info("%s: assigned %s", self.spec.name,
                 ", ".join(f"{p.topic}[{p.partition}]@{p.offset}" for p in partitions))

    def _on_revoke(self, consumer, partitions) -> None:
        # Hand the partitions over cleanly: everything processed so far is acked and committed.
        # A core that buffers input (detect batches windows) emits what it holds first.
        drain = getattr(self.spec.core, "drain", None)
        try:
            if drain:
                self.produce(drain())
            self.flush_and_commit(final=True)
        except Exception:   # the new owner replays from the last commit; nothing is lost
            log.exception("%s: commit on revoke failed", self.spec.name)
        revoked = [(p.topic, p.partition) for p in partitions]
        if self.spec.on_revoke:
            self.spec.on_revoke(revoked)
        self._assigned -= set(revoked)
        for tp in revoked:
            self._pending.pop(tp, None)

    # -- output -------------------------------------------------------------------------------
    def produce(self, outs: Iterable[Out]) -> None:
        produce, unacked, on_delivery = self.producer.produce, self._unacked, self._on_delivery
        for out in outs:
            while True:
                try:
                    produce(out.topic, out.value, out.key, on_delivery=on_delivery)
                    break
                except BufferError:          # local queue full: let the producer drain
                    self.producer.poll(0.05)
            unacked[out.topic] = unacked.get(out.topic, 0) + 1
            self._produced = True
        self.producer.poll(0)

    def dead_letter(self, record: Record, reason: str, detail: str) -> Out:
        metrics.DEADLETTERS.labels(self.spec.name, reason).inc()
        letter = DeadLetter(stage=self.spec.name, reason=reason, detail=detail[:500], topic=record.topic,
                            partition=record.partition, offset=record.offset,
                            key_b64=DeadLetter.encode(record.key),
                            value_b64=DeadLetter.encode(record.value or b""), time=time.time())
        return Out(self.settings.deadletter_topic, letter.model_dump_json().encode(), record.key)

    def flush_and_commit(self, final: bool = False) -> None:
        """Wait for every output to be acknowledged, checkpoint, then commit the input offsets."""
        remaining = self.producer.flush(30)
        if remaining or self._delivery_error:
            raise DeliveryFailed(self._delivery_error or f"{remaining} outputs not acknowledged in 30 s")
        for topic, n in self._unacked.items():          # all acknowledged now
            counter = self._records_out.get(topic)
            if counter is None:
                counter = self._records_out[topic] = metrics.RECORDS_OUT.labels(self.spec.name, topic)
            counter.inc(n)
        self._unacked.clear()
        # State changes without input too (a tick closes idle sessions): checkpoint then as well,
        # or a restart would close those sessions a second time. A final one always: a core that
        # saves less often (parse) may hold changes from earlier commits.
        if self.spec.checkpoint and (final or self._pending or self._produced):
            self.spec.checkpoint(dict(self._pending), final)
        self._produced = False
        if not self._pending:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in self._pending.items()]
        self.consumer.commit(offsets=offsets, asynchronous=False)
        self._pending.clear()
        metrics.COMMITS.labels(self.spec.name).inc()

    # -- loop ---------------------------------------------------------------------------------
    def run(self, exit_when_idle: float | None = None) -> None:
        spec = self.spec
        tune_gc()
        metrics.STAGE_INFO.labels(spec.name).set(1)
        self.consumer.subscribe(subscription(spec.topics), on_assign=self._on_assign,
                                on_revoke=self._on_revoke)
        last_commit = last_lag = time.monotonic()
        records_in: dict[str, object] = {}       # topic -> metric child
        try:
            while not self.stop.is_set():
                if not getattr(spec.core, "ready", lambda: True)():
                    # e.g. detect without a model: leave the input in Kafka until it can be judged
                    self.produce(spec.core.tick(time.time()))
                    self.stop.wait(0.5)
                    continue
                msgs = self.next_batch(spec.batch_size, 0.2)
                started = time.perf_counter()
                outs: list[Out] = []
                batch_in: dict[str, int] = {}        # topic -> records (one Counter.inc per batch)
                for msg in msgs:
                    if msg.error():
                        log.warning("%s: consume error %s", spec.name, msg.error())
                        continue
                    rec = Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                                 msg.timestamp()[1])
                    batch_in[rec.topic] = batch_in.get(rec.topic, 0) + 1
                    try:
                        outs.extend(spec.core.handle(rec))
                    except BadRecord as bad:
                        outs.append(self.dead_letter(rec, bad.reason, bad.detail))
                    except Exception as err:   # a bug must not stop the stream: keep the record
                        log.exception("%s: failed on %s[%d]@%d", spec.name, rec.topic, rec.partition, rec.offset)
                        outs.append(self.dead_letter(rec, "stage_error", f"{type(err).__name__}: {err}"))
                    self._pending[(rec.topic, rec.partition)] = rec.offset + 1
                for topic, n in batch_in.items():
                    counter = records_in.get(topic)
                    if counter is None:
                        counter = records_in[topic] = metrics.RECORDS_IN.labels(spec.name, topic)
                    counter.inc(n)
                now = time.monotonic()
                if msgs:
                    self.last_input = now
                    metrics.BATCH_SECONDS.labels(spec.name).observe(time.perf_counter() - started)
                outs.extend(spec.core.tick(time.time()))
                self.produce(outs)
                if self._delivery_error:
                    raise DeliveryFailed(self._delivery_error)
                if now - last_commit >= spec.commit_interval_s:
                    self.flush_and_commit()
                    last_commit = now
                if now - last_lag >= 5:
                    self._export_lag()
                    last_lag = now
                if exit_when_idle and now - self.last_input >= exit_when_idle and not outs:
                    log.info("%s: idle for %.1f s, stopping", spec.name, exit_when_idle)
                    break
            self.flush_and_commit(final=True)
        finally:
            metrics.STAGE_INFO.labels(spec.name).set(0)
            close = getattr(spec.core, "close", None)
            if close:
                close()
            self.consumer.close()          # leaves the group now, so a restart rebalances fast

    def next_batch(self, size: int, timeout: float) -> list:
        """Up to `size` records: whatever is already fetched, else the first one to arrive
        within `timeout`, together with what came with it.

        Consumer.consume(n, timeout) waits until n records or the whole timeout (measured: a
        record every 10 ms sat 100 ms on average, 200 ms at worst, in each stage it crossed).
        This returns as soon as there is anything, and still batches under load, because then
        the fetch queue already holds many records."""
        msgs = self.consumer.consume(size, timeout=0)
        if msgs:
            return msgs
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        return [first, *self.consumer.consume(size - 1, timeout=0)] if size > 1 else [first]

    def _export_lag(self) -> None:
        try:
            parts = self.consumer.assignment()
            if not parts:
                return
            positions = {(p.topic, p.partition): p.offset for p in self.consumer.position(parts)}
            lag: dict[str, int] = {}
            for p in parts:
                low, high = self.consumer.get_watermark_offsets(p, timeout=1, cached=True)
                pos = positions.get((p.topic, p.partition), -1)
                behind = high - (pos if pos >= 0 else low)
                lag[p.topic] = lag.get(p.topic, 0) + max(0, behind)
            for topic, value in lag.items():
                metrics.CONSUMER_LAG.labels(self.spec.name, topic).set(value)
        except KafkaException as err:
            log.debug("lag export failed: %s", err)


def json_out(topic: str, payload: dict | object, key: str | None) -> Out:
    if hasattr(payload, "model_dump_json"):
        data = payload.model_dump_json(by_alias=True).encode()
    else:
        data = json.dumps(payload, separators=(",", ":")).encode()
    return Out(topic, data, key)

