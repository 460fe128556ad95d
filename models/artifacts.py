"""Model artifacts: a directory with weights (safetensors; never pickle) and manifest.json.

Served models live in versions: ``<MODEL_DIR>/<detector>/v0001/``, ``v0002/`` ... The newest
version is the one served; ``rollback`` renames the newest aside (kept, not deleted) so the one
before it becomes newest again and workers reload it. A version directory appears atomically
(written under a temporary name, then renamed), so a worker never loads half a model.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")

# name -> "module:class", one file per detector (imported only when used).
DETECTORS = {
    "deeplog": "models.deeplog:DeepLog",        # logs: next-key LSTM + parameter LSTM
    "attgru": "models.attgru:AttGRU",           # logs: word2vec + attention + BiGRU
    "novelty": "models.baselines:NoveltyRules",  # logs baseline: new event, length, count vector
    "pca": "models.baselines:PCADetector",      # logs baseline: Xu et al.'s PCA on event counts
    "tracelstm": "models.tracelstm:TraceLSTM",  # traces: Nedelkoski et al.'s multimodal LSTM
    "anofusion": "models.anofusion:AnoFusion",  # chunks: metrics + logs + traces per instance
    "hades": "models.hades:Hades",              # chunks: logs + metrics, cross-modal attention
}


def detector_class(name: str):
    try:
        module_name, _, attr = DETECTORS[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}") from None
    return getattr(importlib.import_module(module_name), attr)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(model: str | Path) -> dict[str, Any]:
    return json.loads((Path(model) / MANIFEST).read_text())


def manifest_of(model: str | Path, detector: str) -> dict[str, Any]:
    """The manifest of a model directory that must hold a ``detector`` model (ValueError if not)."""
    manifest = read_manifest(model)
    if manifest.get("detector") != detector:
        raise ValueError(f"{model}: a {manifest.get('detector')!r} model, not {detector!r}")
    return manifest


def write_manifest(model: str | Path, manifest: dict[str, Any]) -> None:
    path = Path(model) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def update_manifest(model: str | Path, **fields: Any) -> dict[str, Any]:
    manifest = read_manifest(model)
    manifest.update(fields)
    write_manifest(model, manifest)
    return manifest


def versions(model_dir: str | Path, detector: str) -> list[Path]:
    """Version directories of a detector, oldest first (rolled-back ones excluded)."""
    root = Path(model_dir) / detector
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _VERSION_RE.match(p.name)) and (p / MANIFEST).exists()]
    return [p for _, p in sorted(found)]


def latest(model_dir: str | Path, detector: str) -> Path | None:
    found = versions(model_dir, detector)
    return found[-1] if found else None


def resolve(model: str | Path, detector: str | None = None) -> Path:
    """A model directory: ``model`` itself when it holds a manifest, else its newest version."""
    model = Path(model)
    if (model / MANIFEST).exists():
        return model
    for root, name in ((model.parent, model.name), (model, detector)):
        if name and (found := latest(root, name)):
            return found
    raise FileNotFoundError(f"no model in {model} (no {MANIFEST}, no v0001/ ... versions)")


def publish(model: str | Path, model_dir: str | Path, detector: str | None = None) -> Path:
    """Copy a trained model directory in as the next version; returns the new version dir."""
    model = Path(model)
    detector = detector or read_manifest(model)["detector"]
    root = Path(model_dir) / detector
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^v(\d{4,})", p.name))]
    version = f"v{(max(numbers) + 1 if numbers else 1):04d}"
    tmp = root / f".incoming-{version}-{os.getpid()}"
    shutil.copytree(model, tmp)
    update_manifest(tmp, version=version, published=time.time())
    os.replace(tmp, root / version)
    return root / version


def rollback(model_dir: str | Path, detector: str) -> tuple[Path, Path]:
    """Set the newest version aside; returns (set aside, now served)."""
    found = versions(model_dir, detector)
    if len(found) < 2:
        raise ValueError(f"{detector}: nothing to roll back to ({len(found)} version(s) in {model_dir})")
    newest = found[-1]
    aside = newest.with_name(f"{newest.name}.rolled-back-{int(time.time())}")
    os.replace(newest, aside)
    return aside, found[-2]


def load(model: str | Path, detector: str | None = None, device: str = "auto"):
    """Load a detector from a model directory (or the newest version under a root)."""
    path = resolve(model, detector)
    name = read_manifest(path)["detector"]
    return detector_class(name).load(path, device=device)
