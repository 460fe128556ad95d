"""The parse core: one raw log line -> ParsedEvents (pure Python; no Kafka here).

    line --header--> timestamp, level, component, content
         --mask----> content with block ids, IPs, paths, numbers... replaced by placeholders
         --template-> a catalog template (loghub ids such as E5), else a drain3-mined one ("T" + hash
                      of its first text, kept as drain generalises it), else (frozen) "unknown"
         --keys----> one ParsedEvent per session key (every blk_..., application_..., container_...
                      in the line or its file's path; none: the host)

Everything a user may want to change (header formats, masking rules, session-key extractors,
drain options) lives in a YAML file, ``parse_config.yaml`` next to this module by default.

Speed. Most lines of a log are the same few shapes with different numbers in them. A line's
*shape* is its bytes with every ASCII digit turned into ``0``: when every header, masking and
key regex treats all digits alike (checked once, from the compiled patterns), two lines with one
shape split, mask, key and match identically at the same character positions. So the first line
of a shape goes the long way (header regexes, one combined masking pass, catalog scan or drain)
and the result is cached as character spans; every later line of that shape is a C-level
``bytes.translate``, one dict lookup and a few slices. A configuration that names particular
digits (e.g. ``0x``) is still parsed correctly, by a second cache keyed by the masked content.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import re._constants as _sre  # the regex parse tree; used only to check digit-blindness
import re._parser as _sre_parse
from bisect import bisect_right
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from operator import itemgetter
from typing import Any, Callable, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from drain3.drain import Drain, LogCluster, Node
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.records import ParsedEvent, Source, stable_id
from services.settings import SettingsError

DEFAULT_CONFIG_PATH = Path(__file__).with_name("parse_config.yaml")
UNKNOWN = "unknown"
WILDCARD = "<*>"
SNAPSHOT_FORMAT = "logwarden.parse-state/1"

_ZERO_DIGITS = bytes.maketrans(b"0123456789", b"0000000000")
_ASCII_DIGIT = re.compile(r"[0-9]")


class ParseError(ValueError):
    """A line the core cannot parse; the shell dead-letters it with ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ParseConfigError(SettingsError):
    """A bad parse configuration file; str(err) is one line naming the file and the problem."""


class ParseStateError(ValueError):
    """A snapshot that cannot be restored into this core."""


# ------------------------------------------------------------------------------------------
# Configuration
def _compiles(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"not a valid regular expression ({err})") from None


class HeaderFormat(BaseModel):
    """A log header: a regex with groups ``ts`` and ``content`` (and optionally ``frac``,
    ``tz``, ``level``, ``component``), and how to read ``ts``."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pattern: str
    time_format: str = Field(description="strptime format of ts, or 'iso' or 'epoch'; no year: taken from fallback_ts")
    timezone: str | None = Field(None, description="zone of timestamps without an offset; default: the top-level timezone")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        groups = _compiles(value).groupindex
        missing = [g for g in ("ts", "content") if g not in groups]
        if missing:
            raise ValueError(f"needs named groups (?P<ts>...) and (?P<content>...); missing {', '.join(missing)}")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            _zone(value)
        return value


class MaskRule(BaseModel):
    """Text matching ``pattern`` is replaced by ``placeholder`` before templates are mined."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pattern: str
    placeholder: str

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        compiled = _compiles(value)
        # Rules are joined into one alternation, where a global flag group such as "(?i)" is no
        # longer at the start of the pattern. Scoped flags "(?i:...)" are fine.
        if re.search(r"\(\?[aiLmsux]+\)", value):
            raise ValueError("global flags like (?i) cannot be combined with other rules; use (?i:...)")
        if re.search(r"\\[1-9]", value):
            raise ValueError("numbered back-references do not survive joining the rules; use (?P=name)")
        if any(name.startswith("_mask") for name in compiled.groupindex):
            raise ValueError("group names starting with _mask are reserved")
        if compiled.match(""):
            raise ValueError("matches the empty string")
        return value

    @field_validator("placeholder")
    @classmethod
    def _placeholder(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be non-empty and hold no whitespace (it becomes one token)")
        if value == WILDCARD:
            raise ValueError(f"{WILDCARD} is the drain wildcard; pick another placeholder")
        return value


class KeyExtractor(BaseModel):
    """Session keys: every match of ``pattern`` in the content, the whole line, or the path of
    the file the line was read from (Filebeat's ``log.file.path``: YARN writes each container's
    log under .../application_<id>/container_<id>/, and most of its lines name neither).
    Several extractors may share a name (e.g. one in the content, one in the path): they find
    the same kind of session, and ``logwarden train --session-key NAME`` picks them together."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pattern: str
    scope: str = Field("content", pattern="^(content|line|path)$")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if _compiles(value).match(""):
            raise ValueError("matches the empty string")
        return value


class DrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sim_th: float = Field(0.4, gt=0, le=1, description="similarity a line needs to join a template")
    depth: int = Field(4, ge=3, description="prefix-tree depth (drain3 counts root and length levels)")
    max_children: int = Field(100, ge=2)
    extra_delimiters: list[str] = Field(default_factory=list)
    parametrize_numeric_tokens: bool = True
    constant_tokens: str | None = Field(
        None, description="a regex; two tokens that both fully match it and differ never share a template "
                          "(e.g. plain words: 'Transitioned from NEW' and 'from RUNNING' are two events)")
    wildcards_count: bool = Field(
        False, description="a template's wildcards count as tokens a line shares with it (drain3: they do not, "
                           "so a template that has generalised some tokens takes no line that differs elsewhere)")

    @field_validator("constant_tokens")
    @classmethod
    def _constants(cls, value: str | None) -> str | None:
        if value is not None and _compiles(value).fullmatch(""):
            raise ValueError("matches the empty token")
        return value


class ParseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str = Field("UTC", description="zone of header timestamps that carry no offset")
    require_header: bool = Field(
        True, description="a line no header format matches is a ParseError; false: timestamp = fallback_ts")
    headers: list[HeaderFormat] = Field(min_length=1)
    masking: list[MaskRule] = Field(default_factory=list)
    session_keys: list[KeyExtractor] = Field(default_factory=list)
    drain: DrainOptions = Field(default_factory=DrainOptions)
    cache_size: int = Field(20_000, ge=16, description="line shapes and masked contents remembered")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        _zone(value)
        return value

    @model_validator(mode="after")
    def _rules_combine(self) -> "ParseConfig":
        try:
            _combined_mask_regex(self.masking)
        except re.error as err:
            raise ValueError(f"masking rules do not combine into one regex ({err}); "
                             "are two rules defining the same group name?") from None
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ParseConfig":
        """The YAML at ``path``; None: the packaged default. Raises ParseConfigError."""
        path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ParseConfigError(f"parse config {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ParseConfigError(f"parse config {path}: cannot read it ({err})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ParseConfigError(f"parse config {path}: not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ParseConfigError(f"parse config {path}: expected a mapping (headers:, masking:, ...) at the top")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
            message = first["msg"].removeprefix("Value error, ")
            raise ParseConfigError(f"parse config {path}: {where or 'top level'}: {message}") from None


def _zone(name: str):
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _combined_mask_regex(rules: list[MaskRule]) -> re.Pattern | None:
    """All masking rules as one alternation, so a line is scanned once. At each position the
    earliest-listed rule that matches wins; group ``_mask<i>`` names the rule."""
    if not rules:
        return None
    return re.compile("|".join(f"(?P<_mask{i}>{rule.pattern})" for i, rule in enumerate(rules)))


# ------------------------------------------------------------------------------------------
# Digit-blindness: may a regex be evaluated on the line's shape instead of the line?
def digit_blind(pattern: str) -> bool:
    """True when the regex cannot tell one ASCII digit from another: it names digits only through
    classes holding all ten of them (\\d, \\w, [0-9], [^a-z]...) and has no back-references.
    Then replacing every digit by 0 keeps every match at the same place."""
    try:
        tree = _sre_parse.parse(pattern)
    except re.error:
        return False
    return _blind(tree.data if hasattr(tree, "data") else tree)


_ALL_DIGIT_CATEGORIES = {_sre.CATEGORY_DIGIT, _sre.CATEGORY_WORD, _sre.CATEGORY_NOT_SPACE,
                         _sre.CATEGORY_UNI_DIGIT, _sre.CATEGORY_UNI_WORD, _sre.CATEGORY_UNI_NOT_SPACE}
_NO_DIGIT_CATEGORIES = {_sre.CATEGORY_NOT_DIGIT, _sre.CATEGORY_NOT_WORD, _sre.CATEGORY_SPACE,
                        _sre.CATEGORY_UNI_NOT_DIGIT, _sre.CATEGORY_UNI_NOT_WORD, _sre.CATEGORY_UNI_SPACE}
_DIGITS = set(range(48, 58))


def _blind(items) -> bool:
    for op, arg in items:
        if op in (_sre.LITERAL, _sre.NOT_LITERAL):
            if arg in _DIGITS:
                return False
        elif op == _sre.IN:
            covered: set[int] = set()
            for item_op, item_arg in arg:
                if item_op == _sre.LITERAL:
                    covered.add(item_arg)
                elif item_op == _sre.RANGE:
                    low, high = item_arg
                    covered.update(range(max(low, 48), min(high, 57) + 1))
                elif item_op == _sre.CATEGORY:
                    if item_arg in _ALL_DIGIT_CATEGORIES:
                        covered |= _DIGITS
                    elif item_arg not in _NO_DIGIT_CATEGORIES:
                        return False
                elif item_op != _sre.NEGATE:
                    return False
            if covered & _DIGITS not in (set(), _DIGITS):
                return False
        elif op in (_sre.ANY, _sre.AT):
            continue
        elif op == _sre.SUBPATTERN:
            if not _blind(arg[-1]):
                return False
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)):
            if not _blind(arg[2]):
                return False
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            if not _blind(arg[1]):
                return False
        elif op == _sre.BRANCH:
            if not all(_blind(branch) for branch in arg[1]):
                return False
        elif op == getattr(_sre, "ATOMIC_GROUP", None):
            if not _blind(arg):
                return False
        else:  # back-references, conditionals, anything new: assume it can see digit values
            return False
    return True


# ------------------------------------------------------------------------------------------
# Template catalog (e.g. loghub's HDFS_templates.csv)
def load_catalog(path: str | Path) -> dict[str, str]:
    """``EventId,EventTemplate`` rows -> {id: template text with <*> wildcards}, in file order."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"EventId", "EventTemplate"} <= set(reader.fieldnames):
                raise ParseConfigError(f"template catalog {path}: needs columns EventId,EventTemplate")
            catalog: dict[str, str] = {}
            for row in reader:
                event_id, text = (row["EventId"] or "").strip(), (row["EventTemplate"] or "").strip()
                if not event_id or not text:
                    raise ParseConfigError(f"template catalog {path}: line {reader.line_num}: empty EventId or EventTemplate")
                if event_id in catalog:
                    raise ParseConfigError(f"template catalog {path}: line {reader.line_num}: {event_id} appears twice")
                if event_id == UNKNOWN or re.fullmatch(r"T[0-9a-f]{12}", event_id):
                    raise ParseConfigError(f"template catalog {path}: line {reader.line_num}: "
                                           f"id {event_id!r} collides with mined ids (T...) or 'unknown'")
                catalog[event_id] = text
    except FileNotFoundError:
        raise ParseConfigError(f"template catalog {path}: no such file") from None
    if not catalog:
        raise ParseConfigError(f"template catalog {path}: no templates")
    return catalog


class _CatalogTemplate:
    """A catalog template compiled to a regex over *masked* content, so that whether a line
    matches depends only on its masked content (which the caches are keyed by)."""
    __slots__ = ("template_id", "text", "regex", "specificity", "anchor")

    def __init__(self, template_id: str, text: str, mask):
        self.template_id = template_id
        self.text = text
        literals = [mask(part)[0] for part in text.split(WILDCARD)]
        pieces = []
        for i, literal in enumerate(literals):
            if i:
                pieces.append("(.*?)")
            pieces.append(r"\s+".join(re.escape(word) for word in re.split(r"\s+", literal)))
        self.regex = re.compile("".join(pieces) + r"\Z", re.DOTALL)
        # Loghub's templates overlap (a line may match two); the one saying the most wins.
        words = [w for literal in literals for w in literal.split()]
        self.specificity = (sum(map(len, words)), len(words))
        self.anchor = max(words, key=len) if words else ""


# ------------------------------------------------------------------------------------------
# Template mining
class _Drain(Drain):
    """drain3's Drain where tokens matching ``constant_tokens`` are never generalised: a line
    that differs from a template in a token where both are constants does not join it.

    Why: drain joins a line to the most similar template of its length and turns the differing
    tokens into wildcards, so "Transitioned from NEW to UNASSIGNED" and "... from UNASSIGNED to
    ASSIGNED" become one template "from <*> to <*>", though a program wrote them as two events
    (the states are constants in its code). Values a program fills in (numbers, ids, paths,
    addresses) are masked first or contain digits; what is left as a plain word is most often
    part of the message itself."""

    def __init__(self, *args, constant_tokens: str | None = None, wildcards_count: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._constant = re.compile(constant_tokens).fullmatch if constant_tokens else None
        self._constant_seen: dict[str, bool] = {}
        self._wildcards_count = wildcards_count

    def _is_constant(self, token: str) -> bool:
        if self._constant is None:
            return False
        known = self._constant_seen.get(token)
        if known is None:
            if len(self._constant_seen) >= 65_536:
                self._constant_seen.clear()
            known = self._constant_seen[token] = self._constant(token) is not None
        return known

    def get_seq_distance(self, seq1, seq2, include_params: bool):
        """(similarity, wildcard count) of template ``seq1`` and line ``seq2``; as drain3's,
        except that differing constants make it -1 (below any threshold) and that wildcards
        count as shared tokens with ``wildcards_count``."""
        include_params = include_params or self._wildcards_count
        if self._constant is None:
            return super().get_seq_distance(seq1, seq2, include_params)
        if not seq1:
            return 1.0, 0
        wildcard, similar, params = self.param_str, 0, 0
        for template_token, token in zip(seq1, seq2):
            if template_token == wildcard:
                params += 1
            elif template_token == token:
                similar += 1
            elif self._is_constant(template_token) and self._is_constant(token):
                return -1.0, params
        if include_params:
            similar += params
        return similar / len(seq1), params


# ------------------------------------------------------------------------------------------
# Results and counters
class TemplateMatch(NamedTuple):
    template_id: str
    template: str
    params: list[str]
    kind: str             # "catalog" | "mined" | "unknown"
    group: Any            # what the line was grouped with: catalog id or drain cluster id


@dataclass
class ParseCounters:
    lines: int = 0          # lines parsed (header understood)
    known: int = 0          # ... mapped to a catalog template or to a frozen vocabulary's template
    mined: int = 0          # ... mapped to a template mined online
    unknown: int = 0        # ... matching nothing while the vocabulary is frozen
    new_templates: int = 0  # templates mined (drain clusters created)
    bad_header: int = 0     # lines rejected with ParseError


class _Template:
    """What a masked content maps to; param_spans are (start, end) in masked coordinates."""
    __slots__ = ("kind", "template_id", "template", "param_spans", "cluster", "tokens", "group")

    def __init__(self, kind, template_id, template, param_spans, cluster=None, group=None):
        self.kind = kind
        self.template_id = template_id
        self.template = template
        self.param_spans = param_spans
        self.cluster = cluster          # drain LogCluster for mined templates
        self.tokens = cluster.log_template_tokens if cluster is not None else None
        self.group = group


class _Shape:
    """Everything about a line that its shape determines: slices of the line, and the template."""
    __slots__ = ("fmt", "ts", "frac", "tz", "level", "level_text", "component", "component_text", "simple_ts",
                 "keys", "params", "key_spans", "param_spans", "tmpl", "count_slot", "cluster", "tokens", "fields")

    def __init__(self, line: str, fmt, spans, keys, params, tmpl: _Template, count_slot: int):
        self.fmt = fmt
        self.ts, self.frac, self.tz, level, component = (
            None if span is None else slice(*span) for span in spans)
        # level and component without digits are the same text in every line of the shape
        self.level, self.level_text = _slice_or_text(line, level)
        self.component, self.component_text = _slice_or_text(line, component)
        self.simple_ts = fmt is not None and fmt.has_year and self.tz is None
        # itemgetter(*slices)(line) cuts every piece in one C call
        self.keys = _cutter(keys)
        self.params = _cutter(params)
        self.key_spans, self.param_spans = keys, params      # what the compiled hot path is taught
        self.tmpl = tmpl
        self.count_slot = count_slot
        # drain may generalise a mined template later; a shape made before that is stale
        self.cluster = tmpl.cluster
        self.tokens = tmpl.tokens
        # a ParsedEvent's fields with what is the same for the whole shape filled in
        self.fields = dict.fromkeys(_EVENT_FIELD_NAMES)
        self.fields.update(level=self.level_text, component=self.component_text,
                           template_id=tmpl.template_id, template=tmpl.template)


def _cutter(spans) -> Callable[[str], list[str]]:
    """A function cutting these (start, end) spans out of a line, as a list."""
    if not spans:
        return _no_pieces
    if len(spans) == 1:
        one = slice(*spans[0])
        return lambda line: [line[one]]
    pieces = itemgetter(*(slice(a, b) for a, b in spans))
    return lambda line: list(pieces(line))


def _no_pieces(line: str) -> list[str]:
    return []


def _slice_or_text(line: str, part: slice | None) -> tuple[slice | None, str | None]:
    if part is None:
        return None, None
    text = line[part]
    return (part, None) if _ASCII_DIGIT.search(text) else (None, text)


class _TwoGenerationCache:
    """A bounded map: at most ``capacity`` entries, the newest ``capacity // 2`` always kept.
    Two plain dicts (no per-hit bookkeeping): when the young one fills up it becomes the old one."""

    def __init__(self, capacity: int):
        self.half = max(1, capacity // 2)
        self.young: dict = {}
        self.old: dict = {}

    def get(self, key):
        value = self.young.get(key)
        if value is None:
            value = self.old.get(key)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key, value) -> None:
        if len(self.young) >= self.half:
            self.old, self.young = self.young, {}
        self.young[key] = value

    def clear(self) -> None:
        self.young, self.old = {}, {}

    def __len__(self) -> int:
        return len(self.young) + len(self.old)


# ------------------------------------------------------------------------------------------
# Header formats, compiled
_NUMERIC_DIRECTIVES = {"Y": r"(?P<year>\d{4})", "y": r"(?P<yy>\d{2})", "m": r"(?P<month>\d{1,2})",
                       "d": r"(?P<day>\d{1,2})", "H": r"(?P<hour>\d{1,2})", "M": r"(?P<minute>\d{1,2})",
                       "S": r"(?P<second>\d{1,2})"}


def _numeric_time_regex(time_format: str) -> re.Pattern | None:
    """A regex reading an all-numeric strptime format (%Y %y %m %d %H %M %S and literal text)
    twenty times faster than strptime; None for anything else (strptime is used then)."""
    parts, i = [], 0
    while i < len(time_format):
        char = time_format[i]
        if char == "%":
            directive = time_format[i + 1:i + 2]
            if directive not in _NUMERIC_DIRECTIVES or _NUMERIC_DIRECTIVES[directive] in parts:
                return None
            parts.append(_NUMERIC_DIRECTIVES[directive])
            i += 2
        else:
            parts.append(r"\s+" if char.isspace() else re.escape(char))
            i += 1
    regex = re.compile("".join(parts) + r"\Z")
    return regex if {"month", "day"} <= set(regex.groupindex) and regex.groupindex.keys() & {"year", "yy"} else None


class _Header:
    __slots__ = ("name", "regex", "group_index", "time_format", "numeric_time", "zone", "has_year", "has_date", "cache")

    def __init__(self, spec: HeaderFormat, default_zone: str):
        self.name = spec.name
        self.regex = re.compile(spec.pattern, re.DOTALL)
        self.group_index = self.regex.groupindex
        self.time_format = spec.time_format
        self.numeric_time = _numeric_time_regex(spec.time_format)
        self.zone = _zone(spec.timezone or default_zone)
        self.has_year = spec.time_format in ("iso", "epoch") or "%Y" in spec.time_format or "%y" in spec.time_format
        # a time of day alone (TrainTicket's "19:50:59.971 INFO ..."): the date is fallback_ts's
        self.has_date = self.has_year or "%d" in spec.time_format or "%j" in spec.time_format
        self.cache: dict[str, float] = {}

    def spans(self, m: re.Match):
        def span(name):
            if name in self.group_index and m.start(name) >= 0:
                return m.span(name)
            return None
        return span("ts"), span("frac"), span("tz"), span("level"), span("component")

    def epoch(self, ts_text: str, tz_text: str | None, fallback_ts: float) -> float:
        """Seconds since the epoch of a header timestamp (without its fraction)."""
        if self.has_year:
            return self._epoch(ts_text, tz_text, None)
        if not self.has_date:
            return self._time_of_day(ts_text, tz_text, fallback_ts)
        year = datetime.fromtimestamp(fallback_ts, self.zone).year
        value = self._epoch(ts_text, tz_text, year)
        if value > fallback_ts + 86400:      # "Dec 31" read on Jan 1: last year's line
            value = self._epoch(ts_text, tz_text, year - 1)
        return value

    def _time_of_day(self, ts_text: str, tz_text: str | None, fallback_ts: float) -> float:
        """A time of day on the day (in the header's zone) that puts it nearest ``fallback_ts``:
        a line stamped 23:59:59 and shipped at 00:00:01 is yesterday's."""
        try:
            clock = datetime.strptime(ts_text, self.time_format).time()
        except ValueError as err:
            raise ParseError("bad_header", f"{self.name} timestamp {ts_text!r} unreadable ({err})") from None
        zone = _offset_zone(tz_text) if tz_text else self.zone
        day = datetime.fromtimestamp(fallback_ts, zone).date()
        moments = (datetime.combine(day + timedelta(days=d), clock, zone).timestamp() for d in (-1, 0, 1))
        return min(moments, key=lambda t: abs(t - fallback_ts))

    def _epoch(self, ts_text: str, tz_text: str | None, year: int | None) -> float:
        key = ts_text if tz_text is None and year is None else f"{ts_text}|{tz_text}|{year}"
        value = self.cache.get(key)
        if value is not None:
            return value
        try:
            if self.time_format == "epoch":
                value = float(ts_text)
            else:
                if self.time_format == "iso":
                    moment = datetime.fromisoformat(ts_text)
                elif self.numeric_time is not None:
                    moment = self._numeric(ts_text)
                elif year is None:
                    moment = datetime.strptime(ts_text, self.time_format)
                else:
                    moment = datetime.strptime(f"{year} {ts_text}", f"%Y {self.time_format}")
                zone = _offset_zone(tz_text) if tz_text else self.zone
                value = moment.replace(tzinfo=zone).timestamp()
        except (ValueError, OverflowError) as err:
            raise ParseError("bad_header", f"{self.name} timestamp {ts_text!r} unreadable ({err})") from None
        if len(self.cache) >= 4096:  # distinct seconds; a dict this size is plenty
            self.cache.clear()
        self.cache[key] = value
        return value

    def _numeric(self, ts_text: str) -> datetime:
        m = self.numeric_time.match(ts_text)
        if m is None:
            raise ValueError(f"does not match {self.time_format!r}")
        g = m.groupdict()
        if "year" in g:
            year = int(g["year"])
        else:  # strptime's rule for %y: 69-99 are 1969-1999, 00-68 are 2000-2068
            yy = int(g["yy"])
            year = yy + (1900 if yy >= 69 else 2000)
        return datetime(year, int(g["month"]), int(g["day"]), int(g.get("hour") or 0),
                        int(g.get("minute") or 0), int(g.get("second") or 0))


def _offset_zone(text: str):
    if text in ("Z", "z"):
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0)))


def _fraction(text: str) -> float:
    return int(text) / 10 ** len(text)


# ------------------------------------------------------------------------------------------
# Parsed events: every field below is built by this module from values of the right type
# (msgspec Structs do not validate on construction; the wire decoder does).
_EVENT_FIELD_NAMES = ParsedEvent.__struct_fields__
try:   # CPython's own SHA-1: same digest as hashlib's OpenSSL one, less call overhead
    from _sha1 import sha1 as _sha1
except ImportError:  # pragma: no cover
    _sha1 = hashlib.sha1


def _event(fields: dict) -> ParsedEvent:
    return ParsedEvent(**fields)


# The compiled hot path (native/, issue 18): lines of a shape this core has analysed, turned into
# their events' JSON without Python. Optional: without it (no cargo where it was installed) the
# Python path below does everything; with it, the Python path is still the reference and the
# teacher (ParseCore.hot_events).
try:
    from logwarden_native import HotParse as _HotParse
except ImportError:  # pragma: no cover - depends on the install
    _HotParse = None
NATIVE_AVAILABLE = _HotParse is not None


# counts by what a line was mapped to (see ParseCounters)
_KNOWN, _MINED, _UNKNOWN = 0, 1, 2


# ------------------------------------------------------------------------------------------
class ParseCore:
    """Lines -> ParsedEvents. Not thread-safe: one core per parse worker.

    ``catalog``: {id: template text} of known templates (``load_catalog``); lines matching one
    get its id. Other lines are mined with drain3 into templates with id "T" + hash of the
    template text, so replicas cannot give one template two ids. ``frozen``: nothing is mined;
    lines matching neither the catalog nor a template already mined (restored from a snapshot)
    get template id "unknown".
    """

    def __init__(self, config: ParseConfig | None = None, catalog: dict[str, str] | None = None,
                 frozen: bool = False):
        self.config = config if config is not None else ParseConfig.load()
        self._counts = [0, 0, 0]          # lines mapped to known / mined / unknown templates
        self._new_templates = 0
        self._bad_header = 0
        self._headers = [_Header(h, self.config.timezone) for h in self.config.headers]
        self._mask_regex = _combined_mask_regex(self.config.masking)
        self._placeholders = [rule.placeholder for rule in self.config.masking]
        self._keys_content = [re.compile(k.pattern) for k in self.config.session_keys if k.scope == "content"]
        self._keys_line = [re.compile(k.pattern) for k in self.config.session_keys if k.scope == "line"]
        self._keys_path = [re.compile(k.pattern) for k in self.config.session_keys if k.scope == "path"]
        self._path_keys: dict[str, list[str]] = {}       # file path -> its keys (few paths, many lines)
        delimiters = self.config.drain.extra_delimiters
        self._token_regex = re.compile(
            r"(?:(?!" + "|".join(map(re.escape, delimiters)) + r")\S)+" if delimiters else r"\S+")
        patterns = ([h.pattern for h in self.config.headers] + [r.pattern for r in self.config.masking]
                    + [k.pattern for k in self.config.session_keys])
        self.shape_cache_enabled = all(digit_blind(p) for p in patterns)
        self._shapes = _TwoGenerationCache(self.config.cache_size)
        self._masked = _TwoGenerationCache(self.config.cache_size)
        # drain cluster id -> the template id its lines are emitted with: fixed when the cluster
        # is made, so a template that drain generalises later keeps the id already emitted
        self._cluster_template_ids: dict[int, str] = {}
        self._frozen = frozen
        self._hot = None                  # the compiled hot path, once hot_events() asked for it
        self._format_index = {id(h): i for i, h in enumerate(self._headers)}
        self._drain = self._new_drain()
        self._set_catalog(catalog or {})

    # -- public ------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)
        self._clear_caches()

    @property
    def counters(self) -> ParseCounters:
        known, mined, unknown = self._counts
        if self._hot is not None:
            hot_known, hot_mined, hot_unknown = self._hot.counts()
            known, mined, unknown = known + hot_known, mined + hot_mined, unknown + hot_unknown
        return ParseCounters(lines=known + mined + unknown, known=known, mined=mined, unknown=unknown,
                             new_templates=self._new_templates, bad_header=self._bad_header)

    @property
    def catalog(self) -> dict[str, str]:
        return {t.template_id: t.text for t in self._catalog}

    def hot_events(self):
        """The compiled hot path's ``events(line, host, topic, partition, offset, path,
        file_offset, kafka_ms)`` -> ``(timestamp, [(ParsedEvent JSON, key), ...])``, or None for a
        line it was not taught (then parse() takes it, and teaches it). None when the native
        module is not installed, or the config needs what it does not do: patterns that read
        digits (no shape cache) or session keys from the whole line."""
        if _HotParse is None or not self.shape_cache_enabled or self._keys_line:
            return None
        if self._hot is None:
            self._hot = _HotParse(self.config.cache_size, bool(self._keys_path))
        return self._hot.events

    def _teach(self, line: str, shape: _Shape, signature: bytes, path: str) -> None:
        """Tell the compiled hot path what parse() worked out for this line's shape."""
        hot = self._hot
        ts_text = line[shape.ts]
        epoch = shape.fmt.cache.get(ts_text)
        if epoch is None:
            return
        fmt = self._format_index[id(shape.fmt)]
        hot.add_time(fmt, ts_text, epoch)
        if self._keys_path:
            hot.add_path(path, self._keys_of_path(path))
        span = lambda part: None if part is None else (part.start, part.stop)   # noqa: E731
        hot.add_shape(signature, fmt, span(shape.ts), span(shape.frac),
                      span(shape.level), shape.level_text, span(shape.component), shape.component_text,
                      list(shape.key_spans), list(shape.param_spans), shape.fields["template_id"],
                      shape.fields["template"], shape.count_slot,
                      -1 if shape.cluster is None else shape.cluster.cluster_id)

    def parse(self, message: str, host: str, source: Source, fallback_ts: float) -> list[ParsedEvent]:
        """One line -> one ParsedEvent per session key (the host when it names none).

        ``fallback_ts`` (e.g. Filebeat's @timestamp) gives the year to headers without one and
        the time of lines without a header when ``require_header`` is false. Raises ParseError."""
        line = message.rstrip("\r\n")
        try:
            if self.shape_cache_enabled and line.isascii():
                signature = line.encode().translate(_ZERO_DIGITS)
                shape = self._shapes.young.get(signature)
                if shape is None or (shape.cluster is not None and shape.cluster.log_template_tokens is not shape.tokens):
                    shape = self._shape(line, fallback_ts, signature)
                teach = self._hot is not None and shape.simple_ts and self._shapes.young.get(signature) is shape
            else:
                teach = False
                shape = self._analyse(line, fallback_ts, None)
            get = line.__getitem__

            if shape.simple_ts:
                ts_text = get(shape.ts)
                timestamp = shape.fmt.cache.get(ts_text) or shape.fmt.epoch(ts_text, None, fallback_ts)
                if shape.frac is not None:
                    timestamp += _fraction(get(shape.frac))
            else:
                timestamp = self._timestamp(line, shape, fallback_ts)
        except ParseError:
            self._bad_header += 1
            raise
        self._counts[shape.count_slot] += 1
        if teach:
            self._teach(line, shape, signature, source.file_path)

        keys = shape.keys(line)
        if self._keys_line:
            keys += [m.group() for r in self._keys_line for m in r.finditer(line)]
        if self._keys_path:
            keys += self._keys_of_path(source.file_path)
        if len(keys) > 1:
            keys = list(dict.fromkeys(keys))
        params = shape.params(line)
        fields = shape.fields.copy()
        fields["event_id"] = _sha1(f"{host}\x00{source.file_path}\x00{source.file_offset}".encode(
            "utf-8", "surrogatepass")).hexdigest()[:16]        # == records.stable_id(host, path, offset)
        fields["key"] = keys[0] if keys else host
        fields["keys"] = keys
        fields["timestamp"] = timestamp
        if shape.level is not None:
            fields["level"] = get(shape.level)
        if shape.component is not None:
            fields["component"] = get(shape.component)
        fields["params"] = params
        fields["message"] = line
        fields["source"] = source
        event = _event(fields)
        if len(keys) < 2:
            return [event]
        return [event] + [_event({**fields, "key": key, "keys": list(keys), "params": list(params)})
                          for key in keys[1:]]

    def match_content(self, content: str) -> TemplateMatch:
        """The template of a log message's content (the header already removed), mining it
        unless frozen, as parse() does. For training on pre-split data and parsing benchmarks."""
        masked, marks = self._mask(content)
        tmpl = self._template_for(masked)
        params = [content[a:b] for a, b in _to_raw(tmpl.param_spans, marks)]
        return TemplateMatch(tmpl.template_id, tmpl.template, params, tmpl.kind, tmpl.group)

    def templates(self) -> dict[str, str]:
        """Every template this core knows now: {id: text} (catalog first, then mined)."""
        known = self.catalog
        for cluster in self._drain.id_to_cluster.values():
            known[self._mined_id(cluster)] = cluster.get_template()
        return known

    def stats(self) -> dict[str, int]:
        """Counters for the shell's metrics, plus the current template counts."""
        return {**asdict(self.counters), "catalog_templates": len(self._catalog),
                "mined_templates": len(self._drain.id_to_cluster)}

    def mask(self, content: str) -> tuple[str, list[str]]:
        """Content with masking applied, and the masked values in order."""
        masked, marks = self._mask(content)
        return masked, [content[ra:rb] for ra, rb, _, _ in marks]

    def split_header(self, line: str, fallback_ts: float) -> tuple[str | None, float, str | None, str | None, str]:
        """(format name, timestamp, level, component, content) of a line; raises ParseError."""
        fmt, m = self._header_match(line)
        if fmt is None:
            return None, fallback_ts, None, None, line
        ts, frac, tz, level, component = fmt.spans(m)
        timestamp = fmt.epoch(line[ts[0]:ts[1]], line[tz[0]:tz[1]] if tz else None, fallback_ts)
        if frac:
            timestamp += _fraction(line[frac[0]:frac[1]])
        return (fmt.name, timestamp, line[level[0]:level[1]] if level else None,
                line[component[0]:component[1]] if component else None, m.group("content"))

    # -- state -----------------------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """The miner state (catalog, mined templates, drain's prefix tree) and the masking and
        drain settings it was mined with, as JSON. Deterministic: equal states, equal bytes."""
        drain = self._drain
        state = {
            "format": SNAPSHOT_FORMAT,
            "config": self._state_config(),
            "catalog": [[t.template_id, t.text] for t in self._catalog],
            "drain": {
                "clusters_counter": drain.clusters_counter,
                # no cluster sizes: lines answered from the caches never reach drain, and sizes
                # play no part in matching; the state is what decides template ids
                "clusters": [[c.cluster_id, list(c.log_template_tokens)]
                             for c in sorted(drain.id_to_cluster.values(), key=lambda c: c.cluster_id)],
                # the id each cluster's lines were emitted with (not derivable from its text
                # once drain generalised it)
                "template_ids": [[c.cluster_id, self._mined_id(c)]
                                 for c in sorted(drain.id_to_cluster.values(), key=lambda c: c.cluster_id)],
                "tree": _tree_to_json(drain.root_node),
            },
        }
        return json.dumps(state, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def restore(self, data: bytes) -> None:
        """Replace the miner state, catalog included, with a snapshot's. Its masking and drain
        settings must be this core's (templates mined under other rules would not match)."""
        try:
            state = json.loads(data)
            if state.get("format") != SNAPSHOT_FORMAT:
                raise ParseStateError(f"not a parse-core snapshot (format {state.get('format')!r})")
            if _normalised_state_config(state["config"]) != self._state_config():
                raise ParseStateError("snapshot was mined with other masking rules or drain options "
                                      "than this parse config; use ParseCore.from_snapshot")
            drain = self._new_drain()
            for cluster_id, tokens in state["drain"]["clusters"]:
                cluster = LogCluster([str(t) for t in tokens], int(cluster_id))
                drain.id_to_cluster[cluster.cluster_id] = cluster
            drain.clusters_counter = int(state["drain"]["clusters_counter"])
            drain.root_node = _tree_from_json(state["drain"]["tree"])
            # snapshots written before ids were fixed per cluster: the id of the current text,
            # which is what those cores emitted last
            template_ids = {int(c): str(t) for c, t in state["drain"].get("template_ids", [])}
            catalog = {str(i): str(t) for i, t in state["catalog"]}
        except ParseStateError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ParseStateError(f"unreadable parse-core snapshot ({type(err).__name__}: {err})") from None
        self._drain = drain
        self._cluster_template_ids = template_ids
        self._set_catalog(catalog)

    @classmethod
    def from_snapshot(cls, data: bytes, config: ParseConfig | None = None, frozen: bool = False) -> "ParseCore":
        """A core with a snapshot's masking and drain settings (headers and session keys from
        ``config``, default: the packaged config) and its state."""
        base = config if config is not None else ParseConfig.load()
        try:
            saved = json.loads(data)["config"]
        except (ValueError, KeyError, TypeError) as err:
            raise ParseStateError(f"unreadable parse-core snapshot ({err})") from None
        merged = ParseConfig.model_validate({**base.model_dump(), **saved})
        core = cls(merged, frozen=frozen)
        core.restore(data)
        return core

    # -- internals -------------------------------------------------------------------------------
    def _state_config(self) -> dict:
        return {"masking": [r.model_dump() for r in self.config.masking],
                "drain": self.config.drain.model_dump()}

    def _new_drain(self) -> Drain:
        d = self.config.drain
        return _Drain(sim_th=d.sim_th, depth=d.depth, max_children=d.max_children,
                      extra_delimiters=tuple(d.extra_delimiters), param_str=WILDCARD,
                      parametrize_numeric_tokens=d.parametrize_numeric_tokens, constant_tokens=d.constant_tokens,
                      wildcards_count=d.wildcards_count)

    def _set_catalog(self, catalog: dict[str, str]) -> None:
        self._catalog = [_CatalogTemplate(i, text, self._mask) for i, text in catalog.items()]
        self._clear_caches()

    def _clear_caches(self) -> None:
        self._shapes.clear()
        self._masked.clear()
        if self._hot is not None:
            self._hot.clear()

    def _header_match(self, line: str):
        for fmt in self._headers:
            m = fmt.regex.match(line)
            if m is not None:
                return fmt, m
        if self.config.require_header:
            tried = ", ".join(h.name for h in self._headers)
            raise ParseError("bad_header", f"no header format ({tried}) matches {line[:120]!r}")
        return None, None

    def _shape(self, line: str, fallback_ts: float, signature: bytes) -> _Shape:
        """A shape not in the young cache: from the old generation if still valid, else analysed."""
        shape = self._shapes.get(signature)
        if shape is None or (shape.cluster is not None and shape.cluster.log_template_tokens is not shape.tokens):
            shape = self._analyse(line, fallback_ts, signature)
        return shape

    def _keys_of_path(self, path: str) -> list[str]:
        keys = self._path_keys.get(path)
        if keys is None:
            if len(self._path_keys) >= self.config.cache_size:
                self._path_keys.clear()
            keys = self._path_keys[path] = [m.group() for r in self._keys_path for m in r.finditer(path)]
        return keys

    @staticmethod
    def _timestamp(line: str, shape: _Shape, fallback_ts: float) -> float:
        fmt = shape.fmt
        if fmt is None:
            return float(fallback_ts)
        timestamp = fmt.epoch(line[shape.ts], line[shape.tz] if shape.tz is not None else None, fallback_ts)
        if shape.frac is not None:
            timestamp += _fraction(line[shape.frac])
        return timestamp

    def _analyse(self, line: str, fallback_ts: float, signature: bytes | None) -> _Shape:
        """The long way: header, masking, template; cached under the line's shape when the
        content's masked form is the same for every line of that shape."""
        fmt, m = self._header_match(line)
        if fmt is None:
            spans, start, content = (None,) * 5, 0, line
        else:
            spans = fmt.spans(m)
            start, content = m.start("content"), m.group("content")
            # an unreadable timestamp must fail here too, not only on the hot path
            ts, tz = spans[0], spans[2]
            fmt.epoch(line[ts[0]:ts[1]], line[tz[0]:tz[1]] if tz else None, fallback_ts)
        masked, marks = self._mask(content)
        tmpl = self._template_for(masked)
        params = [(start + a, start + b) for a, b in _to_raw(tmpl.param_spans, marks)]
        keys = tuple((start + m.start(), start + m.end()) for r in self._keys_content for m in r.finditer(content))
        if tmpl.kind == "catalog" or (tmpl.kind == "mined" and self._frozen):
            count_slot = _KNOWN
        else:
            count_slot = _MINED if tmpl.kind == "mined" else _UNKNOWN
        shape = _Shape(line, fmt, spans, keys, params, tmpl, count_slot)
        if signature is not None and _digits_all_masked(content, marks):
            self._shapes.put(signature, shape)
        return shape

    def _mask(self, content: str) -> tuple[str, list[tuple[int, int, int, int]]]:
        """One pass of the combined masking regex. Marks: (raw start, raw end, masked start,
        masked end) of every placeholder."""
        if self._mask_regex is None:
            return content, []
        pieces: list[str] = []
        marks: list[tuple[int, int, int, int]] = []
        placeholders = self._placeholders
        raw_at = masked_at = 0
        for m in self._mask_regex.finditer(content):
            ra, rb = m.span()
            if ra == rb:
                continue
            placeholder = placeholders[int(m.lastgroup[5:])]
            pieces.append(content[raw_at:ra])
            masked_at += ra - raw_at
            pieces.append(placeholder)
            marks.append((ra, rb, masked_at, masked_at + len(placeholder)))
            masked_at += len(placeholder)
            raw_at = rb
        if not marks:
            return content, marks
        pieces.append(content[raw_at:])
        return "".join(pieces), marks

    def _template_for(self, masked: str) -> _Template:
        tmpl = self._masked.get(masked)
        if tmpl is not None and (tmpl.cluster is None or tmpl.cluster.log_template_tokens is tmpl.tokens):
            return tmpl
        if tmpl is not None:                       # drain generalised the template since
            tmpl = self._mined(masked, tmpl.cluster)
        else:
            tmpl = self._catalog_template(masked) or self._drain_template(masked)
        self._masked.put(masked, tmpl)
        return tmpl

    def _catalog_template(self, masked: str) -> _Template | None:
        best = None
        for candidate in self._catalog:
            if candidate.anchor not in masked:
                continue
            m = candidate.regex.match(masked)
            if m is not None and (best is None or candidate.specificity > best[0].specificity):
                best = (candidate, m)
        if best is None:
            return None
        candidate, m = best
        spans = []
        for i in range(1, m.re.groups + 1):
            a, b = m.span(i)
            while a < b and masked[a].isspace():
                a += 1
            while b > a and masked[b - 1].isspace():
                b -= 1
            spans.append((a, b))
        return _Template("catalog", candidate.template_id, candidate.text, tuple(spans), group=candidate.template_id)

    def _drain_template(self, masked: str) -> _Template:
        drain = self._drain
        if self._frozen:
            cluster = drain.match(masked, full_search_strategy="fallback")
            if cluster is None:
                return _Template(UNKNOWN, UNKNOWN, masked, self._placeholder_spans(masked), group=UNKNOWN)
        else:
            cluster, change = drain.add_log_message(masked)
            if change == "cluster_created":
                self._new_templates += 1
            elif change == "cluster_template_changed" and self._hot is not None:
                self._hot.drop_cluster(cluster.cluster_id)     # its shapes there are stale now
        return self._mined(masked, cluster)

    def _mined(self, masked: str, cluster: LogCluster) -> _Template:
        tokens = cluster.log_template_tokens
        text = " ".join(tokens)
        token_spans = [m.span() for m in self._token_regex.finditer(masked)]
        if len(token_spans) != len(tokens):     # cannot align: only the masked values are params
            spans = self._placeholder_spans(masked)
        else:
            spans = []
            for token, (a, b) in zip(tokens, token_spans):
                if token == WILDCARD:
                    spans.append((a, b))
                else:
                    spans.extend(self._placeholder_spans(masked, a, b))
            spans = tuple(spans)
        return _Template("mined", self._mined_id(cluster), text, spans, cluster=cluster, group=cluster.cluster_id)

    def _placeholder_spans(self, masked: str, start: int = 0, end: int | None = None) -> tuple:
        """Spans of placeholders in masked[start:end] (each becomes one param)."""
        end = len(masked) if end is None else end
        found = []
        for placeholder in set(self._placeholders):
            at = masked.find(placeholder, start, end)
            while at >= 0:
                found.append((at, at + len(placeholder)))
                at = masked.find(placeholder, at + len(placeholder), end)
        spans, last_end = [], -1
        for a, b in sorted(found, key=lambda s: (s[0], -s[1])):   # one placeholder inside another: the outer
            if a >= last_end:
                spans.append((a, b))
                last_end = b
        return tuple(spans)

    def _mined_id(self, cluster: LogCluster) -> str:
        """"T" + a hash of the cluster's template text when its first line was mined (so two
        replicas whose first line of a template masks alike give it one id), kept for the
        cluster's life: lines of one template get one id however drain generalises it later."""
        template_id = self._cluster_template_ids.get(cluster.cluster_id)
        if template_id is None:
            template_id = "T" + stable_id(cluster.get_template(), size=12)
            self._cluster_template_ids[cluster.cluster_id] = template_id
        return template_id


def _to_raw(spans, marks) -> list[tuple[int, int]]:
    """(start, end) spans in masked coordinates -> the same texts' spans in the raw content."""
    if not marks:
        return list(spans)
    starts = [m[2] for m in marks]
    return [(_raw_position(a, marks, starts, False), _raw_position(b, marks, starts, True)) for a, b in spans]


def _raw_position(pos: int, marks, starts, is_end: bool) -> int:
    i = bisect_right(starts, pos) - 1      # last placeholder starting at or before pos
    if i < 0:
        return pos
    ra, rb, ma, mb = marks[i]
    if pos == ma:
        return ra
    if pos < mb:                           # inside a placeholder: widen to all of it
        return rb if is_end else ra
    return rb + (pos - mb)


def _digits_all_masked(content: str, marks) -> bool:
    """No ASCII digit outside the masked spans: then the masked content, so the template, is the
    same for every line of this shape."""
    at = 0
    for ra, rb, _, _ in marks:
        if _ASCII_DIGIT.search(content, at, ra):
            return False
        at = rb
    return _ASCII_DIGIT.search(content, at) is None


def _normalised_state_config(saved: dict) -> dict:
    """A snapshot's masking and drain settings with the defaults of options added since it was
    written, so a snapshot of a core without them still restores into one with their defaults."""
    try:
        return {"masking": [MaskRule.model_validate(r).model_dump() for r in saved["masking"]],
                "drain": DrainOptions.model_validate(saved["drain"]).model_dump()}
    except (ValidationError, KeyError, TypeError):
        return saved


def _tree_to_json(node: Node) -> dict:
    return {"ids": list(node.cluster_ids), "kids": {t: _tree_to_json(c) for t, c in node.key_to_child_node.items()}}


def _tree_from_json(data: dict) -> Node:
    node = Node()
    node.cluster_ids = [int(i) for i in data["ids"]]
    node.key_to_child_node = {str(t): _tree_from_json(c) for t, c in data["kids"].items()}
    return node


# ------------------------------------------------------------------------------------------
