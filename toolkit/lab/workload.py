"""The lab's workload: a steady, seeded stream of file writes, reads, appends and deletes through
WebHDFS (the NameNode's REST API; no Hadoop client in Python), like HDFS_v1's workload of jobs
reading and writing files, so the daemons' logs and metrics have a normal rhythm.

The plan is a pure function of the seed (``plan``): operation i's kind, file and size never
depend on what earlier operations returned, so two runs with one seed issue the same requests
(at the same rate) and differ only in timing and in what faults made fail. The plan keeps the
namespace small (at most ``max_files`` files under ``root``): a write into a full namespace
becomes a delete. Sizes are a few hundred KiB to a few MiB, so with the lab's 1 MiB blocks a
file is one to several blocks.

WebHDFS writes are two requests: the NameNode answers ``op=CREATE`` / ``op=APPEND`` (and reads,
``op=OPEN``) with the DataNode to talk to (``noredirect=true``: a JSON Location), and the
DataNode's handler does the HDFS client work (pipelines, the NameNode RPCs through the lab's
client relay).
"""
from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

log = logging.getLogger(__name__)
KINDS = ("write", "read", "append", "delete")
USER = "lab"


@dataclass(frozen=True)
class WorkloadConfig:
    rate: float = 1.0                     # operations per second
    seed: int = 1
    mix: tuple[tuple[str, float], ...] = (("write", 0.35), ("read", 0.40), ("append", 0.10), ("delete", 0.15))
    min_kib: int = 64
    max_kib: int = 3072
    max_files: int = 30
    root: str = "/lab"
    timeout_s: float = 20.0               # one request; a stopped DataNode stalls it

    def __post_init__(self):
        if self.rate <= 0:
            raise ValueError("workload rate must be > 0 operations per second")
        if {k for k, _ in self.mix} - set(KINDS) or any(w < 0 for _, w in self.mix) or not sum(w for _, w in self.mix):
            raise ValueError(f"workload mix: weights >= 0 of {', '.join(KINDS)}, not all 0")
        if not 0 < self.min_kib <= self.max_kib:
            raise ValueError("workload sizes: 0 < min_kib <= max_kib")


@dataclass(frozen=True)
class Operation:
    index: int
    kind: str
    path: str
    size: int                             # bytes written (write, append); 0 otherwise


def plan(config: WorkloadConfig) -> Iterator[Operation]:
    """The seeded, endless sequence of operations."""
    rng = random.Random(config.seed)
    kinds = [k for k, _ in config.mix]
    weights = [w for _, w in config.mix]
    files: list[str] = []                 # what the plan assumes exists (not what does)
    serial = 0
    index = 0
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind != "write" and not files:
            kind = "write"
        if kind == "write" and len(files) >= config.max_files:
            kind = "delete"
        size = 0
        if kind == "write":
            serial += 1
            path = f"{config.root}/f{serial:05d}"
            files.append(path)
            size = rng.randint(config.min_kib, config.max_kib) * 1024
        elif kind == "delete":
            path = files.pop(rng.randrange(len(files)))
        else:
            path = rng.choice(files)
            if kind == "append":
                size = rng.randint(config.min_kib, max(config.min_kib, config.max_kib // 4)) * 1024
        yield Operation(index, kind, path, size)
        index += 1


def payload(seed: int, index: int, size: int) -> bytes:
    """The bytes operation ``index`` writes: seeded, so a rerun writes the same data."""
    return random.Random(seed * 1_000_003 + index).randbytes(size)


class WebHdfsError(RuntimeError):
    pass


class WebHdfs:
    """The few WebHDFS calls the workload and the faults need (simple auth, user ``lab``)."""

    def __init__(self, namenode_http: str, timeout: float = 20.0):
        parsed = urllib.parse.urlsplit(namenode_http)
        self.host, self.port = parsed.hostname, parsed.port
        self.timeout = timeout

    def _request(self, method: str, host: str, port: int, target: str, body: bytes | None = None):
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
            conn.request(method, target, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as err:
            # HTTPException: e.g. IncompleteRead, when a DataNode finds a bad checksum mid-read
            # and cuts the transfer (a corrupt replica): a failed call, like a refused one.
            raise WebHdfsError(f"{method} {target.split('?')[0]}: {err!r}") from None
        finally:
            conn.close()

    def _namenode(self, method: str, path: str, op: str, **params) -> tuple[int, bytes]:
        query = urllib.parse.urlencode({"op": op, "user.name": USER, **params})
        return self._request(method, self.host, self.port, f"/webhdfs/v1{urllib.parse.quote(path)}?{query}")

    def _redirected(self, method: str, path: str, op: str, body: bytes | None = None, **params) -> tuple[int, bytes]:
        status, data = self._namenode(method, path, op, noredirect="true", **params)
        if status != 200:
            return status, data
        try:
            location = urllib.parse.urlsplit(json.loads(data)["Location"])
        except (ValueError, KeyError, TypeError):
            raise WebHdfsError(f"{op} {path}: the NameNode gave no Location") from None
        target = location.path + ("?" + location.query if location.query else "")
        return self._request(method, location.hostname, location.port, target, body)

    def create(self, path: str, data: bytes) -> int:
        return self._redirected("PUT", path, "CREATE", data, overwrite="true")[0]

    def append(self, path: str, data: bytes) -> int:
        return self._redirected("POST", path, "APPEND", data)[0]

    def read(self, path: str) -> tuple[int, int]:
        status, data = self._redirected("GET", path, "OPEN")
        return status, len(data)

    def delete(self, path: str) -> int:
        return self._namenode("DELETE", path, "DELETE", recursive="true")[0]

    def mkdirs(self, path: str) -> int:
        return self._namenode("PUT", path, "MKDIRS")[0]

    def list(self, path: str) -> list[dict]:
        status, data = self._namenode("GET", path, "LISTSTATUS")
        if status != 200:
            return []
        return json.loads(data).get("FileStatuses", {}).get("FileStatus", [])

    def block_ids(self, path: str) -> list[int]:
        """The block ids of a file (op=GET_BLOCK_LOCATIONS, which WebHDFS' own client uses)."""
        status, data = self._namenode("GET", path, "GET_BLOCK_LOCATIONS", offset=0, length=1 << 40)
        if status != 200:
            return []
        blocks = json.loads(data).get("LocatedBlocks", {}).get("locatedBlocks", [])
        return [int(b["block"]["blockId"]) for b in blocks]


RECOVERY_S = 60.0        # after a fault's end, calls may still fail while the cluster recovers
HEALTHY_SHARE = 0.8      # of the calls away from faults that succeed in a healthy recording


@dataclass
class WorkloadStats:
    done: Counter = field(default_factory=Counter)        # (kind, "ok" | "failed")
    bytes_written: int = 0
    bytes_read: int = 0
    late_s: float = 0.0                                   # how far behind the rate it fell, at most
    calls: list = field(default_factory=list)             # (epoch s at its start, ok) of every call

    def outside(self, faults, recovery_s: float = RECOVERY_S) -> tuple[int, int]:
        """(calls ok, calls) of the calls that started away from every fault: not inside one nor
        within ``recovery_s`` after its end (a restarted DataNode takes that long to be back)."""
        spans = [(f.start, f.end + recovery_s) for f in faults]
        away = [ok for t, ok in self.calls if not any(a <= t < b for a, b in spans)]
        return sum(away), len(away)

    def summary(self) -> str:
        parts = [f"{k} {self.done[(k, 'ok')]}/{self.done[(k, 'ok')] + self.done[(k, 'failed')]}" for k in KINDS]
        return (", ".join(parts) + f" ok; {self.bytes_written / 2**20:.1f} MiB written, "
                f"{self.bytes_read / 2**20:.1f} MiB read")


class Workload(threading.Thread):
    """Issues ``plan(config)`` at ``config.rate`` operations per second until stopped."""

    def __init__(self, namenode_http: str, config: WorkloadConfig = WorkloadConfig()):
        super().__init__(name="lab-workload", daemon=True)
        self.config = config
        self.client = WebHdfs(namenode_http, config.timeout_s)
        self.stop = threading.Event()
        self.stats = WorkloadStats()

    def execute(self, op: Operation) -> bool:
        started = time.time()
        try:
            if op.kind == "write":
                status = self.client.create(op.path, payload(self.config.seed, op.index, op.size))
                ok = status == 201
            elif op.kind == "append":
                status = self.client.append(op.path, payload(self.config.seed, op.index, op.size))
                ok = status == 200
            elif op.kind == "read":
                status, size = self.client.read(op.path)
                ok = status == 200
                self.stats.bytes_read += size if ok else 0
            else:
                status = self.client.delete(op.path)
                ok = status == 200
        except WebHdfsError as err:
            log.debug("workload %s %s: %s", op.kind, op.path, err)
            ok = False
        if ok and op.kind in ("write", "append"):
            self.stats.bytes_written += op.size
        self.stats.done[(op.kind, "ok" if ok else "failed")] += 1
        self.stats.calls.append((started, ok))
        return ok

    def run(self) -> None:
        self.client.mkdirs(self.config.root)
        started = time.monotonic()
        for op in plan(self.config):
            due = started + op.index / self.config.rate
            if self.stop.wait(max(0.0, due - time.monotonic())):
                return
            self.stats.late_s = max(self.stats.late_s, time.monotonic() - due)
            self.execute(op)
