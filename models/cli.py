"""`logwarden train | evaluate | model`: generic over detectors (``models.artifacts.DETECTORS``).

A detector gets its options through ``fit(sequences, labels, **options)``: the common ones (h, g,
epochs, seed, device, progress, templates) are passed only when given, so each detector keeps its
own defaults and ignores nothing silently. Errors a user can fix are one-line UsageErrors.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from models import artifacts
from models.base import Sequence, limit_cpu_threads
from models.data import read_sessions, read_templates, to_sequences
from models.metrics import Confusion, confusion
from services.settings import UsageError, load_settings

log = logging.getLogger(__name__)


def _detector_class(name: str):
    try:
        return artifacts.detector_class(name)
    except (ValueError, ImportError) as err:
        raise UsageError(f"detector {name!r} is not available ({err})") from None


def _device(setting: str | None) -> str:
    from models.base import pick_device

    try:
        device = pick_device(setting or load_settings().device)
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    if device == "cpu":
        _limit_cpu_threads()
    return device


_limit_cpu_threads = limit_cpu_threads     # the benchmarks' name for it


def _source(path: str | Path, sessions: int, role: str) -> dict[str, Any]:
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": artifacts.sha256_file(path), "sessions": sessions, "role": role}


def _training_data(args) -> tuple[list[Sequence], list[int] | None, list[dict], dict[str, str] | None, Any]:
    """(sequences, labels, training sources, template texts, the parse core of --logs or None)."""
    templates = read_templates(args.templates) if args.templates else None
    if args.logs:
        if args.normal or args.abnormal:
            raise UsageError("give either --normal/--abnormal session files or --logs, not both")
        parser = _log_parser(args)
        sequences, labels, sources = _sessions_of_logs(args, parser)
        return sequences, labels if args.labels else None, sources, templates, parser
    _no_log_options(args)
    if not args.normal:
        raise UsageError("give --normal FILE (one session per line) or --logs FILE... [--labels CSV]")
    normal = read_sessions(args.normal)
    sequences = to_sequences(normal, templates)
    sources = [_source(args.normal, len(normal), "normal")]
    labels = None
    if args.abnormal:
        abnormal = read_sessions(args.abnormal)
        sequences += to_sequences(abnormal, templates)
        sources.append(_source(args.abnormal, len(abnormal), "abnormal"))
        labels = [0] * len(normal) + [1] * len(abnormal)
    return sequences, labels, sources, templates, None


def _sessions_of_logs(args, parser) -> tuple[list[Sequence], list[int], list[dict]]:
    """Sessions of raw log files (--logs), keyed by --session-key, labelled by --labels."""
    from models.data import sessions_from_logs

    return sessions_from_logs(args.logs, args.labels, args.templates, parser=parser)


def _log_parser(args, model: Path | None = None):
    """The parse core for --logs: a model's saved parse state when it has one (so the template
    ids it was trained on are the ids it is evaluated with), else a fresh one."""
    from models.data import PARSE_STATE_FILE, log_parser

    state = model / PARSE_STATE_FILE if model is not None else None
    return log_parser(args.templates, getattr(args, "session_key", None),
                      state.read_bytes() if state is not None and state.exists() else None)


def _no_log_options(args) -> None:
    for option, value in (("--labels", args.labels), ("--session-key", getattr(args, "session_key", None))):
        if value:
            raise UsageError(f"{option} goes with --logs")


def _output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / artifacts.MANIFEST).exists():
        raise UsageError(f"--out {out}: a non-empty directory that holds no model; choose another")
    return out


def _is_log_detector(cls) -> bool:
    return getattr(cls, "modality", "logs") == "logs"


def train(args) -> int:
    cls = _detector_class(args.detector)
    out = _output_dir(args.out)
    if not _is_log_detector(cls):
        # Trace and chunk detectors read their own data (traces, a data directory, fault lists).
        detector, stats, sources = cls.train_from_args(args, device=_device(args.device))
        _save_model(detector, out, sources)
        print(f"trained {args.detector} in {stats.get('seconds', '?')} s -> {out}")
        return 0
    calibrate = getattr(args, "calibrate", None)
    if calibrate is not None and not hasattr(cls, "calibrate"):
        raise UsageError(f"--calibrate: {args.detector} has no session threshold to calibrate (attgru has)")
    if getattr(args, "anomaly_share", None) is not None and calibrate is None:
        raise UsageError("--anomaly-share needs --calibrate")
    sequences, labels, sources, templates, parser = _training_data(args)
    options = {"h": args.h, "g": args.g, "epochs": args.epochs, "seed": args.seed,
               "device": _device(args.device), "progress": not args.no_progress, "templates": templates}
    detector = cls()
    held: list[tuple[Sequence, int]] = []
    if calibrate is not None:
        sequences, labels, held = _hold_out(sequences, labels, calibrate, args.seed)
    try:
        stats = detector.fit(sequences, labels, **{k: v for k, v in options.items() if v is not None})
        if held:
            record = detector.calibrate([q for q, _ in held], [y for _, y in held], anomaly_share=args.anomaly_share)
            print(f"calibrated on {record['sessions']} held-out distinct sessions ({record['anomalous']} anomalous): "
                  f"threshold {record['threshold_before']:g} -> {record['threshold']:.4f}")
    except ValueError as err:
        raise UsageError(str(err)) from None
    _save_model(detector, out, sources, parser)
    print(f"trained {args.detector} on {len(sequences)} sessions in {stats.get('seconds', '?')} s -> {out}")
    return 0


def _hold_out(sequences: list[Sequence], labels: list[int] | None, fraction: float, seed: int):
    """A seeded ``fraction`` of the distinct key sequences held out of training, one session of
    each (key sequence, label) kept to calibrate on (HDFS repeats sequences): (training
    sequences, their labels, the held-out (sequence, label) pairs)."""
    import random

    if labels is None:
        raise UsageError("--calibrate needs labelled sessions (--normal and --abnormal, or --labels)")
    rng = random.Random(seed)
    chosen = {keys for keys in sorted({tuple(q.keys) for q in sequences}) if rng.random() < fraction}
    keep = [(q, y) for q, y in zip(sequences, labels) if tuple(q.keys) not in chosen]
    held, seen = [], set()
    for q, y in zip(sequences, labels):
        if tuple(q.keys) in chosen and (tuple(q.keys), y) not in seen:
            seen.add((tuple(q.keys), y))
            held.append((q, y))
    if len({y for _, y in held}) < 2 or len({y for _, y in keep}) < 2:
        raise UsageError(f"--calibrate {fraction:g}: the held-out or the training part lacks normal or abnormal sessions")
    return [q for q, _ in keep], [y for _, y in keep], held


def _save_model(detector, out: Path, sources: list[dict], parser=None) -> None:
    from models.data import PARSE_STATE_FILE

    if out.exists():      # retraining into the same directory: nothing of the old model survives
        for name in (artifacts.MANIFEST, "weights.safetensors", PARSE_STATE_FILE):
            (out / name).unlink(missing_ok=True)
    detector.save(out)
    fields = {"training_data": sources}
    if parser is not None:     # trained on raw logs: the templates (and ids) it learnt come with it
        (out / PARSE_STATE_FILE).write_bytes(parser.snapshot())
        fields["parse_state"] = {"file": PARSE_STATE_FILE, "sha256": artifacts.sha256_file(out / PARSE_STATE_FILE),
                                 "templates": len(parser.templates())}
    artifacts.update_manifest(out, **fields)


# --------------------------------------------------------------------------------------------
def _session_length_filter(sequences: list[Sequence], truth: list[int], predicted: list[bool],
                           longer_than: int | None) -> Confusion:
    if longer_than is None:
        return confusion(truth, predicted)
    keep = [i for i, s in enumerate(sequences) if len(s.keys) > longer_than]
    return confusion([truth[i] for i in keep], [predicted[i] for i in keep])


def score_in_chunks(detector, sequences: list[Sequence], chunk: int = 2000, desc: str = "scoring"):
    """Verdicts for many sequences, with a progress bar on stderr (shown on a terminal)."""
    from tqdm import tqdm

    verdicts = []
    with tqdm(total=len(sequences), desc=desc, unit="session", file=sys.stderr, disable=None) as bar:
        for i in range(0, len(sequences), chunk):
            verdicts += detector.score(sequences[i:i + chunk])
            bar.update(min(chunk, len(sequences) - i))
    return verdicts


def evaluate(args) -> int:
    cls = _detector_class(args.detector)
    try:
        model = artifacts.resolve(args.model, args.detector)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    manifest = artifacts.read_manifest(model)
    if manifest.get("detector") != args.detector:
        raise UsageError(f"{model} holds a {manifest.get('detector')!r} model, not {args.detector!r}")
    json_out = Path(args.json)
    if not json_out.parent.is_dir():
        raise UsageError(f"--json {json_out}: directory {json_out.parent} does not exist")
    if not _is_log_detector(cls):
        detector = cls.load(model, device=_device(args.device))
        result = detector.evaluate_from_args(args)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        try:
            artifacts.update_manifest(model, evaluations=manifest.get("evaluations", []) + [result])
        except OSError as err:
            log.warning("could not record the evaluation in %s: %s", model, err)
        print(f"{args.detector}: evaluation -> {json_out}")
        return 0
    sequences, truth, record = _evaluation_data(args, model)
    detector = cls.load(model, device=_device(args.device))
    if args.g is not None:
        if not hasattr(detector, "g"):
            raise UsageError(f"--top-g does not apply to {args.detector}")
        detector.g = args.g
    predicted = [v.anomalous for v in score_in_chunks(detector, sequences)]
    h = manifest.get("h", getattr(detector, "h", None))
    result = {
        "all": _session_length_filter(sequences, truth, predicted, None).as_dict(),
        "longer_than_window": _session_length_filter(sequences, truth, predicted, h).as_dict(),
        "g": getattr(detector, "g", None),
        "h": h,
    }
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    record = {**record, **result}
    try:
        artifacts.update_manifest(model, evaluations=manifest.get("evaluations", []) + [record])
    except OSError as err:       # a read-only model directory still gets evaluated
        log.warning("could not record the evaluation in %s: %s", model, err)
    a = result["all"]
    print(f"{args.detector} g={result['g']} h={h}: precision {a['precision']:.4f} recall {a['recall']:.4f} "
          f"f1 {a['f1']:.4f} on {len(sequences)} sessions -> {json_out}")
    return 0


def _evaluation_data(args, model: Path) -> tuple[list[Sequence], list[int], dict]:
    """(sequences, truth, what the manifest records about them) from --normal/--abnormal
    session files or from --logs with --labels (parsed from ``model``'s saved parse state)."""
    if args.logs:
        if args.normal or args.abnormal:
            raise UsageError("give either --normal/--abnormal session files or --logs, not both")
        if not args.labels:
            raise UsageError("evaluate --logs needs --labels CSV (SessionId,Label)")
        sequences, truth, sources = _sessions_of_logs(args, _log_parser(args, model))
        if not any(truth) or all(truth):
            raise UsageError(f"{args.labels}: the labelled sessions of --logs need both normal and anomalous ones")
        return sequences, truth, {"logs": sources}
    _no_log_options(args)
    if not (args.normal and args.abnormal):
        raise UsageError(f"evaluate --detector {args.detector} needs --normal FILE and --abnormal FILE "
                         "(or --logs FILE... --labels CSV)")
    templates = read_templates(args.templates) if args.templates else None
    normal, abnormal = read_sessions(args.normal), read_sessions(args.abnormal)
    sequences = to_sequences(normal, templates) + to_sequences(abnormal, templates)
    truth = [0] * len(normal) + [1] * len(abnormal)
    return sequences, truth, {"normal": _source(args.normal, len(normal), "normal"),
                              "abnormal": _source(args.abnormal, len(abnormal), "abnormal")}


# --------------------------------------------------------------------------------------------
def model(args) -> int:
    root = load_settings().model_dir
    if args.action == "list":
        names = [args.detector] if args.detector else list(artifacts.DETECTORS)
        found = False
        for name in names:
            found_versions = artifacts.versions(root, name)
            for path in found_versions:
                found = True
                m = artifacts.read_manifest(path)
                f1 = (m.get("evaluations") or [{}])[-1].get("all", {}).get("f1")
                served = "  (served)" if path == found_versions[-1] else ""
                print(f"{name}\t{path.name}\tcreated {m.get('created')}\t"
                      f"f1 {f1 if f1 is not None else '-'}\t{path}{served}")
        if not found:
            print(f"no model versions in {root}", file=sys.stderr)
        return 0
    if args.action == "publish":
        source = Path(args.model)
        if not (source / artifacts.MANIFEST).exists():
            raise UsageError(f"{source}: no {artifacts.MANIFEST}; is it a trained model directory?")
        name = artifacts.read_manifest(source).get("detector")
        if name not in artifacts.DETECTORS:
            raise UsageError(f"{source}: unknown detector {name!r} in its manifest")
        print(artifacts.publish(source, root, name))
        return 0
    try:
        aside, served = artifacts.rollback(root, args.detector)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"{args.detector}: set {aside.name} aside; serving {served}")
    return 0
