"""Hadoop daemons' metrics into the stream (services/scrape.py): a Prometheus-format page becomes
the OTLP metrics the Collector's prometheus receiver would export, and `logwarden scrape` of a
real HTTP endpoint reaches the timeline through the real broker and the otlp stage."""
from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.cores import promtext
from services.cores.otlp import OtlpCore, encode_request
from services.records import MetricSample, decode
from services.scrape import Target, down_request, every_tick, exposition_request, parse_targets
from services.settings import UsageError
from services.shell import Out, Record
from tests.kafkautil import consume, record_count
from tests.streamutil import settings_env

PAGE = (Path(__file__).parent / "fixtures" / "hadoop3" / "dn1.prom").read_text()
TOPICS = {"in.spans": "spans", "in.metrics": "metrics", "in.logs": "logs"}


def expected_values(page: promtext.Exposition) -> dict[str, float]:
    return {s.series(("hostname",)): s.value for s in page.samples}


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_a_hadoop_prom_page_becomes_one_metric_sample_of_its_daemon(encoding):
    page = promtext.parse(PAGE)
    assert len(page.samples) > 20 and not page.errors
    value = encode_request(exposition_request(Target("dn1", "http://x/prom", "datanode"), 1_700_000_000.0, page), encoding)
    out = OtlpCore(TOPICS, "out.spans", "out.timeline").process([Record("in.metrics", 0, 0, b"dn1", value, 0)])
    assert all(isinstance(o, Out) and o.topic == "out.timeline" and o.key in ("dn1", b"dn1") for o in out)
    samples = [decode(o.value, MetricSample) for o in out]
    assert len(samples) == 1
    sample = samples[0]
    assert (sample.entity, sample.service, sample.timestamp) == ("dn1", "datanode", 1_700_000_000.0)
    # the channel is the series without Hadoop's machine-wide hostname label, as the lab's CSVs name it
    assert sample.values == expected_values(page) | {"up": 1.0}
    assert not any("hostname" in channel for channel in sample.values)


def test_a_target_that_does_not_answer_is_up_0_and_nothing_else():
    value = encode_request(down_request(Target("dn1", "http://x/prom", "datanode"), 1_700_000_010.0), "otlp_proto")
    (out,) = OtlpCore(TOPICS, "out.spans", "out.timeline").process([Record("in.metrics", 0, 0, b"dn1", value, 0)])
    sample = decode(out.value, MetricSample)
    assert (sample.entity, sample.timestamp, sample.values) == ("dn1", 1_700_000_010.0, {"up": 0.0})


def test_scrapes_fall_on_the_interval_and_a_long_one_skips_ticks_rather_than_bursting():
    import time

    stop, calls = threading.Event(), []

    def scrape(tick):
        calls.append((tick, time.time()))
        if len(calls) == 2:
            time.sleep(0.6)             # a target that hangs: two ticks pass meanwhile
        ended = time.time()
        calls[-1] += (ended,)
        if len(calls) == 4:
            stop.set()

    every_tick(stop, 0.25, scrape)              # 0.25: exact in binary, so ticks are exact multiples
    ticks = [c[0] for c in calls]
    assert len(calls) == 4 and ticks == sorted(set(ticks))
    assert all(t % 0.25 == 0 for t in ticks)                          # on the wall clock's multiples
    assert all(called >= tick - 0.01 for tick, called, _ in calls)      # not before its time (wait() is monotonic)
    assert ticks[2] - ticks[1] >= 0.75 and ticks[2] >= calls[1][2]    # missed ticks skipped, not caught up


def test_targets_and_roles_are_checked():
    assert parse_targets(["nn1=http://h:9870/prom"], ["nn1=namenode"]) == [Target("nn1", "http://h:9870/prom", "namenode")]
    for targets, roles in ((["nn1"], []), (["nn1=ftp://h/prom"], []), (["nn1=http://h/prom"], ["dn1=datanode"]),
                           (["nn1=http://h/prom"], ["nn1"])):
        with pytest.raises(UsageError):
            parse_targets(targets, roles)


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):                                   # noqa: N802 (http.server's name)
        body = PAGE.encode()
        self.send_response(200 if self.path == "/prom" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_logwarden_scrape_of_an_endpoint_reaches_the_timeline_through_the_otlp_stage(kafka_settings, tmp_path):
    from services import stages

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/prom"
        done = subprocess.run([sys.executable, "-m", "services.cli", "scrape", "--once", "--target", f"dn1={url}",
                               "--role", "dn1=datanode", "--target", "gone=http://127.0.0.1:9/prom"],
                              env=settings_env(kafka_settings), capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 of 2 targets" in done.stdout                 # the dead target: up = 0 alone, not zeros
    assert record_count(kafka_settings, kafka_settings.otlp_metrics_topic) == 2
    stop = threading.Event()
    runner = threading.Thread(target=stages.run, args=(["otlp"], kafka_settings, 15.0, stop), daemon=True)
    runner.start()
    runner.join(120)
    stop.set()
    assert not runner.is_alive()
    samples = {s.entity: s for s in (decode(m.value(), MetricSample)
                                     for m in consume(kafka_settings, kafka_settings.timeline_topic, 2, timeout=60))}
    assert {(e, s.service) for e, s in samples.items()} == {("dn1", "datanode"), ("gone", "gone")}
    assert samples["dn1"].values == expected_values(promtext.parse(PAGE)) | {"up": 1.0}
    assert samples["gone"].values == {"up": 0.0}
