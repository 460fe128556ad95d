"""The benchmark code (bench/e2e_bench.py, bench/run.py) on tiny inputs: the scaled input is what
it claims, and a run through the real broker produces every results.json key with figures that
agree with the input."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bench import e2e_bench, run as bench_run

BLOCK = re.compile(r"blk_-?\d+")


def _stamp(line: str) -> float:
    return datetime.strptime(line[:13], "%y%m%d %H%M%S").replace(tzinfo=timezone.utc).timestamp()


def test_scaled_copies_have_their_own_blocks_and_follow_each_other_in_time(datasets, tmp_path):
    src = datasets / "hdfs" / "HDFS_20000.log"
    original = src.read_text().splitlines()
    scaled = e2e_bench.scale_hdfs(src, tmp_path, 45_000, hosts=("a", "b", "c"))

    assert (scaled.lines, scaled.copies) == (45_000, 3)
    per_host = {h: p.read_text().splitlines() for h, p in scaled.files.items()}
    assert [len(v) for v in per_host.values()] == [15_000, 15_000, 15_000]
    merged = [per_host["abc"[i % 3]][i // 3] for i in range(45_000)]     # undo the round-robin deal
    assert merged[:20_000] == original                                   # copy 0 is the log itself

    blocks = [set(BLOCK.findall(" ".join(merged[c * 20_000:(c + 1) * 20_000]))) for c in range(3)]
    assert len(blocks[0]) == len(blocks[1]) == 1782
    assert not blocks[0] & blocks[1] and not blocks[1] & blocks[2] and not blocks[0] & blocks[2]
    # copy 1 is copy 0 with the shift added to every timestamp and a suffix on every block id
    for before, after in zip(original[::997], merged[20_000:40_000:997]):
        assert _stamp(after) - _stamp(before) == scaled.shift_s
        assert BLOCK.sub("B", after[13:]) == BLOCK.sub("B", before[13:])
    assert scaled.shift_s > scaled.span_s                                # copies do not overlap
    assert max(map(_stamp, merged[:20_000])) < min(map(_stamp, merged[20_000:40_000]))


def test_percentiles_use_nearest_rank():
    values = list(range(1, 101))
    got = e2e_bench.percentiles(values, "ms")
    assert (got["p50_ms"], got["p95_ms"], got["p99_ms"], got["max_ms"], got["n"]) == (50, 95, 99, 100, 100)
    assert e2e_bench.percentiles([], "ms")["p95_ms"] is None


@pytest.fixture
def tiny_model_dir(datasets, tmp_path) -> Path:
    """A DeepLog trained for one epoch on a few sessions: enough to score windows."""
    from models import artifacts
    from models.data import read_sessions, read_templates, to_sequences
    from models.deeplog import DeepLog

    hdfs = datasets / "hdfs"
    templates = read_templates(hdfs / "HDFS_templates.csv")
    model = DeepLog(g=5, hidden=16, embedding=8, epochs=1, param_epochs=1, device="cpu")
    model.fit(to_sequences(read_sessions(hdfs / "deeplog_hdfs_train")[:200], templates), templates=templates)
    model.save(tmp_path / "trained")
    artifacts.publish(tmp_path / "trained", tmp_path / "models")
    return tmp_path / "models"


@pytest.mark.slow
def test_e2e_bench_through_the_broker_gives_every_key(kafka_bootstrap, datasets, tiny_model_dir, tmp_path):
    lines = 3_000
    result = e2e_bench.measure_throughput(kafka_bootstrap, datasets, tmp_path, tiny_model_dir, lines,
                                          stage_seconds=300, whole_seconds=300, whole_lines=lines,
                                          profile_seconds=1)
    assert result["replay"]["lines"] == lines
    parse, window, detect = result["parse"], result["window"], result["detect"]
    assert parse["lines"] == parse["outputs"] == lines and parse["lines_per_s"] > 0
    head = (datasets / "hdfs" / "HDFS_20000.log").read_text().splitlines()[:lines]
    blocks = len(set(BLOCK.findall("\n".join(head))))
    assert window["events"] == lines and window["events_per_s"] > 0
    # one sliding window per event, plus the sessions closed before the stage stopped
    assert window["outputs"] == lines + window["session_windows"] and window["session_windows"] <= blocks
    # Every window reached detect. Its rate is sampled from committed offsets every 0.5 s, and a
    # tiny input can be done within one sample, so the rate may be unmeasurable here (None/0);
    # the 2M-line run in BENCHMARKS.md measures it.
    assert detect["windows"] == window["outputs"] and "windows_per_s" in detect
    assert not any(r["capped"] for r in (parse, window, detect))
    whole = result["whole"]
    assert whole["completed"] and whole["lines_per_s"] > 0
    assert whole["events"] == lines and whole["windows"] == lines + blocks   # every session whole, judged
    assert whole["session_windows"] == blocks
    for stage in ("parse", "window", "detect"):
        profile = result["profile"][stage]
        assert profile["top_self"] and all(0 <= row["self_pct"] <= 100 for row in profile["top_self"])

    latency = e2e_bench.measure_latency(kafka_bootstrap, datasets, tmp_path, tiny_model_dir, rate=1500,
                                        lines=1_500, detect_batch=8, drain_s=120)
    assert latency["replayed_lines"] == latency["lines_with_window"] == 1_500
    assert latency["windows"] >= latency["windows_judged"] >= 1_500      # every sliding window judged
    assert latency["open_alerts"] > 0 and latency["n"] == latency["open_alerts"]
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    hops, every = latency["hops_ms"], latency["every_line_ms"]
    assert hops["parse"]["n"] == hops["window"]["n"] == hops["detect"]["n"] > 0
    assert every["parse"]["n"] == every["line_to_window"]["n"] == 1_500
    assert every["parse"]["p50_ms"] <= every["line_to_window"]["p50_ms"]


def test_benchmarks_md_keeps_the_hand_written_part(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(bench_run, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    (tmp_path / "BENCHMARKS.md").write_text("# Mine\n\nkept as written\n\n" + bench_run.GENERATED_MARKER + "\nold\n")
    bench_run.write({"e2e.parse.lines_per_s": 12_345, "latency.p95_ms": 300.0, "machine": {"nproc": 2}})
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.startswith("# Mine\n\nkept as written\n")
    assert "old" not in text.split(bench_run.GENERATED_MARKER)[1]
    assert "| 12,345 | >= 100,000 | **not met** |" in text
    assert "| 300.0 ms | < 250 ms | **not met** |" in text
    assert "| parse core vs drain3 (`parse.ratio_vs_drain3`) | – | >= 3x | not measured |" in text
