"""What each fault costs the data (issue 12, README "Failure modes"): lost, duplicated and
delayed events, session windows and final alerts, against an uninterrupted run.

    python -m bench.eval_failures --data ../shared/datasets [--lines 9000] [--json bench/failures.json]
    python -m bench.run --only failures

Input: the first ``--lines`` lines of HDFS_20000.log dealt to three hosts by writer
(toolkit.replay.deal_lines), every host shipping at once at 500 lines/s (toolkit.replay.replay_hosts; about 6 s of
shipping for 9,000 lines). Settings as tests/test_stream_e2e.py
runs them (the end-to-end tests' small DeepLog, sessions closed only by LOGWARDEN_IDLE_CLOSE_S,
here 30 s for every scenario so that an outage or a failover never closes a session early).
One broker of its own for all scenarios, each scenario with its own topics and groups:

  clean            `logwarden run all`; nothing happens.
  broker_sigterm   `run all`; once parse has written 2,500 events, the broker is stopped with
                   SIGTERM (a clean shutdown), left down 4 s more, and started again on the same
                   ports and data (a JVM start: the outage is ~20 s in all on a loaded 2-core
                   machine; the table says how long); the stages are not restarted.
  broker_sigkill   the same with SIGKILL (a crash: unflushed page cache aside, what the broker
                   had acknowledged it keeps).
  stage_failover   parse and two sessions replicas (own state directories and instance ids: two
                   machines); parse is SIGKILLed at 3,000 events and started again; at 6,000
                   events sessions replica 1 is SIGKILLed and replica 2 is assigned its
                   partitions (restored from the changelog).
  parse_sigkill, sessions_failover   (with --only) each of stage_failover's two faults alone.

Per scenario, by id against toolkit.reference (the same lines through the same cores without
Kafka): **lost** (in the reference, never produced), **duplicated** (produced but not in the
reference: an id of its own for something the reference has once, or that should not exist),
and **redelivered copies** (the same id produced again, byte-identical for windows: what
at-least-once delivery does and a consumer keyed by id absorbs). **Delay**: events by their
latency (event record CreateTime - its line's CreateTime in logs.<host>), windows and final
alerts by their arrival after the replays started, each against the clean run's by block (ids
name the run's hosts; positive: later than clean).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench import save_report
from bench.stream_rig import Stage, environment, run_settings, start_broker, tiny_deeplog, wait_for

SECTION = "failures"
NEEDS_MODELS = False
COMMAND = "python -m bench.eval_failures --data ../shared/datasets"
HOSTS = ["dn1", "dn2", "dn3"]
SCENARIOS = ("clean", "broker_sigterm", "broker_sigkill", "stage_failover")
EXTRA_SCENARIOS = ("parse_sigkill", "sessions_failover")     # stage_failover's two faults apart (--only)
RATE = 500                  # lines/s per host
IDLE_CLOSE_S = 30.0
OUTAGE_S = 4.0


def read_all(settings, topic: str) -> list:
    """Every record of ``topic`` now (by assignment from offset 0, no group)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    from confluent_kafka.admin import AdminClient

    conf = settings.kafka_config()
    described = AdminClient(conf).list_topics(topic, timeout=30).topics[topic]
    consumer = Consumer(conf | {"group.id": f"{settings.group_prefix}.reader", "enable.auto.commit": False,
                                "enable.partition.eof": True})
    parts = sorted(described.partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    out, ended, deadline = [], set(), time.monotonic() + 60
    try:
        while len(ended) < len(parts) and time.monotonic() < deadline:
            for msg in consumer.consume(5000, timeout=0.5):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        ended.add(msg.partition())
                    continue
                out.append(msg)
    finally:
        consumer.close()
    return out


def _events_seen(settings):
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(settings.kafka_config() | {"group.id": f"{settings.group_prefix}.count"})

    def count() -> int:
        try:
            return sum(consumer.get_watermark_offsets(TopicPartition(settings.events_topic, p), timeout=5)[1]
                       for p in range(settings.topic_partitions))
        except KafkaException:
            return 0
    return count


def run_scenario(name: str, broker, data: Path, workdir: Path, model: Path, sample: Path) -> dict:
    from services.shell import ensure_topics
    from toolkit import localkafka
    from toolkit.replay import deal_lines, ensure_topic

    settings, run_id = run_settings(broker.bootstrap, data, workdir, model, session_gap_s=1e9,
                                    idle_close_s=IDLE_CLOSE_S)
    files = deal_lines(sample, [f"{run_id}-{h}" for h in HOSTS], workdir / run_id / "hosts")
    ensure_topics(settings)
    for host in files:
        ensure_topic(settings, f"logs.{host}")
    logs = workdir / run_id / "logs"
    env = environment(settings)
    if name in ("stage_failover", "parse_sigkill", "sessions_failover"):
        stages = [Stage("parse", env, logs / "parse.log")] + [
            Stage("sessions", environment(settings, LOGWARDEN_STATE_DIR=str(workdir / run_id / f"machine-{n}"),
                                          LOGWARDEN_INSTANCE_ID=f"machine-{n}"), logs / f"sessions-{n}.log")
            for n in (1, 2)]
    else:
        stages = [Stage("all", env, logs / "all.log")]
    parse = stages[0]
    events = _events_seen(settings)
    fault: dict = {}
    killed: list[Stage] = []          # stopped on purpose: not expected to run at the end
    try:
        wait_for(lambda: all(f"logs.{h}[" in (parse.log.read_text().split("parse: assigned")[-1]
                                              if parse.log_has("parse: assigned") else "") for h in files),
                 120, "parse to hold every host topic")
        if len(stages) > 1:
            wait_for(lambda: all(s.log_has("sessions: assigned") for s in stages[1:]), 120, "both sessions replicas")
        started = time.time()
        replay = _Replay(settings, files)
        if name.startswith("broker_"):
            wait_for(lambda: events() > 2500, 120, "the stream to be under way")
            sig = signal.SIGTERM if name == "broker_sigterm" else signal.SIGKILL
            fault["at_s"] = round(time.time() - started, 2)
            port, controller = broker.port, broker.controller_port
            broker.stop_with(sig)
            fault["broker_stopped_s"] = round(time.time() - started, 2)     # (SIGTERM: after its shutdown)
            time.sleep(OUTAGE_S)
            broker = localkafka.start(workdir / "broker", port, controller_port=controller, die_with_parent=True)
            fault["broker_back_s"] = round(time.time() - started, 2)
        if name in ("stage_failover", "parse_sigkill"):
            wait_for(lambda: events() > 3000, 120, "parse to make progress")
            parse.stop(signal.SIGKILL)
            fault["parse_killed_s"] = round(time.time() - started, 2)
            stages[0] = parse = Stage("parse", env, logs / "parse.log")
        if name in ("stage_failover", "sessions_failover"):
            wait_for(lambda: events() > 6000, 120, "parse to make progress")
            stages[1].stop(signal.SIGKILL)
            killed.append(stages[1])
            fault["sessions_replica_killed_s"] = round(time.time() - started, 2)
        replay.join(300)
        if replay.error or replay.is_alive():
            raise RuntimeError(f"replay failed: {replay.error or 'still running after 300 s'}")
        ref_windows, ref_finals = _reference(settings, files, model)
        wait_for(lambda: len({m.key() for m in read_all(settings, settings.windows_topic)}) >= len(ref_windows),
                 IDLE_CLOSE_S + 180, "every block's session window", every=2)
        time.sleep(3)
        alive = [s.alive() for s in stages if s not in killed]
        records = {t: read_all(settings, t) for t in (settings.events_topic, settings.windows_topic, settings.alerts_topic)}
    finally:
        for s in stages:
            s.stop()
    tracebacks = sum(s.log.read_text(errors="replace").count("Traceback") for s in stages if s.log.exists())
    result = measure(settings, files, model, records, started, ref_windows, ref_finals)
    result.update(fault=fault, stages_alive=all(alive), tracebacks=tracebacks, lines=sum(
        1 for p in files.values() for line in open(p, "rb") if line.strip()))
    return result, broker


class _Replay(threading.Thread):
    """Every host ships at once from the first line (toolkit.replay.replay_hosts, one thread per
    host). Three `replay` processes instead started up to seconds apart on a loaded machine, and
    a host that begins shipping after parse has reported its empty topic idle (1 s) has its first
    lines late: windows of the clean run then differed from the reference for want of a fault."""

    def __init__(self, settings, files):
        super().__init__(daemon=True)
        self.settings, self.files, self.error, self.count = settings, files, None, 0
        self.start()

    def run(self) -> None:
        from toolkit.replay import replay_hosts

        try:
            self.count = replay_hosts(self.settings, self.files, rate=RATE)
        except BaseException as err:          # reported by the scenario
            self.error = repr(err)


def _reference(settings, files, model):
    from models import artifacts
    from toolkit.reference import windows_and_finals

    return windows_and_finals(settings, files, {"deeplog": artifacts.load(model, device="cpu")})


def measure(settings, files, model, records: dict, started: float, ref_windows: dict, ref_finals: set) -> dict:
    from services.records import WATERMARK_KEY, Alert, ParsedEvent, Window, decode
    from toolkit.reference import parse_files

    def first_arrivals(msgs, ident):
        seen: dict = {}
        copies = defaultdict(int)
        for m in msgs:
            key = ident(m)
            if key is None:
                continue
            copies[key] += 1
            t = m.timestamp()[1] / 1000
            if key not in seen or t < seen[key][0]:
                seen[key] = (t, m)
        return seen, sum(n - 1 for n in copies.values())

    ref_events = {(e.event_id, e.key) for e in parse_files(settings, files)}
    event_of = lambda m: None if m.key() == WATERMARK_KEY else (lambda e: (e.event_id, e.key))(decode(m.value(), ParsedEvent))
    events, event_copies = first_arrivals(records[settings.events_topic], event_of)
    latency = []
    for t, m in events.values():
        src = decode(m.value(), ParsedEvent).source
        if src.kafka_timestamp:
            latency.append(t - src.kafka_timestamp)
    windows, window_copies = first_arrivals(
        records[settings.windows_topic], lambda m: (lambda w: w.window_id if w.kind == "session" else None)(decode(m.value(), Window)))
    finals, final_copies = first_arrivals(
        records[settings.alerts_topic], lambda m: (lambda a: a.alert_id if a.status == "final" else None)(decode(m.value(), Alert)))
    # a replayed window must be the same window: same bytes under the same id
    by_id = defaultdict(set)
    for m in records[settings.windows_topic]:
        by_id[m.key(), decode(m.value(), Window).window_id].add(m.value())
    differing = sum(len(v) > 1 for v in by_id.values())

    # A window id missing from the reference may be the same block with the same events in
    # another order (events that came after the watermark are placed late): tell that apart
    # from events missing from a block's window.
    produced_by_key = defaultdict(list)
    for _, m in windows.values():
        w = decode(m.value(), Window)
        produced_by_key[w.key].append(Counter((st.host, st.file_offset) for st in w.steps))
    same_events, window_events_missing = 0, 0
    for wid in set(ref_windows) - set(windows):
        ref = Counter((st.host, st.file_offset) for st in ref_windows[wid].steps)
        mine = produced_by_key.get(ref_windows[wid].key, [])
        same_events += any(c == ref for c in mine)
        window_events_missing += min((sum((ref - c).values()) for c in mine), default=sum(ref.values()))

    def window_note(w):
        return {"key": w.key, "events": len(w.steps), "late_events": w.late_events, "hosts": len(w.hosts),
                "first": [w.steps[0].host, w.steps[0].file_offset, w.steps[0].timestamp] if w.steps else None}
    examples = {"lost": [window_note(ref_windows[i]) for i in sorted(set(ref_windows) - set(windows))[:5]],
                "duplicated": [window_note(decode(windows[i][1].value(), Window))
                               for i in sorted(set(windows) - set(ref_windows))[:5]]}
    return {
        "events": {"reference": len(ref_events), "lost": len(ref_events - set(events)),
                   "duplicated": len(set(events) - ref_events), "redelivered_copies": event_copies,
                   "latency_s": _percentiles(latency)},
        "windows": {"reference": len(ref_windows), "lost": len(set(ref_windows) - set(windows)),
                    "duplicated": len(set(windows) - set(ref_windows)), "redelivered_copies": window_copies,
                    "copies_that_differ": differing, "examples": examples,
                    "lost_with_same_events": same_events, "events_missing_from_windows": window_events_missing,
                    "with_late_events": sum(decode(m.value(), Window).late_events > 0 for _, m in windows.values()),
                    # by block (the session key): ids name the run's hosts, keys are the same in every run
                    "arrival_s": {decode(m.value(), Window).key: round(t - started, 3) for t, m in windows.values()}},
        "finals": {"reference": len(ref_finals), "lost": len(ref_finals - set(finals)),
                   "duplicated": len(set(finals) - ref_finals), "redelivered_copies": final_copies,
                   "arrival_s": {decode(m.value(), Alert).key: round(t - started, 3) for t, m in finals.values()}},
    }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    at = lambda q: round(values[min(len(values) - 1, int(q * len(values)))], 3)
    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(values[-1], 3), "n": len(values)}


def delays(clean: dict, other: dict, what: str) -> dict:
    """Per block: arrival in ``other`` minus arrival in ``clean`` (both after their replays began)."""
    a, b = clean[what]["arrival_s"], other[what]["arrival_s"]
    diffs = [b[i] - a[i] for i in a if i in b]
    return _percentiles(diffs)


def evaluate(data: Path, lines: int = 9000, scenarios=SCENARIOS) -> dict:
    with tempfile.TemporaryDirectory(prefix="failures-") as tmp:
        workdir = Path(tmp)
        broker = start_broker(workdir)
        try:
            model = tiny_deeplog(data, workdir / "tiny-deeplog")
            sample = workdir / "sample.log"
            with open(data / "hdfs" / "HDFS_20000.log", "rb") as fh:
                sample.write_bytes(b"".join(fh.readline() for _ in range(lines)))
            results = {}
            for name in scenarios:
                began = time.perf_counter()
                results[name], broker = run_scenario(name, broker, data, workdir, model, sample)
                results[name]["seconds"] = round(time.perf_counter() - began, 1)
        finally:
            broker.stop()
    clean = results["clean"]
    for name, r in results.items():
        r["delay_vs_clean"] = {
            "events_latency_p99_s": round(r["events"]["latency_s"]["p99"] - clean["events"]["latency_s"]["p99"], 3),
            "events_latency_max_s": round(r["events"]["latency_s"]["max"] - clean["events"]["latency_s"]["max"], 3),
            "windows_s": delays(clean, r, "windows"), "finals_s": delays(clean, r, "finals")}
    for r in results.values():                 # per-id arrivals: only their summary is kept
        for what in ("windows", "finals"):
            arrivals = r[what].pop("arrival_s")
            r[what]["last_arrival_s"] = max(arrivals.values()) if arrivals else None
    return {"command": COMMAND + f" --lines {lines}", "lines": lines, "hosts": len(HOSTS), "rate_per_host": RATE,
            "idle_close_s": IDLE_CLOSE_S, "outage_s": OUTAGE_S, "nproc": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "scenarios": results}


def render_report(rep: dict) -> list[str]:
    out = ["## Failure modes: lost, duplicated, delayed", "",
           f"Command: `{rep['command']}` (bench/eval_failures.py; its docstring defines each scenario and figure). "
           f"{rep['lines']:,} HDFS lines over {rep['hosts']} hosts at {rep['rate_per_host']} lines/s each, "
           f"LOGWARDEN_IDLE_CLOSE_S={rep['idle_close_s']:.0f}, the broker left down {rep['outage_s']:.0f} s after it stopped, then started (a JVM start); "
           f"{rep['nproc']} shared cores (1-min load {rep['load_avg_1m_at_end']} at the end).", "",
           "| scenario | fault | events lost / dup / copies | windows lost / dup / copies | final alerts lost / dup / copies | "
           "event latency p99 (max) s | extra delay vs clean: events p99, windows p50 / max, finals max s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rep["scenarios"].items():
        e, w, f, d = r["events"], r["windows"], r["finals"], r["delay_vs_clean"]
        cell = lambda x: f"{x['lost']} / {x['duplicated']} / {x['redelivered_copies']} (of {x['reference']:,})"
        wcell = cell(w) + (f"; {w['lost_with_same_events']} of the lost: same events, {w['with_late_events']} windows "
                           f"with late events, {w['events_missing_from_windows']} events missing"
                           if w.get("lost") and "lost_with_same_events" in w else "")
        dw, df = d["windows_s"], d["finals_s"]
        out.append(f"| {name} | {_fault(r.get('fault', {}))} | {cell(e)} | {wcell} | {cell(f)} | {e['latency_s'].get('p99')} "
                   f"({e['latency_s'].get('max')}) | {d['events_latency_p99_s']:+}, {dw.get('p50', 0):+} / "
                   f"{dw.get('max', 0):+}, {df.get('max', 0):+} |")
    out.append("")
    return out


def _fault(f: dict) -> str:
    if "broker_back_s" in f:
        return f"broker down {f['broker_back_s'] - f['at_s']:.1f} s (signal at {f['at_s']:.1f} s, back at {f['broker_back_s']:.1f} s)"
    said = []
    if "parse_killed_s" in f:
        said.append(f"parse SIGKILL at {f['parse_killed_s']:.1f} s (restarted)")
    if "sessions_replica_killed_s" in f:
        said.append(f"sessions replica 1 SIGKILL at {f['sessions_replica_killed_s']:.1f} s (replica 2 takes over)")
    return ", ".join(said) or "none"


# bench.run plugin interface
def run(ctx) -> dict:
    return {f"{SECTION}.report": evaluate(ctx.data)}


def render(results: dict) -> list[str]:
    rep = results.get(f"{SECTION}.report")
    if not rep:
        return ["## Failure modes: lost, duplicated, delayed", "", "Not measured.", ""]
    return render_report(rep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("LOGWARDEN_DATASETS", "../shared/datasets")))
    ap.add_argument("--lines", type=int, default=9000)
    ap.add_argument("--only", default=",".join(SCENARIOS), help="scenarios (clean is always run)")
    ap.add_argument("--json", type=Path, default=Path("bench/failures.json"))
    args = ap.parse_args(argv)
    scenarios = ("clean", *[s for s in args.only.split(",") if s and s != "clean"])
    unknown = set(scenarios) - set(SCENARIOS) - set(EXTRA_SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    report = evaluate(args.data, args.lines, scenarios)
    save_report(report, args.json)
    print("\n".join(render_report(report)))
    bad = [n for n, r in report["scenarios"].items()
           if r["events"]["lost"] or r["windows"]["lost"] or r["finals"]["lost"] or r["windows"]["duplicated"]
           or r["finals"]["duplicated"] or r["windows"]["copies_that_differ"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
