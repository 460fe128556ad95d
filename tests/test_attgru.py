"""ATT-GRU: training separates normal from abnormal, masked attention, vectors for unseen
templates, sliding windows, save/load and the CLI contract — on small synthetic sessions."""
from __future__ import annotations

import copy

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.attgru import END, AttGRU, AttGRUNet, TemplateEmbedder, edit_template, template_tokens
from models.base import Sequence
from services.cli import main as cli
from tests.memoutil import memo_agrees_with_computing

# An HDFS-like block: allocate, receive on three datanodes, responders terminate, namenode
# records the replicas. Abnormal blocks carry an exception somewhere, or stop after the receives.
TEMPLATES = {
    "E1": "<*>BLOCK* NameSystem<*>allocateBlock:<*>",
    "E2": "<*>Receiving block<*>src:<*>dest:<*>",
    "E3": "<*>Received block<*>of size<*>from<*>",
    "E4": "<*>PacketResponder <*> for block <*> terminating<*>",
    "E5": "<*>BLOCK* NameSystem<*>addStoredBlock: blockMap updated:<*>is added to<*>size<*>",
    "E6": "<*>Exception in receiveBlock for block<*>",
    "E7": "<*>writeBlock<*>received exception<*>",
    "E8": "<*>Verification succeeded for<*>",
}
ERRORS = ("E6", "E7")


def normal_block(rng: random.Random) -> list[str]:
    receives = ["E2"] * 3
    receives.insert(rng.randint(0, 3), "E1")
    middle = [k for _ in range(3) for k in (["E3", "E4"] if rng.random() < 0.5 else ["E4", "E3"])]
    tail = ["E5"] * 3 + ["E8"] * rng.randint(0, 2)
    return receives + middle + tail


def abnormal_block(rng: random.Random) -> tuple[list[str], int | None]:
    """(keys, index of the error event or None for a block that stopped early)."""
    keys = normal_block(rng)
    if rng.random() < 0.25:
        return keys[:rng.randint(2, 5)], None
    at = rng.randint(1, len(keys))
    return keys[:at] + [rng.choice(ERRORS)] + keys[at:], at


def sequence(keys: list[str]) -> Sequence:
    return Sequence(keys=list(keys), templates=[TEMPLATES[k] for k in keys])


def dataset(seed: int, normal: int, abnormal: int):
    rng = random.Random(seed)
    blocks = [(normal_block(rng), None, 0) for _ in range(normal)]
    for _ in range(abnormal):
        keys, at = abnormal_block(rng)
        blocks.append((keys, at, 1))
    return blocks


@pytest.fixture(scope="module")
def trained() -> AttGRU:
    torch.set_num_threads(1)
    blocks = dataset(seed=0, normal=200, abnormal=50)
    detector = AttGRU(epochs=10, batch_size=256, seed=3, device="cpu")
    stats = detector.fit([sequence(k) for k, _, _ in blocks], [y for _, _, y in blocks], templates=TEMPLATES)
    assert stats["abnormal_sessions"] == 50 and 0 < stats["abnormal_windows"] < stats["windows"]
    return detector


def test_training_separates_normal_from_abnormal(trained):
    held_out = dataset(seed=99, normal=100, abnormal=40)
    verdicts = trained.score([sequence(k) for k, _, _ in held_out])
    flagged = [v.anomalous for v in verdicts]
    truth = [bool(y) for _, _, y in held_out]
    accuracy = sum(f == t for f, t in zip(flagged, truth)) / len(truth)
    assert accuracy >= 0.95, accuracy
    for (keys, at, label), verdict in zip(held_out, verdicts):
        if label and verdict.anomalous and at is not None:
            # the first abnormal window holds the error: it ends at or after the error event
            assert verdict.anomalies[0].position >= at
        if verdict.anomalous:
            first = verdict.anomalies[0]
            assert first.kind in ("window", "end")
            assert first.observed == (END if first.position == len(keys) else keys[first.position])
    normal_scores = [v.score for v, t in zip(verdicts, truth) if not t]
    abnormal_scores = [v.score for v, t in zip(verdicts, truth) if t]
    assert np.median(abnormal_scores) > 0.5 > np.median(normal_scores)


def test_attention_is_a_distribution_over_real_positions_only():
    torch.manual_seed(0)
    net = AttGRUNet(input_size=6, hidden=8)
    x = torch.randn(4, 10, 6)
    lengths = torch.tensor([1, 3, 7, 10])
    with torch.no_grad():
        logits, alpha = net(x, lengths)
    for row, n in zip(alpha, lengths.tolist()):
        assert torch.all(row[n:] == 0)                       # exactly zero on padding
        assert torch.all(row[:n] > 0)
        assert abs(float(row[:n].sum()) - 1.0) < 1e-6
    # what sits in the padding cannot change the result
    noisy = x.clone()
    for i, n in enumerate(lengths.tolist()):
        noisy[i, n:] = 100 * torch.randn(10 - n, 6)
    with torch.no_grad():
        logits2, alpha2 = net(noisy, lengths)
    assert torch.allclose(logits, logits2, atol=1e-6) and torch.allclose(alpha, alpha2)


def test_verdict_carries_attention_of_its_most_anomalous_window(trained):
    keys = ["E1", "E2", "E2", "E6"]
    verdict = trained.score([sequence(keys)])[0]
    start, end = verdict.details["window"]
    weights = verdict.details["attention"]
    assert len(weights) == end - start + 1 == len(verdict.details["window_keys"])
    assert abs(sum(weights) - 1) < 1e-4
    assert verdict.details["window_keys"] == (keys + [END])[start:end + 1]
    assert verdict.anomalous and "E6" in verdict.details["window_keys"]     # the window that mattered


def test_sliding_window_judges_the_newest_event(trained):
    rng = random.Random(5)
    keys = normal_block(rng)
    context = keys[:8]
    quiet = Sequence(keys=context, templates=[TEMPLATES[k] for k in context], complete=False,
                     judge_from=len(context) - 1)
    error = context + ["E7"]
    loud = Sequence(keys=error, templates=[TEMPLATES[k] for k in error], complete=False,
                    judge_from=len(error) - 1)
    v_quiet, v_loud = trained.score([quiet, loud])
    assert v_quiet.details["windows_judged"] == v_loud.details["windows_judged"] == 1
    assert not v_quiet.anomalous
    assert v_loud.anomalous and v_loud.anomalies[0].position == len(error) - 1
    assert v_loud.anomalies[0].observed == "E7"
    # an open session is never judged by an <end> window, however short it is
    short = Sequence(keys=["E1", "E2"], templates=[TEMPLATES["E1"], TEMPLATES["E2"]], complete=False, judge_from=1)
    assert END not in trained.score([short])[0].details["window_keys"]


def test_unseen_template_gets_its_vector_from_its_words(datasets):
    texts = {}
    for line in (datasets / "hdfs" / "HDFS_templates.csv").read_text().splitlines()[1:]:
        key, text = line.split(",", 1)
        texts[key] = text
    embedder = TemplateEmbedder.fit(texts.values(), vector_size=32, seed=1)
    original = embedder.vector(texts["E26"])
    changed = embedder.vector(texts["E26"].replace("updated:", ""))      # a word dropped
    grown = embedder.vector(texts["E26"].replace("size", "total size"))  # a known word inserted
    unrelated = embedder.vector(texts["E29"])                            # PendingReplicationMonitor
    assert float(changed @ original) > 0.9 and float(grown @ original) > 0.9
    assert float(unrelated @ original) < 0.6
    assert embedder.vector("<*> zzz qqq <*>") is None                    # no known word: no vector
    assert template_tokens("addStoredBlock: blockMap") == ["add", "stored", "block", "block", "map"]


def test_edit_template_changes_exactly_one_word():
    rng = random.Random(0)
    text = TEMPLATES["E5"]
    words = re.findall("[A-Za-z]+", text)
    for _ in range(50):
        edited = edit_template(text, rng, ["replica"])
        assert edited.count("<*>") == text.count("<*>")
        edited_words = re.findall("[A-Za-z]+", edited)
        if len(edited_words) < len(words):
            assert len(edited_words) == len(words) - 1 and set(edited_words) <= set(words)
        else:
            assert sorted(edited_words) == sorted(words + ["replica"])


def test_renamed_template_keeps_the_verdict(trained):
    """E5 renamed with a word dropped: the word2vec model sees nearly the old vector; every
    block still gets the verdict it got with the original template."""
    renamed = TEMPLATES["E5"].replace("updated:", "")
    held_out = dataset(seed=7, normal=60, abnormal=20)
    plain = [sequence(k) for k, _, _ in held_out]
    changed = [Sequence(keys=["E5x" if k == "E5" else k for k in keys],
                        templates=[renamed if k == "E5" else TEMPLATES[k] for k in keys]) for keys, _, _ in held_out]
    before = [v.anomalous for v in trained.score(plain)]
    after = [v.anomalous for v in trained.score(changed)]
    assert sum(a == b for a, b in zip(before, after)) >= 0.95 * len(before)
    # the new id got a vector from its words, not the "unknown" input
    extra = []
    rows = trained._rows(changed[:1], extra)[0]
    assert trained._unknown_row not in rows and len(extra) == 1
    assert float(extra[0] @ trained.template_vector(TEMPLATES["E5"])) > 0.9


def test_memo_returns_what_computing_returns_whatever_the_batches(trained):
    """Per-window outputs come from the memo once computed; whichever batches the windows come in
    and whatever was scored first, every verdict equals the one computed without a memo."""
    blocks = dataset(seed=21, normal=8, abnormal=8)
    windows = [Sequence(keys=keys[:p + 1], templates=[TEMPLATES[k] for k in keys[:p + 1]], complete=False,
                        judge_from=p, start=True) for keys, _, _ in blocks for p in range(len(keys))]
    renamed = "Receiving block<*>from a mirror<*>"                  # an unseen text: a row of its own
    windows += [Sequence(keys=["E1", "E9x", "E2"], templates=[TEMPLATES["E1"], renamed, TEMPLATES["E2"]],
                         complete=False, judge_from=2)]
    windows += [sequence(keys) for keys, _, _ in blocks]
    memo_agrees_with_computing(trained, windows, random.Random(6), largest_batch=40)


def test_save_load_round_trip_gives_identical_verdicts(trained, tmp_path):
    trained.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["manifest.json", "weights.safetensors"]
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["detector"] == "attgru" and manifest["window"] == manifest["h"] == 10
    assert {e["key"]: e["template"] for e in manifest["vocabulary"]} == TEMPLATES
    assert manifest["threshold"] == 0.5 and manifest["weighting"] == "mean" and manifest["word2vec_tokens"]
    loaded = AttGRU.load(tmp_path / "model", device="cpu")
    probe = [sequence(k) for k, _, _ in dataset(seed=11, normal=10, abnormal=10)]
    probe.append(Sequence(keys=["E1", "NEW", "E2"], templates=[TEMPLATES["E1"], "Receiving block from mirror", TEMPLATES["E2"]],
                          complete=False, judge_from=1))
    assert loaded.score(probe) == trained.score(probe)


def test_calibrate_picks_the_best_threshold_for_the_mix_and_serving_uses_it(trained, tmp_path):
    model = copy.deepcopy(trained)
    held_out = dataset(seed=77, normal=100, abnormal=40)
    seqs, labels = [sequence(k) for k, _, _ in held_out], [y for _, _, y in held_out]
    scores = np.array([v.score for v in model.score(seqs)])
    y = np.array(labels, dtype=bool)
    share = 0.03

    def f1_at(t):                      # independent of calibrate(): F1 at the mix, by brute force
        flagged = scores >= t
        r, fpr = (flagged & y).mean() / y.mean(), (flagged & ~y).mean() / (~y).mean()
        tp, fp, fn = share * r, (1 - share) * fpr, share * (1 - r)
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    model.threshold = 1e-4             # a bad start: it flags nearly every session
    best_on_grid = max(f1_at(t) for t in np.linspace(1e-4, 1, 2001))
    assert f1_at(1e-4) < best_on_grid - 0.5
    record = model.calibrate(seqs, labels, anomaly_share=share)
    assert record["threshold_before"] == 1e-4 and model.threshold == record["threshold"]
    assert f1_at(model.threshold) >= best_on_grid - 1e-9 and record["f1"] > record["f1_before"]
    assert abs(record["f1"] - f1_at(model.threshold)) < 1e-3
    # serving judges with the calibrated threshold, and it travels with the artifact
    assert [v.anomalous for v in model.score(seqs)] == list(scores >= model.threshold)
    model.save(tmp_path / "calibrated")
    loaded = AttGRU.load(tmp_path / "calibrated", device="cpu")
    assert loaded.threshold == model.threshold and loaded.score(seqs) == model.score(seqs)
    assert json.loads((tmp_path / "calibrated" / "manifest.json").read_text())["training"]["calibration"] == record
    with pytest.raises(ValueError, match="normal and abnormal"):
        model.calibrate(seqs[:5], [0] * 5)
    with pytest.raises(ValueError, match="anomaly_share"):
        model.calibrate(seqs, labels, anomaly_share=1.5)


def test_one_hot_and_no_attention_variants_round_trip(tmp_path):
    blocks = dataset(seed=1, normal=40, abnormal=10)
    for options in ({"embedding": "onehot"}, {"attention": False}):
        detector = AttGRU(epochs=3, device="cpu", **options)
        detector.fit([sequence(k) for k, _, _ in blocks], [y for _, _, y in blocks], templates=TEMPLATES)
        detector.save(tmp_path / str(options))
        probe = [sequence(["E1", "E2", "E6"]),
                 Sequence(keys=["E1", "E9"], templates=[TEMPLATES["E1"], "Deleting block <*> file <*>"])]
        unseen_row = detector._rows(probe[1:], [])[0][1]
        assert (unseen_row == detector._unknown_row) == (options.get("embedding") == "onehot")
        assert AttGRU.load(tmp_path / str(options), device="cpu").score(probe) == detector.score(probe)


def test_same_seed_same_model():
    blocks = dataset(seed=2, normal=30, abnormal=10)
    scores = []
    for _ in range(2):
        detector = AttGRU(epochs=5, seed=4, device="cpu")
        detector.fit([sequence(k) for k, _, _ in blocks], [y for _, _, y in blocks], templates=TEMPLATES)
        scores.append([v.score for v in detector.score([sequence(k) for k, _, _ in blocks])])
    assert scores[0] == scores[1]


def test_fit_refuses_unlabelled_or_one_class_data():
    seqs = [sequence(["E1", "E2"])] * 3
    with pytest.raises(ValueError, match="supervised"):
        AttGRU(device="cpu").fit(seqs)
    with pytest.raises(ValueError, match="both normal and abnormal"):
        AttGRU(device="cpu").fit(seqs, [0, 0, 0])
    with pytest.raises(ValueError, match="no option g"):
        AttGRU(device="cpu").fit(seqs, [0, 1, 0], g=9)
    with pytest.raises(ValueError, match="template texts"):
        AttGRU(device="cpu").fit([Sequence(keys=["E1"])] * 2, [0, 1])


# ---- CLI ------------------------------------------------------------------------------------
def write_keys(path: Path, blocks) -> Path:
    path.write_text("".join(" ".join(k[1:] for k in keys) + "\n" for keys, _, _ in blocks))
    return path


def test_cli_train_and_evaluate(tmp_path, capsys):
    torch.set_num_threads(1)
    csv = tmp_path / "templates.csv"
    csv.write_text("EventId,EventTemplate\n" + "".join(f"{k},{t}\n" for k, t in TEMPLATES.items()))
    train, test = dataset(seed=20, normal=120, abnormal=30), dataset(seed=21, normal=60, abnormal=20)
    files = {name: write_keys(tmp_path / name, [b for b in blocks if b[2] == label])
             for name, blocks, label in (("normal", train, 0), ("abnormal", train, 1),
                                         ("test_normal", test, 0), ("test_abnormal", test, 1))}
    out = tmp_path / "model"
    assert cli(["train", "--detector", "attgru", "--normal", str(files["normal"]), "--abnormal",
                str(files["abnormal"]), "--templates", str(csv), "--out", str(out), "--epochs", "30",
                "--device", "cpu", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["detector"] == "attgru"
    assert {s["role"] for s in manifest["training_data"]} == {"normal", "abnormal"}
    assert all(len(s["sha256"]) == 64 for s in manifest["training_data"])
    result = tmp_path / "eval.json"
    assert cli(["evaluate", "--detector", "attgru", "--model", str(out), "--normal", str(files["test_normal"]),
                "--abnormal", str(files["test_abnormal"]), "--templates", str(csv), "--json", str(result),
                "--device", "cpu"]) == 0
    report = json.loads(result.read_text())
    assert set(report) == {"all", "longer_than_window", "g", "h"} and report["g"] is None and report["h"] == 10
    assert report["all"]["tp"] + report["all"]["fn"] == 20 and report["all"]["f1"] >= 0.9

    capsys.readouterr()
    assert cli(["train", "--detector", "attgru", "--normal", str(files["normal"]), "--templates", str(csv),
                "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "supervised" in err

    # --calibrate: a held-out share of the distinct sessions sets the threshold, which the
    # manifest keeps and evaluate uses
    calibrated = tmp_path / "calibrated"
    assert cli(["train", "--detector", "attgru", "--normal", str(files["normal"]), "--abnormal",
                str(files["abnormal"]), "--templates", str(csv), "--out", str(calibrated), "--epochs", "30",
                "--device", "cpu", "--no-progress", "--calibrate", "0.3", "--anomaly-share", "0.03"]) == 0
    manifest = json.loads((calibrated / "manifest.json").read_text())
    record = manifest["training"]["calibration"]
    assert record["anomaly_share"] == 0.03 and manifest["threshold"] == record["threshold"]
    distinct = len({tuple(keys) for keys, _, _ in train})
    assert 0.15 * distinct < record["sessions"] < 0.45 * distinct and 0 < record["anomalous"] < record["sessions"]
    assert manifest["training"]["sessions"] + record["sessions"] <= len(train)
    for bad, why in ((["--detector", "deeplog", "--calibrate", "0.2"], "no session threshold"),
                     (["--detector", "attgru", "--anomaly-share", "0.1"], "needs --calibrate"),
                     (["--detector", "attgru", "--calibrate", "2"], "must be in (0, 1]")):
        capsys.readouterr()
        try:
            code = cli(["train", *bad, "--normal", str(files["normal"]), "--abnormal", str(files["abnormal"]),
                        "--templates", str(csv), "--out", str(tmp_path / "bad")])
        except SystemExit as exit_:      # argparse's own one-line error
            code = exit_.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and why in err, (bad, err)
