"""ATT-GRU on HDFS: train on a labelled split of HDFS_100k blocks, test on the held-out blocks.

    nice -n 10 .venv/bin/python -m bench.attgru_eval --out /tmp/attgru_eval.json

Split: the ``deeploglizer_split`` column of HDFS_100k_block_labels.csv (deep-loglizer's seeded
random 80/20 split: train 6,352 blocks / 256 anomalous, test 1,588 / 57). Test blocks are used
for nothing but the final scores; word2vec is fitted on the 30 template texts of
HDFS_templates.csv (no block data), so no test block shapes the template vectors either.

The primary model goes through the CLI's own code path (`logwarden train` / `logwarden evaluate`
on session files written to a temporary directory); the ablations are the same class with one
option changed: ``attention=False`` (plain 2-layer BiGRU, the paper's Tables 6/7),
``embedding="onehot"`` (template index instead of template words) and ``edit_rate=0`` (no edited
templates in training).

Reported beside each F1:
* ``ceiling`` — the sequences stop at line 100k while the labels describe the block's whole life
  (many anomalous blocks fail after the cut), so identical key sequences carry both labels. No
  detector that sees only the key sequence can beat giving each distinct sequence its majority
  label; that is the ceiling.
* ``visible_anomalies`` — the same test set minus the anomalous blocks whose key sequence is
  also the sequence of a *normal training* block (their anomaly happened after the cut). Decided
  from training labels only; every test normal block stays.
* ``template_vectors`` — the choice of plain mean over TF-IDF and of 50 word2vec epochs (no
  training data involved; see ``template_vector_geometry``).
* ``perturbed`` — 10% of the vocabulary's templates (3 of 30, drawn among the templates that occur
  in the test blocks) get one word inserted or dropped and a new id at test time, as when a log
  statement changes; the word2vec models get their vectors from their words, the one-hot model
  can only see "unknown". F1 per draw and the mean drop. The default model also saw random
  one-word edits of its templates in training (``edit_rate``; other random draws of the same
  kind of edit), ``attgru_no_edit_training`` did not.

``attgru_plus_complete_normal``: the same training, with the 4,855 normal sessions of
``deeplog_hdfs_train`` appended to the normal session file (``logwarden train`` needs nothing
more: one ``--normal`` file holding both). Those sessions are *complete* (whole-log: they go on to
the deletions, E23/E21, that few HDFS_100k blocks reach before line 100k), carry no block ids and
no labels but "normal"; by the window-labelling rule (models/attgru.py) every window they contain
is normal. Whether some are the complete sessions of held-out test blocks cannot be decided (the
file has no block ids, and a test block's cut sequence fits many complete ones); what
``complete_sessions`` measures below is free of that question.

``complete_sessions`` — the blocks the detector meets in a stream run to their end, unlike the
cut HDFS_100k sequences: HDFS_5k.log (every line, over the whole log, of 110 blocks; labels
HDFS_5k_block_labels.csv), sessions built by ``models.data.sessions_from_logs`` (the stream's
parse and window cores, as the demo builds them), scored by ``Detector.score``. Both models are
trained again without any block of HDFS_20000_block_labels.csv (HDFS_5k's among them, as the demo
trains), and the complete normal sessions lose every one whose key multiset equals an HDFS_5k
session's (``models.data.without_possible_copies``: a copy of an HDFS_5k block in any event order
would), so no HDFS_5k block is in either training set. ``unseen_templates``: per model, the
templates of HDFS_5k sessions that no training session contains, with how many normal and
anomalous HDFS_5k sessions carry each (a supervised window classifier can only guess on them).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import save_report
from models.attgru import WEIGHTINGS, AttGRU, TemplateEmbedder, edit_template, template_tokens
from models.base import Sequence
from models.data import (HdfsBlock, datasets_dir, read_block_labels, read_hdfs_100k, read_sessions, read_templates,
                         sequence_ceiling, sessions_from_logs, without_possible_copies)
from models.metrics import confusion

COMMAND = "nice -n 10 .venv/bin/python -m bench.attgru_eval --out OUT"
PERTURBED_SHARE = 0.10
EDIT_COMPARED = ("attgru", "attgru_no_edit_training", "attgru_onehot")
PLUS = "attgru_plus_complete_normal"
COMPLETE_NORMAL = "deeplog_hdfs_train"
COMPLETE_LOG, COMPLETE_LABELS = "HDFS_5k.log", "HDFS_5k_block_labels.csv"
EXCLUDED_LABELS = "HDFS_20000_block_labels.csv"      # the demo's blocks; HDFS_5k's are among them


def write_sessions(path: Path, sessions) -> None:
    """The CLI's session-file format: integer keys (E<k> -> k), one session per line."""
    path.write_text("".join(" ".join(k[1:] for k in keys) + "\n" for keys in sessions))


def training_sessions(blocks: list[HdfsBlock], complete_normal: list[list[str]] = ()
                      ) -> tuple[list[list[str]], list[list[str]]]:
    """(normal, abnormal) training sessions as key lists: the blocks' by label, with
    ``complete_normal`` after the normal blocks (one normal file holding both)."""
    normal = [list(b.keys) for b in blocks if not b.label] + [list(s) for s in complete_normal]
    return normal, [list(b.keys) for b in blocks if b.label]


def train_through_cli(directory: Path, normal: list[list[str]], abnormal: list[list[str]], templates_csv: Path,
                      seed: int, epochs: int | None) -> float:
    """``logwarden train --detector attgru`` on session files written to ``directory``; the model
    goes to ``directory / "model"``. Returns the training seconds."""
    from services.cli import main as cli

    directory.mkdir(parents=True, exist_ok=True)
    write_sessions(directory / "normal", normal)
    write_sessions(directory / "abnormal", abnormal)
    args = ["train", "--detector", "attgru", "--normal", str(directory / "normal"),
            "--abnormal", str(directory / "abnormal"), "--templates", str(templates_csv),
            "--out", str(directory / "model"), "--seed", str(seed), "--device", "cpu", "--no-progress"]
    if epochs:
        args += ["--epochs", str(epochs)]
    started = time.perf_counter()
    if cli(args) != 0:
        raise RuntimeError("logwarden train failed")
    return round(time.perf_counter() - started, 1)


def complete_session_data(hdfs: Path) -> dict:
    """HDFS_5k's complete sessions and the training data that holds none of its blocks: the
    HDFS_100k blocks not in HDFS_20000 (nor HDFS_5k), and deeplog_hdfs_train minus its possible
    copies of HDFS_5k blocks."""
    held_out = read_block_labels(hdfs / COMPLETE_LABELS)
    excluded = set(read_block_labels(hdfs / EXCLUDED_LABELS)) | set(held_out)
    blocks = [b for b in read_hdfs_100k(hdfs / "HDFS_100k_block_labels.csv") if b.block_id not in excluded]
    sequences, labels, _ = sessions_from_logs([hdfs / COMPLETE_LOG], hdfs / COMPLETE_LABELS,
                                              hdfs / "HDFS_templates.csv", session_gap_s=1e9)
    complete = read_sessions(hdfs / COMPLETE_NORMAL)
    kept = without_possible_copies(complete, [s.keys for s in sequences])
    return {"blocks": blocks, "sequences": sequences, "labels": labels, "complete_normal": kept,
            "dropped_possible_copies": len(complete) - len(kept)}


def complete_sessions(hdfs: Path, tmp: Path, seed: int, epochs: int | None) -> dict:
    """``attgru`` and ``attgru_plus_complete_normal`` on HDFS_5k's complete sessions."""
    data = complete_session_data(hdfs)
    sequences, truth = data["sequences"], data["labels"]
    out: dict = {
        "log": COMPLETE_LOG, "labels": COMPLETE_LABELS,
        "sessions": len(sequences), "abnormal": sum(truth),
        "excluded_from_training": f"every block of {EXCLUDED_LABELS} (HDFS_5k's among them)",
        "complete_normal_dropped_as_possible_copies": data["dropped_possible_copies"],
        "ceiling": sequence_ceiling([tuple(s.keys) for s, y in zip(sequences, truth) if not y],
                                    [tuple(s.keys) for s, y in zip(sequences, truth) if y]),
        "training": {}, "models": {}, "unseen_templates": {}}
    for name, extra in (("attgru", []), (PLUS, data["complete_normal"])):
        normal, abnormal = training_sessions(data["blocks"], extra)
        seconds = train_through_cli(tmp / f"complete-{name}", normal, abnormal, hdfs / "HDFS_templates.csv",
                                    seed, epochs)
        detector = AttGRU.load(tmp / f"complete-{name}" / "model", device="cpu")
        out["training"][name] = {"normal_sessions": len(normal), "abnormal_sessions": len(abnormal),
                                 "complete_normal_sessions": len(extra), "seconds": seconds}
        flagged = [v.anomalous for v in detector.score(sequences)]
        out["models"][name] = confusion(truth, flagged).as_dict()
        seen = {k for keys in normal + abnormal for k in keys}
        unseen = sorted({k for s in sequences for k in s.keys} - seen, key=lambda k: (len(k), k))
        out["unseen_templates"][name] = {
            k: {"normal_sessions": sum(k in s.keys for s, y in zip(sequences, truth) if not y),
                "abnormal_sessions": sum(k in s.keys for s, y in zip(sequences, truth) if y)} for k in unseen}
    return out


def perturbed_vocabulary(templates: dict[str, str], present: list[str], seed: int) -> dict[str, tuple[str, str]]:
    """Old id -> (new id, changed text) for 10% of the vocabulary, drawn among ``present``."""
    rng = random.Random(seed)
    count = max(1, round(PERTURBED_SHARE * len(templates)))
    words = sorted({w for t in templates.values() for w in template_tokens(t)})
    chosen = rng.sample(sorted(present), min(count, len(present)))
    return {key: (f"{key}.changed", edit_template(templates[key], rng, words)) for key in chosen}


def template_vector_geometry(templates: dict[str, str], seeds=(1, 2, 3), edits: int = 20) -> dict:
    """How far apart the vocabulary's template vectors are and how far one word moves them, for
    each weighting and two word2vec lengths: the largest cosine between two different templates
    (1 = indistinguishable), and for ``edits`` one-word edits of every template the share whose
    nearest vocabulary template is still the original, and their median cosine to it."""
    keys = list(templates)
    words = sorted({w for t in templates.values() for w in template_tokens(t)})
    out = {}
    for epochs in (50, 300):
        for weighting in WEIGHTINGS:
            largest, nearest, cosines = [], [], []
            for seed in seeds:
                embedder = TemplateEmbedder.fit(templates.values(), AttGRU().vector_size, seed, epochs, weighting)
                vectors = np.stack([embedder.vector(templates[k]) for k in keys])
                similarity = vectors @ vectors.T - 2 * np.eye(len(keys))
                largest.append(float(similarity.max()))
                rng = random.Random(seed)
                for i, key in enumerate(keys):
                    for _ in range(edits):
                        vector = embedder.vector(edit_template(templates[key], rng, words))
                        if vector is not None:
                            nearest.append(int(np.argmax(vectors @ vector)) == i)
                            cosines.append(float(vector @ vectors[i]))
            out[f"{weighting}, word2vec {epochs} epochs"] = {
                "max_cosine_between_templates": round(float(np.mean(largest)), 3),
                "edited_nearest_is_original": round(float(np.mean(nearest)), 3),
                "edited_median_cosine": round(float(np.median(cosines)), 3)}
    return out


def sequences_of(blocks: list[HdfsBlock], templates: dict[str, str],
                 changed: dict[str, tuple[str, str]] | None = None) -> list[Sequence]:
    changed = changed or {}
    out = []
    for b in blocks:
        keys = [changed[k][0] if k in changed else k for k in b.keys]
        texts = [changed[k][1] if k in changed else templates.get(k, "") for k in b.keys]
        out.append(Sequence(keys=keys, templates=texts))
    return out


def scores(detector: AttGRU, sequences: list[Sequence], truth: list[int], keep: list[int]) -> dict:
    flagged = [v.anomalous for v in detector.score(sequences)]
    return {"all": confusion(truth, flagged).as_dict(),
            "visible_anomalies": confusion([truth[i] for i in keep], [flagged[i] for i in keep]).as_dict()}


def run(data: Path, seed: int = 1, epochs: int | None = None, draws: int = 20) -> dict:
    from services.cli import main as cli

    hdfs = data / "hdfs"
    templates_csv = hdfs / "HDFS_templates.csv"
    templates = read_templates(templates_csv)
    blocks = read_hdfs_100k(hdfs / "HDFS_100k_block_labels.csv")
    train = [b for b in blocks if b.split == "train"]
    test = [b for b in blocks if b.split == "test"]
    truth = [b.label for b in test]
    normal_in_training = {b.keys for b in train if not b.label}
    keep = [i for i, b in enumerate(test) if not (b.label and b.keys in normal_in_training)]
    report: dict = {
        "command": COMMAND, "seed": seed, "machine": platform.machine(),
        "split": {"column": "deeploglizer_split",
                  "train": {"blocks": len(train), "abnormal": sum(b.label for b in train)},
                  "test": {"blocks": len(test), "abnormal": sum(truth)},
                  "visible_anomalies_test": {"blocks": len(keep), "abnormal": sum(truth[i] for i in keep)}},
        "ceiling": {"all": sequence_ceiling([b.keys for b in test if not b.label], [b.keys for b in test if b.label]),
                    "visible_anomalies": sequence_ceiling([test[i].keys for i in keep if not truth[i]],
                                                          [test[i].keys for i in keep if truth[i]])},
    }

    complete_normal = read_sessions(hdfs / COMPLETE_NORMAL)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_sessions(tmp / "test_normal", [b.keys for b in test if not b.label])
        write_sessions(tmp / "test_abnormal", [b.keys for b in test if b.label])
        report["train_seconds"] = train_through_cli(tmp / "attgru", *training_sessions(train), templates_csv, seed, epochs)
        if cli(["evaluate", "--detector", "attgru", "--model", str(tmp / "attgru" / "model"),
                "--normal", str(tmp / "test_normal"), "--abnormal", str(tmp / "test_abnormal"),
                "--templates", str(templates_csv), "--json", str(tmp / "eval.json"), "--device", "cpu"]) != 0:
            raise RuntimeError("logwarden evaluate failed")
        report["cli_evaluate"] = json.loads((tmp / "eval.json").read_text())
        attgru = AttGRU.load(tmp / "attgru" / "model", device="cpu")
        report.setdefault("ablation_train_seconds", {})[PLUS] = train_through_cli(
            tmp / PLUS, *training_sessions(train, complete_normal), templates_csv, seed, epochs)
        plus = AttGRU.load(tmp / PLUS / "model", device="cpu")
        report["complete_sessions"] = complete_sessions(hdfs, tmp, seed, epochs)
    report["training"] = attgru.stats
    report["training_" + PLUS] = {**plus.stats, "complete_normal_sessions": len(complete_normal),
                                  "complete_normal_file": COMPLETE_NORMAL}

    # The CLI's session files hold the test blocks in (normal, abnormal) order; here in CSV order.
    clean = sequences_of(test, templates)
    models = {"attgru": attgru, PLUS: plus}
    for name, options in (("gru_no_attention", {"attention": False}), ("attgru_onehot", {"embedding": "onehot"}),
                          ("attgru_no_edit_training", {"edit_rate": 0.0})):
        started = time.perf_counter()
        detector = AttGRU(seed=seed, device="cpu", **options)
        detector.fit(sequences_of(train, templates), [b.label for b in train], templates=templates, epochs=epochs)
        models[name] = detector
        report.setdefault("ablation_train_seconds", {})[name] = round(time.perf_counter() - started, 1)
    report["models"] = {name: scores(d, clean, truth, keep) for name, d in models.items()}

    present = sorted({k for b in test for k in b.keys} & set(templates))
    perturbed: dict = {"templates_changed": None, "draws": []}
    for draw in range(draws):
        changed = perturbed_vocabulary(templates, present, seed=1000 + draw)
        perturbed["templates_changed"] = len(changed)
        entry = {"changed": {k: text for k, (_, text) in changed.items()}}
        sequences = sequences_of(test, templates, changed)
        for name in EDIT_COMPARED:
            entry[name] = scores(models[name], sequences, truth, keep)
        perturbed["draws"].append(entry)
    for name in EDIT_COMPARED:
        for subset in ("all", "visible_anomalies"):
            base = report["models"][name][subset]["f1"]
            drops = [base - d[name][subset]["f1"] for d in perturbed["draws"]]
            perturbed.setdefault("mean_f1_drop", {}).setdefault(name, {})[subset] = round(sum(drops) / len(drops), 4)
            perturbed.setdefault("max_f1_drop", {}).setdefault(name, {})[subset] = round(max(drops), 4)
    report["perturbed"] = perturbed
    report["template_vectors"] = template_vector_geometry(templates)
    summary = {f"f1 {name}": {subset: v[subset]["f1"] for subset in ("all", "visible_anomalies")}
               for name, v in report["models"].items()}
    summary["f1 ceiling"] = {subset: v["f1"] for subset, v in report["ceiling"].items()}
    summary["complete sessions (HDFS_5k), tp/fp/tn/fn"] = {
        name: "/".join(str(c[k]) for k in ("tp", "fp", "tn", "fn"))
        for name, c in report["complete_sessions"]["models"].items()}
    summary["mean f1 drop, 10% templates edited"] = perturbed["mean_f1_drop"]
    return {"summary": summary, **report}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=datasets_dir())
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, help="training epochs (default: the detector's)")
    p.add_argument("--draws", type=int, default=20, help="random template perturbations to average")
    p.add_argument("--out", type=Path, help="write the report as JSON")
    args = p.parse_args(argv)
    from models.cli import _limit_cpu_threads

    _limit_cpu_threads()
    report = run(args.data, seed=args.seed, epochs=args.epochs, draws=args.draws)
    print(save_report(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
