"""`logwarden` command line. Every subcommand is a thin wrapper: argument parsing here, the work
in the module named in COMMANDS (imported only when that command runs, so `logwarden replay`
does not pay for importing torch).

Errors a user can fix (a bad argument, a bad setting, a missing file) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from services.settings import RDKAFKA_LOG, SettingsError, UsageError, load_settings

# subcommand -> "module:function"; the function takes the parsed args and returns an exit code.
COMMANDS = {
    "replay": "toolkit.replay:main",
    "run": "services.stages:main",
    "train": "models.cli:train",
    "evaluate": "models.cli:evaluate",
    "alerts": "services.alerts:main",
    "feedback": "services.feedback:main",
    "model": "models.cli:model",
    "stack": "toolkit.stack:main",
    "kafka": "toolkit.localkafka:main",
    "topics": "services.shell:topics_main",
    "security": "services.security:main",
    "lab": "toolkit.lab:main",
    "scrape": "services.scrape:main",
}

STAGES = ("parse", "sessions", "otlp", "assemble", "join", "detect", "feedback", "all")     # services.stages.STAGES + "all" (test_compose checks)
DETECTORS = ("deeplog", "attgru", "novelty", "pca", "tracelstm", "anofusion", "hades")   # models.artifacts.DETECTORS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value
    return convert


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="logwarden", description="Streaming log anomaly detection for Hadoop clusters.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    s = sub.add_parser("replay", help="produce log files to logs.<host> as Filebeat would, or "
                                      "TrainTicket CSVs to the otlp_* topics as an OpenTelemetry Collector would")
    s.add_argument("files", nargs="*", metavar="FILE", help="log files (Filebeat replay, with --host)")
    s.add_argument("--host", help="host name: records go to logs.<host>")
    s.add_argument("--traces", nargs="+", metavar="FILE_OR_DIR", help="TrainTicket trace CSVs (plain or .gz) as OTLP spans")
    s.add_argument("--metrics", metavar="DIR", help="TrainTicket metric/ folder as OTLP gauges per pod")
    s.add_argument("--logs", nargs="+", metavar="FILE_OR_DIR", help="TrainTicket log CSVs as OTLP log records")
    pace = s.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive(float), help="OTLP replay: event time runs S times as fast (default 1)")
    pace.add_argument("--fast", action="store_true", help="OTLP replay: as fast as the broker takes it")
    s.add_argument("--encoding", choices=("otlp_proto", "otlp_json"), default="otlp_proto",
                   help="the Kafka exporter's encoding (default otlp_proto)")
    s.add_argument("--by-trace-id", action="store_true",
                   help="one record per trace keyed by its id (the exporter's partition_traces_by_id)")
    s.add_argument("--rate", type=_positive(float), help="lines per second (default: as fast as possible)")
    s.add_argument("--follow", action="store_true", help="keep reading appended lines, like tail -F")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("run", help="run a stage (services/stages.py has the dataflow) or all of them")
    s.add_argument("stage", choices=STAGES)
    s.add_argument("--exit-when-idle", type=_positive(float), metavar="S",
                   help="stop after S seconds without input (batch replays, tests)")

    s = sub.add_parser("train", help="train a detector")
    s.add_argument("--detector", required=True, choices=DETECTORS)
    s.add_argument("--normal", metavar="FILE", help="normal sessions, one per line, space-separated keys")
    s.add_argument("--abnormal", metavar="FILE", help="abnormal sessions (supervised detectors)")
    s.add_argument("--templates", metavar="CSV", help="EventId,EventTemplate (key k <-> E<k>)")
    s.add_argument("--logs", nargs="+", metavar="FILE", help="train from raw log files instead")
    s.add_argument("--labels", metavar="FILE",
                   help="CSV SessionId,Label for --logs (without it every session is normal); FAULTS.json for hades")
    s.add_argument("--session-key", action="append", metavar="NAME",
                   help="with --logs: the parse config's session key that makes sessions (repeatable; default all)")
    s.add_argument("--traces", nargs="+", metavar="FILE_OR_DIR", help="trace CSVs (tracelstm)")
    s.add_argument("--data", metavar="DIR", help="a data directory with metric/, trace/, log/ (anofusion, hades)")
    s.add_argument("--exclude-faults", metavar="FAULTS.json", help="leave the time around these faults out of training")
    s.add_argument("--labelled-fraction", type=_fraction, metavar="F", help="share of chunks whose label training sees (hades)")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--calibrate", type=_fraction, metavar="F",
                   help="attgru: hold out F of the distinct sessions and choose the session threshold on them")
    s.add_argument("--anomaly-share", type=_fraction, metavar="S",
                   help="with --calibrate: the share of anomalous sessions expected when serving (default: the labels')")
    s.add_argument("--epochs", type=_positive(int))
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--device", choices=("auto", "cpu", "cuda"))
    s.add_argument("--window", "-H", dest="h", type=_positive(int), help="h: history length")
    s.add_argument("--top-g", "-g", dest="g", type=_positive(int), help="g: top-g candidates (deeplog)")
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("evaluate", help="evaluate a trained detector on labelled data")
    s.add_argument("--detector", required=True, choices=DETECTORS)
    s.add_argument("--model", required=True, metavar="DIR")
    s.add_argument("--normal", metavar="FILE", help="normal sessions (log detectors)")
    s.add_argument("--abnormal", metavar="FILE", help="abnormal sessions (log detectors)")
    s.add_argument("--logs", nargs="+", metavar="FILE", help="raw log files instead of session files")
    s.add_argument("--labels", metavar="CSV", help="SessionId,Label for --logs")
    s.add_argument("--session-key", action="append", metavar="NAME",
                   help="with --logs: the parse config's session key that makes sessions (repeatable; default all)")
    s.add_argument("--templates", metavar="CSV")
    s.add_argument("--traces", nargs="+", metavar="FILE_OR_DIR", help="trace CSVs (tracelstm)")
    s.add_argument("--data", metavar="DIR", help="a data directory with metric/, trace/, log/ (anofusion, hades)")
    s.add_argument("--faults", metavar="FAULTS.json", help="the data's fault list (traces, chunks)")
    s.add_argument("--json", required=True, metavar="OUT")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"))
    s.add_argument("--top-g", "-g", dest="g", type=_positive(int), help="override g (deeplog)")

    s = sub.add_parser("alerts", help="read alerts")
    a = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    t = a.add_parser("tail", help="print alerts as they arrive")
    t.add_argument("--host", action="append", help="only alerts touching this host (repeatable)")
    t.add_argument("--detector", choices=DETECTORS)
    t.add_argument("--json", action="store_true", help="one JSON alert per line")
    t.add_argument("--from-beginning", action="store_true")
    t.add_argument("--max", type=_positive(int), help="stop after N alerts")
    t.add_argument("--timeout", type=_positive(float), help="stop after S seconds without an alert")

    s = sub.add_parser("feedback", help="tell logwarden an alert was wrong (or right)")
    s.add_argument("alert_id")
    v = s.add_mutually_exclusive_group(required=True)
    v.add_argument("--false-positive", action="store_true")
    v.add_argument("--true-positive", action="store_true")
    s.add_argument("--note")

    s = sub.add_parser("model", help="model versions in MODEL_DIR")
    a = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    t = a.add_parser("list")
    t.add_argument("--detector", choices=DETECTORS)
    t = a.add_parser("publish", help="copy a trained model in as the next version")
    t.add_argument("model", metavar="DIR")
    t = a.add_parser("rollback", help="set the newest version aside; the previous one is served")
    t.add_argument("--detector", required=True, choices=DETECTORS)

    s = sub.add_parser("stack", help="a docker compose deployment")
    a = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    t = a.add_parser("check", help="containers healthy, topics present, stages consuming, metrics up")
    t.add_argument("--project", default="logwarden", help="compose project name")
    t.add_argument("--prometheus", default="http://127.0.0.1:9090")
    t = a.add_parser("secrets", help="fill every empty *_PASSWORD in .env with a random password")
    t.add_argument("--env-file", default=".env", metavar="FILE")

    s = sub.add_parser("kafka", help="the local single-node broker (fetched from Maven Central)")
    s.add_argument("action", choices=("up", "down", "status"))

    s = sub.add_parser("topics", help="create logwarden's topics if missing")
    s.add_argument("action", choices=("create",))

    s = sub.add_parser("security", help="Kafka users and ACLs (services/security.py)")
    s.add_argument("action", choices=("init", "acls"),
                   help="init: SCRAM users and ACLs (as an admin); acls: print the ACLs")
    s = sub.add_parser("scrape", help="Prometheus-format endpoints (Hadoop's /prom) -> OTLP metrics on the "
                                      "otlp_metrics topic, as the Collector's prometheus receiver would")
    from services.scrape import add_arguments as scrape_arguments
    scrape_arguments(s)

    s = sub.add_parser("lab", help="a live HDFS cluster from Maven Central jars: up, down, record a data set, watch it live")
    a = s.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, text in (("up", "start the cluster in .run/lab (make lab-up)"), ("down", "stop it (make lab-down)"),
                         ("status", "is it up"), ("fetch", "fetch the Hadoop jars (make hadoop-jars)")):
        a.add_parser(action, help=text)
    t = a.add_parser("record", help="record a labelled logs + metrics data set from a fresh cluster")
    t.add_argument("--minutes", type=_positive(float), required=True)
    t.add_argument("--faults", default="none", metavar="SCHEDULE",
                   help="KIND@START+DURATION[:TARGET],... | random:N[:seed=S][:gap=G] | all[:gap=G] | none | a file")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--rate", type=_positive(float), default=1.0, help="workload operations per second")
    t.add_argument("--keep-cluster", action="store_true", help="keep the cluster's directory (.run/lab-record-*)")
    t = a.add_parser("live", help="the cluster watched live by logwarden's stages, faults on a schedule (make lab)")
    t.add_argument("--warmup", type=_positive(float), default=180.0, metavar="S",
                   help="fault-free seconds the model trains on")
    t.add_argument("--faults", default="all:gap=30", metavar="SCHEDULE", help="as for record; offsets count from the end of the warm-up")
    t.add_argument("--model", metavar="DIR", help="a trained DeepLog model instead of training on the warm-up")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--rate", type=_positive(float), default=1.0, help="workload operations per second")
    t.add_argument("--out", metavar="DIR", help="also keep the run's logs, metrics, labels and table here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command != "run" and not args.verbose:
        # A command's Kafka failure is one line (below); librdkafka's retries are for -v.
        RDKAFKA_LOG.setLevel(logging.CRITICAL + 1)
    module_name, _, func = COMMANDS[args.command].partition(":")
    try:
        handler = getattr(importlib.import_module(module_name), func)
        return int(handler(args) or 0)
    except (SettingsError, UsageError, FileNotFoundError, IsADirectoryError) as err:
        print(f"logwarden {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        kafka = sys.modules.get("confluent_kafka")   # loaded by whatever raised a KafkaException
        if kafka is None or not isinstance(err, kafka.KafkaException):
            raise
        from services.diagnose import explain
        line, status = explain(err, load_settings())
        print(f"logwarden {args.command}: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
