"""`logwarden lab record --minutes N --faults SCHEDULE --out DIR`: a labelled logs + metrics data
set from a fresh lab cluster, in the layout of ../shared/datasets/' TrainTicket days, so the
readers of models/microservices.py (and the Hades and AnoFusion detectors on them) read it:

    DIR/log/<host>.log             each daemon's log4j file as it wrote it (raw lines, UTC clock)
    DIR/metric/<host>_metric.csv   Time,TimeStamp,PodName,<one column per /prom series>: one row
                                   per host per 10 s (empty cells: the daemon did not answer)
    DIR/fault_list.json            the faults (models.faults layout, inject_pod = target host)
    DIR/manifest.json              seed, schedule, Hadoop version, times, what each fault did,
                                   the workload's counts

Seeded and reproducible apart from timing: the workload's operations (kinds, files, sizes, bytes),
the fault targets and what a fault touches are drawn from ``--seed``; when each line is written,
and what the daemons log about timing, is the machine's. Fault offsets count from the moment the
workload starts (the cluster is up and every DataNode live); the log files also hold the
cluster's start-up, before that moment.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from models.faults import write_faults
from services.settings import REPO_ROOT, RUN_DIR, UsageError
from toolkit.lab import cluster as lab
from toolkit.lab.faults import Injector, halt, parse_schedule, resolve_targets
from toolkit.lab.scrape import SCRAPE_INTERVAL_S, MetricsRecorder
from toolkit.lab.workload import HEALTHY_SHARE, RECOVERY_S, Workload, WorkloadConfig

log = logging.getLogger(__name__)


def say(text: str) -> None:
    print(text, flush=True)


def copy_logs(cluster: lab.Cluster, out_dir: Path) -> dict[str, int]:
    """log/<host>.log: each daemon's log file, rotated parts first (log4j's .2, .1, then the
    live file), byte for byte; returns lines per host."""
    folder = out_dir / "log"
    folder.mkdir(parents=True, exist_ok=True)
    lines = {}
    for host, d in cluster.daemons.items():
        parts = sorted(d.log_file.parent.glob(d.log_file.name + ".*"), key=lambda p: -int(p.suffix[1:] or 0))
        parts = [p for p in parts if p.suffix[1:].isdigit()] + [d.log_file]
        target = folder / f"{host}.log"
        with open(target, "wb") as out:
            for part in parts:
                if part.exists():
                    with open(part, "rb") as fh:
                        shutil.copyfileobj(fh, out)
        with open(target, "rb") as fh:
            lines[host] = sum(1 for _ in fh)
    return lines


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty directory")


def record(minutes: float, schedule_spec: str, out: Path, seed: int = 1, rate: float = 1.0,
           keep_cluster: bool = False) -> dict:
    out = Path(out)
    _check_out(out)
    duration_s = minutes * 60.0
    schedule = parse_schedule(schedule_spec, seed)
    late = [f.spec() for f in schedule if f.end_s > duration_s]
    if late:
        raise UsageError(f"--faults: {', '.join(late)} end(s) after the recording's {duration_s:g} s")
    try:
        workload_config = WorkloadConfig(rate=rate, seed=seed)
    except ValueError as err:
        raise UsageError(str(err)) from None
    lab.ensure_jars()
    out.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="lab-record-", dir=RUN_DIR))
    cluster = lab.create(base)
    injector = workload = scraper = None
    try:
        say(f"lab record: starting a fresh cluster in {base.relative_to(REPO_ROOT) if base.is_relative_to(REPO_ROOT) else base}")
        lab.start(cluster, die_with_parent=True)
        schedule = resolve_targets(schedule, cluster, seed)
        t0 = time.time()
        say(f"lab record: {minutes:g} min from {_utc(t0)} UTC, {len(schedule)} fault(s): "
            + (", ".join(f.spec() for f in schedule) or "none"))
        scraper = MetricsRecorder(cluster, SCRAPE_INTERVAL_S)
        workload = Workload(cluster.namenode.http, workload_config)
        injector = Injector(cluster, schedule, out / "fault_list.json", t0, seed,
                            on_event=lambda what, f, detail: say(f"lab record: {_utc(time.time())} {what:5} {f.kind} on {f.target}"))
        scraper.start()
        workload.start()
        injector.start()
        while time.time() < t0 + duration_s:
            time.sleep(min(1.0, max(0.0, t0 + duration_s - time.time())))
    finally:
        halt(injector, workload, scraper)
        t1 = time.time()
        lab.stop(cluster)
    lines = copy_logs(cluster, out)
    scraper.write_csvs(out, since=t0)
    write_faults(out / "fault_list.json", injector.done)
    calm_ok, calm = workload.stats.outside(injector.done)
    manifest = {
        "format": "logwarden.lab-recording/1",
        "hadoop_version": cluster.version,
        "seed": seed,
        "schedule": schedule_spec,
        "faults_planned": [f.spec() for f in schedule],
        "faults": injector.details,
        "fault_errors": injector.errors,
        "start": _utc(t0), "end": _utc(t1), "start_epoch": t0, "end_epoch": t1,
        "minutes": minutes,
        "hosts": {h: d.role for h, d in cluster.daemons.items()},
        "log_lines": lines,
        "metric_rows_per_host": {h: len([r for r in rows if r[0] >= t0]) for h, rows in scraper.rows.items()},
        "scrape_interval_s": SCRAPE_INTERVAL_S,
        "scrapes_failed": scraper.failed,
        "workload": {"rate": rate, "seed": seed, "summary": workload.stats.summary(),
                     "counts": {f"{k}.{r}": n for (k, r), n in sorted(workload.stats.done.items())},
                     "away_from_faults": {"ok": calm_ok, "calls": calm, "recovery_s": RECOVERY_S}},
        "command": " ".join(["logwarden", *sys.argv[1:]]) if sys.argv[0].endswith("logwarden") else None,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if not keep_cluster:
        shutil.rmtree(base, ignore_errors=True)
    say(f"lab record: wrote {out}: {sum(lines.values())} log lines, "
        f"{manifest['metric_rows_per_host']} metric rows, {len(injector.done)} fault(s); workload {workload.stats.summary()}")
    if calm and calm_ok < HEALTHY_SHARE * calm:
        # Away from every fault the cluster should serve its clients: if it did not, the
        # recording's "normal" chunks are an outage too (a dead client relay once did this).
        say(f"lab record: warning: only {calm_ok} of {calm} workload calls away from the faults succeeded; "
            f"the cluster was not healthy between faults, so this recording is a poor data set")
    return manifest


def main(args) -> int:
    """`logwarden lab record`."""
    record(args.minutes, args.faults, Path(args.out), seed=args.seed, rate=args.rate, keep_cluster=args.keep_cluster)
    return 0
