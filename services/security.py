"""Who may do what on Kafka: one SCRAM user per role and the ACLs that give it exactly the topics
and consumer groups it uses (brokers with KRaft's StandardAuthorizer deny everything else).

    filebeat   writes (and auto-creates) the host topics logs.<host>; nothing else
    logstash   reads the host topics in its archive group
    parse      host topics -> EVENTS_TOPIC            sessions  EVENTS_TOPIC -> ALERTS_TOPIC, WINDOWS_TOPIC
    otlp       OTLP_{SPANS,METRICS,LOGS}_TOPIC -> SPANS_TOPIC, TIMELINE_TOPIC (stateless)
    assemble   SPANS_TOPIC -> TRACES_TOPIC, TIMELINE_TOPIC       join  TIMELINE_TOPIC -> CHUNKS_TOPIC
    detect     TRACES_TOPIC, CHUNKS_TOPIC -> ALERTS   feedback  FEEDBACK_TOPIC (+ ALERTS_TOPIC, to check
                                                                 an alert id) -> model versions
    (each stateful stage also owns its changelog topic <group>-changelog and <group>.* groups)
    otel-collector  the OpenTelemetry Collector's Kafka exporter: writes OTLP_SPANS_TOPIC,
               OTLP_METRICS_TOPIC, OTLP_LOGS_TOPIC and nothing else (no group, no other topic: it is
               the one door for services' telemetry, so a stolen login can forge telemetry only)
    operator   the only writer of FEEDBACK_TOPIC (feedback retrains the model: an open feedback
               topic would let anyone teach it to ignore an attack); reads ALERTS_TOPIC
               (`alerts tail`, `feedback`); describes topics and groups (`stack check`)

Every stage may also write DEADLETTER_TOPIC, and every logwarden user may describe (see the
metadata of, not read) logwarden's own topics: each command checks at start that they exist.
Topics and groups are created by the admin (`logwarden security init`, then `logwarden topics
create`: docker-compose.yml's topics-init).

    logwarden security init    SCRAM credentials for every user (passwords from <USER>_KAFKA_PASSWORD)
                               and exactly the ACLs below (stale ones of these users removed)
    logwarden security acls    the ACLs for the current settings, one per line (for a cluster
                               managed by other means)
"""
from __future__ import annotations

import logging
import os

from services.state import changelog_topic
from services.settings import Settings, UsageError, load_settings

log = logging.getLogger(__name__)

ARCHIVE_GROUP = "logwarden.archive"      # logstash/pipeline/archive.conf: group_id
SCRAM_ITERATIONS = 8192
USERS = {
    "filebeat": "Filebeat on every Hadoop host",
    "logstash": "the archive",
    "parse": "the parse stage",
    "sessions": "the sessions stage (sessions and sessions-cpu): logs judged in event time",
    "otlp": "the otlp stage: the Collector's OTLP records -> spans and the per-entity timeline",
    "assemble": "the assemble stage: spans -> complete traces (+ trace samples on the timeline)",
    "join": "the join stage: the timeline -> per-entity chunks",
    "detect": "the detect stage (detect and detect-cpu): traces and chunks",
    "feedback": "the feedback stage",
    "operator": "people: `logwarden feedback`, `alerts tail`, `stack check`",
    "otel-collector": "the OpenTelemetry Collector (docker-compose.yml's otel-collector): OTLP in",
}


def collector_topics(settings: Settings) -> list[str]:
    """The topics the Collector's Kafka exporter writes (traces, metrics, logs): the otlp stage's input."""
    return [settings.otlp_spans_topic, settings.otlp_metrics_topic, settings.otlp_logs_topic]


def password_variable(user: str) -> str:
    """otel-collector -> OTEL_COLLECTOR_KAFKA_PASSWORD (a variable name has no '-')."""
    return f"{user.upper().replace('-', '_')}_KAFKA_PASSWORD"


_REGEX_SYNTAX = set(".^$*+?{}[]|()\\")


def host_topic_prefix(settings: Settings) -> str:
    """The literal start of LOGS_PATTERN (``^logs\\..*`` -> ``logs.``): ACLs match a topic
    prefix, not a regular expression, so the pattern must begin with one."""
    pattern = settings.logs_pattern
    literal, i = [], 1
    while pattern.startswith("^") and i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            literal.append(pattern[i + 1])
            i += 2
        elif char in _REGEX_SYNTAX:
            if char in "?*{" and literal:        # a quantifier makes the character before it optional
                literal.pop()
            break
        else:
            literal.append(char)
            i += 1
    if not literal:
        raise UsageError(f"LOGWARDEN_LOGS_PATTERN={pattern!r} does not start with ^ and a literal topic "
                         "prefix (e.g. ^logs\\..*): Kafka ACLs can only grant topic prefixes")
    return "".join(literal)


def plan(settings: Settings) -> dict[str, list]:
    """user -> the ALLOW bindings it gets (confluent_kafka AclBinding, any host)."""
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    s = settings
    hosts = host_topic_prefix(s)
    own_topics = [s.events_topic, s.windows_topic, s.alerts_topic, s.deadletter_topic, s.feedback_topic,
                  *s.multimodal_topics()]
    READ, WRITE, DESCRIBE, CREATE = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE, AclOperation.CREATE

    def allow(user, restype, pattern, names, *operations):
        return [AclBinding(restype, name, pattern, f"User:{user}", "*", op, AclPermissionType.ALLOW)
                for name in names for op in operations]

    def topics(user, names, *ops):
        return allow(user, ResourceType.TOPIC, ResourcePatternType.LITERAL, names, *ops)

    def host_topics(user, *ops):
        return allow(user, ResourceType.TOPIC, ResourcePatternType.PREFIXED, [hosts], *ops)

    def group(user, name, *ops, prefixed=False):
        pattern = ResourcePatternType.PREFIXED if prefixed else ResourcePatternType.LITERAL
        return allow(user, ResourceType.GROUP, pattern, [name], *ops)

    def logwarden_user(user, grants):   # every command checks at start that the own topics exist
        return topics(user, own_topics, DESCRIBE) + grants

    def changelog(user):                # its partition state (services.state), read back by any replica
        return (topics(user, [changelog_topic(s.group(user))], READ, WRITE, DESCRIBE, CREATE)
                + group(user, s.group(user), READ, prefixed=True))    # <group> and <group>.restore

    return {
        # CREATE: the first record of a new host creates its topic (auto.create.topics.enable).
        "filebeat": host_topics("filebeat", WRITE, DESCRIBE, CREATE),
        "logstash": host_topics("logstash", READ, DESCRIBE) + group("logstash", ARCHIVE_GROUP, READ),
        "parse": logwarden_user("parse", host_topics("parse", READ, DESCRIBE)
                                + topics("parse", [s.events_topic, s.deadletter_topic], WRITE)
                                + changelog("parse")),
        "sessions": logwarden_user("sessions", topics("sessions", [s.events_topic], READ)
                                   + topics("sessions", [s.windows_topic, s.alerts_topic, s.deadletter_topic], WRITE)
                                   + changelog("sessions")),
        "otlp": logwarden_user("otlp", topics("otlp", collector_topics(s), READ, DESCRIBE)
                               + topics("otlp", [s.spans_topic, s.timeline_topic, s.deadletter_topic], WRITE)
                               + group("otlp", s.group("otlp"), READ)),
        "assemble": logwarden_user("assemble", topics("assemble", [s.spans_topic], READ)
                                   + topics("assemble", [s.traces_topic, s.timeline_topic, s.deadletter_topic], WRITE)
                                   + changelog("assemble")),
        "join": logwarden_user("join", topics("join", [s.timeline_topic], READ)
                               + topics("join", [s.chunks_topic, s.deadletter_topic], WRITE)
                               + changelog("join")),
        "detect": logwarden_user("detect", topics("detect", [s.traces_topic, s.chunks_topic], READ)
                                 + topics("detect", [s.alerts_topic, s.deadletter_topic], WRITE)
                                 + changelog("detect")),
        # Its group and the alert reader's (services.feedback.AlertsOnTopic) share the prefix.
        "feedback": logwarden_user("feedback", topics("feedback", [s.feedback_topic, s.alerts_topic], READ)
                                   + topics("feedback", [s.deadletter_topic], WRITE)
                                   + group("feedback", s.group("feedback"), READ, prefixed=True)),
        "operator": logwarden_user("operator", topics("operator", [s.feedback_topic], WRITE)
                                   + topics("operator", [s.alerts_topic], READ)
                                   # the readers of `alerts tail` and `feedback` (no commits)
                                   + group("operator", f"{s.group_prefix}.alerts-tail.", READ, prefixed=True)
                                   + group("operator", f"{s.group_prefix}.feedback-cli.", READ, prefixed=True)
                                   # `stack check`: topics, groups and their lag
                                   + host_topics("operator", DESCRIBE)
                                   + group("operator", f"{s.group_prefix}.", DESCRIBE, prefixed=True)
                                   + group("operator", ARCHIVE_GROUP, DESCRIBE)),
        # Not a logwarden user: it checks no topic of ours, and topics-init creates its three
        # (no CREATE). DESCRIBE: the exporter reads their metadata (partitions, leaders).
        "otel-collector": topics("otel-collector", collector_topics(s), WRITE, DESCRIBE),
    }


def describe(binding) -> str:
    """One binding as one line: ``User:parse  READ  TOPIC PREFIXED logs.``"""
    return (f"{binding.principal}\t{binding.operation.name}\t{binding.restype.name} "
            f"{binding.resource_pattern_type.name} {binding.name}")


def passwords_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    missing = [password_variable(u) for u in USERS if not environ.get(password_variable(u))]
    if missing:
        raise UsageError(f"set {', '.join(missing)}: the SCRAM password of each logwarden Kafka user "
                         "(docker compose: `logwarden stack secrets` fills them in .env)")
    return {user: environ[password_variable(user)] for user in USERS}


def init(settings: Settings, passwords: dict[str, str], timeout: float = 30.0) -> dict[str, int]:
    """As the admin ``settings`` authenticate: set the SCRAM credentials of ``passwords``' users
    (upsert) and make those users' ACLs exactly plan(settings). Idempotent. Returns counts."""
    from confluent_kafka.admin import (AclBindingFilter, AclOperation, AclPermissionType, AdminClient,
                                       ResourcePatternType, ResourceType, ScramCredentialInfo, ScramMechanism,
                                       UserScramCredentialUpsertion)

    unknown = set(passwords) - set(USERS)
    if unknown:
        raise UsageError(f"no such logwarden Kafka user: {', '.join(sorted(unknown))}")
    admin = AdminClient(settings.kafka_config())
    upserts = [UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS),
                                            password.encode())
               for user, password in passwords.items()]
    for future in admin.alter_user_scram_credentials(upserts, request_timeout=timeout).values():
        future.result()

    wanted = {binding for bindings in plan(settings).values() for binding in bindings}
    present = set()
    for user in USERS:
        every_binding_of = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, f"User:{user}", None,
                                            AclOperation.ANY, AclPermissionType.ANY)
        present |= set(admin.describe_acls(every_binding_of, request_timeout=timeout).result())
    create, remove = wanted - present, present - wanted
    if create:
        for future in admin.create_acls(sorted(create, key=describe), request_timeout=timeout).values():
            future.result()
    if remove:
        filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal, b.host,
                                    b.operation, b.permission_type) for b in remove]
        for future in admin.delete_acls(filters, request_timeout=timeout).values():
            future.result()
    return {"users": len(passwords), "acls": len(wanted), "created": len(create), "removed": len(remove)}


def main(args) -> int:
    """`logwarden security init|acls`."""
    settings = load_settings()
    if args.action == "acls":
        for user, bindings in plan(settings).items():
            for binding in bindings:
                print(describe(binding))
        return 0
    done = init(settings, passwords_from_env())
    print(f"security: SCRAM credentials of {done['users']} users set; {done['acls']} ACLs "
          f"({done['created']} created, {done['removed']} removed)")
    return 0
