"""The stream end to end through the real broker: parse and sessions on HDFS as three hosts,
and what production throws at it (issue 12): a stage SIGKILLed mid-replay, a sessions replica's
partitions moving to a replica with another state directory (another machine), the broker itself
stopped with SIGTERM and SIGKILL and started again. Each run's session windows and final alerts
are compared by id with a reference run of the same cores on the same lines without Kafka:
nothing lost, nothing duplicated."""
from __future__ import annotations

import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import KafkaException

from models import artifacts
from services import stages
from services.records import WATERMARK_KEY, ParsedEvent, decode, encode
from tests.kafkautil import consume, isolated_settings, record_count
from tests.streamutil import (alerts_collector, lines_by_block, logwarden, settings_env, wait_until,
                              windows_collector)
from toolkit import localkafka
from toolkit.reference import windows_and_finals
from toolkit.replay import deal_lines, ensure_topic

pytestmark = pytest.mark.slow
HOSTS = ["dn1", "dn2", "dn3"]


def stream_settings(base, datasets, tmp_path, model, **overrides):
    model_dir = tmp_path / "models"
    if not artifacts.latest(model_dir, "deeplog"):
        artifacts.publish(model, model_dir, "deeplog")
    return base.model_copy(update={
        "template_catalog": datasets / "hdfs" / "HDFS_templates.csv",
        "state_dir": tmp_path / "state", "model_dir": model_dir, "device": "cpu",
        "session_gap_s": 1e9,            # close only on idle: HDFS blocks of the sample span hours
        "metrics_port": 0, **overrides})


def host_topics(settings, files: dict) -> None:
    """The hosts' topics exist before parse starts, as Filebeat's do in a deployment: a topic
    parse discovers later, with a backlog, would have its first lines counted late."""
    for host in files:
        ensure_topic(settings, f"logs.{host}")


def wait_for_parse_to_hold(log: Path, files: dict, timeout: float = 90) -> None:
    """Until parse's latest assignment holds every host topic: as in a deployment, where parse
    runs before the hosts ship (a regex subscription learns a topic at its next metadata
    refresh, and a topic it learns later than its backlog was written has that backlog late)."""
    def holds() -> bool:
        lines = [line for line in log.read_text().splitlines() if "parse: assigned" in line] if log.exists() else []
        return bool(lines) and all(f"logs.{host}[" in lines[-1] for host in files)
    wait_until(holds, timeout, what="parse to be assigned every host topic")


def replay_hosts(settings, files: dict, rate: float | None = None, log=None) -> list[subprocess.Popen]:
    env = settings_env(settings)
    procs = []
    for host, path in files.items():
        args = ["replay", str(path), "--host", host, "--no-progress"]
        if rate:
            args += ["--rate", str(rate)]
        procs.append(logwarden(*args, env=env, log=log))
    return procs


def reference(settings, files: dict[str, Path], model: Path) -> tuple[dict, set]:
    """Session windows (id -> window) and final alert ids of the uninterrupted run."""
    return windows_and_finals(settings, files, {"deeplog": artifacts.load(model, device="cpu")})


def assert_same_as_reference(windows, alerts, ref_windows, ref_finals):
    by_id = defaultdict(list)
    for w in windows:
        if w.kind == "session":
            by_id[w.window_id].append(w)
    missing, extra = set(ref_windows) - set(by_id), set(by_id) - set(ref_windows)
    assert not missing and not extra, f"{len(missing)} session windows missing, {len(extra)} not in the reference"
    for wid, copies in by_id.items():      # a replayed window is the same window, byte for byte
        assert all(encode(c) == encode(copies[0]) for c in copies), f"window {wid} differs between copies"
        mine, ref = copies[0], ref_windows[wid]
        assert [(s.template_id, s.host, s.file_offset) for s in mine.steps] == \
               [(s.template_id, s.host, s.file_offset) for s in ref.steps], f"window {wid}: events differ"
    finals = {a.alert_id for a in alerts if a.status == "final"}
    assert finals == ref_finals, f"{len(ref_finals - finals)} final alerts missing, {len(finals - ref_finals)} extra"
    final_copies = defaultdict(set)
    for a in alerts:
        if a.status == "final":
            final_copies[a.alert_id].add((a.anomalous, a.first_anomaly.position, a.anomalies, a.model_version))
    assert all(len(v) == 1 for v in final_copies.values()), "a final alert replayed with another verdict"


def _counter(settings, topic):
    """How many records `topic` holds; 0 while the topic is still being created."""
    def count() -> int:
        try:
            return record_count(settings, topic)
        except KafkaException:
            return 0
    return count


def test_hdfs_20000_as_three_hosts_gives_one_session_window_per_block(kafka_settings, datasets, tmp_path, tiny_deeplog):
    src = datasets / "hdfs" / "HDFS_20000.log"
    assert len(lines_by_block(src)) == 1782
    settings = stream_settings(kafka_settings, datasets, tmp_path, tiny_deeplog, idle_close_s=4.0)
    files = deal_lines(src, [settings.host(h) for h in HOSTS], tmp_path / "logs")
    for p in replay_hosts(settings, files, log=tmp_path / "replay.log"):
        assert p.wait(120) == 0, (tmp_path / "replay.log").read_text()[-2000:]
    windows, alerts = windows_collector(settings), alerts_collector(settings)
    stages.run(["parse", "sessions"], settings, exit_when_idle=8.0)
    ref_windows, ref_finals = reference(settings, files, tiny_deeplog)
    wait_until(lambda: len({w.window_id for w in windows.items}) >= len(ref_windows), 60, what="every session window")
    time.sleep(1)
    got_windows, got_alerts = windows.close(), alerts.close()
    assert len(ref_windows) == 1782
    assert_same_as_reference(got_windows, got_alerts, ref_windows, ref_finals)
    # blocks really span hosts, and the window says which
    sessions = [w for w in got_windows if w.kind == "session"]
    assert sum(len(w.hosts) > 1 for w in sessions) > 1000
    assert all(set(w.hosts) == {s.host for s in w.steps} for w in sessions[:200])
    assert all(s.template_id.startswith("E") for w in sessions[:200] for s in w.steps)


def test_sigkill_of_parse_and_failover_of_a_sessions_replica_lose_and_duplicate_nothing(
        kafka_settings, datasets, tmp_path, tiny_deeplog):
    """Parse is SIGKILLed mid-replay and restarted; then one of two sessions replicas, each with
    its own state directory (two machines), is SIGKILLed: the other is assigned its partitions
    and restores their sessions (and open alerts) from the changelog, not from any disk."""
    src = datasets / "hdfs" / "HDFS_20000.log"
    # Idle close must outlast the failover (the dead member's session timeout, 6 s, then restore).
    settings = stream_settings(kafka_settings, datasets, tmp_path, tiny_deeplog, idle_close_s=25.0)
    files = deal_lines(src, [settings.host(h) for h in HOSTS], tmp_path / "logs")
    host_topics(settings, files)
    log = tmp_path / "parse.log"
    env = settings_env(settings)
    replica_env = [settings_env(settings, LOGWARDEN_STATE_DIR=str(tmp_path / f"machine-{n}"),
                                LOGWARDEN_INSTANCE_ID=f"machine-{n}") for n in (1, 2)]
    replica_logs = [tmp_path / f"sessions-{n}.log" for n in (1, 2)]
    windows, alerts = windows_collector(settings), alerts_collector(settings)
    parse = logwarden("run", "parse", env=env, log=log)
    replicas = [logwarden("run", "sessions", env=e, log=out) for e, out in zip(replica_env, replica_logs)]
    events_seen = _counter(settings, settings.events_topic)
    try:
        wait_for_parse_to_hold(log, files)
        replays = replay_hosts(settings, files, rate=1500, log=tmp_path / "replay.log")   # ~4.4 s per host
        wait_until(lambda: events_seen() > 4000, 90, what="parse to make progress")
        parse.send_signal(signal.SIGKILL)
        parse.wait()
        parse = logwarden("run", "parse", env=env, log=log)
        wait_until(lambda: events_seen() > 12000, 90, what="restarted parse to make progress")
        replicas[0].send_signal(signal.SIGKILL)             # machine 1 dies; machine 2 takes over
        replicas[0].wait()
        for p in replays:
            assert p.wait(120) == 0
        ref_windows, ref_finals = reference(settings, files, tiny_deeplog)
        wait_until(lambda: len({w.window_id for w in windows.items}) >= len(ref_windows), 150,
                   what="every block's session window")
        time.sleep(3)
    finally:
        for p in (parse, *replicas):
            if p.poll() is None:
                p.terminate()
                p.wait(30)
    for text in (log.read_text(), replica_logs[1].read_text()):
        assert "Traceback" not in text, text[-3000:]
    # machine 2 took machine 1's partitions over, with their state read from the changelog: all
    # of it, or (when machine 2 held the partition before machine 1 joined) its own stale cache
    # brought up to date with the changelog records machine 1 wrote ('applied')
    taken = [line for line in replica_logs[1].read_text().splitlines()
             if "restored" in line and "'entries': 0," not in line
             and ("'from_cache': False" in line or "'applied': 0," not in line)]
    assert taken, replica_logs[1].read_text()[-3000:]
    assert_same_as_reference(windows.close(), alerts.close(), ref_windows, ref_finals)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_broker_stopped_and_started_again_mid_replay_changes_nothing(datasets, tmp_path, tiny_deeplog, how):
    """kafka.Kafka is stopped (SIGTERM: a clean shutdown; SIGKILL: a crash) while lines stream in,
    and started again on the same ports and data: the stages were not restarted, and their
    windows and final alerts are the reference's."""
    broker = localkafka.start(tmp_path / "broker", die_with_parent=True)
    port, controller = broker.port, broker.controller_port
    base = isolated_settings(broker.bootstrap)
    settings = stream_settings(base, datasets, tmp_path, tiny_deeplog, idle_close_s=30.0)
    lines = (datasets / "hdfs" / "HDFS_20000.log").read_text().splitlines(keepends=True)[:9000]
    sample = tmp_path / "sample.log"
    sample.write_text("".join(lines))
    files = deal_lines(sample, [settings.host(h) for h in HOSTS], tmp_path / "logs")
    host_topics(settings, files)
    log = tmp_path / "stages.log"
    stage = logwarden("run", "all", env=settings_env(settings), log=log)
    try:
        wait_for_parse_to_hold(log, files)
        replays = replay_hosts(settings, files, rate=500, log=tmp_path / "replay.log")   # ~6 s per host
        events_seen = _counter(settings, settings.events_topic)
        wait_until(lambda: events_seen() > 2500, 90, what="the stream to be under way")
        broker.stop_with(getattr(signal, how))
        time.sleep(4)                                       # the stages and replays see no broker
        broker = localkafka.start(tmp_path / "broker", port, controller_port=controller, die_with_parent=True)
        for p in replays:
            assert p.wait(180) == 0, (tmp_path / "replay.log").read_text()[-2000:]
        ref_windows, ref_finals = reference(settings, files, tiny_deeplog)
        windows, alerts = windows_collector(settings), alerts_collector(settings)
        wait_until(lambda: len({w.window_id for w in windows.items}) >= len(ref_windows), 180,
                   what="every session window after the restart")
        time.sleep(3)
        assert stage.poll() is None, "a stage exited: " + log.read_text()[-3000:]
        assert_same_as_reference(windows.close(), alerts.close(), ref_windows, ref_finals)
    finally:
        if stage.poll() is None:
            stage.terminate()
            stage.wait(60)
        broker.stop()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_host_topic_created_after_parse_started_and_restarted_is_picked_up(kafka_settings, datasets, tmp_path, tiny_deeplog):
    settings = stream_settings(kafka_settings, datasets, tmp_path, tiny_deeplog, instance_id="later")
    env = settings_env(settings)
    log = tmp_path / "parse.log"
    lines = (datasets / "hdfs" / "HDFS_20000.log").read_text().splitlines(keepends=True)
    early, late = tmp_path / "early.log", tmp_path / "late.log"
    early.write_text("".join(lines[:50]))
    late.write_text("".join(lines[50:80]))
    events = _counter(settings, settings.events_topic)
    assert replay_hosts(settings, {settings.host("early"): early}, log=log)[0].wait(60) == 0
    parse = logwarden("run", "parse", env=env, log=log)
    try:
        wait_until(lambda: events() >= 50, 60, what="the early host's lines")
        # A host starts shipping, and the group's only member dies while it reacts to the new
        # topic (the rebalance it started is in flight); its replacement must still pick it up.
        assert replay_hosts(settings, {settings.host("late"): late}, log=log)[0].wait(60) == 0
        time.sleep(1.5)
        parse.send_signal(signal.SIGKILL)
        parse.wait()
        parse = logwarden("run", "parse", env=env, log=log)
        wait_until(lambda: events() >= 80, 60, what="the late host's lines")
    finally:
        parse.terminate()
        parse.wait(30)
    records = consume(settings, settings.events_topic, 10**9, timeout=10)     # all there is (events and watermarks)
    hosts = {decode(m.value(), ParsedEvent).source.host for m in records if m.key() != WATERMARK_KEY}
    assert hosts == {settings.host("early"), settings.host("late")}
