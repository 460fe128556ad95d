"""The local broker: starts as a real kafka.Kafka JVM, says why when it cannot, and stops
without leaving a process behind."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from toolkit import localkafka, localprom
from toolkit.localkafka import BrokerError, RunFiles, broker_processes, port_is_free
from tests.kafkautil import isolated_settings, topic_partitions


def test_a_busy_port_is_named_before_any_jvm_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port 127.0.0.1:{port} is already in use"):
            localkafka.start(tmp_path, port=port)
    assert broker_processes(tmp_path) == []


def test_missing_jars_say_run_make_kafka_jars(tmp_path):
    with pytest.raises(BrokerError, match=r"run `make kafka-jars`"):
        localkafka.start(tmp_path / "data", libs=tmp_path / "no-libs")


def test_missing_java_is_named(tmp_path, monkeypatch):
    libs = tmp_path / "libs"                    # jars that pass the check, so java is what is missing
    libs.mkdir()
    (libs / "kafka_2.13-4.1.1.jar").touch()
    (libs / ".complete").touch()
    monkeypatch.setenv("PATH", str(tmp_path))   # no java on this PATH
    with pytest.raises(BrokerError, match="java not found"):
        localkafka.start(tmp_path / "data", libs=libs)


def test_generated_config_is_a_single_node_kraft_broker_on_loopback(tmp_path):
    props = dict(line.split("=", 1) for line in
                 localkafka.server_properties(tmp_path, 19092, 19093).splitlines() if line)
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert Path(props["log.dirs"]).parent == tmp_path
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["num.partitions"] == "6"


def test_isolated_settings_never_match_each_others_host_topics():
    first, second = isolated_settings("127.0.0.1:9"), isolated_settings("127.0.0.1:9")
    import re
    assert re.match(first.logs_pattern, first.logs_topic("dn1"))
    assert not re.match(first.logs_pattern, second.logs_topic("dn1"))
    assert not re.match(first.logs_pattern, "logs.dn1")
    assert {first.events_topic, first.group_prefix}.isdisjoint({second.events_topic, second.group_prefix})
    assert "test_id" not in first.model_dump()    # not passed on as LOGWARDEN_TEST_ID


@pytest.mark.slow
def test_a_broker_that_dies_at_start_reports_its_log(tmp_path):
    # A data dir formatted for another node: the broker refuses it and exits.
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.properties").write_text(
        "version=1\ncluster.id=Ww2xzCAyQ4CQ-gQcMmlT2w\nnode.id=7\ndirectory.id=Ww2xzCAyQ4CQ-gQcMmlT2w\n")
    with pytest.raises(BrokerError, match=r"exited with code .*node"):
        localkafka.start(tmp_path)
    assert broker_processes(tmp_path) == []


def assert_serves_records(bootstrap: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce("probe", b"hello")
    assert producer.flush(30) == 0
    partitions = topic_partitions(bootstrap, "probe")
    assert len(partitions) == 6                          # auto-created with num.partitions
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe"})
    consumer.assign([TopicPartition("probe", p, 0) for p in partitions])
    message = None
    while message is None:
        message = consumer.poll(10)
    assert message.value() == b"hello"
    consumer.close()


@pytest.mark.slow
def test_kafka_up_serves_is_idempotent_and_down_leaves_no_process(tmp_path, capsys):
    """`make kafka-up` / `make kafka-down` in a scratch run dir (the real .run/ stays untouched)."""
    files = RunFiles(tmp_path)
    ports = (localkafka.free_port(), localkafka.free_port())
    first = localkafka.up(files, preferred_ports=ports)
    try:
        assert files.bootstrap.read_text().strip() == first.bootstrap == f"127.0.0.1:{ports[0]}"
        assert broker_processes(files.data_dir) == [first.pid]
        assert_serves_records(first.bootstrap)
        again = localkafka.up(files, preferred_ports=ports)
        assert again.pid == first.pid
        assert "already up" in capsys.readouterr().out
        assert localkafka.status(files)
    finally:
        assert localkafka.down(files)
    assert broker_processes(files.data_dir) == []
    assert port_is_free(first.port) and port_is_free(first.controller_port)
    assert not files.bootstrap.exists() and not files.pid.exists()
    assert not localkafka.status(files)
    assert not localkafka.down(files)        # a second down is harmless


@pytest.mark.slow
def test_a_test_broker_dies_with_its_parent_process(tmp_path):
    """A pytest run killed with SIGKILL cannot run fixture teardown; the kernel stops the JVM."""
    script = ("import sys; from pathlib import Path; from toolkit import localkafka; "
              "b = localkafka.start(Path(sys.argv[1]), die_with_parent=True); print(b.pid, flush=True); "
              "import time; time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert broker_processes(tmp_path) == [pid]
    finally:
        parent.kill()
        parent.wait()
    localkafka.Broker("", 0, 0, tmp_path, pid)._wait_gone(60)
    assert broker_processes(tmp_path) == []


# --------------------------------------------------------------------------------------------
# The Prometheus fixture (toolkit/localprom.py), the other piece of local infrastructure
def serve_metrics(registry):
    from prometheus_client import start_http_server
    port = localkafka.free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server, f"127.0.0.1:{port}"


def test_prometheus_scrapes_a_target_and_evaluates_alert_rules(prometheus, tmp_path):
    from prometheus_client import CollectorRegistry, Counter
    registry = CollectorRegistry()
    probes = Counter("logwarden_probe", "test probe", ["stage"], registry=registry)
    probes.labels(stage="parse").inc(7)
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n- name: t\n  rules:\n  - alert: ProbeHigh\n"
                     "    expr: logwarden_probe_total > 5\n    labels: {severity: warning}\n")
    server, target = serve_metrics(registry)
    try:
        prom = prometheus([target], rule_files=[rules])
        prom.wait_for('up{job="logwarden"} == 1', timeout=30)
        assert prom.value('logwarden_probe_total{stage="parse"}') == 7.0
        assert [t["health"] for t in prom.targets()] == ["up"]
        probes.labels(stage="parse").inc(3)
        prom.wait_for('logwarden_probe_total{stage="parse"} == 10', timeout=30)
        prom.wait_for('ALERTS{alertname="ProbeHigh", alertstate="firing"}', timeout=30)
        assert prom.query('logwarden_probe_total{stage="window"}') == []
    finally:
        server.shutdown()


def test_prometheus_that_cannot_start_says_why(prometheus, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n- name: t\n  rules:\n  - alert: X\n    expr: this is not promql (\n")
    with pytest.raises(localprom.PromError, match="exited with code"):
        prometheus(["127.0.0.1:9"], rule_files=[broken])
    with pytest.raises(ValueError, match="host:port"):
        prometheus(["http://127.0.0.1:9/metrics"])
