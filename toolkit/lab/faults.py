"""Faults on a schedule: each a real action on the running cluster, each written to a labels file
in TrainTicket's fault_list.json layout (models.faults.write_faults: inject_time, inject_pod =
the target host, inject_type = the kind, plus end_time and duration_s), so the same evaluation
code reads lab and TrainTicket labels.

    kill_datanode         kill -9 the DataNode's JVM; restart it at the end (the NameNode declares
                          it dead after ~58 s with the lab's heartbeat settings)
    slow_datanode         SIGSTOP/SIGCONT bursts on the DataNode (3 s stopped, 2 s running): its
                          pipelines, heartbeats and reads stall
    corrupt_replica       overwrite bytes in the middle of one block file of a file on the
                          DataNode's disk (same length, so only checksums tell), then a client
                          reads that file a few times, as a reader would hit it
    delete_replica        delete one block file (and its .meta) of a file from the DataNode's disk;
                          the DataNode's directory scanner (every 30 s) finds it missing
    fail_volume           replace the DataNode's second data directory by a plain file (the disk
                          is gone); at the end put it back and restart the DataNode, which is how
                          an operator returns a replaced disk to service
    fill_volume           fill each data directory of the DataNode with a file in its block pool
                          (allocated, not sparse) until 64 KiB are left, less than a block: its
                          next du (every 10 s) counts it as used, the NameNode stops placing
                          replicas there and writes run short of replicas; deleted at the end.
                          Each data directory is a disk of toolkit.lab.cluster.VOLUME_BYTES to
                          its DataNode (dfs.datanode.du.reserved), so the shared disk is never
                          filled: the fault allocates at most that much per directory.
    cut_namenode_clients  drop the link between HDFS clients and the NameNode's client RPC port
                          (toolkit.lab.relay): open connections are reset, new ones refused; the
                          DataNodes' heartbeats (service RPC port) keep flowing. Target: nn1

A schedule (``parse_schedule``) is a small text spec, on the command line or in a file (one entry
per line, ``#`` comments):

    KIND@START+DURATION[:TARGET]      e.g. kill_datanode@60+75:dn1  (seconds from the start)
    random:N[:seed=S][:gap=G][:kinds=a+b]   N faults, kinds (every kind once per round, rounds
                                      shuffled) and targets drawn with the seed, each G seconds
                                      (default 45) after the previous one ends
    all[:gap=G]                       every kind once, in KINDS order, default durations
    none                              no faults

Entries may be joined with commas on one line (all of it is shell-safe without quotes). ``Injector`` runs a schedule against a cluster in
a thread and writes the labels file after every start and end, so an interrupted run keeps its
labels; ``abort()`` undoes whatever fault is active (a stopped JVM is continued, a cut link
restored, a failed volume put back and its DataNode restarted, a killed DataNode restarted).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from models.faults import Fault, write_faults
from services.settings import UsageError
from toolkit.lab import cluster as lab
from toolkit.lab.workload import WebHdfs, WebHdfsError
from toolkit.localkafka import _signal_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    name: str
    duration_s: float                 # default duration
    role: str                         # the target's role: "datanode" | "namenode"
    summary: str


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("kill_datanode", 60.0, "datanode", "kill -9 the DataNode, restart it at the end"),
    Kind("corrupt_replica", 30.0, "datanode", "overwrite bytes of a block replica on disk, then read its file"),
    Kind("delete_replica", 40.0, "datanode", "delete a block replica's files from disk"),
    Kind("fail_volume", 40.0, "datanode", "replace a data directory by a file; restore and restart at the end"),
    Kind("fill_volume", 40.0, "datanode", "fill every data directory of the DataNode to its last 64 KiB; free it at the end"),
    Kind("slow_datanode", 30.0, "datanode", "SIGSTOP/SIGCONT bursts (3 s stopped, 2 s running)"),
    Kind("cut_namenode_clients", 30.0, "namenode", "reset and refuse client connections to the NameNode's RPC port"),
)}
DEFAULT_GAP_S = 45.0
SLOW_STOPPED_S, SLOW_RUNNING_S = 3.0, 2.0
FILL_LEAVE_BYTES = 64 << 10           # left free by fill_volume: less than a block (1 MiB)
FILL_NAME = "lab-fill"                # fill_volume's file, in the block pool's directory: its du counts it
CORRUPT_READS = 4


@dataclass(frozen=True)
class PlannedFault:
    kind: str
    at_s: float                       # seconds after the schedule starts
    duration_s: float
    target: str | None = None         # None: drawn with the schedule's seed

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    def spec(self) -> str:
        target = f":{self.target}" if self.target else ""
        return f"{self.kind}@{self.at_s:g}+{self.duration_s:g}{target}"


# --------------------------------------------------------------------------------------------
# Schedules
def _number(text: str, what: str, entry: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"fault schedule entry {entry!r}: {what} {text!r} is not a number of seconds") from None
    if value < 0 or value != value:
        raise UsageError(f"fault schedule entry {entry!r}: {what} must be >= 0")
    return value


def _explicit(entry: str) -> PlannedFault:
    kind, at, rest = entry.partition("@")
    if not at or kind not in KINDS:
        known = ", ".join(KINDS)
        raise UsageError(f"fault schedule entry {entry!r}: expected KIND@START+DURATION[:TARGET] with KIND one of {known}")
    timing, _, target = rest.partition(":")
    start, plus, duration = timing.partition("+")
    duration_s = _number(duration, "duration", entry) if plus else KINDS[kind].duration_s
    if duration_s <= 0:
        raise UsageError(f"fault schedule entry {entry!r}: duration must be > 0")
    return PlannedFault(kind, _number(start, "start", entry), duration_s, target or None)


def _options(entry: str, parts: list[str], allowed: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise UsageError(f"fault schedule entry {entry!r}: unknown option {part!r} (known: {', '.join(allowed)})")
        options[key] = value
    return options


def _sequence(kinds: list[str], gap: float) -> list[PlannedFault]:
    out, at = [], gap
    for kind in kinds:
        out.append(PlannedFault(kind, at, KINDS[kind].duration_s))
        at += KINDS[kind].duration_s + gap
    return out


def _generated(entry: str, seed: int) -> list[PlannedFault]:
    head, *parts = [p.strip() for p in entry.split(":")]
    if head == "none":
        if parts:
            raise UsageError(f"fault schedule entry {entry!r}: none takes no options")
        return []
    if head == "all":
        options = _options(entry, parts, ("gap",))
        return _sequence(list(KINDS), _number(options.get("gap", str(DEFAULT_GAP_S)), "gap", entry))
    count_text = parts.pop(0) if parts else ""
    try:
        count = int(count_text)
    except ValueError:
        raise UsageError(f"fault schedule entry {entry!r}: random:N needs a whole number N") from None
    if count < 1:
        raise UsageError(f"fault schedule entry {entry!r}: random:N needs N >= 1")
    options = _options(entry, parts, ("seed", "gap", "kinds"))
    kinds = options.get("kinds", "+".join(KINDS)).split("+")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UsageError(f"fault schedule entry {entry!r}: unknown kind(s) {', '.join(unknown)}")
    try:
        rng = random.Random(int(options.get("seed", seed)))
    except ValueError:
        raise UsageError(f"fault schedule entry {entry!r}: seed must be a whole number") from None
    drawn: list[str] = []
    while len(drawn) < count:             # every kind once per round, rounds shuffled
        round_ = kinds[:]
        rng.shuffle(round_)
        drawn += round_
    return _sequence(drawn[:count], _number(options.get("gap", str(DEFAULT_GAP_S)), "gap", entry))


def parse_schedule(spec: str, seed: int = 1) -> list[PlannedFault]:
    """A schedule from its text (or the text of the file it names), by start time. Raises
    UsageError (one line) for a bad entry or overlapping faults."""
    text = spec
    path = Path(spec)
    if "@" not in spec and path.is_file():
        text = path.read_text(encoding="utf-8")
    entries = [e.strip() for line in text.splitlines() for e in line.split("#", 1)[0].split(",") if e.strip()]
    if not entries:
        raise UsageError(f"fault schedule {spec!r}: no entries")
    faults: list[PlannedFault] = []
    for entry in entries:
        if entry.split(":")[0] in ("none", "all", "random"):
            faults += _generated(entry, seed)
        else:
            faults.append(_explicit(entry))
    faults.sort(key=lambda f: f.at_s)
    for a, b in zip(faults, faults[1:]):
        if b.at_s < a.end_s:
            raise UsageError(f"fault schedule: {b.spec()} starts before {a.spec()} ends; faults may not overlap")
    return faults


def resolve_targets(faults: list[PlannedFault], cluster: lab.Cluster, seed: int) -> list[PlannedFault]:
    """Every fault with its target host: given ones checked against the cluster, the rest drawn
    with the seed among the hosts of the kind's role."""
    rng = random.Random(seed)
    by_role = {"datanode": [d.host for d in cluster.datanodes], "namenode": [cluster.namenode.host]}
    out = []
    for f in faults:
        hosts = by_role[KINDS[f.kind].role]
        target = f.target or rng.choice(hosts)
        if target not in hosts:
            raise UsageError(f"fault {f.spec()}: {target} is not a {KINDS[f.kind].role} of this cluster "
                             f"({', '.join(hosts)})")
        out.append(PlannedFault(f.kind, f.at_s, f.duration_s, target))
    return out


# --------------------------------------------------------------------------------------------
# The actions
@dataclass
class Active:
    """A fault in progress: what its end (or an abort) must undo."""
    planned: PlannedFault
    started: float
    detail: dict = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    helper: threading.Thread | None = None


class Actions:
    """start_<kind>(active) and end_<kind>(active) for every kind, on one cluster."""

    def __init__(self, cluster: lab.Cluster, rng: random.Random):
        self.cluster = cluster
        self.client = WebHdfs(cluster.namenode.http, timeout=20.0)
        self.rng = rng

    # -- DataNode processes --------------------------------------------------------------
    def start_kill_datanode(self, a: Active) -> None:
        d = self.cluster.daemons[a.planned.target]
        a.detail["pid"] = d.pid
        lab.stop_daemon(self.cluster, d.host, signal.SIGKILL)

    def end_kill_datanode(self, a: Active) -> None:
        self._restart(a.planned.target)

    def _restart(self, host: str) -> None:
        lab.start_daemon(self.cluster, host)

    def start_slow_datanode(self, a: Active) -> None:
        pid = self.cluster.daemons[a.planned.target].pid

        def bursts() -> None:
            while not a.stop.is_set():
                _signal_group(pid, signal.SIGSTOP)
                a.stop.wait(SLOW_STOPPED_S)
                _signal_group(pid, signal.SIGCONT)
                a.stop.wait(SLOW_RUNNING_S)
            _signal_group(pid, signal.SIGCONT)

        a.detail.update(pid=pid, stopped_s=SLOW_STOPPED_S, running_s=SLOW_RUNNING_S)
        a.helper = threading.Thread(target=bursts, name="lab-slow", daemon=True)
        a.helper.start()

    def end_slow_datanode(self, a: Active) -> None:
        a.stop.set()
        if a.helper is not None:
            a.helper.join(10)
        _signal_group(a.detail["pid"], signal.SIGCONT)

    # -- replicas on disk ----------------------------------------------------------------
    def _replica(self, host: str) -> tuple[str, Path] | None:
        """A (file, block file) pair: a workload file with a finalized replica on ``host``."""
        try:
            files = sorted(f["pathSuffix"] for f in self.client.list("/lab") if f.get("type") == "FILE")
        except (WebHdfsError, ValueError):
            return None
        self.rng.shuffle(files)
        volumes = self.cluster.daemons[host].data_dirs
        for name in files:
            try:
                blocks = self.client.block_ids(f"/lab/{name}")
            except (WebHdfsError, ValueError):
                continue
            for block in blocks:
                for volume in volumes:
                    found = glob.glob(f"{volume}/current/BP-*/current/finalized/**/blk_{block}", recursive=True)
                    if found:
                        return f"/lab/{name}", Path(found[0])
        return None

    def start_corrupt_replica(self, a: Active) -> None:
        picked = self._replica(a.planned.target)
        if picked is None:
            a.detail["skipped"] = "no finalized replica on the target"
            return
        path, block_file = picked
        size = block_file.stat().st_size
        length = max(1, min(4096, size // 4))
        offset = self.rng.randrange(0, max(1, size - length))
        with open(block_file, "r+b") as fh:
            fh.seek(offset)
            original = fh.read(length)
            fh.seek(offset)
            fh.write(bytes(b ^ 0xFF for b in original))      # every bit flipped: a checksum must fail
            fh.flush()
            os.fsync(fh.fileno())
        a.detail.update(file=path, block_file=str(block_file), offset=offset, length=length)
        reads = []
        for _ in range(CORRUPT_READS):
            try:
                reads.append(self.client.read(path)[0])
            except WebHdfsError as err:
                reads.append(str(err))
        a.detail["reads"] = reads

    def end_corrupt_replica(self, a: Active) -> None:
        pass                                  # HDFS repairs it: the bad replica is replaced

    def start_delete_replica(self, a: Active) -> None:
        picked = self._replica(a.planned.target)
        if picked is None:
            a.detail["skipped"] = "no finalized replica on the target"
            return
        path, block_file = picked
        metas = glob.glob(f"{block_file}_*.meta")
        for victim in [block_file, *map(Path, metas)]:
            victim.unlink(missing_ok=True)
        a.detail.update(file=path, block_file=str(block_file), meta_files=metas)

    def end_delete_replica(self, a: Active) -> None:
        pass

    # -- volumes -------------------------------------------------------------------------
    def start_fail_volume(self, a: Active) -> None:
        volume = Path(self.cluster.daemons[a.planned.target].data_dirs[-1])
        moved = volume.with_name(volume.name + ".failed")
        volume.rename(moved)
        volume.write_bytes(b"")               # a file where the directory was: every access fails
        a.detail.update(volume=str(volume), moved_to=str(moved))

    def end_fail_volume(self, a: Active) -> None:
        host = a.planned.target
        lab.stop_daemon(self.cluster, host)   # a clean shutdown, the disk "replaced", a restart
        volume, moved = Path(a.detail["volume"]), Path(a.detail["moved_to"])
        if volume.is_file():
            volume.unlink()
        if moved.exists() and not volume.exists():
            moved.rename(volume)
        self._restart(host)

    def _volume_free(self, host: str) -> dict[str, int]:
        """Free bytes per data directory, as the DataNode reports them (DataNodeInfo.VolumeInfo)."""
        info = lab.jmx(self.cluster.daemons[host], "Hadoop:service=DataNode,name=DataNodeInfo")
        try:
            volumes = json.loads(info.get("VolumeInfo") or "{}")
        except ValueError:
            volumes = {}
        free = {}
        for volume in self.cluster.daemons[host].data_dirs:
            for path, v in volumes.items():
                if Path(path) in (Path(volume), Path(volume) / "current"):
                    free[volume] = int(v.get("freeSpace", 0))
        return free

    def start_fill_volume(self, a: Active) -> None:
        host = a.planned.target
        free = self._volume_free(host)
        filled = {}
        for volume, available in free.items():
            pools = glob.glob(f"{volume}/current/BP-*/")
            size = available - FILL_LEAVE_BYTES
            if not pools or size <= 0:
                continue
            balloon = Path(pools[0]) / FILL_NAME
            try:
                with open(balloon, "wb") as fh:
                    os.posix_fallocate(fh.fileno(), 0, size)    # real blocks (du counts them), at once
            except OSError as err:                 # the shared disk has less than that free
                balloon.unlink(missing_ok=True)
                a.detail.setdefault("errors", []).append(f"{volume}: {err}")
                continue
            filled[str(balloon)] = size
        if not filled:
            a.detail["skipped"] = f"no data directory of {host} could be filled (free: {free})"
        a.detail.update(filled=filled, free_before=free)

    def end_fill_volume(self, a: Active) -> None:
        for balloon in a.detail.get("filled", {}):
            Path(balloon).unlink(missing_ok=True)

    # -- the NameNode's clients ----------------------------------------------------------
    def start_cut_namenode_clients(self, a: Active) -> None:
        os.kill(self.cluster.relay_pid, signal.SIGUSR1)
        a.detail["relay_pid"] = self.cluster.relay_pid

    def end_cut_namenode_clients(self, a: Active) -> None:
        os.kill(self.cluster.relay_pid, signal.SIGUSR2)

    def start(self, a: Active) -> None:
        getattr(self, f"start_{a.planned.kind}")(a)

    def end(self, a: Active) -> None:
        getattr(self, f"end_{a.planned.kind}")(a)


# --------------------------------------------------------------------------------------------
class Injector(threading.Thread):
    """Runs a schedule (offsets from ``t0``, epoch s) against a cluster; the labels file is
    rewritten after every start and end. ``done`` holds each fault as injected (actual times),
    ``details`` what each did (for manifests)."""

    def __init__(self, cluster: lab.Cluster, schedule: list[PlannedFault], labels_path: Path, t0: float,
                 seed: int = 1, on_event: Callable[[str, PlannedFault, dict], None] | None = None):
        super().__init__(name="lab-faults", daemon=True)
        self.schedule = schedule
        self.labels_path = Path(labels_path)
        self.t0 = t0
        self.actions = Actions(cluster, random.Random(seed))
        self.on_event = on_event or (lambda what, fault, detail: None)
        self.stop = threading.Event()
        self.done: list[Fault] = []
        self.details: list[dict] = []
        self.active: Active | None = None
        self.errors: list[str] = []
        self._lock = threading.Lock()
        write_faults(self.labels_path, [])

    def _write(self, extra: list[Fault] = ()) -> None:
        write_faults(self.labels_path, [*self.done, *extra])

    def run(self) -> None:
        for planned in self.schedule:
            if self.stop.wait(max(0.0, self.t0 + planned.at_s - time.time())):
                return
            active = Active(planned, time.time())
            with self._lock:
                self.active = active
                try:
                    self.actions.start(active)
                except Exception as err:       # a fault that could not be injected is reported, not fatal
                    log.exception("fault %s could not start", planned.spec())
                    self.errors.append(f"{planned.spec()}: {err}")
                    active.detail["error"] = str(err)
            # Labelled from its start, with its planned end, while it runs.
            self._write([Fault(active.started, active.started + planned.duration_s, planned.target, planned.kind)])
            self.on_event("start", planned, active.detail)
            if self.stop.wait(max(0.0, active.started + planned.duration_s - time.time())):
                return
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            active, self.active = self.active, None
            if active is None:
                return
            try:
                self.actions.end(active)
            except Exception as err:
                log.exception("fault %s could not be undone", active.planned.spec())
                self.errors.append(f"{active.planned.spec()} (end): {err}")
                active.detail["end_error"] = str(err)
            ended = max(time.time(), active.started + 1e-3)
            p = active.planned
            self.done.append(Fault(active.started, ended, p.target, p.kind))
            self.details.append({"kind": p.kind, "target": p.target, "planned": p.spec(),
                                 "start": active.started, "end": ended, **active.detail})
            self._write()
        self.on_event("end", p, active.detail)

    def abort(self) -> None:
        """Stop the schedule; the active fault, if any, is ended (and labelled until now)."""
        self.stop.set()
        if self.is_alive():
            self.join(30)
        self._finish()


def halt(injector: Injector | None, *threads: threading.Thread | None) -> None:
    """Shut a lab run down in order: the injector first (the active fault is undone and labelled
    until now), then each thread with a ``stop`` event (workload, scraper), joined."""
    if injector is not None:
        injector.abort()
    for thread in threads:
        if thread is not None:
            thread.stop.set()
            thread.join(30)
