"""`make bench`: every benchmark, into bench/results.json and BENCHMARKS.md.

    python -m bench.run --data ../shared/datasets [--only parse,e2e,...] [--lines N]

Sections (``--only`` picks some; the figures of the others are kept from the previous
results.json, never invented):
  parse     bench.parse_bench: parse core vs drain3, grouping accuracy
  sessions  bench.sessions_bench: the sessions core (window + detect fused): memory per open
            session, changelog bytes, events/s alone and with DeepLog judging
  e2e       bench.e2e_bench: every stage through a real broker as a ratio of a pass-through stage
            measured in the same run (and of a hand-written consumer -> drain3 -> producer), the
            whole pipeline against a chain of pass-throughs, with profiles
  latency   bench.e2e_bench: alert latency at a steady replay rate
  deeplog   bench.deeplog_eval with the demo's DeepLog model
  attgru    bench.attgru_eval (when that module exists)
  feedback  bench.feedback_eval (it trains its own DeepLog, as its command does)
  ...       one section per bench/eval_<name>.py module: SECTION (its name), run(ctx) -> flat
            "<SECTION>." keys, render(results) -> markdown lines, and optionally NEEDS_MODELS

Models: the demo's (`make demo` trains them into .cache/demo-models once; this trains them the
same way when missing), published into a temporary MODEL_DIR. Kafka: LOGWARDEN_KAFKA_BOOTSTRAP,
else a broker of its own in a temporary directory, stopped at the end.

BENCHMARKS.md = the hand-written part above GENERATED_MARKER (kept as it is) + what
``render`` writes from results.json below it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results.json"
BENCHMARKS = REPO_ROOT / "BENCHMARKS.md"
GENERATED_MARKER = "<!-- Everything below is written by `python -m bench.run` from bench/results.json. -->"
BUILTIN_SECTIONS = ("parse", "sessions", "e2e", "latency", "deeplog", "attgru", "feedback")
NEEDS_MODELS = {"sessions", "e2e", "latency", "deeplog"}


def plugin_sections() -> dict:
    """Sections contributed by bench/eval_<name>.py modules (one per detector or study), by name."""
    found = {}
    for path in sorted((REPO_ROOT / "bench").glob("eval_*.py")):
        module = importlib.import_module(f"bench.{path.stem}")
        if hasattr(module, "SECTION"):     # (an eval that needs recordings made by hand is run by hand)
            found[module.SECTION] = module
    return found


PLUGINS = plugin_sections()
SECTIONS = BUILTIN_SECTIONS + tuple(PLUGINS)
NEEDS_MODELS |= {name for name, module in PLUGINS.items() if getattr(module, "NEEDS_MODELS", False)}
# issue 18's targets: ratios to the pass-through measured in the same run, and absolute latency/memory
TARGETS = {"parse": 3.0, "parse_ratio": 0.8, "sessions_ratio": 0.5, "whole_ratio": 0.5,
           "latency_p95_ms": 250.0, "latency_rate": 10_000, "bytes_per_open_session": 1024}


def default_data_dir() -> Path:
    return Path(os.environ.get("LOGWARDEN_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def machine() -> dict:
    info = {"uname": " ".join(platform.uname()), "nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        info["uname"] = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    for path, prefix, key in (("/proc/cpuinfo", "model name", "cpu"), ("/proc/meminfo", "MemTotal", "memory")):
        try:
            line = next(x for x in Path(path).read_text().splitlines() if x.startswith(prefix))
            info[key] = line.split(":", 1)[1].strip()
        except (OSError, StopIteration):
            pass
    if "memory" in info and info["memory"].endswith(" kB"):
        info["memory"] = f"{int(info['memory'][:-3]) / 1024 ** 2:.1f} GiB"
    return info


# ------------------------------------------------------------------------------------------
# models and broker
def provide_models(data: Path) -> dict[str, Path]:
    """detector -> trained model directory: the demo's cached models (trained the demo's way when
    missing). Without ATT-GRU (its training failing) DeepLog alone, the newest cached one."""
    from toolkit import demo

    cache = REPO_ROOT / ".cache" / "demo-models"
    try:
        return demo.train_models(data, cache)
    except Exception as err:                      # ATT-GRU is trained after DeepLog
        print(f"bench: ATT-GRU model unavailable ({type(err).__name__}: {err}); DeepLog only", file=sys.stderr)
        deeplogs = sorted(cache.glob("deeplog-*/manifest.json"), key=lambda m: m.stat().st_mtime)
        if not deeplogs:
            raise
        return {"deeplog": deeplogs[-1].parent}


def model_dir_with(models: dict[str, Path], names: tuple[str, ...], root: Path) -> Path:
    """A MODEL_DIR serving ``names`` (one version each), as `logwarden model publish` makes it."""
    from models import artifacts

    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in models:
            artifacts.publish(models[name], root)
    return root


class Broker:
    """LOGWARDEN_KAFKA_BOOTSTRAP, else a local broker of our own for the bench's duration."""

    def __init__(self, workdir: Path):
        from toolkit import localkafka

        self.own = None
        self.bootstrap = os.environ.get("LOGWARDEN_KAFKA_BOOTSTRAP")
        if not self.bootstrap:
            self.own = localkafka.start(workdir / "kafka", die_with_parent=True)
            self.bootstrap = self.own.bootstrap

    def close(self) -> None:
        if self.own is not None:
            self.own.stop()


# ------------------------------------------------------------------------------------------
# sections: each returns flat results.json keys, all starting with "<section>."
def section_parse(ctx) -> dict:
    from bench import parse_bench

    result = parse_bench.run(ctx.data)
    result["parse.markdown"] = parse_bench.markdown(result)
    return result


def section_sessions(ctx) -> dict:
    from bench import sessions_bench

    return sessions_bench.run(ctx.data, ctx.model_dir(("deeplog",)))


def section_e2e(ctx) -> dict:
    from bench import e2e_bench

    # DeepLog alone in detect: the latency figure is specified for it, and throughput with it
    # is comparable run to run whether or not an ATT-GRU model exists.
    result = e2e_bench.run(ctx.data, ctx.broker().bootstrap, ctx.model_dir(("deeplog",)), lines=ctx.lines,
                           stage_seconds=ctx.stage_seconds, whole_seconds=ctx.whole_seconds, sections=("e2e",))
    result["e2e.command"] = f"python -m bench.run --only e2e --lines {ctx.lines}"
    return result


def section_latency(ctx) -> dict:
    from bench import e2e_bench

    result = e2e_bench.run(ctx.data, ctx.broker().bootstrap, ctx.model_dir(("deeplog",)), sections=("latency",))
    result["latency.command"] = "python -m bench.run --only latency"
    return result


def section_deeplog(ctx) -> dict:
    from bench import deeplog_eval

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "deeplog.json"
        deeplog_eval.main(["--data", str(ctx.data), "--model", str(ctx.models()["deeplog"]), "--out", str(out)])
        report = json.loads(out.read_text())
    report["command"] = "python -m bench.deeplog_eval --model <the demo's DeepLog> --out OUT"
    return {"deeplog.report": report}


def section_attgru(ctx) -> dict:
    try:
        module = importlib.import_module("bench.attgru_eval")
    except ImportError as err:
        return {"attgru.not_measured": f"bench/attgru_eval.py not importable: {err}"}
    if not hasattr(module, "run"):
        return {"attgru.not_measured": "bench/attgru_eval.py has no run(data) entry point"}
    from models.base import limit_cpu_threads

    limit_cpu_threads()                           # as its own main() does
    report = module.run(ctx.data)
    return {"attgru.report": report, "attgru.command": getattr(module, "COMMAND", "python -m bench.attgru_eval")}


def section_feedback(ctx) -> dict:
    from bench import feedback_eval

    # Its own model, as its command trains it: the demo's DeepLog (larger g) has next to no
    # false positives on the reported half to learn from.
    report = feedback_eval.run(ctx.data)
    return {"feedback.report": report, "feedback.markdown": feedback_eval.markdown(report)}


class Context:
    """What sections share, made on first use: models, MODEL_DIRs, the broker."""

    def __init__(self, args, workdir: Path):
        self.data, self.lines, self.workdir = args.data, args.lines, workdir
        self.stage_seconds, self.whole_seconds = args.stage_seconds, args.whole_seconds
        self._models = self._broker = None
        self._model_dirs: dict[tuple, Path] = {}

    def models(self) -> dict[str, Path]:
        if self._models is None:
            self._models = provide_models(self.data)
        return self._models

    def model_dir(self, names: tuple[str, ...]) -> Path:
        if names not in self._model_dirs:
            self._model_dirs[names] = model_dir_with(self.models(), names, self.workdir / ("models-" + "-".join(names)))
        return self._model_dirs[names]

    def broker(self) -> Broker:
        if self._broker is None:
            self._broker = Broker(self.workdir)
        return self._broker

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()


# ------------------------------------------------------------------------------------------
def run_sections(args, sections: list[str], previous: dict) -> list[str]:
    """Run the sections, writing the files after each; returns the sections that failed (their
    previous figures are replaced by the error: figures from another run would mislead)."""
    results, failed = dict(previous), []
    with tempfile.TemporaryDirectory(prefix="logwarden-bench-") as tmp:
        ctx = Context(args, Path(tmp))
        try:
            for name in sections:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                if name in NEEDS_MODELS:
                    ctx.models()                      # trained once, outside the section's time
                load_before = os.getloadavg()
                started = time.perf_counter()
                try:
                    run = PLUGINS[name].run if name in PLUGINS else globals()[f"section_{name}"]
                    figures = run(ctx)
                except Exception as err:              # the other sections still run
                    traceback.print_exc()
                    failed.append(name)
                    figures = {f"{name}.error": f"{type(err).__name__}: {err}"}
                for key in [k for k in results if k.startswith(name + ".")]:
                    del results[key]                  # a section's figures come from one run
                results.update(figures)
                results[f"{name}.date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                results[f"{name}.seconds"] = round(time.perf_counter() - started, 1)
                results[f"{name}.load_avg"] = {"before_1m_5m_15m": [round(x, 2) for x in load_before],
                                               "after_1m_5m_15m": [round(x, 2) for x in os.getloadavg()]}
                results["machine"] = machine()
                write(results)                        # a later section failing keeps these
        finally:
            ctx.close()
    return failed


def write(results: dict) -> None:
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    BENCHMARKS.write_text(preamble() + "\n" + GENERATED_MARKER + "\n\n" + render(results))


def preamble() -> str:
    if BENCHMARKS.exists():
        text = BENCHMARKS.read_text()
        if GENERATED_MARKER in text:
            return text.split(GENERATED_MARKER, 1)[0].rstrip() + "\n"
    return "# Benchmarks\n\n`make bench` (`python -m bench.run --data ../shared/datasets`) writes this file.\n"


# ------------------------------------------------------------------------------------------
# BENCHMARKS.md from results.json
def _memo_line(r: dict) -> str:
    memo = (r.get("sessions.judged.memo") or {}).get("deeplog")
    plain = r.get("sessions.judged_no_memo.events_per_cpu_s")
    if not memo or not plain:
        return ""
    same = r.get("sessions.judged_no_memo.alerts") == r.get("sessions.judged.alerts")
    return (f"; the judge's normal memo answered {_fmt(memo['hits'])} of {_fmt(memo['hits'] + memo['misses'])} "
            f"verdicts and held {_fmt(memo['entries'])} windows and sessions at the end; without it "
            f"{_fmt(plain)} events per CPU second ({_fmt(r.get('sessions.judged_no_memo.alerts'))} alert records"
            f"{', the same count' if same else ''})")


def _commit_samples(r: dict) -> str:
    samples = r.get("e2e.sessions.commit_samples") or []
    moved = [pair for i, pair in enumerate(samples) if i == 0 or pair[1] != samples[i - 1][1] or i == len(samples) - 1]
    return ", ".join(f"{t} s: {c:,}" for t, c in moved) or "none"


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _sub(r: dict, prefix: str) -> dict:
    """The flattened keys under ``prefix`` as a dict (results.json is one flat namespace)."""
    return {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}


def _unit(value, digits: int, unit: str) -> str:
    return _fmt(value, digits) + (unit if isinstance(value, (int, float)) else "")


def _met(value, target, lower_is_better=False) -> str:
    if value is None or isinstance(value, str):
        return "not measured"
    ok = value < target if lower_is_better else value >= target
    return "met" if ok else "**not met**"


def _when(r: dict, section: str) -> str:
    load = r.get(f"{section}.load_avg", {})
    return (f"measured {r.get(f'{section}.date', '?')} in {r.get(f'{section}.seconds', '?')} s; "
            f"load average (1/5/15 min) before {load.get('before_1m_5m_15m')}, after {load.get('after_1m_5m_15m')}")


def render(r: dict) -> str:
    out = []
    m = r.get("machine", {})
    out += ["## Machine", "",
            f"- `uname -a`: `{m.get('uname', '?')}`",
            f"- CPU: {m.get('cpu', '?')}, nproc {m.get('nproc', '?')}; memory {m.get('memory', '?')}; "
            f"Python {m.get('python', '?')}; no GPU",
            "- Shared with other jobs: the load average at each section's start and end is given "
            "with it (2 cores: a load above 2 means the benchmark waited for CPU).", ""]

    out += ["## Targets", "",
            "Issue 18's targets are ratios to a pass-through stage (bench/passthrough.py: the same shell, "
            "consume and produce the same bytes) measured in the same run: the machine is shared and "
            "noisy, a ratio moves less than a rate.", "",
            "| figure | measured | target | |", "| --- | ---: | ---: | --- |"]
    ratio = r.get("parse.ratio_vs_drain3")
    out.append(f"| parse core vs drain3 (`parse.ratio_vs_drain3`) | {_unit(ratio, 2, 'x')} | >= 3x | {_met(ratio, TARGETS['parse'])} |")
    pt = r.get("e2e.passthrough.records_per_s")
    out.append(f"| one pass-through stage (`e2e.passthrough.records_per_s`) | {_fmt(pt)} records/s | reference | |")
    for key, label, target in (("parse_to_passthrough", "parse stage / pass-through (`e2e.parse.lines_per_s` "
                                f"{_fmt(r.get('e2e.parse.lines_per_s'))} lines/s)", "parse_ratio"),
                               ("sessions_to_passthrough", "sessions stage (window + detect fused, DeepLog) / pass-through "
                                f"(`e2e.window.records_per_s` = `e2e.detect.records_per_s` = {_fmt(r.get('e2e.sessions.records_per_s'))})",
                                "sessions_ratio"),
                               ("sessions_to_passthrough_events", "sessions stage / pass-through of the same event "
                                f"records (`e2e.passthrough_events.records_per_s` {_fmt(r.get('e2e.passthrough_events.records_per_s'))}): "
                                "its own input's limit; the row above is the issue's reference", "sessions_ratio"),
                               ("whole_to_chain3", "whole pipeline / chain of three pass-throughs (`e2e.lines_per_s` "
                                f"{_fmt(r.get('e2e.lines_per_s'))}, `e2e.passthrough_chain.records_per_s` "
                                f"{_fmt(r.get('e2e.passthrough_chain.records_per_s'))})", "whole_ratio"),
                               ("whole_to_chain2", "whole pipeline / chain of two pass-throughs (as many hops as the pipeline)",
                                "whole_ratio")):
        value = r.get(f"e2e.ratios.{key}")
        out.append(f"| {label} | {_fmt(value, 3)} | >= {TARGETS[target]} | {_met(value, TARGETS[target])} |")
    for key, label in (("parse_to_passthrough_cpu", "parse stage / pass-through, per CPU second"),
                       ("drain3_peer_to_passthrough_cpu", "drain3 peer / pass-through, per CPU second"),
                       ("sessions_to_passthrough_events_cpu", "sessions stage / pass-through of events, per CPU second")):
        if r.get(f"e2e.ratios.{key}") is not None:
            out.append(f"| {label} (`e2e.ratios.{key}`) | {_fmt(r.get(f'e2e.ratios.{key}'), 3)} | not a target: "
                       "the stage's own cost, which wall rates hide once the broker sets the pace | |")
    p95 = r.get("latency.p95_ms")
    rate = r.get("latency.lines_per_s")
    out.append(f"| alert latency p95 (`latency.p95_ms`) at `latency.lines_per_s` {_fmt(rate)} lines/s "
               f"(asked: {_fmt(r.get('latency.rate_lines_per_s'))}) | {_unit(p95, 1, ' ms')} | < 250 ms at 10,000 lines/s "
               f"| {_met(p95, TARGETS['latency_p95_ms'], lower_is_better=True) if (rate or 0) >= 0.95 * TARGETS['latency_rate'] else ('**not met** (rate not reached)' if rate else 'not measured')} |")
    live = r.get("latency.realtime.steady.p95_ms")
    if live is not None:
        out.append(f"| the same at a live cluster's pace (`latency.realtime.steady.p95_ms`: event time as fast as the replay, "
                   f"allowed lateness {_fmt(r.get('latency.realtime.allowed_lateness_s'), 1)} s; with "
                   f"{_fmt(r.get('latency.realtime_lateness.allowed_lateness_s'), 1)} s: "
                   f"{_unit(r.get('latency.realtime_lateness.steady.p95_ms'), 1, ' ms')}) | {_unit(live, 1, ' ms')} "
                   f"| < 250 ms | {_met(live, TARGETS['latency_p95_ms'], lower_is_better=True)}: an event waits the allowed "
                   "lateness in wall time (Alert latency below) |")
    per = r.get("sessions.bytes_per_open_session")
    out.append(f"| memory per open HDFS session (`sessions.bytes_per_open_session`) | {_unit(per, 0, ' bytes')} | < 1 KB "
               f"| {_met(per, TARGETS['bytes_per_open_session'], lower_is_better=True)} |")
    out.append("")
    errors = {k.split(".")[0]: v for k, v in r.items() if k.endswith(".error")}
    if errors:
        out += ["Sections that failed in their last run (no figures): "
                + "; ".join(f"{name}: `{err}`" for name, err in errors.items()), ""]

    if "parse.lines_per_s" in r:
        out += ["## Parse: parse core vs drain3", "", r.get("parse.markdown", ""), "",
                f"Command: `{r.get('parse.command')}` ({_when(r, 'parse')}). Rates are lines per CPU second "
                "of the benchmark process (best of the repeats), so neighbours on the machine do not count; "
                f"the wall-clock figures are beside them. Per-run ratios: {r.get('parse.ratio_vs_drain3_per_run')}.", ""]

    if "e2e.lines" in r:
        out += _render_e2e(r)
    if "latency.p50_ms" in r:
        out += _render_latency(r)

    if "sessions.memory.bytes_per_open_session" in r:
        out += ["## Sessions core: state per open session, events/s", "",
                f"- `sessions.bytes_per_open_session`: **{_fmt(r['sessions.bytes_per_open_session'])} bytes** "
                f"(tracemalloc after a checkpoint, {_fmt(r.get('sessions.memory.open_sessions'))} open HDFS sessions of "
                f"{_fmt(r.get('sessions.memory.events_per_session'), 1)} events on average: framed msgpack rows, "
                "event ids, the gap heap's entry, the session object); the decoded-tail cache (the h newest steps "
                f"of up to 4,096 recently judged sessions, bounded whatever the open sessions) held "
                f"{_fmt(r.get('sessions.memory.tail_cache_bytes'))} bytes for {_fmt(r.get('sessions.memory.tail_cache_sessions'))} sessions",
                f"- changelog: {_fmt(r.get('sessions.memory.changelog_bytes_per_open_session'))} bytes per open session "
                "(keys + values a new owner of the partition reads back)",
                f"- core alone (take, release, close; no judging): {_fmt(r.get('sessions.core.events_per_cpu_s'))} events per CPU second",
                f"- with DeepLog judging every released event and every closed session (CPU, batches of 2,000): "
                f"{_fmt(r.get('sessions.judged.events_per_cpu_s'))} events per CPU second "
                f"({_fmt(r.get('sessions.judged.alerts'))} alert records)" + _memo_line(r),
                f"- on a GPU: {r.get('sessions.gpu', 'not measured')}", "",
                f"Command: `{r.get('sessions.command')}` ({_when(r, 'sessions')}).", ""]

    if "deeplog.report" in r:
        out += _render_deeplog(r)
    if "attgru.report" in r:
        out += _render_attgru(r)
    elif "attgru.not_measured" in r:
        out += ["## ATT-GRU evaluation", "", f"Not measured: {r['attgru.not_measured']}.", ""]
    if "feedback.report" in r:
        out += ["## Feedback: DeepLog's online update", "", r.get("feedback.markdown", ""), "",
                f"Command: `{r['feedback.report'].get('command')}` ({_when(r, 'feedback')}).", ""]
    for name, module in PLUGINS.items():
        if any(k.startswith(name + ".") and not k.endswith((".date", ".seconds", ".load_avg", ".error")) for k in r):
            out += list(module.render(r))
            out += ["", f"({_when(r, name)}.)", ""]
    return "\n".join(out) + "\n"


def _render_e2e(r: dict) -> list[str]:
    def g(key, digits=0):
        return _fmt(r.get(f"e2e.{key}"), digits)

    out = ["## End to end through Kafka: every stage beside a pass-through", "",
           f"{g('lines')} HDFS lines ({g('copies')} copies of HDFS_20000.log, block ids re-mapped, timestamps shifted "
           f"{g('copy_shift_s')} s per copy) dealt over {g('hosts')} hosts, pre-produced with replay at "
           f"**{g('replay.lines_per_s')} lines/s** ({g('replay.seconds', 1)} s). Then, one after the other in the same run, "
           "each process alone on its input: a pass-through stage run once to warm the broker's JVM, then the measured one "
           "(logwarden's shell, same bytes out), the hand-written "
           "consumer -> drain3 -> producer, the parse stage; on parse's output a pass-through of the events and the "
           "sessions stage (window and detect fused, DeepLog served); then chains of pass-throughs and the whole "
           "pipeline at once on fresh topics and groups.", "",
           "| process | input | consumed | rate (wall) | / pass-through | per CPU-s | CPU s | capped |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    pt = r.get("e2e.passthrough.records_per_s")
    pt_events = r.get("e2e.passthrough_events.records_per_s")
    rows = (("passthrough_warmup", "pass-through first, to warm the broker (in no ratio)", "logs", pt),
            ("passthrough", "pass-through (reference)", "logs", pt), ("drain3_peer", "consumer -> drain3 -> producer", "logs", pt),
            ("parse", "parse stage", "logs", pt), ("passthrough_events", "pass-through of events (reference)", "events", pt_events),
            ("sessions", "sessions stage (DeepLog)", "events", pt_events),
            ("passthrough_last", "pass-through again, last in the run (the reference's drift)", "logs", pt))
    for key, label, source, ref in rows:
        rate = r.get(f"e2e.{key}.records_per_s")
        if f"e2e.{key}.records" not in r:
            continue
        share = _fmt(rate / ref, 3) if rate and ref else "–"
        out.append(f"| {label} | {source} | {g(f'{key}.records')} | {_fmt(rate)}/s | {share} | {g(f'{key}.records_per_cpu_s')} "
                   f"| {g(f'{key}.cpu_s', 1)} | {'yes' if r.get(f'e2e.{key}.capped') else 'no'} |")
    out += ["", "| all at once | lines | rate (wall) | CPU s per process |", "| --- | ---: | ---: | --- |"]
    for key, label in (("passthrough_chain", "three pass-throughs, logs -> a -> b -> c"),
                       ("passthrough_chain2", "two pass-throughs, logs -> a -> b"),
                       ("whole", "the pipeline: parse + sessions")):
        if f"e2e.{key}.lines" not in r:
            continue
        rate = r.get(f"e2e.{key}.records_per_s", r.get(f"e2e.{key}.lines_per_s"))
        done = "" if r.get(f"e2e.{key}.completed") else " (capped: estimated)"
        out.append(f"| {label} | {g(f'{key}.lines')} | {_fmt(rate)} lines/s{done} | {_sub(r, f'e2e.{key}.cpu_s.')} |")
    out += ["", f"Ratios in this run: {_sub(r, 'e2e.ratios.')}. The issue's `e2e.window.records_per_s` and "
            "`e2e.detect.records_per_s` are the sessions stage's rate: the two stages are one now (a log line "
            "crosses the broker once after parsing).", "",
            "Rates: pass-throughs, the drain3 peer and parse: records consumed / (last - first Kafka CreateTime of "
            "the output; parse: of its event records, and it stays up until it has marked its sources idle, as a "
            "running parse stage does, so the sessions stage's input ends as a live stream's would); the sessions "
            "stage (few outputs, at session ends): committed input offsets sampled every 0.5 s "
            f"(`e2e.sessions.commit_samples`: {_commit_samples(r)}); all at once: lines / (time at which every process has committed its whole input - first "
            "CreateTime of the first hop's output).", "",
            f"Command: `{r.get('e2e.command')}` ({_when(r, 'e2e')}).", ""]
    profiles = {s: r.get(f"e2e.profile.{s}.top_self") for s in ("parse", "sessions")}
    if any(profiles.values()):
        out += ["### Where the time goes (pyinstrument)", "",
                "Each stage run in the benchmark process under pyinstrument for "
                f"{_fmt(r.get('e2e.profile.parse.seconds'), 0)} s on the same input (fresh group); wall-clock "
                "samples of the stage's thread, functions by self time:", ""]
        for stage, rows in profiles.items():
            if not rows:
                continue
            records = r.get(f"e2e.profile.{stage}.records")
            out += [f"{stage} ({_fmt(records)} records in {_fmt(r.get(f'e2e.profile.{stage}.seconds'), 1)} s profiled):", "",
                    "| function | self % | cumulative % |", "| --- | ---: | ---: |"]
            out += [f"| `{row['function']}` | {row['self_pct']} | {row['cumulative_pct']} |" for row in rows]
            out.append("")
    return out


def _render_latency(r: dict) -> list[str]:
    def q(prefix: str, what: str = "") -> str:
        return " / ".join(_fmt(r.get(f"{prefix}{what}p{n}_ms"), 0) for n in (50, 95, 99))

    out = ["## Alert latency", "",
           f"`latency.p50_ms` **{_fmt(r['latency.p50_ms'], 0)}**, `latency.p95_ms` **{_fmt(r['latency.p95_ms'], 0)}**, "
           f"`latency.p99_ms` **{_fmt(r['latency.p99_ms'], 0)}** ms at `latency.lines_per_s` {_fmt(r.get('latency.lines_per_s'))}: "
           "from the anomalous line's Kafka timestamp (`alert.first_anomaly.source.kafka_timestamp`) to the alert "
           "record's Kafka timestamp, over DeepLog's `open` alerts (judged in event time: the line's event is "
           "released once every host's watermark has passed it by the allowed lateness), with parse and sessions "
           "running as separate processes at default settings and HDFS lines replayed over 3 hosts at a steady rate.", "",
           "| run | lines/s asked (achieved) | lines | event records judged | open alerts "
           "| alert latency p50 / p95 / p99 ms | line -> parsed event p50 / p95 / p99 ms | parsed event -> alert |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    runs = (("latency.", "`latency.*`"), ("latency.low_rate.", "`latency.low_rate.*`"),
            ("latency.realtime.", "`latency.realtime.*`: event time at the replay's pace"),
            ("latency.realtime_lateness.", "`latency.realtime_lateness.*`: the same, allowed lateness "
             f"{_fmt(r.get('latency.realtime_lateness.allowed_lateness_s'), 1)} s"))
    for prefix, label in runs:
        if r.get(f"{prefix}replayed_lines") is None:
            continue
        out.append(f"| {label} | {_fmt(r.get(prefix + 'rate_lines_per_s'))} ({_fmt(r.get(prefix + 'lines_per_s'))}) "
                   f"| {_fmt(r.get(prefix + 'replayed_lines'))} | {_fmt(r.get(prefix + 'records_judged'))} of "
                   f"{_fmt(r.get(prefix + 'event_records'))} | {r.get(prefix + 'n')} | {q(prefix)} "
                   f"| {q(prefix, 'every_line_ms.parse.')} | {q(prefix, 'hops_ms.sessions.')} |")
    for prefix, label in runs:
        if r.get(f"{prefix}steady.n") is None:
            continue
        slowest = ", ".join(f"{s['ms']:,} ms (line at {s['line_at_s']} s)" for s in r.get(f"{prefix}slowest") or [])
        tail = r.get(prefix + "tail_s")
        out += ["", f"{label} without the alerts on lines of the replay's first {r.get(prefix + 'warmup_s')} s (the "
                f"hosts' start: a host's empty partitions hold the watermark until parse calls them idle; the stages "
                f"were up and past their watermark grace before the replay)"
                + (f" and of its last {_fmt(tail, 1)} s (the input's end: no later line lets them go until parse calls "
                   "its sources idle)" if tail is not None else "") + ": "
                f"{r.get(prefix + 'steady.n')} alerts, p50 / p95 / p99 {q(prefix, 'steady.')} ms. Slowest: {slowest}."]
    if r.get("latency.realtime.replayed_lines") is not None:
        out += ["", "The first two runs replay HDFS_20000's lines with their own times: at 10,000 lines/s ~90 s of "
                "event time pass per second of replay, so the allowed lateness an event waits "
                f"({_fmt(r.get('latency.allowed_lateness_s'), 1)} s of event time) is ~20 ms of wall. On a live cluster a "
                "line is stamped when it is written, and waits that lateness in wall time too: `latency.realtime.*` "
                "restamps the same lines at the replay's pace, to the millisecond (bench.e2e_bench.pace_hdfs), so an event is "
                "released once every host has stamped a line that much later. That is the "
                "latency an operator sees; it is set by LOGWARDEN_ALLOWED_LATENESS_S, not by the stages' speed: "
                "`latency.realtime_lateness.*` is the same run with a smaller bound. The bound is the disorder the "
                "stage waits out within one source (a partition of logs.<host>; Filebeat keys records by file, so "
                "mostly one file's lines in the order they were written); an event later than it still goes into "
                "its session's final verdict, but is not judged early."]
    if r.get("latency.warmup.n") is not None:
        out += ["", f"Before these, a run of 100,000 lines at the same rate warmed the bench's fresh broker (in no "
                f"figure above): {_fmt(r.get('latency.warmup.n'))} alerts, p50 / p95 "
                f"{_fmt(r.get('latency.warmup.p50_ms'), 0)} / {_fmt(r.get('latency.warmup.p95_ms'), 0)} ms."]
    out += ["", f"Command: `{r.get('latency.command')}` ({_when(r, 'latency')}).", ""]
    return out


def _render_attgru(r: dict) -> list[str]:
    rep = r["attgru.report"]
    split = rep.get("split", {})
    test = split.get("test", {})
    out = ["## ATT-GRU evaluation (HDFS_100k blocks, deep-loglizer split)", "",
           f"Train {split.get('train', {}).get('blocks')} blocks ({split.get('train', {}).get('abnormal')} anomalous), "
           f"test {test.get('blocks')} ({test.get('abnormal')} anomalous); *visible anomalies* leaves out the "
           "anomalous test blocks whose key sequence is a normal training block's (see bench/attgru_eval.py). "
           f"Training {rep.get('train_seconds')} s.", "",
           "| model | precision | recall | F1 | F1, visible anomalies |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, m in rep.get("models", {}).items():
        c, v = m.get("all", {}), m.get("visible_anomalies", {})
        out.append(f"| {name} | {_fmt(c.get('precision'), 3)} | {_fmt(c.get('recall'), 3)} | {_fmt(c.get('f1'), 3)} "
                   f"| {_fmt(v.get('f1'), 3)} |")
    ceiling = rep.get("ceiling", {})
    out.append(f"| ceiling (any key-sequence detector) | {_fmt(ceiling.get('all', {}).get('precision'), 3)} "
               f"| {_fmt(ceiling.get('all', {}).get('recall'), 3)} | {_fmt(ceiling.get('all', {}).get('f1'), 3)} "
               f"| {_fmt(ceiling.get('visible_anomalies', {}).get('f1'), 3)} |")
    plus = rep.get("training_attgru_plus_complete_normal")
    if plus:
        out += ["", f"`attgru_plus_complete_normal`: the same training with the {_fmt(plus.get('complete_normal_sessions'))} "
                f"complete (whole-log) normal sessions of {plus.get('complete_normal_file')} added to the normal "
                "training sessions."]
    out += _render_attgru_complete(rep.get("complete_sessions"))
    drops = rep.get("perturbed", {}).get("mean_f1_drop", {})
    if drops:
        out += ["", f"{rep['perturbed'].get('templates_changed')} templates changed by one word at test time "
                f"({len(rep['perturbed'].get('draws', []))} draws), mean F1 drop: "
                + "; ".join(f"{name} {_fmt(d.get('all'), 4)} (visible anomalies {_fmt(d.get('visible_anomalies'), 4)})"
                            for name, d in drops.items()) + "."]
    out += ["", f"Command: `{r.get('attgru.command')}` ({_when(r, 'attgru')}).", ""]
    return out


def _render_attgru_complete(c: dict | None) -> list[str]:
    """The complete-session figures of bench/attgru_eval.py (absent from older reports)."""
    if not c:
        return []
    out = ["", f"Complete sessions: {c.get('log')} ({c.get('sessions')} blocks, {c.get('abnormal')} anomalous, every line "
           f"of each block over the whole log; labels {c.get('labels')}), sessions built by the stream's parse and window "
           f"cores; both models trained again without {c.get('excluded_from_training')}, the complete normal sessions "
           f"less {_fmt(c.get('complete_normal_dropped_as_possible_copies'))} that could be an HDFS_5k block (same key multiset).",
           "", "| model | TP | FP | TN | FN | precision | recall | F1 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = list(c.get("models", {}).items()) + [("ceiling (any key-sequence detector)", c.get("ceiling", {}))]
    for name, m in rows:
        out.append(f"| {name} | {_fmt(m.get('tp'))} | {_fmt(m.get('fp'))} | {_fmt(m.get('tn'))} | {_fmt(m.get('fn'))} "
                   f"| {_fmt(m.get('precision'), 3)} | {_fmt(m.get('recall'), 3)} | {_fmt(m.get('f1'), 3)} |")
    unseen = c.get("unseen_templates", {})
    if unseen:
        out += ["", "Templates of these sessions that no training session holds (normal / anomalous sessions carrying each): "
                + "; ".join(f"{name}: " + (", ".join(f"{k} ({v.get('normal_sessions')}/{v.get('abnormal_sessions')})"
                                                     for k, v in keys.items()) or "none")
                            for name, keys in unseen.items()) + "."]
    return out


def _render_deeplog(r: dict) -> list[str]:
    rep = r["deeplog.report"]
    out = ["## DeepLog evaluation (HDFS_100k blocks)", "",
           f"h = {rep.get('h')}, g = {rep.get('g')}; model trained on deeplog_hdfs_train "
           f"({rep.get('training', {}).get('sessions', '?')} sessions). Selections and end policies as "
           "bench/deeplog_eval.py's docstring defines them; `ceiling` is the best any key-sequence detector can do.", "",
           "| normal selection | normal | abnormal | end policy | precision | recall | F1 | ceiling F1 |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for selection, entry in rep.get("results", {}).items():
        ceiling = entry.get("ceiling", {}).get("all", {})
        for policy in ("open", "quiet", "closed"):
            c = entry.get(policy, {}).get("all")
            if c:
                out.append(f"| {selection} | {entry['normal']} | {entry['abnormal']} | {policy} | {c['precision']:.3f} | "
                           f"{c['recall']:.3f} | {c['f1']:.3f} | {_fmt(ceiling.get('f1'), 3)} |")
    complete = rep.get("complete_sessions_hdfs_5k")
    if complete:
        c = complete["all"]
        out += ["", f"Complete sessions (HDFS_5k: {complete['sessions']} blocks over the whole log, {complete['abnormal']} "
                f"anomalous; {complete['judged']} judged): precision {c['precision']:.3f}, recall {c['recall']:.3f}, "
                f"F1 {c['f1']:.3f}."]
    if rep.get("throughput_cpu"):
        out.append("")
    for t in rep.get("throughput_cpu", []):
        out.append(f"- score() on key-only sliding windows, batch {t['batch']}: {_fmt(t['windows_per_s'])} windows/s "
                   "(wall clock)")
    out += ["", f"Command: `{rep.get('command')}` ({_when(r, 'deeplog')}).", ""]
    return out


# ------------------------------------------------------------------------------------------
def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=default_data_dir(), help="the shared datasets directory")
    p.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--lines", type=int, default=400_000, help="HDFS lines for the e2e throughput run")
    p.add_argument("--stage-seconds", type=float, default=180.0, help="cap on the sessions and pass-through-of-events runs of e2e")
    p.add_argument("--whole-seconds", type=float, default=300.0, help="cap on the whole-pipeline run of e2e")
    p.add_argument("--render", action="store_true", help="only rewrite BENCHMARKS.md from bench/results.json")
    args = p.parse_args(argv)
    # SIGTERM (a stopped `make bench`) as an exception, so that the sections' `finally` blocks
    # stop the stage processes and the broker they started: killed outright, the stage processes
    # lived on, busy reconnecting to the gone broker, and slowed the next run down (measured: a
    # latency run with one left over gave p95 5.6 s against 0.2 s).
    signal.signal(signal.SIGTERM, _terminated)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.render:
        write(previous)
        return 0
    sections = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {','.join(SECTIONS)}")
    if not (args.data / "hdfs" / "HDFS_20000.log").exists():
        p.error(f"no HDFS_20000.log under {args.data}/hdfs (use --data)")
    failed = run_sections(args, sections, previous)
    print(f"bench: wrote {RESULTS.relative_to(REPO_ROOT)} and {BENCHMARKS.relative_to(REPO_ROOT)}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
