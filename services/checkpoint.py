"""Atomic checkpoints of a core's state together with the input offsets it reflects.

State and position are saved in one file, replaced atomically (write, fsync, rename), so after
a crash a stage restores state *and* resumes exactly where that state ends: no input is applied
twice to state, none skipped. (Committed group offsets can lag behind a checkpoint; the
checkpoint wins.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

_MAGIC = b"LWCKPT1\n"


def save(path: Path, state: bytes, offsets: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"offsets": offsets}).encode() + b"\n"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(_MAGIC + header + state)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path) -> tuple[bytes, dict[str, int]] | None:
    """(state, offsets), or None when there is no checkpoint."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path}: not a logwarden checkpoint")
    header, _, state = data[len(_MAGIC):].partition(b"\n")
    return state, json.loads(header)["offsets"]
