"""One settings model for every stage and command. Environment variables with the prefix
``LOGWARDEN_`` (e.g. ``LOGWARDEN_KAFKA_BOOTSTRAP``); README's settings table lists them all.

A bad value must stop a stage at start with one clear line, never a traceback: use
:func:`load_settings`, which turns pydantic's ValidationError into :class:`SettingsError`.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:                                   # the core imports nothing of the settings
    from services.cores.sessions import SessionConfig

# Where `make kafka-up` (toolkit.localkafka) writes the bootstrap address of the local broker.
REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = REPO_ROOT / ".run"
BOOTSTRAP_FILE = RUN_DIR / "kafka.bootstrap"


class SettingsError(ValueError):
    """A setting has a bad value; str(err) is one line meant for the operator."""


class _OncePerMinute(logging.Filter):
    """librdkafka logs a refused connection or login again at every retry, a few times a second:
    let the first of each message through (its "(after 12ms in state X)" tail aside), then say it
    again at most once a minute."""
    _TIMING = re.compile(r" \(after \d+ms in state \w+\)|\d+ms|#\d+")

    def __init__(self, every_s: float = 60.0):
        super().__init__()
        self.every_s, self.last_said = every_s, {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = self._TIMING.sub("", record.getMessage())
        now = time.monotonic()
        if now - self.last_said.get(key, -self.every_s) < self.every_s:
            return False
        if len(self.last_said) > 1000:      # bounded: a long-running stage sees many messages
            self.last_said.clear()
        self.last_said[key] = now
        return True


# Every client made from Settings.kafka_config() logs through this logger, not straight to stderr.
# The CLI silences it for one-shot commands (their failures are one line, services.diagnose).
RDKAFKA_LOG = logging.getLogger("logwarden.rdkafka")
RDKAFKA_LOG.addFilter(_OncePerMinute())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOGWARDEN_", extra="ignore", frozen=True)

    # --- Kafka -----------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        None, description="host:port[,host:port]; unset: the local broker in .run/kafka.bootstrap")
    logs_pattern: str = Field(r"^logs\..*", description="regex of the host topics Filebeat writes")
    events_topic: str = Field("logwarden.events", description="parsed events, keyed by session key")
    windows_topic: str = Field("logwarden.windows", description="sliding, session and time windows")
    alerts_topic: str = Field("logwarden.alerts", description="alerts, keyed by alert id")
    deadletter_topic: str = Field("logwarden.deadletter", description="records a stage could not process")
    feedback_topic: str = Field("logwarden.feedback", description="operator verdicts on alerts")
    # Traces and metrics as the OpenTelemetry Collector's Kafka exporter writes them, and what
    # logwarden makes of them (services/stages.py has the whole dataflow).
    otlp_spans_topic: str = Field("otlp_spans", description="the Collector's spans (otlp_proto or otlp_json)")
    otlp_metrics_topic: str = Field("otlp_metrics", description="the Collector's metrics")
    otlp_logs_topic: str = Field("otlp_logs", description="the Collector's logs (parsed like Filebeat's lines)")
    spans_topic: str = Field("logwarden.spans", description="decoded spans, keyed by trace id")
    traces_topic: str = Field("logwarden.traces", description="complete traces, keyed by trace id")
    timeline_topic: str = Field("logwarden.timeline", description="per-entity, per-step metrics, span and log summaries, keyed by entity")
    chunks_topic: str = Field("logwarden.chunks", description="per-entity time-window chunks of every modality, keyed by entity")
    group_prefix: str = Field("logwarden", description="consumer group = <prefix>.<stage>")
    instance_id: str | None = Field(
        None, description="static group membership (stages with fixed topics): a restarted stage "
                          "with the same id gets its partitions back at once instead of after the session timeout")
    topic_partitions: int = Field(6, ge=1, description="partitions of the topics logwarden creates")
    replication_factor: int = Field(1, ge=1, description="replication of the topics logwarden creates")
    # Security, passed through to librdkafka unchanged.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (passed to librdkafka)")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] | None = Field(
        None, description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, GSSAPI or OAUTHBEARER")
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = Field(None, description="CA certificate file")
    ssl_certificate_location: Path | None = Field(None, description="client certificate file")
    ssl_key_location: Path | None = Field(None, description="client key file")
    ssl_key_password: SecretStr | None = None
    ssl_keystore_location: Path | None = Field(
        None, description="client certificate and key as one PKCS#12 file (instead of the two above)")
    ssl_keystore_password: SecretStr | None = None

    # --- parse / window ----------------------------------------------------------------------
    parse_config: Path | None = Field(
        None, description="YAML with masking rules and session-key extractors; unset: built-in HDFS defaults")
    template_catalog: Path | None = Field(
        None, description="CSV EventId,EventTemplate of known templates (e.g. loghub HDFS E1..E30)")
    native_parse: bool = Field(
        True, description="parse lines of shapes already seen on the compiled hot path (logwarden-native, built by make install where cargo is); the Python path stays the reference")
    freeze_templates: bool = Field(
        False, description="lines matching no catalog template get template id 'unknown' (not mined)")
    max_line_bytes: int = Field(65536, ge=64, description="longer lines go to the dead-letter topic")
    max_line_tokens: int = Field(4096, ge=16, description="lines with more whitespace-separated tokens go to the dead-letter topic")
    max_message_bytes: int = Field(1_000_000, ge=16_384, description="largest record a stage produces (the broker's message.max.bytes or less); a larger output is dead-lettered")
    consumer_queue_mb: int = Field(32, ge=1, description="a stage's prefetched input at most (librdkafka queued.max.messages.kbytes)")
    producer_queue_mb: int = Field(64, ge=1, description="a stage's unacknowledged output at most (queue.buffering.max.kbytes); full: the stage waits")
    window_size: int = Field(10, ge=1, description="h: events before the newest one in a sliding window (its context)")
    session_gap_s: float = Field(600.0, gt=0, description="event-time inactivity that closes a session")
    session_max_events: int = Field(5000, ge=1, description="a session this long is closed; it was cut, not ended, so its end is not judged")
    idle_close_s: float = Field(5.0, gt=0, description="no input for this long closes every open session")
    allowed_lateness_s: float = Field(
        2.0, ge=0, description="event-time disorder tolerated: an event is judged once every active host's log has passed its time by this much")
    host_idle_s: float = Field(30.0, gt=0, description="a source (a host's logs-topic partition) silent this long (wall clock) no longer holds the watermark back")
    # Longer than a shipper's normal silence: Filebeat checks a quiet file again only after its
    # backoff (backoff.max, 10 s by default), so a host can be silent 10 s and then send lines of
    # those 10 s; called idle sooner, those lines would come after the watermark (late).
    source_idle_s: float = Field(15.0, gt=0, description="parse reports a source idle once it has had no line for this long (its position at the end); more than Filebeat's backoff.max (10 s)")
    outage_grace_s: float = Field(15.0, ge=0, description="after a broker outage, parse calls no source idle for this long (shippers reconnect with backoff)")
    watermark_grace_s: float = Field(2.0, ge=0, description="after a partition is assigned (or restored) its watermark waits this long (wall clock) for every host to show up")
    reorder_max_events: int = Field(100_000, ge=1, description="events a partition holds for reordering; past it the oldest are judged early")
    max_open_sessions: int = Field(500_000, ge=1, description="open sessions per input partition; past it the least recently active is closed (evicted; its end is not judged)")
    sliding_windows: bool = Field(False, description="also publish a sliding window (the newest event and the h before it) per event, for subscribers")
    time_window_s: float = Field(60.0, gt=0, description="width of per-host time windows (no session key)")
    state_dir: Path = Field(Path(".run/state"), description="checkpoints of parser and window state")

    # --- traces and chunks (assemble, join) ----------------------------------------------
    trace_gap_s: float = Field(10.0, gt=0, description="event time with no span of a trace, after its root span ended, that closes it")
    trace_root_wait_s: float = Field(300.0, gt=0, description="event time a trace without a root span waits for one after its last span (then closed as 'gap')")
    trace_lateness_s: float = Field(2.0, ge=0, description="span-end disorder tolerated within one upstream partition of the spans topic")
    max_open_traces: int = Field(100_000, ge=1, description="open traces per spans-topic partition; past it the least recently active is closed (evicted)")
    step_s: float = Field(60.0, gt=0, description="time step of the per-entity timeline and chunks (models.chunks' step_s)")
    chunk_steps: int = Field(10, ge=1, description="steps per chunk: the judged step and the ones before it")
    metric_window_s: float = Field(60.0, ge=0, description="the interval a metric sample summarises, ending at its time (it goes to the step of the interval's middle)")
    chunk_lateness_s: float = Field(5.0, ge=0, description="a step is cut into chunks once every timeline source has passed its end by this much")

    # --- detect --------------------------------------------------------------------------
    model_dir: Path = Field(Path("artifacts/models"), description="model versions: <dir>/<detector>/<version>/")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto, cpu or cuda (auto: CUDA when torch finds a GPU)")
    detect_batch: int = Field(256, ge=1, description="windows scored per batch")
    reload_check_s: float = Field(5.0, gt=0, description="how often the worker looks for a newer model")
    feedback_alert_ids: int = Field(
        100_000, ge=1, description="alerts the feedback stage remembers to check feedback against "
                                   "(feedback on an older alert is refused)")

    # --- metrics -------------------------------------------------------------------------
    metrics_bind: str = Field("127.0.0.1", description="address of the /metrics endpoint")
    metrics_port: int = Field(9400, ge=0, le=65535, description="0 picks a free port and logs it")

    @field_validator("logs_pattern")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_shape(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for part in value.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    # ---------------------------------------------------------------------------------------
    def bootstrap(self) -> str:
        """The bootstrap servers: the setting, else the local broker's address file."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        if BOOTSTRAP_FILE.exists():
            return BOOTSTRAP_FILE.read_text().strip()
        raise SettingsError(
            "no Kafka: set LOGWARDEN_KAFKA_BOOTSTRAP=host:port or start the local broker with `make kafka-up`")

    def environment(self) -> dict[str, str]:
        """These settings as LOGWARDEN_* variables: what gives a `logwarden` subprocess exactly them."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[f"LOGWARDEN_{name.upper()}"] = str(value)
        return env

    def kafka_config(self) -> dict:
        """librdkafka client settings shared by producers, consumers and the admin client."""
        conf = {"bootstrap.servers": self.bootstrap(), "security.protocol": self.security_protocol,
                "logger": RDKAFKA_LOG}
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
            "ssl.keystore.location": self.ssl_keystore_location,
            "ssl.keystore.password": self.ssl_keystore_password.get_secret_value() if self.ssl_keystore_password else None,
        }
        conf.update({k: str(v) for k, v in optional.items() if v is not None})
        return conf

    def group(self, stage: str) -> str:
        return f"{self.group_prefix}.{stage}"

    def session_config(self, everything_known: bool = False, session_gap_s: float | None = None) -> SessionConfig:
        """The session book's rules from these settings: what the sessions stage runs with, or, with
        ``everything_known`` (a finite input read whole: evaluation, the demo's reference run, the
        lab's warm-up), the same rules with nothing closing for idleness. ``session_gap_s``
        overrides the gap (training on data whose sessions span hours)."""
        from services.cores.sessions import SessionConfig

        return SessionConfig(window_size=self.window_size, session_gap_s=session_gap_s or self.session_gap_s,
                             session_max_events=self.session_max_events,
                             idle_close_s=1e18 if everything_known else self.idle_close_s,
                             time_window_s=self.time_window_s, allowed_lateness_s=self.allowed_lateness_s,
                             host_idle_s=self.host_idle_s, watermark_grace_s=self.watermark_grace_s,
                             reorder_max_events=self.reorder_max_events, max_open_sessions=self.max_open_sessions)

    def multimodal_topics(self) -> list[str]:
        """logwarden's own topics of traces and metrics (the otlp_* ones are the Collector's)."""
        return [self.spans_topic, self.traces_topic, self.timeline_topic, self.chunks_topic]


def settings_table() -> str:
    """The README's settings table, generated from this model (tests/test_readme.py compares)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else f"`{field.default}`"
        rows.append(f"| `LOGWARDEN_{name.upper()}` | {default} | {field.description or ''} |")
    return "\n".join(rows)


def load_settings(**overrides) -> Settings:
    """Settings from the environment (plus explicit overrides), or SettingsError with one line."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        first = err.errors()[0]
        name = "LOGWARDEN_" + "_".join(str(p) for p in first["loc"]).upper()
        value = first.get("input")
        raise SettingsError(f"bad setting {name}={value!r}: {first['msg']}") from None


class UsageError(ValueError):
    """A command was called wrongly (a missing file, a bad combination); str(err) is one line."""
