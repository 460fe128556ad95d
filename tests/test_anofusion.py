"""AnoFusion on synthetic instances: a metric spike, a log burst and a latency shift are caught,
normal minutes are not, presence of data is no signal, verdicts survive save/load and do not
depend on the batch, and the CLI contract works on a tiny TrainTicket-like data directory."""
from __future__ import annotations

import csv
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from models.anofusion import AnoFusion, Schema
from models.base import Chunk, LogEvent, TraceStats
from models.chunks import ChunkOptions, Observations

STEP = 60.0
STEPS = 6
T0 = 1_675_000_000 // 60           # an epoch minute
SMALL = dict(steps=STEPS, hidden=8, epochs=6, batch_size=128, lr=1e-2, variants=("all",))
POD_A = "ts-alpha-service-5d8f7c9b6d-abcde"
POD_B = "ts-beta-service-7c6b5a4d3e-fghij"
POD_A_OTHER_DAY = "ts-alpha-service-5d8f7c9b6d-zzzzz"      # renamed: found by its service


# --------------------------------------------------------------------------------------------
# synthetic instances
def log_steps(rng: random.Random, n: int, spacing: tuple[int, int]) -> set[int]:
    """Logs as TrainTicket has them: only in bursts of three steps, now and then."""
    present = set()
    k = rng.randrange(3, spacing[0])
    while k < n:
        present.update(range(k, min(n, k + 3)))
        k += rng.randrange(*spacing)
    return present


RARE_LOGS = (40, 80)              # steps between log bursts in training (and the faulty day)
SCARCE_LOGS = (200, 201)          # two bursts in training: too few to learn the service's logs from


def add_series(obs: Observations, pod: str, n: int, seed: int, first: int = T0, spacing=RARE_LOGS,
               spike: int | None = None, burst: int | None = None, shift: int | None = None) -> list[int]:
    """n normal steps of one pod into ``obs`` (metrics, traces, logs in bursts ``spacing``
    steps apart); optionally a CPU spike, a burst of ERROR lines of an unseen template, or a
    latency shift at one step."""
    rng = random.Random(seed)
    logs = log_steps(rng, n, spacing)
    if burst is not None:
        logs.add(burst - first)
    events = obs.logs.setdefault(pod, [])
    for i in range(n):
        step = first + i
        cpu = 20 + 5 * np.sin(2 * np.pi * step / 60) + rng.gauss(0, 0.8)
        obs.metrics.setdefault(pod, {})[step] = {
            "CpuUsageRate(%)": cpu * (6 if step == spike else 1),
            "MemoryUsage(Mi)": 300 + rng.gauss(0, 2),
            "NetworkReceiveBytes": 1000 * (1 + 0.1 * np.sin(2 * np.pi * step / 60)) + rng.gauss(0, 20)}
        slow = 12 if step == shift else 1
        obs.traces.setdefault(pod, {})[step] = TraceStats(
            spans=int(50 + rng.gauss(0, 3)), errors=0, p50_ms=(8 + rng.gauss(0, 0.4)) * slow,
            p90_ms=(20 + rng.gauss(0, 1)) * slow, p99_ms=(40 + rng.gauss(0, 2)) * slow,
            gap_p50_ms=(3 + rng.gauss(0, 0.2)) * slow * 20, gap_p90_ms=(5 + rng.gauss(0, 0.3)) * slow * 20,
            gap_p99_ms=(9 + rng.gauss(0, 0.5)) * slow * 20)
        if i in logs:
            for j in range(int(20 + rng.gauss(0, 2))):
                template = ("T1", "T2", "T3")[j % 3]
                events.append(LogEvent(step * STEP + j, template, f"request {template} <*>", "INFO"))
        if step == burst:
            events.extend(LogEvent(step * STEP + 0.1 * j, "Tfail", "connection refused <*>", "ERROR")
                          for j in range(150))
    events.sort(key=lambda e: e.timestamp)
    obs.traced_steps = sorted(set(obs.traced_steps) | set(range(first, first + n)))
    obs.channels = ["CpuUsageRate(%)", "MemoryUsage(Mi)", "NetworkReceiveBytes"]
    obs._log_times.clear()
    return list(range(first + STEPS, first + n))


def new_obs() -> Observations:
    return Observations(ChunkOptions(step_s=STEP, steps=STEPS))


@pytest.fixture(scope="module")
def trained() -> AnoFusion:
    obs = new_obs()
    chunks = []
    for seed, (pod, spacing) in enumerate(((POD_A, SCARCE_LOGS), (POD_B, RARE_LOGS))):
        for step in add_series(obs, pod, 420, seed, spacing=spacing):
            chunks.append(obs.chunk(pod, step))
    detector = AnoFusion(**SMALL, device="cpu")
    detector.fit(chunks)
    return detector


@pytest.fixture(scope="module")
def faulty():
    """Another day: pod A renamed, a CPU spike, a log burst and a latency shift at known steps."""
    obs = new_obs()
    first = T0 + 10_000
    spike, burst, shift = first + 40, first + 70, first + 100
    steps = add_series(obs, POD_A_OTHER_DAY, 130, seed=7, first=first, spike=spike, burst=burst, shift=shift)
    return obs, steps, {"spike": spike, "burst": burst, "shift": shift}


def test_each_fault_is_caught_and_normal_minutes_are_not(trained, faulty):
    obs, steps, at = faulty
    verdicts = dict(zip(steps, trained.score([obs.chunk(POD_A_OTHER_DAY, s) for s in steps])))
    for kind, step in at.items():
        assert verdicts[step].anomalous, (kind, verdicts[step].score, verdicts[step].details)
    # what an operator reads first: the channel that moved
    top = {kind: verdicts[step].details["channels"][0]["channel"] for kind, step in at.items()}
    assert top["spike"] == "metric:CpuUsageRate(%)"
    assert top["burst"].startswith("log:")
    assert top["shift"].startswith("trace:")
    assert verdicts[at["spike"]].details["known_service"]           # the renamed pod's service
    # normal minutes: the steps whose window holds none of the faults
    clean = [s for s in steps if all(not (s - STEPS < f <= s) for f in at.values())]
    flagged = [s for s in clean if verdicts[s].anomalous]
    assert len(clean) > 80 and len(flagged) <= 1, flagged


def test_presence_of_logs_is_not_a_signal(trained):
    """Logs come and go in bursts, as TrainTicket's exist only in fault windows: the alpha
    service logged in two bursts of training only, here it logs every 10-20 steps, every value
    normal. A detector that flags "logs present" scores F1 1.0 against presence; AnoFusion's
    verdicts and scores must not follow presence. (A model that reads absent logs as zero
    lines learns "alpha logs nothing" and flags every burst here.)"""
    obs = new_obs()
    steps = add_series(obs, POD_A, 300, seed=11, first=T0 + 20_000, spacing=(10, 20))
    chunks = [obs.chunk(POD_A, s) for s in steps]
    present = np.array([c.present()["logs"][-1] for c in chunks])
    assert 0.1 < present.mean() < 0.5
    verdicts = trained.score(chunks)
    flagged = np.array([v.anomalous for v in verdicts])
    scores = np.array([v.score for v in verdicts])
    tp = int((flagged & present).sum())
    f1 = 2 * tp / (2 * tp + int((flagged & ~present).sum()) + int((~flagged & present).sum()))
    assert f1 < 0.1, (f1, flagged.sum())
    # the ranking does not separate present from absent either (AUC near 0.5)
    ranks = scores.argsort().argsort()
    auc = (ranks[present].mean() - (present.sum() - 1) / 2) / (~present).sum()
    assert 0.3 < auc < 0.7, auc


def test_absent_steps_are_masked_not_zero(trained):
    obs = new_obs()
    steps = add_series(obs, POD_B, 60, seed=3, first=T0 + 30_000)
    chunk = obs.chunk(POD_B, steps[-1])
    schema = trained.variants["all"].schema
    values, present = schema.values(chunk, trained.templates.get(chunk.service))
    logs = [j for j, n in enumerate(schema.names) if n.startswith("log:")]
    for i, step_has_logs in enumerate(chunk.present()["logs"]):
        assert present[i, logs].all() == step_has_logs
        if not step_has_logs:
            assert np.isnan(values[i, logs]).all()            # absent, not 0 lines
    # a step with no sample at all is absent in every channel, and the verdict still comes
    gap = Chunk(chunk.entity, chunk.service, chunk.start, chunk.end, STEP,
                metrics={c: v[:-2] + [None, v[-1]] for c, v in chunk.metrics.items()},
                traces=chunk.traces[:-2] + [None, chunk.traces[-1]],
                logs=[e for e in chunk.logs if chunk.step_of(e.timestamp) != STEPS - 2])
    assert not schema.values(gap, None)[1][-2].any()
    assert len(trained.score([gap])) == 1


def test_verdicts_do_not_depend_on_the_batch(trained, faulty):
    obs, steps, at = faulty
    chunks = [obs.chunk(POD_A_OTHER_DAY, s) for s in steps]
    alone = trained.score([chunks[40]])[0]
    together = trained.score(chunks)[40]
    assert alone.score == pytest.approx(together.score, rel=1e-5)
    assert alone.anomalous == together.anomalous


def test_save_load_round_trip(trained, faulty, tmp_path):
    obs, steps, _ = faulty
    chunks = [obs.chunk(POD_A_OTHER_DAY, s) for s in steps]
    trained.parse_state = b'{"format": "stand-in"}'
    trained.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["detector"] == "anofusion" and manifest["modality"] == "chunks"
    assert manifest["chunk_options"]["steps"] == STEPS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "parse_state.json", "weights.safetensors"]
    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as fh:
        assert any(k.startswith("all.net.") for k in fh.keys())
    loaded = AnoFusion.load(tmp_path, device="cpu")
    assert loaded.parse_state == trained.parse_state
    before, after = trained.score(chunks), loaded.score(chunks)
    assert [v.anomalous for v in before] == [v.anomalous for v in after]
    assert [v.score for v in before] == pytest.approx([v.score for v in after], rel=1e-6)


def test_unknown_options_and_short_chunks_are_refused(trained):
    with pytest.raises(ValueError, match="unknown option"):
        AnoFusion().fit([], colour="blue")
    short = Chunk(POD_A, "ts-alpha-service", 0.0, 3 * STEP, STEP)
    with pytest.raises(ValueError, match="steps"):
        trained.score([short])


def test_schema_names_channels_by_modality():
    schema = Schema(("metrics", "traces"), ["CpuUsageRate(%)"])
    assert schema.names[0] == "metric:CpuUsageRate(%)"
    assert "trace:gap_p50_ms" in schema.names and not any(n.startswith("log:") for n in schema.names)


# --------------------------------------------------------------------------------------------
# the CLI on a tiny data directory laid out as TrainTicket's
MINUTES = 200
FAULT_MINUTE = 150                # the fault on pod A: minutes 151..153 abnormal (180 s from hh:mm:10)


def write_day(root: Path, pods: dict[str, str], seed: int, fault: bool) -> Path:
    """metric/<pod>_metric.csv, trace/*.csv.gz (root span on a gateway, child on the pod) and
    log/*.csv (Docker JSON lines, in bursts) for MINUTES minutes; with ``fault``, pod A's calls
    take 2 s longer for 3 minutes from FAULT_MINUTE:10 and its CPU jumps."""
    rng = random.Random(seed)
    (root / "metric").mkdir(parents=True)
    (root / "trace").mkdir()
    (root / "log").mkdir()
    t0 = T0 * 60
    fault_start = t0 + FAULT_MINUTE * 60 + 10
    in_fault = (lambda t: fault and fault_start <= t < fault_start + 180)
    header = "Time,TimeStamp,PodName,CpuUsageRate(%),MemoryUsage(Mi),PodWorkload(Ops)\n"
    for name, pod in pods.items():
        rows = [header]
        for m in range(MINUTES):
            ts = t0 + m * 60 + 53
            cpu = 20 + rng.gauss(0, 1) + (60 if name == "a" and in_fault(ts - 30) else 0)
            rows.append(f"x,{ts},{pod},{cpu:.3f},{300 + rng.gauss(0, 2):.3f},{5 + rng.gauss(0, 0.3):.3f}\n")
        (root / "metric" / f"{pod}_metric.csv").write_text("".join(rows))
    spans, logs, n = [], [], 0
    for m in range(MINUTES):
        for k in range(8):
            for name, pod in pods.items():
                start = (t0 + m * 60 + 7 * k + 1) * 10**9
                own = int((8 + rng.gauss(0, 0.5)) * 1e6)
                gap = int((3 + rng.gauss(0, 0.2)) * 1e6) + (2_000_000_000 if name == "a" and in_fault(start / 1e9) else 0)
                trace = f"{n:032x}"
                n += 1
                spans.append([trace, f"{n:016x}r", "root", "ts-gateway-service-6f6cfc45b-h5m2n", "/*",
                              start, start + own + gap, (own + gap) // 1000])
                spans.append([trace, f"{n:016x}c", f"{n:016x}r", pod, "GET", start + gap // 2,
                              start + gap // 2 + own, own // 1000])
        if m % 20 in (3, 4, 5) or (fault and FAULT_MINUTE <= m < FAULT_MINUTE + 4):
            for name, pod in pods.items():
                for j in range(6):
                    t = t0 + m * 60 + 9 * j + 0.5
                    clock = f"{(int(t) // 3600 + 8) % 24:02d}:{int(t) // 60 % 60:02d}:{int(t) % 60:02d}.250"
                    line = f"{clock} INFO  c.s.AlphaServiceImpl#4{j % 3} TraceID: {n:032x} SpanID: {n:016x} [get][query {j % 3}][id: {rng.randrange(1000)}]"
                    logs.append([f"{t}", str(int(t * 1e9)), "10.0.0.1", pod, "server", "", "",
                                 json.dumps({"log": line + "\n", "stream": "stdout", "time": "x"})])
    with gzip.open(root / "trace" / "12.csv.gz", "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["TraceID", "SpanID", "ParentID", "PodName", "OperationName", "StartTimeUnixNano",
                    "EndTimeUnixNano", "Duration"])
        w.writerows(spans)
    with open(root / "log" / "12_00_log.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Timestamp", "TimeUnixNano", "Node", "PodName", "Container", "TraceID", "SpanID", "Log"])
        w.writerows(logs)
        w.writerow(["x", "1", "n", pods["a"], "server", "", "", "{\"log\": broken json"])   # malformed line
    faults = {"12": [{"inject_time": _utc(fault_start), "inject_timestamp": str(fault_start),
                      "inject_pod": pods["a"], "inject_type": "network_delay"}]} if fault else {}
    (root / "fault_list.json").write_text(json.dumps(faults))
    return root


def _utc(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    logwarden = Path(sys.executable).with_name("logwarden")
    return subprocess.run([str(logwarden), *argv], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "LOGWARDEN_DEVICE": "cpu"})


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    root = tmp_path_factory.mktemp("days")
    train = write_day(root / "day1" / "nested", {"a": POD_A, "b": POD_B}, seed=1, fault=True)
    test = write_day(root / "day2", {"a": POD_A_OTHER_DAY, "b": "ts-beta-service-7c6b5a4d3e-qqqqq"}, seed=2, fault=True)
    return root / "day1", train / "fault_list.json", test, test / "fault_list.json"


def test_cli_train_and_evaluate_contract(days, tmp_path):
    day1, faults1, day2, faults2 = days
    model = tmp_path / "model"
    done = run_cli("train", "--detector", "anofusion", "--data", str(day1), "--out", str(model),
                   "--exclude-faults", str(faults1), "--epochs", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trained anofusion")
    assert "anofusion all: epoch 8/8" in done.stderr          # progress goes to stderr
    manifest = json.loads((model / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"metrics", "metrics+traces", "all"}
    assert manifest["training_data"][0]["excluded_faults"]
    out = tmp_path / "out.json"
    done = run_cli("evaluate", "--detector", "anofusion", "--model", str(model), "--data", str(day2),
                   "--faults", str(faults2), "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result) == {"units", "faults", "by_modality"}
    assert set(result["units"]) == {"tp", "fp", "tn", "fn", "precision", "recall", "f1"}
    assert set(result["by_modality"]) == {"metrics", "metrics+traces", "all"}
    assert result["faults"] == {"total": 1, "detected": 1}
    units = result["units"]
    assert units["tp"] + units["fn"] == 3                  # pod A, the three minutes from inject_time
    # every minute of pods a, b and the gateway (traces only) holds traces
    assert units["tp"] + units["fp"] + units["tn"] + units["fn"] == 3 * MINUTES
    assert units["tp"] >= 2 and units["fp"] <= 6, units
    assert result["by_modality"]["all"]["units"] == units


def test_cli_errors_are_one_line(days, tmp_path):
    day1, faults1, _, _ = days
    done = run_cli("train", "--detector", "anofusion", "--out", str(tmp_path / "m"))
    assert done.returncode == 2 and "--data" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("train", "--detector", "anofusion", "--data", str(empty), "--out", str(tmp_path / "m"))
    assert done.returncode == 2 and "no metric/, trace/ or log/" in done.stderr
    bad = tmp_path / "faults.json"
    bad.write_text("[1, 2]")
    done = run_cli("train", "--detector", "anofusion", "--data", str(day1), "--out", str(tmp_path / "m"),
                   "--exclude-faults", str(bad))
    assert done.returncode == 2 and "fault list" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_bench_folds_cover_the_day_and_hold_whole_fault_windows():
    from bench.eval_anofusion import fold_blocks, fold_of
    from models.faults import Fault

    first, last = 0.0, 40_000.0
    faults = [Fault(s, s + 180, f"ts-x-service-5d8f7c9b6d-{i:05d}", "network_delay")
              for i, s in enumerate((5_000.0, 5_500.0, 6_000.0, 6_450.0))]
    blocks = fold_blocks(faults, first, last)
    assert blocks[0][0] == first and blocks[-1][1] == last
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))         # no gap, no overlap
    assert {fold for *_, fold in blocks} == {0, 1}
    # each fault window lies inside one block; neighbouring faults fall in different folds
    folds = []
    for f in faults:
        inside = {fold_of(int(t // 60), 60.0, blocks) for t in range(int(f.start), int(f.end), 60)}
        assert len(inside) == 1
        folds.append(inside.pop())
    assert folds == [folds[0], 1 - folds[0], folds[0], 1 - folds[0]]


def test_fault_outcomes_count_a_fault_only_when_a_unit_of_its_pod_was_judged_in_it():
    from models.anofusion import fault_outcomes, unit_labels
    from models.faults import Fault

    start = T0 * STEP
    faults = [Fault(start, start + 180, POD_A, "cpu"),                   # judged, flagged at its 2nd minute
              Fault(start + 600, start + 780, POD_A, "delay"),           # judged, never flagged
              Fault(start, start + 180, "ts-gamma-service-1a2b3c4d5e-klmno", "cpu")]   # no unit of its pod
    units = [(POD_A, T0), (POD_A, T0 + 1), (POD_B, T0 + 1), (POD_A, T0 + 10), (POD_A, T0 + 20)]
    assert unit_labels(units, faults, STEP) == [1, 1, 0, 1, 0]
    flagged = [False, True, True, False, True]          # POD_B and minute 20 are false alarms
    assert fault_outcomes(units, flagged, faults, STEP) == {"total": 2, "detected": 1}
    assert fault_outcomes(units, [False] * 5, faults, STEP) == {"total": 2, "detected": 0}
