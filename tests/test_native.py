"""The compiled parse hot path (native/, issue 18 item 5) against the Python reference.

ParseCore's Python path is the reference; the compiled HotParse is taught by it and must write
the same ParsedEvent bytes for every line it takes, and leave every line it does not know to it."""
from __future__ import annotations

import shutil

import pytest

from services.cores.parse import NATIVE_AVAILABLE, ParseConfig, ParseCore
from services.records import Source, encode

needs_native = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="logwarden-native not installed (no cargo)")
KAFKA_MS = 1733161234567


def test_native_is_built_where_cargo_is():
    # make install builds native/ whenever cargo is on the PATH; a silent fall back to the Python
    # path there would hide a broken build
    if shutil.which("cargo"):
        assert NATIVE_AVAILABLE, "cargo is here but logwarden_native is not importable: run make install"


def _source(i: int, path: str, offset: int) -> Source:
    return Source(host="h1", topic="logs.h1", partition=2, offset=i, file_path=path, file_offset=offset,
                  kafka_timestamp=KAFKA_MS / 1000)


def _reference(core: ParseCore, line: str, i: int, path: str, offset: int):
    """(encoded events, their keys, the first one's timestamp), or the error's name."""
    try:
        events = core.parse(line, "h1", _source(i, path, offset), KAFKA_MS / 1000 - 5)
        return [encode(e) for e in events], [e.key for e in events], events[0].timestamp
    except Exception as err:          # ParseError, or msgspec refusing a lone surrogate: the same either way
        return type(err).__name__


def _both(ref: ParseCore, fast: ParseCore, lines: list[tuple[str, str]]):
    """Every line through the reference core, and through the hot path (else the second core's
    Python path, which teaches it): (lines taken by the hot path, lines where the two differ)."""
    hot = fast.hot_events()
    taken, different, offset = 0, [], 0
    for i, (line, path) in enumerate(lines):
        want = _reference(ref, line, i, path, offset)
        got = hot(line, "h1", "logs.h1", 2, i, path, offset, KAFKA_MS)
        if got is not None:
            taken += 1
            timestamp, events = got
            got = [value for value, _ in events], [key for _, key in events], timestamp
        else:
            got = _reference(fast, line, i, path, offset)
        if got != want:
            different.append((line, want, got))
        offset += len(line.encode("utf-8", "surrogatepass")) + 1
    return taken, different


@needs_native
def test_same_bytes_as_python_on_real_logs(datasets):
    # HDFS (the catalog's log) and loghub's 2k samples of fourteen systems; the Hadoop lines get
    # YARN container paths, so path keys and lines with several session keys are covered
    lines = [(line.rstrip("\n"), "/var/log/hdfs.log") for line in open(datasets / "hdfs" / "HDFS_5k.log")]
    for log in sorted((datasets / "loghub_2k").glob("*/*_2k.log")):
        for i, line in enumerate(open(log, encoding="utf-8", errors="surrogateescape")):
            path = (f"/logs/application_1445087491445_0005/container_1445087491445_0005_01_00000{i % 3}/syslog"
                    if log.name.startswith("Hadoop") else str(log))
            lines.append((line.rstrip("\n"), path))
    ref, fast = ParseCore(ParseConfig.load()), ParseCore(ParseConfig.load())
    taken, different = _both(ref, fast, lines)
    assert different == []
    assert taken > 4500                      # it does take most HDFS lines (5,000 of them)
    assert ref.counters == fast.counters     # lines it takes are counted by template kind too


@needs_native
def test_escaping_and_lines_it_leaves_to_python():
    base = "081109 203615 148 INFO dfs.DataNode$PacketResponder: Received block blk_{} of size 67108864"
    lines = [base.format(n) for n in (1, 2)]
    lines += ['081109 203615 148 INFO dfs.X: a "quoted" \\ back\tslash 1', '081109 203615 148 INFO dfs.X: a "quoted" \\ back\tslash 2']
    lines += ["081109 203615 148 INFO dfs.X: café 1", "081109 203615 148 INFO dfs.X: café 2"]   # not ASCII
    lines += ["081109 203615 148 INFO dfs.X: lone \ud800 1", "081109 203615 148 INFO dfs.X: lone \ud800 2"]
    lines += ["081109 203616 148 INFO dfs.X: a \"quoted\" \\ back\tslash 3"]   # a second not taught yet
    ref, fast = ParseCore(ParseConfig.load()), ParseCore(ParseConfig.load())
    hot = fast.hot_events()
    taken, different = _both(ref, fast, [(line, "/h/f.log") for line in lines])
    assert different == []
    assert taken == 2           # the second line of each ASCII shape; never the others
    assert hot("081109 203615 148 INFO dfs.X: café 3", "h1", "logs.h1", 0, 0, "/h/f.log", 0, KAFKA_MS) is None


@needs_native
def test_a_generalised_mined_template_is_not_served_stale():
    ref, fast = ParseCore(ParseConfig.load()), ParseCore(ParseConfig.load())
    text = "2015-10-18 18:01:47,97{} INFO [main] x.Y: task finished cleanly now with no errors for {}"
    lines = [text.format(1, "node_a"), text.format(2, "node_a"),   # taught: its template is the line
             text.format(3, "node_b"),                             # drain generalises that template
             text.format(4, "node_a")]
    _, different = _both(ref, fast, [(line, "/h/f.log") for line in lines])
    assert different == []
    event = fast.parse(lines[-1], "h1", _source(9, "/h/f.log", 0), 0)[0]
    assert "<*>" in event.template


def test_the_stage_can_be_told_not_to_use_it(monkeypatch):
    from services.settings import load_settings
    from services.stages import ParseStage

    assert ParseStage(load_settings(native_parse=False))._hot is None
    assert (ParseStage(load_settings())._hot is not None) == NATIVE_AVAILABLE
