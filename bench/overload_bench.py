"""Overload (issue 12): a burst of input far faster than the sessions stage judges it, into a
running parse and sessions stage; each stage's memory over time, and how long lag takes to fall
back to zero.

    python -m bench.overload_bench --data ../shared/datasets [--lines 100000] [--queues 32:64,8:16]
                                   [--json bench/overload.json] [--render]

For each queue setting ``C:P`` (LOGWARDEN_CONSUMER_QUEUE_MB : LOGWARDEN_PRODUCER_QUEUE_MB) a fresh
run (own topics, groups, state): `services.cli run parse` and `run sessions` as two processes on
one broker (a broker of its own, unless LOGWARDEN_KAFKA_BOOTSTRAP), the end-to-end tests' small
DeepLog, otherwise default settings. Once both are assigned and idle their RSS is the baseline.
Then HDFS_20000.log scaled to ``--lines`` lines (bench.e2e_bench.scale_hdfs: copies with their own
blocks, following each other in event time) dealt round-robin to three hosts is produced as fast
as `replay` goes, the three hosts one after another: the burst. Every 0.5 s: each stage's RSS
(/proc VmRSS; the peak is VmHWM, the kernel's high-water mark, so no spike between samples is
missed) and each group's lag (end offsets of its input minus its committed offsets).

Figures: the burst's input rate (lines/s) against the rate at which the pipeline worked the
lines off (lines / (time lag reached zero - burst start)): their ratio is the overload factor;
each stage's peak RSS against its idle baseline plus the queue bounds of the settings (prefetched
input + unacknowledged output; what the core holds is bounded separately by
LOGWARDEN_MAX_OPEN_SESSIONS and LOGWARDEN_REORDER_MAX_EVENTS); each stage's peak once it had
consumed 30 % of its input beside its peak over the whole run (memory that levels off, or memory
that grows with the burst); the time from the burst's end until both lags are zero (drain). The
stages are stopped with SIGTERM at the end. ``--render`` prints the table of a saved ``--json``."""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from bench import save_report
from bench.stream_rig import Lag, Stage, environment, run_settings, start_broker, tiny_deeplog, wait_for

COMMAND = "python -m bench.overload_bench --data ../shared/datasets"
HOSTS = ("nn1", "dn1", "dn2")


class Sampler(threading.Thread):
    def __init__(self, stages: dict[str, Stage], lag: Lag, inputs: dict[str, tuple[str, str]], every: float = 0.5):
        super().__init__(daemon=True)
        self.stages, self.lag, self.inputs, self.every = stages, lag, inputs, every
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.time()

    def sample(self) -> dict:
        row: dict = {"t": round(time.time() - self.t0, 2)}
        for name, stage in self.stages.items():
            mem = stage.memory_mb()
            row[f"{name}.rss_mb"] = round(mem[0], 1) if mem else None
            row[f"{name}.hwm_mb"] = round(mem[1], 1) if mem else None
            group, topic = self.inputs[name]
            try:
                ends, committed = self.lag.of(group, topic)
                row[f"{name}.lag"], row[f"{name}.end"] = ends - committed, ends
            except Exception:            # a metadata hiccup: no lag figure this time
                row[f"{name}.lag"] = row[f"{name}.end"] = None
        return row

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.sample())
            self.stop.wait(self.every)

    def finish(self) -> None:
        self.stop.set()
        self.join(30)


def filebeat_records(hosts: dict[str, Path]) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, Filebeat document) of every line, as `logwarden replay` writes them, the
    hosts' lines taken in turn as live hosts ship them."""
    from toolkit.replay import Agent, open_encoder, split_lines

    per_host = []
    for host, path in hosts.items():
        path = path.resolve()
        with open(path, "rb") as fh:
            encoder = open_encoder(fh, Agent(host), path)
            lines, _ = split_lines(fh.read(), 0)
        key = str(path).encode()
        per_host.append([(f"logs.{host}", key, encoder.encode(offset, text).encode()) for offset, text in lines])
    out = []
    for i in range(max(len(h) for h in per_host)):
        out += [h[i] for h in per_host if i < len(h)]
    return out


def produce_burst(settings, records: list[tuple[str, bytes, bytes]]) -> int:
    """Produce the pre-encoded records as fast as librdkafka takes them; returns the number
    acknowledged. (Encoding them here, as `replay` does, made the burst only ~4x faster than
    the stages on a shared 2-core machine: the replay competed with them for the CPU.)"""
    from toolkit.replay import make_producer

    producer = make_producer(settings)
    produce, poll = producer.produce, producer.poll
    for n, (topic, key, value) in enumerate(records):
        while True:
            try:
                produce(topic, value, key)
                break
            except BufferError:
                poll(0.05)
        if n % 10_000 == 0:
            poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} burst records not acknowledged")
    return len(records)


def one_run(bootstrap: str, data: Path, workdir: Path, model: Path, lines_file: dict[str, Path], lines: int,
            consumer_mb: int, producer_mb: int, cap_s: float) -> dict:
    from services.shell import ensure_topics
    from toolkit.replay import ensure_topic

    settings, run_id = run_settings(bootstrap, data, workdir, model, consumer_queue_mb=consumer_mb,
                                    producer_queue_mb=producer_mb)
    ensure_topics(settings)
    hosts = {f"{run_id}-{h}": path for h, path in lines_file.items()}
    for host in hosts:
        ensure_topic(settings, f"logs.{host}")
    env = environment(settings)
    logs = workdir / run_id / "logs"
    stages = {name: Stage(name, env, logs / f"{name}.log") for name in ("parse", "sessions")}
    lag = Lag(settings)
    inputs = {"parse": (settings.group("parse"), settings.logs_pattern),
              "sessions": (settings.group("sessions"), settings.events_topic)}
    try:
        wait_for(lambda: all(s.log_has(rf"{s.stage}: assigned") for s in stages.values()), 120,
                 "both stages to be assigned their partitions")
        wait_for(lambda: all(s.log_has(f"logs.{h}\\[") for h in hosts for s in [stages["parse"]]), 60,
                 "parse to hold every host topic")
        time.sleep(3)
        baseline = {name: round(s.memory_mb()[0], 1) for name, s in stages.items()}
        sampler = Sampler(stages, lag, inputs)
        sampler.start()
        records = filebeat_records(hosts)        # encoded before the clock starts
        burst_start = time.time()
        produced = produce_burst(settings, records)
        burst_end = time.time()
        drained_at = None
        deadline = time.monotonic() + cap_s
        while time.monotonic() < deadline and all(s.alive() for s in stages.values()):
            time.sleep(0.5)
            last = sampler.samples[-1] if sampler.samples else {}
            if (last.get("parse.lag") == 0 and last.get("sessions.lag") == 0 and last.get("parse.end", 0) >= produced
                    and last["t"] + sampler.t0 > burst_end):
                drained_at = last["t"] + sampler.t0
                break
        time.sleep(1)
        sampler.finish()
        alive = {name: s.alive() for name, s in stages.items()}
        final = {name: s.memory_mb() for name, s in stages.items()}
    finally:
        codes = {name: s.stop() for name, s in stages.items()}
        lag.close()
    samples = sampler.samples
    result = {
        "consumer_queue_mb": consumer_mb, "producer_queue_mb": producer_mb,
        "lines": produced, "burst_s": round(burst_end - burst_start, 2),
        "input_lines_per_s": round(produced / (burst_end - burst_start)),
        "drained": drained_at is not None,
        "drain_after_burst_s": round(drained_at - burst_end, 1) if drained_at else None,
        "worked_off_lines_per_s": round(produced / (drained_at - burst_start)) if drained_at else None,
        "stages_alive_at_end": alive, "exit_codes": codes,
        "events": max((s.get("sessions.end") or 0) for s in samples),
        "max_lag": {name: max((s.get(f"{name}.lag") or 0) for s in samples) for name in stages},
        "stages": {},
        "series": samples,
    }
    if drained_at:
        result["overload_factor"] = round(result["input_lines_per_s"] / result["worked_off_lines_per_s"], 1)
    for name in stages:
        rss = [s[f"{name}.rss_mb"] for s in samples if s.get(f"{name}.rss_mb") is not None]
        hwm = max([s[f"{name}.hwm_mb"] for s in samples if s.get(f"{name}.hwm_mb") is not None] +
                  [final[name][1] if final[name] else 0])
        bound = baseline[name] + consumer_mb + producer_mb
        result["stages"][name] = {"baseline_rss_mb": baseline[name], "peak_rss_mb": round(hwm, 1),
                                  "peak_sampled_rss_mb": max(rss) if rss else None,
                                  "end_rss_mb": rss[-1] if rss else None,
                                  "queue_bound_mb": consumer_mb + producer_mb,
                                  "baseline_plus_queues_mb": round(bound, 1),
                                  "growth_mb": round(hwm - baseline[name], 1)}
    return result


FLAT_AT = 0.3    # a peak that is flat was (nearly) reached once this share of the input was consumed


def peak_when_consumed(samples: list[dict], name: str, share: float = FLAT_AT) -> float | None:
    """A stage's peak RSS (high-water mark) at the first sample by which it had consumed
    ``share`` of what it consumed in the whole run: set beside the whole run's peak, it says
    whether memory kept growing with the burst (a leak, an unbounded buffer) or levelled off."""
    ends = [s.get(f"{name}.end") or 0 for s in samples]
    total = max(ends, default=0)
    for s in samples:
        if s.get(f"{name}.lag") is None or s.get(f"{name}.hwm_mb") is None:
            continue
        if (s[f"{name}.end"] or 0) - s[f"{name}.lag"] >= share * total:
            return s[f"{name}.hwm_mb"]
    return None


def run(data: Path, lines: int, queues: list[tuple[int, int]], cap_s: float = 600.0) -> dict:
    from bench.e2e_bench import scale_hdfs

    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        workdir = Path(tmp)
        broker = None
        bootstrap = os.environ.get("LOGWARDEN_KAFKA_BOOTSTRAP")
        if not bootstrap:
            broker = start_broker(workdir)
            bootstrap = broker.bootstrap
        try:
            model = tiny_deeplog(data, workdir / "tiny-deeplog")
            scaled = scale_hdfs(data / "hdfs" / "HDFS_20000.log", workdir / "scaled", lines, HOSTS)
            runs = [one_run(bootstrap, data, workdir, model, scaled.files, scaled.lines, c, p, cap_s)
                    for c, p in queues]
        finally:
            if broker is not None:
                broker.stop()
    return {"command": COMMAND + f" --lines {lines} --queues " + ",".join(f"{c}:{p}" for c, p in queues),
            "nproc": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "runs": runs}


def render(report: dict) -> list[str]:
    out = ["## Overload: memory and lag under a burst", "",
           f"Command: `{report['command']}` (bench/overload_bench.py; its docstring says what is measured). "
           f"{report['nproc']} cores, shared (1-min load {report['load_avg_1m_at_end']} at the end).", "",
           "| queues (consumer : producer MB) | lines | input lines/s | worked off lines/s | overload | "
           f"stage | idle RSS MB | peak RSS MB at {FLAT_AT:.0%} of its input | peak RSS MB | idle + queues MB | "
           "max lag | drain after burst s |",
           "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["runs"]:
        for name, st in r["stages"].items():
            out.append(f"| {r['consumer_queue_mb']} : {r['producer_queue_mb']} | {r['lines']:,} | "
                       f"{r['input_lines_per_s']:,} | {r['worked_off_lines_per_s'] or '-':,} | "
                       f"{r.get('overload_factor', '-')}x | {name} | {st['baseline_rss_mb']} | "
                       f"{peak_when_consumed(r['series'], name) or '-'} | {st['peak_rss_mb']} | "
                       f"{st['baseline_plus_queues_mb']} | {r['max_lag'][name]:,} | "
                       f"{r['drain_after_burst_s'] if r['drained'] else 'not drained'} |")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("LOGWARDEN_DATASETS", "../shared/datasets")))
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--queues", default="32:64", help="C:P[,C:P...] consumer and producer queue MB per run")
    ap.add_argument("--cap", type=float, default=600.0, help="seconds a run may take to drain")
    ap.add_argument("--json", type=Path, default=Path("bench/overload.json"))
    ap.add_argument("--render", action="store_true", help="print the table of an earlier run's --json, run nothing")
    args = ap.parse_args(argv)
    if args.render:
        import json

        print("\n".join(render(json.loads(args.json.read_text()))))
        return 0
    queues = [tuple(int(x) for x in q.split(":")) for q in args.queues.split(",")]
    report = run(args.data, args.lines, queues, args.cap)
    save_report(report, args.json)
    print("\n".join(render(report)))
    return 0 if all(r["drained"] for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
