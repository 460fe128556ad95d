"""Prometheus text exposition format (version 0.0.4, what ``/metrics`` and Hadoop's ``/prom``
serve) -> samples. Pure: no I/O.

    # HELP name text               (text escapes: \\\\ and \\n)
    # TYPE name counter|gauge|histogram|summary|untyped
    name{label="value",...} value [timestamp_ms]

Label values escape ``\\\\``, ``\\"`` and ``\\n`` and may hold any other character (Hadoop's
DataNode writes ``storageinfo="FSDataset{dirpath='[/a, /b]'}"``); a trailing comma inside the
braces is allowed; values are floats including ``NaN``, ``+Inf`` and ``-Inf``; the optional
timestamp is milliseconds since the epoch. Other ``#`` lines, blank lines and OpenMetrics'
``# EOF`` are skipped.

A malformed line never stops the parse: it is left out and named in ``Exposition.errors`` as
(line number, reason), so a scraper keeps every good sample of a partly broken page.

Used by the lab's scraper (toolkit/lab/scrape.py) and meant for the stream's metrics scrape stage.
A sample says nothing about *where* it was scraped: Hadoop's DataNode series carry only a
``hostname`` label (the machine's name, the same for every daemon on one machine), so callers
label samples by the endpoint they scraped.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SPECIAL_VALUES = {"nan": math.nan, "+inf": math.inf, "inf": math.inf, "-inf": -math.inf}
_LABEL_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None        # seconds since the epoch, when the line gave one

    def series(self, drop: tuple[str, ...] = ()) -> str:
        """``name{a="x",b="y"}`` with labels sorted (and those in ``drop`` left out): a stable
        column name for one series."""
        kept = sorted((k, v) for k, v in self.labels.items() if k not in drop)
        if not kept:
            return self.name
        body = ",".join(f'{k}="{_escape(v)}"' for k, v in kept)
        return f"{self.name}{{{body}}}"


@dataclass
class Exposition:
    samples: list[Sample] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)       # metric family -> type
    helps: dict[str, str] = field(default_factory=dict)       # metric family -> help text
    errors: list[tuple[int, str]] = field(default_factory=list)


class PromTextError(ValueError):
    """One malformed line (the parser records these; it raises only internally)."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape_help(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "\\n":
            out.append("\n" if text[i + 1] == "n" else "\\")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def parse_value(text: str) -> float:
    special = _SPECIAL_VALUES.get(text.lower())
    if special is not None:
        return special
    try:
        return float(text)
    except ValueError:
        raise PromTextError(f"value {text!r} is not a number") from None


def _labels(line: str, i: int) -> tuple[dict[str, str], int]:
    """Labels from ``line[i] == '{'``; returns them and the index after ``}``."""
    labels: dict[str, str] = {}
    i += 1
    n = len(line)
    while True:
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] == "}":
            return labels, i + 1
        match = _LABEL_NAME.match(line, i)
        if not match:
            raise PromTextError(f"bad label name at column {i + 1}")
        name = match.group()
        i = match.end()
        while i < n and line[i] in " \t":
            i += 1
        if i + 1 >= n or line[i] != "=" or line[i + 1] != '"':
            raise PromTextError(f"label {name}: expected =\"...\"")
        i += 2
        value = []
        while True:
            if i >= n:
                raise PromTextError(f"label {name}: unterminated value")
            c = line[i]
            if c == "\\":
                if i + 1 >= n or line[i + 1] not in _LABEL_ESCAPES:
                    raise PromTextError(f"label {name}: bad escape")
                value.append(_LABEL_ESCAPES[line[i + 1]])
                i += 2
                continue
            if c == '"':
                i += 1
                break
            value.append(c)
            i += 1
        if name in labels:
            raise PromTextError(f"label {name} given twice")
        labels[name] = "".join(value)
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] == ",":
            i += 1
            continue
        if i < n and line[i] == "}":
            return labels, i + 1
        raise PromTextError(f"expected , or }} after label {name}")


def parse_sample(line: str) -> Sample:
    """One sample line (no comment, not blank). Raises PromTextError."""
    match = _NAME.match(line)
    if not match:
        raise PromTextError("no metric name")
    name = match.group()
    i = match.end()
    labels: dict[str, str] = {}
    if i < len(line) and line[i] == "{":
        labels, i = _labels(line, i)
    rest = line[i:].split()
    if not rest or (i < len(line) and line[i] not in " \t"):
        raise PromTextError("expected a space and a value after the name and labels")
    if len(rest) > 2:
        raise PromTextError("more than a value and a timestamp after the labels")
    value = parse_value(rest[0])
    timestamp = None
    if len(rest) == 2:
        try:
            timestamp = int(rest[1]) / 1000.0
        except ValueError:
            raise PromTextError(f"timestamp {rest[1]!r} is not an integer (ms)") from None
    return Sample(name, labels, value, timestamp)


def parse(text: str) -> Exposition:
    """Every sample of a page, in page order; malformed lines listed in ``errors``."""
    out = Exposition()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].split(None, 2)
            if len(parts) >= 2 and parts[0] in ("HELP", "TYPE"):
                if not _NAME.fullmatch(parts[1]):
                    out.errors.append((number, f"# {parts[0]}: bad metric name {parts[1]!r}"))
                elif parts[0] == "HELP":
                    out.helps[parts[1]] = _unescape_help(parts[2] if len(parts) > 2 else "")
                elif len(parts) < 3 or parts[2].strip() not in TYPES:
                    out.errors.append((number, f"# TYPE {parts[1]}: unknown type"))
                else:
                    out.types[parts[1]] = parts[2].strip()
            continue                              # other comments, OpenMetrics' # EOF
        try:
            out.samples.append(parse_sample(line))
        except PromTextError as err:
            out.errors.append((number, str(err)))
    return out
