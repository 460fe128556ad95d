"""Early alerts against the lateness bound and a host's clock skew (issue 20): the sessions stage's
own cores (SessionBook + SessionJudge) fed as the stage is fed, without Kafka, so a grid of
settings costs seconds; `make demo` gives the same figures through the broker at the defaults.

    python -m bench.run --only early

Input: HDFS_5k.log (110 complete blocks, 10 anomalous) and HDFS_20000.log (1,782 blocks cut at
the sample's end, 43 anomalous), dealt over nn1, dn1, dn2 by writer thread as `make demo` deals
them, parsed by the parse core with the HDFS catalog. Arrival: the hosts ship at once, each in its
file's order, merged by the lines' true time (live shippers in step); batches of 500 events, and
after each batch every source's watermark record (the newest time it has reached), as parse sends
them; at the end every source idle. Skew: dn2's clock runs ``skew`` seconds ahead (every dn2 time
+ skew), so its lines reach the watermark early and other hosts' lines of the same block come
late relative to it. Sessions close at the end (complete sessions: gap 1e9 s, as the demo).
Models: the demo's DeepLog and ATT-GRU. Figures per detector, log, lateness, skew: the final
verdict's P/R/F1, early alerts (blocks with an ``open``), early precision and recall, the median
lead of an early alert before its session's last event (log time), updates per alert, cleared
(retracted) alerts and late events.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

SECTION = "early"
NEEDS_MODELS = True
HOSTS = ("nn1", "dn1", "dn2")
LATENESS_S = (0.5, 2.0, 10.0)
SKEWS_S = (0.0, 3.0)
LOGS = (("HDFS_5k.log", "HDFS_5k_block_labels.csv"), ("HDFS_20000.log", "HDFS_20000_block_labels.csv"))
BATCH = 500


def arrival(events, skew_s: float):
    """Events in the order live shippers deliver them (each host's in its file order, the hosts
    merged by true time), with dn2's clock ``skew_s`` ahead."""
    import heapq

    import msgspec

    per_host: dict[str, list] = {}
    for e in events:
        per_host.setdefault(e.source.host, []).append(e)
    merged = heapq.merge(*[[(e.timestamp, i, e) for e in es] for i, es in enumerate(per_host.values())])
    out = []
    for _, _, e in merged:
        if skew_s and e.source.host.endswith("dn2"):
            e = msgspec.structs.replace(e, timestamp=e.timestamp + skew_s)
        out.append(e)
    return out


def simulate(events, models: dict, lateness_s: float) -> tuple[list, dict, int]:
    """(alerts, session key -> closed window, late events) of one pass through the stage's cores."""
    from services.cores.detect import SessionJudge, session_window
    from services.cores.sessions import Closed, SessionBook, SessionConfig

    config = SessionConfig(session_gap_s=1e9, idle_close_s=1e18, allowed_lateness_s=lateness_s,
                           host_idle_s=1e18, watermark_grace_s=0.0)
    book, judge = SessionBook(config), SessionJudge(models)
    now = 1_000_000.0
    alerts, closed, newest = [], {}, {}
    offset = 0

    def handle(actions):
        alerts.extend(judge.judge(actions, now))
        for a in actions:
            if type(a) is Closed and not a.session.time_window:
                closed[a.session.key] = session_window(a, config.time_window_s)

    for start in range(0, len(events), BATCH):
        for e in events[start:start + BATCH]:
            handle(book.take(e, offset, now))
            offset += 1
            source = f"{e.source.topic}:{e.source.partition}"
            newest[source] = max(newest.get(source, e.timestamp), e.timestamp)
        for source, ts in newest.items():
            book.mark(source, ts, False, now, offset)
            offset += 1
        now += 0.05
        handle(book.add_batch((), now))
    for source in newest:
        book.mark(source, None, True, now, offset)
        offset += 1
    handle(book.add_batch((), now))
    handle(book.close_all("shutdown"))
    return alerts, closed, book.late_events


def figures(name: str, alerts: list, closed: dict, labels: dict[str, int]) -> dict:
    from models.metrics import confusion

    mine = [a for a in alerts if a.detector == name]
    finals = {a.key for a in mine if a.status == "final" and a.anomalous}
    opened: dict[str, object] = {}
    for a in mine:
        if a.status == "open":
            opened.setdefault(a.key, a)
    keys = sorted(labels)
    final = confusion([labels[k] for k in keys], [k in finals for k in keys]).as_dict()
    true_early = [k for k in opened if labels.get(k)]
    leads = [closed[k].end - opened[k].event_time for k in true_early if k in closed and closed[k].end is not None]
    return {"final_precision": final["precision"], "final_recall": final["recall"], "final_f1": final["f1"],
            "early_alerts": len(opened),
            "early_precision": round(len(true_early) / len(opened), 4) if opened else None,
            "early_recall": round(len(true_early) / max(1, sum(labels.values())), 4),
            "early_not_in_final": sum(1 for k in opened if k not in finals),
            "median_lead_s": round(statistics.median(leads), 1) if leads else None,
            "updates_per_alert": round(sum(a.status == "update" for a in mine) / len(opened), 2) if opened else None,
            "cleared": sum(a.status == "cleared" for a in mine)}


def evaluate(data: Path, models_dir: Path) -> dict:
    from models.data import read_block_labels
    from services.cores.detect import ModelSet
    from services.settings import load_settings
    from toolkit.reference import parse_files
    from toolkit.replay import deal_lines

    hdfs = data / "hdfs"
    served = ModelSet(models_dir, "cpu", modality="logs")
    served.refresh()
    settings = load_settings(template_catalog=hdfs / "HDFS_templates.csv")
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="logwarden-early-") as tmp:
        for log_name, labels_name in LOGS:
            labels = read_block_labels(hdfs / labels_name)
            files = deal_lines(hdfs / log_name, list(HOSTS), Path(tmp) / log_name)
            events = parse_files(settings, files)
            for skew in SKEWS_S:
                ordered = arrival(events, skew)
                for lateness in LATENESS_S:
                    alerts, closed, late = simulate(ordered, served.loaded, lateness)
                    row = {name: figures(name, alerts, closed, labels) for name in sorted(served.loaded)}
                    row["late_events"] = late
                    report[f"{log_name}|lateness={lateness:g}|skew={skew:g}"] = row
    return report


def run(ctx) -> dict:
    report = evaluate(ctx.data, ctx.model_dir(("deeplog", "attgru")))
    return {"early.report": report, "early.command": "python -m bench.run --only early"}


def render(r: dict):
    report = r.get("early.report") or {}
    yield "## Early alerts: the lateness bound and a host's clock skew"
    yield ""
    yield ("The sessions stage's cores fed as the stage is fed (bench/eval_early.py: hosts shipping at once, "
           "watermark records after every batch of 500 events), without Kafka; `make demo` measures the defaults "
           "(lateness 2 s, no skew) through the broker. Skew: dn2's clock that many seconds ahead. "
           "*not in final*: blocks with an early alert that the final verdict does not flag.")
    yield ""
    yield ("| log | lateness s | skew s | detector | final P / R / F1 | early alerts | early precision | early recall "
           "| not in final | median lead s | updates per alert | cleared | late events |")
    yield "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for key, row in report.items():
        log_name, lateness, skew = key.split("|")
        for name, f in row.items():
            if name == "late_events":
                continue
            yield (f"| {log_name} | {lateness.split('=')[1]} | {skew.split('=')[1]} | {name} "
                   f"| {f['final_precision']:.3f} / {f['final_recall']:.3f} / {f['final_f1']:.3f} | {f['early_alerts']} "
                   f"| {f['early_precision']} | {f['early_recall']} | {f['early_not_in_final']} | {f['median_lead_s']} "
                   f"| {f['updates_per_alert']} | {f['cleared']} | {row['late_events']} |")
    yield ""
    yield ("What it shows: with the hosts shipping in step, no event is late at any bound (0.5 s to 10 s give the same "
           "figures): the watermark waits for the slowest host, and the bound only has to cover disorder within one "
           "host's own file, which HDFS's one-second clock keeps below a second. Late events come from a host that "
           "falls silent past LOGWARDEN_HOST_IDLE_S (or is called idle) and then sends its backlog; the broker-fault "
           "runs (bench/eval_failures.py) measure that. A clock skew reorders a block's events across hosts: the final "
           "verdicts change with it (the model sees another order), the early alerts still hold only what the final "
           "verdict holds (*not in final* 0 everywhere), so early precision stays >= final precision.")
    yield ""
    yield f"Command: `{r.get('early.command')}`."
