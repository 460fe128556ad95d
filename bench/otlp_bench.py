"""OTLP ingest through a real Kafka broker: spans/s and metric points/s of the otlp stage, beside a
pass-through stage on the same input in the same run.

    python -m bench.otlp_bench --data ../shared/datasets [--hours 11] [--json OUT]

Input: TrainTicket 2023-01-30 (``trainticket_2023-01-30/``): the trace files of ``--hours``
(default 11: 11:39-11:59, about 70k spans) and every pod's metric CSV (the whole day: about 47 x
740 rows of ~20 columns). Each signal is measured on its own, on fresh topics:

  replay      `logwarden replay --fast` (toolkit.otlp_replay.replay_otlp, otlp_proto, batched as
              the Collector's batch processor): items / wall time until every record is acked;
  passthrough bench.passthrough's pass-through core in the same shell (services.shell.StageRunner):
              each input record to an output topic unchanged, the cost of consuming and producing
              the same Kafka records with no decoding;
  otlp        the otlp stage (services.stages.OtlpStage) on the same input topic.

A stage's rate is items / (last - first Kafka CreateTime of its output records): start-up and the
consumer group's join are outside it. Beside it, the CPU seconds of the bench process while the
stage ran (start-up and the idle wait at the end included: an upper bound) and items per CPU
second, which a busy machine does not distort. ``otlp_vs_passthrough`` = the otlp stage's time / the
pass-through's on the same records (1.0: decoding is free). Stages run one after another, never
at once. A broker: LOGWARDEN_KAFKA_BOOTSTRAP, else the local one of `make kafka-up`, else a fresh
one started for the run (toolkit.localkafka).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.e2e_bench import create_time_span
from bench.passthrough import PassThroughCore
from services.shell import StageRunner, StageSpec


def _settings(bootstrap: str, run_id: str):
    from services.settings import Settings

    names = {f"{t}_topic": f"{run_id}.{t}" for t in ("events", "windows", "alerts", "deadletter", "feedback",
                                                       "spans", "traces", "timeline", "chunks")}
    names |= {f"otlp_{s}_topic": f"{run_id}.otlp_{s}" for s in ("spans", "metrics", "logs")}
    return Settings(kafka_bootstrap=bootstrap, group_prefix=run_id, state_dir=Path(tempfile.mkdtemp()) / "state",
                    **names)


def _run_stage(settings, spec: StageSpec, idle_s: float = 3.0) -> float:
    """Runs the stage in this process until idle; returns the CPU seconds this process spent
    (the stage's thread and its librdkafka threads; a broker started by the bench is another
    process). On a shared machine the CreateTime rates measure the other jobs too; CPU seconds
    do not."""
    from services.shell import ensure_topics

    ensure_topics(settings)
    started = time.process_time()
    StageRunner(settings, spec).run(exit_when_idle=idle_s)
    return time.process_time() - started


def _span(conf: dict, topic: str, tries: int = 10) -> dict:
    """create_time_span, waiting out a fresh topic's leader election (NOT_LEADER_FOR_PARTITION
    on a broker started for the run)."""
    from confluent_kafka import KafkaException

    for attempt in range(tries):
        try:
            return create_time_span(conf, topic)
        except KafkaException:
            if attempt == tries - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _rate(items: int, span: dict) -> float | None:
    if span["first_ms"] is None or span["last_ms"] <= span["first_ms"]:
        return None
    return items / ((span["last_ms"] - span["first_ms"]) / 1000)


def measure_signal(bootstrap: str, signal: str, traces: list[Path], metric_dir: Path | None) -> dict:
    from services import stages
    from toolkit.otlp_replay import replay_otlp

    settings = _settings(bootstrap, "bench-otlp-" + uuid.uuid4().hex[:8])
    started = time.perf_counter()
    counts = replay_otlp(settings, traces if signal == "spans" else (), metric_dir if signal == "metrics" else None,
                         (), speed=None)
    replay_s = time.perf_counter() - started
    items = counts.spans if signal == "spans" else counts.metric_points
    source = settings.otlp_spans_topic if signal == "spans" else settings.otlp_metrics_topic
    conf = settings.kafka_config()

    passthrough_topic = f"{settings.group_prefix}.passthrough"
    from services.shell import ensure_topics
    ensure_topics(settings, extra=[passthrough_topic])      # not auto-created mid-run
    pass_cpu = _run_stage(settings, StageSpec("passthrough", [source], PassThroughCore("passthrough", passthrough_topic),
                                                 batch_size=200))
    passed = _span(conf, passthrough_topic)

    otlp_cpu = _run_stage(settings, stages.build("otlp", settings))
    output = settings.spans_topic if signal == "spans" else settings.timeline_topic
    decoded = _span(conf, output)
    pass_rate, otlp_rate = _rate(items, passed), _rate(items, decoded)
    unit = "spans_per_s" if signal == "spans" else "points_per_s"
    return {
        "items": items, "kafka_records": sum(counts.messages.values()), "output_records": decoded["records"],
        "replay": {unit: round(items / replay_s), "seconds": round(replay_s, 2)},
        "passthrough": {unit: round(pass_rate) if pass_rate else None, "records": passed["records"],
                        "cpu_s": round(pass_cpu, 2), unit.replace("_per_s", "_per_cpu_s"): round(items / pass_cpu) if pass_cpu else None},
        "otlp": {unit: round(otlp_rate) if otlp_rate else None, "cpu_s": round(otlp_cpu, 2),
                 unit.replace("_per_s", "_per_cpu_s"): round(items / otlp_cpu) if otlp_cpu else None},
        "otlp_vs_passthrough": round(pass_rate / otlp_rate, 2) if pass_rate and otlp_rate else None,
        "otlp_vs_passthrough_cpu": round(otlp_cpu / pass_cpu, 2) if pass_cpu else None,
    }


def run(data: Path, bootstrap: str, hours: list[str]) -> dict:
    day = data / "trainticket_2023-01-30" if (data / "trainticket_2023-01-30").is_dir() else data
    traces = [day / "trace" / f"{h}.csv.gz" for h in hours]
    missing = [str(p) for p in traces if not p.exists()]
    if missing:
        raise SystemExit(f"otlp_bench: no such trace file: {', '.join(missing)}")
    return {"data": str(day), "hours": hours,
            "spans": measure_signal(bootstrap, "spans", traces, None),
            "metrics": measure_signal(bootstrap, "metrics", [], day / "metric")}


def _bootstrap(stack) -> str:
    import os

    from services.settings import BOOTSTRAP_FILE
    if os.environ.get("LOGWARDEN_KAFKA_BOOTSTRAP"):
        return os.environ["LOGWARDEN_KAFKA_BOOTSTRAP"]
    if BOOTSTRAP_FILE.exists():
        return BOOTSTRAP_FILE.read_text().strip()
    from toolkit import localkafka
    broker = localkafka.start(Path(tempfile.mkdtemp(prefix="otlp-bench-kafka-")), die_with_parent=True)
    stack.append(broker)
    return broker.bootstrap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.otlp_bench", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the shared datasets (or the trainticket day) directory")
    p.add_argument("--hours", nargs="+", default=["11"], help="trace files (hours) to replay, e.g. 11 12")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    brokers: list = []
    try:
        result = run(args.data, _bootstrap(brokers), args.hours)
    finally:
        for broker in brokers:
            broker.stop()
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
