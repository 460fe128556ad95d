"""The live lab end to end (issue 16): a real HDFS cluster (Hadoop 3.4.1 JVMs from the Maven jars,
`make hadoop-jars`), the workload, its daemons' logs shipped into logs.<host> as Filebeat would and
their /prom metrics into a metrics topic, one real fault, and a teardown that leaves no process."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from confluent_kafka import Producer

from models.faults import read_faults
from tests.kafkautil import consume, record_count
from tests.streamutil import wait_until
from toolkit.lab import cluster as lab
from toolkit.lab.faults import Injector, PlannedFault, halt
from toolkit.lab.live import otlp_request
from toolkit.lab.scrape import MetricsRecorder
from toolkit.lab.workload import WebHdfs, Workload, WorkloadConfig
from toolkit.localkafka import _cmdline, _pid_alive
from toolkit.replay import ensure_topic, logs_topic, replay_files


def mentioning(base: str) -> list[int]:
    """Every process whose command line names something under ``base`` (JVMs, the relay)."""
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _pid_alive(int(p.name))
            and any(base in a for a in _cmdline(int(p.name)))]


def all_json(settings, topic: str) -> list[dict]:
    return [json.loads(m.value()) for m in consume(settings, topic, record_count(settings, topic), timeout=10)]


def scrapes(settings, topic: str) -> list[dict]:
    """The OTLP metrics records of ``topic``: per scrape its host, time, ``up`` and metric count."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    out = []
    for m in consume(settings, topic, record_count(settings, topic), timeout=10):
        (rm,) = ExportMetricsServiceRequest.FromString(m.value()).resource_metrics
        attrs = {a.key: a.value.string_value for a in rm.resource.attributes}
        metrics = {x.name: x for x in rm.scope_metrics[0].metrics}
        up = metrics["up"].gauge.data_points[0]
        out.append({"host": attrs["host.name"], "time": up.time_unix_nano / 1e9, "up": up.as_double == 1.0,
                    "metrics": len(metrics)})
    return out


def log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=timezone.utc).timestamp()


@pytest.mark.slow
def test_a_live_cluster_ships_logs_and_metrics_and_a_killed_datanode_shows_in_both(kafka_settings, tmp_path):
    lab.check_jars()
    cluster = lab.create(tmp_path / "cluster")
    hosts = {h: kafka_settings.host(h) for h in cluster.daemons}
    metrics_topic = kafka_settings.otlp_metrics_topic
    stop = threading.Event()
    shippers: list[threading.Thread] = []
    workload = scraper = injector = None
    producer = Producer(kafka_settings.kafka_config() | {"linger.ms": 20})
    try:
        lab.start(cluster, die_with_parent=True, timeout=150)
        assert lab.live_datanodes(cluster) == 2
        assert len({d.pid for d in cluster.daemons.values()}) == 3               # three JVMs
        assert len({d.ports["http"] for d in cluster.daemons.values()}) == 3     # three hosts' HTTP ports
        for host, d in cluster.daemons.items():
            assert lab.jmx(d, "Hadoop:service=*,name=JvmMetrics")
            ensure_topic(kafka_settings, logs_topic(hosts[host]))
            shippers.append(threading.Thread(target=replay_files, args=(kafka_settings, [d.log_file], hosts[host]),
                                             kwargs={"follow": True, "stop": stop}, daemon=True))
        ensure_topic(kafka_settings, metrics_topic)
        for t in shippers:
            t.start()
        scraper = MetricsRecorder(cluster, 2.0, on_scrape=lambda host, at, page: producer.produce(
            metrics_topic, otlp_request(cluster, host, host, at, page), host.encode()))
        scraper.start()
        workload = Workload(cluster.namenode.http, WorkloadConfig(rate=3.0, seed=2, max_kib=1536))
        workload.start()
        wait_until(lambda: workload.stats.done[("write", "ok")] >= 3, 60, what="three files written")

        labels = tmp_path / "fault_list.json"
        injector = Injector(cluster, [PlannedFault("kill_datanode", 0.0, 20.0, "dn1")], labels, time.time())
        injector.start()
        wait_until(lambda: not cluster.daemons["dn1"].alive(), 10, what="dn1 killed")
        killed_at = time.time()
        dn1_data = f"127.0.0.1:{cluster.daemons['dn1'].ports['data']}"

        def fault_in_the_logs() -> bool:        # a DataStreamer / DFSClient of another host fails on dn1
            for host in ("dn2", "nn1"):
                for record in all_json(kafka_settings, logs_topic(hosts[host])):
                    line = record["message"]
                    if dn1_data in line and (" WARN " in line or " ERROR " in line) and log_time(line) >= killed_at - 1:
                        assert record["host"]["name"] == hosts[host] and record["log"]["file"]["path"]
                        return True
            return False

        wait_until(fault_in_the_logs, 60, every=2, what=f"a WARN line naming dn1 ({dn1_data}) in logs.<dn2|nn1>")

        def fault_in_the_metrics() -> bool:
            records = scrapes(kafka_settings, metrics_topic)
            down = [r for r in records if r["host"] == "dn1" and not r["up"] and r["time"] >= killed_at]
            up = {r["host"] for r in records if r["up"] and r["metrics"] > 100}
            return bool(down) and up == {"nn1", "dn1", "dn2"}

        wait_until(fault_in_the_metrics, 30, every=2, what="dn1 scraped as down after the kill in the metrics topic")
        injector.join(60)                        # the fault's end restarts dn1
        assert not injector.is_alive() and injector.errors == []
        (fault,) = read_faults(labels)
        assert (fault.kind, fault.target) == ("kill_datanode", "dn1") and 19 <= fault.end - fault.start <= 30
        wait_until(lambda: lab.live_datanodes(cluster) == 2, 90, every=1, what="dn1 back")
        lines = {h: record_count(kafka_settings, logs_topic(hosts[h])) for h in cluster.daemons}
        assert all(n > 50 for n in lines.values()), lines
    finally:
        halt(injector, workload, scraper)
        producer.flush(10)
        stop.set()
        for t in shippers:
            t.join(30)
        lab.stop(cluster)
    assert lab.processes(cluster.base) == []
    assert mentioning(cluster.base) == [], "a process of the test's cluster outlived it"


@pytest.mark.slow
def test_a_filled_volume_takes_its_datanode_out_of_placement_until_the_fault_ends(tmp_path):
    lab.check_jars()
    cluster = lab.create(tmp_path / "cluster")
    injector = None

    def remaining(host: str) -> int:
        return int(lab.jmx(cluster.daemons[host], "Hadoop:service=DataNode,name=FSDatasetState*").get("Remaining", -1))

    try:
        lab.start(cluster, die_with_parent=True, timeout=150)
        client = WebHdfs(cluster.namenode.http, timeout=20.0)
        # each data directory is a disk of VOLUME_BYTES to its DataNode, whatever the real disk holds
        wait_until(lambda: lab.VOLUME_BYTES < remaining("dn1") <= lab.VOLUMES * lab.VOLUME_BYTES, 30,
                   what="dn1 reporting its two small volumes")
        injector = Injector(cluster, [PlannedFault("fill_volume", 0.0, 30.0, "dn1")], tmp_path / "faults.json", time.time())
        injector.start()
        wait_until(lambda: 0 <= remaining("dn1") < lab.BLOCK_SIZE, 30, every=1, what="dn1 full (its next du)")
        balloons = list(Path(cluster.base).glob("dn1/data*/current/BP-*/lab-fill"))
        assert len(balloons) == lab.VOLUMES
        log = cluster.namenode.log_file
        seen = len(log.read_text())
        client.create("/lab/while-full", b"x" * 200_000)      # written, with one replica fewer
        wait_until(lambda: "Failed to place enough replicas" in log.read_text()[seen:], 15, every=1,
                   what="the NameNode unable to place a replica")
        injector.join(60)
        assert not injector.is_alive() and injector.errors == []
        assert not any(b.exists() for b in balloons)
        wait_until(lambda: remaining("dn1") > lab.VOLUME_BYTES, 30, every=1, what="dn1's space back")
        (fault,) = read_faults(tmp_path / "faults.json")
        assert (fault.kind, fault.target) == ("fill_volume", "dn1")
    finally:
        halt(injector)
        lab.stop(cluster)
    assert lab.processes(cluster.base) == []


def test_the_warm_up_windows_are_the_sessions_cores_closed_ones_from_the_events_topic():
    # The sessions stage builds no window before it has a model: the live run builds the
    # warm-up's windows from the events topic with the same core, closed ones only.
    from services.records import ParsedEvent, Source, Watermark, encode, stable_id
    from services.settings import load_settings
    from toolkit.lab.live import TrainingWindows

    def event(key, ts, host, offset, template):
        src = Source(host=host, topic=f"logs.{host}", partition=0, offset=offset, file_path="/l", file_offset=offset)
        return ParsedEvent(event_id=stable_id(host, offset), key=key or host, keys=[key] if key else [], timestamp=ts,
                           level="INFO", component="c", template_id=template, template=f"text {template}", params=[],
                           message="m", source=src)

    training = TrainingWindows(load_settings(session_gap_s=30.0, time_window_s=10.0))
    feed = [event("blk_1", 100, "dn1", 0, "A"), event("blk_1", 101, "dn2", 0, "B"), event("blk_1", 102, "dn1", 1, "C"),
            event("blk_2", 150, "dn1", 2, "A"), event("blk_3", 190, "dn2", 1, "A")]
    for e in [*feed, feed[1]]:                         # a re-sent copy counts once
        training.handle(encode(e))
    training.handle(encode(Watermark(source="logs.dn1:0", ts=190.0)))
    windows = training.between(90.0, 200.0)
    sessions = {w.key: [s.template_id for s in w.steps] for w in windows if w.kind == "session"}
    # blk_1 and blk_2 are closed (more than 30 s of event time after their last event), blk_3 is open
    assert sessions == {"blk_1": ["A", "B", "C"], "blk_2": ["A"]}
    assert training.between(120.0, 200.0) and "blk_1" not in {w.key for w in training.between(120.0, 200.0)}


def test_the_live_stream_does_not_close_sessions_on_a_quiet_spell_shorter_than_the_gap(tmp_path):
    # Beside a live cluster a few seconds without a line from any daemon (a fault can make one)
    # must not end every block being written: its later lines would open sessions judged as starts.
    from toolkit.lab.live import Stream

    settings = Stream.for_run("labtest", tmp_path).settings
    assert settings.idle_close_s >= settings.session_gap_s
    assert settings.environment()["LOGWARDEN_IDLE_CLOSE_S"] == str(settings.idle_close_s)
