"""The trace detector (models/tracelstm.py) on a tiny synthetic grammar (tests/tracegrammar.py):
structural and latency anomalies caught, concurrent siblings in another order not flagged, the
paper's concurrency analysis, save/load, batch independence, and the CLI contract.

Small networks and few epochs keep these fast (seconds); ``alarm_rate=0.001`` puts the
response-time bound at the worst of 100 validation traces, so clean traces are not flagged.
"""
from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import random
from datetime import datetime, timezone
from itertools import combinations

import pytest

from models.base import Span, Trace, limit_cpu_threads
from models.tracelstm import TraceLSTM, causal_order, normalise_operation, span_label
from services.cli import main
from tests.tracegrammar import CONCURRENT, SERVICE, grammar_trace, grammar_traces, write_csv

SMALL = dict(hidden=32, embedding=16, epochs=20, top_k=2, lr=1e-2, batch_tokens=256, alarm_rate=0.001)
T0 = 1_675_000_000 * 10**9


def train(**options) -> TraceLSTM:
    limit_cpu_threads()           # with both cores busy, torch's second thread spins (10x slower)
    concurrent = options.pop("concurrent", None)
    detector = TraceLSTM(**{**SMALL, **options})
    detector.fit(grammar_traces(200, seed=0, concurrent=concurrent),
                 validation_traces=grammar_traces(100, seed=1, start_ns=T0 + 400 * 10**9, concurrent=concurrent))
    return detector


@pytest.fixture(scope="module")
def trained() -> TraceLSTM:
    return train()


def fresh(n: int, seed: int = 7, **kwargs) -> list[Trace]:
    rng = random.Random(seed)
    return [grammar_trace(rng, T0 + 10**12 + i * 10**9, **kwargs) for i in range(n)]


def index_of(trace: Trace, operation: str) -> int:
    return next(i for i, s in enumerate(trace.spans) if s.operation == operation)


def structural(verdict):
    return [a for a in verdict.anomalies if a.kind == "structural"]


def test_legal_traces_are_not_flagged(trained):
    traces = fresh(40) + fresh(10, seed=8, concurrent=("price query", "auth check", "seat query", "stock query"))
    verdicts = trained.score(traces)
    assert [v.details.get("diagnosis") for v in verdicts if structural(v)] == []
    # The response-time bound is the worst of 100 validation traces: about 1 in 100 goes past it.
    assert sum(v.anomalous for v in verdicts) <= 2
    assert all(0.0 <= v.score < 1.0 for v in verdicts)
    assert all(v.details["judged"] == len(t.spans) for v, t in zip(verdicts, traces))


def test_dropped_span_is_a_structural_anomaly(trained):
    trace = fresh(1, get=False)[0]
    trace.spans = [s for s in trace.spans if s.operation != "SELECT orders"]
    verdict = trained.score([trace])[0]
    assert verdict.anomalous
    first = verdict.anomalies[0]
    assert (first.kind, first.position, first.observed) == ("structural", 2, "auth auth check")
    assert "db SELECT orders" in [label for label, _ in first.expected]
    assert len(first.expected) == trained.top_k
    assert first.details["previous"] == "orders POST /api/v1/orders"
    assert verdict.details["diagnosis"].startswith("after orders POST /api/v1/orders expected ")
    assert verdict.details["diagnosis"].endswith(", saw auth auth check")


def test_probability_floor_flags_what_top_k_lets_pass(trained):
    trace = fresh(1, get=False)[0]
    trace.spans = [s for s in trace.spans if s.operation != "SELECT orders"]
    k, floor = trained.top_k, trained.min_probability
    try:
        trained.top_k = len(trained.vocabulary)          # every label is in the top k
        trained.min_probability = 0.0
        assert not structural(trained.score([trace])[0])
        trained.min_probability = 0.01
        hit = structural(trained.score([trace])[0])[0]
        assert hit.position == 2 and hit.details["probability"] < 0.01
    finally:
        trained.top_k, trained.min_probability = k, floor


def test_swapped_and_unknown_labels_are_structural_anomalies(trained):
    swapped, unknown = fresh(2, get=False)
    last = index_of(swapped, "INSERT orders")
    swapped.spans[last] = dataclasses.replace(swapped.spans[last], service="cache", operation="cache get")
    unknown.spans[last] = dataclasses.replace(unknown.spans[last], operation="DELETE orders")
    v_swapped, v_unknown = trained.score([swapped, unknown])
    assert [(a.position, a.observed) for a in structural(v_swapped)][:1] == [(last, "cache cache get")]
    hit = structural(v_unknown)[0]
    assert (hit.position, hit.observed, hit.details["unknown"]) == (last, "db DELETE orders", True)
    assert hit.details["diagnosis"].endswith("(never seen in training)")


def test_early_end_is_a_structural_anomaly(trained):
    trace = fresh(1, get=False)[0]
    trace.spans = trace.spans[:index_of(trace, "SELECT orders") + 1]       # stops before the calls
    ends = [a for a in structural(trained.score([trace])[0]) if a.observed == "<end>"]
    assert ends and ends[0].position == len(trace.spans)
    assert {label for label, _ in ends[0].expected} & {f"{SERVICE[op]} {op}" for op in CONCURRENT}


def test_the_end_of_a_cut_trace_is_not_judged(trained):
    # the assembler closed it before its end (evicted, shutdown): where it stops says nothing
    from services.cores.score import trace_of, trace_record

    trace = fresh(1, get=False)[0]
    trace.spans = trace.spans[:index_of(trace, "SELECT orders") + 1]
    assert structural(trained.score([trace])[0])                          # as an ended trace: flagged
    for reason in ("evicted", "shutdown"):
        cut = trace_of(trace_record(trace, closed_reason=reason))
        assert not cut.ended and structural(trained.score([cut])[0]) == []
    assert trace_of(trace_record(trace, closed_reason="gap")).ended


def test_slow_span_is_a_response_time_anomaly(trained):
    clean, slow = fresh(1, seed=3)[0], fresh(1, seed=3, slow="price query", factor=4.0)[0]
    assert not trained.score([clean])[0].anomalous
    verdict = trained.score([slow])[0]
    position = index_of(slow, "price query")
    hits = [a for a in verdict.anomalies if a.kind == "response_time" and a.position == position]
    assert hits, [a.details["diagnosis"] for a in verdict.anomalies]
    details = hits[0].details
    assert details["response_time_ms"] > details["interval_ms"][1] > details["expected_ms"] > details["interval_ms"][0]
    assert details["squared_error"] > details["error_interval"][1]
    assert hits[0].observed == "price price query"
    assert not structural(verdict)


def test_concurrent_siblings_in_another_order_are_not_flagged(trained):
    reversed_order = fresh(20, seed=11, concurrent=CONCURRENT[::-1])
    verdicts = trained.score(reversed_order)
    assert not any(v.anomalous for v in verdicts), [v.details.get("diagnosis") for v in verdicts]


def test_reordering_is_what_keeps_unseen_sibling_orders_from_alarms():
    # Trained on one order only: the model never saw the calls come otherwise.
    detector = train(head="sad", concurrent=CONCURRENT)
    traces = fresh(10, seed=12, concurrent=CONCURRENT[::-1])
    detector.reorder = False
    assert sum(bool(structural(v)) for v in detector.score(traces)) >= 5
    detector.reorder = True
    verdicts = detector.score(traces)
    assert [v.details.get("diagnosis") for v in verdicts if v.anomalous] == []
    moved = verdicts[0].details["reordered"]
    assert moved and all(traces[0].spans[m["span"]].operation in CONCURRENT for m in moved)
    # The moves cannot excuse a real anomaly: drop one of the calls and it is still flagged.
    dropped = copy.deepcopy(traces[0])
    dropped.spans = [s for s in dropped.spans if s.operation != "SELECT orders"]
    assert structural(detector.score([dropped])[0])


def test_concurrency_analysis_finds_the_concurrent_calls(trained):
    label = {op: f"{SERVICE[op]} {op}" for op in CONCURRENT}
    pairs = {tuple(sorted((label[a], label[b]))) for a, b in combinations(CONCURRENT, 2)}
    assert pairs <= set(trained.concurrent)
    assert not any("gateway /*" in pair or "orders POST /api/v1/orders" in pair for pair in trained.concurrent)
    trace = fresh(1, seed=13, concurrent=CONCURRENT[::-1])[0]
    verdict = trained.score([trace])[0]
    calls = {i for i, s in enumerate(trace.spans) if s.operation in CONCURRENT}
    assert any(calls <= set(group) for group in verdict.details["concurrent_siblings"])


def test_certain_transitions(trained):
    # After the cache, the SELECT always follows: a certain (dependent) transition; the first
    # concurrent call never is.
    assert trained.dependent.get(("cache cache get", "db SELECT orders"), 0) >= trained.certain_probability
    assert not any(a == "db SELECT orders" for a, _ in trained.dependent)
    trace = fresh(1, get=True)[0]
    verdict = trained.score([trace])[0]
    select = index_of(trace, "SELECT orders")
    assert any(a <= select <= b for a, b in verdict.details["certain_transitions"])
    calls = [i for i, s in enumerate(trace.spans) if s.operation in CONCURRENT]
    assert not all(any(a <= c <= b for a, b in verdict.details["certain_transitions"]) for c in calls)


def test_heads_judge_their_modality():
    sad, rtad = train(head="sad"), train(head="rtad")
    dropped = fresh(1, get=False)[0]
    dropped.spans = [s for s in dropped.spans if s.operation != "SELECT orders"]
    slow = fresh(1, seed=3, slow="price query", factor=4.0)[0]
    assert {a.kind for a in sad.score([dropped])[0].anomalies} == {"structural"}
    assert not sad.score([slow])[0].anomalous
    rt_kinds = {a.kind for a in rtad.score([slow])[0].anomalies}
    assert rt_kinds == {"response_time"}
    assert not any(a.kind == "structural" for v in rtad.score([dropped, slow]) for a in v.anomalies)


def test_verdicts_do_not_depend_on_the_batch(trained):
    traces = fresh(30, seed=21) + fresh(5, seed=22, slow="stock query", factor=5.0)
    broken = copy.deepcopy(traces[3])
    broken.spans = broken.spans[:4]
    traces.append(broken)
    together = trained.score(traces)
    for trace, verdict in zip(traces, together):
        alone = trained.score([trace])[0]
        assert alone.anomalous == verdict.anomalous
        assert [(a.position, a.kind) for a in alone.anomalies] == [(a.position, a.kind) for a in verdict.anomalies]
        assert alone.score == pytest.approx(verdict.score, abs=1e-5)
    assert sum(v.anomalous for v in together) >= 6


def test_save_and_load_give_identical_verdicts(trained, tmp_path):
    trained.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["detector"] == "tracelstm" and manifest["weights"] == "weights.safetensors"
    assert not list((tmp_path / "model").glob("*.pt")) and not list((tmp_path / "model").glob("*.pkl"))
    loaded = TraceLSTM.load(tmp_path / "model", device="cpu")
    traces = fresh(10, seed=31) + fresh(3, seed=32, slow="auth check", factor=4.0) + fresh(3, seed=33, concurrent=CONCURRENT[::-1])
    assert loaded.score(traces) == trained.score(traces)
    json.dumps([dataclasses.asdict(v) for v in loaded.score(traces)])     # alerts carry them as JSON


def test_options_are_checked():
    with pytest.raises(ValueError, match="head"):
        TraceLSTM(head="dense")
    with pytest.raises(ValueError, match="top_k"):
        TraceLSTM(top_k=0)
    with pytest.raises(ValueError, match="unknown option"):
        TraceLSTM().fit(grammar_traces(5), window=3)
    with pytest.raises(ValueError, match="no normal trace"):
        TraceLSTM().fit([])


def test_operations_are_normalised_as_the_paper_does():
    assert normalise_operation("GET https://1.1.1.11/v2/a16d/servers/detail?x=1") == "GET /v2/{id}/servers/detail"
    assert normalise_operation("/api/v1/orders/8812") == "/api/v1/orders/{id}"
    assert normalise_operation("/u/0f8fad5b-d9cb-469f-a165-70867728950e/x") == "/u/{id}/x"
    assert normalise_operation("/api/v1/travel2service/trips/{tripId}") == "/api/v1/travel2service/trips/{tripId}"
    assert normalise_operation("SELECT ts.orders") == "SELECT ts.orders"
    span = Span("a", None, "ts-order-service", "pod", "GET /api/v1/orders/77", 0, 1, status=2)
    assert span_label(span) == "ts-order-service GET /api/v1/orders/{id} status=2"


def test_a_child_never_comes_before_its_parent():
    # A server span stamped at millisecond resolution starts "before" the client span that called it.
    parent = Span("p", "root", "a", "a-0", "HTTP GET", 1_000_400_000, 1_009_000_000)
    child = Span("c", "p", "b", "b-0", "/api/x", 1_000_000_000, 1_008_000_000)
    root = Span("root", None, "gw", "gw-0", "/*", 999_000_000, 1_010_000_000)
    trace = Trace("t", sorted([parent, child, root], key=lambda s: (s.start_ns, s.span_id)))
    assert [trace.spans[i].span_id for i in causal_order(trace)] == ["root", "p", "c"]


# ----------------------------------------------------------------------------------------------
# the CLI contract
FAULT_POD = "ts-price-service-5dc8d4f9fd-abcde"       # tests.tracegrammar.write_csv names pods so


def _utc(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture
def trace_files(tmp_path):
    """train/: 200 normal traces, plus 20 within 5 minutes after the injection; test/: 10
    minutes of normal traces, then a fault window whose traces are slow on the price pod."""
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    train_dir.mkdir()
    test_dir.mkdir()
    inject = T0 + 3600 * 10**9
    write_csv(train_dir / "00.csv.gz", grammar_traces(200, seed=0, every_s=2.0))
    write_csv(train_dir / "01.csv", grammar_traces(20, seed=5, start_ns=inject + 10**9, every_s=5.0))
    normal = grammar_traces(120, seed=2, start_ns=inject - 1800 * 10**9, every_s=5.0)
    window = grammar_traces(60, seed=3, start_ns=inject + 10**9, every_s=2.5, slow="price query", factor=6.0)
    write_csv(test_dir / "test.csv", normal + window)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"00": [{"inject_time": _utc(inject), "inject_timestamp": str(inject // 10**9),
                                          "inject_pod": FAULT_POD, "inject_type": "network_delay"}]}))
    return train_dir, test_dir, faults, len(normal), len(window)


def test_cli_train_and_evaluate(trace_files, tmp_path):
    train_dir, test_dir, faults, normal, window = trace_files
    out, report = tmp_path / "model", tmp_path / "out.json"
    assert main(["train", "--detector", "tracelstm", "--traces", str(train_dir), "--out", str(out),
                 "--exclude-faults", str(faults), "--epochs", "3", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["traces_excluded_near_faults"] == 20
    assert manifest["training"]["traces_given"] == 200
    assert [s["role"] for s in manifest["training_data"]] == ["train", "train"]
    assert main(["evaluate", "--detector", "tracelstm", "--model", str(out), "--traces", str(test_dir / "test.csv"),
                 "--faults", str(faults), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert set(result) == {"traces", "faults", "false_alarms_per_normal_hour", "by_kind"}
    assert set(result["traces"]) == {"tp", "fp", "tn", "fn", "precision", "recall", "f1"}
    assert set(result["faults"]) == {"total", "detected", "median_seconds_to_detect"}
    assert set(result["by_kind"]) == {"structural", "response_time"}
    t = result["traces"]
    assert t["tp"] + t["fn"] == window and t["fp"] + t["tn"] == normal     # every window trace touches the price pod
    assert result["faults"]["total"] == 1
    assert isinstance(result["false_alarms_per_normal_hour"], float)
    assert manifest["detector"] == json.loads((out / "manifest.json").read_text())["detector"]
    assert len(json.loads((out / "manifest.json").read_text())["evaluations"]) == 1


def test_cli_bad_input_is_one_line(trace_files, tmp_path, capsys):
    train_dir, test_dir, faults, _, _ = trace_files
    bad = tmp_path / "bad.csv"
    bad.write_text((test_dir / "test.csv").read_text() + "x,y,z,p,o,notanumber,2,3\n")
    assert main(["train", "--detector", "tracelstm", "--traces", str(bad), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a span row" in err
    assert main(["evaluate", "--detector", "tracelstm", "--model", str(tmp_path / "nothing"), "--traces", str(bad),
                 "--json", str(tmp_path / "o.json")]) == 2
    assert main(["train", "--detector", "tracelstm", "--out", str(tmp_path / "m2")]) == 2
    assert "needs --traces" in capsys.readouterr().err
    gz = tmp_path / "broken.csv.gz"
    gz.write_bytes(gzip.compress(b"TraceID,SpanID\n")[:-4])
    assert main(["train", "--detector", "tracelstm", "--traces", str(gz), "--out", str(tmp_path / "m3")]) == 2
