"""The uninterrupted run: the same lines through the same cores (parse, the session book, the
judge) without Kafka. The demo checks the stream against it, the end-to-end tests compare a run
with faults against it by window id and alert id, and bench/eval_failures.py measures what each
fault costs against it. One module so that all three mean the same thing by "reference"."""
from __future__ import annotations

from pathlib import Path

from services.cores.detect import SessionJudge, session_window
from services.cores.parse import ParseConfig, ParseCore, load_catalog
from services.cores.sessions import Closed, sessions_in_order
from services.records import ParsedEvent, Source, Window
from services.settings import Settings


def parse_files(settings: Settings, files: dict[str, Path]) -> list[ParsedEvent]:
    """Every event of one file per host, as parse makes them from the host's topic (one record
    per line, offsets counted from 0, the file's byte offsets)."""
    core = ParseCore(ParseConfig.load(settings.parse_config), catalog=load_catalog(settings.template_catalog))
    events: list[ParsedEvent] = []
    for host, path in files.items():
        path, offset = Path(path).resolve(), 0
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh):
                src = Source(host=host, topic=f"logs.{host}", partition=0, offset=i, file_path=str(path),
                             file_offset=offset)
                events += core.parse(raw.decode().rstrip("\r\n"), host, src, 0.0)
                offset += len(raw)
    return events


def closed_sessions(settings: Settings, files: dict[str, Path]) -> list[Closed]:
    """Every closed session (and time window) of the files, in the stream's event-time order."""
    return sessions_in_order(parse_files(settings, files), settings.session_config(everything_known=True))


def block_sessions(settings: Settings, files: dict[str, Path]) -> dict[str, Closed]:
    """Session key -> its closed session (time windows left out): what `logwarden evaluate` gets."""
    return {c.session.key: c for c in closed_sessions(settings, files) if not c.session.time_window}


def windows_and_finals(settings: Settings, files: dict[str, Path], models: dict) -> tuple[dict[str, Window], set[str]]:
    """Session windows (id -> window) and the ids of final alerts of an uninterrupted run.
    ``models``: detector name -> a loaded detector, judged as the sessions stage judges."""
    closed = closed_sessions(settings, files)
    windows = {w.window_id: w for w in (session_window(c, settings.time_window_s) for c in closed)}
    judge = SessionJudge({name: ("v0001", model) for name, model in models.items()})
    finals = {a.alert_id for a in judge.judge(closed, now=0.0) if a.status == "final"}
    return windows, finals
