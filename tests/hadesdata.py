"""Synthetic logs + metrics chunks for tests/test_hades.py: services with normal behaviour and
three fault kinds, each on a known step range: a log-only fault (a burst of ERROR lines, metrics
normal), a metric-only fault (CPU x4, logs normal) and a fault in both (memory x3 and WARN lines
about the memory limit)."""
from __future__ import annotations

import random

from models.base import Chunk, LogEvent
from models.faults import Fault

STEP = 10.0
NORMAL = (("T1", "request served in <*> ms"), ("T2", "heartbeat to <*> ok"), ("T3", "block <*> written"))
KINDS = ("log", "metric", "both")


def series(n: int, seed: int, first: int, faults: list[tuple[str, int, int]]) -> dict[int, tuple[dict, list]]:
    """Step -> (metric values, log events) for ``n`` steps from ``first``; ``faults``: (kind,
    first step, end step)."""
    rng = random.Random(seed)
    steps = {}
    counter = 1000.0
    for k in range(first, first + n):
        kind = next((f for f, a, b in faults if a <= k < b), None)
        cpu, mem, latency = 20 + rng.gauss(0, 1.5), 500 + rng.gauss(0, 10), 0.05 + abs(rng.gauss(0, 0.005))
        counter += 5000 + rng.gauss(0, 200)             # a cumulative counter (bytes received)
        events = [LogEvent(k * STEP + j, *NORMAL[j % 3], "INFO") for j in range(rng.randint(4, 7))]
        if kind == "metric":
            cpu *= 4
        elif kind == "both":
            mem *= 3
            events += [LogEvent(k * STEP + 8 + 0.1 * j, "Tmem", "memory usage <*> reaches the limit <*>", "WARN")
                       for j in range(5)]
        elif kind == "log":
            events += [LogEvent(k * STEP + 8 + 0.05 * j, "Tfail", "connection refused by <*> exception", "ERROR")
                       for j in range(12)]
        steps[k] = ({"CpuUsageRate(%)": cpu, "MemoryUsage(Mi)": mem, "NetworkReceiveBytes": counter,
                     "PodLatencyP90(s)": latency}, sorted(events, key=lambda e: e.timestamp))
    return steps


def chunks_of(pod: str, steps: dict, length: int) -> list[Chunk]:
    """Sliding chunks of ``length`` steps, one per newest step."""
    out = []
    keys = sorted(steps)
    for k in keys[length - 1:]:
        window = range(k - length + 1, k + 1)
        out.append(Chunk(entity=pod, service=pod.rsplit("-", 2)[0], start=window[0] * STEP, end=(k + 1) * STEP,
                         step_s=STEP, metrics={c: [steps[i][0][c] for i in window] for c in steps[k][0]},
                         logs=[e for i in window for e in steps[i][1]]))
    return out


def fault_objects(pod: str, faults: list[tuple[str, int, int]]) -> list[Fault]:
    return [Fault(a * STEP, b * STEP, pod, kind) for kind, a, b in faults]
