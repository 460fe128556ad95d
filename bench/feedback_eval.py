"""DeepLog's online update from operator feedback: false positives before and after a round of
feedback on held-out normal HDFS sessions, and recall on abnormal sessions before and after.

    python -m bench.feedback_eval --data ../shared/datasets --json bench/feedback.json

Data. The model is trained on the DeepLog paper's 4,855 normal sessions (deeplog_hdfs_train), or
loaded with --model. Held-out sessions are the blocks of the first 100k HDFS lines: the normal
blocks whose key sequence is not a training line (so no test session was seen verbatim in
training) and every anomalous block. Those sequences stop at line 100k, so the end of a session
is judged only where it is real (the block's lines all lie in the first 20k lines:
models.data.quiet_blocks); elsewhere only its events are judged.

A round of feedback. The held-out normal blocks are split in two halves by a seeded shuffle:
operators see the alerts of half A and report every false positive there; half B stays unseen.
The reported sequences are learned in one update and the model is scored again: A shows whether
the reported false positives stop, B whether that generalises to sessions nobody reported, and
recall on the anomalous blocks whether the update made the model forget what abnormal is
(catastrophic forgetting, the known failure of fine-tuning on a handful of sequences).

Updates of the same starting model on the same reported sequences, at update()'s learning rate:
  shipped      DeepLog.update, what `logwarden run feedback` runs: each step's loss is the
               training windows' loss plus the reported windows' loss (the training set is
               replayed), and it stops as soon as no reported sequence is flagged;
  replay xE    the same loss for a fixed E epochs (--stress-epochs): a long update, to show that
               replay keeps recall even when the update runs far past what it needs;
  naive xk/xE  fine-tuning on the reported windows alone (no replay) for as many epochs as
               shipped took, and for E epochs: the ablation where forgetting shows.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from bench import save_report
from models import artifacts
from models.base import Sequence
from models.data import (hdfs_test_split, quiet_blocks, read_hdfs_100k, read_sessions, read_templates,
                         to_sequences)
from models.deeplog import DeepLog
from models.metrics import Confusion

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m bench.feedback_eval --data ../shared/datasets"


def default_data_dir() -> Path:
    return Path(os.environ.get("LOGWARDEN_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def _limit_threads() -> None:
    """Leave a core to the rest of the machine: torch's threads spin against busy cores."""
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1)))


def held_out(data: Path, training: list[list[str]], templates: dict[str, str], seed: int):
    """(normal half A, normal half B, abnormal) sequences of the HDFS 100k-line blocks."""
    hdfs = data / "hdfs"
    blocks = read_hdfs_100k(hdfs / "HDFS_100k_block_labels.csv")
    normal, abnormal = hdfs_test_split(blocks, training, "not_in_training")
    ended = quiet_blocks(blocks, hdfs / "HDFS_20000_block_labels.csv")

    def seq(block) -> Sequence:
        keys = list(block.keys)
        return Sequence(keys=keys, templates=[templates.get(k, "") for k in keys], complete=block.block_id in ended)

    normal = sorted(normal, key=lambda b: b.block_id)
    random.Random(seed).shuffle(normal)
    half = len(normal) // 2
    return [seq(b) for b in normal[:half]], [seq(b) for b in normal[half:]], [seq(b) for b in abnormal]


def verdicts(model: DeepLog, sequences: list[Sequence], chunk: int = 2000) -> list[bool]:
    out: list[bool] = []
    for i in range(0, len(sequences), chunk):
        out += [v.anomalous for v in model.score(sequences[i:i + chunk])]
    return out


def measure(model: DeepLog, a: list[Sequence], b: list[Sequence], abnormal: list[Sequence]) -> dict:
    fa, fb, fx = verdicts(model, a), verdicts(model, b), verdicts(model, abnormal)
    tp, fp = sum(fx), sum(fa) + sum(fb)
    both = Confusion(tp=tp, fp=fp, tn=len(a) + len(b) - fp, fn=len(abnormal) - tp)
    return {"fp_a": sum(fa), "fp_b": sum(fb), "tp": tp, "recall": round(both.recall, 4),
            "precision": round(both.precision, 4), "f1": round(both.f1, 4), "flagged_a": fa}


def fine_tune(model: DeepLog, sequences: list[Sequence], epochs: int, lr: float, replay: bool) -> None:
    """A fixed number of epochs of update()'s loss (replay) or of the reported windows alone."""
    from models.deeplog import _deterministic

    reported = model._windows(sequences)
    with _deterministic(model.device):
        if replay:
            model._train_key_model(model.train_windows, epochs, desc="replay update", extra=reported, lr=lr)
        else:
            model._train_key_model(reported, epochs, desc="naive update", lr=lr)


def run(data: Path, model_dir: Path | None = None, save: Path | None = None, epochs: int = 30,
        update_epochs: int = 10, stress_epochs: int = 10, seed: int = 1, device: str = "cpu") -> dict:
    _limit_threads()
    hdfs = data / "hdfs"
    training = read_sessions(hdfs / "deeplog_hdfs_train")
    templates = read_templates(hdfs / "HDFS_templates.csv")
    started = time.perf_counter()
    if model_dir:
        source = artifacts.resolve(model_dir, "deeplog")
        model = DeepLog.load(source, device=device)
        trained = {"loaded": str(source)}
    else:
        model = DeepLog()
        stats = model.fit(to_sequences(training, templates), epochs=epochs, seed=seed, device=device,
                          templates=templates)
        trained = {"sessions": stats["sessions"], "epochs": epochs, "seconds": stats["seconds"],
                   "final_loss": stats["final_loss"]}
        if save:
            model.save(save)
    a, b, abnormal = held_out(data, training, templates, seed)
    before = measure(model, a, b, abnormal)
    reported = [s for s, flagged in zip(a, before.pop("flagged_a")) if flagged]
    result = {
        "command": COMMAND, "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                        "platform": platform.platform()},
        "model": {"h": model.h, "g": model.g, **trained, "device": device},
        "sessions": {"normal_a": len(a), "normal_b": len(b), "abnormal": len(abnormal),
                     "reported": len(reported)},
        "before": before,
    }
    if reported:
        with tempfile.TemporaryDirectory(prefix="feedback-eval-") as base:
            model.save(Path(base))             # one starting point for every variant
            lr = model.lr / 2                  # what update() uses by default
            t = time.perf_counter()
            stats = model.update(reported, epochs=update_epochs)
            shipped_s = time.perf_counter() - t
            result["shipped"] = _after(model, a, b, abnormal, stats["epochs"], shipped_s,
                                       still_flagged=stats["still_flagged"])
            variants = [("replay", True, stress_epochs), ("naive", False, stats["epochs"]),
                        ("naive", False, stress_epochs)]
            for name, replay, epochs in variants:
                if f"{name}_x{epochs}" in result:
                    continue
                variant = DeepLog.load(Path(base), device=device)
                t = time.perf_counter()
                fine_tune(variant, reported, epochs, lr, replay)
                result[f"{name}_x{epochs}"] = _after(variant, a, b, abnormal, epochs, time.perf_counter() - t)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _after(model: DeepLog, a, b, abnormal, epochs: int, seconds: float, **extra) -> dict:
    after = measure(model, a, b, abnormal)
    after.pop("flagged_a")
    return {**after, "epochs": epochs, "seconds": round(seconds, 1), **extra}


def markdown(result: dict) -> str:
    s = result["sessions"]
    rows = [f"Held-out HDFS sessions (first 100k lines, not in training): normal half A {s['normal_a']} "
            f"(operators report its false positives: {s['reported']}), normal half B {s['normal_b']} "
            f"(never reported), abnormal {s['abnormal']}.", "",
            "| model | epochs | FP on A (reported half) | FP on B (unseen half) | TP | recall | precision | F1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    labels = {"before": "before feedback", "shipped": "update with replay, early stop (shipped)",
              "replay": "update with replay, fixed epochs", "naive": "naive fine-tune, no replay (ablation)"}
    for key, r in result.items():
        label = labels.get(key.split("_x")[0])
        if label is None or not isinstance(r, dict):
            continue
        rows.append(f"| {label} | {r.get('epochs', '-')} | {r['fp_a']} | {r['fp_b']} | {r['tp']} | "
                    f"{r['recall']:.4f} | {r['precision']:.4f} | {r['f1']:.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.feedback_eval", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--model", type=Path, help="a trained DeepLog (directory or MODEL_DIR root); else train one")
    p.add_argument("--save", type=Path, help="keep the model trained here for later --model runs")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (without --model)")
    p.add_argument("--update-epochs", type=int, default=10, help="most epochs of the feedback update")
    p.add_argument("--stress-epochs", type=int, default=10, help="epochs of the fixed-length variants")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if not (args.data / "hdfs" / "deeplog_hdfs_train").exists():
        p.exit(2, f"{p.prog}: error: no HDFS data under {args.data}\n")
    result = run(args.data, args.model, args.save, args.epochs, args.update_epochs, args.stress_epochs,
                 args.seed, args.device)
    save_report(result, args.json)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
