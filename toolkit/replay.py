"""`logwarden replay FILE... --host NAME`: produce log files to ``logs.<host>`` exactly as
Filebeat 8.x's filestream input + Kafka output (codec.json) would, one record per line.
(`logwarden replay --traces ... [--metrics DIR] [--logs ...]` is the other replay: TrainTicket's
CSVs as an OpenTelemetry Collector writes them to Kafka, toolkit/otlp_replay.py.)

It is how users backfill history and how the demo, tests and benchmarks feed the pipeline, so
the per-line path is kept minimal: the JSON document is assembled from pre-encoded pieces around
the two per-line values (offset, message) instead of building dicts or pydantic models.

What Filebeat writes, and what this module copies (beats: libbeat/outputs/codec/json,
libbeat/reader/readfile/metafields.go, filebeat/input/filestream/input.go):
  * ``@timestamp``: the time the line was read, UTC, millisecond precision, ``...SSSZ``;
  * ``@metadata``: ``{"beat": "filebeat", "type": "_doc", "version": <beat version>}``;
  * ``log.offset``: byte offset of the line's first byte in the file; ``log.file.path`` (absolute),
    ``log.file.device_id`` and ``log.file.inode`` (decimal strings, filestream on Linux), and
    ``log.file.fingerprint`` (with filebeat.yml's fingerprint file identity; files shorter than
    1024 bytes have none, where Filebeat would not read them yet);
  * ``message``: the line without its terminator (``\\n`` or ``\\r\\n``); empty lines are not sent
    (their bytes still count for the offsets of later lines);
  * ``input.type: filestream``, ``ecs.version: 8.0.0``, ``host.name``, and ``agent``
    {ephemeral_id, id, name, type: filebeat, version} as the publisher pipeline adds them;
  * JSON as go-structform writes it with codec.json's defaults (escape_html: false): UTF-8
    unescaped, U+2028/U+2029 and control characters other than \\n \\r \\t as ``\\u00XX``,
    invalid UTF-8 as U+FFFD.

Kafka key: the file path. Filebeat's default is no key (random partition); we set the key so
every line of one file lands in one partition, in file order, which the window stage relies on
for events within the same second. A Filebeat deployment gets the same with
``output.kafka.key: '%{[log.file.path]}'``.

One deliberate difference: a last line with no newline is sent at the end of a non-follow
replay (Filebeat would wait for its newline forever); with ``--follow`` it waits, like Filebeat.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from json.encoder import encode_basestring as _json_string   # the C encoder, ensure_ascii=False
from pathlib import Path

from services.settings import Settings, UsageError, load_settings

log = logging.getLogger(__name__)

FILEBEAT_VERSION = "8.19.5"          # the image docker-compose.yml runs (.env FILEBEAT_IMAGE)
ECS_VERSION = "8.0.0"
# filebeat/filebeat.yml identifies files by a fingerprint: sha256 of the first 1024 bytes
# (prospector.scanner.fingerprint), which filestream then writes as log.file.fingerprint.
FINGERPRINT_BYTES = 1024
READ_CHUNK_BYTES = 1 << 20          # lines are read (and timestamped) in ~1 MiB chunks
FOLLOW_POLL_S = 0.25                # how often --follow looks for appended lines
# Where Python's JSON string encoder and Beats' (go-structform) write different bytes: Go writes
# \b and \f as \u0008 and \u000c and escapes the JavaScript line separators U+2028/U+2029.
_PYTHON_DIFFERS = re.compile("[\x08\x0c\u2028\u2029]")
_GO_STRING_ESCAPES = {c: f"\\u{c:04x}" for c in range(0x20)} | {
    ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
    0x2028: "\\u2028", 0x2029: "\\u2029"}
# A machine-wide namespace for agent ids: one host name gives the same agent.id in every run, as
# a real Filebeat keeps its id in data/meta.json across restarts.
_AGENT_NAMESPACE = uuid.UUID("6f3c1d52-8a7e-4c1f-9b43-2f0b6a5d9e11")


def logs_topic(host: str) -> str:
    return f"logs.{host}"


def json_string(text: str) -> str:
    """``text`` as a JSON string literal, byte for byte as Filebeat's encoder writes it."""
    if _PYTHON_DIFFERS.search(text):
        return '"' + text.translate(_GO_STRING_ESCAPES) + '"'
    return _json_string(text)


def _python_may_differ(data: bytes) -> bool:
    """Could a line in ``data`` hold a character json_string writes unlike Python's encoder?
    Most chunks cannot, and then the per-line check is skipped. (Byte searches, not a regex:
    an alternation regex scans a MiB in ~25 ms, these in well under 1 ms.)"""
    return b"\x08" in data or b"\x0c" in data or b"\xe2\x80" in data   # \b, \f, U+2028/U+2029


def filebeat_timestamp(epoch_s: float) -> str:
    """``2024-05-01T12:00:00.123Z`` (UTC, milliseconds), Filebeat's ``@timestamp`` format."""
    moment = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Agent:
    """The Filebeat instance a replay pretends to be (one per host and process)."""
    host: str
    version: str = FILEBEAT_VERSION
    id: str = ""
    ephemeral_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self):
        if not self.id:
            object.__setattr__(self, "id", str(uuid.uuid5(_AGENT_NAMESPACE, self.host)))


class LineEncoder:
    """Builds the Filebeat JSON document of one file's lines from pre-encoded pieces."""

    def __init__(self, agent: Agent, path: Path, device_id: int, inode: int, fingerprint: str | None = None):
        meta = json.dumps({"beat": "filebeat", "type": "_doc", "version": agent.version},
                          separators=(",", ":"))
        self._after_timestamp = f'","@metadata":{meta},"log":{{"offset":'
        fingerprint_field = f',"fingerprint":"{fingerprint}"' if fingerprint else ""
        self._after_offset = (f',"file":{{"path":{json_string(str(path))},"device_id":"{device_id}",'
                              f'"inode":"{inode}"{fingerprint_field}}}}},"message":')
        agent_doc = json.dumps({"ephemeral_id": agent.ephemeral_id, "id": agent.id, "name": agent.host,
                                "type": "filebeat", "version": agent.version}, separators=(",", ":"))
        self._after_message = (f',"input":{{"type":"filestream"}},"ecs":{{"version":"{ECS_VERSION}"}},'
                               f'"host":{{"name":{json_string(agent.host)}}},"agent":{agent_doc}}}')
        self.head = ""
        self.stamp(time.time())

    def stamp(self, epoch_s: float) -> None:
        """Set the read time of the lines encoded next."""
        self.head = '{"@timestamp":"' + filebeat_timestamp(epoch_s) + self._after_timestamp

    def encode(self, offset: int, message: str) -> str:
        return f"{self.head}{offset}{self._after_offset}{json_string(message)}{self._after_message}"

    def pieces(self) -> tuple[str, str, str]:
        """(head, after offset, after message): a document is head + offset + after offset +
        JSON string of the message + after message. For loops that inline ``encode``."""
        return self.head, self._after_offset, self._after_message


def file_fingerprint(handle) -> str | None:
    """Filebeat's fingerprint of an open file: sha256 hex of its first 1024 bytes, None when the
    file is shorter. Leaves the read position where it was."""
    data = os.pread(handle.fileno(), FINGERPRINT_BYTES, 0)
    return hashlib.sha256(data).hexdigest() if len(data) == FINGERPRINT_BYTES else None


def open_encoder(handle, agent: Agent, path: Path) -> LineEncoder:
    info = os.fstat(handle.fileno())
    return LineEncoder(agent, path, info.st_dev, info.st_ino, file_fingerprint(handle))


def split_lines(chunk: bytes, start_offset: int) -> tuple[list[tuple[int, str]], int]:
    """Complete lines of ``chunk`` (read at file offset ``start_offset``) as (offset, text) with
    the terminator (``\\n`` or ``\\r\\n``) stripped and empty lines dropped, plus the number of
    bytes consumed: an unterminated rest is left for the next read. Only ``\\n`` ends a line (a
    lone ``\\r`` stays in the text, as in Filebeat)."""
    end = chunk.rfind(b"\n") + 1
    lines: list[tuple[int, str]] = []
    offset = start_offset
    body = chunk[:end]
    if body.isascii():                          # the common case: characters are bytes
        for text in body.decode("ascii").split("\n")[:-1]:
            size = len(text) + 1
            if text and text[-1] == "\r":
                text = text[:-1]
            if text:
                lines.append((offset, text))
            offset += size
    else:
        for raw in body.split(b"\n")[:-1]:
            size = len(raw) + 1
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if raw:
                lines.append((offset, raw.decode("utf-8", "replace")))
            offset += size
    return lines, end


class Throttle:
    """Keeps a producer at ``rate`` lines per second on average (None: no limit)."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.started = time.monotonic()
        self.sent = 0

    def wait(self, lines: int) -> None:
        if not self.rate:
            return
        self.sent += lines
        ahead = self.started + self.sent / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def _produce(producer, topic: str, value: str, key: bytes | None) -> None:
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:                    # local queue full: let librdkafka send some
            producer.poll(0.05)


def replay_lines(producer, topic: str, host: str, path: Path | str, *, rate: float | None = None,
                 follow: bool = False, stop: threading.Event | None = None, progress=None,
                 agent: Agent | None = None, key_by_path: bool = True,
                 throttle: Throttle | None = None) -> int:
    """Produce every line of ``path`` to ``topic`` as Filebeat would; returns the number of
    records produced (not yet acknowledged: the caller flushes). With ``follow`` it keeps
    reading appended lines (reopening a rotated file, restarting a truncated one) until ``stop``
    is set. ``progress`` is a tqdm-like object updated with bytes read."""
    path = Path(os.path.abspath(path))         # absolute and normalised, symlinks kept: a glob match
    agent = agent or Agent(host)
    throttle = throttle or Throttle(rate)
    stop = stop or threading.Event()
    key = str(path).encode() if key_by_path else None
    produced = 0
    handle = open(path, "rb")
    try:
        encoder = open_encoder(handle, agent, path)
        position = 0                            # file offset of the first unconsumed byte
        pending = b""                           # an unterminated line read so far
        while not stop.is_set():
            chunk = handle.read(READ_CHUNK_BYTES)
            if chunk:
                data = pending + chunk
                encoder.stamp(time.time())
                lines, consumed = split_lines(data, position)
                quote = json_string if _python_may_differ(data) else _json_string
                pending = data[consumed:]
                position += consumed
                if progress is not None:
                    progress.update(len(chunk))
                head, after_offset, after_message = encoder.pieces()
                if throttle.rate:
                    for offset, message in lines:
                        value = f"{head}{offset}{after_offset}{quote(message)}{after_message}"
                        _produce(producer, topic, value, key)
                        produced += 1
                        throttle.wait(1)
                        if stop.is_set():
                            break
                else:
                    produce = producer.produce
                    for offset, message in lines:
                        value = f"{head}{offset}{after_offset}{quote(message)}{after_message}"
                        try:
                            produce(topic, value, key)
                        except BufferError:     # local queue full: wait for librdkafka to send
                            _produce(producer, topic, value, key)
                    produced += len(lines)
                producer.poll(0)                # serve delivery (error) callbacks
                continue
            # End of file.
            if not follow:
                if pending.strip(b"\r\n"):
                    text = pending.rstrip(b"\r").decode("utf-8", "replace")
                    _produce(producer, topic, encoder.encode(position, text), key)
                    produced += 1
                break
            reopened = _reopen_if_rotated_or_truncated(handle, path)
            if reopened is not None:
                handle.close()
                handle, position, pending = reopened, 0, b""
                encoder = open_encoder(handle, agent, path)
                continue
            producer.poll(0)
            stop.wait(FOLLOW_POLL_S)
    finally:
        handle.close()
    return produced


def _reopen_if_rotated_or_truncated(handle, path: Path):
    """At the end of ``handle``: the file now at ``path`` when reading should go on there, as
    Filebeat's does: a truncated file is read again from offset 0; after a rotation (another
    file at ``path``) the renamed old file is finished first, then the new one is read."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return None                             # rotated away, the new file not there yet
    opened = os.fstat(handle.fileno())
    if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
        return open(path, "rb") if current.st_size < handle.tell() else None
    if opened.st_size > handle.tell():
        return None                             # lines were appended to the old file: read them
    return open(path, "rb")


# --------------------------------------------------------------------------------------------
# Kafka side
class _AsDebug(logging.Filter):
    """librdkafka logs every retry (a broker still loading its coordinators after `make
    kafka-up`, a refused connection); what fails for good reaches us as an exception or a failed
    delivery, and the CLI says it in one line. Its own messages are for `logwarden -v`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_rdkafka_log = logging.getLogger("toolkit.replay.rdkafka")
_rdkafka_log.addFilter(_AsDebug())


def make_producer(settings: Settings, **overrides):
    """The replay producer: idempotent (acks=all), lz4, large batches, only errors reported."""
    from confluent_kafka import Producer

    from services.shell import producer_config
    conf = producer_config(settings, **{
        "linger.ms": 50,
        "batch.num.messages": 100_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "delivery.report.only.error": True,   # a callback per line would cost more than the line
        "logger": _rdkafka_log,               # librdkafka's own messages through logging
    } | overrides)
    failures: list[str] = []

    def on_delivery(err, msg):
        if err is not None:
            failures.append(f"{msg.topic()}: {err}")

    return _ReplayProducer(Producer(conf | {"on_delivery": on_delivery}), failures)


class DeliveryFailed(RuntimeError):
    """Records were produced but not acknowledged by Kafka."""


class _ReplayProducer:
    """A Producer plus the delivery failures its callback collected."""

    def __init__(self, producer, failures: list[str]):
        self._producer = producer
        self.failures = failures
        self.produce = producer.produce
        self.poll = producer.poll

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every record is acknowledged; raise if any was not."""
        remaining = self._producer.flush(timeout)
        if remaining:
            raise DeliveryFailed(f"{remaining} records not acknowledged within {timeout:.0f} s")
        if self.failures:
            raise DeliveryFailed(f"{len(self.failures)} records not delivered, first: {self.failures[0]}")


def ensure_topic(settings: Settings, topic: str) -> None:
    """Create ``topic`` with settings.topic_partitions if missing (clusters may not auto-create)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(settings.kafka_config() | {"logger": _rdkafka_log})
    if topic in admin.list_topics(timeout=10).topics:
        return
    created = admin.create_topics([NewTopic(topic, num_partitions=settings.topic_partitions,
                                            replication_factor=settings.replication_factor)])
    try:
        created[topic].result(30)
    except KafkaException as err:
        if "TOPIC_ALREADY_EXISTS" not in str(err):
            raise


def _check_files(paths) -> list[Path]:
    checked = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise UsageError(f"no such file: {name}")
        if not path.is_file():
            raise UsageError(f"not a regular file: {name}")
        if not os.access(path, os.R_OK):
            raise UsageError(f"cannot read {name}: permission denied")
        checked.append(path)
    return checked


def _progress_bar(paths: list[Path], host: str, follow: bool, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    total = None if follow else sum(p.stat().st_size for p in paths)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=logs_topic(host),
                file=sys.stderr, mininterval=0.5)


def replay_files(settings: Settings, paths, host: str, *, rate: float | None = None,
                 follow: bool = False, stop: threading.Event | None = None,
                 progress: bool = False) -> int:
    """Replay ``paths`` (in order; with ``follow``, all of them concurrently) to logs.<host>;
    returns the number of records produced and acknowledged."""
    paths = _check_files(paths)
    if not host or not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise UsageError(f"--host {host!r}: a Kafka topic name needs letters, digits, '.', '_' or '-'")
    topic = logs_topic(host)
    ensure_topic(settings, topic)
    producer = make_producer(settings)
    agent = Agent(host)
    throttle = Throttle(rate)
    stop = stop or threading.Event()
    bar = _progress_bar(paths, host, follow, progress)
    counts = [0] * len(paths)
    try:
        if follow:
            def tail(index: int, path: Path) -> None:
                counts[index] = replay_lines(producer, topic, host, path, follow=True, stop=stop,
                                             progress=bar, agent=agent, throttle=throttle)
            threads = [threading.Thread(target=tail, args=(i, p), daemon=True) for i, p in enumerate(paths)]
            for thread in threads:
                thread.start()
            try:
                while any(t.is_alive() for t in threads):
                    for thread in threads:
                        thread.join(0.2)
            except KeyboardInterrupt:   # Ctrl-C ends a follow: deliver what was read, then stop
                stop.set()
                for thread in threads:
                    thread.join()
        else:
            for index, path in enumerate(paths):
                counts[index] = replay_lines(producer, topic, host, path, stop=stop, progress=bar,
                                             agent=agent, throttle=throttle)
        producer.flush()
    finally:
        if bar is not None:
            bar.close()
    return sum(counts)


def replay_file(settings: Settings, path, host: str, **options) -> int:
    """One file; see replay_files."""
    return replay_files(settings, [path], host, **options)


def main(args) -> int:
    """`logwarden replay FILE... --host NAME [--rate R] [--follow] [--no-progress]`, or the OTLP
    replay of TrainTicket CSVs (toolkit.otlp_replay): `--traces ... [--metrics DIR] [--logs ...]
    [--speed S | --fast]`."""
    from confluent_kafka import KafkaException
    otlp = bool(getattr(args, "traces", None) or getattr(args, "metrics", None) or getattr(args, "logs", None))
    if otlp:
        return _main_otlp(args)
    if getattr(args, "speed", None) or getattr(args, "fast", False) or getattr(args, "by_trace_id", False):
        raise UsageError("--speed, --fast and --by-trace-id go with --traces, --metrics or --logs")
    if not args.files:
        raise UsageError("replay: give log FILEs with --host NAME, or --traces/--metrics/--logs")
    if not args.host:
        raise UsageError("replay: log FILEs need --host NAME (records go to logs.<host>)")
    settings = load_settings()
    started = time.monotonic()
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        count = replay_files(settings, args.files, args.host, rate=args.rate, follow=args.follow,
                             progress=progress)
    except KafkaException as err:
        raise UsageError(f"Kafka at {settings.bootstrap()}: {err.args[0].str()}") from None
    except DeliveryFailed as err:
        raise UsageError(f"Kafka at {settings.bootstrap()}: {err}") from None
    elapsed = time.monotonic() - started
    print(f"replay: {count} records to {logs_topic(args.host)} in {elapsed:.1f} s "
          f"({count / elapsed if elapsed else 0:,.0f} lines/s)", file=sys.stderr)
    return 0


def deal_lines(src: Path | str, hosts: list[str], out_dir: Path | str) -> dict[str, Path]:
    """Deal the lines of one log over hosts, one file per host, as if each host had written its
    share: every writer (the thread id, HDFS_v1's third field) lives on one host, so a writer's
    lines stay in its order and an HDFS block's lines come from several hosts. Dealing line by
    line instead (line i -> host i % n) would hand one thread's consecutive lines to different
    hosts; with HDFS_v1's one-second clock their order is then lost across hosts, which no real
    cluster does (DeepLog on HDFS_5k: 1 false alarm dealt by writer, 14 dealt line by line).
    Lines without a third field are dealt round robin. Bytes are copied as they are (CRLF stays
    CRLF). Used by the demo, the benchmarks and the tests."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {h: out_dir / f"{h}.log" for h in hosts}
    files = {h: open(p, "wb") for h, p in paths.items()}
    try:
        with open(src, "rb") as fh:
            for i, line in enumerate(fh):
                fields = line.split(None, 3)
                slot = zlib.crc32(fields[2]) if len(fields) > 3 else i
                files[hosts[slot % len(hosts)]].write(line)
    finally:
        for f in files.values():
            f.close()
    return paths


def replay_hosts(settings: Settings, files: dict[str, Path], rate: float | None = None) -> int:
    """Replay one file per host with every host shipping at once (at ``rate`` lines/s each), as
    Filebeat on live hosts does: a block's lines then arrive roughly in event-time order.
    Returns the records acknowledged in all."""
    counts: list[int] = []
    errors: list[BaseException] = []

    def ship(host: str, path: Path) -> None:
        try:
            counts.append(replay_files(settings, [path], host, rate=rate))
        except BaseException as err:   # surfaced below, in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=ship, args=(h, p)) for h, p in files.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts)


def _main_otlp(args) -> int:
    from confluent_kafka import KafkaException

    from toolkit.otlp_replay import replay_otlp
    if args.files or args.host:
        raise UsageError("replay: log FILEs/--host (Filebeat) and --traces/--metrics/--logs (OTLP) are separate replays")
    if args.rate or args.follow:
        raise UsageError("--rate and --follow are for log FILEs; the OTLP replay paces by --speed or --fast")
    settings = load_settings()
    started = time.monotonic()
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        counts = replay_otlp(settings, args.traces or (), args.metrics, args.logs or (),
                             speed=None if args.fast else (args.speed or 1.0), encoding=args.encoding,
                             by_trace_id=args.by_trace_id, progress=progress)
    except KafkaException as err:
        raise UsageError(f"Kafka at {settings.bootstrap()}: {err.args[0].str()}") from None
    except DeliveryFailed as err:
        raise UsageError(f"Kafka at {settings.bootstrap()}: {err}") from None
    elapsed = time.monotonic() - started
    m = counts.messages
    print(f"replay: {counts.spans} spans, {counts.metric_points} metric points ({counts.metric_rows} rows), "
          f"{counts.logs} log records in {m['spans'] + m['metrics'] + m['logs']} OTLP records "
          f"({args.encoding}) in {elapsed:.1f} s"
          + (f"; {counts.bad_time_logs} log records without a valid time left out" if counts.bad_time_logs else ""),
          file=sys.stderr)
    return 0
