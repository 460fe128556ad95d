"""Fault lists: when a fault was injected, where, and what kind — the labels of every multimodal
evaluation (TrainTicket days, Hadoop lab recordings).

The layout is TrainTicket's ``fault_list.json``: hour ("HH") -> list of faults, each with
``inject_time`` (UTC, "YYYY-MM-DD HH:MM:SS"), ``inject_timestamp``, ``inject_pod`` (the target:
a pod, or a lab host) and ``inject_type``. The data give no duration (its fault windows are 3
minutes); a list may add ``end_time`` (UTC, same format) or ``duration_s``, as the lab's labels
do. ``inject_time`` is what counts: in nezha_trainticket ``inject_timestamp`` is 8 hours off
(datasets README), so it is never read.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

from services.settings import UsageError

DEFAULT_DURATION_S = 180.0          # TrainTicket's fault windows: 3 minutes from inject_time
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# TrainTicket pods: <service>-<replica-set hash>-<5 characters>, e.g.
# ts-contacts-service-866bd68c97-xcqfx; the hashes change between days, the service does not.
_POD_SUFFIX = re.compile(r"-[0-9a-f]{6,10}-[0-9a-z]{5}$")


def service_of(pod: str) -> str:
    """The service a pod (or host) is an instance of: the pod name without its Kubernetes
    hashes; a name without them (a host) is its own service."""
    return _POD_SUFFIX.sub("", pod)


@dataclass(frozen=True)
class Fault:
    start: float                    # epoch s, UTC
    end: float                      # epoch s, UTC (exclusive)
    target: str                     # the pod or host injected
    kind: str                       # inject_type: network_delay, cpu_contention, kill_datanode, ...

    @property
    def service(self) -> str:
        return service_of(self.target)

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end

    def overlaps(self, start: float, end: float) -> bool:
        return self.start < end and start < self.end


def _epoch(text: str, where: str) -> float:
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        raise UsageError(f"{where}: {text!r} is not a time like 2023-01-30 11:51:46") from None


def read_faults(path: str | Path, default_duration_s: float = DEFAULT_DURATION_S) -> list[Fault]:
    """Every fault of a fault list, by start time. A file that is not such a list is a one-line
    UsageError naming the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"fault list {path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"fault list {path}: not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"fault list {path}: expected an object of hour -> list of faults")
    faults = []
    for hour, entries in doc.items():
        if not isinstance(entries, list):
            raise UsageError(f"fault list {path}: hour {hour!r} does not hold a list")
        for i, entry in enumerate(entries):
            where = f"fault list {path}, hour {hour} entry {i}"
            if not isinstance(entry, dict) or not {"inject_time", "inject_pod", "inject_type"} <= entry.keys():
                raise UsageError(f"{where}: needs inject_time, inject_pod and inject_type")
            start = _epoch(entry["inject_time"], where)
            if "end_time" in entry:
                end = _epoch(entry["end_time"], where)
            else:
                try:
                    end = start + float(entry.get("duration_s", default_duration_s))
                except (TypeError, ValueError):
                    raise UsageError(f"{where}: duration_s {entry.get('duration_s')!r} is not a number") from None
            if end <= start:
                raise UsageError(f"{where}: ends before it starts")
            faults.append(Fault(start, end, str(entry["inject_pod"]), str(entry["inject_type"])))
    return sorted(faults, key=lambda f: (f.start, f.target))


def write_faults(path: str | Path, faults: Iterable[Fault]) -> None:
    """Write faults in the same layout (with ``end_time`` and ``duration_s``), grouped by the
    UTC hour of their start."""
    doc: dict[str, list[dict]] = {}
    for f in sorted(faults, key=lambda f: (f.start, f.target)):
        start = datetime.fromtimestamp(f.start, timezone.utc)
        doc.setdefault(start.strftime("%H"), []).append({
            "inject_time": start.strftime(_TIME_FORMAT),
            "inject_timestamp": str(int(f.start)),
            "inject_pod": f.target,
            "inject_type": f.kind,
            "end_time": datetime.fromtimestamp(f.end, timezone.utc).strftime(_TIME_FORMAT),
            "duration_s": round(f.end - f.start, 3),
        })
    Path(path).write_text(json.dumps(doc, indent=4) + "\n", encoding="utf-8")


def near_fault(t: float, faults: Iterable[Fault], margin_s: float) -> bool:
    """True when ``t`` lies within ``margin_s`` of any fault's window (either side)."""
    return any(f.start - margin_s <= t < f.end + margin_s for f in faults)


def by_target(faults: Iterable[Fault]) -> dict[str, list[Fault]]:
    """Faults grouped by their target (pod or host), each group in the list's order."""
    groups: dict[str, list[Fault]] = {}
    for f in faults:
        groups.setdefault(f.target, []).append(f)
    return groups


def faults_judged_and_hit(units: Iterable[tuple[str, object]], flagged: Iterable[bool], faults: Sequence[Fault],
                          touches: Callable[[Fault, object], bool]) -> tuple[set[int], set[int]]:
    """Which faults (indices into ``faults``) some judged unit of their target touches, and which
    of those some *flagged* unit touches: a fault counts when the data let a detector see it, and
    is detected when one of its units was flagged. ``units``: (target, unit); ``touches(fault,
    unit)``: the evaluation's rule (a unit that starts inside the fault, a chunk that overlaps it)."""
    groups: dict[str, list[tuple[int, Fault]]] = {}
    for i, f in enumerate(faults):
        groups.setdefault(f.target, []).append((i, f))
    judged: set[int] = set()
    hit: set[int] = set()
    for (target, unit), flag in zip(units, flagged):
        for i, f in groups.get(target, ()):
            if touches(f, unit):
                judged.add(i)
                if flag:
                    hit.add(i)
    return judged, hit
