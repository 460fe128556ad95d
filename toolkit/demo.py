"""`make demo`: the whole pipeline on real HDFS logs with a local Kafka broker.

1. start the local broker (or use LOGWARDEN_KAFKA_BOOTSTRAP);
2. train DeepLog and ATT-GRU with the `logwarden train` CLI, or reuse them from .cache/demo-models
   (the cache key is the training data's sha256 and the training options);
3. replay HDFS_20000.log dealt over three hosts (line i -> host i % 3: blocks span hosts), every
   host shipping at once at a steady rate, while every stage runs (`run all`, in this process),
   printing alerts as they arrive;
4. once every block's session is judged, print per-block precision/recall/F1 against
   HDFS_20000_block_labels.csv next to the best any key-sequence detector can reach on those
   sessions, check that it equals `logwarden evaluate` of the same models on the same blocks
   (sessions built offline by the same parse and window cores), and plot the score distribution
   to demo-out/; then the same for HDFS_5k.log (complete sessions: HDFS_20000.log cuts every block
   where the sample ends, which hides most anomalies);
5. stop everything it started.

Training data never includes the demo's blocks: DeepLog trains on deeplog_hdfs_train (normal
sessions only), ATT-GRU on the HDFS_100k blocks that do not occur in HDFS_20000.log.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer
from prometheus_client import REGISTRY

from models import artifacts
from models.data import read_block_labels, read_hdfs_100k, read_sessions, sessions_from_logs, without_possible_copies
from models.metrics import confusion
from toolkit import localkafka
from services import stages
from services.records import Alert, Source, decode
from services.settings import REPO_ROOT, load_settings

log = logging.getLogger("logwarden.demo")
HOSTS = ("nn1", "dn1", "dn2")
DETECTORS = ("deeplog", "attgru")
SHOW_ALERTS = 8            # alerts printed in full; the rest as one line each


def say(text: str = "") -> None:
    print(text, flush=True)


def sha256_text(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def code_version(detector: str) -> str:
    """The detector's source: a cached model trained by other code is trained again."""
    return artifacts.sha256_file(REPO_ROOT / "models" / f"{detector}.py")


def logwarden_cli(*args: str) -> None:
    exe = Path(sys.executable).with_name("logwarden")
    subprocess.run([str(exe), *args], check=True)


# ------------------------------------------------------------------------------------------
def train_models(data: Path, cache: Path, demo_blocks: set[str]) -> dict[str, Path]:
    """Train (or reuse) one model per detector; returns detector -> model dir."""
    hdfs = data / "hdfs"
    models = {}
    deeplog_train = hdfs / "deeplog_hdfs_train"
    key = sha256_text("deeplog", artifacts.sha256_file(deeplog_train), code_version("deeplog"))
    out = cache / f"deeplog-{key}"
    if not (out / artifacts.MANIFEST).exists():
        say(f"training DeepLog on {deeplog_train.name} (once; cached in {out}) ...")
        logwarden_cli("train", "--detector", "deeplog", "--normal", str(deeplog_train), "--out", str(out))
    else:
        say(f"DeepLog: reusing {out}")
    models["deeplog"] = out

    # ATT-GRU is supervised: HDFS_100k blocks, minus every block the demo replays.
    blocks = [b for b in read_hdfs_100k(hdfs / "HDFS_100k_block_labels.csv") if b.block_id not in demo_blocks]
    # ... plus the complete (whole-log) normal sessions of deeplog_hdfs_train: HDFS_100k's sequences
    # stop at line 100k, so without them the later events of every complete session (E3, E4, E23)
    # were never seen as normal and every complete HDFS_5k session was flagged (100 of 100);
    # minus those that could be an HDFS_5k block (same keys and counts; the file has no block ids).
    five, _, _ = sessions_from_logs([hdfs / "HDFS_5k.log"], hdfs / "HDFS_5k_block_labels.csv",
                                    hdfs / "HDFS_templates.csv", session_gap_s=1e9)
    complete = without_possible_copies(read_sessions(deeplog_train), [s.keys for s in five])
    normal = "\n".join([" ".join(k[1:] for k in b.keys) for b in blocks if not b.label]
                       + [" ".join(k[1:] for k in keys) for keys in complete])
    abnormal = "\n".join(" ".join(k[1:] for k in b.keys) for b in blocks if b.label)
    key = sha256_text("attgru", normal, abnormal, artifacts.sha256_file(hdfs / "HDFS_templates.csv"),
                      code_version("attgru"))
    out = cache / f"attgru-{key}"
    if not (out / artifacts.MANIFEST).exists():
        say(f"training ATT-GRU on {len(blocks)} HDFS_100k blocks not in the demo + {len(complete)} complete normal "
            f"sessions of {deeplog_train.name} (once; cached in {out}) ...")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "normal").write_text(normal + "\n")
            (Path(tmp) / "abnormal").write_text(abnormal + "\n")
            logwarden_cli("train", "--detector", "attgru", "--normal", f"{tmp}/normal", "--abnormal",
                          f"{tmp}/abnormal", "--templates", str(hdfs / "HDFS_templates.csv"), "--out", str(out))
    else:
        say(f"ATT-GRU: reusing {out}")
    models["attgru"] = out
    return models


def offline_sessions(settings, files: dict[str, Path]) -> dict[str, list]:
    """Every block's closed session built by the same parse core and session book as the stream
    (its event-time order), without Kafka: what `logwarden evaluate` is given."""
    from services.cores.parse import ParseConfig, ParseCore, load_catalog
    from services.cores.sessions import SessionConfig, sessions_in_order

    core = ParseCore(ParseConfig.load(settings.parse_config), catalog=load_catalog(settings.template_catalog))
    events = []
    for host, path in files.items():
        offset = 0
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh):
                line = raw.decode().rstrip("\r\n")
                src = Source(host=host, topic=f"logs.{host}", partition=0, offset=i, file_path=str(path.resolve()),
                             file_offset=offset)
                events.extend(core.parse(line, host, src, 0.0))
                offset += len(raw)
    config = SessionConfig(window_size=settings.window_size, session_gap_s=settings.session_gap_s,
                           session_max_events=settings.session_max_events, idle_close_s=1e18,
                           time_window_s=settings.time_window_s)
    return {c.session.key: c for c in sessions_in_order(events, config) if not c.session.time_window}


# ------------------------------------------------------------------------------------------
class AlertPrinter(threading.Thread):
    """Prints alerts as they arrive and keeps the final verdicts."""

    def __init__(self, settings):
        super().__init__(daemon=True)
        self.settings = settings
        self.stop = threading.Event()
        self.finals: dict[tuple[str, str], Alert] = {}
        self.shown = 0
        self.count = 0
        self.early = 0

    def run(self) -> None:
        from services.alerts import format_alert

        consumer = Consumer(self.settings.kafka_config() | {
            "group.id": f"{self.settings.group_prefix}.demo-printer", "auto.offset.reset": "earliest"})
        consumer.subscribe([self.settings.alerts_topic])
        try:
            while not self.stop.is_set():
                for msg in consumer.consume(200, timeout=0.2):
                    if msg.error():
                        continue
                    alert = decode(msg.value(), Alert)
                    if alert.status == "final":
                        self.finals[(alert.detector, alert.key)] = alert
                    if alert.status == "update":
                        continue
                    self.count += 1
                    if alert.status != "final" or not alert.anomalous:
                        # Early warnings on open sessions: while several hosts' lines interleave,
                        # a sliding window sees them in arrival order; the final verdict is judged
                        # on the session in event-time order.
                        self.early += 1
                    elif self.shown < SHOW_ALERTS:
                        say(format_alert(alert))
                        self.shown += 1
                    else:
                        first = alert.first_anomaly
                        say(f"  [final] {alert.detector:7} {alert.key}  {first.template_id}: {first.message[:90]}")
        finally:
            consumer.close()


def judged(detector: str) -> float:
    return sum(REGISTRY.get_sample_value("logwarden_sessions_judged_total",
                                         {"detector": detector, "verdict": v}) or 0 for v in ("normal", "anomalous"))


def evaluate_batch(model: Path, detector: str, sessions: dict, labels: dict[str, int], templates: Path,
                   tmp: Path) -> dict:
    normal = [s for k, s in sessions.items() if not labels[k]]
    abnormal = [s for k, s in sessions.items() if labels[k]]
    for name, group in (("normal", normal), ("abnormal", abnormal)):
        (tmp / name).write_text("\n".join(" ".join(v.template_id[1:] for v in c.steps) for c in group) + "\n")
    out = tmp / f"{detector}.json"
    args = ["evaluate", "--detector", detector, "--model", str(model), "--normal", str(tmp / "normal"),
            "--abnormal", str(tmp / "abnormal"), "--json", str(out)]
    if detector == "attgru":
        args += ["--templates", str(templates)]
    logwarden_cli(*args)
    return json.loads(out.read_text())


def plot_scores(models: dict[str, Path], sessions: dict, labels: dict[str, int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.cores.detect import closed_sequence

    keys = sorted(sessions)
    seqs = [closed_sequence(sessions[k]) for k in keys]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4))
    for ax, (name, model) in zip(axes, models.items()):
        verdicts = artifacts.load(model, device="cpu").score(seqs)
        for label, colour in ((0, "tab:blue"), (1, "tab:red")):
            scores = [v.score for k, v in zip(keys, verdicts) if labels[k] == label]
            ax.hist(scores, bins=40, alpha=0.6, color=colour, label=f"{'anomalous' if label else 'normal'} ({len(scores)})")
        ax.set_yscale("log")
        ax.set_title(f"{name}: session scores, {title}")
        ax.set_xlabel("score (higher = more anomalous)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[tuple[str, dict]]) -> str:
    out = ["| detector | blocks | tp | fp | tn | fn | precision | recall | F1 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in rows:
        out.append(f"| {name} | {c['tp'] + c['fp'] + c['tn'] + c['fn']} | {c['tp']} | {c['fp']} | {c['tn']} | {c['fn']} "
                   f"| {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
def stream_run(log_name: str, labels_name: str, note: str, hdfs: Path, models: dict[str, Path], out_dir: Path,
               rate: float) -> bool:
    """One pass of a log through every stage on fresh topics; True when stream == evaluate."""
    from models.data import sequence_ceiling, sessions_from_logs
    from toolkit.replay import deal_lines, ensure_topic, replay_hosts

    labels = read_block_labels(hdfs / labels_name)
    run_id = "demo" + uuid.uuid4().hex[:6]
    run_dir = REPO_ROOT / ".run" / run_id
    settings = load_settings(
        logs_pattern=rf"^logs\.{run_id}-.*", events_topic=f"{run_id}.events", windows_topic=f"{run_id}.windows",
        alerts_topic=f"{run_id}.alerts", deadletter_topic=f"{run_id}.deadletter", feedback_topic=f"{run_id}.feedback",
        group_prefix=run_id, state_dir=run_dir / "state", model_dir=run_dir / "models",
        template_catalog=hdfs / "HDFS_templates.csv", session_gap_s=1e9, idle_close_s=8.0, metrics_port=0)
    for model in models.values():
        artifacts.publish(model, settings.model_dir)
    hosts = [f"{run_id}-{h}" for h in HOSTS]
    for host in hosts:             # the hosts' topics exist before parse subscribes to the pattern
        ensure_topic(settings, f"logs.{host}")
    judged_before = {d: judged(d) for d in DETECTORS}

    stop = threading.Event()
    printer = AlertPrinter(settings)
    printer.start()
    runner = threading.Thread(target=stages.run, args=(list(stages.ALL_STAGES), settings), kwargs={"stop": stop},
                              daemon=True)
    runner.start()
    files = deal_lines(hdfs / log_name, hosts, run_dir / "logs")
    say(f"\n=== {log_name} as {', '.join(HOSTS)}: {len(labels)} blocks, {sum(labels.values())} anomalous ({note})")
    say("alerts as they happen (early warnings from sliding windows are counted; final verdicts shown):")
    replayed = replay_hosts(settings, files, rate)

    deadline = time.monotonic() + 300
    while (any(judged(d) - judged_before[d] < len(labels) for d in DETECTORS)
           and time.monotonic() < deadline and runner.is_alive()):
        time.sleep(0.5)
    time.sleep(2)                  # let the printer catch the last finals
    stop.set()
    printer.stop.set()
    runner.join(30)
    printer.join(10)
    complete = all(judged(d) - judged_before[d] >= len(labels) for d in DETECTORS)
    say(f"\n{replayed} lines replayed; {printer.count} alerts: {printer.count - printer.early} final anomalous, "
        f"{printer.early} early warnings or cleared; every block judged: {complete}")

    rows = []
    keys = sorted(labels)
    for name in DETECTORS:
        predicted = {key for (det, key), a in printer.finals.items() if det == name and a.anomalous}
        rows.append((name, confusion([labels[k] for k in keys], [k in predicted for k in keys]).as_dict()))
    sessions = offline_sessions(settings, files)
    # The data's own limit, on the sessions in file order (one host): sessions that share a key
    # sequence cannot be told apart by any key-sequence detector.
    in_order, order_labels, _ = sessions_from_logs([hdfs / log_name], hdfs / labels_name, hdfs / "HDFS_templates.csv",
                                                   session_gap_s=1e9)
    ceiling = sequence_ceiling([tuple(q.keys) for q, y in zip(in_order, order_labels) if not y],
                               [tuple(q.keys) for q, y in zip(in_order, order_labels) if y])
    say(f"\nPer-block verdicts of the stream vs {labels_name}:\n" + table(rows))
    say(f"best any key-sequence detector can do on these sessions (each distinct sequence given its majority "
        f"label): F1 {ceiling['f1']:.3f} (recall {ceiling['recall']:.3f})")

    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, stream in rows:
            batch = evaluate_batch(models[name], name, sessions, labels, hdfs / "HDFS_templates.csv", Path(tmp))["all"]
            equal = all(batch[k] == stream[k] for k in ("tp", "fp", "tn", "fn"))
            same &= equal
            say(f"{name}: `logwarden evaluate` on the same blocks: tp={batch['tp']} fp={batch['fp']} "
                f"tn={batch['tn']} fn={batch['fn']} -> {'equal to the stream' if equal else 'DIFFERS from the stream'}")
    stem = Path(log_name).stem
    plot_scores(models, sessions, labels, out_dir / f"scores-{stem}.png", f"{log_name} blocks")
    (out_dir / f"table-{stem}.md").write_text(table(rows) + f"\n\nceiling F1 {ceiling['f1']:.3f}\n")
    say(f"plot: {out_dir / f'scores-{stem}.png'}; table: {out_dir / f'table-{stem}.md'}")
    return same and complete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--out", default=str(REPO_ROOT / "demo-out"))
    parser.add_argument("--rate", type=float, default=3000.0, help="lines per second per host")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data, out_dir = Path(args.data), Path(args.out)
    hdfs = data / "hdfs"
    if not (hdfs / "HDFS_20000.log").exists():
        say(f"make demo: no HDFS data at {hdfs} (expected ../shared/datasets beside the repo)")
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    started_broker = False
    if not os.environ.get("LOGWARDEN_KAFKA_BOOTSTRAP"):
        started_broker = not localkafka.status()     # a broker already up (make kafka-up) stays up
        if started_broker:
            say("starting the local Kafka broker (make kafka-up) ...")
        localkafka.up()
    demo_blocks = set(read_block_labels(hdfs / "HDFS_20000_block_labels.csv"))   # HDFS_5k's are among them
    models = train_models(data, REPO_ROOT / ".cache" / "demo-models", demo_blocks)
    try:
        ok = stream_run("HDFS_20000.log", "HDFS_20000_block_labels.csv",
                        "the first 20,000 lines of HDFS_v1: every block is cut where the sample ends", hdfs, models,
                        out_dir, args.rate)
        ok &= stream_run("HDFS_5k.log", "HDFS_5k_block_labels.csv",
                         "every line of these blocks over the whole log: complete sessions", hdfs, models, out_dir,
                         args.rate)
    finally:
        if started_broker:
            localkafka.down()
            say("local broker stopped")
    say(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
