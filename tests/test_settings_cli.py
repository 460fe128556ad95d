"""A bad setting or a bad command line stops with exactly one line, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.settings import SettingsError, load_settings

LOGWARDEN = Path(sys.executable).with_name("logwarden")
# Nothing listens on the discard port: a command that reaches Kafka would fail differently.
NO_KAFKA = "127.0.0.1:9"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOGWARDEN_")}
    return subprocess.run([str(LOGWARDEN), *args], env=clean | {"LOGWARDEN_KAFKA_BOOTSTRAP": NO_KAFKA} | env,
                          capture_output=True, text=True, timeout=60)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("name, value", [
    ("LOGWARDEN_DEVICE", "gpu"),
    ("LOGWARDEN_METRICS_PORT", "x"),
    ("LOGWARDEN_METRICS_PORT", "70000"),
    ("LOGWARDEN_LOGS_PATTERN", "^logs\\.(["),
    ("LOGWARDEN_KAFKA_BOOTSTRAP", "no-port-here"),
    ("LOGWARDEN_TOPIC_PARTITIONS", "0"),
])
def test_a_bad_setting_is_one_line_naming_it(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message and name in message and repr(value) in message


def test_a_bad_setting_stops_a_command_with_one_line(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("line\n")
    assert_one_line_error(run_cli("replay", str(log), "--host", "a", LOGWARDEN_DEVICE="gpu"), "LOGWARDEN_DEVICE")


@pytest.mark.parametrize("args, needle", [
    (["replay", "--rate", "-1", "f", "--host", "a"], "--rate"),
    (["replay", "--rate", "fast", "f", "--host", "a"], "--rate"),
    (["replay", "f"], "--host"),
    (["replay", "--host", "a"], "FILE"),
    (["kafka", "sideways"], "sideways"),
    (["no-such-command"], "no-such-command"),
])
def test_a_bad_argument_is_one_line(args, needle):
    assert_one_line_error(run_cli(*args), needle)


def test_replay_of_a_missing_file_is_one_line_before_any_kafka_call(tmp_path):
    missing = tmp_path / "nope.log"
    assert_one_line_error(run_cli("replay", str(missing), "--host", "a"), "no such file", str(missing))


def test_replay_to_an_unusable_host_name_is_one_line(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("line\n")
    assert_one_line_error(run_cli("replay", str(log), "--host", "dn/1"), "--host")


@pytest.mark.slow   # waits for the 10 s metadata timeout
def test_replay_without_a_reachable_kafka_is_one_line(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("line\n")
    result = run_cli("replay", str(log), "--host", "a", "--no-progress")
    assert_one_line_error(result, NO_KAFKA)
