"""A tiny synthetic trace grammar for the trace detector's tests.

    gateway /*
      orders GET /api/v1/orders/<number>          (half the traces; the URL carries a raw id)
        cache get
        db SELECT orders
        auth check | price query | stock query | seat query   (concurrent: 20 µs apart, overlapping)
      orders POST /api/v1/orders                   (the other half)
        db SELECT orders
        the same four concurrent calls
        db INSERT orders                           (after all four have returned)

What comes next is certain given the request, except for the order of the four concurrent
calls: ``concurrent`` gives it; by default half the traces keep auth, price, stock, seat and
half take a random order, so the model sees them come in any order, most often in the first.
Leaf response times are log-normal around a per-label median (sigma 0.1); a parent lasts as
long as its children plus a little.
"""
from __future__ import annotations

import csv
import gzip
import random
from pathlib import Path

from models.base import Span, Trace

MEDIAN_US = {"cache get": 300, "SELECT orders": 2000, "auth check": 1000, "price query": 2500,
             "stock query": 1500, "seat query": 1200, "INSERT orders": 3000}
SERVICE = {"cache get": "cache", "SELECT orders": "db", "auth check": "auth", "price query": "price",
           "stock query": "stock", "seat query": "seat", "INSERT orders": "db"}
CONCURRENT = ("auth check", "price query", "stock query", "seat query")


class _Ids:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def __call__(self) -> str:
        return f"{self.rng.getrandbits(64):016x}"


def grammar_trace(rng: random.Random, start_ns: int, get: bool | None = None,
                  concurrent: tuple[str, ...] | None = None, slow: str | None = None, factor: float = 1.0) -> Trace:
    """One trace; ``slow``: a leaf label whose response time is multiplied by ``factor``."""
    new_id = _Ids(rng)
    trace_id = f"{rng.getrandbits(128):032x}"
    get = rng.random() < 0.5 if get is None else get
    if concurrent is None:
        concurrent = CONCURRENT if rng.random() < 0.5 else tuple(rng.sample(CONCURRENT, len(CONCURRENT)))
    root, api = new_id(), new_id()
    spans: list[Span] = []

    def leaf(label: str, begin: int) -> Span:
        duration = int(MEDIAN_US[label] * rng.lognormvariate(0.0, 0.1) * (factor if label == slow else 1.0) * 1000)
        return Span(new_id(), api, SERVICE[label], f"{SERVICE[label]}-0", label, begin, begin + duration)

    t = start_ns + 200_000
    for label in (["cache get"] if get else []) + ["SELECT orders"]:
        spans.append(leaf(label, t))
        t = spans[-1].end_ns + 50_000
    calls = [leaf(label, t + 20_000 * k) for k, label in enumerate(concurrent)]
    spans += calls
    end = max(c.end_ns for c in calls) + 50_000
    if not get:
        spans.append(leaf("INSERT orders", end))
        end = spans[-1].end_ns + 100_000
    operation = f"GET /api/v1/orders/{rng.randint(1000, 99999)}" if get else "POST /api/v1/orders"
    spans.insert(0, Span(api, root, "orders", "orders-0", operation, start_ns + 100_000, end))
    spans.insert(0, Span(root, None, "gateway", "gateway-0", "/*", start_ns, end + 100_000))
    return Trace(trace_id, sorted(spans, key=lambda s: (s.start_ns, s.span_id)))


def grammar_traces(count: int, seed: int = 0, start_ns: int = 1_675_000_000 * 10**9, every_s: float = 1.0,
                   **kwargs) -> list[Trace]:
    """``count`` traces ``every_s`` apart; ``kwargs`` go to every grammar_trace."""
    rng = random.Random(seed)
    return [grammar_trace(rng, start_ns + int(i * every_s * 1e9), **kwargs) for i in range(count)]


def write_csv(path: Path, traces: list[Trace]) -> Path:
    """The traces as a TrainTicket trace CSV (gzip when the name ends in .gz); pods are named
    like Kubernetes pods so the readers recover the service."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["TraceID", "SpanID", "ParentID", "PodName", "OperationName", "StartTimeUnixNano",
                      "EndTimeUnixNano", "Duration"])
        for trace in traces:
            for s in trace.spans:
                pod = f"ts-{s.service}-service-5dc8d4f9fd-abcde"
                out.writerow([trace.trace_id, s.span_id, s.parent_id or "root", pod, s.operation, s.start_ns,
                              s.end_ns, (s.end_ns - s.start_ns) // 1000])
    return path
