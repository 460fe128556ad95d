"""DeepLog on a tiny synthetic grammar: a -> b -> (c | d -> c) -> e{1,3} -> f.

Small networks and few epochs keep these fast; the grammar is strict enough that a correctly
trained key model separates legal and illegal transitions with g=2.
"""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from models.base import Sequence
from models.data import holdout
from models.deeplog import END, DeepLog
from models.memo import RowMemo
from tests.memoutil import memo_agrees_with_computing

H, G = 6, 2
SMALL = dict(h=H, g=G, hidden=16, layers=1, embedding=8, epochs=30, batch_size=8, lr=2e-2,
             param_hidden=16, param_layers=1, param_epochs=30, param_min_events=100)


def grammar_session(rng: random.Random) -> list[str]:
    return ["a", "b"] + (["c"] if rng.random() < 0.5 else ["d", "c"]) + ["e"] * rng.randint(1, 3) + ["f"]


@pytest.fixture(scope="module")
def trained() -> DeepLog:
    rng = random.Random(0)
    detector = DeepLog(**SMALL)
    detector.fit([Sequence(grammar_session(rng)) for _ in range(200)],
                 templates={"a": "Receiving block <*>", "b": "Allocate <*>"})
    return detector


def verdict_of(detector: DeepLog, keys: list[str], **kwargs):
    return detector.score([Sequence(list(keys), **kwargs)])[0]


LEGAL = [["a", "b", "c", "e", "f"], ["a", "b", "d", "c", "e", "e", "e", "f"], ["a", "b", "c", "e", "e", "f"]]


@pytest.mark.parametrize("keys", LEGAL)
def test_legal_sessions_are_not_flagged(trained, keys):
    verdict = verdict_of(trained, keys)
    assert not verdict.anomalous, [a.details["diagnosis"] for a in verdict.anomalies]
    assert verdict.details["judged"] == len(keys) + 1        # every event and the end
    assert 0.0 <= verdict.score < 1.0


def test_wrong_transition_is_caught_and_diagnosed(trained):
    verdict = verdict_of(trained, ["a", "b", "e", "f"])       # b -> e skips c/d
    assert verdict.anomalous
    first = verdict.anomalies[0]
    assert (first.position, first.kind, first.observed) == (2, "key", "e")
    assert {k for k, _ in first.expected} >= {"c", "d"}
    assert len(first.expected) == G
    probabilities = [p for _, p in first.expected]
    assert probabilities == sorted(probabilities, reverse=True)
    assert first.details["window"] == ["a", "b"]
    assert first.details["rank"] > G
    assert first.details["transition"] == {"after": "b", "expected": ["c", "d"], "observed": "e"} or \
        first.details["transition"] == {"after": "b", "expected": ["d", "c"], "observed": "e"}
    assert first.details["diagnosis"].startswith("after b expected ")
    assert first.details["diagnosis"].endswith(", saw e")
    assert first.details["expected_templates"] == {}          # c/d have no known texts
    assert verdict.details["first_anomaly"] == 2


def test_workflow_is_the_grammar(trained):
    workflow = trained.workflow
    assert list(workflow["<start>"]) == ["a"]     # successors: most probable first
    assert list(workflow["a"]) == ["b"]
    assert set(workflow["b"]) == {"c", "d"}
    assert list(workflow["d"]) == ["c"]
    assert list(workflow["f"]) == [END]


def test_short_session_uses_start_padding_and_end(trained):
    # Shorter than h: judged with <start> padding, exactly as every training session was.
    assert len(LEGAL[0]) < H
    assert not verdict_of(trained, LEGAL[0]).anomalous
    truncated = verdict_of(trained, ["a", "b", "c"])         # a closed session that stops early
    assert truncated.anomalous
    end = truncated.anomalies[-1]
    assert (end.position, end.kind, end.observed) == (3, "end", END)
    assert end.details["diagnosis"].startswith("after c expected e")
    # The same events in an open session (sliding window): the end is not judged.
    assert not verdict_of(trained, ["a", "b", "c"], complete=False).anomalous


def test_probability_floor_catches_what_a_lenient_top_g_lets_through(trained):
    """With g as large as the vocabulary top-g flags nothing; the floor, chosen on held-out normal
    sessions, still flags a two-key session that stops early and passes complete normal ones."""
    lenient = copy.deepcopy(trained)
    lenient.g = len(lenient.vocabulary)
    assert 0 < lenient.floor < 0.5
    stopped = verdict_of(lenient, ["a", "b"])
    assert stopped.anomalous
    end = stopped.anomalies[-1]
    assert (end.position, end.kind, end.observed) == (2, "end", END)
    assert end.details["below_floor"] and end.details["probability"] < end.details["floor"] == lenient.end_floor
    for keys in LEGAL:
        assert not verdict_of(lenient, keys).anomalous, keys
    lenient.floor = 0.0                                         # the end's own floor still flags it
    assert verdict_of(lenient, ["a", "b"]).anomalous
    lenient.end_floor = 0.0                                     # top-g alone lets it through
    assert not verdict_of(lenient, ["a", "b"]).anomalous


def test_the_end_has_its_own_floor_under_every_held_out_sessions_end(trained):
    """<end> gets end_margin times the lowest end probability of a held-out normal session, never
    more than the lowest the model gives a training session's end, never under the general floor."""
    choice = trained.floor_choice
    assert trained.end_floor == choice["end_floor"] == max(
        trained.floor, min(trained.end_margin * choice["lowest_held_out_end_probability"],
                           choice["lowest_training_end_probability"]))
    assert trained.end_floor >= trained.floor > 0
    assert trained.end_margin == 0.1
    with pytest.raises(ValueError, match="end_margin"):
        DeepLog(end_margin=2.0)


def test_floor_is_chosen_on_held_out_normal_sessions_only():
    rng = random.Random(5)
    normal = [Sequence(grammar_session(rng)) for _ in range(120)]
    abnormal = [Sequence(["a", "b"]), Sequence(["a", "b", "e", "f"]), Sequence(["a", "f"])]
    options = {**SMALL, "epochs": 15, "floor_validation": 0.25, "floor_quantile": 0.0}
    detector = DeepLog(**options)
    stats = detector.fit(normal + abnormal, labels=[0] * len(normal) + [1] * len(abnormal))
    choice = stats["floor"]
    held = holdout(len(normal), 0.25, detector.seed)
    assert stats["sessions"] == len(normal)                      # labelled anomalies never train
    assert (stats["held_out_sessions"], stats["key_model_sessions"]) == (int(held.sum()), int((~held).sum()))
    # The key model is the one trained on the rest alone (same seed): it never saw the held-out part.
    rest = DeepLog(**{**options, "floor_validation": 0.0})
    rest.fit([s for s, h in zip(normal, held) if not h])
    assert rest.floor == 0.0 and rest.vocabulary == detector.vocabulary
    assert all(torch.equal(a, b) for a, b in zip(rest.model.state_dict().values(), detector.model.state_dict().values()))
    lows = []
    for seq in (s for s, h in zip(normal, held) if h):
        _, windows, _ = rest._judged_windows([seq])
        lows.append(float(rest._observe(windows)[1].min()))
    assert choice["held_out"] == min(lows) and choice["validation_sessions"] == len(lows)
    assert detector.floor == min(choice["held_out"], choice["lowest_training_probability"]) > 0
    # No normal session, held out or trained on, is flagged.
    assert not any(v.anomalous for v in detector.score(normal))
    # floor_quantile lets that share of the held-out sessions fall under it.
    lenient = DeepLog(**{**options, "floor_quantile": 0.1})
    assert lenient.fit(normal)["floor"]["held_out"] == sorted(lows)[int(0.1 * len(lows))]


def test_unknown_template_is_always_anomalous(trained):
    verdict = verdict_of(trained, ["a", "b", "zz", "e", "f"], templates=["", "", "Disk on fire <*>", "", ""])
    unknown = verdict.anomalies[0]
    assert (unknown.position, unknown.observed, unknown.score) == (2, "zz", 1.0)
    assert unknown.details["unknown"] is True
    assert unknown.details["observed_template"] == "Disk on fire <*>"
    assert "never seen in training" in unknown.details["diagnosis"]
    assert verdict.score == 1.0
    # Even with g as large as the vocabulary and no floor an unseen key is not among the top g.
    wide = copy.deepcopy(trained)
    wide.g, wide.floor = len(wide.vocabulary), 0.0
    assert wide.score([Sequence(["a", "b", "zz", "e", "f"])])[0].anomalous
    assert not wide.score([Sequence(["a", "b", "e", "f"])])[0].anomalous


def test_sliding_windows_agree_with_the_closed_session(trained):
    """A window of h context events + the newest one (start=False) gives the verdict the whole
    session gives at that position; judge_from keeps the context unjudged."""
    session = ["a", "b", "d", "c", "e", "e", "c", "f"]          # e -> c is illegal (position 6)
    whole = verdict_of(trained, session, complete=False)
    flagged = {a.position for a in whole.anomalies}
    assert 6 in flagged
    for p in range(H, len(session)):
        window = verdict_of(trained, session[p - H:p + 1], start=False, complete=False, judge_from=H)
        assert window.details["judged"] == 1
        assert window.anomalous == (p in flagged)
        if window.anomalous:
            assert window.anomalies[0].position == H
    for p in range(1, H):                                      # window from the session start
        window = verdict_of(trained, session[:p + 1], start=True, complete=False, judge_from=p)
        assert window.anomalous == (p in flagged)


def test_positions_without_full_history_are_not_judged(trained):
    verdict = verdict_of(trained, ["e", "c", "a"], start=False, complete=False)
    assert not verdict.anomalous
    assert verdict.details == {"judged": 0, "unjudged": 3}


def test_batched_scores_equal_single_scores(trained):
    sessions = LEGAL + [["a", "b", "e", "f"], ["a", "zz"], ["a"]]
    batched = trained.score([Sequence(s) for s in sessions])
    single = [verdict_of(trained, s) for s in sessions]
    assert [(v.anomalous, round(v.score, 6)) for v in batched] == [(v.anomalous, round(v.score, 6)) for v in single]


def test_labels_keep_only_normal_sessions_for_training():
    rng = random.Random(1)
    normal = [Sequence(grammar_session(rng)) for _ in range(20)]
    abnormal = [Sequence(["q", "r", "s"])]
    detector = DeepLog(**{**SMALL, "epochs": 1})
    stats = detector.fit(normal + abnormal, labels=[0] * 20 + [1])
    assert stats["sessions"] == 20 == stats["key_model_sessions"] + stats["held_out_sessions"]
    assert "q" not in detector.index


def test_bad_options_and_data_are_errors():
    with pytest.raises(ValueError, match="h must be a positive integer"):
        DeepLog(h=0)
    with pytest.raises(ValueError, match="unknown option"):
        DeepLog().fit([Sequence(["a"])], windw=3)
    with pytest.raises(ValueError, match="no normal sequence"):
        DeepLog().fit([Sequence([])])
    with pytest.raises(RuntimeError, match="before fit"):
        DeepLog().score([Sequence(["a"])])


def test_same_seed_same_model_other_seed_other_model():
    rng = random.Random(2)
    data = [Sequence(grammar_session(rng)) for _ in range(40)]
    options = {**SMALL, "epochs": 3}
    first, second, other = DeepLog(**options), DeepLog(**options), DeepLog(**{**options, "seed": 7})
    for detector in (first, second, other):
        detector.fit(data)
    a, b, c = (d.model.state_dict() for d in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------------------------
# parameter values
def timed_session(rng: random.Random, x_value: float | None = None, gap: float | None = None) -> Sequence:
    keys = ["a", "x", "y", "x", "b"]
    t, times, params = 1000.0, [], []
    for i, key in enumerate(keys):
        t += gap if (gap is not None and i == 3) else rng.uniform(0.9, 1.1)
        times.append(t)
        params.append([rng.gauss(10, 1)] if key == "x" else ([rng.gauss(100, 5), 3.0] if key == "y" else []))
    if x_value is not None:
        params[3] = [x_value]
    return Sequence(keys, params=params, timestamps=times)


@pytest.fixture(scope="module")
def with_params() -> DeepLog:
    rng = random.Random(3)
    detector = DeepLog(**{**SMALL, "h": 4})
    stats = detector.fit([timed_session(rng) for _ in range(200)], param_epochs=15)
    assert stats["parameter_models"]["trained"] >= 2
    return detector


def typical_session(x_value: float = 10.0, gap: float = 1.0) -> Sequence:
    """Values at their training means, events a second apart (the one before x's second
    occurrence ``gap`` seconds)."""
    times = [1000.0, 1001.0, 1002.0, 1002.0 + gap, 1003.0 + gap]
    return Sequence(["a", "x", "y", "x", "b"], params=[[], [10.0], [100.0, 3.0], [x_value], []], timestamps=times)


def parameter_anomalies(verdict):
    return [a for a in verdict.anomalies if a.kind == "parameter"]


def test_parameter_value_out_of_range_is_caught(with_params):
    verdict = with_params.score([typical_session(x_value=40.0)])[0]
    found = parameter_anomalies(verdict)
    assert [(a.position, a.observed) for a in found] == [(3, "x")]
    details = found[0].details
    assert details["value"] == [1.0, 40.0]                     # [seconds since previous, value]
    low, high = details["interval"]
    assert low <= high < details["error"]
    assert 5 < details["predicted"][1] < 15
    assert "outside" in details["diagnosis"]
    assert not [a for a in verdict.anomalies if a.kind == "key"]   # the keys themselves are fine


def test_parameter_timing_out_of_range_is_caught(with_params):
    verdict = with_params.score([typical_session(gap=30.0)])[0]
    assert [(a.position, a.observed) for a in parameter_anomalies(verdict)] == [(3, "x")]


@pytest.mark.parametrize("value", [9.5, 10.0, 10.5])
def test_normal_parameter_values_are_not_flagged(with_params, value):
    assert not with_params.score([typical_session(x_value=value)])[0].anomalous


def test_thresholds_are_in_the_manifest(with_params, tmp_path):
    with_params.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    x = manifest["thresholds"]["x"]
    assert x["dims"] == 2 and x["validation_events"] >= 10
    assert x["interval"][1] > 0


# --------------------------------------------------------------------------------------------
# artifacts and online update
@pytest.mark.parametrize("fixture", ["trained", "with_params"])
def test_save_load_round_trip_gives_identical_verdicts(request, fixture, tmp_path):
    detector: DeepLog = request.getfixturevalue(fixture)
    rng = random.Random(8)
    probes = [Sequence(["a", "b", "e", "f"]), Sequence(["a", "zz"]), Sequence(["a", "b", "c"], complete=False),
              timed_session(rng), timed_session(rng, x_value=50.0)] + [Sequence(k) for k in LEGAL]
    detector.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "weights.safetensors"]
    loaded = DeepLog.load(tmp_path, device="cpu")
    before, after = detector.score(probes), loaded.score(probes)
    for x, y in zip(before, after):
        assert (x.anomalous, x.score) == (y.anomalous, y.score)
        assert [(a.position, a.kind, a.observed, a.expected, a.details) for a in x.anomalies] == \
            [(a.position, a.kind, a.observed, a.expected, a.details) for a in y.anomalies]
    assert (loaded.floor, loaded.end_floor) == (detector.floor, detector.end_floor)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["detector"] == "deeplog" and (manifest["h"], manifest["g"]) == (detector.h, G)
    del manifest["end_floor"]                 # a model saved before <end> had a floor of its own
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert DeepLog.load(tmp_path, device="cpu").end_floor == detector.floor
    assert {"id": "a", "template": "Receiving block <*>"} in manifest["vocabulary"] or fixture == "with_params"
    assert manifest["workflow"] == json.loads(json.dumps(detector.workflow))


def stream_windows(sessions: list[list[str]], h: int = H) -> list[Sequence]:
    """What the window stage sends: per event, up to h events of context + the event."""
    return [Sequence(keys[max(0, p - h):p + 1], start=p <= h, complete=False, judge_from=min(p, h))
            for keys in sessions for p in range(len(keys))]


def outcome(verdict):
    return (verdict.anomalous, verdict.score, [(a.position, a.kind, a.observed, a.expected, a.details)
                                               for a in verdict.anomalies])


def test_memo_returns_what_computing_returns_whatever_the_batches(trained):
    sessions = LEGAL + [["a", "b", "e", "f"], ["a", "zz", "b", "c", "e", "f"], ["a", "b", "d", "c", "e", "e", "c", "f"]]
    windows = stream_windows(sessions) + [Sequence(s) for s in sessions]
    memo_agrees_with_computing(trained, windows, random.Random(4), largest_batch=9, view=outcome)


def test_online_update_clears_a_reported_false_positive(trained):
    detector = copy.deepcopy(trained)
    reported = Sequence(["a", "b", "d", "g", "c", "e", "f"])    # a new legal step g after d
    assert detector.score([reported])[0].anomalous
    assert len(detector.memo) > 0
    result = detector.update([reported], epochs=30)
    assert result["still_flagged"] == 0 and result["new_keys"] == ["g"]
    # Nothing memoised before the update survives it: verdicts equal freshly computed ones.
    fresh = copy.deepcopy(detector)
    fresh.memo = RowMemo(0)
    probes = [reported] + stream_windows(LEGAL + [["a", "b", "e", "f"]])
    assert [outcome(v) for v in detector.score(probes)] == [outcome(v) for v in fresh.score(probes)]
    assert not detector.score([reported])[0].anomalous
    # The rest of the grammar is still known: an illegal transition is still caught.
    assert detector.score([Sequence(["a", "b", "e", "f"])])[0].anomalous
    assert not detector.score([Sequence(LEGAL[1])])[0].anomalous
    assert "g" in detector.index
