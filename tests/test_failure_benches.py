"""bench/eval_failures.py and bench/overload_bench.py without a broker: their figures from given
records, and their tables from a report (the runs themselves are benchmarks, minutes long)."""
from __future__ import annotations

import json

from bench import eval_failures, overload_bench
from bench.stream_rig import Stage, process_memory_mb


def test_percentiles_and_delays_by_id():
    assert eval_failures._percentiles([]) == {}
    p = eval_failures._percentiles([float(x) for x in range(1, 101)])
    assert (p["p50"], p["p95"], p["p99"], p["max"], p["n"]) == (51.0, 96.0, 100.0, 100.0, 100)
    clean = {"windows": {"arrival_s": {"a": 10.0, "b": 11.0, "c": 12.0}}}
    late = {"windows": {"arrival_s": {"a": 10.5, "b": 15.0}}}       # c lost: no delay figure for it
    d = eval_failures.delays(clean, late, "windows")
    assert d["n"] == 2 and d["max"] == 4.0


def _scenario(lost=0, dup=0, copies=0):
    part = {"reference": 10, "lost": lost, "duplicated": dup, "redelivered_copies": copies}
    return {"events": {**part, "latency_s": {"p99": 0.5, "max": 0.7}}, "windows": dict(part), "finals": dict(part),
            "delay_vs_clean": {"events_latency_p99_s": 0.25, "events_latency_max_s": 1.0,
                               "windows_s": {"p50": 0.1, "max": 2.0}, "finals_s": {"max": 1.5}}}


def test_failure_table_has_a_row_per_scenario_and_the_command():
    report = {"command": "python -m bench.eval_failures --lines 9", "lines": 9, "hosts": 3, "rate_per_host": 500,
              "idle_close_s": 30.0, "outage_s": 4.0, "nproc": 2, "load_avg_1m_at_end": 1.0,
              "scenarios": {"clean": _scenario(), "broker_sigkill": _scenario(copies=7)}}
    text = "\n".join(eval_failures.render({"failures.report": report}))
    assert "`python -m bench.eval_failures --lines 9`" in text
    assert "| broker_sigkill | none | 0 / 0 / 7 (of 10) |" in text and "| clean | none |" in text
    assert "Not measured." in "\n".join(eval_failures.render({}))
    json.dumps(report)


def test_overload_table_names_each_stage_and_its_bound():
    stage = {"baseline_rss_mb": 50.0, "peak_rss_mb": 120.0, "baseline_plus_queues_mb": 146.0}
    # parse consumed 1,000 lines: 200 by t=1 (HWM 70), 400 by t=2 (HWM 90), all by t=3 (HWM 120)
    series = [{"t": t, "parse.end": 1000, "parse.lag": lag, "parse.hwm_mb": hwm,
               "sessions.end": None, "sessions.lag": None, "sessions.hwm_mb": None}
              for t, lag, hwm in ((1, 800, 70.0), (2, 600, 90.0), (3, 0, 120.0))]
    run = {"consumer_queue_mb": 32, "producer_queue_mb": 64, "lines": 1000, "input_lines_per_s": 30000,
           "worked_off_lines_per_s": 4000, "overload_factor": 7.5, "drained": True, "drain_after_burst_s": 3.0,
           "max_lag": {"parse": 900, "sessions": 800}, "stages": {"parse": stage, "sessions": stage},
           "series": series}
    text = "\n".join(overload_bench.render({"command": "cmd", "nproc": 2, "load_avg_1m_at_end": 1.0, "runs": [run]}))
    # the peak once 30 % of the input was consumed (the first sample with >= 300 lines: 90 MB)
    assert "| 32 : 64 | 1,000 | 30,000 | 4,000 | 7.5x | parse | 50.0 | 90.0 | 120.0 | 146.0 | 900 | 3.0 |" in text
    assert "| sessions | 50.0 | - | 120.0 |" in text          # no sample of it: no figure, not a guess


def test_a_stage_process_is_run_logged_and_stopped_and_memory_read_from_proc(tmp_path):
    import os

    stage = Stage("--help", os.environ.copy(), tmp_path / "help.log")
    stage.proc.wait(60)
    assert not stage.alive() and stage.stop() == 0 and stage.log_has("usage")
    assert stage.memory_mb() is None                       # gone
    rss, peak = process_memory_mb(os.getpid())
    assert 5 < rss <= peak
