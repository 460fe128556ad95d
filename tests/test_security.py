"""The locked-down stack on a real broker: the local broker started with SCRAM + TLS (certificates
made now by kafka/tls.sh, the script compose's certs-init runs), the users and ACLs of
services/security.py set by `security init` as the admin certificate (what topics-init does),
and the stages, the CLI and Filebeat's stand-in working as their own users, and only so."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import msgspec
import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AclBinding, AclBindingFilter, AclOperation, AclPermissionType, AdminClient, ResourcePatternType, ResourceType

from services import security, stages
from services.records import Feedback, Window, decode, encode
from services.settings import Settings, UsageError
from services.shell import Record, Reject, ensure_topics
from toolkit import localkafka, replay
from tests.kafkautil import IsolatedSettings, consume, isolated_settings, produce_values
from tests.streamutil import REPO, settings_env, wait_until
from tests.test_alerts_cli import make_alert

SECURITY_FIELDS = {"kafka_bootstrap", "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
                   "ssl_ca_location", "ssl_keystore_location", "ssl_keystore_password"}
PASSWORDS = {user: f"{user}-secret-{i}" for i, user in enumerate(security.USERS)}
HDFS_LINES = [
    "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "081109 203518 35 INFO dfs.FSNamesystem: BLOCK* NameSystem.allocateBlock: /mnt/hadoop/mapred/system/job_200811092030_0001/job.jar. blk_-1608999687919862906",
    "081109 203519 143 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_-1608999687919862906 terminating",
]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """(broker, names): a secure broker whose users and ACLs are set for one set of isolated
    topic and group names (``names``, an IsolatedSettings without credentials)."""
    try:
        broker = localkafka.start(tmp_path_factory.mktemp("secure-kafka"), die_with_parent=True, secure=True)
    except localkafka.BrokerError as err:
        pytest.fail(f"the secure test broker did not start: {err}", pytrace=False)
    try:
        names = isolated_settings(broker.bootstrap)
        admin = as_admin(broker, names)
        assert security.init(admin, PASSWORDS)["created"] > 0
        ensure_topics(admin)
        yield broker, names
    finally:
        broker.stop()


def as_admin(broker, names: IsolatedSettings) -> IsolatedSettings:
    return names.model_copy(update=broker.admin_settings().model_dump(include=SECURITY_FIELDS))


def as_user(secure, user: str, password: str | None = None, **overrides) -> IsolatedSettings:
    broker, names = secure
    login = broker.client_settings(user, PASSWORDS[user] if password is None else password, **overrides)
    return names.model_copy(update=login.model_dump(include=SECURITY_FIELDS))


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=settings_env(settings, **env),
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def produce_error(settings: Settings, topic: str) -> KafkaError | None:
    """Produce one record as ``settings``' user; the broker's answer (None: acknowledged)."""
    producer = Producer(settings.kafka_config() | {"enable.idempotence": True, "linger.ms": 0})
    answer = {}
    producer.produce(topic, b"probe", b"k", on_delivery=lambda err, msg: answer.update(err=err))
    assert producer.flush(30) == 0
    return answer["err"]


def denied(settings: Settings, topic: str) -> bool:
    err = produce_error(settings, topic)
    return err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


# --------------------------------------------------------------------------------------------
# certificates
def subject_names(cert) -> list[str]:
    out = subprocess.run(["keytool", "-printcert", "-file", str(cert)], capture_output=True, text=True, check=True)
    return sorted(line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
                  if line.strip().startswith(("DNSName:", "IPAddress:")))


@pytest.mark.slow
def test_tls_script_keeps_its_ca_and_issues_the_broker_certificate_again_for_new_names(tmp_path):
    private, public = tmp_path / "private", tmp_path / "public"

    def run(names: str) -> None:
        subprocess.run(["bash", str(localkafka.TLS_SCRIPT), str(private), str(public), names],
                       check=True, capture_output=True, text=True, timeout=300)

    run("kafka-1,localhost,127.0.0.1")
    ca, broker = (public / "ca.crt").read_bytes(), (private / "broker.p12").read_bytes()
    assert subject_names(private / "broker.crt") == ["127.0.0.1", "kafka-1", "localhost"]
    assert oct((public / "ca.crt").stat().st_mode & 0o777) == "0o644"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in private.iterdir())
    run("kafka-1,localhost,127.0.0.1")                                   # nothing to do
    assert (private / "broker.p12").read_bytes() == broker
    run("kafka-1,hadoop-gw.example,10.0.0.7")                            # a new KAFKA_EXTERNAL_HOST
    assert (public / "ca.crt").read_bytes() == ca                        # clients keep trusting it
    assert subject_names(private / "broker.crt") == ["10.0.0.7", "hadoop-gw.example", "kafka-1"]


# --------------------------------------------------------------------------------------------
# the ACL plan
def test_the_plan_grants_host_topics_by_the_literal_prefix_of_logs_pattern():
    assert security.host_topic_prefix(Settings()) == "logs."
    assert security.host_topic_prefix(Settings(logs_pattern=r"^logs\.t1a-.*")) == "logs.t1a-"
    assert security.host_topic_prefix(Settings(logs_pattern=r"^hosts-?x")) == "hosts"   # "-" is optional
    for unusable in (r"logs\..*", r"^.*", r"^(a|b)\..*"):
        with pytest.raises(UsageError, match="topic prefix"):
            security.host_topic_prefix(Settings(logs_pattern=unusable))


def test_only_the_operator_may_write_feedback_and_filebeat_only_host_topics():
    plan = security.plan(Settings())
    assert set(plan) == set(security.USERS)
    writers = {b.principal for bindings in plan.values() for b in bindings
               if b.operation == AclOperation.WRITE and b.name == Settings().feedback_topic}
    assert writers == {"User:operator"}
    assert {(b.name, b.resource_pattern_type) for b in plan["filebeat"]} == {("logs.", ResourcePatternType.PREFIXED)}
    assert all(b.permission_type == AclPermissionType.ALLOW and b.host == "*" for bs in plan.values() for b in bs)


def test_the_collector_may_only_write_and_describe_its_three_topics():
    settings = Settings()
    grants = {(b.operation, b.restype, b.resource_pattern_type, b.name) for b in security.plan(settings)["otel-collector"]}
    assert grants == {(op, ResourceType.TOPIC, ResourcePatternType.LITERAL, topic)
                      for op in (AclOperation.WRITE, AclOperation.DESCRIBE)
                      for topic in ("otlp_spans", "otlp_metrics", "otlp_logs")}
    assert security.collector_topics(settings) == ["otlp_spans", "otlp_metrics", "otlp_logs"]
    assert security.password_variable("otel-collector") == "OTEL_COLLECTOR_KAFKA_PASSWORD"


@pytest.mark.parametrize("stage", ["otlp", "assemble", "join"])
def test_a_multimodal_stage_user_gets_exactly_the_topics_its_stage_uses(stage, tmp_path):
    """Read: the stage's input topics (its StageSpec), in its group; write: what its core
    produces and dead letters; a changelog (and restore group) only for a stateful stage."""
    from services.state import changelog_topic

    s = Settings(state_dir=tmp_path)
    spec = stages.build(stage, s)
    plan = security.plan(s)[stage]

    def named(op, restype=ResourceType.TOPIC):
        return {b.name for b in plan if b.operation == op and b.restype == restype}

    changelog = {changelog_topic(s.group(stage))} if spec.stateful else set()
    outputs = {"otlp": {s.spans_topic, s.timeline_topic}, "assemble": {s.traces_topic, s.timeline_topic},
               "join": {s.chunks_topic}}[stage]
    assert named(AclOperation.READ) == set(spec.topics) | changelog
    assert named(AclOperation.WRITE) == outputs | {s.deadletter_topic} | changelog
    assert set(spec.broadcast_topics) <= outputs
    assert named(AclOperation.CREATE) == changelog
    assert named(AclOperation.READ, ResourceType.GROUP) == {s.group(stage)}
    assert s.feedback_topic not in named(AclOperation.WRITE)
    assert spec.stateful == (stage != "otlp")


# --------------------------------------------------------------------------------------------
# through the secure broker
@pytest.mark.slow
def test_stages_run_as_their_own_users_from_filebeat_records_to_windows(secure, tmp_path, tiny_deeplog):
    """Filebeat's stand-in (replay) as filebeat, parse as parse, sessions as sessions: the lines
    of one block come out as its session window, so the ACLs grant each all it needs (the
    changelog topics and restore groups included)."""
    from models import artifacts

    artifacts.publish(tiny_deeplog, tmp_path / "models", "deeplog")
    log = tmp_path / "hdfs.log"
    log.write_text("\n".join(HDFS_LINES) + "\n")
    filebeat = as_user(secure, "filebeat")
    assert replay.replay_file(filebeat, log, filebeat.host("dn1"), progress=False) == len(HDFS_LINES)

    stop = threading.Event()
    runners = [threading.Thread(target=stages.run, kwargs={"stop": stop}, args=(
        [stage], as_user(secure, stage).model_copy(update={
            "state_dir": tmp_path / stage, "idle_close_s": 1.0, "model_dir": tmp_path / "models", "device": "cpu"})))
        for stage in ("parse", "sessions")]
    for runner in runners:
        runner.start()
    try:
        admin = as_admin(*secure)

        def sessions() -> list[Window]:
            windows = [decode(m.value(), Window) for m in consume(admin, admin.windows_topic, 10**6, 1)]
            return [w for w in windows if w.kind == "session"]
        wait_until(sessions, 90, every=1, what="the block's session window")
        [session] = sessions()
        assert session.key == "blk_-1608999687919862906" and len(session.steps) == len(HDFS_LINES)
    finally:
        stop.set()
        for runner in runners:
            runner.join(60)


@pytest.mark.slow
def test_acls_deny_each_user_what_it_does_not_use(secure):
    names = secure[1]
    filebeat, parse, sessions, detect, feedback, operator = (
        as_user(secure, u) for u in ("filebeat", "parse", "sessions", "detect", "feedback", "operator"))
    assert produce_error(filebeat, names.logs_topic("dn7")) is None            # creates a new host's topic
    assert denied(filebeat, names.feedback_topic)            # feedback retrains the model: not filebeat's
    assert denied(filebeat, names.events_topic)
    assert denied(parse, names.alerts_topic) and denied(sessions, names.feedback_topic)
    assert denied(detect, names.feedback_topic) and denied(feedback, names.feedback_topic)
    assert produce_error(operator, names.feedback_topic) is None
    assert produce_error(detect, names.alerts_topic) is None
    # Reading: the sessions user may not read feedback nor join another stage's group.
    for settings, topic, group in ((sessions, names.feedback_topic, names.group("sessions")),
                                   (sessions, names.events_topic, names.group("detect"))):
        consumer = Consumer(settings.kafka_config() | {"group.id": group, "auto.offset.reset": "earliest"})
        consumer.subscribe([topic])
        try:
            errors = []
            deadline = time.monotonic() + 20
            while not errors and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is not None and msg.error():
                    errors.append(msg.error().code())
            assert errors and errors[0] in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED)
        finally:
            consumer.close()


@pytest.mark.slow
def test_wrong_credentials_or_ca_get_one_line_and_exit_2(secure, tmp_path):
    broker = secure[0]
    bad_password = cli(as_user(secure, "operator", "not-the-password"), "topics", "create")
    assert bad_password.returncode == 2 and bad_password.stdout == ""
    assert len(bad_password.stderr.strip().splitlines()) == 1, bad_password.stderr
    assert bad_password.stderr.startswith(
        f"logwarden topics: Kafka authentication failed for SCRAM-SHA-512 user 'operator' at {broker.bootstrap}")
    other_ca = tmp_path / "other"
    localkafka.make_tls(other_ca)                                          # a CA the broker's cert is not from
    wrong_ca = cli(as_user(secure, "operator", ssl_ca_location=other_ca / "ca.crt"), "topics", "create")
    assert wrong_ca.returncode == 2 and len(wrong_ca.stderr.strip().splitlines()) == 1, wrong_ca.stderr
    assert "TLS with Kafka" in wrong_ca.stderr and "certificate verify failed" in wrong_ca.stderr


@pytest.mark.slow
def test_feedback_carries_its_sender_and_the_stage_checks_the_alert_as_the_feedback_user(secure, tmp_path):
    names = secure[1]
    admin = as_admin(*secure)
    alert = make_alert(1, ["dn1"])
    produce_values(as_user(secure, "detect"), names.alerts_topic, [encode(alert)], key=alert.alert_id)

    refused = cli(as_user(secure, "filebeat"), "feedback", alert.alert_id, "--true-positive")
    assert refused.returncode == 2 and "not authorised to read" in refused.stderr, refused.stderr
    sent = cli(as_user(secure, "operator"), "feedback", alert.alert_id, "--true-positive")
    assert sent.returncode == 0, sent.stderr
    # (the topic is this module's: other tests' probes are on it too)
    [record] = [m.value() for m in consume(admin, names.feedback_topic, 10**6, timeout=5) if m.key() == alert.alert_id.encode()]
    fb = decode(record, Feedback)
    assert fb.sender == "operator"

    stage = stages.FeedbackStage(as_user(secure, "feedback").model_copy(update={"model_dir": tmp_path, "device": "cpu"}))
    try:
        assert stage.process([Record(names.feedback_topic, 0, 0, None, record, 0)]) == []
        (unknown,) = stage.process([Record(names.feedback_topic, 0, 1, None,
                                           encode(msgspec.structs.replace(fb, alert_id="0123456789abcdef")), 0)])
        assert isinstance(unknown, Reject) and unknown.reason == "unknown_alert"
    finally:
        stage.core.alerts.close()


@pytest.mark.slow
def test_security_init_sets_exactly_the_plan_and_says_which_password_is_missing(secure):
    broker, names = secure
    admin = as_admin(broker, names)
    stale = AclBinding(ResourceType.TOPIC, names.alerts_topic, ResourcePatternType.LITERAL, "User:parse", "*",
                       AclOperation.READ, AclPermissionType.ALLOW)
    client = AdminClient(admin.kafka_config())
    client.create_acls([stale])[stale].result()
    # The broker's authorizer applies the controller's metadata a moment later.
    of_parse = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, "User:parse", None,
                                AclOperation.ANY, AclPermissionType.ANY)
    wait_until(lambda: stale in client.describe_acls(of_parse).result(), 30, what="the extra ACL to show")
    again = security.init(admin, PASSWORDS)
    assert again["created"] == 0 and again["removed"] == 1

    env = {security.password_variable(u): PASSWORDS[u] for u in security.USERS}
    done = cli(admin, "security", "init", **env)
    assert done.returncode == 0, done.stderr
    assert "(0 created, 0 removed)" in done.stdout
    env.pop("OPERATOR_KAFKA_PASSWORD")
    missing = cli(admin, "security", "init", **env)
    assert missing.returncode == 2 and missing.stderr.startswith("logwarden security: set OPERATOR_KAFKA_PASSWORD")
    listed = cli(admin, "security", "acls")
    assert listed.returncode == 0
    assert f"User:operator\tWRITE\tTOPIC LITERAL {names.feedback_topic}" in listed.stdout.splitlines()


@pytest.mark.slow
def test_the_detect_stage_runs_as_detect_from_traces_to_alerts(secure, tmp_path):
    """The detect user's ACLs grant the detect stage all it needs: read traces and chunks, its
    group, changelog and restore group, write alerts and dead letters."""
    from models import artifacts
    from services.cores.score import trace_record
    from services.records import Alert, DeadLetter, encode
    from tests.test_tracelstm import fresh, train
    from tests.tracegrammar import CONCURRENT

    model = train()
    model.save(tmp_path / "tracelstm")
    artifacts.publish(tmp_path / "tracelstm", tmp_path / "models")
    broken = fresh(1, seed=41, get=False, concurrent=CONCURRENT)[0]
    broken.spans = [s for s in broken.spans if s.operation != "SELECT orders"]
    assert model.score([broken])[0].anomalous
    admin = as_admin(*secure)
    producer = Producer(admin.kafka_config() | {"enable.idempotence": True})
    producer.produce(admin.traces_topic, encode(trace_record(broken)), broken.trace_id)
    producer.produce(admin.traces_topic, b"not a trace", b"bad")
    assert producer.flush(30) == 0
    stop = threading.Event()
    settings = as_user(secure, "detect").model_copy(update={
        "state_dir": tmp_path / "detect", "model_dir": tmp_path / "models", "device": "cpu"})
    runner = threading.Thread(target=stages.run, args=(["detect"], settings), kwargs={"stop": stop})
    runner.start()
    try:
        def alerts() -> list[Alert]:
            # (the topic is this module's: test_acls_deny_each_user's probe is on it too)
            return [decode(m.value(), Alert) for m in consume(admin, admin.alerts_topic, 10**6, 1)
                    if m.value() != b"probe"]
        wait_until(lambda: any(a.key == broken.trace_id for a in alerts()), 90, every=1, what="the trace's alert")
        letters = [decode(m.value(), DeadLetter) for m in consume(admin, admin.deadletter_topic, 1, 30)]
    finally:
        stop.set()
        runner.join(60)
    assert [d.reason for d in letters if d.stage == "detect"] == ["bad_trace"]
    assert not runner.is_alive()


@pytest.mark.slow
def test_collector_spans_become_traces_with_each_stage_as_its_own_user(secure, tmp_path):
    """What compose's otel-collector writes, as its user, reaches logwarden.traces through otlp and
    assemble running as theirs (join beside them, reading the timeline): the ACLs of the
    multimodal stages grant all they need, and the collector's user nothing beyond its topics."""
    from toolkit.otlp_replay import SpanRow, span_request

    from services.records import DeadLetter, TraceRecord

    names = secure[1]
    admin = as_admin(*secure)
    created = cli(admin, "topics", "create")                 # what topics-init runs: the otlp_* topics too
    assert created.returncode == 0, created.stderr
    collector = as_user(secure, "otel-collector")
    assert denied(collector, names.spans_topic) and denied(collector, names.feedback_topic)
    assert denied(collector, names.events_topic)
    assert denied(as_user(secure, "otlp"), names.otlp_spans_topic)        # reads it, may not forge it

    t0 = 1_675_036_800 * 10**9
    traces = {f"{n:032x}": [SpanRow(f"{n:032x}", f"{n:08x}00000001", None, "ts-order-service-0", "GET /order",
                                    t0 + n * 10**9, t0 + n * 10**9 + 5 * 10**6),
                            SpanRow(f"{n:032x}", f"{n:08x}00000002", f"{n:08x}00000001", "ts-db-0", "SELECT orders",
                                    t0 + n * 10**9 + 10**6, t0 + n * 10**9 + 4 * 10**6)]
              for n in (1, 2)}
    stop = threading.Event()
    overrides = {"host_idle_s": 2.0, "watermark_grace_s": 0.5, "trace_gap_s": 1.0, "trace_lateness_s": 0.5,
                 "topic_partitions": 1, "metrics_port": 0}
    runners = [threading.Thread(target=stages.run, kwargs={"stop": stop}, daemon=True, args=(
        [stage], as_user(secure, stage).model_copy(update={"state_dir": tmp_path / stage, **overrides})))
        for stage in ("otlp", "assemble", "join")]
    for runner in runners:
        runner.start()
    try:
        for spans in traces.values():                          # one export request per trace
            produce_values(collector, names.otlp_spans_topic, [span_request(spans).SerializeToString()])
        def ours() -> list[TraceRecord]:       # (the module's traces topic has the detect test's too)
            return [decode(m.value(), TraceRecord) for m in consume(admin, admin.traces_topic, 10**6, 1)
                    if m.key() is not None and m.key().decode() in traces]
        wait_until(lambda: len(ours()) >= len(traces), 90, every=1, what="the collector's traces")
        got = ours()
        letters = consume(admin, admin.deadletter_topic, 1, timeout=2)
    finally:
        stop.set()
        for runner in runners:
            runner.join(60)
    assert {t.trace_id: {s.span_id for s in t.spans} for t in got} == {
        tid: {s.span_id for s in spans} for tid, spans in traces.items()}
    assert all(t.closed_reason == "complete" for t in got)
    assert not [d for d in (decode(m.value(), DeadLetter) for m in letters) if d.stage in ("otlp", "assemble", "join")]
    assert not any(r.is_alive() for r in runners)
