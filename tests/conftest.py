"""Session fixtures shared by every test file.

    datasets          Path of the shared datasets (LOGWARDEN_DATASETS, else ../shared/datasets)
    kafka_bootstrap   host:port of a real broker: LOGWARDEN_KAFKA_BOOTSTRAP, else a fresh
                      kafka.Kafka JVM for this pytest session (never skipped: a failure fails)
    kafka_settings    per-test IsolatedSettings (tests/kafkautil.py): own topics, groups and
                      host names (use kafka_settings.host("dn1")); its topics are deleted after
    prometheus        factory: prometheus(targets, rule_files=(), scrape_interval="1s") -> Prom
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolkit import localkafka, localprom
from tests.kafkautil import delete_topics, isolated_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("LOGWARDEN_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not (DATASETS / "README.md").exists():
        pytest.fail(f"datasets not found at {DATASETS}: put the shared datasets there "
                    "or set LOGWARDEN_DATASETS to their directory", pytrace=False)
    return DATASETS


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> str:
    existing = os.environ.get("LOGWARDEN_KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    try:
        broker = localkafka.start(tmp_path_factory.mktemp("kafka"), die_with_parent=True)
    except localkafka.BrokerError as err:
        pytest.fail(f"the test Kafka broker did not start: {err}", pytrace=False)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def kafka_settings(kafka_bootstrap):
    settings = isolated_settings(kafka_bootstrap)
    yield settings
    from confluent_kafka.admin import AdminClient
    topics = AdminClient(settings.kafka_config()).list_topics(timeout=10).topics
    delete_topics(settings, [t for t in topics if settings.owned_topic(t)])


@pytest.fixture
def prometheus(tmp_path):
    started: list[localprom.Prom] = []

    def start(targets: list[str], rule_files=(), scrape_interval: str = "1s") -> localprom.Prom:
        prom = localprom.start_prometheus(targets, tmp_path / f"prometheus-{len(started)}",
                                          rule_files=rule_files, scrape_interval=scrape_interval)
        started.append(prom)
        return prom

    yield start
    for prom in started:
        prom.stop()


@pytest.fixture(scope="session")
def tiny_deeplog(datasets, tmp_path_factory) -> Path:
    """A small DeepLog (3 epochs on 1,500 of deeplog_hdfs_train's sessions, HDFS catalog texts),
    saved once per test session: what end-to-end tests serve. Its verdicts are not the point;
    that the stream's equal the reference run's is."""
    from models.data import read_sessions, read_templates, to_sequences
    from models.deeplog import DeepLog

    hdfs = datasets / "hdfs"
    templates = read_templates(hdfs / "HDFS_templates.csv")
    model = DeepLog(hidden=32, embedding=8, epochs=3, device="cpu", seed=2)
    model.fit(to_sequences(read_sessions(hdfs / "deeplog_hdfs_train")[:1500], templates), templates=templates)
    out = tmp_path_factory.mktemp("tiny-deeplog")
    model.save(out)
    return out
