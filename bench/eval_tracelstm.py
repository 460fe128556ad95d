"""The trace detector (models/tracelstm.py, Nedelkoski et al.) on TrainTicket traces.

    nice -n 10 .venv/bin/python -m bench.eval_tracelstm --data ../shared/datasets --json /tmp/tracelstm.json
    (or: python -m bench.run --only tracelstm --data ../shared/datasets, which writes BENCHMARKS.md)

Split (2023-01-30). *Normal traffic* is every trace starting in a minute farther than 5 minutes
from any injection's window (models.tracelstm.normal_minutes, as the evaluation JSON defines
normal hours). It is split by time within each workload regime (before / after the 16:00
change): the first 60% trains, the next 15% is validation (the response-time Gaussians, the
alarm-rate calibration, the concurrency analysis), the last 25% is held back for testing.
Training keeps at most ``max_per_sequence`` traces of each distinct label sequence, weighted
(the detector's subsampling). Nothing near a fault is trained on; the real-fault evaluation runs
on every trace near a fault plus the held-back normal traces.

(a) Injections on held-back normal traces (at most INJECTED per regime): structural (a span's
label swapped for another training label, a leaf span dropped, or a span with a random label
inserted beside a random span; one per trace, in turn) and response time (one span's duration x
U(2, 5)). *Accuracy* is the paper's: the share of injected anomalies flagged at the injected
span; "trace" counts a flag anywhere; "false alarms" is the share of the same traces, clean,
that are flagged the same way. By k (top-k) and by trace length; single-modality LSTMs (SAD,
RTAD) beside the multimodal one; the response-time interval as the paper has it (95%) and as
calibrated (``alarm_rate``). Concurrency: the same clean traces with one pair of concurrent
sibling spans (one started before the other ended) given each other's start times, judged with
and without the detector's reordering.
(b) The day's 17 real faults, the JSON of `logwarden evaluate --detector tracelstm`, per model.
(c) A baseline without learning in the same tables: a transition (previous label -> label, the
end included) or a label no training trace holds, and a span slower than its label's training p99.
Also: the model trained before 16:00 on the traffic after it; the 2023-01-29 fault windows of
nezha_trainticket/ (what each fault does to the traces on its pod, against the fault-free
window); traces/s of score() on the CPU by batch size.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench import save_report
from models.base import Anomaly, Trace, Verdict, limit_cpu_threads
from models.faults import read_faults
from models.microservices import expand, read_traces
from models.tracelstm import (TraceLSTM, causal_order, contract, fault_report, normal_minutes, span_label)

SECTION = "tracelstm"
COMMAND = "python -m bench.run --only tracelstm --data ../shared/datasets"
REPO_ROOT = Path(__file__).resolve().parent.parent
SPLIT = (0.6, 0.15)                 # train, validation; the rest of each regime is test
WORKLOAD_CHANGE = datetime(2023, 1, 30, 16, tzinfo=timezone.utc).timestamp()
INJECTED = 400                      # held-back traces per regime that get injections
KS = (1, 3, 5, 10)
LENGTHS = ((1, 10), (11, 20), (21, 50), (51, 100), (101, 600))
DETECTOR = dict(max_per_sequence=20)    # the detector's defaults, fewer traces per sequence (CPU time)


def default_data_dir() -> Path:
    return Path(os.environ.get("LOGWARDEN_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


# ----------------------------------------------------------------------------------------------
# the baseline without learning
class TransitionBaseline:
    """Structural: a label, or a transition previous label -> label (in the detector's span order,
    from the start and into the end), that no training trace holds. Response time: a span slower
    than its label's p99 on the training spans."""

    name = "baseline"

    def fit(self, traces: list[Trace]) -> "TransitionBaseline":
        self.transitions: set[tuple[str, str]] = set()
        durations: dict[str, list[int]] = defaultdict(list)
        for t in traces:
            labels = self._labels(t)
            self.transitions.update(zip(["<start>"] + labels, labels + ["<end>"]))
            for s in t.spans:
                durations[span_label(s)].append(s.end_ns - s.start_ns)
        self.p99 = {label: float(np.quantile(v, 0.99)) for label, v in durations.items()}
        return self

    @staticmethod
    def _labels(trace: Trace) -> list[str]:
        return [span_label(trace.spans[i]) for i in causal_order(trace)]

    def score(self, traces: list[Trace]) -> list[Verdict]:
        verdicts = []
        for t in traces:
            order = causal_order(t)
            labels = [span_label(t.spans[i]) for i in order]
            anomalies = []
            for p, (before, label) in enumerate(zip(["<start>"] + labels, labels + ["<end>"])):
                if (before, label) not in self.transitions:
                    anomalies.append(Anomaly(order[p] if p < len(order) else len(order), "structural", label))
            for p, i in enumerate(order):
                s = t.spans[i]
                if s.end_ns - s.start_ns > self.p99.get(labels[p], float("inf")):
                    anomalies.append(Anomaly(i, "response_time", labels[p]))
            verdicts.append(Verdict(bool(anomalies), float(bool(anomalies)), anomalies))
        return verdicts


# ----------------------------------------------------------------------------------------------
# data
def _time(trace: Trace) -> float:
    return trace.start_ns / 1e9


def split(day: list[Trace], faults) -> dict[str, list[Trace]]:
    normal_set = normal_minutes(day, faults)
    normal = [t for t in day if int(t.start_ns // 60_000_000_000) in normal_set]
    parts: dict[str, list[Trace]] = {"near_faults": [t for t in day if int(t.start_ns // 60_000_000_000) not in normal_set]}
    for regime, traces in (("pre16", [t for t in normal if _time(t) < WORKLOAD_CHANGE]),
                           ("post16", [t for t in normal if _time(t) >= WORKLOAD_CHANGE])):
        a, b = int(len(traces) * SPLIT[0]), int(len(traces) * (SPLIT[0] + SPLIT[1]))
        parts[f"train_{regime}"], parts[f"val_{regime}"], parts[f"test_{regime}"] = traces[:a], traces[a:b], traces[b:]
    return parts


def describe(parts: dict[str, list[Trace]]) -> dict:
    train_sequences = {tuple(TransitionBaseline._labels(t)) for name in ("train_pre16", "train_post16") for t in parts[name]}
    out = {}
    for name, traces in parts.items():
        sequences = Counter(tuple(TransitionBaseline._labels(t)) for t in traces)
        out[name] = {"traces": len(traces), "distinct_label_sequences": len(sequences),
                     "spans_mean": round(float(np.mean([len(t.spans) for t in traces])), 1) if traces else None,
                     "from": _utc(min(map(_time, traces))) if traces else None,
                     "to": _utc(max(map(_time, traces))) if traces else None,
                     "traces_with_a_sequence_not_in_training": sum(n for s, n in sequences.items() if s not in train_sequences)}
    return out


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------------------------
# injections
@dataclasses.dataclass
class Injected:
    trace: Trace
    position: int                   # index in trace.spans where the anomaly shows
    kind: str                       # swap | drop | insert | response_time | reorder


def _leaves(trace: Trace) -> list[int]:
    parents = {s.parent_id for s in trace.spans}
    return [i for i, s in enumerate(trace.spans) if s.span_id not in parents and s.parent_id is not None]


def _resorted(trace: Trace, spans, mark) -> tuple[Trace, int]:
    spans = sorted(spans, key=lambda s: (s.start_ns, s.span_id))
    return Trace(trace.trace_id, spans), next(i for i, s in enumerate(spans) if s is mark)


def structural_injection(trace: Trace, how: str, labels: list[tuple[str, str]], rng: random.Random) -> Injected | None:
    spans = list(trace.spans)
    if how == "drop":
        leaves = _leaves(trace)
        if not leaves or len(spans) < 2:
            return None
        i = rng.choice(leaves)
        # The anomaly shows at the span that takes the leaf's place in the model's order (a leaf
        # has no children: the others keep their order), or at the end.
        order = causal_order(trace)
        m = order.index(i)
        spans.pop(i)
        position = len(spans) if m + 1 == len(order) else order[m + 1] - (order[m + 1] > i)
        return Injected(Trace(trace.trace_id, spans), position, "drop")
    own = span_label
    i = rng.randrange(1, len(spans)) if len(spans) > 1 else 0
    service, operation = rng.choice([x for x in labels if f"{x[0]} {x[1]}" != own(spans[i])])
    if how == "swap":
        spans[i] = dataclasses.replace(spans[i], service=service, operation=operation)
        return Injected(Trace(trace.trace_id, spans), i, "swap")
    near = spans[i]
    extra = dataclasses.replace(near, span_id=f"inj{rng.getrandbits(48):012x}", service=service, operation=operation,
                                start_ns=near.start_ns, end_ns=near.end_ns)
    t, position = _resorted(trace, spans + [extra], extra)
    return Injected(t, position, "insert")


def latency_injection(trace: Trace, rng: random.Random) -> Injected:
    i = rng.randrange(len(trace.spans))
    s = trace.spans[i]
    factor = rng.uniform(2.0, 5.0)
    spans = list(trace.spans)
    spans[i] = dataclasses.replace(s, end_ns=s.start_ns + int(max(1, s.end_ns - s.start_ns) * factor))
    return Injected(Trace(trace.trace_id, spans), i, "response_time")


def sibling_swap(trace: Trace, rng: random.Random) -> Injected | None:
    """Two sibling spans that ran concurrently (one started before the other ended) trade start
    times (each keeps its duration): the same execution, observed in the other order."""
    by_parent: dict[str | None, list[int]] = defaultdict(list)
    for i, s in enumerate(trace.spans):
        by_parent[s.parent_id].append(i)
    pairs = [(a, b) for members in by_parent.values() for a, b in zip(members, members[1:])
             if trace.spans[b].start_ns < trace.spans[a].end_ns and span_label(trace.spans[a]) != span_label(trace.spans[b])]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    sa, sb = trace.spans[a], trace.spans[b]
    spans = list(trace.spans)
    spans[a] = dataclasses.replace(sa, start_ns=sb.start_ns, end_ns=sb.start_ns + (sa.end_ns - sa.start_ns))
    spans[b] = dataclasses.replace(sb, start_ns=sa.start_ns, end_ns=sa.start_ns + (sb.end_ns - sb.start_ns))
    t, position = _resorted(trace, spans, spans[b])
    return Injected(t, position, "reorder")


def injections(tests: list[Trace], labels: list[tuple[str, str]], seed: int = 1) -> dict[str, list]:
    rng = random.Random(seed)
    clean, structural, latency, reorder = [], [], [], []
    for n, trace in enumerate(tests):
        s = structural_injection(trace, ("swap", "drop", "insert")[n % 3], labels, rng)
        if s is None:
            continue
        clean.append(trace)
        structural.append(s)
        latency.append(latency_injection(trace, rng))
        reorder.append(sibling_swap(trace, rng))
    return {"clean": clean, "structural": structural, "latency": latency, "reorder": reorder}


def _length_bucket(n: int) -> str:
    return next(f"{a}-{b}" for a, b in LENGTHS if a <= n <= b) if n <= LENGTHS[-1][1] else f">{LENGTHS[-1][1]}"


def accuracy(detector, sets: dict, kind: str, by_length: bool = False) -> dict:
    """The paper's accuracy (flag of ``kind`` at the injected span), trace-level detection, and
    the false-alarm share of the same traces clean."""
    injected = sets["structural" if kind == "structural" else "latency"]
    verdicts = detector.score([x.trace for x in injected])
    clean = detector.score(sets["clean"])
    at = [any(a.kind == kind and a.position == x.position for a in v.anomalies) for x, v in zip(injected, verdicts)]
    anywhere = [any(a.kind == kind for a in v.anomalies) for v in verdicts]
    false = [any(a.kind == kind for a in v.anomalies) for v in clean]
    out = {"injected": len(injected), "accuracy": _share(at), "trace": _share(anywhere), "false_alarms": _share(false)}
    if kind == "structural":
        out["by_injection"] = {how: _share([hit for hit, x in zip(at, injected) if x.kind == how])
                               for how in ("swap", "drop", "insert")}
    if by_length:
        groups = defaultdict(list)
        for hit, x, fa in zip(at, injected, false):
            groups[_length_bucket(len(x.trace.spans))].append((hit, fa))
        out["by_length"] = {b: {"traces": len(v), "accuracy": _share([h for h, _ in v]), "false_alarms": _share([f for _, f in v])}
                            for b, v in sorted(groups.items(), key=lambda kv: int(kv[0].split("-")[0].lstrip(">")))}
    return out


def _share(flags) -> float | None:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else None


def concurrency(detector: TraceLSTM, sets: dict) -> dict:
    """Structural flags on sibling-swapped and clean traces, with and without reordering."""
    pairs = [(c, r) for c, r in zip(sets["clean"], sets["reorder"]) if r is not None]
    out = {"traces_with_concurrent_siblings": len(pairs)}
    before = detector.reorder
    try:
        for reorder in (True, False):
            detector.reorder = reorder
            swapped = detector.score([r.trace for _, r in pairs])
            clean = detector.score(sets["clean"])
            key = "reordering" if reorder else "no_reordering"
            out[key] = {"swapped_flagged": _share([any(a.kind == "structural" for a in v.anomalies) for v in swapped]),
                        "clean_flagged": _share([any(a.kind == "structural" for a in v.anomalies) for v in clean])}
            if reorder:
                out["concurrent_sibling_groups_per_trace"] = round(float(np.mean([len(v.details["concurrent_siblings"]) for v in clean])), 2)
                out["traces_reordered"] = _share([bool(v.details["reordered"]) for v in clean])
    finally:
        detector.reorder = before
    return out


# ----------------------------------------------------------------------------------------------
# real faults, other days, throughput
def real_faults(detector, traces: list[Trace], faults) -> dict:
    report = fault_report(traces, detector.score(traces), faults)
    seconds = [p["seconds_to_detect"] for p in report["per_fault"] if p["seconds_to_detect"] is not None]
    return {"json": contract(report), "normal_hours": report["normal_hours"], "false_alarms": report["false_alarms"],
            "max_seconds_to_detect": max(seconds) if seconds else None,
            "detected_within_60s": sum(s <= 60 for s in seconds), "per_fault": report["per_fault"]}


def nezha(detector: TraceLSTM, data: Path, training_labels: set[str]) -> dict:
    """The 2023-01-29 fault windows: the detector's JSON, and per fault what the traces on the
    injected pod look like against the fault-free window."""
    root = data / "nezha_trainticket"
    faults = read_faults(root / "fault_list.json")
    windows = read_traces(expand([root / "fault_windows" / "trace"]))
    free = read_traces(expand([root / "fault_free" / "trace"]))
    scored = detector.score(windows + free)
    report = fault_report(windows + free, scored, faults)
    verdicts = {t.trace_id: v for t, v in zip(windows + free, scored)}

    def on_pod(traces, pod):
        return [t for t in traces if any(s.pod == pod for s in t.spans)]

    def service_ms(traces, service):
        return [(s.end_ns - s.start_ns) / 1e6 for t in traces for s in t.spans if s.service == service and s.parent_id]

    faults_out = []
    for f in faults:
        window = [t for t in on_pod(windows, f.target) if f.start <= _time(t) <= f.start + 180]
        if not window:
            continue
        baseline = on_pod(free, f.target) or [t for t in free if any(s.service == f.service for s in t.spans)]
        now, before = service_ms(window, f.service), service_ms(baseline, f.service)
        faults_out.append({
            "inject_time": _utc(f.start), "service": f.service, "kind": f.kind, "traces": len(window),
            "structural_flagged": _share([any(a.kind == "structural" for a in verdicts[t.trace_id].anomalies) for t in window]),
            "response_time_flagged": _share([any(a.kind == "response_time" for a in verdicts[t.trace_id].anomalies) for t in window]),
            "traces_with_a_label_not_in_training": _share([any(span_label(s) not in training_labels for s in t.spans) for t in window]),
            "traces_with_an_error_span": _share([any("error" in s.operation.lower() for s in t.spans) for t in window]),
            "spans_mean": round(float(np.mean([len(t.spans) for t in window])), 1),
            "spans_mean_fault_free": round(float(np.mean([len(t.spans) for t in baseline])), 1) if baseline else None,
            "service_span_ms_median": round(float(np.median(now)), 2) if now else None,
            "service_span_ms_median_fault_free": round(float(np.median(before)), 2) if before else None})
    free_flags = [verdicts[t.trace_id].anomalous for t in free]
    return {"json": contract(report), "faults": faults_out, "fault_free_traces": len(free),
            "fault_free_flagged": _share(free_flags)}


def throughput(detector: TraceLSTM, traces: list[Trace], seconds: float = 15.0) -> list[dict]:
    out = []
    for batch in (1, 64, 1024):
        started, scored, spans = time.perf_counter(), 0, 0
        while time.perf_counter() - started < seconds:
            chunk = traces[scored % len(traces):scored % len(traces) + batch] or traces[:batch]
            detector.score(chunk)
            scored += len(chunk)
            spans += sum(len(t.spans) for t in chunk)
        elapsed = time.perf_counter() - started
        out.append({"batch": batch, "traces": scored, "traces_per_s": round(scored / elapsed, 1),
                    "spans_per_s": round(spans / elapsed, 1), "load_avg_1m": round(os.getloadavg()[0], 2)})
    return out


def _slow_only(verdicts: list[Verdict]) -> list[Verdict]:
    """The verdicts with the response-time anomalies of spans faster than predicted left out."""
    out = []
    for v in verdicts:
        kept = [a for a in v.anomalies
                if a.kind != "response_time" or a.details["response_time_ms"] > a.details["expected_ms"]]
        out.append(dataclasses.replace(v, anomalous=bool(kept), anomalies=kept))
    return out


def false_alarm_sources(detector: TraceLSTM, parts: dict, evaluation: list[Trace], faults) -> dict:
    """Where the multimodal model's false alarms come from, and what its two rules trade:
    (1) per held-back normal part, what the structural flags saw (label, probability, rank) and
    whether flagged spans were slower or faster than predicted; (2) the real-fault false positives
    split into held-back normal traces and traces near a fault that the labels call normal (no span
    on the injected pod, or outside its 180 s); (3) the real-fault figures with the structural floor
    lowered, and with response-time flags only for spans slower than predicted (the interval's
    z as calibrated, not refitted)."""
    out: dict = {"parts": {}}
    for name in ("test_pre16", "test_post16"):
        verdicts = detector.score(parts[name])
        seen: dict[str, list] = defaultdict(list)
        slower = faster = 0
        for v in verdicts:
            for a in v.anomalies:
                if a.kind == "structural":
                    seen[a.observed].append((a.details.get("probability"), a.details.get("rank")))
                elif a.details["response_time_ms"] > a.details["expected_ms"]:
                    slower += 1
                else:
                    faster += 1
        top = sorted(seen.items(), key=lambda kv: -len(kv[1]))[:4]
        out["parts"][name] = {
            "traces": len(verdicts), "flagged": sum(v.anomalous for v in verdicts),
            "structural": sum(any(a.kind == "structural" for a in v.anomalies) for v in verdicts),
            "response_time": sum(any(a.kind == "response_time" for a in v.anomalies) for v in verdicts),
            "structural_observed": [{"label": label, "flags": len(x),
                                     "median_probability": float(np.median([p for p, _ in x if p is not None])),
                                     "median_rank": float(np.median([r for _, r in x if r is not None]))} for label, x in top],
            "response_time_spans_slower": slower, "response_time_spans_faster": faster}
    from models.tracelstm import abnormal
    truth = [abnormal(t, faults) for t in evaluation]
    near = {id(t) for t in parts["near_faults"]}
    floor = detector.min_probability
    sweep = {}
    try:
        for min_probability in (floor, 0.003, 0.001, 0.0):
            detector.min_probability = min_probability
            verdicts = detector.score(evaluation)
            for rule, vs in (("both", verdicts), ("slow_only", _slow_only(verdicts))):
                j = contract(fault_report(evaluation, vs, faults))
                row = {"trace_f1": j["traces"]["f1"], "precision": j["traces"]["precision"], "recall": j["traces"]["recall"],
                       "false_alarms_per_normal_hour": j["false_alarms_per_normal_hour"],
                       "faults_detected": j["faults"]["detected"],
                       "structural_faults_detected": j["by_kind"]["structural"]["faults"]["detected"]}
                if min_probability == floor and rule == "both":
                    fp = [t for t, v, y in zip(evaluation, vs, truth) if v.anomalous and not y]
                    out["false_positives"] = {"total": len(fp), "near_a_fault": sum(id(t) in near for t in fp),
                                              "held_back_normal": sum(id(t) not in near for t in fp)}
                sweep[f"{f'p < {min_probability:g}' if min_probability else 'top-k alone'}, {rule}"] = row
    finally:
        detector.min_probability = floor
    out["sweep"] = sweep
    return out


# ----------------------------------------------------------------------------------------------
def evaluate(data: Path, seed: int = 1, epochs: int | None = None, progress: bool = False) -> dict:
    started = time.perf_counter()
    day_dir = data / "trainticket_2023-01-30"
    faults = read_faults(day_dir / "fault_list.json")
    day = read_traces(expand([day_dir / "trace"]))
    parts = split(day, faults)
    train = parts["train_pre16"] + parts["train_post16"]
    validation = parts["val_pre16"] + parts["val_post16"]
    tests = parts["test_pre16"] + parts["test_post16"]
    defaults = TraceLSTM()
    report: dict = {"split": describe(parts), "detector_options": DETECTOR, "seed": seed,
                    "defaults": {"top_k": defaults.top_k, "min_probability": defaults.min_probability,
                                 "alarm_rate": defaults.alarm_rate, "epochs": defaults.epochs}}
    options = {**DETECTOR, "seed": seed, "device": "cpu", "progress": progress, **({"epochs": epochs} if epochs else {})}

    models: dict = {}
    training: dict = {}
    for name, head, fit_on, fit_validation in (
            ("multimodal", "multimodal", train, validation), ("sad", "sad", train, validation),
            ("rtad", "rtad", train, validation),
            ("multimodal_paper_time_head", "multimodal", train, validation),
            ("multimodal_before_16h", "multimodal", parts["train_pre16"], parts["val_pre16"])):
        t0 = time.perf_counter()
        # The paper's time head predicts the next response time without the next span's label.
        detector = TraceLSTM(head=head, **options, rt_sees_label=name != "multimodal_paper_time_head")
        stats = detector.fit(fit_on, validation_traces=fit_validation)
        training[name] = {"seconds": round(time.perf_counter() - t0, 1), "traces_trained": stats["traces_trained"],
                          "spans_trained": stats["spans_trained"], "distinct_label_sequences": stats["distinct_label_sequences"],
                          "z": stats.get("z"), "final_loss": stats["final_loss"], "concurrent_pairs": stats["concurrent_pairs"],
                          "certain_transitions": stats["certain_transitions"]}
        models[name] = detector
    models["baseline"] = TransitionBaseline().fit(train)
    report["training"] = training
    mm = models["multimodal"]

    # (a) injections
    rng = random.Random(seed)
    held = [t for regime in ("test_pre16", "test_post16")
            for t in rng.sample(parts[regime], min(INJECTED, len(parts[regime])))]
    vocabulary = sorted({(s.service, s.operation) for t in train for s in t.spans})
    sets = injections(held, vocabulary, seed)
    structural_rows, latency_rows = {}, {}
    for name in ("multimodal", "sad"):
        m = models[name]
        default_k, floor = m.top_k, m.min_probability
        for k in KS:
            # The paper's rule (top-k alone), then the detector's (also flagged below the floor).
            for rule, min_probability in (("", 0.0), (f", p < {floor:g}", floor)):
                m.top_k, m.min_probability = k, min_probability
                structural_rows[f"{name} k={k}{rule}"] = accuracy(m, sets, "structural",
                                                                  by_length=(k == default_k and min_probability == floor))
        m.top_k, m.min_probability = default_k, floor
    structural_rows["baseline"] = accuracy(models["baseline"], sets, "structural", by_length=True)
    for name in ("multimodal", "multimodal_paper_time_head", "rtad"):
        calibrated = models[name].z
        for label, z in (("95%", 1.959964), ("calibrated", calibrated)):
            models[name].z = z
            latency_rows[f"{name} {label} (z={z:.2f})"] = accuracy(models[name], sets, "response_time", by_length=True)
        models[name].z = calibrated
    latency_rows["baseline p99"] = accuracy(models["baseline"], sets, "response_time", by_length=True)
    report["injections"] = {"traces": len(sets["clean"]), "structural": structural_rows, "response_time": latency_rows,
                            "concurrency": concurrency(mm, sets)}

    # (b) real faults, (c) the baseline beside them
    evaluation = parts["near_faults"] + tests
    report["real_faults"] = {name: real_faults(models[name], evaluation, faults)
                             for name in ("multimodal", "multimodal_paper_time_head", "sad", "rtad", "baseline",
                                          "multimodal_before_16h")}
    report["real_faults_traces"] = len(evaluation)
    report["false_alarm_sources"] = false_alarm_sources(mm, parts, evaluation, faults)

    # the 16:00 workload change
    after = parts["test_post16"]
    hours = len(normal_minutes(after, faults)) / 60
    change = {}
    for name in ("multimodal_before_16h", "multimodal"):
        verdicts = models[name].score(after)
        change[name] = {"flagged_per_hour": round(sum(v.anomalous for v in verdicts) / hours, 2),
                        "structural_per_hour": round(sum(any(a.kind == "structural" for a in v.anomalies) for v in verdicts) / hours, 2),
                        "response_time_per_hour": round(sum(any(a.kind == "response_time" for a in v.anomalies) for v in verdicts) / hours, 2),
                        "top_diagnoses": Counter(v.details.get("diagnosis") for v in verdicts if v.anomalous).most_common(3)}
    pre_sequences = {tuple(TransitionBaseline._labels(t)) for t in parts["train_pre16"]}
    change["test_post16_traces"] = len(after)
    change["test_post16_hours"] = round(hours, 2)
    change["test_post16_sequences_unseen_before_16h"] = sum(tuple(TransitionBaseline._labels(t)) not in pre_sequences for t in after)
    report["workload_change"] = change

    report["nezha_2023_01_29"] = nezha(mm, data, set(mm.vocabulary))
    limit_cpu_threads()
    report["throughput_cpu"] = throughput(mm, tests)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["command"] = COMMAND
    return report


def run(ctx) -> dict:
    limit_cpu_threads()
    return {f"{SECTION}.report": evaluate(ctx.data)}


# ----------------------------------------------------------------------------------------------
def _f(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def render(results: dict) -> list[str]:
    rep = results.get(f"{SECTION}.report")
    if rep is None:
        return ["## Trace detector (tracelstm)", "", f"Failed: {results.get(f'{SECTION}.error')}", ""]
    s = rep["split"]
    out = ["## Trace detector (tracelstm): TrainTicket 2023-01-30", "",
           "Time-ordered split of the day's normal traffic (minutes farther than 5 min from any injection), "
           "within each workload regime: 60% train, 15% validation, 25% held back (bench/eval_tracelstm.py). "
           f"Training keeps at most {rep['detector_options']['max_per_sequence']} traces per distinct label sequence, "
           f"weighted; otherwise the detector's defaults (k = {rep['defaults']['top_k']}, structural floor p < "
           f"{rep['defaults']['min_probability']}, response-time interval widened to flag at most "
           f"{rep['defaults']['alarm_rate']} of the validation traces).", "",
           "| part | traces | distinct label sequences | traces whose sequence no training trace has | mean spans | from | to |",
           "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, p in s.items():
        out.append(f"| {name} | {_f(p['traces'])} | {_f(p['distinct_label_sequences'])} | "
                   f"{_f(p['traces_with_a_sequence_not_in_training'])} | {_f(p['spans_mean'], 1)} | {p['from']} | {p['to']} |")
    out += ["", "Training (CPU, one thread): " + "; ".join(
        f"{n} {t['seconds']} s ({_f(t['traces_trained'])} traces, {_f(t['spans_trained'])} spans, z {_f(t['z'], 2)})"
        for n, t in rep["training"].items()) + ".", ""]
    inj = rep["injections"]
    out += [f"### (a) Injected anomalies, {inj['traces']} held-back normal traces", "",
            "Accuracy = injected anomalies flagged at the injected span (the paper's); trace = flagged anywhere; "
            "false alarms = the same traces, clean, flagged the same way.", "",
            "| structural (rule) | accuracy | trace | false alarms | swap | drop | insert |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in inj["structural"].items():
        b = r["by_injection"]
        out.append(f"| {name} | {_f(r['accuracy'])} | {_f(r['trace'])} | {_f(r['false_alarms'])} | {_f(b['swap'])} | "
                   f"{_f(b['drop'])} | {_f(b['insert'])} |")
    d = rep["defaults"]
    out += ["", f"The paper's rule is top-k alone. Here a dropped span's successor is usually among the k most probable "
            f"labels with a tiny probability, so the detector also flags p < {d['min_probability']} (rows `, p < ...`).",
            "", "| response time (x U(2,5)) | accuracy | trace | false alarms |", "| --- | ---: | ---: | ---: |"]
    for name, r in inj["response_time"].items():
        out.append(f"| {name} | {_f(r['accuracy'])} | {_f(r['trace'])} | {_f(r['false_alarms'])} |")
    out += ["", "By trace length (spans), accuracy / false alarms:", "",
            "| model | " + " | ".join(f"{a}-{b}" for a, b in LENGTHS) + " |", "| --- |" + " ---: |" * len(LENGTHS)]
    for table in ("structural", "response_time"):
        for name, r in inj[table].items():
            if "by_length" in r:
                cells = [r["by_length"].get(f"{a}-{b}") for a, b in LENGTHS]
                out.append(f"| {table}: {name} | " + " | ".join(
                    f"{_f(c['accuracy'], 2)} / {_f(c['false_alarms'], 2)} (n={c['traces']})" if c else "–" for c in cells) + " |")
    c = inj["concurrency"]
    out += ["", f"Concurrent siblings (multimodal, the detector's rule): {c['traces_with_concurrent_siblings']} held-back traces have a pair "
            "of sibling spans that ran concurrently; given each other's start times (same execution, other order), "
            f"structurally flagged: {_f(c['reordering']['swapped_flagged'])} with the detector's reordering, "
            f"{_f(c['no_reordering']['swapped_flagged'])} without; the clean traces: {_f(c['reordering']['clean_flagged'])} "
            f"with, {_f(c['no_reordering']['clean_flagged'])} without ({_f(c['traces_reordered'])} of them reordered). "
            f"Concurrent sibling groups named per trace: {_f(c['concurrent_sibling_groups_per_trace'], 2)}.", ""]
    out += [f"### (b, c) The day's 17 real faults ({_f(rep['real_faults_traces'])} traces: all near faults + the held-back normal ones)", "",
            "| model | trace P | trace R | trace F1 | faults detected | within 60 s | median / max s to detect | false alarms per normal hour (hours) | structural F1 | response-time F1 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rep["real_faults"].items():
        j = r["json"]
        t = j["traces"]
        out.append(f"| {name} | {_f(t['precision'])} | {_f(t['recall'])} | {_f(t['f1'])} | {j['faults']['detected']}/{j['faults']['total']} | "
                   f"{r['detected_within_60s']} | {_f(j['faults']['median_seconds_to_detect'], 1)} / {_f(r['max_seconds_to_detect'], 1)} | "
                   f"{_f(j['false_alarms_per_normal_hour'], 1)} ({_f(r['normal_hours'], 2)}) | "
                   f"{_f(j['by_kind']['structural']['traces']['f1'])} | {_f(j['by_kind']['response_time']['traces']['f1'])} |")
    out += ["", "Per fault (multimodal): " + "; ".join(
        f"{p['inject_time'][11:16]} {p['pod'].split('-')[1]} {p['kind']} {p['flagged']}/{p['traces']}"
        + (f" in {p['seconds_to_detect']:.0f} s" if p["seconds_to_detect"] is not None else " missed")
        for p in rep["real_faults"]["multimodal"]["per_fault"]) + ".", ""]
    fa = rep.get("false_alarm_sources")
    if fa:
        fp = fa["false_positives"]
        out += ["### Where the false alarms come from (multimodal)", "",
                f"Of its {_f(fp['total'])} false positives on the real faults, {_f(fp['near_a_fault'])} are traces near a fault "
                f"that the labels call normal (no span on the injected pod, or started after its 180 s) and "
                f"{_f(fp['held_back_normal'])} are held-back normal traces.", "",
                "| held-back part | traces | flagged | structural | response time | response-time spans slower / faster than predicted | labels the structural flags saw most (flags, median p, median rank) |",
                "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for name, p in fa["parts"].items():
            seen = "; ".join(f"{x['label']} ({x['flags']}, {x['median_probability']:.2g}, {x['median_rank']:g})"
                             for x in p["structural_observed"]) or "–"
            out.append(f"| {name} | {_f(p['traces'])} | {_f(p['flagged'])} | {_f(p['structural'])} | {_f(p['response_time'])} | "
                       f"{_f(p['response_time_spans_slower'])} / {_f(p['response_time_spans_faster'])} | {seen} |")
        out += ["", "What the two rules trade on the real faults (the interval's z as calibrated; *slow_only*: response-time "
                "flags only for spans slower than predicted):", "",
                "| structural floor, response time | trace P | trace R | trace F1 | faults detected | faults detected structurally | false alarms per normal hour |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in fa["sweep"].items():
            out.append(f"| {name} | {_f(r['precision'])} | {_f(r['recall'])} | {_f(r['trace_f1'])} | {r['faults_detected']} | "
                       f"{r['structural_faults_detected']} | {_f(r['false_alarms_per_normal_hour'], 1)} |")
        out += ["", "The structural flags in the held-back traffic saw error-handler spans (BasicErrorController.error) "
                "most, where the model gives them a few thousandths: errors that normal TrainTicket traffic also makes, "
                "rarely; then trace ends. A lower floor drops those flags and the structural detection of faults with "
                "them. Flags on spans faster than predicted are part of the faults' signature (a delayed call makes "
                "the model expect its successors slow too), so leaving them out costs recall. Neither rule moves trace "
                "F1 towards 0.9: most false positives are traces near a fault that its labels do not count.", ""]
    w = rep["workload_change"]
    out += ["### The 16:00 workload change", "",
            f"Held-back traffic after 16:00: {_f(w['test_post16_traces'])} traces in {w['test_post16_hours']} h; "
            f"{_f(w['test_post16_sequences_unseen_before_16h'])} of them have a label sequence no pre-16:00 training trace has.", "",
            "| model | flagged per hour | structural per hour | response time per hour | most frequent diagnosis |", "| --- | ---: | ---: | ---: | --- |"]
    for name in ("multimodal_before_16h", "multimodal"):
        r = w[name]
        top = r["top_diagnoses"][0] if r["top_diagnoses"] else None
        out.append(f"| {name} | {_f(r['flagged_per_hour'], 1)} | {_f(r['structural_per_hour'], 1)} | {_f(r['response_time_per_hour'], 1)} | "
                   + (f"{top[0][:120]} ({top[1]})" if top else "–") + " |")
    out += ["", "Trained before 16:00, the model has never seen a trace end where the shorter traces after it end, "
            "nor their request mix: it flags them structurally, per trace (first row). Trained on both regimes it does not "
            "(second row). A change of workload needs retraining on the new traffic (or training data that holds it)."]
    n = rep["nezha_2023_01_29"]
    j = n["json"]
    out += ["", "### nezha_trainticket 2023-01-29 fault windows (the multimodal model above)", "",
            f"JSON: traces P {_f(j['traces']['precision'])} R {_f(j['traces']['recall'])} F1 {_f(j['traces']['f1'])}; faults "
            f"{j['faults']['detected']}/{j['faults']['total']}; fault-free window: {n['fault_free_traces']} traces, "
            f"{_f(n['fault_free_flagged'])} flagged (no normal hour: every minute is within 5 min of an injection).", "",
            "| fault | traces on pod | structural flagged | response time flagged | with a label unseen in training | with an error span | mean spans (fault-free) | service span median ms (fault-free) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for f in n["faults"]:
        out.append(f"| {f['inject_time'][11:16]} {f['service']} {f['kind']} | {f['traces']} | {_f(f['structural_flagged'])} | "
                   f"{_f(f['response_time_flagged'])} | {_f(f['traces_with_a_label_not_in_training'])} | {_f(f['traces_with_an_error_span'])} | "
                   f"{_f(f['spans_mean'], 1)} ({_f(f['spans_mean_fault_free'], 1)}) | {_f(f['service_span_ms_median'], 1)} "
                   f"({_f(f['service_span_ms_median_fault_free'], 1)}) |")
    out += ["", "Which faults do not show in traces: a *return* fault (the service returns a wrong value) leaves the spans "
            "and their timing as they were (no label unseen in training, the service's span latency close to the "
            "fault-free window's), so what is flagged there is about the fault-free window's own rate; an *exception* "
            "shows only where it surfaces as an error-handler span (BasicErrorController.error), a label the normal "
            "2023-01-30 training traffic also holds, so it is flagged only where that span breaks the expected sequence; "
            "CPU contention slows the service's spans and shows as response-time anomalies. Not tuned to any of them."]
    out += ["", "score() on the CPU, held-back traces (one thread; load average of the shared machine noted): " + "; ".join(
        f"batch {t['batch']}: {_f(t['traces_per_s'], 1)} traces/s ({_f(t['spans_per_s'], 0)} spans/s, load {t['load_avg_1m']})"
        for t in rep["throughput_cpu"]) + ".", "",
        f"Command: `{rep['command']}` (or `python -m bench.eval_tracelstm`; {rep['seconds']} s in all)."]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_tracelstm", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, help="override the detector's epochs (quick runs)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if not (args.data / "trainticket_2023-01-30" / "trace").is_dir():
        p.error(f"no trainticket_2023-01-30/trace under {args.data} (use --data)")
    limit_cpu_threads()
    report = evaluate(args.data, seed=args.seed, epochs=args.epochs, progress=args.progress)
    save_report(report, args.json)
    print("\n".join(render({f"{SECTION}.report": report})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
