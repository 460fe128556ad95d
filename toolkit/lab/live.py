"""`make lab` (`logwarden lab live`): a fresh lab cluster watched live by logwarden.

1. the local Kafka broker (or LOGWARDEN_KAFKA_BOOTSTRAP), a fresh cluster, the workload;
2. each daemon's log4j file tailed into ``logs.<host>`` by `logwarden replay --follow` (one per
   host, as Filebeat on each host would), and every daemon's /prom scraped each 10 s into the
   OTLP metrics topic as the Collector's prometheus receiver writes it (``otlp_request``; the
   otlp stage turns each into the host's timeline, beside its logs);
3. the stream: `logwarden run all` (parse -> sessions -> alerts, judged in event time) on topics of this run;
4. a fault-free warm-up: the closed windows the stream builds from it (block sessions and per-host
   time windows, the very windows the detect stage will judge) train DeepLog, which is published
   to the run's model directory, where the detect stage picks it up (or ``--model DIR``); then the
   stages restart with the warm-up's templates frozen (LOGWARDEN_FREEZE_TEMPLATES, the parser's
   state restored from its checkpoint): drain keeps generalising templates as it mines, and a
   generalised template is a new id the model never saw, so one unusual line during a fault would
   otherwise turn every later line of that template into an alarm. A line of no known template is
   then ``unknown``, itself a DeepLog anomaly;
5. the fault schedule (offsets from the end of the warm-up), alerts printed as they arrive;
6. a final table: per fault, detected or not and how fast (the first alert whose anomalous event
   lies in the fault's window, plus ``GRACE_S`` after it, for faults whose effects come when they
   end: a DataNode coming back, a volume restored), and false alarms per hour outside them.

Everything it starts is stopped at the end, also on Ctrl-C. The glue to the stream is the stage
CLI and the topics only (``Stream``), so the stages can change behind it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from models.faults import Fault
from services.cores import promtext
from services.records import encode
from services.settings import REPO_ROOT, RUN_DIR, Settings, UsageError, load_settings
from toolkit.lab import cluster as lab
from toolkit.lab.faults import Injector, halt, parse_schedule, resolve_targets
from toolkit.lab.scrape import SCRAPE_INTERVAL_S, MetricsRecorder, stable_labels
from toolkit.lab.workload import Workload, WorkloadConfig
from toolkit.localkafka import exit_with_parent

log = logging.getLogger("logwarden.lab")
GRACE_S = 20.0                  # effects counted after a fault ends (restart, re-replication)
TAIL_S = 40.0                   # after the last fault: sessions close (gap 30 s) and are judged
DEFAULT_SCHEDULE = "all:gap=30"  # every kind once, 30 s apart: 10 s of each gap is outside any fault (GRACE_S)
SESSION_GAP_S = 30.0            # a block quiet this long (event time) is a closed session
# A live cluster: a quiet spell of every daemon (a fault can make one) must not close the blocks
# being written; the default 5 s is for finite replays. Sessions close by the gap in event time.
IDLE_CLOSE_S = SESSION_GAP_S
TIME_WINDOW_S = 10.0            # per-host windows of lines without a block: 18 per host in a 3-min warm-up, not 3
SETTLE_S = 60.0                 # the warm-up's first minute fills the namespace: not what normal looks like later
DEEPLOG_EPOCHS = 30
# No parameter-value models: the workload draws file sizes at random and timings are this shared
# machine's, so a value "anomaly" says nothing about the cluster (they were most of the false
# alarms of a trial run); the key model judges.
DEEPLOG_PARAM_MIN_EVENTS = 10**9


def say(text: str = "") -> None:
    print(text, flush=True)


def _clock(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%H:%M:%S")


# --------------------------------------------------------------------------------------------
# The stream behind the CLI: settings, `logwarden run all`, `logwarden replay --follow`
@dataclass
class Stream:
    settings: Settings
    run_id: str
    work: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def for_run(cls, run_id: str, work: Path, **overrides) -> "Stream":
        settings = load_settings(**({
            "logs_pattern": rf"^logs\.{run_id}-.*", "events_topic": f"{run_id}.events",
            "windows_topic": f"{run_id}.windows", "alerts_topic": f"{run_id}.alerts",
            "deadletter_topic": f"{run_id}.deadletter", "feedback_topic": f"{run_id}.feedback",
            **{f"{t}_topic": f"{run_id}.{t}" for t in ("otlp_spans", "otlp_metrics", "otlp_logs", "spans",
                                                        "traces", "timeline", "chunks")},
            "group_prefix": run_id, "state_dir": work / "state", "model_dir": work / "models",
            "session_gap_s": SESSION_GAP_S, "idle_close_s": IDLE_CLOSE_S, "time_window_s": TIME_WINDOW_S,
            "metrics_port": 0} | overrides))
        return cls(settings, run_id, work)

    def host(self, name: str) -> str:
        """The stream's host name for a lab host: topics logs.<run>-<host>."""
        return f"{self.run_id}-{name}"

    def lab_host(self, host: str) -> str:
        return host.removeprefix(f"{self.run_id}-")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOGWARDEN_")}
        return env | self.settings.environment()

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("logwarden")
        with open(logs / f"{name}.log", "ab") as out:
            process = subprocess.Popen([str(exe), *args], env=self.env(), cwd=REPO_ROOT, stdout=out,
                                       stderr=subprocess.STDOUT, preexec_fn=exit_with_parent)
        self.processes.append(process)
        return process

    def start_stages(self) -> subprocess.Popen:
        return self._spawn("stages", "run", "all")

    def restart_stages(self, **settings) -> subprocess.Popen:
        """Stop `run all` (SIGTERM: each stage checkpoints), start it again with ``settings``."""
        for p in [p for p in self.processes if p.args[1:3] == ["run", "all"]]:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            self.processes.remove(p)
        self.settings = self.settings.model_copy(update=settings)
        return self.start_stages()

    def ship(self, lab_host: str, log_file: Path) -> subprocess.Popen:
        return self._spawn(f"replay-{lab_host}", "replay", str(log_file), "--host", self.host(lab_host),
                           "--follow", "--no-progress")

    def failed(self) -> list[str]:
        return [" ".join(p.args[1:3]) + f" exited {p.returncode}" for p in self.processes if p.poll() is not None]

    def stop(self) -> None:
        for p in self.processes:                      # SIGTERM: stages finish their batch, replays flush
            if p.poll() is None:
                p.send_signal(signal.SIGINT if "replay" in p.args else signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def otlp_request(cluster: lab.Cluster, host: str, entity: str, scraped_at: float, page) -> bytes:
    """One scrape of one daemon as an OTLP metrics record (services.scrape's mapping: the
    resource is ``entity``, the host name its logs ship under; ``up`` = 0 alone when it did not
    answer), port labels and paths made stable as in the recorded CSV columns."""
    from services.scrape import Target, down_request, exposition_request

    daemon = cluster.daemons[host]
    target = Target(entity, f"{daemon.http}/prom", daemon.role)
    if page is None:
        return down_request(target, scraped_at).SerializeToString()
    page = promtext.Exposition([stable_labels(cluster, daemon, x) for x in page.samples], page.types, page.helps, page.errors)
    return exposition_request(target, scraped_at, page).SerializeToString()


# --------------------------------------------------------------------------------------------
# Reading the stream's topics
class TopicReader(threading.Thread):
    """Consumes a topic from its beginning (no commits) and hands each value to ``handle``."""

    def __init__(self, settings: Settings, topic: str, handle, name: str):
        super().__init__(name=name, daemon=True)
        self.settings, self.topic, self.handle = settings, topic, handle
        self.stop = threading.Event()
        self.errors = 0

    def run(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(self.settings.kafka_config() | {
            "group.id": f"{self.settings.group_prefix}.lab-{self.name}", "auto.offset.reset": "earliest",
            "enable.auto.commit": False})
        consumer.subscribe([self.topic])
        try:
            while not self.stop.is_set():
                for msg in consumer.consume(500, timeout=0.3):
                    if msg.error():
                        continue
                    try:
                        self.handle(msg.value())
                    except Exception:          # a record we cannot read is counted, not fatal
                        self.errors += 1
        finally:
            consumer.close()


class Alerts:
    """Every alert of the run, printed as it arrives once the faults' phase began."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.by_id: dict[str, list] = {}
        self.lock = threading.Lock()
        self.print_from = float("inf")          # event time from which alerts are printed
        self.printed = 0

    def handle(self, value: bytes) -> None:
        from services.records import Alert, decode

        alert = decode(value, Alert)
        with self.lock:
            self.by_id.setdefault(alert.alert_id, []).append(alert)
        if alert.anomalous and alert.status != "update" and alert.event_time >= self.print_from:
            self.printed += 1
            hosts = ",".join(self.stream.lab_host(h) for h in alert.hosts)
            first = alert.first_anomaly
            status = "early" if alert.status == "open" else "FINAL"
            say(f"  {status} {_clock(alert.detection_time)} (line of {_clock(alert.event_time)}) "
                f"{alert.key.removeprefix(self.stream.run_id + '-'):15} {hosts:11} {first.template_id}: {first.message[24:130]}")

    def anomalous(self, status: str) -> list:
        """Per alert id, its first anomalous record of ``status``: "open" (an early warning while
        the session is open, judged in event time) or "final" (the verdict on the closed session)."""
        with self.lock:
            records = [r for rs in self.by_id.values() for r in rs]
        first: dict[str, object] = {}
        for r in sorted(records, key=lambda a: a.detection_time):
            if r.anomalous and r.status == status and r.alert_id not in first:
                first[r.alert_id] = r
        return list(first.values())


class TrainingWindows:
    """The warm-up's closed windows (block sessions and per-host time windows, events in event
    time): what DeepLog trains on. Built from the events topic with the sessions stage's own core
    (services.cores.sessions, the stream's SessionConfig), because the sessions stage builds no
    window until it has a model to judge with; the windows are the ones it will judge."""

    def __init__(self, settings: Settings):
        self.config = settings.session_config(everything_known=True)   # the stream's rules
        self.events: dict[str, object] = {}        # event id -> event (a re-sent copy counts once)
        self.lock = threading.Lock()

    def handle(self, value: bytes) -> None:
        from services.records import ParsedEvent, decode

        try:
            event = decode(value, ParsedEvent)
        except Exception:                      # the topic's watermark records
            return
        with self.lock:
            self.events[event.event_id] = event

    def between(self, start: float, end: float) -> list:
        """Windows closed by ``end`` whose events all lie in [start, end): sessions quiet for the
        gap before ``end``, time windows that ended; not what was still open then."""
        from services.cores.detect import session_window
        from services.cores.sessions import sessions_in_order

        with self.lock:
            events = [e for e in self.events.values() if e.timestamp < end]
        windows = []
        for closed in sessions_in_order(events, self.config):
            s, steps = closed.session, closed.steps
            if not steps or steps[0].timestamp < start:
                continue
            ended = s.bucket + self.config.time_window_s if s.time_window else steps[-1].timestamp + self.config.session_gap_s
            if ended <= end or closed.reason == "max_events":
                windows.append(session_window(closed, self.config.time_window_s))
        return windows


def train_deeplog(windows: list, out: Path, seed: int) -> dict:
    from models.base import limit_cpu_threads, pick_device
    from models.deeplog import DeepLog
    from services.cores.detect import window_sequence

    sequences = [window_sequence(w) for w in windows]
    if not sequences:
        raise UsageError("lab: the warm-up produced no closed window to train on (is the stream running?)")
    device = pick_device(load_settings().device)
    if device == "cpu":
        limit_cpu_threads()       # beside the cluster and the stages: 10x faster here than torch's default threads
    detector = DeepLog(seed=seed, epochs=DEEPLOG_EPOCHS, param_min_events=DEEPLOG_PARAM_MIN_EVENTS)
    stats = detector.fit(sequences, device=device)
    detector.save(out)
    from models import artifacts
    artifacts.update_manifest(out, training_data=[{"role": "lab warm-up", "windows": len(sequences),
                                                   "kinds": sorted({w.kind for w in windows})}])
    return stats


# --------------------------------------------------------------------------------------------
# The table
STATUSES = ("open", "final")          # early warnings (open sessions), verdicts on closed sessions


@dataclass
class FaultResult:
    fault: Fault
    alerts: dict[str, list]           # status -> alerts whose anomalous event lies in the fault's window
    delay_s: dict[str, float | None]  # status -> first such alert's detection time - fault start
    on_target: bool

    @property
    def detected(self) -> bool:
        return any(self.alerts.values())


def _in_window(f: Fault, t: float, grace_s: float) -> bool:
    return f.start <= t < f.end + grace_s


def judge(faults: list[Fault], alerts: dict[str, list], watched: tuple[float, float], grace_s: float = GRACE_S):
    """Per fault and status: the alerts whose anomalous event lies in [start, end + grace); per
    status the alerts in the watched period outside every such window (false alarms); and that
    quiet period's length in seconds."""
    results = []
    for f in faults:
        mine = {status: [a for a in alerts[status] if _in_window(f, a.event_time, grace_s)] for status in STATUSES}
        delay = {status: min((a.detection_time - f.start for a in mine[status]), default=None) for status in STATUSES}
        on_target = any(h == f.target or h.endswith(f"-{f.target}") for found in mine.values() for a in found
                        for h in a.hosts)
        results.append(FaultResult(f, mine, delay, on_target))
    start, end = watched
    outside = {status: [a for a in alerts[status] if start <= a.event_time < end
                        and not any(_in_window(f, a.event_time, grace_s) for f in faults)] for status in STATUSES}
    covered = sum(max(0.0, min(end, f.end + grace_s) - max(start, f.start)) for f in faults)
    return results, outside, max(0.0, end - start - covered)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def table(results: list[FaultResult], outside: dict[str, list], quiet_s: float, t0: float) -> list[str]:
    """The per-fault table. "by chance": the final verdicts the false-alarm rate alone would put
    into the fault's window (its duration + GRACE_S): a fault is told apart only by more than that."""
    lines = ["| fault | target | start | duration | detected | first early warning | first final verdict "
             "| alerts (early / final) | final by chance | on the target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rate = len(outside["final"]) / quiet_s if quiet_s > 0 else float("nan")
    for r in results:
        f = r.fault
        chance = rate * (f.end - f.start + GRACE_S)
        lines.append(f"| {f.kind} | {f.target} | +{f.start - t0:.0f} s | {f.end - f.start:.0f} s | "
                     f"{'yes' if r.detected else 'no'} | {_seconds(r.delay_s['open'])} | {_seconds(r.delay_s['final'])} | "
                     f"{len(r.alerts['open'])} / {len(r.alerts['final'])} | {chance:.1f} | {'yes' if r.on_target else 'no'} |")
    hours = quiet_s / 3600

    def per_hour(n: int) -> str:
        return f"{n / hours:.0f} per hour" if hours > 0 else "n/a"

    lines += ["", f"False alarms outside the faults (and {GRACE_S:.0f} s after each), {quiet_s / 60:.1f} min: "
              f"{len(outside['final'])} final verdicts ({per_hour(len(outside['final']))}), "
              f"{len(outside['open'])} early warnings ({per_hour(len(outside['open']))})"]
    return lines


# --------------------------------------------------------------------------------------------
def run(warmup_s: float, schedule_spec: str, out: Path, seed: int = 1, rate: float = 1.0,
        model: Path | None = None, tail_s: float = TAIL_S) -> dict:
    from confluent_kafka import Producer

    from models import artifacts
    from toolkit import localkafka
    from toolkit.replay import ensure_topic

    schedule = parse_schedule(schedule_spec, seed)
    if model is not None and not (Path(model) / artifacts.MANIFEST).exists():
        raise UsageError(f"--model {model}: no model there (no {artifacts.MANIFEST})")
    started_at = time.monotonic()
    started_broker = False
    if not os.environ.get("LOGWARDEN_KAFKA_BOOTSTRAP"):
        started_broker = not localkafka.status()
        localkafka.up()
    run_id = "lab" + uuid.uuid4().hex[:6]
    work = RUN_DIR / run_id
    out.mkdir(parents=True, exist_ok=True)
    stream = Stream.for_run(run_id, work)
    lab.ensure_jars()
    cluster = lab.create(work / "cluster")
    readers: list[TopicReader] = []
    workload = scraper = injector = None
    producer = None
    try:
        say(f"lab: run {run_id}: starting HDFS {cluster.version} (nn1, dn1, dn2) in {work.relative_to(REPO_ROOT)}")
        lab.start(cluster, die_with_parent=True)
        lab.describe(cluster)
        for host in cluster.daemons:              # topics exist before parse subscribes to the pattern
            ensure_topic(stream.settings, f"logs.{stream.host(host)}")
        metrics_topic = stream.settings.otlp_metrics_topic
        ensure_topic(stream.settings, metrics_topic)
        stream.start_stages()
        for host, d in cluster.daemons.items():
            stream.ship(host, d.log_file)
        producer = Producer(stream.settings.kafka_config() | {"linger.ms": 100})
        scraper = MetricsRecorder(cluster, SCRAPE_INTERVAL_S, on_scrape=lambda host, at, page: producer.produce(
            metrics_topic, otlp_request(cluster, host, stream.host(host), at, page), stream.host(host).encode()))
        scraper.start()
        alerts = Alerts(stream)
        training = TrainingWindows(stream.settings)
        readers = [TopicReader(stream.settings, stream.settings.alerts_topic, alerts.handle, "alerts"),
                   TopicReader(stream.settings, stream.settings.events_topic, training.handle, "events")]
        for r in readers:
            r.start()
        workload = Workload(cluster.namenode.http, WorkloadConfig(rate=rate, seed=seed))
        workload.start()
        warm_start = time.time()
        say(f"lab: workload at {rate:g} op/s (seed {seed}); logs -> logs.{run_id}-<host>, metrics -> {metrics_topic}; "
            f"warm-up {warmup_s:.0f} s without faults")
        _wait(warm_start + warmup_s, stream)
        warm_end = time.time()
        if model is None:
            windows = training.between(warm_start + min(SETTLE_S, warmup_s / 3), warm_end)
            trained = work / "deeplog"
            stats = train_deeplog(windows, trained, seed)
            training_note = (f"{len(windows)} warm-up windows: {sum(w.kind == 'time' for w in windows)} per-host time "
                             f"windows, {sum(w.kind == 'session' for w in windows)} block sessions; "
                             f"{stats['keys']} templates; {stats['seconds']} s")
            say(f"lab: DeepLog trained on {training_note}")
            model = trained
        else:
            training_note = f"given: {model}"
        version = artifacts.publish(model, stream.settings.model_dir)
        stream.restart_stages(freeze_templates=True)
        say(f"lab: serving {version.relative_to(REPO_ROOT) if version.is_relative_to(REPO_ROOT) else version}; "
            "stages restarted with the warm-up's templates frozen")
        t0 = time.time()
        schedule = resolve_targets(schedule, cluster, seed)
        alerts.print_from = t0
        say(f"lab: faults from {_clock(t0)} UTC: " + (", ".join(f.spec() for f in schedule) or "none"))
        injector = Injector(cluster, schedule, out / "fault_list.json", t0, seed,
                            on_event=lambda what, f, d: say(f"lab: {_clock(time.time())} {what} {f.kind} on {f.target}"))
        injector.start()
        end = t0 + (schedule[-1].end_s if schedule else 0.0) + tail_s
        _wait(end, stream, injector)
        watched = (t0, time.time())
    finally:
        halt(injector, workload, scraper)
        if producer is not None:
            producer.flush(10)
            producer = None           # closed now, before the broker goes
        stream.stop()
        time.sleep(1.0)
        for r in readers:
            r.stop.set()
            r.join(10)
        lab.stop(cluster)
        if started_broker:
            localkafka.down()
    found = {status: alerts.anomalous(status) for status in STATUSES}
    results, outside, quiet_s = judge(injector.done, found, watched)
    lines = table(results, outside, quiet_s, t0)
    say("\n" + "\n".join(lines))
    summary = {
        "run": run_id, "hadoop_version": cluster.version, "seed": seed, "schedule": schedule_spec,
        "warmup_s": warmup_s, "rate": rate, "training": training_note, "watched_s": watched[1] - watched[0],
        "quiet_s": quiet_s, "grace_s": GRACE_S,
        "false_alarms": {s: len(outside[s]) for s in STATUSES},
        "false_alarms_per_hour": {s: len(outside[s]) / (quiet_s / 3600) if quiet_s else None for s in STATUSES},
        "faults": [{"kind": r.fault.kind, "target": r.fault.target, "start_s": r.fault.start - t0,
                    "duration_s": r.fault.end - r.fault.start, "detected": r.detected, "delay_s": r.delay_s,
                    "alerts": {s: len(r.alerts[s]) for s in STATUSES}, "on_target": r.on_target} for r in results],
        "fault_errors": injector.errors, "workload": workload.stats.summary(),
        "alerts_total": len(alerts.by_id), "seconds": round(time.monotonic() - started_at, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "alerts.jsonl", "w") as fh:          # each alert's first early warning and final verdict
        for a in sorted(found["open"] + found["final"], key=lambda a: a.detection_time):
            fh.write(encode(a).decode() + "\n")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    say(f"\nlab: workload {workload.stats.summary()}; {len(alerts.by_id)} alerts in all; "
        f"table and labels in {out}; finished in {summary['seconds']:.0f} s")
    return summary


def _wait(until: float, stream: Stream, injector: Injector | None = None) -> None:
    while time.time() < until:
        failed = stream.failed()
        if failed:
            raise UsageError(f"lab: {'; '.join(failed)} (see {stream.work / 'logs'})")
        time.sleep(min(1.0, max(0.0, until - time.time())))


def main(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else REPO_ROOT / "lab-out"
    run(args.warmup, args.faults, out, seed=args.seed, rate=args.rate, model=Path(args.model) if args.model else None)
    return 0
