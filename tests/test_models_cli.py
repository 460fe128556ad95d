"""`logwarden train / evaluate / model` on tiny session files: the exact CLI contract of issue 4."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from models import artifacts
from services.cli import main

METRIC_KEYS = {"tp", "fp", "tn", "fn", "precision", "recall", "f1"}


def grammar(rng: random.Random) -> list[int]:
    """22 -> 5 -> (11 9 | 9 11) -> 26{1,3}, written as integer keys like deeplog_hdfs_train."""
    return [22, 5] + ([11, 9] if rng.random() < 0.5 else [9, 11]) + [26] * rng.randint(1, 3)


def write_sessions(path: Path, sessions: list[list[int]]) -> Path:
    path.write_text("".join(" ".join(map(str, s)) + " \n" for s in sessions))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sessions")
    rng = random.Random(0)
    normal_test = [grammar(rng) for _ in range(20)] + [[22, 5, 11, 9, 26, 26, 26, 26, 26, 26, 26, 26, 26]]
    abnormal = [[22, 5, 26, 11, 9], [22, 5, 11, 9, 7, 26], [5], [22, 5, 11, 9, 26, 26, 26, 26, 26, 26, 26, 3]]
    templates = root / "templates.csv"
    templates.write_text("EventId,EventTemplate\nE5,<*>Receiving block<*>\nE22,<*>allocateBlock:<*>\n")
    return {"normal": write_sessions(root / "normal", [grammar(rng) for _ in range(150)]),
            "test_normal": write_sessions(root / "test_normal", normal_test),
            "abnormal": write_sessions(root / "abnormal", abnormal), "templates": templates}


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """The installed console script, as other tools call it."""
    logwarden = Path(sys.executable).with_name("logwarden")
    return subprocess.run([str(logwarden), *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LOGWARDEN_DEVICE": "cpu"})


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "deeplog"
    done = run_cli("train", "--detector", "deeplog", "--normal", str(files["normal"]), "--out", str(out),
                   "--templates", str(files["templates"]), "--epochs", "60")
    assert done.returncode == 0, done.stderr
    assert "deeplog keys" in done.stderr          # progress goes to stderr
    assert done.stdout.startswith("trained deeplog on 150 sessions")
    return out


def test_train_writes_weights_and_manifest(trained, files):
    assert sorted(p.name for p in trained.iterdir()) == ["manifest.json", "weights.safetensors"]
    with safe_open(str(trained / "weights.safetensors"), "pt") as weights:     # no pickle anywhere
        assert any(name.startswith("key.lstm") for name in weights.keys())
    manifest = artifacts.read_manifest(trained)
    assert (manifest["detector"], manifest["h"], manifest["g"], manifest["seed"]) == ("deeplog", 10, 9, 1)
    assert manifest["vocabulary"][:2] == [{"id": "E5", "template": "<*>Receiving block<*>"},
                                          {"id": "E9", "template": None}]
    assert [v["id"] for v in manifest["vocabulary"]] == ["E5", "E9", "E11", "E22", "E26"]
    [source] = manifest["training_data"]
    assert source == {"path": str(files["normal"].resolve()), "sha256": artifacts.sha256_file(files["normal"]),
                      "sessions": 150, "role": "normal"}
    assert manifest["training"]["sessions"] == 150 and manifest["created"]
    assert "E22" in manifest["workflow"]["<start>"]


def test_evaluate_json_contract(trained, files, tmp_path):
    out = tmp_path / "eval.json"
    done = run_cli("evaluate", "--detector", "deeplog", "--model", str(trained), "--normal",
                   str(files["test_normal"]), "--abnormal", str(files["abnormal"]), "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result) == {"all", "longer_than_window", "g", "h"}
    assert set(result["all"]) == METRIC_KEYS and set(result["longer_than_window"]) == METRIC_KEYS
    assert (result["g"], result["h"]) == (9, 10)
    everything, longer = result["all"], result["longer_than_window"]
    assert everything["tp"] + everything["fn"] == 4 and everything["fp"] + everything["tn"] == 21
    assert longer["tp"] + longer["fn"] == 1 and longer["fp"] + longer["tn"] == 1     # > h events
    # Unknown keys 7 and 3 can never be in the top g: those sessions are always caught.
    assert everything["tp"] >= 2
    assert 0.0 <= everything["f1"] <= 1.0
    assert artifacts.read_manifest(trained)["evaluations"][-1]["all"] == everything


def test_evaluate_top_g_override_and_model_root(trained, files, tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    monkeypatch.setenv("LOGWARDEN_MODEL_DIR", str(root))
    assert main(["model", "publish", str(trained)]) == 0
    flagged = {}
    for g in ("9", "1"):
        out = tmp_path / f"eval{g}.json"
        # --model may name the model root: its newest deeplog version is evaluated.
        assert main(["evaluate", "--detector", "deeplog", "--model", str(root), "--normal",
                     str(files["test_normal"]), "--abnormal", str(files["abnormal"]), "--json", str(out),
                     "--top-g", g, "--device", "cpu"]) == 0
        result = json.loads(out.read_text())
        assert result["g"] == int(g)
        flagged[g] = result["all"]["tp"] + result["all"]["fp"]
    # Every key outside the top 9 is outside the top 1: a smaller g flags at least as much.
    assert flagged["1"] >= flagged["9"]
    one_line_error(capsys, ["evaluate", "--detector", "attgru", "--model", str(trained), "--normal",
                            str(files["test_normal"]), "--abnormal", str(files["abnormal"]), "--json",
                            str(tmp_path / "x.json")], "holds a 'deeplog' model, not 'attgru'")


def test_model_publish_list_rollback(trained, tmp_path, monkeypatch, capsys):
    root = tmp_path / "models"
    monkeypatch.setenv("LOGWARDEN_MODEL_DIR", str(root))
    assert main(["model", "publish", str(trained)]) == 0
    assert main(["model", "publish", str(trained)]) == 0
    assert [p.name for p in artifacts.versions(root, "deeplog")] == ["v0001", "v0002"]
    capsys.readouterr()
    assert main(["model", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in listing] == [["deeplog", "v0001"], ["deeplog", "v0002"]]
    assert listing[-1].endswith("(served)")
    assert main(["model", "rollback", "--detector", "deeplog"]) == 0
    assert [p.name for p in artifacts.versions(root, "deeplog")] == ["v0001"]
    assert main(["model", "rollback", "--detector", "deeplog"]) == 2      # nothing left to roll back to
    assert capsys.readouterr().err.strip().count("\n") == 0


def one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_bad_inputs_are_one_line_errors(files, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.write_text("22 5 11\n22 five 9\n")
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    out = str(tmp_path / "m")
    base = ["train", "--detector", "deeplog", "--out", out, "--no-progress", "--device", "cpu"]
    one_line_error(capsys, base + ["--normal", str(tmp_path / "missing")], "no such file")
    one_line_error(capsys, base + ["--normal", str(bad)], f"{bad}:2: 'five' is not an integer key")
    one_line_error(capsys, base + ["--normal", str(empty)], "no sessions (empty file)")
    one_line_error(capsys, base, "give --normal FILE")
    one_line_error(capsys, base + ["--logs", str(bad), "--normal", str(bad)], "not both")
    one_line_error(capsys, ["evaluate", "--detector", "deeplog", "--model", str(tmp_path / "nothing"),
                            "--normal", str(files["test_normal"]), "--abnormal", str(files["abnormal"]),
                            "--json", str(tmp_path / "x.json")], "no model in")
    one_line_error(capsys, ["model", "publish", str(tmp_path)], "no manifest.json")
    assert not Path(out).exists()


def test_same_seed_gives_the_same_weights(files, tmp_path):
    paths = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["train", "--detector", "deeplog", "--normal", str(files["normal"]), "--out", str(out),
                     "--epochs", "2", "--seed", "5", "--no-progress", "--device", "cpu", "-H", "4"]) == 0
        paths.append(out / "weights.safetensors")
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.slow
def test_train_from_raw_logs_uses_the_stream_cores(datasets, tmp_path):
    """--logs/--labels: lines through the parse core, sessions through the window core."""
    hdfs = datasets / "hdfs"
    lines = (hdfs / "HDFS_20000.log").read_text().splitlines(keepends=True)[:3000]
    log = tmp_path / "datanode1.log"
    log.write_text("".join(lines))
    blocks = {b for line in lines for b in re.findall(r"blk_-?\d+", line)}
    labels = tmp_path / "labels.csv"
    rows = [r for r in (hdfs / "HDFS_20000_block_labels.csv").read_text().splitlines()[1:] if r.split(",")[0] in blocks]
    labels.write_text("BlockId,Label\n" + "".join(",".join(r.split(",")[:2]) + "\n" for r in rows))
    out = tmp_path / "model"
    assert main(["train", "--detector", "deeplog", "--logs", str(log), "--labels", str(labels), "--templates",
                 str(hdfs / "HDFS_templates.csv"), "--out", str(out), "--epochs", "2", "--no-progress",
                 "--device", "cpu"]) == 0
    manifest = artifacts.read_manifest(out)
    log_source, label_source = manifest["training_data"]
    assert log_source["sha256"] == artifacts.sha256_file(log) and log_source["lines"] == 3000
    assert label_source["sessions"] == len(blocks) and label_source["unlabelled_sessions"] == 0
    abnormal = sum(r.split(",")[1] == "Anomaly" for r in rows)
    assert manifest["training"]["sessions"] == len(blocks) - abnormal        # normal sessions only
    ids = {v["id"] for v in manifest["vocabulary"]}
    assert {"E5", "E22", "E11", "E9", "E26"} <= ids                           # catalog ids, not mined
    # Raw logs carry timestamps and numbers: the frequent keys get parameter-value models.
    assert "E5" in manifest["thresholds"] and manifest["thresholds"]["E5"]["interval"][1] > 0
