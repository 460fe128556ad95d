"""Every Prometheus metric logwarden exports, defined once so names stay consistent.

Naming: ``logwarden_*``; counters end in ``_total``; durations are seconds. Labels are bounded:
stage, host (cluster size), topic (stage inputs/outputs), reason (a fixed set), detector,
template_id (the model's vocabulary) — never a block id or a line.
"""
from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

STAGE_INFO = Gauge("logwarden_stage_up", "1 while a stage runs in this process", ["stage"])
RECORDS_IN = Counter("logwarden_records_in_total", "records consumed", ["stage", "topic"])
RECORDS_OUT = Counter("logwarden_records_out_total", "records produced and acknowledged", ["stage", "topic"])
DEADLETTERS = Counter("logwarden_deadletter_total", "records sent to the dead-letter topic", ["stage", "reason"])
COMMITS = Counter("logwarden_commits_total", "offset commits after acknowledged outputs", ["stage"])
CONSUMER_LAG = Gauge("logwarden_consumer_lag", "messages behind the partition end, summed over the stage's partitions",
                     ["stage", "topic"])
STATE_RESTORES = Counter("logwarden_state_restores_total", "partitions whose state was restored from the changelog", ["stage"])
CHANGELOG_RECORDS = Counter("logwarden_changelog_records_total", "state changes written to the changelog", ["stage"])
BATCH_SECONDS = Histogram("logwarden_batch_seconds", "time to process one consumed batch", ["stage"],
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))

# parse
LINES = Counter("logwarden_lines_total", "log lines parsed", ["host"])
PARSE_SECONDS = Histogram("logwarden_parse_latency_seconds", "time to parse one line (per batch average)",
                          buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2))
TEMPLATES = Gauge("logwarden_templates", "templates the parser knows", ["origin"])  # catalog | mined
NEW_TEMPLATES = Counter("logwarden_templates_new_total", "templates mined online (not in the catalog)")
UNKNOWN_LINES = Counter("logwarden_unknown_template_lines_total", "lines matching no template of a frozen vocabulary")
DUPLICATES = Counter("logwarden_duplicates_total", "at-least-once repeats dropped", ["stage"])

# sessions (window + judge)
OPEN_SESSIONS = Gauge("logwarden_open_sessions", "sessions open in the sessions stage")
REORDER_BUFFERED = Gauge("logwarden_reorder_buffered_events", "events held until the watermark passes them")
WATERMARK_LAG = Gauge("logwarden_watermark_lag_seconds", "newest event time seen minus the watermark (the slowest active host)")
LATE_EVENTS = Counter("logwarden_late_events_total", "events that arrived after the watermark had passed them (judged only in the final verdict)")
FORCED_RELEASES = Counter("logwarden_forced_releases_total", "events judged before the watermark passed them (reorder buffer full)")
RETRACTIONS = Counter("logwarden_early_alerts_retracted_total", "early alerts whose anomaly the final verdict does not hold", ["detector"])
WINDOWS = Counter("logwarden_windows_total", "windows emitted", ["kind"])
SESSIONS_CLOSED = Counter("logwarden_sessions_closed_total", "session windows closed", ["reason"])

# detect
WINDOWS_SCORED = Counter("logwarden_windows_scored_total", "windows scored", ["detector", "kind"])
SCORE_SECONDS = Histogram("logwarden_score_batch_seconds", "time to score one batch", ["detector"],
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
ANOMALIES = Counter("logwarden_anomalies_total", "anomalous sessions (alerts opened)", ["host", "detector"])
ANOMALOUS_TEMPLATES = Counter("logwarden_anomalous_template_total", "template of the first anomalous event",
                              ["detector", "template_id"])
ALERTS = Counter("logwarden_alerts_total", "alert records produced", ["detector", "status"])
SESSIONS_JUDGED = Counter("logwarden_sessions_judged_total", "closed sessions given a final verdict",
                          ["detector", "verdict"])
MODEL_VERSION = Gauge("logwarden_model_version_info", "1 for the model version in use", ["detector", "version"])
ALERT_LATENCY = Histogram("logwarden_alert_latency_seconds",
                          "from the anomalous line's Kafka timestamp to its alert's produce time", ["detector"],
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
FEEDBACK = Counter("logwarden_feedback_total", "operator feedback records applied", ["detector", "verdict"])

# traces and chunks (assemble, join)
OPEN_TRACES = Gauge("logwarden_open_traces", "traces open in the assemble stage")
TRACES_CLOSED = Counter("logwarden_traces_closed_total", "traces assembled", ["reason"])
LATE_SPANS = Counter("logwarden_late_spans_total", "spans that came after their trace had closed (counted, not added)")
CHUNKS = Counter("logwarden_chunks_total", "chunks cut by the join stage")
LATE_TIMELINE = Counter("logwarden_late_timeline_total", "timeline items for a step the join had already passed", ["kept"])


def serve(bind: str, port: int) -> int:
    """Start the /metrics endpoint; returns the port (0 picks a free one, which is logged)."""
    server, _thread = start_http_server(port, addr=bind)
    actual = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", bind, actual)
    return actual
