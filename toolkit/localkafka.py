"""A real single-node Apache Kafka (KRaft broker + controller) on 127.0.0.1, run from the jars
that `make kafka-jars` fetches from Maven Central into ``.cache/kafka/libs``.

Used three ways:
  * tests: ``start(tmp_dir)`` gives a fresh broker on free ports, ``Broker.stop()`` ends it;
  * ``logwarden kafka up|down|status`` (``make kafka-up`` / ``make kafka-down``): one long-lived
    broker with its data in ``.run/kafka/`` and its address in ``.run/kafka.bootstrap``;
  * nothing else: with ``LOGWARDEN_KAFKA_BOOTSTRAP`` set, logwarden talks to that cluster instead.

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
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.settings import BOOTSTRAP_FILE, REPO_ROOT, RUN_DIR, UsageError

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

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_alive(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group (a controlled shutdown takes a few seconds), SIGKILL what is
        left after ``timeout``; returns once no process of the group is alive."""
        _signal_group(self.pid, signal.SIGTERM)
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


def server_properties(data_dir: Path, port: int, controller_port: int) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        f"node.id={NODE_ID}",
        f"controller.quorum.voters={NODE_ID}@{HOST}:{controller_port}",
        f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
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


def _format_storage(java: str, libs: Path, config: Path, data_dir: Path, logs_dir: Path) -> None:
    """kafka-storage format with a fresh cluster id; skipped when the data dir is formatted."""
    if (data_dir / "data" / "meta.properties").exists():
        return
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    result = subprocess.run(
        [java, "-Xmx256m", "-XX:-UsePerfData", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
         f"-Dkafka.logs.dir={logs_dir}", "-Dkafka.log.name=storage-format",
         "-cp", f"{libs}/*", "kafka.tools.StorageTool",
         "format", "--config", str(config), f"--cluster-id={cluster_id}"],   # an id may start with "-"
        capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise BrokerError(f"kafka-storage format failed (exit {result.returncode}): "
                          f"{_tail(result.stdout + result.stderr, 5)}")


def _answers(bootstrap: str, timeout: float) -> bool:
    """True when the broker serves metadata and lists itself (it is unfenced and usable)."""
    from confluent_kafka.admin import AdminClient   # keeps `import toolkit.localkafka` light
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0,
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
          timeout: float = 120.0, libs: Path = KAFKA_LIBS, die_with_parent: bool = False) -> Broker:
    """Format (first time) and start a broker with its data, config and log under ``data_dir``;
    return once it answers an AdminClient. Ports are free loopback ports when None. Raises
    BrokerError saying why it could not (jars, java, a busy port, or the broker log's last lines).
    ``die_with_parent``: the broker is stopped by the kernel when the calling process ends
    (test sessions); leave False for a broker that outlives its starter (`kafka up`)."""
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
    config.write_text(server_properties(data_dir, port, controller_port))
    _format_storage(java, libs, config, data_dir, logs_dir)

    console = logs_dir / "jvm.out"   # JVM crashes and early errors that never reach log4j
    with open(console, "ab") as out:
        process = subprocess.Popen(
            [java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
             f"-Dkafka.logs.dir={logs_dir}", "-cp", f"{libs}/*", "kafka.Kafka", str(config)],
            cwd=data_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,   # own process group: stop() ends it all, Ctrl-C does not
            preexec_fn=exit_with_parent if die_with_parent else None)
    broker = Broker(f"{HOST}:{port}", port, controller_port, data_dir, process.pid, process)

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise BrokerError(
                f"Kafka broker exited with code {process.returncode} during start: "
                f"{_file_tail(broker.log_file, 8)} | {_file_tail(console, 4)}")
        if _accepts_tcp(port) and _answers(broker.bootstrap, 2.0):
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


def down(files: RunFiles = RunFiles()) -> bool:
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
        print("kafka: stopped" if stopped else "kafka: not running")
        return stopped


def status(files: RunFiles = RunFiles()) -> bool:
    running = _local_broker(files)
    if running is None:
        print("kafka: not running")
        return False
    answering = _answers(running.bootstrap, 3.0)
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
