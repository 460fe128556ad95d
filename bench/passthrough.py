"""The two peers every stage is measured against (issue 18), run as processes like the stages:

    python -m bench.passthrough shell    --from TOPIC_OR_REGEX --to TOPIC --name NAME
    python -m bench.passthrough drain3   --from TOPIC_OR_REGEX --to TOPIC --name NAME

``shell``: a pass-through stage in logwarden's own shell (services.shell.StageRunner): it
consumes, does nothing, and produces the same bytes with the same key, with the same batching,
commits, acknowledgements and producer settings as every stage. Its rate is the physical limit of
one Python stage on this machine and broker; every stage is reported as a ratio of it.

``drain3``: what a user would write by hand without logwarden — one confluent-kafka consumer,
drain3's TemplateMiner on each Filebeat record's ``message``, the cluster id and template as a
small JSON record to the producer, auto-committed offsets (at-most/at-least once unspecified:
no waiting for acknowledgements). The peer a user compares the parse stage with.

Settings (broker, security, group prefix, queues) come from LOGWARDEN_* like every stage; the
consumer group is ``<group_prefix>.<name>``.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from services.settings import load_settings
from services.shell import Out, Record, StageRunner, StageSpec, consumer_config, producer_config, subscription


class PassThroughCore:
    """Every record out again, unchanged, to one topic: nothing but the shell's own cost."""

    def __init__(self, name: str, target: str):
        self.name, self.target = name, target

    def process(self, batch: list[Record]) -> list[Out]:
        target = self.target
        return [Out(target, r.value, r.key, r) for r in batch]

    def tick(self, now: float) -> list[Out]:
        return []


def run_shell(source: str, target: str, name: str, exit_when_idle: float, stop: threading.Event) -> None:
    settings = load_settings()
    spec = StageSpec(name=name, topics=[source], core=PassThroughCore(name, target))
    StageRunner(settings, spec, stop).run(exit_when_idle)


def run_drain3(source: str, target: str, name: str, exit_when_idle: float, stop: threading.Event) -> None:
    from confluent_kafka import Consumer, Producer
    from drain3 import TemplateMiner
    from drain3.template_miner_config import TemplateMinerConfig

    settings = load_settings()
    config = TemplateMinerConfig()
    config.profiling_enabled = False
    miner = TemplateMiner(config=config)
    consumer = Consumer(consumer_config(settings, settings.group(name)) | {"enable.auto.commit": True})
    producer = Producer(producer_config(settings))
    consumer.subscribe(subscription([source]))
    last_input = time.monotonic()
    try:
        while not stop.is_set():
            messages = consumer.consume(2000, timeout=0.5)
            if not messages:
                if time.monotonic() - last_input > exit_when_idle:
                    break
                continue
            last_input = time.monotonic()
            for m in messages:
                if m.error():
                    continue
                try:
                    line = json.loads(m.value())["message"]
                except (ValueError, KeyError, TypeError):
                    continue
                found = miner.add_log_message(line)
                producer.produce(target, json.dumps({"cluster_id": found["cluster_id"],
                                                     "template": found["template_mined"]}).encode(), m.key())
                producer.poll(0)
        producer.flush(30)
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("shell", "drain3"))
    p.add_argument("--from", dest="source", required=True, help="input topic, or ^regex")
    p.add_argument("--to", dest="target", required=True, help="output topic")
    p.add_argument("--name", required=True, help="stage name: the consumer group is <prefix>.<name>")
    p.add_argument("--exit-when-idle", type=float, default=3600.0)
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    (run_shell if args.kind == "shell" else run_drain3)(args.source, args.target, args.name, args.exit_when_idle, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
