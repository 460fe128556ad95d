"""filebeat/filebeat.yml and logstash/ agree with what the parse stage consumes, with the replay
tool that stands in for Filebeat in tests, and with the Hadoop hosts of docker-compose.yml.

Filebeat and Logstash do not run here; their configuration is read as data and its meaning
(topic format strings, the multiline rule, Java's topic pattern) is applied in Python to real
records: the replay tool's Filebeat documents and the lines of the HDFS data set.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import msgspec
import yaml

from services.records import FilebeatDoc
from services.settings import Settings
from toolkit import replay

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("LOGWARDEN_DATASETS", REPO.parent / "shared" / "datasets"))
FORMAT_FIELD = re.compile(r"%\{\[([^\]]+)\]\}")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


@lru_cache(maxsize=1)
def filebeat() -> dict:
    return yaml.safe_load((REPO / "filebeat" / "filebeat.yml").read_text())


@lru_cache(maxsize=1)
def compose_services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def environment(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def filebeat_env(value: str, env: dict[str, str]) -> str:
    """Beats' ${VAR}, ${VAR:default} and ${VAR:?error} expansion."""
    def one(m: re.Match) -> str:
        name, rest = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if rest is not None and not rest.startswith("?"):
            return rest
        raise AssertionError(f"filebeat.yml needs {name}, which is not set")
    return ENV_REF.sub(one, value)


def render(format_string: str, event: dict) -> str:
    """A Beats format string (``%{[host.name]}``) applied to an event."""
    def field(m: re.Match) -> str:
        value = event
        for part in m.group(1).split("."):
            assert isinstance(value, dict) and part in value, f"event has no field {m.group(1)}"
            value = value[part]
        return str(value)
    return FORMAT_FIELD.sub(field, format_string)


def multiline_events(lines: list[str], rule: dict) -> list[list[str]]:
    """Filebeat's pattern multiline (negate/match) applied to lines."""
    assert rule["type"] == "pattern" and rule["match"] == "after"
    pattern = re.compile(rule["pattern"])
    events: list[list[str]] = []
    for line in lines:
        continues = bool(pattern.search(line)) != bool(rule["negate"])
        if continues and events:
            events[-1].append(line)
        else:
            events.append([line])
    return events


def replay_document(host: str, path: Path, offset: int, message: str) -> dict:
    stat = path.stat()
    encoder = replay.LineEncoder(replay.Agent(host), path, stat.st_dev, stat.st_ino)
    return json.loads(encoder.encode(offset, message))


@lru_cache(maxsize=1)
def dotenv() -> dict[str, str]:
    return dict(line.split("=", 1) for line in (REPO / ".env").read_text().splitlines()
                if line and not line.startswith("#"))


def hadoop_hosts() -> dict[str, dict]:
    return {name: s for name, s in compose_services().items() if s.get("image") == "${HADOOP_IMAGE}"}


def filebeat_services() -> dict[str, dict]:
    return {name: s for name, s in compose_services().items() if s.get("image") == "${FILEBEAT_IMAGE}"}


# ------------------------------------------------------------------------------------------
def test_inputs_are_filestream_with_unique_ids_and_multiline():
    inputs = filebeat()["filebeat.inputs"]
    ids = [i.get("id") for i in inputs]
    assert all(ids) and len(set(ids)) == len(ids), f"input ids must be set and unique: {ids}"
    for item in inputs:
        assert item["type"] == "filestream"
        rules = [p["multiline"] for p in item.get("parsers", []) if "multiline" in p]
        assert len(rules) == 1, f"{item['id']}: one multiline parser"
        # The small-file rule is chosen explicitly (the 9.x default), with the length it states.
        fingerprint = item["prospector.scanner.fingerprint"]
        assert fingerprint["enabled"] is True and fingerprint["length"] == 1024
        assert "file_identity.fingerprint" in item, item["id"]


def test_multiline_joins_java_stack_traces_in_the_compose_log4j_layout():
    layout = environment(next(iter(hadoop_hosts().values())))[
        "LOG4J.PROPERTIES_log4j.appender.RFA.layout.ConversionPattern"]
    assert layout.startswith("%d{ISO8601} ")

    def log4j(level: str, logger: str, message: str) -> str:   # the compose layout, rendered
        return (layout.replace("%d{ISO8601}", "2025-05-01 12:00:00,123").replace("%p", level)
                .replace("%c", logger).replace("%m", message).replace("%n", ""))

    lines = [
        log4j("INFO", "org.apache.hadoop.hdfs.server.datanode.DataNode", "Receiving BP-1 blk_1073741825_1001"),
        log4j("WARN", "org.apache.hadoop.hdfs.server.datanode.DataNode", "IOException in BlockReceiver.run():"),
        "java.io.IOException: Connection reset by peer",
        "\tat sun.nio.ch.FileDispatcherImpl.write0(Native Method)",
        "\tat org.apache.hadoop.hdfs.server.datanode.BlockReceiver.run(BlockReceiver.java:1418)",
        "Caused by: java.net.SocketException: Broken pipe",
        "\t... 12 more",
        log4j("INFO", "org.apache.hadoop.hdfs.server.datanode.DataNode", "PacketResponder: terminating"),
    ]
    for item in filebeat()["filebeat.inputs"]:
        rule = next(p["multiline"] for p in item["parsers"] if "multiline" in p)
        events = multiline_events(lines, rule)
        assert [len(e) for e in events] == [1, 6, 1], item["id"]
        assert events[1][0].endswith("IOException in BlockReceiver.run():")


def test_multiline_keeps_every_hdfs_dataset_line_its_own_event():
    path = DATASETS / "hdfs" / "HDFS_5k.log"
    lines = path.read_text(encoding="utf-8").splitlines()
    rule = next(p["multiline"] for p in filebeat()["filebeat.inputs"][0]["parsers"] if "multiline" in p)
    assert len(lines) > 1000
    events = multiline_events(lines, rule)
    assert len(events) == len(lines)


def test_topic_and_key_agree_with_the_replay_tool_and_the_parse_stage(tmp_path):
    output = filebeat()["output.kafka"]
    settings = Settings()
    log = tmp_path / "hadoop-datanode.log"
    line = "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_-1608999687919862906"
    log.write_text(line + "\n")
    for host in ("namenode", "datanode1", "dn-07.rack2"):
        document = replay_document(host, log, 0, line)
        event = msgspec.convert(document, FilebeatDoc)        # what the parse stage decodes
        assert event.host.name == host and event.message == line and event.log.offset == 0
        topic = render(output["topic"], document)
        assert topic == replay.logs_topic(host)
        assert re.match(settings.logs_pattern, topic), f"{topic} is not read by the parse stage"
        # Same key as replay: one file's lines stay in one partition, in order.
        assert render(output["key"], document) == document["log"]["file"]["path"] == str(log)
    for own in (settings.events_topic, settings.windows_topic, settings.alerts_topic,
                settings.deadletter_topic, settings.feedback_topic):
        assert not re.match(settings.logs_pattern, own), f"parse would consume its own output topic {own}"


def test_filebeat_keeps_every_field_the_parse_stage_requires():
    config = filebeat()
    # host.name comes from `name` (libbeat's publisher adds host.name = the beat's name); a
    # processor could overwrite or drop it, or drop the fields FilebeatDoc requires.
    assert config["name"].startswith("${HADOOP_HOST")
    processors = config.get("processors") or []
    names = [next(iter(p)) for p in processors]
    assert "add_host_metadata" not in names
    required = {f.encode_name for f in msgspec.structs.fields(FilebeatDoc) if f.required}
    assert required == {"@timestamp", "message", "host", "log"}
    for p in processors:
        kind, options = next(iter(p.items()))
        touched = set((options or {}).get("fields", []))
        assert kind not in {"drop_fields", "rename", "include_fields"} or not any(
            field.split(".")[0] in required for field in touched), p
    assert "fields_under_root" not in config and "fields" not in config
    for item in config["filebeat.inputs"]:
        assert not item.get("fields_under_root"), item["id"]


def test_kafka_output_is_durable_and_speaks_kafka4():
    output = filebeat()["output.kafka"]
    assert output["required_acks"] == -1
    assert output["compression"] in {"gzip", "snappy", "lz4", "zstd"}
    assert tuple(int(x) for x in output["version"].split(".")) >= (2, 1, 0)   # Kafka 4: KIP-896
    assert output["partition.hash"]["reachable_only"] is False
    assert output.get("codec.json", {}).get("pretty", False) is False
    # The brokers come from the per-host environment, and compose gives every Filebeat the bootstrap.
    assert "KAFKA_HOSTS" in output["hosts"]


def test_replay_pretends_to_be_the_pinned_filebeat_major():
    image = next(line.split("=", 1)[1] for line in (REPO / ".env").read_text().splitlines()
                 if line.startswith("FILEBEAT_IMAGE="))
    assert image.rsplit(":", 1)[1].split(".")[0] == replay.FILEBEAT_VERSION.split(".")[0]


def test_each_hadoop_host_has_a_filebeat_reading_its_log_files():
    """The log4j file of every Hadoop host lies on a volume that exactly one Filebeat mounts,
    that Filebeat names the host, and one of its inputs' paths matches the file."""
    beats = filebeat_services()
    inputs = filebeat()["filebeat.inputs"]
    assert len(hadoop_hosts()) >= 5
    for host, service in hadoop_hosts().items():
        log_file = environment(service)["LOG4J.PROPERTIES_log4j.appender.RFA.File"]
        volumes = [v.split(":") for v in service["volumes"]]
        log_volume, log_dir = next((src, dst) for src, dst, *_ in volumes if log_file.startswith(dst + "/"))
        readers = {name: b for name, b in beats.items()
                   if any(v.split(":")[0] == log_volume for v in b["volumes"])}
        assert len(readers) == 1, f"{host}: {log_volume} is read by {sorted(readers)}"
        name, beat = next(iter(readers.items()))
        # The container's environment after compose substitutes .env (same ${VAR} syntax).
        env = {key: filebeat_env(value, dotenv()) for key, value in environment(beat).items()}
        assert env["HADOOP_HOST"] == service["hostname"] == host, name
        mount = next(v.split(":") for v in beat["volumes"] if v.split(":")[0] == log_volume)
        assert mount[2:] == ["ro"], f"{name} must mount {log_volume} read-only"
        as_seen_by_filebeat = mount[1] + log_file[len(log_dir):]
        paths = [filebeat_env(p, env) for i in inputs for p in i["paths"]]
        assert any(fnmatch.fnmatch(as_seen_by_filebeat, p) for p in paths), (host, as_seen_by_filebeat, paths)
        # A rotated file (log4j RollingFileAppender: <file>.1) is still read.
        assert any(fnmatch.fnmatch(as_seen_by_filebeat + ".1", p) for p in paths)
        assert filebeat_env(filebeat()["name"], env) == host
        assert filebeat_env(filebeat()["output.kafka"]["hosts"], env) == dotenv()["KAFKA_BOOTSTRAP"]
    assert len(beats) == len(hadoop_hosts())



# ------------------------------------------------------------------------------------------
# Logstash
def logstash_kafka_input() -> dict[str, str]:
    text = (REPO / "logstash" / "pipeline" / "archive.conf").read_text()
    block = re.search(r"input\s*\{\s*kafka\s*\{(.*?)\n\s*\}\s*\n\}", text, re.S)
    assert block, "archive.conf: no kafka input"
    options = {}
    for key, quoted, bare in re.findall(r'^\s*(\w+)\s*=>\s*(?:"([^"]*)"|(\S+))', block.group(1), re.M):
        options[key] = quoted if quoted or not bare else bare
    return options


def test_logstash_topics_pattern_selects_what_logs_pattern_selects():
    options = logstash_kafka_input()
    settings = Settings()
    # Logstash config strings keep backslashes (config.support_escapes is off by default); the
    # Java consumer subscribes with Pattern.compile(...) and full-matches each topic name.
    java_pattern = re.compile(options["topics_pattern"])
    hosts = [environment(b)["HADOOP_HOST"] for b in filebeat_services().values()]
    candidates = [f"logs.{h}" for h in hosts] + [
        "logs.dn-07.rack2", "logs", "logs.", "logsX.namenode", "xlogs.namenode", "old.logs.namenode",
        settings.events_topic, settings.windows_topic, settings.alerts_topic, settings.deadletter_topic,
        settings.feedback_topic, "__consumer_offsets"]
    by_logstash = {t for t in candidates if java_pattern.fullmatch(t)}
    by_parse = {t for t in candidates if re.match(settings.logs_pattern, t)}
    assert by_logstash == by_parse
    assert {f"logs.{h}" for h in hosts} <= by_logstash


def test_logstash_archives_per_host_per_day_with_its_own_group():
    options = logstash_kafka_input()
    assert options["codec"] == "json"
    assert options["group_id"] not in {Settings().group(s) for s in ("parse", "window", "detect", "feedback")}
    assert options["bootstrap_servers"] == "${KAFKA_BOOTSTRAP}"
    assert environment(compose_services()["logstash"])["KAFKA_BOOTSTRAP"] == "${KAFKA_BOOTSTRAP}"
    text = (REPO / "logstash" / "pipeline" / "archive.conf").read_text()
    path = re.search(r'path\s*=>\s*"([^"]+)"', text.split("output", 1)[1]).group(1)
    assert "%{[@metadata][archive_host]}" in path and "%{+yyyy-MM-dd}" in path
    # The archive is written on the logstash-data volume, and the pipeline file Logstash loads
    # is the one in this repository.
    mounts = {dst: src for src, dst, *_ in (v.split(":") for v in compose_services()["logstash"]["volumes"])}
    assert any(path.startswith(dst + "/") and not src.startswith(".") for dst, src in mounts.items())
    pipelines = yaml.safe_load((REPO / "logstash" / "pipelines.yml").read_text())
    for pipeline in pipelines:
        container_path = pipeline["path.config"]
        dst = next(d for d in mounts if container_path.startswith(d + "/"))
        assert (REPO / mounts[dst] / container_path[len(dst) + 1:]).is_file(), container_path
    assert mounts["/usr/share/logstash/config/pipelines.yml"] == "./logstash/pipelines.yml"
