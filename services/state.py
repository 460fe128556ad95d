"""Partition state that follows its partition: a compacted changelog topic per stateful stage,
as Kafka Streams and Quix Streams keep it (../shared/notes/changelog-state.md), with the local
state directory only a cache.

A stateful core keeps, per input partition, a map of entries (bytes key -> bytes value). At every
checkpoint the shell asks it for what changed and writes one changelog record per changed key
(a tombstone for a deleted one) to the changelog partition that belongs to the input partition,
*before* it commits the input offsets, in this order (Kafka Streams' prepareCommit, Quix steps
2-4):

    produce outputs and changelog records -> flush, every one acknowledged -> commit the input
    offsets with the checkpoint's number as the commit metadata

Each changelog record carries that checkpoint number in a header (``ck``). Whichever replica is
assigned the partition next restores it by reading the changelog partition to its end and
applying only records of checkpoints whose offsets were committed (``ck`` <= the committed
metadata): a checkpoint written by a replica that died before its commit is skipped, and the
input after the committed offset is processed again on top of exactly the state that offset
belongs to. Nothing home-made coordinates replicas: Kafka's group protocol assigns partitions and
its log holds the state.

Topic: ``<group>-changelog`` (e.g. ``logwarden.sessions-changelog``), cleanup.policy=compact,
``min.compaction.lag.ms`` of several minutes (a skipped checkpoint's predecessor values must still
be there when a replica restores after a crash), small segments so compaction keeps restores
short. A single-topic stage gets a changelog with as many partitions as its input (partition p
-> changelog partition p); a stage reading many topics (parse) maps each input partition to a
changelog partition by hash, and every key carries its input partition, so a restore reads only
its own records.

The local cache (LOGWARDEN_STATE_DIR) holds, per input partition, a snapshot of the entries with
the changelog offset and checkpoint number it was taken at; a restore starts from it and reads
only the changelog written after it. A replica on another machine has no cache and reads the
whole (compacted) changelog partition: the same state either way.
"""
from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

CK_HEADER = "ck"
CACHE_FORMAT = 1
CHANGELOG_CONFIG = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": str(5 * 60 * 1000),
    "segment.ms": str(10 * 60 * 1000),
    "segment.bytes": str(64 * 1024 * 1024),
    "min.cleanable.dirty.ratio": "0.3",
}
TopicPartition_ = tuple[str, int]


def changelog_topic(group: str) -> str:
    return f"{group}-changelog"


def key_prefix(tp: TopicPartition_) -> bytes:
    """Every changelog key starts with its input partition: a shared changelog partition (parse)
    then restores only its own records, and compaction never merges two partitions' keys."""
    return f"{tp[0]}\x00{tp[1]}\x00".encode("utf-8", "surrogatepass")


def changelog_partition(tp: TopicPartition_, partitions: int, co_partitioned: bool) -> int:
    if co_partitioned:
        return tp[1]
    return zlib.crc32(key_prefix(tp)) % partitions


def encode_ck(ck: int) -> bytes:
    return struct.pack(">Q", ck)


def decode_ck(raw: bytes | None) -> int | None:
    if raw is None or len(raw) != 8:
        return None
    return struct.unpack(">Q", raw)[0]


class CheckpointClock:
    """Checkpoint numbers that only grow, across replicas and restarts: nanoseconds of wall time,
    bumped past the last one handed out and past any number seen in a restored changelog."""

    def __init__(self):
        self.last = 0

    def see(self, ck: int) -> None:
        self.last = max(self.last, ck)

    def next(self) -> int:
        self.last = max(time.time_ns(), self.last + 1)
        return self.last


# --------------------------------------------------------------------------------------------
# restore
def restore_partition(consumer_factory, topic: str, partition: int, prefix: bytes, committed_ck: int | None,
                      start_offset: int | None, entries: dict[bytes, bytes], clock: CheckpointClock,
                      timeout_s: float = 120.0) -> tuple[int, int]:
    """Apply to ``entries`` the changelog records of ``topic[partition]`` from ``start_offset``
    (None: the beginning) to the end whose key starts with ``prefix`` and whose checkpoint was
    committed (``ck`` <= ``committed_ck``; nothing when no offset was ever committed).
    Returns (records applied, records skipped as uncommitted)."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

    consumer = consumer_factory()
    applied = skipped = 0
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
        begin = low if start_offset is None else max(low, start_offset)
        if high <= begin:
            return 0, 0
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING if start_offset is None else begin)])
        deadline = time.monotonic() + timeout_s
        n = len(prefix)
        while True:
            for msg in consumer.consume(10_000, timeout=0.5):
                if msg.error():
                    continue
                key = msg.key()
                if key is None or not key.startswith(prefix):
                    continue
                ck = None
                for name, value in msg.headers() or ():
                    if name == CK_HEADER:
                        ck = decode_ck(value)
                if ck is not None:
                    clock.see(ck)
                if committed_ck is None or ck is None or ck > committed_ck:
                    skipped += 1
                    continue
                value = msg.value()
                if value is None:
                    entries.pop(key[n:], None)
                else:
                    entries[key[n:]] = value
                applied += 1
            position = consumer.position([TopicPartition(topic, partition)])[0].offset
            # By position, not by the last record seen: compaction leaves gaps.
            if position >= high:
                return applied, skipped
            if time.monotonic() > deadline:
                raise KafkaException(f"restoring {topic}[{partition}] did not reach offset {high} in {timeout_s:.0f} s")
    finally:
        consumer.close()


# --------------------------------------------------------------------------------------------
# local cache
class LocalCache:
    """Per input partition: the entries at a checkpoint, with that checkpoint's number and the
    changelog offset after it (msgpack, written atomically)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _path(self, tp: TopicPartition_) -> Path:
        return self.directory / f"{tp[0]}-{tp[1]}.state"

    def save(self, tp: TopicPartition_, entries: dict[bytes, bytes], ck: int, changelog_offset: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = msgspec.msgpack.encode({"format": CACHE_FORMAT, "ck": ck, "offset": changelog_offset,
                                       "entries": entries})
        path = self._path(tp)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load(self, tp: TopicPartition_) -> tuple[dict[bytes, bytes], int, int] | None:
        """(entries, ck, changelog offset), or None without a usable cache (a damaged one is
        ignored: the changelog alone restores the state)."""
        try:
            doc = msgspec.msgpack.decode(self._path(tp).read_bytes())
            if doc.get("format") != CACHE_FORMAT:
                return None
            return dict(doc["entries"]), int(doc["ck"]), int(doc["offset"])
        except FileNotFoundError:
            return None
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            log.warning("ignoring the damaged state cache %s (%s)", self._path(tp), err)
            return None

    def drop(self, tp: TopicPartition_) -> None:
        self._path(tp).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
class StateStore:
    """The changelog topic and local cache of one stateful stage (used by services.shell)."""

    CACHE_EVERY_S = 60.0

    def __init__(self, group: str, cache_dir: Path, changelog_partitions: int, co_partitioned: bool,
                 consumer_factory):
        self.topic = changelog_topic(group)
        self.partitions = changelog_partitions
        self.co_partitioned = co_partitioned
        self.cache = LocalCache(cache_dir)
        self.consumer_factory = consumer_factory
        self.clock = CheckpointClock()
        self._cached_at: dict[TopicPartition_, float] = {}

    def partition_of(self, tp: TopicPartition_) -> int:
        return changelog_partition(tp, self.partitions, self.co_partitioned)

    def restore(self, tp: TopicPartition_, committed_ck: int | None) -> tuple[dict[bytes, bytes], dict]:
        """The entries of ``tp`` as of its last committed checkpoint, and what it took."""
        from confluent_kafka import TopicPartition

        started = time.perf_counter()
        partition = self.partition_of(tp)
        entries: dict[bytes, bytes] = {}
        start = None
        cached = self.cache.load(tp) if committed_ck is not None else None
        if cached is not None:
            probe = self.consumer_factory()
            try:
                low, high = probe.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=30)
            finally:
                probe.close()
            cache_entries, cache_ck, cache_offset = cached
            # A cache from another changelog (the topic was recreated) or of a checkpoint that was
            # never committed is not this partition's state.
            if cache_ck <= committed_ck and low <= cache_offset <= high:
                entries, start = cache_entries, cache_offset
                self.clock.see(cache_ck)
        applied, skipped = (0, 0) if committed_ck is None else restore_partition(
            self.consumer_factory, self.topic, partition, key_prefix(tp), committed_ck, start, entries, self.clock)
        info = {"entries": len(entries), "from_cache": start is not None, "applied": applied,
                "skipped_uncommitted": skipped, "seconds": round(time.perf_counter() - started, 3)}
        self._cached_at[tp] = time.monotonic()
        return entries, info

    def write(self, produce, tp: TopicPartition_, changes: dict[bytes, bytes | None], ck: int) -> int:
        """Produce one changelog record per changed key (``produce(topic, value, key, partition,
        headers)``); returns how many."""
        prefix, partition, headers = key_prefix(tp), self.partition_of(tp), [(CK_HEADER, encode_ck(ck))]
        for key, value in changes.items():
            produce(self.topic, value, prefix + key, partition, headers)
        return len(changes)

    def cache_due(self, tp: TopicPartition_) -> bool:
        return time.monotonic() - self._cached_at.get(tp, 0.0) >= self.CACHE_EVERY_S

    def save_cache(self, tp: TopicPartition_, entries: dict[bytes, bytes], ck: int) -> None:
        """Called after a commit, when every changelog record so far is acknowledged: the
        partition's end is then where this snapshot's changelog ends."""
        from confluent_kafka import TopicPartition

        probe = self.consumer_factory()
        try:
            _, high = probe.get_watermark_offsets(TopicPartition(self.topic, self.partition_of(tp)), timeout=30)
        finally:
            probe.close()
        self.cache.save(tp, entries, ck, high)
        self._cached_at[tp] = time.monotonic()
