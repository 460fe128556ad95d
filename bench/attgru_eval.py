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

from models.attgru import WEIGHTINGS, AttGRU, TemplateEmbedder, edit_template, template_tokens
from models.base import Sequence
from models.data import (HdfsBlock, datasets_dir, read_hdfs_100k, read_templates, sequence_ceiling,
                         to_sequences)
from models.metrics import confusion

COMMAND = "nice -n 10 .venv/bin/python -m bench.attgru_eval --out OUT"
PERTURBED_SHARE = 0.10
EDIT_COMPARED = ("attgru", "attgru_no_edit_training", "attgru_onehot")


def write_sessions(path: Path, blocks: list[HdfsBlock]) -> None:
    """The CLI's session-file format: integer keys (E<k> -> k), one block per line."""
    path.write_text("".join(" ".join(k[1:] for k in b.keys) + "\n" for b in blocks))


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

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, group in (("train_normal", [b for b in train if not b.label]),
                            ("train_abnormal", [b for b in train if b.label]),
                            ("test_normal", [b for b in test if not b.label]),
                            ("test_abnormal", [b for b in test if b.label])):
            write_sessions(tmp / name, group)
        train_args = ["train", "--detector", "attgru", "--normal", str(tmp / "train_normal"),
                      "--abnormal", str(tmp / "train_abnormal"), "--templates", str(templates_csv),
                      "--out", str(tmp / "model"), "--seed", str(seed), "--device", "cpu", "--no-progress"]
        if epochs:
            train_args += ["--epochs", str(epochs)]
        started = time.perf_counter()
        if cli(train_args) != 0:
            raise RuntimeError("logwarden train failed")
        report["train_seconds"] = round(time.perf_counter() - started, 1)
        if cli(["evaluate", "--detector", "attgru", "--model", str(tmp / "model"),
                "--normal", str(tmp / "test_normal"), "--abnormal", str(tmp / "test_abnormal"),
                "--templates", str(templates_csv), "--json", str(tmp / "eval.json"), "--device", "cpu"]) != 0:
            raise RuntimeError("logwarden evaluate failed")
        report["cli_evaluate"] = json.loads((tmp / "eval.json").read_text())
        attgru = AttGRU.load(tmp / "model", device="cpu")
    report["training"] = attgru.stats

    # The CLI's session files hold the test blocks in (normal, abnormal) order; here in CSV order.
    clean = sequences_of(test, templates)
    models = {"attgru": attgru}
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
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
