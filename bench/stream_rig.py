"""What the stream benchmarks that run stage processes against a real broker share
(bench/overload_bench.py, bench/eval_failures.py): a broker of their own, a small DeepLog, settings
with topics and groups of one run, stage processes, their memory, and consumer lag.

The DeepLog is the end-to-end tests' (tests/conftest.py tiny_deeplog: 3 epochs on 1,500 of
deeplog_hdfs_train's sessions): these benchmarks measure what the stream does with records,
not what the model finds, and the small model keeps the judging cost at what a CPU does."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny_deeplog(data: Path, out: Path) -> Path:
    from models.data import read_sessions, read_templates, to_sequences
    from models.deeplog import DeepLog

    if (out / "manifest.json").exists():
        return out
    hdfs = data / "hdfs"
    templates = read_templates(hdfs / "HDFS_templates.csv")
    model = DeepLog(hidden=32, embedding=8, epochs=3, device="cpu", seed=2)
    model.fit(to_sequences(read_sessions(hdfs / "deeplog_hdfs_train")[:1500], templates), templates=templates)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return out


def run_settings(bootstrap: str, data: Path, workdir: Path, model: Path, run_id: str | None = None, **overrides):
    """Settings whose topics and groups belong to one run (``run_id``), the model published into
    its own MODEL_DIR; host topics are logs.<run_id>-<host>."""
    from models import artifacts
    from services.settings import load_settings

    run_id = run_id or "b" + uuid.uuid4().hex[:8]
    model_dir = workdir / run_id / "models"
    if not artifacts.latest(model_dir, "deeplog"):
        artifacts.publish(model, model_dir, "deeplog")
    values = {
        "kafka_bootstrap": bootstrap, "logs_pattern": rf"^logs\.{run_id}-.*", "group_prefix": run_id,
        **{f"{name}_topic": f"{run_id}.{name}" for name in
           ("events", "windows", "alerts", "deadletter", "feedback", "otlp_spans", "otlp_metrics", "otlp_logs",
            "spans", "traces", "timeline", "chunks")},
        "template_catalog": data / "hdfs" / "HDFS_templates.csv", "model_dir": model_dir,
        "state_dir": workdir / run_id / "state", "device": "cpu", "metrics_port": 0,
    }
    return load_settings(**(values | overrides)), run_id


def environment(settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGWARDEN_")}
    return env | settings.environment() | extra


def process_memory_mb(pid: int) -> tuple[float, float] | None:
    """(RSS, peak RSS) of a process in MiB from /proc (VmRSS, VmHWM: the kernel's high-water
    mark, so no spike between two readings is missed); None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (KeyError, ValueError):
        return None


class Stage:
    """`python -m services.cli run STAGE` with these settings, its output in ``log``."""

    def __init__(self, stage: str, env: dict[str, str], log: Path):
        self.stage, self.log = stage, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", stage], env=env,
                                         cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory_mb(self) -> tuple[float, float] | None:
        return process_memory_mb(self.pid)

    def log_has(self, pattern: str) -> bool:
        return self.log.exists() and re.search(pattern, self.log.read_text(errors="replace")) is not None

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


class Lag:
    """Consumer lag of groups: the end offsets of their input minus what they committed, summed
    over partitions (read-only: it never joins a group)."""

    def __init__(self, settings):
        self.conf = settings.kafka_config()
        self.admin = AdminClient(self.conf)
        self._consumers: dict[str, Consumer] = {}

    def partitions(self, topic: str) -> list[TopicPartition]:
        topics = self.admin.list_topics(timeout=10).topics
        names = [t for t in topics if re.match(topic, t)] if topic.startswith("^") else [topic]
        return [TopicPartition(t, p) for t in names if t in topics for p in topics[t].partitions]

    def of(self, group: str, topic: str) -> tuple[int, int]:
        """(end offsets, committed) of ``group`` on ``topic`` (a name or a ^regex)."""
        consumer = self._consumers.get(group)
        if consumer is None:
            consumer = self._consumers[group] = Consumer(self.conf | {"group.id": group, "enable.auto.commit": False})
        parts = self.partitions(topic)
        if not parts:
            return 0, 0
        ends = sum(consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts)
        committed = sum(max(0, tp.offset) for tp in consumer.committed(parts, timeout=10))
        return ends, committed

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()


def wait_for(predicate, timeout: float, what: str, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except KafkaException:
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_broker(workdir: Path):
    from toolkit import localkafka

    return localkafka.start(workdir / "broker", die_with_parent=True)
