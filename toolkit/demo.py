"""`make demo`: the whole pipeline on real HDFS logs with a local Kafka broker.

1. start the local broker (or use LOGWARDEN_KAFKA_BOOTSTRAP);
2. train DeepLog and ATT-GRU with the `logwarden train` CLI, or reuse them from .cache/demo-models
   (keyed by the training data's sha256 and the detector's source). Both train on complete
   sessions only: DeepLog on deeplog_hdfs_train (normal sessions), ATT-GRU on those and the
   labelled development sessions (hdfs_dev_normal, hdfs_dev_abnormal), minus every session that
   could be a block the demo replays;
3. replay HDFS_5k.log — every line of 110 blocks over the whole log, complete sessions — dealt
   over three hosts (each writer thread on one host: a block's lines come from several hosts), every host
   shipping at once, while parse and sessions run in this process; early alerts (raised while a
   block's session is still open, judged in event time) print as they come;
4. once every block is judged: per detector the final verdicts' precision/recall/F1 against the
   block labels, the early alerts' precision and recall, how long before its session's end (in
   the log's own time) an early alert came, and the update records per alert; that the final
   verdicts equal `logwarden evaluate` of the same models on the same sessions (built offline
   by the same cores); a score plot in demo-out/;
5. the same for HDFS_20000.log (its first 20,000 lines: every block is cut where the sample ends,
   which hides most anomalies — shown second, for what a cut log does to any detector);
6. stop everything it started.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
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
from models.data import read_block_labels, read_sessions, sessions_from_logs, without_possible_copies
from models.metrics import confusion
from services import stages
from services.records import Alert, Window, decode
from services.settings import REPO_ROOT, load_settings
from toolkit import localkafka
from toolkit.reference import block_sessions

log = logging.getLogger("logwarden.demo")
HOSTS = ("nn1", "dn1", "dn2")
DETECTORS = ("deeplog", "attgru")
SHOW_ALERTS = 6            # early alerts printed in full; the rest as one line each


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
def train_models(data: Path, cache: Path) -> dict[str, Path]:
    """Train (or reuse) one model per detector; returns detector -> model dir."""
    hdfs = data / "hdfs"
    models = {}
    deeplog_train = hdfs / "deeplog_hdfs_train"
    key = sha256_text("deeplog", artifacts.sha256_file(deeplog_train), code_version("deeplog"))
    out = cache / f"deeplog-{key}"
    if not (out / artifacts.MANIFEST).exists():
        say(f"training DeepLog on {deeplog_train.name}'s normal sessions (once; cached in {out}) ...")
        logwarden_cli("train", "--detector", "deeplog", "--normal", str(deeplog_train), "--out", str(out))
    else:
        say(f"DeepLog: reusing {out}")
    models["deeplog"] = out

    # ATT-GRU is supervised: complete labelled sessions, never cut ones (a cut session never shows
    # a block's later events, and the model learns that their absence is normal). No session that
    # could be a replayed block (same keys and counts: the files have no block ids) is kept.
    replayed = [s.keys for name in ("HDFS_5k", "HDFS_20000")
                for s in sessions_from_logs([hdfs / f"{name}.log"], hdfs / f"{name}_block_labels.csv",
                                            hdfs / "HDFS_templates.csv", session_gap_s=1e9)[0]]
    normal = without_possible_copies(read_sessions(deeplog_train) + read_sessions(hdfs / "hdfs_dev_normal"), replayed)
    abnormal = without_possible_copies(read_sessions(hdfs / "hdfs_dev_abnormal"), replayed)
    text_normal = "\n".join(" ".join(k[1:] for k in keys) for keys in normal)
    text_abnormal = "\n".join(" ".join(k[1:] for k in keys) for keys in abnormal)
    key = sha256_text("attgru", text_normal, text_abnormal, artifacts.sha256_file(hdfs / "HDFS_templates.csv"),
                      code_version("attgru"))
    out = cache / f"attgru-{key}"
    if not (out / artifacts.MANIFEST).exists():
        say(f"training ATT-GRU on {len(normal)} normal and {len(abnormal)} anomalous complete sessions "
            f"(deeplog_hdfs_train, hdfs_dev_*; once; cached in {out}) ...")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "normal").write_text(text_normal + "\n")
            (Path(tmp) / "abnormal").write_text(text_abnormal + "\n")
            logwarden_cli("train", "--detector", "attgru", "--normal", f"{tmp}/normal", "--abnormal",
                          f"{tmp}/abnormal", "--templates", str(hdfs / "HDFS_templates.csv"), "--out", str(out))
    else:
        say(f"ATT-GRU: reusing {out}")
    models["attgru"] = out
    return models


# ------------------------------------------------------------------------------------------
class Reader(threading.Thread):
    """Follows the alerts and windows topics: prints early alerts as they come, keeps the rest."""

    def __init__(self, settings, run_id: str):
        super().__init__(daemon=True)
        self.settings, self.run_id = settings, run_id
        self.stop = threading.Event()
        self.alerts: list[Alert] = []
        self.closed: dict[str, Window] = {}           # session key -> its closed session window
        self.shown = 0

    def run(self) -> None:
        from services.alerts import format_alert

        consumer = Consumer(self.settings.kafka_config() | {
            "group.id": f"{self.settings.group_prefix}.demo-reader", "auto.offset.reset": "earliest"})
        consumer.subscribe([self.settings.alerts_topic, self.settings.windows_topic])
        try:
            while not self.stop.is_set():
                for msg in consumer.consume(500, timeout=0.2):
                    if msg.error():
                        continue
                    if msg.topic() == self.settings.windows_topic:
                        w = decode(msg.value(), Window)
                        if w.kind == "session":
                            self.closed[w.key] = w
                        continue
                    alert = decode(msg.value(), Alert)
                    self.alerts.append(alert)
                    if alert.status != "open":
                        continue
                    if self.shown < SHOW_ALERTS:
                        say(format_alert(alert).replace(f"{self.run_id}-", ""))
                    else:
                        first = alert.first_anomaly
                        say(f"  early {alert.detector:7} {alert.key}  {first.template_id}: {first.message[:90]}")
                    self.shown += 1
        finally:
            consumer.close()


def judged(detector: str) -> float:
    return sum(REGISTRY.get_sample_value("logwarden_sessions_judged_total",
                                         {"detector": detector, "verdict": v}) or 0 for v in ("normal", "anomalous"))


def stream_figures(name: str, alerts: list[Alert], closed: dict[str, Window], labels: dict[str, int]) -> dict:
    """What a pager would have seen of one detector: the final verdicts, and the early alerts."""
    keys = sorted(labels)
    mine = [a for a in alerts if a.detector == name]
    finals = {a.key for a in mine if a.status == "final" and a.anomalous}
    opened: dict[str, Alert] = {}
    for a in sorted(mine, key=lambda a: a.detection_time):
        if a.status == "open":
            opened.setdefault(a.key, a)
    final = confusion([labels[k] for k in keys], [k in finals for k in keys]).as_dict()
    early_true = [k for k in opened if labels.get(k)]
    leads = [closed[k].end - opened[k].event_time for k in early_true if k in closed and closed[k].end is not None]
    updates = sum(1 for a in mine if a.status == "update")
    anomalous = sum(labels.values())
    return {"final": final,
            "early_alerts": len(opened),
            "early_precision": round(len(early_true) / len(opened), 4) if opened else None,
            "early_recall": round(len(early_true) / anomalous, 4) if anomalous else None,
            "median_lead_s": round(statistics.median(leads), 1) if leads else None,
            "updates_per_alert": round(updates / len(opened), 2) if opened else None,
            "cleared": sum(1 for a in mine if a.status == "cleared")}


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
    """Per detector, how far apart normal and anomalous sessions score, on a scale that shows it:
    DeepLog by the lowest probability it gave any observed key of the session (log10; its
    probability floor and the floor of a session's end marked: a key is also flagged when it is
    not among the top g, so the legend counts the blocks each verdict flagged), ATT-GRU by its
    anomaly probability (logit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.cores.detect import closed_sequence

    keys = sorted(sessions)
    seqs = [closed_sequence(sessions[k]) for k in keys]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2))
    for ax, (name, model) in zip(axes, models.items()):
        detector = artifacts.load(model, device="cpu")
        verdicts = detector.score(seqs)
        if name == "deeplog":
            values = [math.log10(max(1.0 - v.score, 1e-12)) for v in verdicts]
            xlabel, marks = "log10 of the lowest probability of an observed key", []
            floor, end_floor = getattr(detector, "floor", None), getattr(detector, "end_floor", None)
            if floor:
                marks = [(math.log10(floor), "probability floor")]
            if end_floor and end_floor != floor:
                marks.append((math.log10(end_floor), "floor of a session's end"))
        else:
            values = [math.log(max(v.score, 1e-9) / max(1 - v.score, 1e-9)) for v in verdicts]
            xlabel, marks = "logit of the anomaly probability", [(0.0, "p = 0.5")]
        low, high = min(values), max(values)
        bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
        for label, colour in ((0, "tab:blue"), (1, "tab:red")):
            scores = [x for k, x in zip(keys, values) if labels[k] == label]
            flagged = sum(1 for k, v in zip(keys, verdicts) if labels[k] == label and v.anomalous)
            ax.hist(scores, bins=bins, alpha=0.65, color=colour,
                    label=f"{'anomalous' if label else 'normal'} blocks ({len(scores)}; {flagged} flagged)")
        for x, text in marks:
            ax.axvline(x, color="black", linestyle="--", linewidth=1)
            ax.annotate(text, (x, ax.get_ylim()[1] * 0.9), rotation=90, ha="right", va="top", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{name}: {title}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("blocks")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[tuple[str, dict]]) -> str:
    out = ["| detector | final P / R / F1 | tp fp fn | early alerts | early precision | early recall "
           "| median lead (log time) | updates per alert | cleared |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        f = r["final"]

        def show(x, unit=""):
            return "–" if x is None else f"{x}{unit}"
        out.append(f"| {name} | {f['precision']:.3f} / {f['recall']:.3f} / {f['f1']:.3f} | {f['tp']} {f['fp']} {f['fn']} "
                   f"| {r['early_alerts']} | {show(r['early_precision'])} | {show(r['early_recall'])} "
                   f"| {show(r['median_lead_s'], ' s')} | {show(r['updates_per_alert'])} | {r['cleared']} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
def stream_run(log_name: str, labels_name: str, note: str, hdfs: Path, models: dict[str, Path], out_dir: Path,
               rate: float) -> tuple[bool, dict]:
    """One pass of a log through the stream on fresh topics; (stream == evaluate, figures)."""
    from models.data import sequence_ceiling
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
    for host in hosts:             # the hosts' topics exist before parse starts, as in a deployment
        ensure_topic(settings, f"logs.{host}")
    judged_before = {d: judged(d) for d in DETECTORS}

    stop = threading.Event()
    reader = Reader(settings, run_id)
    reader.start()
    runner = threading.Thread(target=stages.run, args=(["parse", "sessions"], settings), kwargs={"stop": stop},
                              daemon=True)
    runner.start()
    files = deal_lines(hdfs / log_name, hosts, run_dir / "logs")
    say(f"\n=== {log_name} as {', '.join(HOSTS)}: {len(labels)} blocks, {sum(labels.values())} anomalous ({note})")
    say("early alerts as they happen (a block's session still open, its events judged in event time):")
    replayed = replay_hosts(settings, files, rate)

    deadline = time.monotonic() + 300
    while (any(judged(d) - judged_before[d] < len(labels) for d in DETECTORS)
           and time.monotonic() < deadline and runner.is_alive()):
        time.sleep(0.5)
    time.sleep(2)                  # let the reader catch the last finals
    stop.set()
    reader.stop.set()
    runner.join(30)
    reader.join(10)
    complete = all(judged(d) - judged_before[d] >= len(labels) for d in DETECTORS)
    rows = [(name, stream_figures(name, reader.alerts, reader.closed, labels)) for name in DETECTORS]
    say(f"\n{replayed} lines replayed; every block judged: {complete}")
    say(f"\nPer-block verdicts of the stream vs {labels_name}:\n" + table(rows))
    in_order, order_labels, _ = sessions_from_logs([hdfs / log_name], hdfs / labels_name, hdfs / "HDFS_templates.csv",
                                                   session_gap_s=1e9)
    ceiling = sequence_ceiling([tuple(q.keys) for q, y in zip(in_order, order_labels) if not y],
                               [tuple(q.keys) for q, y in zip(in_order, order_labels) if y])
    say(f"best any key-sequence detector can do on these sessions (each distinct sequence given its majority "
        f"label): F1 {ceiling['f1']:.3f}")

    sessions = block_sessions(settings, files)
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, figures in rows:
            batch = evaluate_batch(models[name], name, sessions, labels, hdfs / "HDFS_templates.csv", Path(tmp))["all"]
            stream = figures["final"]
            equal = all(batch[k] == stream[k] for k in ("tp", "fp", "tn", "fn"))
            same &= equal
            say(f"{name}: `logwarden evaluate` on the same sessions: tp={batch['tp']} fp={batch['fp']} "
                f"tn={batch['tn']} fn={batch['fn']} -> {'equal to the stream' if equal else 'DIFFERS from the stream'}")
    stem = Path(log_name).stem
    plot_scores(models, sessions, labels, out_dir / f"scores-{stem}.png", f"{log_name} blocks")
    (out_dir / f"table-{stem}.md").write_text(table(rows) + f"\n\nceiling F1 {ceiling['f1']:.3f}\n")
    say(f"plot: {out_dir / f'scores-{stem}.png'}; table: {out_dir / f'table-{stem}.md'}")
    return same and complete, {"log": log_name, "rows": dict(rows), "ceiling_f1": ceiling["f1"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "datasets"))
    parser.add_argument("--out", default=str(REPO_ROOT / "demo-out"))
    parser.add_argument("--rate", type=float, default=3000.0, help="lines per second per host")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data, out_dir = Path(args.data), Path(args.out)
    hdfs = data / "hdfs"
    if not (hdfs / "HDFS_5k.log").exists():
        say(f"make demo: no HDFS data at {hdfs} (expected ../shared/datasets beside the repo)")
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    started_broker = False
    if not os.environ.get("LOGWARDEN_KAFKA_BOOTSTRAP"):
        started_broker = not localkafka.status(quiet=True)     # a broker already up (make kafka-up) stays up
        if started_broker:
            say("starting the local Kafka broker (make kafka-up) ...")
        localkafka.up()
    models = train_models(data, REPO_ROOT / ".cache" / "demo-models")
    figures = []
    try:
        ok, fig = stream_run("HDFS_5k.log", "HDFS_5k_block_labels.csv",
                             "every line of these blocks over the whole log: complete sessions", hdfs, models,
                             out_dir, args.rate)
        figures.append(fig)
        more, fig = stream_run("HDFS_20000.log", "HDFS_20000_block_labels.csv",
                               "the first 20,000 lines of HDFS_v1: every block is cut where the sample ends",
                               hdfs, models, out_dir, args.rate)
        figures.append(fig)
        ok &= more
    finally:
        if started_broker:
            localkafka.down(quiet=True)
            say("local broker stopped")
    (out_dir / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    say(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
