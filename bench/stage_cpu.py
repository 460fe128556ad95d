"""Where a stage's CPU goes, without Kafka (issue 18): the parse and sessions stages' own
``process`` on batches of real records. Set beside the CPU a whole stage process spends per record
in the end-to-end run (`e2e.*.cpu_s` in bench/results.json, less its start-up), what is left is
the shell's, the Kafka client's and the broker round trips' share.

    python -m bench.stage_cpu --data ../shared/datasets --model DEEPLOG_DIR [--json OUT] [--top 12]

Input: HDFS_20000.log dealt round-robin to three hosts (bench.e2e_bench.scale_hdfs, one copy)
and encoded as Filebeat records as `logwarden replay` writes them, the hosts' lines interleaved as
live hosts ship them (bench.overload_bench.filebeat_records), so no event comes late. The parse stage's
``process`` runs on them in batches of 2,000 (its template caches warm from a first pass, its
dedup marks fresh each pass: every line is new to it, as in a stream), with the compiled hot path
where it is installed and, in the same run, on its pure-Python path; its outputs, events and
watermark records, are the sessions stage's input, judged by the DeepLog in DEEPLOG_DIR with the
HDFS template catalog (the end-to-end run's settings: a session gap of 3,600 s, the garbage
collector tuned as every stage tunes it; a watermark grace of 0, since a pass lasts less than
the default 2 s). Figures: CPU microseconds per input record, best of ``--passes`` passes;
then one pass under cProfile: the ``--top`` functions by their own time, with their own and
cumulative shares (profiling slows every call, so read the shares, not the seconds).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import tempfile
import time
from pathlib import Path

from bench import save_report

COMMAND = "python -m bench.stage_cpu --data ../shared/datasets --model DEEPLOG_DIR"
BATCH = 2000


def _records(data: Path, workdir: Path):
    from bench.e2e_bench import scale_hdfs
    from bench.overload_bench import filebeat_records
    from services.shell import Record

    log = data / "hdfs" / "HDFS_20000.log"
    files = scale_hdfs(log, workdir / "hosts", 20_000).files        # one copy: the log itself
    return [Record(topic, 0, i, key, value, 1_700_000_000_000 + i)
            for i, (topic, key, value) in enumerate(filebeat_records(files))]


def _batches(records):
    return [records[i:i + BATCH] for i in range(0, len(records), BATCH)]


def _cpu_per_record(prepare, records, passes: int) -> float:
    """``prepare()`` makes a pass's fresh state (not timed: loading a model is no record's work)
    and returns the pass itself."""
    best = float("inf")
    for _ in range(passes):
        run_pass = prepare()
        started = time.process_time()
        run_pass()
        best = min(best, time.process_time() - started)
    return best / len(records) * 1e6


def _profile(prepare, top: int) -> list[dict]:
    run_pass = prepare()
    profile = cProfile.Profile()
    profile.enable()
    run_pass()
    profile.disable()
    stats = pstats.Stats(profile)
    total = sum(row[2] for row in stats.stats.values()) or 1.0      # own time of every function
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    out = []
    for (path, line, name), (_, calls, own, cumulative, _) in rows:
        where = f"{Path(path).relative_to(Path.cwd()) if path.startswith(str(Path.cwd())) else path}:{line} {name}"
        out.append({"function": where, "calls": calls, "own_share": round(own / total, 3),
                    "cumulative_share": round(cumulative / total, 3)})
    return out


def run(data: Path, model: Path, passes: int = 3, top: int = 12) -> dict:
    from models import artifacts
    from services.settings import load_settings
    from services.shell import Out, Record, tune_gc
    from services.stages import ParseStage, SessionsStage

    with tempfile.TemporaryDirectory(prefix="stage-cpu-") as tmp:
        workdir = Path(tmp)
        artifacts.publish(model, workdir / "models", "deeplog")
        common = {"model_dir": workdir / "models", "template_catalog": data / "hdfs" / "HDFS_templates.csv",
                  "session_gap_s": 3600, "watermark_grace_s": 0}
        settings = load_settings(state_dir=workdir / "state", **common)
        records = _records(data, workdir)
        parse = ParseStage(settings)
        # the same stage on its pure-Python path (the compiled hot path's reference), same run
        python_parse = ParseStage(load_settings(state_dir=workdir / "state-py", native_parse=False, **common))
        events = []
        for batch in _batches(records):                   # warms the template caches, makes the events
            events += [o for o in parse.process(batch) if type(o) is Out]
        event_records = [Record(settings.events_topic, 0, i, o.key.encode() if isinstance(o.key, str) else o.key,
                                o.value, 1_700_000_000_000 + i) for i, o in enumerate(events)]
        thresholds = gc.get_threshold()
        tune_gc()                                          # as every stage does (services.shell)

        def pass_of(stage):
            def parse_pass():
                stage.marks = {}                         # every line new again; caches stay warm

                def run_pass():
                    for batch in _batches(records):
                        stage.process(batch)
                return run_pass
            return parse_pass

        parse_pass = pass_of(parse)
        python_parse_pass = pass_of(python_parse)
        python_parse_pass()()                  # its caches warm too, as the first one's are from making the events

        outputs = {}

        def sessions_pass():
            stage = SessionsStage(settings)              # fresh books, the model loaded

            def run_pass():
                outputs["sessions"] = sum(len(stage.process(batch)) for batch in _batches(event_records))
            return run_pass

        try:
            result = {"records": len(records), "event_records": len(event_records), "passes": passes,
                      "parse": {"cpu_us_per_record": round(_cpu_per_record(parse_pass, records, passes), 2),
                                "native": parse._hot is not None,
                                "python_path_cpu_us_per_record": round(_cpu_per_record(python_parse_pass, records, passes), 2),
                                "profile": _profile(parse_pass, top)},
                      "sessions": {"cpu_us_per_record": round(_cpu_per_record(sessions_pass, event_records, passes), 2),
                                   "profile": _profile(sessions_pass, top)}}
        finally:                                           # a test process goes on afterwards
            gc.unfreeze()
            gc.set_threshold(*thresholds)
        result["sessions"]["outputs"] = outputs["sessions"]
    return {"command": COMMAND, "nproc": os.cpu_count(), **result}


def render(report: dict) -> list[str]:
    out = [f"`{report['command']}`: {report['records']:,} Filebeat records -> {report['event_records']:,} event "
           f"records, CPU per input record (best of {report['passes']} passes):", ""]
    for stage in ("parse", "sessions"):
        st = report[stage]
        path = (" (compiled hot path)" if st.get("native") else " (native module not installed)") if stage == "parse" else ""
        out.append(f"- {stage} `process`{path}: {st['cpu_us_per_record']} µs")
        if stage == "parse":
            out.append(f"- parse `process` on its pure-Python path (`LOGWARDEN_NATIVE_PARSE=false`): "
                       f"{st['python_path_cpu_us_per_record']} µs")
    out.append("")
    for stage in ("parse", "sessions"):
        out += [f"{stage} under cProfile, by own time:", "", "| function | calls | own | cumulative |",
                "| --- | ---: | ---: | ---: |"]
        out += [f"| `{r['function']}` | {r['calls']:,} | {r['own_share']:.1%} | {r['cumulative_share']:.1%} |"
                for r in report[stage]["profile"]]
        out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("LOGWARDEN_DATASETS", "../shared/datasets")))
    ap.add_argument("--model", type=Path, required=True, help="a DeepLog model directory (manifest.json)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (args.model / "manifest.json").exists():
        ap.error(f"--model {args.model}: no manifest.json there (a directory `logwarden train --detector deeplog` wrote)")
    report = run(args.data.resolve(), args.model.resolve(), args.passes, args.top)
    save_report(report, args.json)
    print("\n".join(render(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
