"""The compose deployment (docker-compose.yml, .env, services/Dockerfile, prometheus/, grafana/,
README.md) and `logwarden stack check`, verified without a Docker engine.

The compose file is validated by a real compose implementation: `docker-compose config`
(Debian's docker-compose package, installed by `make compose-tools`, which `make test` runs).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from services import security, stages
from services.settings import Settings, UsageError
from toolkit import localkafka, stack

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "services" / "Dockerfile"
DEPLOY_DOC = REPO / "README.md"   # the "Deploy beside Hadoop" section
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
PINNED_TAG = re.compile(r"^v?\d+\.\d+(\.\d+)*([-.][\w.-]+)?$")   # 3.4.1, v3.5.0, 3.11.13-slim-bookworm
LONG_RUNNING_RESTART = {"always", "unless-stopped", "on-failure"}


# ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def dotenv() -> dict[str, str]:
    values = {}
    for line in (REPO / ".env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


@lru_cache(maxsize=1)
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err} against .env."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op and op.endswith("-"):
            return arg
        raise AssertionError(f"{name} is used in docker-compose.yml but not set in .env")
    return VAR.sub(one, value)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of every volume entry, short or long syntax."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            out.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((v.get("source", ""), v["target"], bool(v.get("read_only"))))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~", "$"))


def profiles(service: dict) -> list[str]:
    return list(service.get("profiles") or [])


def stage_services() -> dict[str, dict]:
    return {name: s for name, s in services().items() if stack.stage_of(s.get("command") or [])}


def docker_compose(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: run `make compose-tools` (Debian package docker-compose)")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------------
# A real compose implementation accepts the file
@pytest.fixture
def env_with_secrets(tmp_path) -> Path:
    """A copy of .env after `logwarden stack secrets`: what a deployment starts with."""
    copy = tmp_path / ".env"
    shutil.copy(REPO / ".env", copy)
    assert stack.fill_secrets(copy), ".env has no empty password to fill"
    return copy


@pytest.mark.parametrize("profile_set", [(), ("ha", "gpu"), ("single", "cpu"), ("operator",)])
def test_docker_compose_accepts_the_file(profile_set, env_with_secrets):
    flags = [arg for p in profile_set for arg in ("--profile", p)]
    result = docker_compose("--env-file", str(env_with_secrets), *flags, "config", "-q")
    assert result.returncode == 0, result.stderr
    # Compose only warns about an unset variable and substitutes "": that is a broken deployment.
    # (docker-compose 1.x writes "WARNING: ...", 2.x "level=warning ...".)
    assert "warn" not in result.stderr.lower(), result.stderr


def test_docker_compose_refuses_to_start_with_the_passwords_unset():
    """The repository's .env has no password: compose stops with one line saying what to run."""
    env = dotenv()
    passwords = {k: v for k, v in env.items() if k.endswith("_PASSWORD")}
    assert {"GRAFANA_ADMIN_PASSWORD"} | {security.password_variable(u) for u in security.USERS} <= set(passwords)
    assert set(passwords.values()) == {""}, "a password is committed in .env"
    result = docker_compose("config", "-q", env={k: "" for k in passwords})
    assert result.returncode != 0
    assert "run `logwarden stack secrets` to set the passwords in .env" in result.stderr


def test_stack_secrets_fills_each_empty_password_once(tmp_path, capsys):
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nA_PASSWORD=\nB_PASSWORD=kept\nUI_BIND=127.0.0.1\nC_PASSWORD= \n")
    assert stack.main(argparse.Namespace(action="secrets", env_file=str(env_file))) == 0
    assert "set 2 passwords (A_PASSWORD, C_PASSWORD)" in capsys.readouterr().out
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()[1:])
    assert values["B_PASSWORD"] == "kept" and values["UI_BIND"] == "127.0.0.1"
    assert re.fullmatch(r"[0-9a-f]{48}", values["A_PASSWORD"]) and values["A_PASSWORD"] != values["C_PASSWORD"]
    assert env_file.stat().st_mode & 0o077 == 0
    assert stack.fill_secrets(env_file) == []                  # a second run changes nothing
    with pytest.raises(UsageError, match="no .*missing"):
        stack.fill_secrets(tmp_path / "missing")


def test_docker_compose_rejects_a_broken_copy(tmp_path, env_with_secrets):
    """The validator is not a no-op: the same file with one unknown option fails."""
    broken = COMPOSE_FILE.read_text().replace("  parse:\n", "  parse:\n    no_such_option: 1\n", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = docker_compose("config", "-q", cwd=tmp_path)
    assert result.returncode != 0
    assert "no_such_option" in result.stderr


def test_compose_services_under_each_profile_set():
    """`config --services` of docker-compose 1.x lists every service whatever the profiles, so
    what a profile set starts is computed here from `profiles:` as compose defines it."""
    all_services = services()

    def started(active: set[str]) -> set[str]:
        return {n for n, s in all_services.items() if not profiles(s) or active & set(profiles(s))}

    ha_gpu, single_cpu = started({"ha", "gpu"}), started({"single", "cpu"})
    assert {"kafka-1", "kafka-2", "kafka-3", "detect"} <= ha_gpu and not {"kafka", "detect-cpu"} & ha_gpu
    assert {"kafka", "detect-cpu"} <= single_cpu and not {"kafka-1", "kafka-2", "kafka-3", "detect"} & single_cpu
    default = set(dotenv()["COMPOSE_PROFILES"].split(","))
    assert len(default & {"ha", "single"}) == 1 and len(default & {"gpu", "cpu"}) == 1, default


def test_no_service_depends_on_one_that_a_profile_can_disable():
    """Compose refuses to start a service whose dependency is in an inactive profile."""
    all_services = services()
    for name, s in all_services.items():
        for dep in (s.get("depends_on") or {}):
            assert dep in all_services, f"{name} depends on unknown service {dep}"
            assert set(profiles(all_services[dep])) <= set(profiles(s)), \
                f"{name} (profiles {profiles(s)}) depends on {dep} (profiles {profiles(all_services[dep])})"


# ------------------------------------------------------------------------------------------
# Files, images, settings
def test_every_bind_mounted_path_exists():
    env = dotenv()
    seen = 0
    for name, s in services().items():
        for source, _target, _ro in mounts(s):
            if is_bind(source):
                path = (REPO / interpolate(source, env)).resolve()
                assert path.exists(), f"{name} mounts {source}, which does not exist"
                seen += 1
    assert seen >= 5  # filebeat.yml x5 at least


def test_named_volumes_are_declared_and_hold_all_state():
    declared = set(compose().get("volumes") or {})
    used = {source for s in services().values() for source, _t, _ro in mounts(s) if not is_bind(source)}
    assert used == declared, f"undeclared {used - declared}, unused {declared - used}"
    # Nothing the deployment writes goes to a bind mount: every writable mount is a named volume.
    for name, s in services().items():
        for source, target, ro in mounts(s):
            assert not is_bind(source) or ro, f"{name} writes to the host path {source} ({target})"


def test_every_image_is_pinned_in_dotenv():
    env = dotenv()
    used_vars = set()
    for name, s in services().items():
        image = s.get("image")
        assert image, f"{name} has no image (a built service names the tag it builds)"
        m = re.fullmatch(r"\$\{([A-Z0-9_]+)\}", image)
        assert m, f"{name}: image {image!r} must be exactly ${{VAR}} with VAR set in .env"
        used_vars.add(m.group(1))
        ref = env[m.group(1)]
        repo, sep, tag = ref.rpartition(":")
        assert sep and repo and "/" not in tag, f"{name}: {ref} has no tag"
        assert tag != "latest" and PINNED_TAG.match(tag), f"{name}: {ref} is not pinned to a version"
    image_vars = {k for k in env if k.endswith("_IMAGE")}
    assert image_vars - used_vars <= {"PYTHON_IMAGE"}, f".env pins images nothing uses: {image_vars - used_vars}"
    assert PINNED_TAG.match(env["PYTHON_IMAGE"].rpartition(":")[2])


def test_logwarden_variables_are_real_settings():
    fields = {f"LOGWARDEN_{name.upper()}" for name in Settings.model_fields}
    seen = set()
    for name, s in services().items():
        for key in environment(s):
            if key.startswith("LOGWARDEN_"):
                assert key in fields, f"{name} sets {key}, which services/settings.py does not define"
                seen.add(key)
    assert {"LOGWARDEN_KAFKA_BOOTSTRAP", "LOGWARDEN_METRICS_BIND", "LOGWARDEN_DEVICE"} <= seen


def test_the_compose_settings_are_valid_values():
    env = dotenv()
    for name, s in stage_services().items():
        values = {k.removeprefix("LOGWARDEN_").lower(): interpolate(v, env)
                  for k, v in environment(s).items() if k.startswith("LOGWARDEN_")}
        settings = Settings(**values)   # raises on a bad value
        assert settings.metrics_bind == "0.0.0.0", f"{name}: Prometheus could not reach its metrics"
        # live input: a quiet spell shorter than the session gap must not end (and judge) every session
        assert settings.idle_close_s >= settings.session_gap_s, f"{name}: idle close before the session gap"
        assert settings.replication_factor == int(env["REPLICATION_FACTOR"])


ONE_SHOT = {"certs-init", "topics-init", "operator"}   # run to completion (operator: `docker compose run`)
# Long-running services whose image has nothing a healthcheck could run (no shell, no HTTP
# client): Prometheus scrapes their own metrics instead, so `up` of that job is their health.
NO_HEALTHCHECK_CLIENT = {"otel-collector": "otel-collector"}   # service -> its Prometheus job


def test_restart_policies_and_healthchecks():
    for name, s in services().items():
        if name in ONE_SHOT:
            assert s["restart"] == "no"
            continue
        assert s.get("restart") in LONG_RUNNING_RESTART, f"{name} has no restart policy"
        check = s.get("healthcheck") or {}
        if name in NO_HEALTHCHECK_CLIENT:
            jobs = {j["job_name"]: j for j in prometheus_config()["scrape_configs"]}
            targets = [t for sc in jobs[NO_HEALTHCHECK_CLIENT[name]]["static_configs"] for t in sc["targets"]]
            assert check.get("disable") and any(t.startswith(f"{name}:") for t in targets), name
            continue
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_stages_wait_for_topics_and_detect_has_both_devices():
    all_services = services()
    for name, s in stage_services().items():
        assert s["depends_on"]["topics-init"]["condition"] == "service_completed_successfully", name
    gpu, cpu = all_services["detect"], all_services["detect-cpu"]
    assert profiles(gpu) == ["gpu"] and profiles(cpu) == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert environment(gpu)["LOGWARDEN_DEVICE"] == "cuda" and environment(cpu)["LOGWARDEN_DEVICE"] == "cpu"
    assert "deploy" not in cpu


def test_every_stage_service_runs_a_stage_logwarden_has():
    """`logwarden run NAME` in compose must name a stage of services.stages (detect included: its
    services read traces and chunks with the detect user's ACLs)."""
    named = {name: stack.stage_of(s["command"]) for name, s in stage_services().items()}
    assert {"parse", "sessions", "detect", "feedback"} <= set(named.values())
    for name, stage in named.items():
        assert stage == "all" or stage in stages.STAGES, f"{name} runs unknown stage {stage!r}"
    for name in ("detect", "detect-cpu"):
        assert environment(services()[name])["LOGWARDEN_SASL_USERNAME"] == "detect"
    assert set(stages.ALL_STAGES) == set(stages.STAGES)
    from services import cli
    assert set(cli.STAGES) == set(stages.STAGES) | {"all"}, "`logwarden run` must accept every stage"


def test_hadoop_cluster_roles():
    commands = [tuple(s["command"]) for s in services().values() if s.get("image") == "${HADOOP_IMAGE}"]
    assert commands.count(("hdfs", "namenode")) == 1
    assert commands.count(("hdfs", "datanode")) >= 2
    assert commands.count(("yarn", "resourcemanager")) == 1
    assert commands.count(("yarn", "nodemanager")) >= 1
    assert dotenv()["HADOOP_IMAGE"].startswith("apache/hadoop:3.")


def test_kafka_brokers_kraft_three_voters_and_replication():
    all_services = services()
    env = dotenv()
    ha = {n: environment(all_services[n]) for n in ("kafka-1", "kafka-2", "kafka-3")}
    ids = {e["KAFKA_NODE_ID"] for e in ha.values()}
    assert ids == {"1", "2", "3"}
    for name, e in ha.items():
        assert e["KAFKA_PROCESS_ROLES"] == "broker,controller"
        voters = e["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert sorted(v.split("@")[1].split(":")[0] for v in voters) == sorted(ha)
        assert interpolate(e["KAFKA_DEFAULT_REPLICATION_FACTOR"], env) == "3"
        assert int(interpolate(e["KAFKA_MIN_INSYNC_REPLICAS"], env)) == 2
        assert interpolate(e["CLUSTER_ID"], env) == env["KAFKA_CLUSTER_ID"]
    assert len(env["KAFKA_CLUSTER_ID"]) == 22
    # The single broker answers to every name in KAFKA_BOOTSTRAP.
    single = all_services["kafka"]
    aliases = set(single["networks"]["default"]["aliases"])
    bootstrap_hosts = {h.rsplit(":", 1)[0] for h in env["KAFKA_BOOTSTRAP"].split(",")}
    assert bootstrap_hosts <= aliases
    assert environment(single)["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "1"


# ------------------------------------------------------------------------------------------
# Locked down: SASL_SSL + ACLs on every broker, a login for every client, no default password
BROKERS = ("kafka-1", "kafka-2", "kafka-3", "kafka")
IMAGE_ENV_NOT_PROPERTIES = {"KAFKA_OPTS", "KAFKA_HEAP_OPTS", "KAFKA_JMX_OPTS", "KAFKA_LOG4J_OPTS"}
REQUIRED = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):\?[^}]+\}$")   # ${NAME:?message}: no default


def unescaped(value: str) -> str:
    return value.replace("$$", "$")


def broker_properties(env: dict[str, str]) -> dict[str, str]:
    """What the apache/kafka image writes into server.properties from a broker's environment
    (its `utility render-properties`): KAFKA_A_B -> a.b, __ -> _, ___ -> -."""
    props = {}
    for key, value in env.items():
        if key.startswith("KAFKA_") and key not in IMAGE_ENV_NOT_PROPERTIES:
            name = re.sub(r"(?<=[^_])_(?=[^_])", ".", key[len("KAFKA_"):]).replace("___", "-").replace("__", "_")
            props[name.lower()] = unescaped(value)
    return props


def test_every_broker_is_locked_down_as_the_tested_local_broker_is():
    """No plaintext listener; clients on SASL_SSL, brokers and controllers on mutual TLS; the
    lockdown settings are those tests/test_security.py proves on a real broker."""
    wanted = localkafka.lockdown_properties(["INTERNAL", "EXTERNAL"])
    for name in BROKERS:
        env = environment(services()[name])
        # The image silently drops a value holding "=" (its environment parser splits on it).
        assert not [k for k, v in env.items() if "=" in unescaped(v)], name
        props = broker_properties(env)
        protocols = dict(pair.split(":") for pair in props["listener.security.protocol.map"].split(","))
        assert protocols == {"CONTROLLER": "SSL", "BROKER": "SSL", "INTERNAL": "SASL_SSL", "EXTERNAL": "SASL_SSL"}
        assert props["inter.broker.listener.name"] == "BROKER" and props["controller.listener.names"] == "CONTROLLER"
        listeners = {item.split("://")[0] for item in props["listeners"].split(",")}
        advertised = {item.split("://")[0] for item in props["advertised.listeners"].split(",")}
        assert listeners == set(protocols) and advertised == set(protocols) - {"CONTROLLER"}, name
        assert {k: props.get(k) for k in wanted} == wanted, name
        # The image reads the stores from /etc/kafka/secrets: the volume certs-init fills.
        assert ("kafka-tls", "/etc/kafka/secrets", True) in mounts(services()[name]), name
        assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PKCS12"
        assert services()[name]["depends_on"]["certs-init"]["condition"] == "service_completed_successfully"
        published = [str(p) for p in services()[name]["ports"]]
        assert [p.rsplit(":", 1)[1] for p in published] == [str(stack.BROKER_EXTERNAL_PORT)], name


def test_certs_init_names_every_address_clients_use_and_hands_the_admin_key_to_topics_init():
    certs = services()["certs-init"]
    script = certs["command"][-1]
    assert "/opt/logwarden/tls.sh /etc/kafka/secrets /etc/logwarden/kafka-ca " in script
    names = set(script.rsplit(" ", 1)[1].split(","))
    bootstrap_hosts = {h.rsplit(":", 1)[0] for h in dotenv()["KAFKA_BOOTSTRAP"].split(",")}
    # stack check reaches the published ports on 127.0.0.1; Filebeat elsewhere on KAFKA_EXTERNAL_HOST
    assert bootstrap_hosts | {"localhost", "127.0.0.1", "${KAFKA_EXTERNAL_HOST}"} <= names
    uid = re.search(r"useradd .*--uid (\d+)", DOCKERFILE.read_text()).group(1)
    assert environment(certs)["ADMIN_UID"] == uid            # the logwarden image's user reads admin.p12
    assert ("./kafka/tls.sh", "/opt/logwarden/tls.sh", True) in mounts(certs)
    init = services()["topics-init"]
    env = environment(init)
    assert env["LOGWARDEN_SECURITY_PROTOCOL"] == "SSL"
    assert env["LOGWARDEN_SSL_KEYSTORE_LOCATION"] == "/etc/kafka/secrets/admin.p12"
    assert {h.rsplit(":", 1)[1] for h in env["LOGWARDEN_KAFKA_BOOTSTRAP"].split(",")} == {"19093"}   # BROKER
    assert "logwarden security init && logwarden topics create" in init["command"][-1]
    # Everything that reads the CA or the keys waits for them.
    for name, s in services().items():
        if any(src in ("kafka-ca", "kafka-tls") for src, _t, _ro in mounts(s)) and name != "certs-init":
            deps = s.get("depends_on") or {}
            assert "certs-init" in deps or "topics-init" in deps, f"{name} may start before the certificates exist"
    for user in security.USERS:
        variable = security.password_variable(user)
        assert REQUIRED.match(env[variable])["name"] == variable, user
    # Nobody else mounts the private half: it holds the CA's and the admin's keys.
    holders = {n for n, s in services().items() for src, _t, _ro in mounts(s) if src == "kafka-tls"}
    assert holders == {"certs-init", "topics-init", *BROKERS}


def test_every_kafka_client_logs_in_as_its_own_user():
    env_of = {name: environment(s) for name, s in services().items()}
    seen = set()
    for name, s in services().items():
        env = env_of[name]
        if "LOGWARDEN_SASL_USERNAME" in env:
            user = env["LOGWARDEN_SASL_USERNAME"]
            stage = stack.stage_of(s.get("command") or [])
            assert user == (stage or "operator"), name
            assert env["LOGWARDEN_SECURITY_PROTOCOL"] == "SASL_SSL" and env["LOGWARDEN_SASL_MECHANISM"] == "SCRAM-SHA-512"
            password = env["LOGWARDEN_SASL_PASSWORD"]
        elif "KAFKA_USERNAME" in env:                            # Filebeat and Logstash
            user, password = env["KAFKA_USERNAME"], env["KAFKA_PASSWORD"]
            assert env["KAFKA_CA"] == "/etc/logwarden/kafka-ca/ca.crt"
        else:
            continue
        assert REQUIRED.match(password)["name"] == security.password_variable(user), name
        ca = env.get("LOGWARDEN_SSL_CA_LOCATION", env.get("KAFKA_CA"))
        assert any(ca.startswith(target + "/") for src, target, ro in mounts(s) if src == "kafka-ca" and ro), name
        seen.add(user)
    assert seen == set(security.USERS)
    # Every stage and every Filebeat has a login; nothing talks to Kafka without one.
    assert all("LOGWARDEN_SASL_USERNAME" in env_of[n] for n in stage_services())
    assert all("KAFKA_USERNAME" in env_of[n] for n in services() if n.startswith("filebeat-"))
    output = yaml.safe_load((REPO / "filebeat" / "filebeat.yml").read_text())["output.kafka"]
    assert output["sasl.mechanism"] == "SCRAM-SHA-512" and output["ssl.enabled"] is True
    assert output["ssl.verification_mode"] == "full"
    archive = (REPO / "logstash" / "pipeline" / "archive.conf").read_text()
    assert re.search(r'security_protocol\s*=>\s*"SASL_SSL"', archive)
    assert re.search(r'sasl_mechanism\s*=>\s*"SCRAM-SHA-512"', archive)


def test_no_password_has_a_default_and_every_ui_listens_on_ui_bind():
    for name, s in services().items():
        for key, value in environment(s).items():
            if "PASSWORD" in key:
                assert REQUIRED.match(value), f"{name}: {key}={value!r} is not a ${{VAR:?...}} from .env"
    grafana = environment(services()["grafana"])
    assert REQUIRED.match(grafana["GF_SECURITY_ADMIN_PASSWORD"])["name"] == "GRAFANA_ADMIN_PASSWORD"
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert dotenv()["UI_BIND"] == "127.0.0.1"
    uis = 0
    for name, s in services().items():
        if name in BROKERS:
            continue                                           # SASL_SSL, checked above
        for port in s.get("ports") or []:
            assert str(port).startswith("${UI_BIND}:"), f"{name} publishes {port} on every address"
            uis += 1
    assert uis == 6   # NameNode, ResourceManager, Prometheus, Grafana, the Collector's OTLP gRPC + HTTP


# ------------------------------------------------------------------------------------------
# services/Dockerfile installs the package the way the Makefile does
def _makefile_install_recipe() -> str:
    text = (REPO / "Makefile").read_text()
    m = re.search(r"^\$\(STAMP\):.*?\n((?:\t.*\n)+)", text, re.M)
    assert m, "Makefile: no $(STAMP) recipe (make install)"
    return m.group(1)


def _imports(text: str) -> set[str]:
    m = re.search(r'-c\s+"import ([^"]+)"', text)
    assert m, "no `python -c \"import ...\"` check"
    return {name.strip() for name in m.group(1).split(",")}


def _dockerfile_commands() -> list[str]:
    """Dockerfile instructions with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_installs_the_project_with_pip_like_make_install():
    recipe = _makefile_install_recipe()
    assert re.search(r"pip install (-q )?-e '\.\[dev\]'", recipe), recipe
    runs = " ".join(c for c in _dockerfile_commands() if c.startswith("RUN "))
    installs = re.findall(r"pip install ((?:-\S+ )*)(\S+)", runs)
    targets = [target for _flags, target in installs]
    # The project itself (its pyproject.toml and pinned dependencies), and nothing by name beside pip.
    assert any(t == "." or t.startswith(".[") for t in targets), targets
    assert all(t in {".", "pip"} or t.startswith(".[") for t in targets), targets
    assert "requirements" not in runs
    assert _imports(runs) == _imports(recipe)


def test_dockerfile_copies_what_pip_needs_and_dockerignore_keeps_it():
    commands = _dockerfile_commands()
    copied = [c.split()[1:-1] for c in commands if c.startswith("COPY ") and "--from" not in c]
    sources = [s for group in copied for s in group]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert "pyproject.toml" in sources
    assert packages <= set(sources), f"packages {packages} not all copied: {sources}"
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def excluded(path: str) -> bool:   # .dockerignore: the last matching pattern wins
        verdict = False
        for pattern in ignore:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
                verdict = not negate
        return verdict

    for source in sources:
        if "*" not in source:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not excluded(source), f".dockerignore excludes {source}"
    assert excluded(".venv") and excluded(".git") and excluded(".cache")


def test_dockerfile_base_is_the_pinned_python_of_pyproject():
    env = dotenv()
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert default == env["PYTHON_IMAGE"]
    assert all(c == "FROM ${PYTHON_IMAGE}" or c.startswith("FROM ${PYTHON_IMAGE} AS ")
               for c in _dockerfile_commands() if c.startswith("FROM "))
    build = services()["parse"]["build"]
    assert build["dockerfile"] == "services/Dockerfile" and build["args"]["PYTHON_IMAGE"] == "${PYTHON_IMAGE}"
    version = re.match(r"python:(\d+)\.(\d+)", env["PYTHON_IMAGE"])
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
    assert (int(version.group(1)), int(version.group(2))) >= minimum


# ------------------------------------------------------------------------------------------
# The OpenTelemetry Collector: OTLP and the Hadoop daemons' /prom in, the otlp stage's topics out
COLLECTOR_FILE = REPO / "otel" / "collector.yaml"
HADOOP_HTTP_PORT = {"hdfs namenode": 9870, "hdfs datanode": 9864, "yarn resourcemanager": 8088,
                    "yarn nodemanager": 8042}   # Hadoop 3's default web ports, where /prom is served


@lru_cache(maxsize=1)
def collector_config() -> dict:
    return yaml.safe_load(COLLECTOR_FILE.read_text())


@lru_cache(maxsize=1)
def prometheus_config() -> dict:
    return yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())


def test_collector_image_config_and_login_are_compose_s():
    collector = services()["otel-collector"]
    assert dotenv()["OTEL_COLLECTOR_IMAGE"].startswith("otel/opentelemetry-collector-contrib:")
    mounted = {target: source for source, target, ro in mounts(collector) if ro}
    [config_path] = [arg.split("=", 1)[1] for arg in collector["command"] if arg.startswith("--config=")]
    assert mounted[config_path] == "./otel/collector.yaml"
    env = environment(collector)
    assert env["KAFKA_USERNAME"] == "otel-collector"
    assert REQUIRED.match(env["KAFKA_PASSWORD"])["name"] == security.password_variable("otel-collector")
    assert mounted["/etc/logwarden/kafka-ca"] == "kafka-ca" and env["KAFKA_CA"].startswith("/etc/logwarden/kafka-ca/")
    # Its user, ACLs and topics exist before it exports.
    assert collector["depends_on"]["topics-init"]["condition"] == "service_completed_successfully"
    init_env = environment(services()["topics-init"])
    assert REQUIRED.match(init_env["OTEL_COLLECTOR_KAFKA_PASSWORD"])["name"] == "OTEL_COLLECTOR_KAFKA_PASSWORD"


def test_collector_writes_only_the_three_otlp_topics_with_scram_over_tls():
    config, settings = collector_config(), Settings()
    assert set(config["exporters"]) == {"kafka"}
    kafka = config["exporters"]["kafka"]
    topics = {signal: kafka[signal]["topic"] for signal in ("traces", "metrics", "logs")}
    assert topics == {"traces": settings.otlp_spans_topic, "metrics": settings.otlp_metrics_topic,
                      "logs": settings.otlp_logs_topic}
    assert list(topics.values()) == security.collector_topics(settings)
    assert {kafka[signal]["encoding"] for signal in topics} <= {"otlp_proto", "otlp_json"}   # what otlp reads
    # Nothing may choose another topic per record (its ACLs would refuse it: lost telemetry).
    assert not any(key.startswith("topic_from") for key in kafka)
    assert not any(key.startswith("topic_from") for signal in topics for key in kafka[signal])
    assert "topic" not in kafka and "encoding" not in kafka
    assert kafka["producer"]["allow_auto_topic_creation"] is False       # topics-init creates them
    sasl = kafka["auth"]["sasl"]
    assert sasl == {"mechanism": "SCRAM-SHA-512", "username": "${env:KAFKA_USERNAME}",
                    "password": "${env:KAFKA_PASSWORD}"}
    assert kafka["tls"] == {"ca_file": "${env:KAFKA_CA}"}                # verified TLS, compose's CA
    assert set(kafka["brokers"]) == set(dotenv()["KAFKA_BOOTSTRAP"].split(","))
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics", "logs"}
    assert all(p["exporters"] == ["kafka"] for p in pipelines.values())
    assert "prometheus" in pipelines["metrics"]["receivers"]
    assert all("otlp" in p["receivers"] for p in pipelines.values())


def test_collector_scrapes_every_hadoop_daemon_s_prom_endpoint_that_compose_enables():
    hadoop = {name: " ".join(s["command"]) for name, s in services().items() if s.get("image") == "${HADOOP_IMAGE}"}
    for name in hadoop:
        assert environment(services()[name])["CORE-SITE.XML_hadoop.prometheus.endpoint.enabled"] == "true", name
    jobs = collector_config()["receivers"]["prometheus"]["config"]["scrape_configs"]
    scraped = {}
    for job in jobs:
        assert job["metrics_path"] == "/prom", job["job_name"]
        # The job is the resource's service.name: the daemon's role.
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            host, port = target.rsplit(":", 1)
            assert hadoop[host].split()[-1] == job["job_name"], target
            scraped[host] = int(port)
        # instance (service.instance.id, the otlp stage's entity) is the bare host name
        [relabel] = job["relabel_configs"]
        assert relabel["source_labels"] == ["__address__"] and relabel["target_label"] == "instance"
        assert re.fullmatch(relabel["regex"], "datanode1:9864").group(1) == "datanode1"
        assert {"action": "labeldrop", "regex": "hostname"} in job["metric_relabel_configs"]
    assert scraped == {name: HADOOP_HTTP_PORT[command] for name, command in hadoop.items()}


def test_collector_receives_otlp_on_ui_bind_only_and_prometheus_scrapes_it():
    protocols = collector_config()["receivers"]["otlp"]["protocols"]
    ports = {int(p["endpoint"].rsplit(":", 1)[1]) for p in protocols.values()}
    assert ports == {4317, 4318}
    published = [str(p) for p in services()["otel-collector"]["ports"]]
    assert sorted(published) == sorted(f"${{UI_BIND}}:{p}:{p}" for p in ports)
    reader = collector_config()["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    jobs = {j["job_name"]: j for j in prometheus_config()["scrape_configs"]}
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == [f"otel-collector:{reader['port']}"]
    assert reader["host"] == "0.0.0.0"


def test_the_multimodal_stage_services_run_their_stages_as_their_users():
    """otlp, assemble and join run as compose services like the log stages, each as its own user."""
    for name in ("otlp", "assemble", "join"):
        s = stage_services()[name]
        assert stack.stage_of(s["command"]) == name and name in stages.STAGES
        env = environment(s)
        assert env["LOGWARDEN_SASL_USERNAME"] == name and name in security.USERS
        assert not profiles(s)                  # CPU stages: on under every profile set
        assert s["depends_on"]["topics-init"]["condition"] == "service_completed_successfully"
        assert "9400" in " ".join(s["healthcheck"]["test"])


# ------------------------------------------------------------------------------------------
# Prometheus and Grafana provisioning
def test_prometheus_config_passes_promtool():
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed: run `make prometheus` (Debian package prometheus)")
    result = subprocess.run([exe, "check", "config", str(REPO / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_stage_service_on_its_metrics_port():
    config = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == stack.METRICS_JOB)
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    ports = {sd["port"] for sd in job["dns_sd_configs"]}
    stage_names = set(stage_services())
    assert names == stage_names, f"scraped {names}, stages {stage_names}"
    assert ports == {int(environment(s)["LOGWARDEN_METRICS_PORT"]) for s in stage_services().values()}
    # Prometheus reads its config from the mounted prometheus/ directory.
    targets = {t: src for src, t, _ro in mounts(services()["prometheus"])}
    assert targets["/etc/prometheus"] == "./prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services()["prometheus"]["command"]


def test_grafana_provisioning_is_where_grafana_looks():
    grafana = services()["grafana"]
    mount = {t: src for src, t, _ro in mounts(grafana)}
    container_root = next(t for t, src in mount.items() if src == "./grafana")

    def in_repo(container_path: str) -> Path:
        assert container_path.startswith(container_root + "/"), container_path
        return REPO / "grafana" / container_path[len(container_root) + 1:]

    provisioning = in_repo(environment(grafana)["GF_PATHS_PROVISIONING"])
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    host, port = re.match(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    assert host in services() and f"{port}:{port}" in " ".join(map(str, services()[host]["ports"]))
    provider = yaml.safe_load((provisioning / "dashboards" / "logwarden.yml").read_text())["providers"][0]
    assert in_repo(provider["options"]["path"]) == REPO / "grafana" / "dashboards"


# ------------------------------------------------------------------------------------------
# README.md names only services that exist, and every service is described
def _documented_services() -> tuple[set[str], set[str]]:
    """(services in the Services table, services named in `docker compose` commands)."""
    text = DEPLOY_DOC.read_text()
    table = text.split("### Services", 1)[1].split("###", 1)[0]
    in_table = set(re.findall(r"^\| `([\w-]+)` \|", table, re.M))
    in_commands = set()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    for line in re.sub(r"\\\n\s*", " ", "\n".join(blocks)).splitlines():
        words = line.split("#", 1)[0].split()
        if words[:2] != ["docker", "compose"]:
            continue
        args = words[2:]
        in_commands |= {m.split("=")[0] for flag, m in zip(args, args[1:]) if flag == "--scale"}
        sub = next((i for i, w in enumerate(args) if w in {"up", "logs", "exec", "run", "restart", "stop"}), None)
        if sub is None:
            continue
        rest, skip = [], False
        for w in args[sub + 1:]:
            if skip:
                skip = False
            elif w in {"--scale", "-v", "-e", "--profile"}:
                skip = True
            elif not w.startswith("-"):
                rest.append(w)
        # run/exec take one service and then a command; up/logs/... take services only
        in_commands |= set(rest[:1]) if args[sub] in {"run", "exec"} else set(rest)
    return in_table, in_commands


def test_docs_name_only_existing_services_and_describe_all():
    in_table, in_commands = _documented_services()
    existing = set(services())
    assert in_commands, "no `docker compose` command found in README.md"
    assert in_commands <= existing, f"docs name services that do not exist: {in_commands - existing}"
    assert in_table == existing, f"services table: missing {existing - in_table}, unknown {in_table - existing}"


def test_docs_profiles_match_compose():
    text = DEPLOY_DOC.read_text()
    declared = {p for s in services().values() for p in profiles(s)}
    documented = set(re.findall(r"^\| `(\w+)` \|", text.split("### Profiles", 1)[1].split("###", 1)[0], re.M))
    assert documented == declared


# ------------------------------------------------------------------------------------------
# `logwarden stack check`
def test_stack_check_without_an_engine_prints_one_line(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    result = subprocess.run([sys.executable, "-m", "services.cli", "stack", "check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("logwarden stack: no Docker engine reachable at unix://")


def _container(service: str, **kw) -> stack.Container:
    kw.setdefault("name", f"logwarden-{service}-1")
    kw.setdefault("state", "running")
    kw.setdefault("restart_policy", "unless-stopped")
    return stack.Container(service=service, **kw)


def test_stack_container_checks():
    checks = {c.subject: c for c in stack.check_containers([
        _container("parse", health="healthy", command=("logwarden", "run", "parse")),
        _container("sessions", health="unhealthy"),
        _container("grafana", health="starting"),
        _container("topics-init", state="exited", exit_code=0, restart_policy="no"),
        _container("detect", state="restarting", exit_code=1),
        _container("feedback", state="exited", exit_code=0),   # a long-running stage that stopped
    ], "logwarden")}
    assert checks["logwarden-parse-1"].ok
    assert checks["logwarden-topics-init-1"].ok and checks["logwarden-topics-init-1"].detail == "completed"
    for bad in ("sessions", "grafana", "detect", "feedback"):
        assert not checks[f"logwarden-{bad}-1"].ok, bad
    assert "docker compose logs sessions" in checks["logwarden-sessions-1"].detail
    empty = stack.check_containers([], "logwarden")
    assert len(empty) == 1 and not empty[0].ok and "docker compose ps" in empty[0].detail


def test_stack_derives_brokers_topics_and_groups_from_containers():
    settings = Settings(group_prefix="logwarden")
    containers = [
        _container("kafka-1", published={9092: 29092}), _container("kafka-2", published={9092: 39092}),
        _container("kafka-3", state="exited", published={9092: 49092}),
        _container("filebeat-namenode", env={"HADOOP_HOST": "namenode"}),
        _container("filebeat-datanode1", env={"HADOOP_HOST": "datanode1"}),
        _container("parse", name="logwarden-parse-1", command=("logwarden", "run", "parse")),
        _container("parse", name="logwarden-parse-2", command=("logwarden", "run", "parse")),
        _container("detect-cpu", command=("logwarden", "run", "detect")),
        _container("logstash"),
        _container("topics-init", command=("sh", "-c", "until logwarden topics create; do sleep 5; done")),
    ]
    assert stack.broker_bootstrap(containers) == "127.0.0.1:29092,127.0.0.1:39092"
    assert stack.expected_host_topics(containers) == ["logs.datanode1", "logs.namenode"]
    assert stack.expected_groups(containers, settings) == {
        "logwarden.archive": ["logstash"], "logwarden.detect": ["detect-cpu"], "logwarden.parse": ["parse"]}
    assert stack.stage_of(["/opt/logwarden/bin/logwarden", "run", "all"]) == "all"
    assert set(stack.expected_groups([_container("all", command=("logwarden", "run", "all"))], settings)) == {
        settings.group(stage) for stage in stages.ALL_STAGES}


def test_stack_topic_and_group_checks():
    settings = Settings()
    own = [settings.events_topic, settings.windows_topic, settings.alerts_topic, settings.deadletter_topic]
    topics = {name: stack.TopicInfo(6, 3) for name in own} | {"logs.namenode": stack.TopicInfo(6, 3)}
    checks = {c.subject: c for c in stack.check_topics(topics, settings, ["logs.namenode", "logs.datanode1"])}
    assert checks[settings.events_topic].ok and checks[settings.events_topic].detail == "6 partitions, replication 3"
    assert not checks[settings.feedback_topic].ok                 # missing
    assert checks["logs.namenode"].ok and not checks["logs.datanode1"].ok
    odd = Settings(logs_pattern=r"^hostlogs\..*")
    assert not {c.subject: c for c in stack.check_topics(topics, odd, ["logs.namenode"])}["logs.namenode"].ok

    groups = {"logwarden.parse": stack.GroupInfo("STABLE", 2, 17), "logwarden.sessions": stack.GroupInfo("EMPTY", 0, 5),
              "logwarden.detect": stack.GroupInfo("DEAD", 0)}
    expected = {"logwarden.parse": ["parse"], "logwarden.sessions": ["sessions"], "logwarden.detect": ["detect"],
                "logwarden.archive": ["logstash"]}
    checks = {c.subject: c for c in stack.check_groups(groups, expected)}
    assert checks["logwarden.parse"].ok and checks["logwarden.parse"].detail == "2 members, lag 17"
    assert not checks["logwarden.sessions"].ok and "not consuming" in checks["logwarden.sessions"].detail
    assert not checks["logwarden.detect"].ok and not checks["logwarden.archive"].ok


def test_stack_metrics_checks_and_rendering():
    targets = {"status": "success", "data": {"activeTargets": [
        {"labels": {"job": "logwarden", "service": "parse", "instance": "172.18.0.9:9400"}, "health": "up"},
        {"labels": {"job": "logwarden", "service": "sessions", "instance": "172.18.0.10:9400"},
         "health": "down", "lastError": "connection refused"},
        {"labels": {"job": "prometheus", "instance": "localhost:9090"}, "health": "up"},
    ]}}
    checks = stack.check_targets(targets, {"parse", "sessions", "feedback"})
    by_subject = {c.subject: c for c in checks}
    assert by_subject["logwarden/parse 172.18.0.9:9400"].ok
    assert not by_subject["logwarden/sessions 172.18.0.10:9400"].ok
    assert "connection refused" in by_subject["logwarden/sessions 172.18.0.10:9400"].detail
    assert not by_subject["logwarden/feedback"].ok
    assert by_subject["prometheus localhost:9090"].ok
    text = stack.render(checks, {"metrics": "metrics (Prometheus at http://x:9090)"})
    assert text.splitlines()[0] == "metrics (Prometheus at http://x:9090)"
    assert text.splitlines()[-1] == f"{len(checks)} checks: 2 ok, {len(checks) - 2} failed"
    assert sum(line.lstrip().startswith("FAIL") for line in text.splitlines()) == len(checks) - 2


def test_stack_check_knows_the_deployment_names():
    """The names stack check looks for are the ones the deployment uses."""
    archive = (REPO / "logstash" / "pipeline" / "archive.conf").read_text()
    assert re.search(r'group_id\s*=>\s*"([^"]+)"', archive).group(1) == stack.ARCHIVE_GROUP
    brokers = [n for n in services() if stack.BROKER_SERVICE.match(n)]
    assert sorted(brokers) == ["kafka", "kafka-1", "kafka-2", "kafka-3"]
    for name in brokers:
        published = [str(p) for p in services()[name]["ports"]]
        assert any(p.endswith(f":{stack.BROKER_EXTERNAL_PORT}") for p in published), name
        listeners = environment(services()[name])["KAFKA_LISTENERS"]
        assert f"EXTERNAL://:{stack.BROKER_EXTERNAL_PORT}" in listeners, listeners


@pytest.mark.slow
def test_stack_reads_topics_and_group_lag_from_a_real_broker(kafka_settings):
    """The Kafka half of stack check against the real broker: topics, a consuming group with
    its lag, and a group nobody joined."""
    from confluent_kafka import Consumer

    from services.shell import ensure_topics
    from tests.kafkautil import produce_values

    settings = kafka_settings.model_copy(update={"topic_partitions": 1})
    ensure_topics(settings)
    produce_values(settings, settings.events_topic, [b"e0", b"e1", b"e2", b"e3", b"e4"])
    consumer = Consumer({**settings.kafka_config(), "group.id": settings.group("window"),
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        consumer.subscribe([settings.events_topic])
        read = []
        deadline = time.monotonic() + 30
        while len(read) < 2 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                read.append(msg)
        assert len(read) == 2
        consumer.commit(message=read[-1], asynchronous=False)

        expected = {settings.group("window"): ["window"], settings.group("detect"): ["detect"]}
        topics, groups = stack.kafka_state(settings, list(expected))
        assert topics[settings.events_topic] == stack.TopicInfo(partitions=1, replication=1)
        assert groups[settings.group("window")].members == 1
        assert groups[settings.group("window")].lag == 3
        checks = {c.subject: c for c in stack.check_groups(groups, expected)}
        assert checks[settings.group("window")].ok and checks[settings.group("window")].detail == "1 member, lag 3"
        assert not checks[settings.group("detect")].ok
        by_topic = {c.subject: c.ok for c in stack.check_topics(topics, settings, [])}
        assert all(by_topic.values()) and settings.events_topic in by_topic
    finally:
        consumer.close()


@pytest.mark.slow
def test_stack_reads_targets_from_a_real_prometheus(prometheus):
    """The metrics half against the real Prometheus: one endpoint up, one port with nothing."""
    import socket

    from prometheus_client import start_http_server

    server, _thread = start_http_server(0, addr="127.0.0.1")
    with socket.socket() as probe:             # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    live = f"127.0.0.1:{server.server_address[1]}"
    try:
        prom = prometheus([live, f"127.0.0.1:{dead}"])
        prom.wait_for("up", predicate=lambda result: len(result) == 2)
        checks = {c.subject: c for c in stack.check_targets(stack.prometheus_targets(prom.url), set())}
        assert checks[f"logwarden {live}"].ok
        assert not checks[f"logwarden 127.0.0.1:{dead}"].ok
        assert "connection refused" in checks[f"logwarden 127.0.0.1:{dead}"].detail
    finally:
        server.shutdown()
