"""A real HDFS cluster on 127.0.0.1: one NameNode (``nn1``) and DataNodes (``dn1``, ``dn2``...)
as separate JVMs, run from the Apache Hadoop jars that `make hadoop-jars` fetches from Maven
Central (hadoop/pom.xml) into ``.cache/hadoop``.

Each daemon is one "host": its own configuration directory (core-site.xml, hdfs-site.xml,
log4j.properties), data directories, log4j file ``<host>.log`` (Hadoop's default layout,
``%d{ISO8601} %p %c: %m%n``) and HTTP port serving the web UI, ``/jmx``, ``/prom`` (Prometheus
text format, ``hadoop.prometheus.endpoint.enabled``) and WebHDFS. Every port is a free loopback
port, written with the pids to ``<base>/cluster.json``.

What Hadoop 3.4.1 needs to run this way on Java 17 (a probe on this machine kind):
  * the ``webapps/`` folder of the web UI is only in ``hadoop-hdfs-<v>-tests.jar`` on Maven
    Central: it is unpacked to ``.cache/hadoop/webroot`` and put on the classpath (the tests jar
    itself is not: it carries test classes);
  * WebHDFS needs ``--add-opens=java.base/java.lang=ALL-UNNAMED`` (Hadoop's own scripts pass
    the whole list in JVM_OPENS for Java 17);
  * ``dfs.namenode.safemode.extension=0``: a restarted NameNode is writable at once;
  * ``dfs.namenode.heartbeat.recheck-interval=10000`` and ``dfs.heartbeat.interval=3``: a killed
    DataNode is declared dead after ~58 s instead of ~630 s.

The lab's other choices: a 1 MiB block size (a file of a few MiB is several blocks, so the
workload makes many block sessions), replication 2, two volumes per DataNode with one failed
volume tolerated (the volume-failure fault), the directory scanner every 30 s (a deleted replica
is noticed), and a NameNode client RPC port reached through ``toolkit.lab.relay`` (the
client-traffic cut) while DataNodes use a separate service RPC port.

    create(base)          configuration, data dirs and a formatted NameNode (first time only)
    start(cluster)        relay, NameNode, DataNodes; returns once every DataNode is live
    stop(cluster)         everything it started; returns once no process of it is alive
    up() / down()         `logwarden lab up|down|status` with the cluster in .run/lab
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from services.settings import REPO_ROOT, RUN_DIR, UsageError
from toolkit.localkafka import (HOST, _cmdline, _java, _pid_alive, _signal_group, _tail, exit_with_parent,
                                fetch_jars as _fetch_with_maven, free_port)

HADOOP_VERSION = "3.4.1"                      # hadoop/pom.xml's hadoop.version
HADOOP_POM = REPO_ROOT / "hadoop" / "pom.xml"
HADOOP_CACHE = REPO_ROOT / ".cache" / "hadoop"
HADOOP_LIBS = HADOOP_CACHE / "libs"
WEB_ROOT = HADOOP_CACHE / "webroot"           # holds webapps/, unpacked from the tests jar
LAB_DIR = RUN_DIR / "lab"                     # `lab up`'s cluster

NAMENODE = "nn1"
DATANODES = ("dn1", "dn2")
VOLUMES = 2                                   # data directories per DataNode
BLOCK_SIZE = 1 << 20                          # HDFS' smallest allowed block size
# Each data directory is a disk of this size to its DataNode: dfs.datanode.du.reserved is set so
# that its free space is this less what its block pool holds, whatever else the shared disk holds
# (reserved_bytes). A volume can then be filled for real (the fill_volume fault) with this much,
# not the whole disk.
VOLUME_BYTES = 256 << 20
REPLICATION = 2
NAMENODE_CLASS = "org.apache.hadoop.hdfs.server.namenode.NameNode"
DATANODE_CLASS = "org.apache.hadoop.hdfs.server.datanode.DataNode"
JVM_OPTIONS = (
    "-Xmx256m", "-Xms64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",   # small, quick to start
    "-XX:+ExitOnOutOfMemoryError", "-XX:-UsePerfData", "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true", "-Duser.timezone=UTC",     # log lines in UTC, whatever the machine
)
# Hadoop 3.4's bin/hadoop passes these on Java 17 (hadoop-functions.sh, HADOOP-18887 era).
JVM_OPENS = tuple(f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in (
    "java.io", "java.lang", "java.lang.reflect", "java.math", "java.net", "java.nio", "java.text",
    "java.time", "java.util", "java.util.concurrent", "java.util.concurrent.atomic",
    "java.util.concurrent.locks", "java.util.regex", "java.util.zip", "sun.nio.ch", "sun.nio.cs",
    "sun.security.action", "sun.util.calendar"))
LOG4J_PROPERTIES = """\
# Hadoop's default file layout (etc/hadoop/log4j.properties, appender RFA).
log4j.rootLogger=INFO,RFA
log4j.appender.RFA=org.apache.log4j.RollingFileAppender
log4j.appender.RFA.File=${hadoop.log.dir}/${hadoop.log.file}
log4j.appender.RFA.MaxFileSize=256MB
log4j.appender.RFA.MaxBackupIndex=2
log4j.appender.RFA.layout=org.apache.log4j.PatternLayout
log4j.appender.RFA.layout.ConversionPattern=%d{ISO8601} %p %c: %m%n
# As Hadoop ships it: the audit log off, jetty and the metrics system quiet.
log4j.logger.org.apache.hadoop.hdfs.server.namenode.FSNamesystem.audit=WARN
log4j.logger.org.eclipse.jetty=WARN
log4j.logger.org.apache.hadoop.metrics2=WARN
log4j.logger.org.apache.hadoop.conf.Configuration.deprecation=WARN
"""


class LabError(RuntimeError):
    """The cluster could not be fetched, started or stopped; str(err) says why (one line)."""


# --------------------------------------------------------------------------------------------
# Jars
def check_jars() -> None:
    if not (HADOOP_LIBS / ".complete").exists() or not (WEB_ROOT / "webapps" / "hdfs").is_dir():
        raise LabError(f"Hadoop jars missing in {HADOOP_LIBS}: run `make hadoop-jars` "
                       f"(fetches org.apache.hadoop:hadoop-hdfs:{HADOOP_VERSION} from Maven Central)")


def fetch_jars() -> None:
    """Fetch the Hadoop jars with Maven, then move the tests jar out of the classpath folder and
    unpack its webapps/ into WEB_ROOT."""
    try:
        _fetch_with_maven(HADOOP_LIBS, pom=HADOOP_POM, what="Hadoop")
    except Exception as err:   # localkafka.BrokerError: same one-line reasons
        raise LabError(str(err)) from None
    tests_jars = sorted(HADOOP_LIBS.glob("hadoop-hdfs-*-tests.jar"))
    if not tests_jars:
        raise LabError(f"no hadoop-hdfs tests jar among the fetched jars in {HADOOP_LIBS}")
    shutil.rmtree(WEB_ROOT, ignore_errors=True)
    with zipfile.ZipFile(tests_jars[0]) as jar:
        jar.extractall(WEB_ROOT, [n for n in jar.namelist() if n.startswith("webapps/")])
    for jar in tests_jars:
        jar.rename(HADOOP_CACHE / jar.name)


def ensure_jars() -> None:
    try:
        check_jars()
    except LabError:
        print("lab: fetching the Hadoop jars from Maven Central (make hadoop-jars)", flush=True)
        fetch_jars()


# --------------------------------------------------------------------------------------------
# The cluster's description (cluster.json)
@dataclass
class Daemon:
    host: str                               # the lab's host name: nn1, dn1, ...
    role: str                               # "namenode" | "datanode"
    ports: dict[str, int]
    conf_dir: str
    log_dir: str
    data_dirs: list[str]
    pid: int | None = None

    @property
    def log_file(self) -> Path:
        return Path(self.log_dir) / f"{self.host}.log"

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.ports['http']}"

    def alive(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid) and DAEMON_MARK in " ".join(_cmdline(self.pid))


DAEMON_MARK = "-Dlogwarden.lab.host="        # in every lab JVM's command line, with its host


@dataclass
class Cluster:
    base: str
    version: str
    daemons: dict[str, Daemon]
    relay_port: int
    relay_pid: int | None = None
    seeded: dict = field(default_factory=dict)   # what created it (for manifests)

    @property
    def namenode(self) -> Daemon:
        return self.daemons[NAMENODE]

    @property
    def datanodes(self) -> list[Daemon]:
        return [d for d in self.daemons.values() if d.role == "datanode"]

    @property
    def file(self) -> Path:
        return Path(self.base) / "cluster.json"

    def save(self) -> None:
        doc = asdict(self)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(self.file)

    @classmethod
    def load(cls, base: str | Path) -> "Cluster":
        path = Path(base) / "cluster.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab cluster in {base} (run `make lab-up`)") from None
        except ValueError as err:
            raise LabError(f"{path}: not JSON ({err})") from None
        doc["daemons"] = {h: Daemon(**d) for h, d in doc["daemons"].items()}
        return cls(**doc)

    def webhdfs(self) -> str:
        return f"{self.namenode.http}/webhdfs/v1"


def _site(properties: dict[str, object]) -> str:
    body = "".join(f"  <property><name>{escape(k)}</name><value>{escape(str(v))}</value></property>\n"
                   for k, v in properties.items())
    return f'<?xml version="1.0"?>\n<configuration>\n{body}</configuration>\n'


def _core_site(cluster: Cluster, daemon: Daemon) -> dict[str, object]:
    return {
        # Clients (the DataNodes' WebHDFS handlers among them) reach the NameNode via the relay.
        "fs.defaultFS": f"hdfs://{HOST}:{cluster.relay_port}",
        "hadoop.tmp.dir": str(Path(cluster.base) / "tmp" / daemon.host),
        "hadoop.prometheus.endpoint.enabled": "true",
        "hadoop.http.staticuser.user": "lab",
        # A client whose NameNode link is cut gives up within seconds, not minutes.
        "ipc.client.connect.max.retries": 3,
        "ipc.client.connect.retry.interval": 1000,
        "ipc.client.connect.timeout": 5000,
        # DataNode space is recomputed often (du of the block pools), without the 60 s jitter.
        "fs.du.interval": 10000,
        "fs.getspaceused.jitterMillis": 0,
    }


def _hdfs_site(cluster: Cluster, daemon: Daemon) -> dict[str, object]:
    nn = cluster.namenode
    common = {
        "dfs.namenode.rpc-address": f"{HOST}:{nn.ports['rpc']}",
        "dfs.namenode.servicerpc-address": f"{HOST}:{nn.ports['service']}",
        "dfs.namenode.http-address": f"{HOST}:{nn.ports['http']}",
        "dfs.replication": REPLICATION,
        "dfs.blocksize": BLOCK_SIZE,
        "dfs.permissions.enabled": "false",
        "dfs.webhdfs.enabled": "true",
        "dfs.heartbeat.interval": 3,
        "dfs.namenode.heartbeat.recheck-interval": 10000,
        # With two DataNodes a pipeline cannot replace a failed one: keep writing on the rest.
        "dfs.client.block.write.replace-datanode-on-failure.enable": "false",
    }
    if daemon.role == "namenode":
        return common | {
            "dfs.namenode.name.dir": daemon.data_dirs[0],
            "dfs.namenode.safemode.extension": 0,
            "dfs.namenode.safemode.min.datanodes": 0,
            "dfs.namenode.secondary.http-address": f"{HOST}:0",    # no SecondaryNameNode here
            "dfs.namenode.datanode.registration.ip-hostname-check": "false",
            "dfs.namenode.handler.count": 10,
            "dfs.namenode.service.handler.count": 5,
        }
    return common | {
        "dfs.datanode.data.dir": ",".join(daemon.data_dirs),
        "dfs.datanode.du.reserved": reserved_bytes(daemon.data_dirs[0]),
        # Hadoop 3.4 takes a volume for a block only with 1 GiB free beyond it by default: the
        # lab's volumes are VOLUME_BYTES.
        "dfs.datanode.round-robin-volume-choosing-policy.additional-available-space": 0,
        "dfs.datanode.address": f"{HOST}:{daemon.ports['data']}",
        "dfs.datanode.http.address": f"{HOST}:{daemon.ports['http']}",
        "dfs.datanode.ipc.address": f"{HOST}:{daemon.ports['ipc']}",
        "dfs.datanode.hostname": HOST,
        "dfs.datanode.failed.volumes.tolerated": VOLUMES - 1,
        "dfs.datanode.disk.check.min.gap": "5s",
        "dfs.datanode.directoryscan.interval": 30,
        "dfs.datanode.handler.count": 5,
        "dfs.blockreport.initialDelay": 0,
    }


def create(base: str | Path, datanodes: tuple[str, ...] = DATANODES) -> Cluster:
    """Write a new cluster's configuration under ``base`` and format its NameNode; an existing
    cluster there is loaded as it is (same ports, same data)."""
    base = Path(base).resolve()
    if (base / "cluster.json").exists():
        return Cluster.load(base)
    base.mkdir(parents=True, exist_ok=True)
    used: set[int] = set()

    def port() -> int:
        while (p := free_port()) in used:
            pass
        used.add(p)
        return p

    def daemon(host: str, role: str, ports: tuple[str, ...], data_dirs: list[Path]) -> Daemon:
        return Daemon(host, role, {name: port() for name in ports}, str(base / host / "conf"),
                      str(base / host / "logs"), [str(d) for d in data_dirs])

    daemons = {NAMENODE: daemon(NAMENODE, "namenode", ("rpc", "service", "http"), [base / NAMENODE / "name"])}
    for host in datanodes:
        daemons[host] = daemon(host, "datanode", ("data", "http", "ipc"),
                               [base / host / f"data{i}" for i in range(1, VOLUMES + 1)])
    cluster = Cluster(str(base), HADOOP_VERSION, daemons, relay_port=port())
    for d in daemons.values():
        write_config(cluster, d)
        Path(d.log_dir).mkdir(parents=True, exist_ok=True)
    _format_namenode(cluster)
    cluster.save()
    return cluster


def reserved_bytes(data_dir: str) -> int:
    """dfs.datanode.du.reserved that leaves ``data_dir``'s DataNode VOLUME_BYTES free.

    The DataNode's free space is min(capacity - its use, df's available - (reserved - the disk's
    other use)), with capacity = df's size - reserved (FsVolumeImpl.getAvailable). df's size
    counts the blocks only root may use and its available does not: reserved = used + available
    - VOLUME_BYTES makes the second term VOLUME_BYTES - its use, however the rest of the shared
    disk fills or empties (while it has more than that free)."""
    path = Path(data_dir)
    while not path.exists():
        path = path.parent
    fs = os.statvfs(path)
    return max(0, (fs.f_blocks - fs.f_bfree + fs.f_bavail) * fs.f_frsize - VOLUME_BYTES)


def write_config(cluster: Cluster, daemon: Daemon) -> None:
    conf = Path(daemon.conf_dir)
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "core-site.xml").write_text(_site(_core_site(cluster, daemon)))
    (conf / "hdfs-site.xml").write_text(_site(_hdfs_site(cluster, daemon)))
    (conf / "log4j.properties").write_text(LOG4J_PROPERTIES)


def _java_command(daemon: Daemon, main_class: str, *args: str) -> list[str]:
    classpath = os.pathsep.join([daemon.conf_dir, str(WEB_ROOT), f"{HADOOP_LIBS}/*"])
    return [_java(), *JVM_OPTIONS, *JVM_OPENS, f"{DAEMON_MARK}{daemon.host}",
            f"-Dhadoop.log.dir={daemon.log_dir}", f"-Dhadoop.log.file={daemon.host}.log",
            f"-Dlog4j.configuration=file:{daemon.conf_dir}/log4j.properties",
            f"-Dhadoop.home.dir={HADOOP_CACHE}", "-Dhadoop.id.str=lab", "-Dhadoop.security.logger=INFO,NullAppender",
            "-cp", classpath, main_class, *args]


def _format_namenode(cluster: Cluster) -> None:
    nn = cluster.namenode
    if (Path(nn.data_dirs[0]) / "current" / "VERSION").exists():
        return
    command = _java_command(nn, NAMENODE_CLASS, "-format", "-nonInteractive", "-force", "-clusterid", "logwarden-lab")
    # The format run writes to its own log file, not the daemon's (whose lines are the data).
    command = [a.replace(f"-Dhadoop.log.file={nn.host}.log", "-Dhadoop.log.file=format.log") for a in command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise LabError(f"NameNode format failed (exit {result.returncode}): "
                       f"{_tail(result.stdout + result.stderr, 4)} | {_file_tail(Path(nn.log_dir) / 'format.log')}")


def _file_tail(path: Path, lines: int = 6) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except FileNotFoundError:
        return f"({path} does not exist)"


# --------------------------------------------------------------------------------------------
# Processes
def start_daemon(cluster: Cluster, host: str, die_with_parent: bool = False) -> Daemon:
    """Start one daemon's JVM (in its own process group) unless it is alive; records its pid."""
    d = cluster.daemons[host]
    if d.alive():
        return d
    main_class = NAMENODE_CLASS if d.role == "namenode" else DATANODE_CLASS
    console = Path(d.log_dir) / "jvm.out"      # JVM crashes and early errors that never reach log4j
    with open(console, "ab") as out:
        process = subprocess.Popen(
            _java_command(d, main_class), cwd=d.log_dir, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=exit_with_parent if die_with_parent else None)
    d.pid = process.pid
    cluster.save()
    return d


def _start_relay(cluster: Cluster, die_with_parent: bool) -> None:
    if cluster.relay_pid and _pid_alive(cluster.relay_pid) and "toolkit.lab.relay" in _cmdline(cluster.relay_pid):
        return
    pid_file = Path(cluster.base) / "relay.pid"
    pid_file.unlink(missing_ok=True)
    log = open(Path(cluster.base) / "relay.log", "ab")
    with log:
        process = subprocess.Popen(
            [sys.executable, "-m", "toolkit.lab.relay", str(cluster.relay_port), str(cluster.namenode.ports["rpc"]),
             str(pid_file)], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=exit_with_parent if die_with_parent else None)
    cluster.relay_pid = process.pid
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the client relay did not start: {_file_tail(Path(cluster.base) / 'relay.log')}")
        time.sleep(0.05)
    cluster.save()


def jmx(daemon: Daemon, query: str, timeout: float = 3.0) -> dict:
    """The first bean of ``/jmx?qry=<query>`` ({} when the daemon does not answer)."""
    try:
        with urllib.request.urlopen(f"{daemon.http}/jmx?qry={query}", timeout=timeout) as response:
            beans = json.loads(response.read()).get("beans", [])
    except (OSError, ValueError):
        return {}
    return beans[0] if beans else {}


def live_datanodes(cluster: Cluster) -> int:
    state = jmx(cluster.namenode, "Hadoop:service=NameNode,name=FSNamesystemState")
    return int(state.get("NumLiveDataNodes", 0)) if state.get("FSState") == "Operational" else -1


def wait_until(cluster: Cluster, live: int, timeout: float, watch: tuple[str, ...] | None = None) -> None:
    """Until the NameNode is out of safe mode with ``live`` live DataNodes; a watched daemon that
    exits meanwhile is a LabError with the end of its log."""
    watch = tuple(cluster.daemons) if watch is None else watch
    deadline = time.monotonic() + timeout
    while True:
        for host in watch:
            d = cluster.daemons[host]
            if not d.alive():
                raise LabError(f"{host} ({d.role}) exited during start: {_file_tail(d.log_file, 4)} | "
                               f"{_file_tail(Path(d.log_dir) / 'jvm.out', 3)}")
        if live_datanodes(cluster) >= live:
            return
        if time.monotonic() > deadline:
            raise LabError(f"the cluster was not ready within {timeout:.0f} s ({live_datanodes(cluster)} of {live} "
                           f"DataNodes live): {_file_tail(cluster.namenode.log_file, 4)}")
        time.sleep(0.5)


def start(cluster: Cluster, die_with_parent: bool = False, timeout: float = 180.0) -> Cluster:
    """Start the relay, the NameNode and every DataNode; return once all DataNodes are live."""
    check_jars()
    try:
        _start_relay(cluster, die_with_parent)
        start_daemon(cluster, NAMENODE, die_with_parent)
        for d in cluster.datanodes:
            start_daemon(cluster, d.host, die_with_parent)
        wait_until(cluster, len(cluster.datanodes), timeout)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop_daemon(cluster: Cluster, host: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> None:
    """End one daemon: ``sig`` to its process group (SIGTERM: Hadoop's shutdown hook runs; SIGKILL:
    a crash), SIGKILL after ``timeout``; returns once it is gone."""
    d = cluster.daemons[host]
    if d.pid is None:
        return
    _end_group(d.pid, sig, timeout)
    d.pid = None
    cluster.save()


def _end_group(pid: int, sig: signal.Signals, timeout: float) -> None:
    _signal_group(pid, signal.SIGCONT)         # a stopped (slowed) JVM cannot act on SIGTERM
    _signal_group(pid, sig)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)            # reap it when it is our child
    if _pid_alive(pid):
        raise LabError(f"process {pid} survived SIGKILL")


def stop(cluster: Cluster) -> None:
    """Stop every daemon (DataNodes first) and the relay; then end any process left that was
    started for this cluster (a lost pid file, a crashed `up`)."""
    for d in cluster.datanodes + [cluster.namenode]:
        stop_daemon(cluster, d.host)
    if cluster.relay_pid:
        _end_group(cluster.relay_pid, signal.SIGTERM, 5.0)
        cluster.relay_pid = None
        cluster.save()
    for pid in processes(cluster.base):
        _end_group(pid, signal.SIGKILL, 5.0)


def processes(base: str | Path) -> list[int]:
    """Pids of live processes started for the cluster in ``base``: its JVMs (their configuration
    is under it) and its relay (its pid file is). Tests use it to prove nothing is left."""
    base = str(Path(base).resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        args = _cmdline(int(entry.name))
        if any(a.startswith(base + os.sep) or a.startswith(f"{base}/") for a in args) and (
                any(a.startswith(DAEMON_MARK) for a in args) or "toolkit.lab.relay" in args):
            if _pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------------------------
# `logwarden lab up|down|status`
def up(base: Path = LAB_DIR) -> Cluster:
    ensure_jars()
    cluster = create(base)
    if all(d.alive() for d in cluster.daemons.values()) and live_datanodes(cluster) == len(cluster.datanodes):
        print(f"lab: already up (NameNode {cluster.namenode.http})")
        return cluster
    start(cluster)
    describe(cluster)
    return cluster


def describe(cluster: Cluster) -> None:
    for d in cluster.daemons.values():
        print(f"lab: {d.host:4} {d.role:9} pid {d.pid}  {d.http}  (/jmx, /prom)  log {_shown(d.log_file)}")
    print(f"lab: WebHDFS {cluster.webhdfs()}; fs.defaultFS hdfs://{HOST}:{cluster.relay_port} "
          f"(client relay -> NameNode RPC {cluster.namenode.ports['rpc']})")


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(REPO_ROOT))
    return str(path)


def down(base: Path = LAB_DIR) -> bool:
    if not (Path(base) / "cluster.json").exists():
        print("lab: not running")
        return False
    cluster = Cluster.load(base)
    running = any(d.alive() for d in cluster.daemons.values()) or bool(processes(base))
    stop(cluster)
    print("lab: stopped" if running else "lab: not running")
    return running


def status(base: Path = LAB_DIR) -> bool:
    try:
        cluster = Cluster.load(base)
    except LabError:
        print("lab: not running")
        return False
    for d in cluster.daemons.values():
        print(f"lab: {d.host:4} {d.role:9} {'up, pid ' + str(d.pid) if d.alive() else 'DOWN'}  {d.http}")
    live = live_datanodes(cluster)
    print(f"lab: NameNode {'in safe mode or not answering' if live < 0 else f'reports {live} live DataNodes'}")
    return live == len(cluster.datanodes)


def main(args) -> int:
    """`logwarden lab up|down|status|fetch`."""
    try:
        if args.action == "up":
            up()
        elif args.action == "down":
            down()
        elif args.action == "fetch":
            fetch_jars()
        else:
            return 0 if status() else 1
    except LabError as err:
        raise UsageError(str(err)) from None
    return 0
