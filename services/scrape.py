"""Hadoop daemons' metrics into the stream: scrape Prometheus-format endpoints (Hadoop 3's ``/prom``,
enabled by ``hadoop.prometheus.endpoint.enabled``, or the JMX exporter's) and write what the
OpenTelemetry Collector's prometheus receiver + Kafka exporter would: OTLP metrics on
``LOGWARDEN_OTLP_METRICS_TOPIC``, one ExportMetricsServiceRequest per scrape of one target, read by
the otlp stage like any Collector's.

    logwarden scrape --target nn1=http://namenode:9870/prom --target dn1=http://dn1:9864/prom
                     [--interval 10] [--role nn1=namenode] [--drop-label hostname] [--once]

Why a scraper of our own as well as the Collector: a site without a Collector (and this project's
tests and lab, which have no Collector binary) gets Hadoop's metrics with nothing else to run;
a site with one points its prometheus receiver at the same endpoints (docker-compose.yml's
``otel-collector``) and runs no ``logwarden scrape``. Either way the otlp stage sees the same records.

Mapping (as the prometheus receiver maps, simplified): the resource is the target (``host.name``
= the target's name, ``service.name`` = its role, default the name), every sample a gauge data
point named after the sample, its labels as attributes (less ``--drop-label``: Hadoop's own
``hostname`` label names the machine, the same for every daemon on it), timed by the sample's own
timestamp or the scrape's start. Each scrape also carries the receiver's synthetic gauge ``up``: 1
with the page, and a target that does not answer gets a record holding only ``up`` = 0 (its other
metrics are absent for that step, not zero) and a line in the log; a page with malformed lines
keeps the good ones and counts the bad.
"""
from __future__ import annotations

import argparse
import logging
import math
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from services.cores import promtext
from services.cores.otlp import encode_request

log = logging.getLogger(__name__)
SCOPE_NAME = "logwarden.scrape"
NO_RECORDED_VALUE = 1          # OTLP DataPointFlags.FLAG_NO_RECORDED_VALUE: NaN is no value
UP = "up"                      # the prometheus receiver's synthetic metric: did the scrape answer


@dataclass(frozen=True)
class Target:
    name: str                  # the entity: host.name of the resource (e.g. nn1)
    url: str
    role: str                  # service.name (namenode, datanode, ...)


def _scope(target: Target, scraped_at: float, up: bool):
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    for key, value in (("service.name", target.role), ("host.name", target.name)):
        kv = resource_metrics.resource.attributes.add()
        kv.key, kv.value.string_value = key, value
    scope = resource_metrics.scope_metrics.add()
    scope.scope.name = SCOPE_NAME
    metric = scope.metrics.add()
    metric.name = UP
    point = metric.gauge.data_points.add()
    point.time_unix_nano, point.as_double = round(scraped_at * 1e9), 1.0 if up else 0.0
    return request, scope


def down_request(target: Target, scraped_at: float) -> ExportMetricsServiceRequest:
    """A scrape the target did not answer: ``up`` = 0 alone, as the prometheus receiver sends."""
    return _scope(target, scraped_at, up=False)[0]


def exposition_request(target: Target, scraped_at: float, page: promtext.Exposition,
                       drop_labels: tuple[str, ...] = ("hostname",)) -> ExportMetricsServiceRequest:
    """One scrape of one target as the Collector's prometheus receiver exports it (gauges, and
    ``up`` = 1)."""
    request, scope = _scope(target, scraped_at, up=True)
    metrics: dict[str, object] = {}
    default_ns = round(scraped_at * 1e9)
    for sample in page.samples:
        if sample.name == UP:
            continue                   # the page's own `up`, if any, is the scrape's to say
        metric = metrics.get(sample.name)
        if metric is None:
            metric = metrics[sample.name] = scope.metrics.add()
            metric.name = sample.name
            metric.gauge.SetInParent()
        point = metric.gauge.data_points.add()
        point.time_unix_nano = round(sample.timestamp * 1e9) if sample.timestamp is not None else default_ns
        for key, value in sorted(sample.labels.items()):
            if key in drop_labels:
                continue
            kv = point.attributes.add()
            kv.key, kv.value.string_value = key, value
        if math.isnan(sample.value):
            point.flags = NO_RECORDED_VALUE
        else:
            point.as_double = sample.value
    return request


def fetch(url: str, timeout: float = 3.0, warn: bool = True) -> promtext.Exposition | None:
    """The endpoint's page parsed; None when it does not answer (logged unless ``warn`` is
    false: the lab kills daemons on purpose)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except OSError as err:
        if warn:
            log.warning("scrape: %s did not answer: %s", url, err)
        return None
    return promtext.parse(text)


def every_tick(stop: threading.Event, interval: float, scrape: Callable[[float], object]) -> None:
    """Call ``scrape(tick)`` at each multiple of ``interval`` on the wall clock (so the rows of
    every target share their time) until ``stop`` is set; a scrape that runs long skips the
    ticks it missed rather than bursting to catch up."""
    next_tick = (int(time.time() // interval) + 1) * interval
    while not stop.wait(max(0.0, next_tick - time.time())):
        scrape(next_tick)
        next_tick += interval
        while next_tick < time.time():
            next_tick += interval


class Scraper:
    """Scrapes every target once per ``interval`` (on the wall clock's multiples of it, so the
    rows of all targets share their time) and produces each page to the OTLP metrics topic."""

    def __init__(self, settings, targets: list[Target], interval: float = 10.0,
                 drop_labels: tuple[str, ...] = ("hostname",), encoding: str = "otlp_proto"):
        from confluent_kafka import Producer

        from services.shell import producer_config

        self.settings, self.targets, self.interval = settings, targets, interval
        self.drop_labels, self.encoding = drop_labels, encoding
        self.producer = Producer(producer_config(settings))
        self.scraped = self.missed = self.malformed = 0
        self.stop = threading.Event()

    def scrape_once(self, at: float) -> int:
        sent = 0
        for target in self.targets:
            page = fetch(target.url)
            if page is None:
                self.missed += 1
                request = down_request(target, at)
            else:
                self.malformed += len(page.errors)
                self.scraped += 1
                sent += 1
                request = exposition_request(target, at, page, self.drop_labels)
            self.producer.produce(self.settings.otlp_metrics_topic, encode_request(request, self.encoding),
                                  target.name.encode())
        self.producer.flush(30)
        return sent

    def run(self) -> None:
        every_tick(self.stop, self.interval, self.scrape_once)


def parse_targets(specs: list[str], roles: list[str]) -> list[Target]:
    from services.settings import UsageError

    role_of = {}
    for spec in roles:
        name, sep, role = spec.partition("=")
        if not sep or not name or not role:
            raise UsageError(f"--role {spec!r}: expected NAME=ROLE")
        role_of[name] = role
    targets = []
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise UsageError(f"--target {spec!r}: expected NAME=http(s)://HOST:PORT/PATH")
        targets.append(Target(name, url, role_of.get(name, name)))
    unknown = set(role_of) - {t.name for t in targets}
    if unknown:
        raise UsageError(f"--role for {', '.join(sorted(unknown))}: no such --target")
    return targets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", action="append", required=True, metavar="NAME=URL",
                   help="a Prometheus-format endpoint and the entity it is (repeatable)")
    p.add_argument("--role", action="append", default=[], metavar="NAME=ROLE",
                   help="service.name of a target (default: its name)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between scrapes")
    p.add_argument("--drop-label", action="append", default=None, metavar="LABEL",
                   help="labels left out of the series (default: hostname)")
    p.add_argument("--encoding", choices=("otlp_proto", "otlp_json"), default="otlp_proto")
    p.add_argument("--once", action="store_true", help="scrape every target once and exit")


def main(args) -> int:
    import signal

    from services.settings import UsageError, load_settings
    from services.shell import ensure_topics

    if args.interval <= 0:
        raise UsageError(f"--interval {args.interval}: must be > 0")
    targets = parse_targets(args.target, args.role)
    settings = load_settings()
    ensure_topics(settings, extra=[settings.otlp_metrics_topic])
    scraper = Scraper(settings, targets, args.interval, tuple(args.drop_label or ("hostname",)), args.encoding)
    if args.once:
        sent = scraper.scrape_once(time.time())
        print(f"scrape: {sent} of {len(targets)} targets -> {settings.otlp_metrics_topic}")
        return 0 if sent else 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: scraper.stop.set())
    scraper.run()
    return 0
