"""A real single-node Apache Kafka (KRaft broker + controller) on 127.0.0.1, run from the jars
that `make kafka-jars` fetches from Maven Central into ``.cache/kafka/libs``.

Used three ways:
  * tests: ``start(tmp_dir)`` gives a fresh broker on free ports, ``Broker.stop()`` ends it;
  * ``logwarden kafka up|down|status`` (``make kafka-up`` / ``make kafka-down``): one long-lived
    broker with its data in ``.run/kafka/`` and its address in ``.run/kafka.bootstrap``;
  * nothing else: with ``LOGWARDEN_KAFKA_BOOTSTRAP`` set, logwarden talks to that cluster instead.

``start(..., secure=True)`` locks the broker down as docker-compose.yml's brokers are: clients on
SASL_SSL (SCRAM-SHA-512) only, the controller and inter-broker listeners on mutual TLS, every
request authorised by KRaft's StandardAuthorizer against ACLs. Its certificates are made at start
by kafka/tls.sh (keytool), the script compose's certs-init runs.

The controller quorum is static (``controller.quorum.voters``), not ``format --standalone``: a
dynamic quorum writes the controller's endpoint into the metadata log, so a restart on another
free port would no longer find its own quorum. A static voter list is read from
server.properties on every start.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.settings import BOOTSTRAP_FILE, REPO_ROOT, RUN_DIR, Settings, UsageError

KAFKA_LIBS = REPO_ROOT / ".cache" / "kafka" / "libs"
KAFKA_POM = REPO_ROOT / "kafka" / "pom.xml"
LOG4J_CONFIG = REPO_ROOT / "kafka" / "log4j2.properties"
HOST = "127.0.0.1"
NODE_ID = 1
# Ports `logwarden kafka up` tries first so the address users see stays the familiar one.
PREFERRED_PORTS = (9092, 9093)
JVM_OPTIONS = (
    "-Xmx512m", "-Xms128m",
    "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-XX:-UsePerfData",          # no hsperfdata files left in /tmp
    "-Djava.awt.headless=true",
)


class BrokerError(RuntimeError):
    """The broker could not be fetched, started or stopped; str(err) says why and what to do."""


# --------------------------------------------------------------------------------------------
# Ports and processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def broker_processes(data_dir: Path) -> list[int]:
    """Pids of live kafka.Kafka JVMs started for ``data_dir`` (used by `kafka down` when the pid
    file is gone, and by tests to prove a stop leaves nothing behind)."""
    config = str(Path(data_dir).resolve() / "server.properties")
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = _cmdline(int(entry.name))
            if "kafka.Kafka" in args and config in args and _pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------------------------
# The broker
@dataclass
class Broker:
    """A running local broker. ``stop()`` ends its whole process group and waits for it."""
    bootstrap: str
    port: int
    controller_port: int
    data_dir: Path
    pid: int
    process: subprocess.Popen | None = None   # None when adopted from the pid file
    security: Security | None = None          # set when started with secure=True

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    def client_settings(self, username: str, password: str, **overrides) -> Settings:
        """Settings of a SCRAM user on the SASL_SSL listener of a secure broker."""
        return self._secured().client_settings(self.bootstrap, username, password, **overrides)

    def admin_settings(self, **overrides) -> Settings:
        """Settings of the super user ``admin`` with its certificate on the mutual-TLS listener:
        what docker-compose.yml's topics-init uses before any SCRAM user exists."""
        return self._secured().admin_tls_settings(**overrides)

    def _secured(self) -> Security:
        if self.security is None:
            raise BrokerError("this broker was started without secure=True")
        return self.security

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group (a controlled shutdown takes a few seconds), SIGKILL what is
        left after ``timeout``; returns once no process of the group is alive."""
        self.stop_with(signal.SIGTERM, timeout)

    def stop_with(self, sig: signal.Signals, timeout: float = 30.0) -> None:
        """Send ``sig`` (SIGTERM: a controlled shutdown; SIGKILL: a crash) to the process group,
        SIGKILL what is left after ``timeout``; returns once no process of the group is alive."""
        _signal_group(self.pid, sig)
        if not self._wait_gone(timeout):
            _signal_group(self.pid, signal.SIGKILL)
            if not self._wait_gone(10.0):
                raise BrokerError(f"Kafka broker pid {self.pid} survived SIGKILL")
        # The JVM is the group leader; anything it forked dies with the group, but be sure.
        _signal_group(self.pid, signal.SIGKILL)

    def _wait_gone(self, timeout: float) -> bool:
        if self.process is not None:
            try:
                self.process.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(self.pid):
                return True
            time.sleep(0.1)
        return not _pid_alive(self.pid)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def check_jars(libs: Path = KAFKA_LIBS) -> None:
    if not (libs / ".complete").exists() or not any(libs.glob("kafka_2.13-*.jar")):
        raise BrokerError(f"Kafka jars missing in {libs}: run `make kafka-jars` "
                          "(fetches org.apache.kafka:kafka_2.13 from Maven Central)")


def fetch_jars(libs: Path = KAFKA_LIBS, pom: Path = KAFKA_POM, what: str = "Kafka") -> None:
    """What `make kafka-jars` does, for `logwarden kafka up` run without make: fetch beside the
    old jars, then swap them in (a failed fetch leaves the old ones as they were). The lab
    fetches Hadoop the same way (``pom``, ``what``)."""
    make_target = f"make {what.lower()}-jars"
    if shutil.which("mvn") is None:
        raise BrokerError(f"{what} jars missing in {libs} and Maven (mvn) is not installed: "
                          f"apt-get install maven, then run `{make_target}`")
    fresh = libs.with_name(libs.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    result = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
         f"-DoutputDirectory={fresh}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise BrokerError(f"fetching the {what} jars from Maven Central failed: "
                          + _tail(result.stdout + result.stderr, 5))
    shutil.rmtree(libs, ignore_errors=True)
    fresh.rename(libs)
    (libs / ".complete").touch()


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError("java not found: the Kafka broker needs Java 17+ "
                          "(apt-get install openjdk-17-jre-headless)")
    return java


def _tail(text: str, lines: int) -> str:
    """The last ``lines`` lines worth reading, on one line: Java stack frames left out."""
    kept = [line for line in text.strip().splitlines()
            if line.strip() and not line.lstrip().startswith(("at ", "... "))][-lines:]
    return " | ".join(kept) if kept else "(no output)"


def _file_tail(path: Path, lines: int = 15) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except FileNotFoundError:
        return f"({path} does not exist)"


# --------------------------------------------------------------------------------------------
# SCRAM + TLS
TLS_SCRIPT = REPO_ROOT / "kafka" / "tls.sh"
ADMIN_USER = "admin"      # super user: SCRAM credentials formatted into the storage, and admin.p12
BROKER_USER = "broker"    # the brokers' own certificate (controller and inter-broker connections)
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
TLS_NAMES = f"localhost,{HOST}"


def lockdown_properties(client_listeners: list[str]) -> dict[str, str]:
    """What locks a broker down, beside its listeners and key stores; docker-compose.yml's brokers
    set the same (tests/test_compose.py compares). ``client_listeners``: the SASL_SSL listeners.

    Certificates name their holder (CN=broker, CN=admin); the rule makes that User:broker. Its "."
    stands for the "=" of "CN=": the Kafka image drops an environment value that holds a "=".
    ssl.client.auth=required applies to the SSL listeners (controller, inter-broker) only: a
    broker-wide value is ignored on SASL_SSL listeners (KIP-684), where SCRAM authenticates."""
    props = {
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": f"User:{BROKER_USER};User:{ADMIN_USER}",
        "ssl.principal.mapping.rules": "RULE:^CN.([a-z0-9-]+)$/$1/,DEFAULT",
        "ssl.client.auth": "required",
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
    }
    for name in client_listeners:   # the broker's side of SCRAM: credentials come from the metadata log
        props[f"listener.name.{name.lower()}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config"] = \
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    return props


@dataclass(frozen=True)
class Security:
    """How clients reach a broker started with secure=True. ``tls_dir`` holds kafka/tls.sh's
    output (ca.crt, admin.p12 with admin.password, ...); ``tls_bootstrap`` is the mutual-TLS
    listener, where the admin certificate is accepted."""
    tls_dir: Path
    tls_bootstrap: str

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.crt"

    def password(self, name: str) -> str:
        return (self.tls_dir / f"{name}.password").read_text().strip()

    def client_settings(self, bootstrap: str, username: str, password: str, **overrides) -> Settings:
        return Settings(**{
            "kafka_bootstrap": bootstrap, "security_protocol": "SASL_SSL", "sasl_mechanism": SCRAM_MECHANISM,
            "sasl_username": username, "sasl_password": password, "ssl_ca_location": self.ca_file} | overrides)

    def admin_tls_settings(self, **overrides) -> Settings:
        return Settings(**{
            "kafka_bootstrap": self.tls_bootstrap, "security_protocol": "SSL", "ssl_ca_location": self.ca_file,
            "ssl_keystore_location": self.tls_dir / "admin.p12",
            "ssl_keystore_password": self.password("admin")} | overrides)


def make_tls(tls_dir: Path, names: str = TLS_NAMES) -> None:
    """kafka/tls.sh into one directory (its private and public halves together, for a test)."""
    if shutil.which("keytool") is None:
        raise BrokerError("keytool not found: a secure broker's certificates are made with the JDK's keytool "
                          "(apt-get install openjdk-17-jre-headless)")
    result = subprocess.run(["bash", str(TLS_SCRIPT), str(tls_dir), str(tls_dir), names],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise BrokerError(f"making the broker's certificates failed: {_tail(result.stdout + result.stderr, 3)}")


def _secure_listener_properties(security: Security, port: int, broker_port: int, controller_port: int) -> list[str]:
    stores = {
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": security.tls_dir / "broker.p12",
        "ssl.keystore.password": security.password("broker"),
        "ssl.key.password": security.password("broker"),
        "ssl.truststore.type": "PKCS12",
        "ssl.truststore.location": security.tls_dir / "truststore.p12",
        "ssl.truststore.password": security.password("truststore"),
    }
    return [
        f"listeners=EXTERNAL://{HOST}:{port},BROKER://{HOST}:{broker_port},CONTROLLER://{HOST}:{controller_port}",
        f"advertised.listeners=EXTERNAL://{HOST}:{port},BROKER://{HOST}:{broker_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=BROKER",
        "listener.security.protocol.map=CONTROLLER:SSL,BROKER:SSL,EXTERNAL:SASL_SSL",
        *(f"{k}={v}" for k, v in (lockdown_properties(["EXTERNAL"]) | stores).items()),
    ]


def server_properties(data_dir: Path, port: int, controller_port: int, *,
                      security: Security | None = None, broker_port: int | None = None) -> str:
    if security is None:
        listeners = [
            f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
            f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        ]
    else:
        listeners = _secure_listener_properties(security, port, broker_port, controller_port)
    return "\n".join([
        "process.roles=broker,controller",
        f"node.id={NODE_ID}",
        f"controller.quorum.voters={NODE_ID}@{HOST}:{controller_port}",
        *listeners,
        f"log.dirs={data_dir / 'data'}",
        "num.partitions=6",
        "auto.create.topics.enable=true",
        "delete.topic.enable=true",
        # One node: every internal topic has one replica.
        "offsets.topic.replication.factor=1",
        # Tests create hundreds of consumer groups; 50 offset partitions only slow the first one.
        "offsets.topic.num.partitions=10",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        # A group's first rebalance would otherwise wait 3 s for more members.
        "group.initial.rebalance.delay.ms=0",
        "num.network.threads=2",
        "num.io.threads=4",
        "log.retention.hours=168",
        "",
    ])


def _format_storage(java: str, libs: Path, config: Path, data_dir: Path, logs_dir: Path,
                    scram_users: dict[str, str] | None = None) -> None:
    """kafka-storage format with a fresh cluster id; skipped when the data dir is formatted.
    ``scram_users`` (name -> password) get SCRAM credentials in the first metadata, so they can
    authenticate before anyone could create a user."""
    if (data_dir / "data" / "meta.properties").exists():
        return
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    scram = [f"--add-scram={SCRAM_MECHANISM}=[name={name},password={password},iterations={SCRAM_ITERATIONS}]"
             for name, password in (scram_users or {}).items()]
    result = subprocess.run(
        [java, "-Xmx256m", "-XX:-UsePerfData", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
         f"-Dkafka.logs.dir={logs_dir}", "-Dkafka.log.name=storage-format",
         "-cp", f"{libs}/*", "kafka.tools.StorageTool",
         "format", "--config", str(config), f"--cluster-id={cluster_id}", *scram],   # an id may start with "-"
        capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise BrokerError(f"kafka-storage format failed (exit {result.returncode}): "
                          f"{_tail(result.stdout + result.stderr, 5)}")


def _answers(bootstrap: str, timeout: float, client: dict | None = None) -> bool:
    """True when the broker serves metadata and lists itself (it is unfenced and usable).
    ``client``: librdkafka settings of a client it accepts (a secure broker's admin)."""
    from confluent_kafka.admin import AdminClient   # keeps `import toolkit.localkafka` light
    admin = AdminClient({"bootstrap.servers": bootstrap, **(client or {}), "log_level": 0,
                         "socket.connection.setup.timeout.ms": max(1000, int(timeout * 1000))})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except Exception:  # noqa: BLE001 - KafkaException, timeouts: all mean "not yet"
        return False
    return NODE_ID in metadata.brokers


def exit_with_parent() -> None:
    """In the forked child: have the kernel SIGTERM the JVM when its parent dies, so a killed
    pytest run leaves no broker behind (its own session keeps it out of Ctrl-C otherwise)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(data_dir: Path, port: int | None = None, *, controller_port: int | None = None,
          timeout: float = 120.0, libs: Path = KAFKA_LIBS, die_with_parent: bool = False,
          secure: bool = False) -> Broker:
    """Format (first time) and start a broker with its data, config and log under ``data_dir``;
    return once it answers an AdminClient. Ports are free loopback ports when None. Raises
    BrokerError saying why it could not (jars, java, a busy port, or the broker log's last lines).
    ``die_with_parent``: the broker is stopped by the kernel when the calling process ends
    (test sessions); leave False for a broker that outlives its starter (`kafka up`).
    ``secure``: SASL_SSL + mutual TLS + ACLs (see the module docstring); certificates in
    ``data_dir/tls``, the SCRAM user ``admin`` formatted in with the password in
    ``tls/admin-scram.password``; Broker.client_settings / admin_settings say how to connect."""
    check_jars(libs)
    java = _java()
    data_dir = Path(data_dir).resolve()
    for wanted, what in ((port, "broker"), (controller_port, "controller")):
        if wanted is not None and not port_is_free(wanted):
            raise BrokerError(f"{what} port {HOST}:{wanted} is already in use")
    port = port or free_port()
    controller_port = controller_port or free_port()
    while controller_port == port:
        controller_port = free_port()

    logs_dir = data_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "server.properties"
    security, scram_users, broker_port = None, None, None
    if secure:
        broker_port = free_port()
        while broker_port in (port, controller_port):
            broker_port = free_port()
        make_tls(data_dir / "tls")
        security = Security(data_dir / "tls", f"{HOST}:{broker_port}")
        admin_password = data_dir / "tls" / "admin-scram.password"
        if not admin_password.exists():
            admin_password.write_text(secrets.token_hex(16) + "\n")
        scram_users = {ADMIN_USER: security.password("admin-scram")}
    config.write_text(server_properties(data_dir, port, controller_port, security=security, broker_port=broker_port))
    _format_storage(java, libs, config, data_dir, logs_dir, scram_users)

    console = logs_dir / "jvm.out"   # JVM crashes and early errors that never reach log4j
    with open(console, "ab") as out:
        process = subprocess.Popen(
            [java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
             f"-Dkafka.logs.dir={logs_dir}", "-cp", f"{libs}/*", "kafka.Kafka", str(config)],
            cwd=data_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,   # own process group: stop() ends it all, Ctrl-C does not
            preexec_fn=exit_with_parent if die_with_parent else None)
    broker = Broker(f"{HOST}:{port}", port, controller_port, data_dir, process.pid, process, security)
    # A secure broker answers only those it knows: ask as its admin.
    ready_client = security.admin_tls_settings().kafka_config() if security else {"bootstrap.servers": broker.bootstrap}

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise BrokerError(
                f"Kafka broker exited with code {process.returncode} during start: "
                f"{_file_tail(broker.log_file, 8)} | {_file_tail(console, 4)}")
        if _accepts_tcp(port) and _answers(ready_client["bootstrap.servers"], 2.0, ready_client):
            return broker
        if time.monotonic() > deadline:
            broker.stop()
            raise BrokerError(f"Kafka broker did not answer on {broker.bootstrap} within {timeout:.0f} s: "
                              f"{_file_tail(broker.log_file, 8)}")
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# `logwarden kafka up|down|status`: one broker in .run/kafka
@dataclass(frozen=True)
class RunFiles:
    """Where `kafka up` keeps its broker: ``.run/`` normally, a temporary dir in tests."""
    run_dir: Path = RUN_DIR

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "kafka"

    @property
    def bootstrap(self) -> Path:   # == settings.BOOTSTRAP_FILE for the default run dir
        return self.run_dir / BOOTSTRAP_FILE.name

    @property
    def pid(self) -> Path:
        return self.run_dir / "kafka.pid"

    @property
    def ports(self) -> Path:
        return self.data_dir / "ports.json"

    @contextlib.contextmanager
    def exclusive(self):
        """Serialises concurrent `kafka up`/`down` (parallel make invocations)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "kafka.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _local_broker(files: RunFiles) -> Broker | None:
    """The broker `kafka up` started, from the pid file, if its JVM is still alive."""
    try:
        state = json.loads(files.pid.read_text())
    except (FileNotFoundError, ValueError):
        return None
    pid = int(state["pid"])
    if not _pid_alive(pid) or "kafka.Kafka" not in _cmdline(pid):
        return None
    return Broker(state["bootstrap"], state["port"], state["controller_port"],
                  Path(state["data_dir"]), pid)


def _pick_port(previous: int | None, preferred: int, avoid: set[int]) -> int:
    for candidate in (previous, preferred):
        if candidate and candidate not in avoid and port_is_free(candidate):
            return candidate
    port = free_port()
    while port in avoid:
        port = free_port()
    return port


def up(files: RunFiles = RunFiles(), preferred_ports: tuple[int, int] = PREFERRED_PORTS) -> Broker:
    """Start the local broker unless it already answers; returns once it does."""
    with files.exclusive():
        running = _local_broker(files)
        if running is not None and _answers(running.bootstrap, 3.0):
            files.bootstrap.write_text(running.bootstrap + "\n")
            print(f"kafka: already up at {running.bootstrap}")
            return running
        if running is not None:   # alive but not answering: a hung broker; replace it
            running.stop()
        if not (KAFKA_LIBS / ".complete").exists():
            print("kafka: fetching the broker jars from Maven Central (make kafka-jars)")
            fetch_jars()
        previous = json.loads(files.ports.read_text()) if files.ports.exists() else {}
        port = _pick_port(previous.get("port"), preferred_ports[0], set())
        controller_port = _pick_port(previous.get("controller_port"), preferred_ports[1], {port})
        broker = start(files.data_dir, port, controller_port=controller_port)
        files.ports.write_text(json.dumps({"port": port, "controller_port": controller_port}))
        files.pid.write_text(json.dumps({
            "pid": broker.pid, "bootstrap": broker.bootstrap, "port": port,
            "controller_port": controller_port, "data_dir": str(broker.data_dir)}))
        files.bootstrap.write_text(broker.bootstrap + "\n")
        print(f"kafka: up at {broker.bootstrap} (data and log in {_shown(files.data_dir)})")
        return broker


def down(files: RunFiles = RunFiles(), quiet: bool = False) -> bool:
    """Stop the local broker; True when one was running. Returns when no JVM of it is left."""
    with files.exclusive():
        running = _local_broker(files)
        stopped = False
        if running is not None:
            running.stop()
            stopped = True
        # A JVM whose pid file was lost (deleted .run files, a crashed `up`) is ours too.
        for pid in broker_processes(files.data_dir):
            Broker("", 0, 0, files.data_dir, pid).stop()
            stopped = True
        files.pid.unlink(missing_ok=True)
        files.bootstrap.unlink(missing_ok=True)
        if not quiet:
            print("kafka: stopped" if stopped else "kafka: not running")
        return stopped


def status(files: RunFiles = RunFiles(), quiet: bool = False) -> bool:
    running = _local_broker(files)
    if running is None:
        if not quiet:
            print("kafka: not running")
        return False
    answering = _answers(running.bootstrap, 3.0)
    if not quiet:
        print(f"kafka: {running.bootstrap} pid {running.pid} "
              f"{'answering' if answering else 'NOT answering'} (log {_shown(running.log_file)})")
    return answering


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(REPO_ROOT))
    return str(path)


def main(args) -> int:
    """`logwarden kafka up|down|status`."""
    try:
        if args.action == "up":
            if os.environ.get("LOGWARDEN_KAFKA_BOOTSTRAP"):
                print("kafka: note: LOGWARDEN_KAFKA_BOOTSTRAP is set, so logwarden commands use that "
                      "cluster, not this local broker")
            up()
            return 0
        if args.action == "down":
            down()
            return 0
        return 0 if status() else 1
    except BrokerError as err:
        raise UsageError(str(err)) from None
