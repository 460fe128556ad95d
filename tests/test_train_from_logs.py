"""`logwarden train/evaluate --logs FILE... [--labels CSV] [--session-key NAME]` on a real
MapReduce job's log (loghub's Hadoop_2k.log: the MRAppMaster of application 0020).

Labels: loghub labels Hadoop applications, not task attempts; these tests label an attempt
Anomaly when the log shows it failing (FAIL_CONTAINER_CLEANUP / FAILED): labels made for the
plumbing, not a benchmark, so no figure from here belongs in BENCHMARKS.md."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from models import artifacts
from models.data import sessions_from_logs
from services.cli import main
from services.settings import UsageError

ATTEMPT = re.compile(r"(?<![\w/])attempt_\d+_\d+_[mr]_\d+_\d+")
APPLICATION = "application_1445144423722_0020"
FAST = ["--epochs", "2", "-H", "3", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def hadoop_log(datasets) -> Path:
    return datasets / "loghub_2k" / "Hadoop" / "Hadoop_2k.log"


@pytest.fixture(scope="module")
def attempt_labels(hadoop_log, tmp_path_factory) -> Path:
    lines = hadoop_log.read_text(encoding="utf-8").splitlines()
    attempts = sorted({a for line in lines for a in ATTEMPT.findall(line)})
    failed = {a for line in lines if re.search(r"to (FAIL_CONTAINER_CLEANUP|FAILED)\b", line)
              for a in ATTEMPT.findall(line)}
    assert len(attempts) == 14 and len(failed) == 2
    path = tmp_path_factory.mktemp("labels") / "attempts.csv"
    path.write_text("SessionId,Label\n" + "".join(f"{a},{'Anomaly' if a in failed else 'Normal'}\n" for a in attempts))
    return path


@pytest.fixture(scope="module")
def container_logs(hadoop_log, tmp_path_factory) -> list[Path]:
    """The job's log cut in two, laid out as YARN writes container logs:
    <log-dir>/application_<id>/container_<id>/syslog."""
    lines = hadoop_log.read_text(encoding="utf-8").splitlines(keepends=True)
    root = tmp_path_factory.mktemp("yarn-logs") / APPLICATION
    files = []
    for n, part in ((1, lines[:1000]), (2, lines[1000:])):
        path = root / f"container_e02_1445144423722_0020_01_00000{n}" / "syslog"
        path.parent.mkdir(parents=True)
        path.write_text("".join(part))
        files.append(path)
    return files


def test_sessions_of_a_named_key_from_raw_logs(hadoop_log, attempt_labels):
    sequences, labels, sources = sessions_from_logs([hadoop_log], attempt_labels, session_key="mapreduce_attempt")
    assert len(sequences) == 14 and sorted(labels) == [0] * 12 + [1] * 2
    assert all(s.complete and s.keys for s in sequences)
    log_source, label_source = sources
    assert log_source["lines"] == 2000 and log_source["unparsed_lines"] == 0
    assert label_source["sessions"] == 14 and label_source["abnormal"] == 2
    # every line is one event of the session of each attempt it names, in log order
    names = hadoop_log.read_text(encoding="utf-8").count("attempt_1445144423722_0020_m_000000_0")
    assert sorted(len(s.keys) for s in sequences)[-1] >= names // 2


def test_without_labels_every_session_is_normal_and_path_keys_make_sessions(container_logs):
    sequences, labels, _ = sessions_from_logs(container_logs, session_key="yarn_container")
    assert set(labels) == {0}
    lines = sum(len(p.read_text().splitlines()) for p in container_logs)
    # each file is its container's session; the containers the job's lines name are sessions too
    longest = sorted(len(s.keys) for s in sequences)[-2:]
    assert sum(longest) >= lines - 50 and len(sequences) > 2
    (application,) = sessions_from_logs(container_logs, session_key="yarn_application")[0]
    assert len(application.keys) >= lines               # every line of both files, and a few twice


def test_an_unknown_session_key_or_no_session_is_a_clear_error(hadoop_log, datasets, tmp_path):
    with pytest.raises(UsageError, match=r"--session-key nope: .*has no such session key \(it has hdfs_block, yarn_application"):
        sessions_from_logs([hadoop_log], session_key="nope")
    bgl = tmp_path / "bgl.log"                       # a supercomputer's log: no block, no YARN id
    bgl.write_text("".join((datasets / "bgl" / "BGL_first10k.log").read_text().splitlines(keepends=True)[:300]))
    with pytest.raises(UsageError, match=r"no line of .*bgl.log names a session key \(hdfs_block\)"):
        sessions_from_logs([bgl], session_key="hdfs_block")


def test_train_and_evaluate_on_raw_hadoop_logs(hadoop_log, attempt_labels, tmp_path, capsys):
    out, report = tmp_path / "model", tmp_path / "eval.json"
    key = ["--session-key", "mapreduce_attempt"]
    assert main(["train", "--detector", "deeplog", "--logs", str(hadoop_log), "--labels", str(attempt_labels),
                 *key, "--out", str(out), *FAST]) == 0
    manifest = artifacts.read_manifest(out)
    assert manifest["training"]["sessions"] == 12                       # the normal attempts only
    assert manifest["training_data"][0]["sha256"] == artifacts.sha256_file(hadoop_log)
    assert all(v["id"].startswith("T") for v in manifest["vocabulary"])  # mined templates, no catalog
    assert main(["evaluate", "--detector", "deeplog", "--model", str(out), "--logs", str(hadoop_log),
                 "--labels", str(attempt_labels), *key, "--json", str(report), "--device", "cpu"]) == 0
    result = json.loads(report.read_text())
    assert set(result) == {"all", "longer_than_window", "g", "h"} and result["h"] == 3   # as on session files
    confusion = result["all"]
    assert confusion["tp"] + confusion["fn"] == 2 and confusion["tn"] + confusion["fp"] == 12
    assert artifacts.read_manifest(out)["evaluations"][-1]["logs"][0]["lines"] == 2000
    capsys.readouterr()


def test_train_without_labels_takes_every_session_as_normal(container_logs, tmp_path):
    out = tmp_path / "model"
    assert main(["train", "--detector", "deeplog", "--logs", *map(str, container_logs),
                 "--session-key", "yarn_container", "--out", str(out), *FAST]) == 0
    manifest = artifacts.read_manifest(out)
    assert manifest["training"]["sessions"] == len(sessions_from_logs(container_logs, session_key="yarn_container")[0])
    assert [s["role"] for s in manifest["training_data"]] == ["log", "log"]


def one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_bad_log_options_are_one_line_errors(hadoop_log, attempt_labels, tmp_path, capsys):
    train = ["train", "--detector", "deeplog", "--out", str(tmp_path / "m"), *FAST]
    one_line_error(capsys, train + ["--logs", str(hadoop_log), "--session-key", "nope"], "has no such session key")
    one_line_error(capsys, train + ["--logs", str(tmp_path / "missing.log")], "no such file")
    one_line_error(capsys, train + ["--session-key", "yarn_container", "--normal", str(attempt_labels)],
                   "--session-key goes with --logs")
    bad = tmp_path / "bad.csv"
    bad.write_text("SessionId,Label\nattempt_1,Broken\n")
    one_line_error(capsys, train + ["--logs", str(hadoop_log), "--labels", str(bad)], "neither Normal nor Anomaly")
    evaluate = ["evaluate", "--detector", "deeplog", "--model", str(tmp_path / "m"), "--json", str(tmp_path / "x.json")]
    assert main(train + ["--logs", str(hadoop_log), "--session-key", "mapreduce_attempt"]) == 0
    one_line_error(capsys, evaluate + ["--logs", str(hadoop_log)], "evaluate --logs needs --labels")


def test_a_model_trained_on_logs_is_evaluated_with_the_template_ids_it_learnt(tmp_path):
    """Mined ids depend on the lines a parse core saw first: the model keeps its core's state,
    and evaluate --logs parses with it, so a template seen in training keeps its id."""
    line = "2015-10-18 18:0{m}:00,000 INFO [main] a.TaskImpl: attempt_1445144423722_0020_m_00000{n}_0 Starting task {name} now\n"
    train_log, test_log = tmp_path / "train.log", tmp_path / "test.log"
    train_log.write_text("".join(line.format(m=n, n=n, name=name) for n, name in enumerate(("alpha1", "beta2", "delta4"))))
    test_log.write_text(line.format(m=5, n=5, name="gamma3") + line.format(m=6, n=6, name="omega9"))
    labels = tmp_path / "labels.csv"
    labels.write_text("SessionId,Label\nattempt_1445144423722_0020_m_000005_0,Normal\n"
                      "attempt_1445144423722_0020_m_000006_0,Anomaly\n")
    out = tmp_path / "model"
    assert main(["train", "--detector", "deeplog", "--logs", str(train_log), "--out", str(out), *FAST]) == 0
    manifest = artifacts.read_manifest(out)
    assert manifest["parse_state"]["templates"] == 1 and (out / "parse_state.json").exists()
    (learnt,) = [v["id"] for v in manifest["vocabulary"]]
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--detector", "deeplog", "--model", str(out), "--logs", str(test_log),
                 "--labels", str(labels), "--json", str(report), "--device", "cpu"]) == 0
    from models.data import PARSE_STATE_FILE, log_parser

    restored = log_parser(state=(out / PARSE_STATE_FILE).read_bytes())
    assert sessions_from_logs([test_log], parser=restored)[0][0].keys == [learnt]
    # a fresh core names the same template after the first line it sees: another id
    assert sessions_from_logs([test_log])[0][0].keys != [learnt]
