"""The count-vector baselines (models/baselines.py) on a small synthetic block grammar:
train / score / save / load, what each rule catches, and the CLI."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from models import artifacts
from models.baselines import NoveltyRules, PCADetector, _nearest_l1
from models.base import Sequence
from models.data import holdout
from services.cli import main as cli


def block(rng: random.Random) -> list[str]:
    """allocate, receive x3, (terminate, received) x3, stored x3, then deleted or not."""
    keys = ["E22"] + ["E5"] * 3
    keys += [k for _ in range(3) for k in rng.sample(["E11", "E9"], 2)]
    keys += ["E26"] * 3
    if rng.random() < 0.7:
        keys += ["E23"] * 3 + ["E21"] * 3
    return keys


@pytest.fixture(scope="module")
def normal() -> list[Sequence]:
    rng = random.Random(0)
    return [Sequence(block(rng)) for _ in range(300)]


LEGAL = ["E22", "E5", "E5", "E5", "E9", "E11", "E11", "E9", "E11", "E9", "E26", "E26", "E26"]
UNSEEN_EVENT = LEGAL[:5] + ["E20"] + LEGAL[5:]
STOPPED_EARLY = ["E22", "E5"]
DOUBLE_DELETE = LEGAL + ["E23"] * 6 + ["E21"] * 6        # the right events, too many of them
UNFINISHED_DELETE = LEGAL + ["E23"] * 3                   # a usual length, counts no block has


def verdicts(detector, sessions, **kwargs):
    return detector.score([Sequence(list(keys), **kwargs) for keys in sessions])


def test_novelty_rules_each_catch_their_kind(normal):
    detector = NoveltyRules()
    stats = detector.fit(normal)
    assert stats["length_range"] == [13, 19] and stats["sessions"] == 300
    legal, unseen, short, double, unfinished = verdicts(
        detector, [LEGAL, UNSEEN_EVENT, STOPPED_EARLY, DOUBLE_DELETE, UNFINISHED_DELETE])
    assert not legal.anomalous and legal.score < 1.0
    assert [(a.position, a.kind, a.observed, a.details["rule"]) for a in unseen.anomalies][0] == (5, "key", "E20", "new_event")
    assert [a.details["rule"] for a in short.anomalies] == ["length", "count_vector"]
    assert short.anomalies[0].details["diagnosis"] == "a session of 2 events; training sessions have 13..19"
    assert short.anomalies[0].position == 2 and short.anomalies[0].observed == "<end>"
    assert [a.details["rule"] for a in double.anomalies] == ["length", "count_vector"]
    [counts] = unfinished.anomalies
    assert counts.details["rule"] == "count_vector" and counts.details["distance"] == 3.0
    # One rule alone catches only its kind.
    counts_only = NoveltyRules(rules=["count_vector"])
    counts_only.fit(normal)
    assert [v.anomalous for v in verdicts(counts_only, [LEGAL, UNSEEN_EVENT, UNFINISHED_DELETE])] == [False, True, True]
    length_only = NoveltyRules(rules=["length"])
    length_only.fit(normal)
    assert [v.anomalous for v in verdicts(length_only, [UNSEEN_EVENT, STOPPED_EARLY, UNFINISHED_DELETE])] == \
        [False, True, False]


def test_novelty_threshold_comes_from_held_out_normals_only(normal):
    detector = NoveltyRules(validation=0.3, seed=4)
    abnormal = [Sequence(DOUBLE_DELETE), Sequence(STOPPED_EARLY)]
    detector.fit(normal + abnormal, labels=[0] * len(normal) + [1, 1])
    vectors = detector.counts(normal)
    held = holdout(len(normal), 0.3, 4)
    expected = _nearest_l1(vectors[held], np.unique(vectors[~held], axis=0)).max()
    assert detector.count_threshold == expected
    assert detector.training["sessions"] == len(normal)             # labelled anomalies never train
    assert detector.length_range == (13, 19)


def test_open_windows_are_judged_by_new_events_only(normal):
    detector = NoveltyRules()
    detector.fit(normal)
    window, context_only = verdicts(detector, [["E9", "E11", "E20"], ["E20", "E11", "E9"]],
                                    complete=False, start=False, judge_from=2)
    assert window.anomalous and window.anomalies[0].position == 2
    assert not context_only.anomalous                                # E20 is context, judged before
    assert not verdicts(detector, [STOPPED_EARLY], complete=False)[0].anomalous   # may go on


def test_pca_flags_off_space_sessions(normal):
    detector = PCADetector()
    stats = detector.fit(normal)
    assert 1 <= stats["components"] <= len(detector.vocabulary) + 1
    assert stats["training_sessions_over_threshold"] <= 3          # 99.95 % limit on 300 normals
    legal, unseen, unfinished, double = verdicts(detector, [LEGAL, UNSEEN_EVENT, UNFINISHED_DELETE, DOUBLE_DELETE])
    assert not legal.anomalous
    assert unseen.anomalous and unseen.score > 1.0
    assert unfinished.anomalous and unfinished.anomalies[0].details["rule"] == "pca"
    # Twice the deletes lies along the normal variation (0 or 3 of each): PCA's blind spot.
    assert not double.anomalous
    assert not verdicts(detector, [UNSEEN_EVENT], complete=False)[0].anomalous      # whole sessions only


@pytest.mark.parametrize("cls", [NoveltyRules, PCADetector])
def test_save_load_gives_the_same_verdicts(cls, normal, tmp_path):
    detector = cls()
    detector.fit(normal, templates={"E22": "<*>allocateBlock:<*>"})
    detector.save(tmp_path / "model")
    manifest = artifacts.read_manifest(tmp_path / "model")
    assert manifest["detector"] == cls.name and manifest["vocabulary"][0]["id"] == "E5"
    assert {"id": "E22", "template": "<*>allocateBlock:<*>"} in manifest["vocabulary"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["manifest.json", "weights.safetensors"]
    loaded = artifacts.load(tmp_path / "model")
    sessions = [LEGAL, UNSEEN_EVENT, STOPPED_EARLY, DOUBLE_DELETE, UNFINISHED_DELETE]
    assert [(v.anomalous, v.score) for v in verdicts(loaded, sessions)] == \
        [(v.anomalous, v.score) for v in verdicts(detector, sessions)]


def test_options_of_other_detectors_are_refused(normal):
    with pytest.raises(ValueError, match="novelty has no option g"):
        NoveltyRules().fit(normal, g=9)
    with pytest.raises(ValueError, match="rules must be some of"):
        NoveltyRules(rules=["ngram"])
    with pytest.raises(RuntimeError, match="before fit"):
        PCADetector().score([Sequence(LEGAL)])


def _write(path: Path, sessions) -> Path:
    path.write_text("".join(" ".join(k[1:] for k in keys) + "\n" for keys in sessions))
    return path


@pytest.mark.parametrize("name", ["novelty", "pca"])
def test_cli_trains_and_evaluates_a_baseline(name, normal, tmp_path, capsys):
    train = _write(tmp_path / "normal", [s.keys for s in normal])
    test_normal = _write(tmp_path / "test_normal", [LEGAL])
    test_abnormal = _write(tmp_path / "test_abnormal", [UNSEEN_EVENT, UNFINISHED_DELETE])
    model = tmp_path / "model"
    assert cli(["train", "--detector", name, "--normal", str(train), "--out", str(model), "--no-progress"]) == 0
    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--detector", name, "--model", str(model), "--normal", str(test_normal),
                "--abnormal", str(test_abnormal), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["all"]
    assert (result["tp"], result["fp"], result["fn"]) == (2, 0, 0)
    capsys.readouterr()
    assert cli(["train", "--detector", name, "--normal", str(train), "--out", str(tmp_path / "m2"),
                "--epochs", "3", "--no-progress"]) == 2
    assert f"{name} has no option epochs" in capsys.readouterr().err
