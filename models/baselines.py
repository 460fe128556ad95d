"""Simple baselines for closed log sessions, judged beside DeepLog and ATT-GRU on the same splits.

The careful studies of log anomaly detection (Le & Zhang, ICSE'22; Landauer et al., 2023) find
that on HDFS simple methods reach F1 0.97-0.99: most anomalous blocks carry an event type no
normal block has, or stop after a few events. Both detectors here train on normal sessions only
(label 0, or every session when there are no labels), as DeepLog does.

``novelty`` (Landauer et al.'s new-event, sequence-length and count-vector detectors, together;
``rules`` picks some): a session is anomalous when
  new_event     it holds a template id no training session has (judged per event, so open
                sliding windows of the stream are judged too);
  length        it is closed and has fewer or more events than any training session;
  count_vector  it is closed and the L1 distance from its event-count vector to the nearest
                training vector exceeds a threshold: the largest such distance of the held-out
                normals (``validation`` of the training sessions, seeded) to the rest, so no
                held-out normal session would have been flagged.

``pca`` (Xu et al., SOSP'09, as loglizer implements it): event-count vectors with TF-IDF
weights, centred on the training mean; the principal components that explain ``variance`` of
the training normals span the normal space, and a closed session is anomalous when its squared
prediction error (its squared distance from that space) exceeds the Q-statistic at
``c_alpha`` (Jackson & Mudholkar; 3.2905 = 99.95 %). A column counts template ids outside the
training vocabulary: its training variance is 0, so any unseen event lies off the normal space.

Open sequences (``complete=False``) are judged only by ``new_event``; length and counts need
the whole session. Verdicts name the rule and the figures that decided it.
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Sequence as Seq

import numpy as np

from models import artifacts
from models.base import Anomaly, Detector, Sequence, Verdict
from models.data import holdout, normal_sessions, template_id_order

WEIGHTS = "weights.safetensors"
END = "<end>"
RULES = ("new_event", "length", "count_vector")


class _CountBaseline(Detector):
    """Shared by the count-vector baselines: the training vocabulary, count vectors with one
    column for unseen ids, options, and the safetensors + manifest artifact."""
    name: ClassVar[str]
    OPTIONS: ClassVar[tuple[str, ...]] = ("seed", "device", "progress", "templates")

    def __init__(self, seed: int = 1):
        self.seed = seed
        self.vocabulary: list[str] = []
        self.index: dict[str, int] = {}
        self.templates: dict[str, str] = {}
        self.training: dict[str, Any] = {}
        self.created: str | None = None

    # ---- shared pieces --------------------------------------------------------------------
    def _normal_sessions(self, sequences: Seq[Sequence], labels: Seq[int] | None, options: dict) -> list[Sequence]:
        unknown = sorted(k for k, v in options.items() if v is not None and k not in self.OPTIONS)
        if unknown:
            raise ValueError(f"{self.name} has no option {', '.join(unknown)}")
        if options.get("seed") is not None:
            self.seed = int(options["seed"])
        sequences = normal_sessions(sequences, labels, self.name)
        self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.vocabulary = sorted({k for s in sequences for k in s.keys}, key=template_id_order)
        self.index = {k: i for i, k in enumerate(self.vocabulary)}
        self.templates = {}
        for seq in sequences:
            for key, text in zip(seq.keys, seq.templates or []):
                if text:
                    self.templates.setdefault(key, text)
        for key, text in (options.get("templates") or {}).items():
            if text and key in self.index:
                self.templates[key] = text
        return sequences

    def counts(self, sequences: Seq[Sequence]) -> np.ndarray:
        """(N, vocabulary + 1) event counts; the last column counts ids outside the vocabulary."""
        out = np.zeros((len(sequences), len(self.vocabulary) + 1), dtype=np.float64)
        unseen = len(self.vocabulary)
        for row, seq in enumerate(sequences):
            columns = np.fromiter((self.index.get(k, unseen) for k in seq.keys), dtype=np.int64, count=len(seq.keys))
            out[row] = np.bincount(columns, minlength=unseen + 1)
        return out

    def _check_trained(self) -> None:
        if not self.vocabulary:
            raise RuntimeError(f"{self.name}: score() before fit() or load()")

    @staticmethod
    def _closed(seq: Sequence) -> bool:
        """Length and counts describe a whole session: closed, from its first event."""
        return seq.complete and seq.start

    def _session_anomaly(self, seq: Sequence, rule: str, score: float, diagnosis: str, **figures) -> Anomaly:
        return Anomaly(position=len(seq.keys), kind="end", observed=END, score=score,
                       details={"rule": rule, "diagnosis": diagnosis, **figures})

    def _save(self, directory: Path, tensors: dict[str, np.ndarray], fields: dict[str, Any]) -> None:
        from safetensors.numpy import save_file

        if not self.vocabulary:
            raise RuntimeError(f"{self.name}: save() before fit()")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / WEIGHTS))
        manifest = artifacts.read_manifest(directory) if (directory / artifacts.MANIFEST).exists() else {}
        manifest.update({"detector": self.name, "created": self.created, "seed": self.seed, "weights": WEIGHTS,
                         "vocabulary": [{"id": k, "template": self.templates.get(k)} for k in self.vocabulary],
                         "training": self.training, **fields})
        artifacts.write_manifest(directory, manifest)

    @classmethod
    def _read(cls, directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        from safetensors.numpy import load_file

        directory = Path(directory)
        manifest = artifacts.read_manifest(directory)
        if manifest.get("detector") != cls.name:
            raise ValueError(f"{directory}: a {manifest.get('detector')!r} model, not {cls.name!r}")
        return manifest, load_file(str(directory / manifest.get("weights", WEIGHTS)))

    def _restore(self, manifest: dict[str, Any]) -> None:
        self.vocabulary = [v["id"] for v in manifest["vocabulary"]]
        self.index = {k: i for i, k in enumerate(self.vocabulary)}
        self.templates = {v["id"]: v["template"] for v in manifest["vocabulary"] if v.get("template")}
        self.training = manifest.get("training", {})
        self.created = manifest.get("created")


def _nearest_l1(vectors: np.ndarray, reference: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each row of ``vectors``, the L1 distance to the nearest row of ``reference``."""
    out = np.empty(len(vectors))
    for i in range(0, len(vectors), chunk):
        out[i:i + chunk] = np.abs(vectors[i:i + chunk, None, :] - reference[None, :, :]).sum(2).min(1)
    return out


class NoveltyRules(_CountBaseline):
    name = "novelty"
    OPTIONS = _CountBaseline.OPTIONS + ("rules", "validation")

    def __init__(self, rules: Seq[str] = RULES, validation: float = 0.2, seed: int = 1, device: str = "cpu"):
        super().__init__(seed)
        self.rules = self._checked_rules(rules)
        if not 0 < validation < 1:
            raise ValueError(f"novelty: validation must be in (0, 1), got {validation!r}")
        self.validation = validation
        self.length_range: tuple[int, int] = (0, 0)
        self.reference = np.zeros((0, 1))          # distinct training count vectors
        self.count_threshold = 0.0

    @staticmethod
    def _checked_rules(rules: Seq[str]) -> tuple[str, ...]:
        rules = tuple(rules)
        wrong = [r for r in rules if r not in RULES]
        if wrong or not rules:
            raise ValueError(f"novelty: rules must be some of {', '.join(RULES)}, got {', '.join(rules) or 'none'}")
        return rules

    def fit(self, sequences: Seq[Sequence], labels: Seq[int] | None = None, **options) -> dict:
        started = time.perf_counter()
        if options.get("rules") is not None:
            self.rules = self._checked_rules(options["rules"])
        if options.get("validation") is not None:
            self.validation = float(options["validation"])
        sequences = self._normal_sessions(sequences, labels, options)
        lengths = [len(s.keys) for s in sequences]
        self.length_range = (min(lengths), max(lengths))
        vectors = self.counts(sequences)
        held = holdout(len(sequences), self.validation, self.seed)
        if held.any() and (~held).any():
            # The threshold no held-out normal session crosses, measured against the others.
            self.count_threshold = float(_nearest_l1(vectors[held], np.unique(vectors[~held], axis=0)).max())
        else:
            self.count_threshold = 0.0
        self.reference = np.unique(vectors, axis=0)
        self.training = {"sessions": len(sequences), "keys": len(self.vocabulary),
                         "length_range": list(self.length_range), "distinct_count_vectors": len(self.reference),
                         "count_threshold": self.count_threshold, "validation_sessions": int(held.sum()),
                         "rules": list(self.rules), "seed": self.seed,
                         "seconds": round(time.perf_counter() - started, 3)}
        return dict(self.training)

    def score(self, sequences: Seq[Sequence]) -> list[Verdict]:
        self._check_trained()
        closed = [n for n, s in enumerate(sequences) if self._closed(s)]
        distance = np.zeros(len(sequences))
        if closed and "count_vector" in self.rules:
            distance[closed] = _nearest_l1(self.counts([sequences[n] for n in closed]), self.reference)
        lo, hi = self.length_range
        verdicts = []
        for n, seq in enumerate(sequences):
            anomalies: list[Anomaly] = []
            if "new_event" in self.rules:
                for position in range(max(0, seq.judge_from), len(seq.keys)):
                    key = seq.keys[position]
                    if key not in self.index:
                        anomalies.append(Anomaly(position=position, kind="key", observed=key, score=1.0, details={
                            "rule": "new_event", "diagnosis": f"{key} never seen in training"}))
            score = 1.0 if anomalies else 0.0
            judged = self._closed(seq)
            if judged and "length" in self.rules and not lo <= len(seq.keys) <= hi:
                anomalies.append(self._session_anomaly(
                    seq, "length", 1.0, f"a session of {len(seq.keys)} events; training sessions have {lo}..{hi}",
                    length=len(seq.keys), length_range=[lo, hi]))
                score = 1.0
            if judged and "count_vector" in self.rules:
                d = float(distance[n])
                relative = d / (self.count_threshold + 1.0)
                if d > self.count_threshold:
                    anomalies.append(self._session_anomaly(
                        seq, "count_vector", relative,
                        f"event counts {d:g} (L1) from the nearest training session's; "
                        f"held-out normal sessions lie within {self.count_threshold:g}",
                        distance=d, threshold=self.count_threshold))
                score = max(score, relative)
            anomalies.sort(key=lambda a: a.position)
            details: dict[str, Any] = {"judged": judged or bool(seq.keys), "rules": list(self.rules)}
            if anomalies:
                details["diagnosis"] = anomalies[0].details["diagnosis"]
            verdicts.append(Verdict(anomalous=bool(anomalies), score=score, anomalies=anomalies, details=details))
        return verdicts

    def save(self, directory: Path) -> None:
        self._save(directory, {"reference": self.reference},
                   {"rules": list(self.rules), "validation": self.validation,
                    "length_range": list(self.length_range), "count_threshold": self.count_threshold})

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> "NoveltyRules":
        manifest, tensors = cls._read(directory)
        self = cls(rules=manifest["rules"], validation=manifest["validation"], seed=manifest.get("seed", 1))
        self._restore(manifest)
        self.length_range = tuple(manifest["length_range"])
        self.count_threshold = float(manifest["count_threshold"])
        self.reference = tensors["reference"]
        return self


class PCADetector(_CountBaseline):
    name = "pca"
    OPTIONS = _CountBaseline.OPTIONS + ("variance", "c_alpha")

    def __init__(self, variance: float = 0.95, c_alpha: float = 3.2905, seed: int = 1, device: str = "cpu"):
        super().__init__(seed)
        if not 0 < variance <= 1:
            raise ValueError(f"pca: variance must be in (0, 1], got {variance!r}")
        self.variance, self.c_alpha = variance, c_alpha
        self.idf = np.zeros(1)
        self.mean = np.zeros(1)
        self.residual = np.zeros((1, 1))        # I - P P^T: onto the space the normals do not span
        self.components = 0
        self.threshold = 0.0

    def _weighted(self, counts: np.ndarray) -> np.ndarray:
        return counts * self.idf - self.mean

    def fit(self, sequences: Seq[Sequence], labels: Seq[int] | None = None, **options) -> dict:
        started = time.perf_counter()
        for name in ("variance", "c_alpha"):
            if options.get(name) is not None:
                setattr(self, name, float(options[name]))
        sequences = self._normal_sessions(sequences, labels, options)
        counts = self.counts(sequences)
        n = len(counts)
        # loglizer's tf-idf: log(N / df); a column no training session has gets the largest weight.
        self.idf = np.log(n / ((counts > 0).sum(0) + 1e-8))
        self.mean = (counts * self.idf).mean(0)
        x = self._weighted(counts)
        eigenvalues, vectors = np.linalg.eigh(x.T @ x / n)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, vectors = np.clip(eigenvalues[order], 0.0, None), vectors[:, order]
        total = eigenvalues.sum()
        share = np.cumsum(eigenvalues) / total if total > 0 else np.ones(len(eigenvalues))
        self.components = int(np.searchsorted(share, self.variance - 1e-12) + 1)
        basis = vectors[:, :self.components]
        self.residual = np.eye(len(basis)) - basis @ basis.T
        self.threshold = self._q_statistic(eigenvalues[self.components:])
        spe = self._spe(counts)
        self.training = {"sessions": n, "keys": len(self.vocabulary), "components": self.components,
                         "threshold": self.threshold, "training_sessions_over_threshold": int((spe > self.threshold).sum()),
                         "variance": self.variance, "c_alpha": self.c_alpha,
                         "seconds": round(time.perf_counter() - started, 3)}
        return dict(self.training)

    def _q_statistic(self, residual_eigenvalues: np.ndarray) -> float:
        """Jackson & Mudholkar's limit for the squared prediction error (loglizer's formula)."""
        phi = [float(np.sum(residual_eigenvalues ** k)) for k in (1, 2, 3)]
        if phi[0] <= 0 or phi[1] <= 0:
            return 0.0          # the normals span every direction they vary in: any residual is new
        h0 = 1.0 - 2.0 * phi[0] * phi[2] / (3.0 * phi[1] ** 2)
        return phi[0] * math.pow(self.c_alpha * math.sqrt(2.0 * phi[1] * h0 * h0) / phi[0]
                                 + 1.0 + phi[1] * h0 * (h0 - 1.0) / phi[0] ** 2, 1.0 / h0)

    def _spe(self, counts: np.ndarray) -> np.ndarray:
        off = self._weighted(counts) @ self.residual.T
        return (off ** 2).sum(1)

    def score(self, sequences: Seq[Sequence]) -> list[Verdict]:
        self._check_trained()
        closed = [n for n, s in enumerate(sequences) if self._closed(s)]
        spe = np.zeros(len(sequences))
        if closed:
            spe[closed] = self._spe(self.counts([sequences[n] for n in closed]))
        verdicts, judged = [], set(closed)
        scale = self.threshold if self.threshold > 0 else 1.0
        for n, seq in enumerate(sequences):
            if n not in judged:
                verdicts.append(Verdict(anomalous=False, score=0.0, details={"judged": False}))
                continue
            error = float(spe[n])
            anomalies = []
            if error > self.threshold + 1e-9:
                anomalies.append(self._session_anomaly(
                    seq, "pca", error / scale,
                    f"squared prediction error {error:.4g} above the Q-statistic {self.threshold:.4g}",
                    spe=error, threshold=self.threshold))
            details: dict[str, Any] = {"judged": True, "spe": error, "threshold": self.threshold}
            if anomalies:
                details["diagnosis"] = anomalies[0].details["diagnosis"]
            verdicts.append(Verdict(anomalous=bool(anomalies), score=error / scale, anomalies=anomalies, details=details))
        return verdicts

    def save(self, directory: Path) -> None:
        self._save(directory, {"idf": self.idf, "mean": self.mean, "residual": self.residual},
                   {"variance": self.variance, "c_alpha": self.c_alpha, "components": self.components,
                    "threshold": self.threshold})

    @classmethod
    def load(cls, directory: Path, device: str = "auto") -> "PCADetector":
        manifest, tensors = cls._read(directory)
        self = cls(variance=manifest["variance"], c_alpha=manifest["c_alpha"], seed=manifest.get("seed", 1))
        self._restore(manifest)
        self.idf, self.mean, self.residual = tensors["idf"], tensors["mean"], tensors["residual"]
        self.components, self.threshold = int(manifest["components"]), float(manifest["threshold"])
        return self
