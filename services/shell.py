"""The one Kafka shell every stage runs in.

    poll a batch -> core.process(batch) -> produce outputs (and rejects as dead letters)
    -> at each checkpoint: changelog records of the core's changed state -> wait for every ack
    -> commit the input offsets (with the checkpoint number as commit metadata)

A core is plain Python (services.cores, wrapped by an adapter in services.stages): it never sees
a Kafka object, only a batch of `Record`s, and returns `Out`s and `Reject`s. What the shell
guarantees, whatever arrives:

* **No record stops a stage.** A record the core rejects goes to the dead-letter topic with its
  reason; a core that raises on a batch is given the batch again one record at a time, and the
  record it still raises on is dead-lettered (reason ``stage_error``). A dead letter always fits
  the broker: it keeps the head of the original bytes, their size and sha256 (records.DeadLetter).
* **No output stops a stage.** An output larger than the broker accepts, or one the broker
  refuses for itself (a per-record delivery error: size, invalid record), is not retried: the
  input record that caused it is dead-lettered with that reason. Transient broker errors (leader
  change, a broker down, timeouts) are retried by the producer without limit
  (``message.timeout.ms=0``), and the shell waits for them — a broker restart delays the stage,
  it does not end it; the consumer reconnects by itself.
* **At least once, recognisably.** Offsets are committed only after every output caused by the
  records before them is acknowledged (idempotent producer, acks=all), so a SIGKILL anywhere
  replays input, never loses it; outputs carry deterministic ids.
* **State follows its partition.** A stateful core's per-partition entries are written to the
  stage's compacted changelog topic at each checkpoint, before the commit, and restored by
  whichever replica is assigned the partition (services.state); the local state directory is a
  cache.
* **Memory is bounded.** The consumer's prefetch queue and the producer's queue are capped
  (LOGWARDEN_CONSUMER_QUEUE_MB, LOGWARDEN_PRODUCER_QUEUE_MB); under overload lag grows, memory
  does not; cores bound their own state.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from services import metrics, records
from services.records import DeadLetter
from services.settings import Settings, load_settings
from services.state import StateStore

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
    value: bytes | None
    key: str | bytes | None = None
    source: Record | None = None      # the input record it came from (dead-lettered if it cannot be produced)
    partition: int | None = None      # None: by key


@dataclass(slots=True)
class Reject:
    """An input record the core cannot process: it goes to the dead-letter topic."""
    record: Record
    reason: str
    detail: str


class BadRecord(Exception):
    """Raised inside a core for input it cannot process; cores turn it into a Reject."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class FatalStageError(RuntimeError):
    """Not a record's fault and not transient (bad credentials, a topic the stage may not use):
    the stage stops with this one line."""


class Core(Protocol):
    name: str

    def process(self, batch: list[Record]) -> list[Out | Reject]: ...
    def tick(self, now: float) -> list[Out]: ...


class StatefulCore(Core, Protocol):
    """A core whose state lives per input partition (services.state)."""

    def assign(self, tp: tuple[str, int], entries: dict[bytes, bytes], committed: int | None) -> int | None:
        """Take over partition ``tp`` with its restored entries; returns the offset to resume
        from (None: the committed one)."""
    def revoke(self, tp: tuple[str, int]) -> None: ...
    def changes(self) -> dict[tuple[str, int], dict[bytes, bytes | None]]:
        """Entries changed since the last call, per partition (None: deleted)."""
    def entries(self, tp: tuple[str, int]) -> dict[bytes, bytes]:
        """All of a partition's entries (the local cache's snapshot)."""
    def commit_offset(self, tp: tuple[str, int], processed: int) -> int:
        """The offset to commit for ``tp`` when everything before ``processed`` has been
        handed to the core: lower when the core holds input whose effect is not yet state
        (a reorder buffer), which is then consumed again after a restore."""


@dataclass
class StageSpec:
    """How to run a core: what it consumes and its consumer group."""
    name: str
    topics: list[str]                       # names, or one "^regex"
    core: Core
    commit_interval_s: float = 1.0
    batch_size: int = 2000
    stateful: bool = False                  # core implements StatefulCore; state in a changelog
    co_partitioned: bool = True             # one input topic: changelog partition p <- input partition p
    dead_letter_reasons: tuple[str, ...] = ()
    broadcast_topics: list[str] = field(default_factory=list)   # the core writes to every partition of these
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Kafka clients
def client_config(settings: Settings) -> dict:
    # (Settings.kafka_config() routes librdkafka's log through one logger that says a repeated
    # line at most once a minute.)
    return settings.kafka_config() | {"log.connection.close": False}


def producer_config(settings: Settings, **overrides) -> dict:
    conf = client_config(settings) | {
        "enable.idempotence": True,          # implies acks=all; retries cannot duplicate or reorder
        "acks": "all",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        # Transient errors are retried without end: a broker restart delays outputs, it never
        # drops them (the shell waits for acknowledgements before committing).
        "message.timeout.ms": 0,
        "message.max.bytes": settings.max_message_bytes,
        "queue.buffering.max.kbytes": settings.producer_queue_mb * 1024,
        "queue.buffering.max.messages": 1_000_000,
    }
    return conf | overrides


def consumer_config(settings: Settings, group: str, **overrides) -> dict:
    conf = client_config(settings) | {
        "group.id": group,
        "enable.auto.commit": False,         # we commit after outputs are acknowledged
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        # A regex subscription sees topics created later only on a metadata refresh.
        "topic.metadata.refresh.interval.ms": 2000,
        "fetch.wait.max.ms": 50,
        "session.timeout.ms": 6_000,          # the broker's minimum: a dead replica is replaced fast
        "heartbeat.interval.ms": 1000,
        "queued.max.messages.kbytes": settings.consumer_queue_mb * 1024,
        "fetch.max.bytes": max(settings.max_message_bytes, 1_048_576) * 4,
    }
    return conf | overrides


def _fatal_error(err: KafkaError) -> str | None:
    """One line for errors no retry fixes."""
    code = err.code()
    if code in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
        return f"authentication failed: {err.str()}"
    if code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED):
        return f"not authorized: {err.str()}"
    if err.fatal():
        return f"fatal client error: {err.str()}"
    return None


def ensure_topics(settings: Settings, extra: Iterable[str] = (), configs: dict[str, dict] | None = None,
                  partitions: dict[str, int] | None = None) -> None:
    """Create logwarden's own topics when missing (idempotent); ``configs``/``partitions``: per
    topic (e.g. a compacted changelog with its input's partition count)."""
    admin = AdminClient(client_config(settings))
    names = [settings.events_topic, settings.windows_topic, settings.alerts_topic,
             settings.deadletter_topic, settings.feedback_topic, *settings.multimodal_topics(), *extra]
    existing = set(admin.list_topics(timeout=15).topics)   # a KafkaException: services.diagnose says why
    wanted = [NewTopic(n, num_partitions=(partitions or {}).get(n, settings.topic_partitions),
                       replication_factor=settings.replication_factor, config=(configs or {}).get(n, {}))
              for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return
    for name, fut in admin.create_topics(wanted, operation_timeout=30).items():
        try:
            fut.result()
            log.info("created topic %s", name)
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def topic_partition_count(settings: Settings, topic: str) -> int | None:
    admin = AdminClient(client_config(settings))
    described = admin.list_topics(topic, timeout=15).topics.get(topic)
    if described is None or described.error is not None:
        return None
    return len(described.partitions)


def topics_main(args) -> int:
    """`logwarden topics create`: logwarden's topics and the Collector's (otlp_*), so that neither
    the Collector nor the otlp stage needs the right to create topics on a locked-down cluster."""
    s = load_settings()
    ensure_topics(s, extra=[s.otlp_spans_topic, s.otlp_metrics_topic, s.otlp_logs_topic])
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

    A stage allocates tens of objects per record that die young and hold no cycles, while it
    keeps many long-lived ones (models, open sessions). With the default thresholds (700, 10, 10)
    the collector ran so often, each time traversing the long-lived objects, that it took about
    half of the detect stage's time (measured: 3.8k -> 7.1k windows/s). Objects alive after
    start-up are frozen (never traversed again), and collections start after 50,000 allocations."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _tp(p) -> tuple[str, int]:
    return (p.topic, p.partition)


class StageRunner:
    """Runs one StageSpec: the poll/process/produce/checkpoint/commit loop."""

    def __init__(self, settings: Settings, spec: StageSpec, stop: threading.Event | None = None):
        self.settings = settings
        self.spec = spec
        self.stop = stop or threading.Event()
        self.group = settings.group(spec.name)
        self._fatal: str | None = None
        # Only failures come back as delivery reports: a Python callback per acknowledged record
        # cost as much as the record's parse. Successes are counted when flush() returns.
        self.producer = Producer(producer_config(settings, **{"delivery.report.only.error": True,
                                                              "error_cb": self._on_client_error}))
        # Static membership only for fixed topic lists: a static member that rejoins after a
        # restart gets its cached assignment without a rebalance, so nobody re-evaluates a regex
        # subscription and host topics created afterwards would never be consumed.
        regex = any(t.startswith("^") for t in subscription(spec.topics))
        extra = ({"group.instance.id": f"{settings.instance_id}.{spec.name}"}
                 if settings.instance_id and not regex else {})
        # A core that wants to know when it has read a partition to its end (parse: a source
        # is idle only once it is caught up, never while it has a backlog) gets EOF events.
        self._at_end = getattr(spec.core, "at_end", None)
        if self._at_end is not None:
            extra["enable.partition.eof"] = True
        self.consumer = Consumer(consumer_config(settings, self.group, error_cb=self._on_client_error, **extra))
        # Known dead-letter reasons exist at 0 from the start: rate() ignores a series' first
        # sample, so a series born at its first dead letter would hide a single burst.
        reasons = (*spec.dead_letter_reasons, *getattr(spec.core, "dead_letter_reasons", ()),
                   "stage_error", "output_too_large", "output_rejected")
        for reason in reasons:
            metrics.DEADLETTERS.labels(spec.name, reason)
        self._failed: list[tuple[Out, str, str]] = []       # outputs the broker refused, with why
        self._unacked: dict[str, int] = {}                  # records produced per topic since the last flush
        self._records_out: dict[str, object] = {}           # topic -> metric child
        self._processed: dict[tuple[str, int], int] = {}    # next offset after what the core was given
        self._assigned: set[tuple[str, int]] = set()
        self._produced = False                               # outputs since the last checkpoint
        self._outage = False                                 # the broker was unreachable; no input since
        self.last_input = time.monotonic()
        self.store: StateStore | None = None
        if spec.stateful:
            self.store = self._state_store()

    # -- state ----------------------------------------------------------------------------------
    def _state_store(self) -> StateStore:
        from pathlib import Path

        s = self.settings
        if self.spec.co_partitioned:
            counts = [topic_partition_count(s, t) for t in self.spec.topics]
            partitions = max([c for c in counts if c] or [s.topic_partitions])
        else:
            partitions = s.topic_partitions
        store = StateStore(self.group, Path(s.state_dir) / self.spec.name / self.group, partitions,
                           self.spec.co_partitioned,
                           lambda: Consumer(consumer_config(s, f"{self.group}.restore", **{"enable.auto.commit": False})))
        from services.state import CHANGELOG_CONFIG

        ensure_topics(s, [store.topic], configs={store.topic: CHANGELOG_CONFIG}, partitions={store.topic: partitions})
        have = topic_partition_count(s, store.topic)
        if have is not None and have != partitions and self.spec.co_partitioned:
            raise FatalStageError(f"changelog {store.topic} has {have} partitions, its input {partitions}: "
                                  "they must match (recreate the changelog after changing partitions)")
        return store

    # -- callbacks ----------------------------------------------------------------------------
    def _on_client_error(self, err: KafkaError) -> None:
        reason = _fatal_error(err)
        if reason:
            self._fatal = reason
            self.stop.set()
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._outage = True
            log.warning("%s: no broker reachable at %s; retrying", self.spec.name, self.settings.bootstrap())
        else:
            log.debug("%s: client error %s", self.spec.name, err)

    def _on_failed(self, out: Out, err, msg) -> None:
        # Called for failed records only (delivery.report.only.error). With no timeout set, what
        # fails here is the record itself (too large for the topic, invalid), not the broker.
        if err is not None:
            self._failed.append((out, "output_rejected", f"{out.topic}: {err.str()}"))

    def _on_assign(self, consumer, partitions) -> None:
        self._outage = False
        tps = [_tp(p) for p in partitions]
        self._assigned |= set(tps)
        if self.store is not None:
            committed = {(c.topic, c.partition): c for c in consumer.committed(partitions, timeout=30)}
            for p in partitions:
                tp = _tp(p)
                c = committed.get(tp)
                committed_offset = c.offset if c is not None and c.offset >= 0 else None
                committed_ck = None
                if c is not None and c.metadata and c.metadata.startswith("ck="):
                    try:
                        committed_ck = int(c.metadata[3:])
                    except ValueError:
                        committed_ck = None
                entries, info = self.store.restore(tp, committed_ck)
                resume = self.spec.core.assign(tp, entries, committed_offset)
                if resume is not None:
                    p.offset = resume
                log.info("%s: restored %s[%d] from %s: %s", self.spec.name, tp[0], tp[1], self.store.topic, info)
                metrics.STATE_RESTORES.labels(self.spec.name).inc()
            consumer.assign(partitions)
        log.info("%s: assigned %s", self.spec.name, ", ".join(f"{p.topic}[{p.partition}]@{p.offset}" for p in partitions))

    def _on_revoke(self, consumer, partitions) -> None:
        # Hand the partitions over cleanly: everything processed so far is acked, its state in
        # the changelog, and committed. A core that buffers input (detect batches) emits it first.
        drain = getattr(self.spec.core, "drain", None)
        try:
            if drain:
                self.produce(drain())
            self.checkpoint(final=True, flush_timeout=15.0)
        except Exception:   # the new owner replays from the last commit; nothing is lost
            log.exception("%s: checkpoint on revoke failed", self.spec.name)
        self._drop([_tp(p) for p in partitions])

    def _on_lost(self, consumer, partitions) -> None:
        # The group moved on without us (a session timeout, a broker restart): the partitions'
        # new owner restores from the changelog; nothing of ours may be committed for them.
        log.warning("%s: partitions lost: %s", self.spec.name, ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))
        self._drop([_tp(p) for p in partitions])

    def _drop(self, tps: list[tuple[str, int]]) -> None:
        for tp in tps:
            self._processed.pop(tp, None)
            self._assigned.discard(tp)
            if self.spec.stateful:
                self.spec.core.revoke(tp)

    # -- output -------------------------------------------------------------------------------
    def produce(self, outs: Iterable[Out | Reject]) -> None:
        produce, unacked = self.producer.produce, self._unacked
        limit = self.settings.max_message_bytes - 512          # key and record overhead
        for out in outs:
            if type(out) is Reject:
                out = self.dead_letter(out.record, out.reason, out.detail)
            size = len(out.value or b"") + len(out.key or b"")
            if size > limit:
                self._dead_letter_output(out, "output_too_large",
                                         f"{out.topic}: output of {size} bytes > LOGWARDEN_MAX_MESSAGE_BYTES")
                continue
            self._send(produce, out.topic, out.value, out.key, out.partition, None, out)
            unacked[out.topic] = unacked.get(out.topic, 0) + 1
            self._produced = True
        self.producer.poll(0)

    def _send(self, produce, topic, value, key, partition, headers, out: Out | None) -> None:
        kwargs = {"on_delivery": partial(self._on_failed, out)} if out is not None else {}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                produce(topic, value, key, **kwargs)
                return
            except BufferError:          # local queue full (a slow or absent broker): let it drain
                self.producer.poll(0.1)
                if self.stop.is_set() and self._fatal:
                    raise FatalStageError(self._fatal) from None
            except KafkaException as err:
                code = err.args[0].code()
                if code == KafkaError.MSG_SIZE_TOO_LARGE and out is not None:
                    self._dead_letter_output(out, "output_too_large", f"{topic}: {err.args[0].str()}")
                    return
                raise

    def dead_letter(self, record: Record, reason: str, detail: str) -> Out:
        metrics.DEADLETTERS.labels(self.spec.name, reason).inc()
        letter = DeadLetter.of(stage=self.spec.name, reason=reason, detail=detail, topic=record.topic,
                               partition=record.partition, offset=record.offset, value=record.value,
                               key=record.key, time=time.time())
        return Out(self.settings.deadletter_topic, records.encode(letter), record.key)

    def _dead_letter_output(self, out: Out, reason: str, detail: str) -> None:
        """An output that cannot be produced: its input record is dead-lettered in its place
        (or, for an output no single record caused, the output itself)."""
        if out.topic == self.settings.deadletter_topic:      # a dead letter always fits; never loop
            log.error("%s: dead letter refused (%s); dropped", self.spec.name, detail)
            return
        source = out.source or Record(out.topic, -1, -1, out.key if isinstance(out.key, bytes) else
                                      (out.key or "").encode(), out.value, 0)
        letter = self.dead_letter(source, reason, detail)
        self._send(self.producer.produce, letter.topic, letter.value, letter.key, None, None, None)
        self._unacked[letter.topic] = self._unacked.get(letter.topic, 0) + 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every output is acknowledged (or refused: then dead-lettered). Without a
        timeout it waits as long as the broker is away; True when all is acknowledged."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waited_note = time.monotonic() + 10
        while True:
            remaining = self.producer.flush(1.0)
            if self._failed:
                failed, self._failed = self._failed, []
                for out, reason, detail in failed:
                    self._dead_letter_output(out, reason, detail)
                continue
            if remaining == 0:
                break
            if self._fatal:
                raise FatalStageError(self._fatal)
            if deadline is None and self.stop.is_set():
                deadline = time.monotonic() + 30     # stopping: wait a while, then replay instead
            if deadline is not None and time.monotonic() > deadline:
                return False
            if time.monotonic() > waited_note:
                log.warning("%s: %d outputs wait for the broker at %s", self.spec.name, remaining,
                            self.settings.bootstrap())
                waited_note = time.monotonic() + 30
        for topic, n in self._unacked.items():          # all acknowledged now
            counter = self._records_out.get(topic)
            if counter is None:
                counter = self._records_out[topic] = metrics.RECORDS_OUT.labels(self.spec.name, topic)
            counter.inc(n)
        self._unacked.clear()
        return True

    def checkpoint(self, final: bool = False, flush_timeout: float | None = None) -> None:
        """Changelog records of what changed -> every output acknowledged -> commit offsets."""
        core, store = self.spec.core, self.store
        ck = None
        if store is not None:
            ck = store.clock.next()
            changes = core.changes()
            written = 0
            for tp, entries in changes.items():
                if tp in self._assigned and entries:
                    written += store.write(self._changelog_send, tp, entries, ck)
            if written:
                metrics.CHANGELOG_RECORDS.labels(self.spec.name).inc(written)
        if not self.flush(flush_timeout):
            log.warning("%s: outputs not acknowledged within %.0f s; not committing", self.spec.name, flush_timeout)
            return
        self._produced = False
        offsets = []
        for tp, processed in self._processed.items():
            if tp not in self._assigned:
                continue
            offset = core.commit_offset(tp, processed) if store is not None else processed
            meta = f"ck={ck}" if ck is not None else None
            offsets.append(TopicPartition(tp[0], tp[1], offset, metadata=meta) if meta else
                           TopicPartition(tp[0], tp[1], offset))
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            metrics.COMMITS.labels(self.spec.name).inc()
        except KafkaException as err:
            # A rebalance or an absent coordinator: the next commit (or the partition's next
            # owner, which skips this checkpoint's changelog records) takes it from here.
            log.warning("%s: commit failed (%s); will retry", self.spec.name, err.args[0].str())
            return
        if store is not None:
            for tp in list(self._processed):
                if tp in self._assigned and (final or store.cache_due(tp)):
                    store.save_cache(tp, core.entries(tp), ck)

    def _changelog_send(self, topic, value, key, partition, headers) -> None:
        self._send(self.producer.produce, topic, value, key, partition, headers, None)
        self._unacked[topic] = self._unacked.get(topic, 0) + 1

    # -- loop ---------------------------------------------------------------------------------
    def process(self, batch: list[Record]) -> list[Out | Reject]:
        """The core's outputs for a batch; a core that raises gets the records one at a time,
        and the one it raises on is dead-lettered (the others are processed as usual)."""
        core = self.spec.core
        try:
            return core.process(batch)
        except Exception:
            if len(batch) == 1:
                raise
            log.exception("%s: batch of %d failed; retrying record by record", self.spec.name, len(batch))
        outs: list[Out | Reject] = []
        for rec in batch:
            try:
                outs.extend(core.process([rec]))
            except Exception as err:   # a bug must not stop the stream: keep the record
                log.exception("%s: failed on %s[%d]@%d", self.spec.name, rec.topic, rec.partition, rec.offset)
                outs.append(Reject(rec, "stage_error", f"{type(err).__name__}: {err}"))
        return outs

    def run(self, exit_when_idle: float | None = None) -> None:
        spec = self.spec
        tune_gc()
        if spec.broadcast_topics:
            spec.core.output_partitions({t: topic_partition_count(self.settings, t) for t in spec.broadcast_topics})
        metrics.STAGE_INFO.labels(spec.name).set(1)
        # Subscribed only once the core is ready: a member that joins the group but cannot judge
        # yet (no model) would hold partitions a ready replica could take, and a group join first
        # served by close() fails there ("Failed to get committed offsets").
        subscribed = False
        last_commit = last_lag = time.monotonic()
        records_in: dict[str, object] = {}       # topic -> metric child
        ready = getattr(spec.core, "ready", None)
        hold_idle = getattr(spec.core, "hold_idle", None)
        try:
            while not self.stop.is_set():
                if ready is not None and not ready():
                    # e.g. detect without a model: leave the input in Kafka until it can be judged
                    self.produce(spec.core.tick(time.time()))
                    if exit_when_idle and time.monotonic() - self.last_input >= exit_when_idle:
                        # a stage that has nothing to judge with is idle too (`run all
                        # --exit-when-idle` without a trace or chunk model must still end)
                        log.info("%s: no model and idle for %.1f s, stopping", spec.name, exit_when_idle)
                        break
                    self.stop.wait(0.5)
                    continue
                if not subscribed:
                    self.consumer.subscribe(subscription(spec.topics), on_assign=self._on_assign,
                                            on_revoke=self._on_revoke, on_lost=self._on_lost)
                    subscribed = True
                msgs = self.next_batch(spec.batch_size, 0.2)
                started = time.perf_counter()
                batch: list[Record] = []
                batch_in: dict[str, int] = {}        # topic -> records (one Counter.inc per batch)
                processed = self._processed
                for msg in msgs:
                    if msg.error():
                        if msg.error().code() == KafkaError._PARTITION_EOF:
                            if self._at_end is not None:
                                self._at_end((msg.topic(), msg.partition()))
                        else:
                            log.debug("%s: consume error %s", spec.name, msg.error())
                        continue
                    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                    batch.append(Record(topic, partition, offset, msg.key(), msg.value(), msg.timestamp()[1]))
                    batch_in[topic] = batch_in.get(topic, 0) + 1
                    processed[(topic, partition)] = offset + 1
                if batch:
                    self._outage = False
                elif self._outage and hold_idle is not None:
                    # No input because there is no broker, not because the sources went quiet:
                    # the core's idle clock (which closes every open session) must not run.
                    hold_idle(time.time())
                outs = self.process(batch) if batch else []
                for topic, n in batch_in.items():
                    counter = records_in.get(topic)
                    if counter is None:
                        counter = records_in[topic] = metrics.RECORDS_IN.labels(spec.name, topic)
                    counter.inc(n)
                now = time.monotonic()
                if batch:
                    self.last_input = now
                    metrics.BATCH_SECONDS.labels(spec.name).observe(time.perf_counter() - started)
                outs.extend(spec.core.tick(time.time()))
                self.produce(outs)
                if now - last_commit >= spec.commit_interval_s and (processed or self._produced):
                    self.checkpoint()
                    last_commit = now
                if now - last_lag >= 5:
                    self._export_lag()
                    last_lag = now
                if exit_when_idle and now - self.last_input >= exit_when_idle and not outs:
                    log.info("%s: idle for %.1f s, stopping", spec.name, exit_when_idle)
                    break
            if self._fatal:
                raise FatalStageError(self._fatal)
            self.checkpoint(final=True, flush_timeout=30.0)
        finally:
            metrics.STAGE_INFO.labels(spec.name).set(0)
            close = getattr(spec.core, "close", None)
            if close:
                close()
            self.consumer.close()          # leaves the group now, so a restart rebalances fast
        if self._fatal:
            raise FatalStageError(self._fatal)

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


def json_out(topic: str, payload, key: str | None, source: Record | None = None) -> Out:
    return Out(topic, records.encode(payload), key, source)

