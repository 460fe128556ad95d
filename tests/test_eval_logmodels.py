"""bench/eval_logmodels.py's own arithmetic: the re-weighting to HDFS's mix and the clean split."""
from __future__ import annotations

import random

from bench.eval_logmodels import REAL_MIX, judged, reweighted, supervised_split
from models.metrics import Confusion


def test_reweighting_counts_each_session_at_its_share_of_the_real_mix():
    # 1 of 1,000 normal sessions flagged, 990 of 1,000 anomalous ones caught.
    c = Confusion(tp=990, fp=1, tn=999, fn=10)
    fp, tp = REAL_MIX[0] / 1000, 990 * REAL_MIX[1] / 1000
    expected_precision = tp / (tp + fp)
    figures = reweighted(c)
    assert figures["precision"] == round(expected_precision, 4)
    assert figures["f1"] == round(2 * expected_precision * 0.99 / (expected_precision + 0.99), 4)
    assert reweighted(Confusion(tp=5, fp=0, tn=5, fn=0)) == {"precision": 1.0, "f1": 1.0}


def test_judged_splits_by_length():
    result = judged([1, 1, 0, 0], [True, False, True, False], [2, 20, 3, 30], h=10)
    assert (result["all"]["tp"], result["all"]["fp"], result["all"]["fn"]) == (1, 1, 1)
    assert (result["at_most_h"]["tp"], result["at_most_h"]["fp"]) == (1, 1)
    assert (result["longer_than_h"]["fn"], result["longer_than_h"]["tn"]) == (1, 1)


def test_supervised_split_keeps_every_test_sequence_out_of_training():
    rng = random.Random(0)
    keys = [tuple(rng.choice("ABC") for _ in range(rng.randint(1, 4))) for _ in range(300)]
    data = {"train": keys[:50],
            "dev": (keys[50:250], [i % 2 for i in range(200)]),
            "5k": (keys[250:], [0] * 50)}
    train, train_labels, test, test_labels = supervised_split(data, seed=3)
    assert test and not set(test) & set(train)
    assert len(train) == len(train_labels) and len(test) == len(test_labels)
    assert train[:50] == keys[:50] and train_labels[:50] == [0] * 50
    assert supervised_split(data, seed=3)[2] == test and supervised_split(data, seed=4)[2] != test
