"""Event-time progress of many sources, combined into one watermark: the part of the session book
(services.cores.sessions) that the other event-time stages (trace assembly, the per-entity join)
share. Pure: no Kafka.

A *source* is an ordered input stream (a partition of an upstream topic, named
"<topic>:<partition>"). Its progress is the newest event time it has reached, learnt from its own
records and from the Watermark records its producer broadcasts to every partition downstream
(services.records.Watermark): announced with no progress yet, it holds the watermark back; idle
(read to its end and silent), or silent for ``idle_s`` of wall time, it stops holding it.

    watermark(now) = min over the active sources' progress - allowed lateness
                     (+inf when every known source is idle; the last one when none is known;
                     frozen for ``grace_s`` of wall time after the first call (the stage ticks
                     its books from their assignment), so that every source that writes here
                     has shown up)

``hold(now)``: input stopped for a reason that is not the sources' (the broker is away), so
their silence does not count that time. ``to_state()``/``from_state()``
give the part that belongs in a partition's changelog entry (not the wall clocks).
"""
from __future__ import annotations

import math


class SourceClock:
    def __init__(self, allowed_lateness_s: float = 2.0, idle_s: float = 30.0, grace_s: float = 2.0):
        self.allowed_lateness_s, self.idle_s, self.grace_s = allowed_lateness_s, idle_s, grace_s
        self.progress: dict[str, float] = {}       # newest event time each source has reached
        self.seen: dict[str, float] = {}           # wall clock of its last record or mark
        self.idle: set[str] = set()                # sources their producer reports idle
        self.first_input: float | None = None

    def observe(self, source: str, ts: float, now: float, keep_idle: bool = False) -> None:
        """A record of ``source`` at event time ``ts`` (-inf: announced, no progress yet)."""
        reached = self.progress.get(source)
        if reached is None or ts > reached:
            self.progress[source] = ts
        self.seen[source] = now
        if not keep_idle:
            self.idle.discard(source)

    def mark(self, source: str, ts: float | None, idle: bool, now: float) -> None:
        """A Watermark record: ``source`` reached ``ts`` (None: just assigned), or is ``idle``."""
        if idle:
            self.idle.add(source)
            self.seen[source] = now
            if ts is not None:
                self.observe(source, ts, now, keep_idle=True)
        else:
            self.idle.discard(source)
            self.observe(source, -math.inf if ts is None else ts, now)

    def hold(self, now: float) -> None:
        for source in self.seen:
            self.seen[source] = now

    def watermark(self, now: float | None, current: float) -> float:
        """The watermark now (``current``: the last one, returned while it cannot move)."""
        if now is not None:
            if self.first_input is None:
                self.first_input = now
            if now - self.first_input < self.grace_s:
                return current
        times = [t for s, t in self.progress.items()
                 if s not in self.idle and (now is None or now - self.seen.get(s, now) < self.idle_s)]
        if not times:
            return math.inf if self.progress else current
        return min(times) - self.allowed_lateness_s

    def to_state(self) -> dict:
        return {"source_time": {k: v for k, v in self.progress.items() if v != -math.inf}, "idle": sorted(self.idle)}

    def from_state(self, state: dict) -> None:
        self.progress = dict(state.get("source_time", {}))
        self.idle = set(state.get("idle", ()))
        self.seen.clear()
        self.first_input = None
