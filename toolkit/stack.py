"""`logwarden stack check`: is a `docker compose up` deployment (docker-compose.yml) working?
(And `logwarden stack secrets`, which fills the deployment's empty passwords in .env.)

Four questions, each answered from the running system itself, never from the compose file:

  containers  every container of the compose project is running and healthy (one-shot
              containers such as topics-init count when they exited with status 0);
  topics      logwarden's topics exist, and a logs.<host> topic for every Filebeat's host;
  consuming   every stage's consumer group (and Logstash's archive group) has active members;
              its lag is shown;
  metrics     Prometheus scrapes every running stage and every target is up.

The checks are pure functions of plain data (``Container``, ``TopicInfo``, ``GroupInfo``, the
Prometheus targets document), so they are tested without an engine; the functions that collect
that data talk to the Docker engine (the ``docker`` package), to Kafka (confluent_kafka's
AdminClient) and to Prometheus's HTTP API. Exit status 0 when every check passes, 1 otherwise;
no reachable engine is one line and status 2.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from services.security import ARCHIVE_GROUP   # noqa: F401 - stack.ARCHIVE_GROUP: the archive's group
from services.stages import ALL_STAGES
from services.settings import Settings, UsageError, load_settings

# Where the rest of the deployment names these (tests/test_compose.py keeps them in step):
METRICS_JOB = "logwarden"                # prometheus/prometheus.yml: job_name of the stages
BROKER_SERVICE = re.compile(r"^kafka(-\d+)?$")
BROKER_EXTERNAL_PORT = 9092              # the EXTERNAL listener inside a broker container
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Container:
    service: str
    name: str
    state: str                           # running | exited | restarting | created | paused | dead
    health: str | None = None            # healthy | unhealthy | starting; None: no healthcheck
    exit_code: int = 0
    restart_policy: str = "no"
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    published: dict[int, int] = field(default_factory=dict)   # container tcp port -> host port


@dataclass(frozen=True)
class TopicInfo:
    partitions: int
    replication: int


@dataclass(frozen=True)
class GroupInfo:
    state: str
    members: int
    lag: int | None = None


@dataclass(frozen=True)
class Check:
    section: str
    subject: str
    ok: bool
    detail: str


# ------------------------------------------------------------------------------------------
# Pure checks
def stage_of(command: Iterable[str]) -> str | None:
    """The stage a container runs (``logwarden run parse`` -> parse), else None."""
    args = list(command)
    for i in range(len(args) - 2):
        if os.path.basename(args[i]) == "logwarden" and args[i + 1] == "run":
            return args[i + 2]
    return None


def check_containers(containers: list[Container], project: str) -> list[Check]:
    if not containers:
        return [Check("containers", project, False,
                      f"no containers of compose project {project!r}: is it up? (docker compose ps)")]
    checks = []
    for c in sorted(containers, key=lambda c: (c.service, c.name)):
        if c.state == "running":
            if c.health in (None, "healthy"):
                checks.append(Check("containers", c.name, True, "running" + (", healthy" if c.health else "")))
            elif c.health == "starting":
                checks.append(Check("containers", c.name, False, "running, health check still starting"))
            else:
                checks.append(Check("containers", c.name, False,
                                    f"running but {c.health} (docker compose logs {c.service})"))
        elif c.state == "exited" and c.exit_code == 0 and c.restart_policy in ("no", ""):
            checks.append(Check("containers", c.name, True, "completed"))
        else:
            checks.append(Check("containers", c.name, False,
                                f"{c.state} (exit {c.exit_code}; docker compose logs {c.service})"))
    return checks


def broker_bootstrap(containers: list[Container]) -> str | None:
    """host:port of the brokers' published EXTERNAL listener, as the docker host reaches them."""
    addresses = [f"127.0.0.1:{c.published[BROKER_EXTERNAL_PORT]}" for c in containers
                 if BROKER_SERVICE.match(c.service) and c.state == "running"
                 and BROKER_EXTERNAL_PORT in c.published]
    return ",".join(sorted(addresses)) or None


def expected_host_topics(containers: list[Container]) -> list[str]:
    """logs.<host> for every Filebeat (HADOOP_HOST names the host it ships)."""
    return sorted({f"logs.{c.env['HADOOP_HOST']}" for c in containers if c.env.get("HADOOP_HOST")})


def expected_groups(containers: list[Container], settings: Settings) -> dict[str, list[str]]:
    """consumer group -> the services that should be its members."""
    groups: dict[str, list[str]] = {}
    for c in containers:
        stage = stage_of(c.command)
        stages = ALL_STAGES if stage == "all" else (stage,) if stage else ()
        for s in stages:
            groups.setdefault(settings.group(s), []).append(c.service)
        if c.service == "logstash":
            groups.setdefault(ARCHIVE_GROUP, []).append(c.service)
    return {g: sorted(set(services)) for g, services in sorted(groups.items())}


def check_topics(topics: dict[str, TopicInfo], settings: Settings, host_topics: list[str]) -> list[Check]:
    checks = []
    own = [settings.events_topic, settings.windows_topic, settings.alerts_topic,
           settings.deadletter_topic, settings.feedback_topic]
    for name in own:
        info = topics.get(name)
        checks.append(Check("topics", name, True, f"{info.partitions} partitions, replication {info.replication}")
                      if info else
                      Check("topics", name, False, "missing (created by topics-init: docker compose logs topics-init)"))
    pattern = re.compile(settings.logs_pattern)
    for name in host_topics:
        info = topics.get(name)
        if info is None:
            checks.append(Check("topics", name, False,
                                "missing: this host's Filebeat has shipped no line yet (docker compose logs filebeat-...)"))
        elif not pattern.match(name):
            checks.append(Check("topics", name, False, f"not matched by LOGS_PATTERN {settings.logs_pattern!r}: "
                                                       "the parse stage does not read it"))
        else:
            checks.append(Check("topics", name, True, f"{info.partitions} partitions, replication {info.replication}"))
    return checks


def check_groups(groups: dict[str, GroupInfo], expected: dict[str, list[str]]) -> list[Check]:
    checks = []
    for group, services in expected.items():
        info = groups.get(group)
        who = "/".join(services)
        if info is None or info.state.lower() in ("dead", "unknown"):
            checks.append(Check("consuming", group, False, f"no such consumer group: {who} has not joined"))
        elif info.members == 0:
            checks.append(Check("consuming", group, False, f"no active member ({info.state}): {who} is not consuming"))
        else:
            lag = "unknown" if info.lag is None else f"{info.lag}"
            plural = "s" if info.members != 1 else ""
            checks.append(Check("consuming", group, True, f"{info.members} member{plural}, lag {lag}"))
    return checks


def check_targets(targets: dict, stage_services: set[str]) -> list[Check]:
    """From Prometheus's /api/v1/targets: each target up, and a logwarden target per stage."""
    active = targets.get("data", {}).get("activeTargets", [])
    checks = []
    scraped_up: set[str] = set()
    for t in sorted(active, key=lambda t: (t["labels"].get("job", ""), t["labels"].get("instance", ""))):
        labels = t.get("labels", {})
        job = labels.get("job", "?")
        subject = f"{job}/{labels['service']} {labels.get('instance', '')}" if "service" in labels \
            else f"{job} {labels.get('instance', '')}"
        up = t.get("health") == "up"
        if up and job == METRICS_JOB and "service" in labels:
            scraped_up.add(labels["service"])
        checks.append(Check("metrics", subject.strip(), up,
                            "up" if up else f"{t.get('health', 'unknown')}: {t.get('lastError') or 'not scraped yet'}"))
    for service in sorted(stage_services - scraped_up):
        checks.append(Check("metrics", f"{METRICS_JOB}/{service}", False,
                            f"Prometheus has no healthy target for {service} (prometheus/prometheus.yml)"))
    if not active and not stage_services:
        checks.append(Check("metrics", "targets", False, "Prometheus has no active targets"))
    return checks


def render(checks: list[Check], headers: dict[str, str]) -> str:
    width = max((len(c.subject) for c in checks), default=10) + 2
    lines, section = [], None
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(headers.get(section, section))
        lines.append(f"  {'ok  ' if c.ok else 'FAIL'}  {c.subject:<{width}}{c.detail}")
    failed = sum(not c.ok for c in checks)
    lines.append(f"{len(checks)} checks: {len(checks) - failed} ok, {failed} failed")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Collecting the state of a running deployment
def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()).removeprefix("Error while fetching server API version: ")
    return text or type(err).__name__


def docker_containers(project: str) -> list[Container]:
    """The project's service containers (not `docker compose run` one-offs)."""
    import docker

    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=int(TIMEOUT_S))
        client.ping()
    except Exception as err:  # the SDK raises DockerException, requests' errors or OSError
        raise UsageError(f"no Docker engine reachable at {where} ({_one_line(err)})") from None
    found = client.containers.list(all=True, filters={"label": [f"com.docker.compose.project={project}",
                                                                "com.docker.compose.oneoff=False"]})
    return [_container(c) for c in found]


def _container(c) -> Container:
    attrs = c.attrs
    state = attrs.get("State", {})
    config = attrs.get("Config", {})
    published = {}
    for port, bindings in (attrs.get("NetworkSettings", {}).get("Ports") or {}).items():
        number, _, proto = port.partition("/")
        if proto == "tcp" and bindings:
            published[int(number)] = int(bindings[0]["HostPort"])
    env = dict(item.partition("=")[::2] for item in config.get("Env") or [])
    return Container(
        service=c.labels.get("com.docker.compose.service", c.name), name=c.name,
        state=state.get("Status", c.status), health=(state.get("Health") or {}).get("Status"),
        exit_code=int(state.get("ExitCode", 0)),
        restart_policy=(attrs.get("HostConfig", {}).get("RestartPolicy") or {}).get("Name", "no"),
        command=tuple(config.get("Cmd") or ()), env=env, published=published)


def kafka_state(settings: Settings, group_ids: list[str]) -> tuple[dict[str, TopicInfo], dict[str, GroupInfo]]:
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    admin = AdminClient({**settings.kafka_config(), "socket.timeout.ms": int(TIMEOUT_S * 1000)})
    metadata = admin.list_topics(timeout=TIMEOUT_S)
    topics = {name: TopicInfo(len(t.partitions), min((len(p.replicas) for p in t.partitions.values()), default=0))
              for name, t in metadata.topics.items() if t.error is None}
    groups: dict[str, GroupInfo] = {}
    if not group_ids:
        return topics, groups
    described = admin.describe_consumer_groups(group_ids, request_timeout=TIMEOUT_S)
    for group, future in described.items():
        try:
            desc = future.result()
        except Exception:
            groups[group] = GroupInfo("unknown", 0)
            continue
        committed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                                      request_timeout=TIMEOUT_S)[group].result()
        positions = {(tp.topic, tp.partition): tp.offset for tp in committed.topic_partitions or []
                     if tp.offset >= 0}
        lag = None
        if positions:
            ends = admin.list_offsets({TopicPartition(t, p): OffsetSpec.latest() for t, p in positions},
                                      request_timeout=TIMEOUT_S)
            lag = sum(max(0, future.result().offset - positions[(tp.topic, tp.partition)])
                      for tp, future in ends.items())
        state = getattr(desc.state, "name", str(desc.state))
        groups[group] = GroupInfo(state, len(desc.members or []), lag)
    return topics, groups


def prometheus_targets(url: str) -> dict:
    with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/targets?state=active", timeout=TIMEOUT_S) as resp:
        return json.load(resp)


# ------------------------------------------------------------------------------------------
def check(project: str, prometheus_url: str) -> tuple[list[Check], dict[str, str]]:
    containers = docker_containers(project)
    checks = check_containers(containers, project)
    headers = {"containers": f"containers (compose project {project})"}

    settings = load_settings()
    bootstrap = settings.kafka_bootstrap or broker_bootstrap(containers)
    expected = expected_groups(containers, settings)
    if not bootstrap:
        checks.append(Check("topics", "kafka", False, "no running broker publishes a port; "
                            "set LOGWARDEN_KAFKA_BOOTSTRAP=host:port to check an external cluster"))
    else:
        headers["topics"] = f"topics (Kafka at {bootstrap})"
        headers["consuming"] = "consumer groups (stages and the archive)"
        try:
            topics, groups = kafka_state(load_settings(kafka_bootstrap=bootstrap), list(expected))
        except Exception as err:
            checks.append(Check("topics", "kafka", False, f"cannot reach Kafka at {bootstrap}: {_one_line(err)}"))
        else:
            checks += check_topics(topics, settings, expected_host_topics(containers))
            checks += check_groups(groups, expected)

    headers["metrics"] = f"metrics (Prometheus at {prometheus_url})"
    stage_services = {c.service for c in containers if stage_of(c.command) and c.state == "running"}
    try:
        checks += check_targets(prometheus_targets(prometheus_url), stage_services)
    except (urllib.error.URLError, OSError, ValueError) as err:
        checks.append(Check("metrics", "prometheus", False, f"cannot query {prometheus_url}: {_one_line(err)}"))
    return checks, headers


# ------------------------------------------------------------------------------------------
EMPTY_PASSWORD = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*_PASSWORD)=[ \t]*$")


def fill_secrets(env_file: Path) -> list[str]:
    """Give every empty ``*_PASSWORD=`` line of ``env_file`` a random password (48 hex digits:
    no character any consumer would quote); set ones stay. Returns the names filled."""
    try:
        lines = env_file.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        raise UsageError(f"no {env_file}: run this in the directory of docker-compose.yml") from None
    filled = []
    for i, line in enumerate(lines):
        m = EMPTY_PASSWORD.match(line.rstrip("\r\n"))
        if m:
            lines[i] = f"{m['name']}={secrets.token_hex(24)}\n"
            filled.append(m["name"])
    if filled:
        fresh = env_file.with_name(env_file.name + ".new")
        fresh.write_text("".join(lines))
        fresh.chmod(0o600)                     # it holds secrets now
        fresh.replace(env_file)
    return filled


def main(args) -> int:
    if args.action == "secrets":
        filled = fill_secrets(Path(args.env_file))
        if filled:
            print(f"{args.env_file}: set {len(filled)} passwords ({', '.join(filled)}); "
                  "it holds secrets now: keep it out of version control")
        else:
            print(f"{args.env_file}: every password is already set")
        return 0
    if args.action != "check":
        raise UsageError(f"unknown action {args.action!r}")
    checks, headers = check(args.project, args.prometheus)
    print(render(checks, headers))
    return 0 if all(c.ok for c in checks) else 1
