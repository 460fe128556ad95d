"""Atomic checkpoints of a core's state together with the input offsets it reflects.

State and position are saved in one file, replaced atomically (write, fsync, rename), so after
a crash a stage restores state *and* resumes exactly where that state ends: no input is applied
twice to state, none skipped. (Committed group offsets can lag behind a checkpoint; the
checkpoint wins.)

A stage whose state is large saves it whole now and then (`save`) and, in between, appends only
what changed to a log beside it (`append`, `load_log`): each record holds a change set and the
offsets after it, is fsynced, and carries its length and CRC, so a record torn by a crash is
recognised and dropped with everything after it.
"""
from __future__ import annotations

import json
import os
import zlib
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


def append(path: Path, state: bytes, offsets: dict[str, int]) -> None:
    """Append one record (a change set and the offsets after it) to a checkpoint log, fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"offsets": offsets, "size": len(state), "crc": zlib.crc32(state)}).encode() + b"\n"
    with open(path, "ab") as fh:
        fh.write(header + state)
        fh.flush()
        os.fsync(fh.fileno())


def load_log(path: Path) -> list[tuple[bytes, dict[str, int]]]:
    """The complete records of a checkpoint log, in order; a torn or damaged record (a crash in
    the middle of `append`) ends the log there."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records, pos = [], 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        if newline < 0:
            break
        try:
            header = json.loads(data[pos:newline])
            size, crc, offsets = int(header["size"]), int(header["crc"]), header["offsets"]
        except (ValueError, KeyError, TypeError):
            break
        start, end = newline + 1, newline + 1 + size
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        records.append((data[start:end], offsets))
        pos = end
    return records
