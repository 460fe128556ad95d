"""A throwaway Prometheus (the Debian ``prometheus`` binary, `make prometheus`) on a free
loopback port, scraping the given targets: how tests check that the stages' /metrics endpoints
say what they should, and that alert rules fire.

    prom = start_prometheus(["127.0.0.1:9400"], tmp_dir, rule_files=["prometheus/rules.yml"])
    prom.wait_for('logwarden_lines_total > 0', timeout=30)
    prom.stop()
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from toolkit.localkafka import HOST, exit_with_parent, free_port


class PromError(RuntimeError):
    """Prometheus could not start or answer; str(err) says why."""


@dataclass
class Prom:
    url: str
    data_dir: Path
    process: subprocess.Popen

    @property
    def log_file(self) -> Path:
        return self.data_dir / "prometheus.log"

    def _get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:   # a bad query: Prometheus explains in the body
            try:
                body = json.load(err)
            except ValueError:
                raise PromError(f"{path}: HTTP {err.code}") from None
        if body.get("status") != "success":
            raise PromError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list:
        """The instant query's result list (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        data = self._get("/api/v1/query", query=promql)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def value(self, promql: str) -> float | None:
        """The single number a query returns, or None when it returns nothing."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, timeout: float = 30.0, predicate=bool) -> list:
        """Poll ``promql`` until ``predicate(result)`` holds (default: a non-empty result);
        returns that result, or raises TimeoutError with the last one."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql!r} did not hold within {timeout:.0f} s; last result: {result}")
            time.sleep(0.25)

    def targets(self) -> list[dict]:
        """Active scrape targets with their health (``up``/``down``) and last error."""
        return self._get("/api/v1/targets")["activeTargets"]

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts")["alerts"]

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def prometheus_config(targets: list[str], rule_files=(), scrape_interval: str = "1s") -> dict:
    for target in targets:
        if "/" in target or ":" not in target:
            raise ValueError(f"scrape target must be host:port (path /metrics is implied), got {target!r}")
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                   # The default timeout (10 s) is longer than a short interval, which Prometheus rejects.
                   "scrape_timeout": scrape_interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [{"job_name": "logwarden", "static_configs": [{"targets": list(targets)}]}],
    }


def _log_tail(path: Path, lines: int = 6) -> str:
    try:
        kept = [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(kept) or "(empty log)"


def start_prometheus(targets: list[str], data_dir, rule_files=(), scrape_interval: str = "1s",
                     timeout: float = 30.0) -> Prom:
    """Start Prometheus scraping ``targets`` (host:port) with ``rule_files``; returns once it is
    ready. Stops with the calling process if that dies first."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise PromError("prometheus not found: run `make prometheus` (Debian package prometheus)")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "prometheus.yml"
    # JSON is YAML, and needs no quoting rules for targets or paths.
    config.write_text(json.dumps(prometheus_config(targets, rule_files, scrape_interval), indent=2))
    port = free_port()
    with open(data_dir / "prometheus.log", "ab") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
             f"--web.listen-address={HOST}:{port}", "--log.level=warn"],
            cwd=data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=exit_with_parent)
    prom = Prom(f"http://{HOST}:{port}", data_dir, process)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise PromError(f"prometheus exited with code {process.returncode}: {_log_tail(prom.log_file)}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return prom
        except OSError:
            pass
        if time.monotonic() > deadline:
            prom.stop()
            raise PromError(f"prometheus not ready on {prom.url} within {timeout:.0f} s: {_log_tail(prom.log_file)}")
        time.sleep(0.2)
