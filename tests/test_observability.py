"""Prometheus rules and the Grafana dashboard, checked against what the stages really export.

Fast: every metric name in rules.yml and the dashboard is one services/metrics.py defines;
promtool accepts the rules and a config that loads them; each alert rule fires on synthetic
series showing its condition and stays quiet on ones that do not (promtool test rules).
Slow: a real Prometheus scrapes `logwarden run all` during a 3-host HDFS replay through the real
broker, and every PromQL expression of the dashboard and of rules.yml returns data.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services import alerts, metrics
from toolkit import localprom
from toolkit.localkafka import free_port
from tests.kafkautil import produce_values
from toolkit.replay import deal_lines
from tests.streamutil import REPO, logwarden, settings_env

RULES = REPO / "prometheus" / "rules.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "logwarden.json"
# Grafana's variables, as an instant query at the end of a short test sees them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "10m", "$host": ".*"}
METRIC = re.compile(r"\blogwarden_[a-z0-9_]+")


def rule_list() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_panels(panels: list[dict] | None = None) -> list[dict]:
    """Every panel, rows' nested panels included."""
    out = []
    for p in json.loads(DASHBOARD.read_text())["panels"] if panels is None else panels:
        out.append(p)
        out += dashboard_panels(p.get("panels", []))
    return out


def dashboard_queries() -> dict[str, str]:
    """panel title / refId -> PromQL with Grafana's variables substituted; the host variable's
    label_values(metric, label) becomes the PromQL a Grafana would send for it."""
    queries = {}
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries[f"panel {panel['title']!r} {target['refId']}"] = expr
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert m, f"variable {var['name']}: unexpected query {var['definition']!r}"
        queries[f"variable {var['name']}"] = f"count by ({m.group(2)}) ({m.group(1)})"
    return queries


def exported_names() -> set[str]:
    """Sample names services/metrics.py exports (counter -> _total, histogram -> _bucket ...)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names |= {family.name + s for s in suffixes[family.type]}
    return names


# --------------------------------------------------------------------------------------------
# fast
def test_every_metric_the_rules_and_dashboard_name_is_exported_by_services_metrics():
    exported = exported_names()
    assert "logwarden_feedback_total" in exported and "logwarden_parse_latency_seconds_bucket" in exported
    texts = {"rules.yml": RULES.read_text(), "dashboard": json.dumps(dashboard_queries())}
    for where, text in texts.items():
        unknown = sorted(set(METRIC.findall(text)) - exported)
        assert not unknown, f"{where} names metrics services/metrics.py does not export: {unknown}"


def test_dashboard_has_the_panels_operators_need_on_the_provisioned_datasource():
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    text = json.dumps(panels)
    for metric in ("logwarden_lines_total", "logwarden_parse_latency_seconds_bucket", "logwarden_templates",
                   "logwarden_templates_new_total", "logwarden_open_sessions", "logwarden_anomalies_total",
                   "logwarden_anomalous_template_total", "logwarden_consumer_lag", "logwarden_deadletter_total",
                   "logwarden_model_version_info"):
        assert metric in text, f"no panel shows {metric}"
    assert len({p["id"] for p in dashboard_panels()}) == len(dashboard_panels())
    # grafana/provisioning/datasources names the Prometheus datasource uid "prometheus"
    datasource = yaml.safe_load((REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in panels} == {uid}
    for p in panels:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} is wider than the dashboard"


def _promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: run `make prometheus` (Debian package prometheus)", pytrace=False)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_accepts_the_rules_and_configs_that_load_them(tmp_path):
    rules = _promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(rule_list())} rules found" in rules.stdout
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps(localprom.prometheus_config(["127.0.0.1:9400"], rule_files=[RULES])))
    for path in (config, REPO / "prometheus" / "prometheus.yml"):    # ours, and compose's
        checked = _promtool("check", "config", str(path))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "SUCCESS: 1 rule files found" in checked.stdout, f"{path} does not load rules.yml"


# Each alert on synthetic series (one sample a minute): where it must fire, with the labels it
# must carry, and look-alikes where it must not.
ALERT_CASES = {
    "LogwardenConsumerLagGrowing": {
        "by": "stage, topic", "at": "25m",
        "fires": ['logwarden_consumer_lag{stage="detect", topic="logwarden.windows"} 0+2000x30'],
        "labels": '{stage="detect", topic="logwarden.windows"}',
        "quiet": ['logwarden_consumer_lag{stage="detect", topic="logwarden.windows"} 50000x30',    # high, flat
                  'logwarden_consumer_lag{stage="parse", topic="logs.dn1"} 0+10x30']},             # growing, small
    "LogwardenDeadLetterRate": {
        "by": "stage", "at": "20m",
        "fires": ['logwarden_records_in_total{stage="parse", topic="logs.dn1"} 0+1000x30',
                  'logwarden_deadletter_total{stage="parse", reason="not_json"} 0+50x30'],
        "labels": '{stage="parse"}',
        "quiet": ['logwarden_records_in_total{stage="parse", topic="logs.dn1"} 0+1000x30',
                  'logwarden_deadletter_total{stage="parse", reason="not_json"} 0+5x30']},
    "LogwardenAnomalyRateSpike": {
        "by": "host", "at": "58m",
        "fires": ['logwarden_anomalies_total{host="dn1", detector="deeplog"} 0+1x50 50+300x20'],
        "labels": '{host="dn1"}',
        "quiet": ['logwarden_anomalies_total{host="dn2", detector="deeplog"} 0+300x70',    # high but usual
                  'logwarden_anomalies_total{host="dn3", detector="deeplog"} 0+1x70']},    # low
    "LogwardenStageDown": {
        "by": "instance, stage", "at": "4m",
        "fires": ['up{job="logwarden", instance="parse-1:9400"} 1 1 0 0 0 0',
                  'logwarden_stage_up{job="logwarden", instance="window-1:9400", stage="window"} 1 1 1 0 0 0'],
        "labels": ['{instance="parse-1:9400"}', '{instance="window-1:9400", stage="window"}'],
        "quiet": ['up{job="logwarden", instance="parse-1:9400"} 1 1 1 1 1 1',
                  'up{job="other", instance="db:9100"} 0 0 0 0 0 0',
                  'logwarden_stage_up{job="logwarden", instance="window-1:9400", stage="window"} 1 1 1 1 1 1']},
}


def _series(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        series, values = line.split("} ", 1) if "}" in line else line.split(" ", 1)
        out.append({"series": series + ("}" if "}" in line else ""), "values": values})
    return out


def test_each_alert_fires_on_its_condition_and_not_on_look_alikes(tmp_path):
    alerts_by_name = {r["alert"]: r["expr"] for r in rule_list() if "alert" in r}
    assert set(alerts_by_name) == set(ALERT_CASES), "every alert rule needs a case here"
    tests = []
    for name, case in ALERT_CASES.items():
        expr = f"count by ({case['by']}) ({alerts_by_name[name]})"
        labels = case["labels"] if isinstance(case["labels"], list) else [case["labels"]]
        tests.append({"interval": "1m", "input_series": _series(case["fires"]),
                      "promql_expr_test": [{"expr": expr, "eval_time": case["at"],
                                            "exp_samples": [{"labels": lab, "value": 1} for lab in labels]}]})
        tests.append({"interval": "1m", "input_series": _series(case["quiet"]),
                      "promql_expr_test": [{"expr": expr, "eval_time": case["at"], "exp_samples": []}]})
    spec = tmp_path / "rules_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    result = _promtool("test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# slow: a real Prometheus scraping the stages during a replay
def _signals(expr: str) -> list[str]:
    """The vector operands of an alert expression: ``a > 0 and b > 10000`` -> [a, b]."""
    parts = re.split(r"\s+(?:and|or|unless)\s+", " ".join(expr.split()))
    return [re.sub(r"\s*(?:>|<|>=|<=|==|!=)\s*[-+0-9.e]+$", "", p).strip() for p in parts]


def _train_small_deeplog(datasets, tmp_path, env) -> None:
    sessions = (datasets / "hdfs" / "deeplog_hdfs_train").read_text().splitlines()[:300]
    normal = tmp_path / "normal.txt"
    normal.write_text("\n".join(sessions) + "\n")
    out = tmp_path / "trained"
    for args in (["train", "--detector", "deeplog", "--normal", str(normal), "--epochs", "2", "--device", "cpu",
                  "--templates", str(datasets / "hdfs" / "HDFS_templates.csv"), "--out", str(out), "--no-progress"],
                 ["model", "publish", str(out)]):
        done = subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_every_dashboard_and_rule_expression_returns_data_while_the_stages_run(
        kafka_settings, datasets, tmp_path, prometheus):
    hosts = [kafka_settings.host(h) for h in ("dn1", "dn2", "dn3")]
    settings = kafka_settings.model_copy(update={
        "template_catalog": datasets / "hdfs" / "HDFS_templates.csv", "state_dir": tmp_path / "state",
        "model_dir": tmp_path / "models", "device": "cpu", "session_gap_s": 1e9, "idle_close_s": 3.0,
        "metrics_port": free_port()})
    env = settings_env(settings)
    _train_small_deeplog(datasets, tmp_path, env)

    log = tmp_path / "stages.log"
    pipeline = logwarden("run", "all", env=env, log=log)
    # A second target nobody serves: a stage process that is down.
    prom = prometheus([f"127.0.0.1:{settings.metrics_port}", f"127.0.0.1:{free_port()}"], rule_files=[RULES])
    try:
        with open(datasets / "hdfs" / "HDFS_20000.log", "rb") as src:
            lines = [line for _, line in zip(range(6000), src)]
        (tmp_path / "first.log").write_bytes(b"".join(lines[:600]))
        (tmp_path / "rest.log").write_bytes(b"".join(lines[600:]))

        def ship(part: str) -> dict:
            files = deal_lines(tmp_path / part, hosts, tmp_path / part.replace(".log", ""))
            replays = [logwarden("replay", str(path), "--host", host, "--no-progress", env=env,
                                 log=tmp_path / "replay.log") for host, path in files.items()]
            assert all(p.wait(120) == 0 for p in replays), (tmp_path / "replay.log").read_text()[-2000:]
            return files

        # A host's anomaly counter exists at 0 from its first window, and rate() needs a sample
        # before an increase to see it: ship the rest only once Prometheus has scraped every
        # host's counter, as it has long before any anomaly on a cluster that runs for a while.
        files = ship("first.log")
        deadline = time.monotonic() + 90
        while {r["metric"]["host"] for r in prom.query('logwarden_anomalies_total{detector="deeplog"}')} < set(hosts):
            assert time.monotonic() < deadline, "no anomaly counter per host after 90 s: " + log.read_text()[-3000:]
            time.sleep(0.5)
        ship("rest.log")
        # Filebeat sending a file again after a restart: every line is an at-least-once repeat.
        again = logwarden("replay", str(files[hosts[0]]), "--host", hosts[0], "--no-progress", env=env,
                          log=tmp_path / "replay.log")
        assert again.wait(120) == 0
        produce_values(settings, settings.logs_topic("dn1"), [b"not json %d" % i for i in range(200)])

        # An operator confirms one alert: the feedback stage counts it.
        out = io.StringIO()
        assert alerts.tail(settings, as_json=True, from_beginning=True, max_alerts=1, timeout=90, out=out,
                           log=io.StringIO()) == 1, "no alert within 90 s: " + log.read_text()[-3000:]
        alert_id = json.loads(out.getvalue())["alert_id"]
        sent = subprocess.run([sys.executable, "-m", "services.cli", "feedback", alert_id, "--true-positive"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr

        queries = dashboard_queries()
        for rule in rule_list():
            if "record" in rule:
                queries[f"record {rule['record']}"] = rule["expr"]
            else:
                for n, signal in enumerate(_signals(rule["expr"])):
                    queries[f"alert {rule['alert']} operand {n}"] = signal
        # Alerts the replay brings about: dead letters (200 of ~8,000 records) and the dead target.
        for rule in rule_list():
            if rule.get("alert") in ("LogwardenDeadLetterRate", "LogwardenStageDown"):
                queries[f"alert {rule['alert']}"] = rule["expr"]

        deadline = time.monotonic() + 120
        while True:
            empty = {what: q for what, q in queries.items() if not prom.query(q)}
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert not empty, f"queries with no data: {json.dumps(empty, indent=1)}\n{log.read_text()[-2000:]}"

        pending = {a["labels"]["alertname"] for a in prom.alerts()}
        assert {"LogwardenDeadLetterRate", "LogwardenStageDown"} <= pending, pending
        # Bounded labels: no series is labelled with a block id or a line.
        for series in prom.query('{__name__=~"logwarden_.*"}'):
            assert not any(v.startswith("blk_") or len(v) > 80 for v in series["metric"].values()), series
        assert pipeline.poll() is None, log.read_text()[-3000:]
    finally:
        pipeline.terminate()
        pipeline.wait(60)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
