"""Training and evaluation data: session files, template and label CSVs, the HDFS test split.

Session files hold one session per line as space-separated integer keys (the DeepLog format of
``deeplog_hdfs_train``); key ``k`` is template id ``E<k>`` (loghub's HDFS ids). Every reader
turns a malformed file into a one-line :class:`UsageError` naming the file and line.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from models.base import Sequence
from services.settings import REPO_ROOT, UsageError


def datasets_dir() -> Path:
    return Path(os.environ.get("LOGWARDEN_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def key_id(key: int | str) -> str:
    return f"E{key}"


def template_id_order(template_id: str):
    """Sort key for template ids: E2 before E10; other ids after, alphabetically."""
    head, digits = template_id[:1], template_id[1:]
    return (0, int(digits), "") if head == "E" and digits.isdigit() else (1, 0, template_id)


def normal_sessions(sequences, labels, detector: str) -> list[Sequence]:
    """What a detector that learns normal behaviour trains on: the sessions labelled 0 (every
    session when ``labels`` is None) that have events. ValueError when none is left."""
    if labels is not None:
        if len(labels) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(labels)} labels")
        sequences = [s for s, label in zip(sequences, labels) if not label]
    sequences = [s for s in sequences if s.keys]
    if not sequences:
        raise ValueError(f"{detector}: no normal sequence to train on")
    return sequences


def holdout(count: int, fraction: float, seed: int):
    """A seeded boolean mask over ``count`` sessions: True for the held-out (validation) part.
    Detectors that choose a threshold on normal data hold out part of their training normals."""
    import numpy as np

    return np.random.default_rng(seed).random(count) < fraction


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path}: no such file")
    if not path.is_file():
        raise UsageError(f"{what} {path}: not a file")
    return path


def read_sessions(path: str | Path) -> list[list[str]]:
    """Sessions as lists of template ids ("E5", ...). Blank lines are skipped; a file with no
    session, or a key that is not a non-negative integer, is a UsageError."""
    path = _existing_file(path, "session file")
    sessions = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            tokens = line.split()
            if not tokens:
                continue
            for token in tokens:
                if not token.isdigit():
                    raise UsageError(f"{path}:{number}: {token[:40]!r} is not an integer key")
            sessions.append([key_id(int(token)) for token in tokens])
    if not sessions:
        raise UsageError(f"{path}: no sessions (empty file)")
    return sessions


def to_sequences(sessions: Iterable[list[str]], templates: dict[str, str] | None = None,
                 complete: bool = True) -> list[Sequence]:
    """Closed sessions as detector Sequences, with template texts where known."""
    out = []
    for keys in sessions:
        texts = [templates.get(k, "") for k in keys] if templates else None
        out.append(Sequence(keys=list(keys), templates=texts, complete=complete))
    return out


def _csv_rows(path: Path, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise UsageError(f"{what} {path}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise UsageError(f"{what} {path}: no rows")
    return rows


def read_templates(path: str | Path) -> dict[str, str]:
    """EventId -> EventTemplate (loghub's ``*_templates.csv``)."""
    path = _existing_file(path, "template CSV")
    rows = _csv_rows(path, ("EventId", "EventTemplate"), "template CSV")
    return {row["EventId"].strip(): row["EventTemplate"] for row in rows}


def _label_value(text: str, path: Path, line: int) -> int:
    value = text.strip().lower()
    if value in ("anomaly", "abnormal", "1"):
        return 1
    if value in ("normal", "0"):
        return 0
    raise UsageError(f"{path}:{line}: label {text!r} is neither Normal nor Anomaly")


def read_block_labels(path: str | Path) -> dict[str, int]:
    """BlockId -> 1 (Anomaly) / 0 (Normal) from a ``BlockId,Label`` CSV."""
    path = _existing_file(path, "label CSV")
    rows = _csv_rows(path, ("BlockId", "Label"), "label CSV")
    return {row["BlockId"]: _label_value(row["Label"], path, i) for i, row in enumerate(rows, 2)}


def read_session_labels(path: str | Path) -> dict[str, int]:
    """Session key -> 1 (Anomaly) / 0 (Normal) from a ``SessionId,Label`` CSV (HDFS's
    ``BlockId,Label`` files are read too: a block is the session of an HDFS line)."""
    path = _existing_file(path, "label CSV")
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    key = "SessionId" if "SessionId" in header else "BlockId" if "BlockId" in header else "SessionId"
    rows = _csv_rows(path, (key, "Label"), "label CSV")
    return {row[key].strip(): _label_value(row["Label"], path, i) for i, row in enumerate(rows, 2)}


# --------------------------------------------------------------------------------------------
# The HDFS 100k-line evaluation set
@dataclass(frozen=True)
class HdfsBlock:
    block_id: str
    label: int                 # 1 = anomalous
    split: str                 # deep-loglizer's random 80/20 split ("train" | "test")
    keys: tuple[str, ...]      # template ids of the block's events in the first 100k lines


def read_hdfs_100k(path: str | Path) -> list[HdfsBlock]:
    path = _existing_file(path, "HDFS block CSV")
    rows = _csv_rows(path, ("BlockId", "Label", "deeploglizer_split", "EventSequence_first_100k_lines"),
                     "HDFS block CSV")
    return [HdfsBlock(row["BlockId"], _label_value(row["Label"], path, i), row["deeploglizer_split"],
                      tuple(row["EventSequence_first_100k_lines"].split()))
            for i, row in enumerate(rows, 2)]


NormalSelection = Literal["not_in_training", "deeploglizer_test", "all"]


def hdfs_test_split(blocks: list[HdfsBlock], training: list[list[str]],
                    normals: NormalSelection = "not_in_training") -> tuple[list[HdfsBlock], list[HdfsBlock]]:
    """(normal, abnormal) test blocks. Every anomalous block is a test block (DeepLog trains on
    normal sessions only). The training file carries no block ids, so a block cannot be matched
    to a training line by identity; ``not_in_training`` keeps the normal blocks whose key sequence
    is not a line of the training file, so no test session was seen verbatim in training;
    ``deeploglizer_test`` keeps deep-loglizer's random test fifth; ``all`` keeps every normal."""
    seen = {tuple(keys) for keys in training}
    abnormal = [b for b in blocks if b.label == 1]
    if normals == "not_in_training":
        normal = [b for b in blocks if b.label == 0 and b.keys not in seen]
    elif normals == "deeploglizer_test":
        normal = [b for b in blocks if b.label == 0 and b.split == "test"]
    elif normals == "all":
        normal = [b for b in blocks if b.label == 0]
    else:
        raise ValueError(f"unknown normal selection {normals!r}")
    return normal, abnormal


def without_possible_copies(sessions: list[list[str]], held_out: Iterable[Iterable[str]]) -> list[list[str]]:
    """``sessions`` minus every session whose multiset of keys equals a ``held_out`` session's.

    For session files without block ids (``deeplog_hdfs_train``): a copy of a held-out block, in
    whatever event order its preprocessing gave it, has that block's keys with their counts, so
    what is left holds no copy of any held-out block (and loses the unrelated sessions that
    happen to have the same keys)."""
    held = {tuple(sorted(Counter(keys).items())) for keys in held_out}
    return [s for s in sessions if tuple(sorted(Counter(s).items())) not in held]


def quiet_blocks(blocks: list[HdfsBlock], first_20k_labels: str | Path) -> set[str]:
    """Blocks whose every event in the first 100k lines already lies in the first 20k lines
    (``n_lines`` of HDFS_20000_block_labels.csv equals the 100k event count): their sequence
    ends at least 80k lines before the cut, so its end is a real end, not the truncation."""
    path = _existing_file(first_20k_labels, "label CSV")
    rows = _csv_rows(path, ("BlockId", "n_lines"), "label CSV")
    lines_in_20k = {row["BlockId"]: int(row["n_lines"]) for row in rows}
    return {b.block_id for b in blocks if lines_in_20k.get(b.block_id) == len(b.keys)}


def sequence_ceiling(normal: list[tuple[str, ...]], abnormal: list[tuple[str, ...]]) -> dict:
    """The best counts any detector that sees only the key sequence can reach: it must give
    identical sequences the same verdict, so each distinct sequence goes to its majority label."""
    from models.metrics import Confusion

    n, a = Counter(normal), Counter(abnormal)
    tp = fp = fn = 0
    for keys in set(n) | set(a):
        if a[keys] > n[keys]:
            tp, fp = tp + a[keys], fp + n[keys]
        else:
            fn += a[keys]
    return Confusion(tp=tp, fp=fp, tn=len(normal) - fp, fn=fn).as_dict()


# --------------------------------------------------------------------------------------------
# Raw logs: the stream's own parse and window cores
# A model trained on raw logs keeps the parse core's state beside its weights: mined template
# ids depend on the lines a core has seen, so evaluating it on other logs must start from the
# templates (and ids) it was trained with.
PARSE_STATE_FILE = "parse_state.json"


def log_parser(templates_csv: str | Path | None = None, session_key: str | list[str] | None = None,
               state: bytes | None = None):
    """The parse core the stream's settings give (LOGWARDEN_PARSE_CONFIG, the template catalog —
    ``templates_csv`` or LOGWARDEN_TEMPLATE_CATALOG —, LOGWARDEN_FREEZE_TEMPLATES), with only the
    session keys named ``session_key``; started from a snapshot ``state`` when given."""
    from services.cores.parse import ParseConfig, ParseCore, ParseStateError, load_catalog
    from services.settings import SettingsError, load_settings

    settings = load_settings()
    try:
        config = _with_session_keys(ParseConfig.load(settings.parse_config), session_key)
        if state is not None:
            return ParseCore.from_snapshot(state, config, frozen=settings.freeze_templates)
        catalog_path = templates_csv or settings.template_catalog
        return ParseCore(config, catalog=load_catalog(catalog_path) if catalog_path else None,
                         frozen=settings.freeze_templates)
    except (SettingsError, ParseStateError) as err:
        raise UsageError(str(err)) from None


def sessions_from_logs(logs: list[str | Path], labels_csv: str | Path | None = None,
                       templates_csv: str | Path | None = None,
                       session_gap_s: float | None = None,
                       session_key: str | list[str] | None = None,
                       parser=None) -> tuple[list[Sequence], list[int], list[dict]]:
    """Closed sessions from raw log files of any configured format, built exactly as the stream
    builds them: each file is one host's log (host = file name without suffix), lines go through
    the parse core (same settings: LOGWARDEN_PARSE_CONFIG, the template catalog — ``templates_csv``
    or LOGWARDEN_TEMPLATE_CATALOG — and LOGWARDEN_FREEZE_TEMPLATES; the core sees each file's
    path, so path-scoped session keys work), events of all files go through the session book in
    the stream's event-time order (services.cores.sessions.EVENT_ORDER; session gap and length
    from the settings), and each closed session becomes a Sequence with the sessions stage's own
    ``closed_sequence``.

    ``session_key``: the name(s) of the parse config's session-key extractors that make the
    sessions (default: every extractor, as the stream does); lines naming none of them make no
    session. ``labels_csv`` (``SessionId,Label``): sessions without a label are left out
    (counted); without it every session is taken as normal (label 0). ``parser``: a parse core
    to use instead of a fresh ``log_parser(templates_csv, session_key)`` (e.g. one restored
    from a model's ``PARSE_STATE_FILE``); its state afterwards holds every template mined."""
    from models.artifacts import sha256_file
    from services.cores.detect import closed_sequence
    from services.cores.parse import ParseError
    from services.cores.sessions import sessions_in_order
    from services.records import Source
    from services.settings import load_settings

    settings = load_settings()
    labels = read_session_labels(labels_csv) if labels_csv is not None else None
    paths = [_existing_file(p, "log file") for p in logs]
    if parser is None:
        parser = log_parser(templates_csv, session_key)
    events, sources = [], []
    for path in paths:
        host, offset, lines, unparsed = path.stem, 0, 0, 0
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh):
                line = raw.decode("utf-8", errors="replace")
                source = Source(host=host, topic=f"logs.{host}", partition=0, offset=number,
                                file_path=str(path), file_offset=offset)
                offset += len(raw)
                if not line.strip():
                    continue
                lines += 1
                try:
                    events += parser.parse(line, host, source, 0.0)
                except ParseError:
                    unparsed += 1         # the stream sends these to the dead-letter topic
        sources.append({"path": str(path.resolve()), "sha256": sha256_file(path), "lines": lines,
                        "unparsed_lines": unparsed, "role": "log"})
    config = settings.session_config(everything_known=True, session_gap_s=session_gap_s)
    closed = [c for c in sessions_in_order(events, config) if not c.session.time_window]
    sequences, session_labels, unlabelled = [], [], 0
    for c in closed:
        if labels is not None and c.session.key not in labels:
            unlabelled += 1
            continue
        sequences.append(closed_sequence(c))
        session_labels.append(labels[c.session.key] if labels is not None else 0)
    keys = ", ".join(sorted({k.name for k in parser.config.session_keys})) or "none configured"
    if not sequences and labels is not None:
        raise UsageError(f"no session of {', '.join(map(str, paths))} has a label in {labels_csv} "
                         f"(session keys: {keys})")
    if not sequences:
        raise UsageError(f"no line of {', '.join(map(str, paths))} names a session key ({keys})")
    if labels is not None:
        sources.append({"path": str(Path(labels_csv).resolve()), "sha256": sha256_file(labels_csv),
                        "sessions": len(sequences), "abnormal": sum(session_labels),
                        "unlabelled_sessions": unlabelled, "role": "labels"})
    return sequences, session_labels, sources


def _with_session_keys(config, names: str | list[str] | None):
    """``config`` with only the session-key extractors called ``names`` (None: all of them)."""
    if names is None:
        return config
    wanted = [names] if isinstance(names, str) else list(names)
    known = list(dict.fromkeys(k.name for k in config.session_keys))
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UsageError(f"--session-key {', '.join(unknown)}: the parse config has no such session key "
                         f"(it has {', '.join(known) or 'none'})")
    return config.model_copy(update={"session_keys": [k for k in config.session_keys if k.name in wanted]})
