"""The daemons' metrics: every ``interval`` seconds, each daemon's ``/prom`` page (Prometheus text,
parsed by services.cores.promtext), labelled by the daemon scraped — Hadoop's own series carry only
``hostname``, which is the machine's name for all of them.

A series' column name is ``promtext.Sample.series`` without ``hostname``, with two run-specific
label values made stable so recordings share columns: a port number of the daemon becomes the
port's role (``port="rpc"``, ``port="service"``, ``port="ipc"``) and the cluster's directory
becomes ``$LAB`` (the DataNode's ``storageinfo`` label lists its volume paths).

``MetricsRecorder`` keeps one row per host per scrape (a daemon that does not answer, e.g. a
killed DataNode, gets a row of empty cells: its data are absent, not zero) and writes them as
``metric/<host>_metric.csv``: ``Time,TimeStamp,PodName,<one column per series>``, the layout of
TrainTicket's metric files, which models.microservices.read_metrics reads.
"""
from __future__ import annotations

import csv
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from services import scrape
from services.cores import promtext
from toolkit.lab.cluster import Cluster, Daemon

log = logging.getLogger(__name__)
SCRAPE_INTERVAL_S = 10.0
DROPPED_LABELS = ("hostname",)
METRIC_KEYS = ("Time", "TimeStamp", "PodName")


def fetch(daemon: Daemon, timeout: float = 3.0) -> promtext.Exposition | None:
    """The daemon's /prom page parsed; None when it does not answer (faults kill daemons: no warning)."""
    return scrape.fetch(f"{daemon.http}/prom", timeout, warn=False)


def stable_labels(cluster: Cluster, daemon: Daemon, sample: promtext.Sample) -> promtext.Sample:
    ports = {str(number): role for role, number in daemon.ports.items()}
    ports.setdefault(str(cluster.relay_port), "relay")
    labels = {}
    for key, value in sample.labels.items():
        if key == "port" and value in ports:
            value = ports[value]
        labels[key] = value.replace(cluster.base, "$LAB")
    return promtext.Sample(sample.name, labels, sample.value, sample.timestamp)


def columns(cluster: Cluster, daemon: Daemon, page: promtext.Exposition) -> dict[str, float]:
    """Series column -> value for one scrape of one daemon."""
    return {stable_labels(cluster, daemon, s).series(DROPPED_LABELS): s.value for s in page.samples}


def go_time(epoch_s: float) -> str:
    """TrainTicket's Time column: Go's time.String() of the scrape time, in UTC."""
    moment = datetime.fromtimestamp(epoch_s, timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f") + " +0000 UTC"


class MetricsRecorder(threading.Thread):
    """Scrapes every daemon once per ``interval`` (on the wall clock's multiples of it, so rows of
    all hosts share their TimeStamp); keeps the rows and hands each scrape to ``on_scrape(host,
    scraped_at, page or None)`` (the live run produces them to Kafka)."""

    def __init__(self, cluster: Cluster, interval: float = SCRAPE_INTERVAL_S,
                 on_scrape: Callable[[str, float, promtext.Exposition | None], None] | None = None):
        super().__init__(name="lab-scrape", daemon=True)
        self.cluster = cluster
        self.interval = interval
        self.on_scrape = on_scrape
        self.stop = threading.Event()
        self.rows: dict[str, list[tuple[float, dict[str, float]]]] = {h: [] for h in cluster.daemons}
        self.failed = 0
        self.malformed = 0

    def scrape_once(self, tick: float) -> None:
        for host, daemon in self.cluster.daemons.items():
            page = fetch(daemon)
            if page is None:
                self.failed += 1
                self.rows[host].append((tick, {}))
            else:
                self.malformed += len(page.errors)
                self.rows[host].append((tick, columns(self.cluster, daemon, page)))
            if self.on_scrape is not None:
                try:
                    self.on_scrape(host, tick, page)
                except Exception:       # a failed hand-off must not end the recording
                    log.exception("metrics hand-off for %s failed", host)

    def run(self) -> None:
        scrape.every_tick(self.stop, self.interval, self.scrape_once)

    def write_csvs(self, out_dir: Path, since: float = 0.0) -> dict[str, Path]:
        """metric/<host>_metric.csv for every host (rows at or after ``since``)."""
        folder = Path(out_dir) / "metric"
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for host, rows in self.rows.items():
            rows = [r for r in rows if r[0] >= since]
            names = sorted({name for _, values in rows for name in values})
            path = folder / f"{host}_metric.csv"
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow([*METRIC_KEYS, *names])
                for tick, values in rows:
                    writer.writerow([go_time(tick), int(tick), host,
                                     *("" if (v := values.get(n)) is None else repr(v) for n in names)])
            written[host] = path
        return written
