"""Hadoop 3 HDFS lines map to block sessions as the 2008 ones do (issue 16, item 5).

The fixture (tests/fixtures/hadoop3/<host>.log) is 76 lines the lab's own cluster wrote (Hadoop
3.4.1: `logwarden lab record` with faults), picked by block and by template: two blocks' lines
on all three hosts (allocate, Receiving, PacketResponder, clienttrace, addStoredBlock, an append
that bumps the generation stamp, a checksum error and its report, a failed pipeline, the
deletion), and host lines without blocks (DirectoryScanner, JvmPauseMonitor, WebHDFS requests).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from models.data import sessions_from_logs
from models.microservices import find_layout, read_logs, read_raw_log
from services.cores.parse import ParseConfig, ParseCore, ParseError
from services.records import Source

FIXTURE = Path(__file__).parent / "fixtures" / "hadoop3"
HOSTS = ("nn1", "dn1", "dn2")
BLOCKS = ("blk_1073741923", "blk_1073741835")
HEADER = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} ")


def lines(host: str) -> list[str]:
    return (FIXTURE / f"{host}.log").read_text().splitlines()


@pytest.fixture(scope="module")
def parsed() -> dict[str, list]:
    """host -> [(line, events or ParseError)] through one parse core, as the parse stage would."""
    core = ParseCore(ParseConfig.load())
    out = {}
    for host in HOSTS:
        rows = []
        for i, line in enumerate(lines(host)):
            source = Source(host=host, topic=f"logs.{host}", partition=0, offset=i,
                            file_path=str(FIXTURE / f"{host}.log"), file_offset=i)
            try:
                rows.append((line, core.parse(line, host, source, 0.0)))
            except ParseError as err:
                rows.append((line, err))
        out[host] = rows
    return out


def test_the_fixture_is_real_hadoop_3_output_of_the_lab():
    assert sum(len(lines(h)) for h in HOSTS) == 76
    assert any("BP-1795997846-127.0.0.1-1796166683721:blk_1073741923_1109" in line for line in lines("dn2"))


def test_every_header_line_parses_as_log4j_and_continuation_lines_are_bad_headers(parsed):
    for host, rows in parsed.items():
        for line, result in rows:
            if HEADER.match(line):
                assert not isinstance(result, ParseError), line
                assert result[0].level in ("INFO", "WARN", "ERROR") and result[0].source.host == host
            else:               # "  getBlockURI() = ...": the stream dead-letters it (bad_header)
                assert isinstance(result, ParseError) and result.reason == "bad_header"


def test_block_ids_with_generation_stamp_and_pool_key_to_the_bare_block_id(parsed):
    for rows in parsed.values():
        for line, result in rows:
            if isinstance(result, ParseError):
                continue
            named = set(re.findall(r"blk_(\d+)", line))
            keys = {e.key for e in result}
            if named:
                assert keys == {f"blk_{n}" for n in named}, line
            else:
                assert keys == {result[0].source.host}, line


def test_masked_templates_hold_no_block_pool_or_generation_stamp_digits(parsed):
    templates = {e.template for rows in parsed.values() for _, r in rows if not isinstance(r, ParseError) for e in r}
    assert templates
    for text in templates:
        assert not re.search(r"blk_\d|BP-\d", text), text
    assert any("<BLK>" in t for t in templates) and any("<BP>" in t for t in templates)


def test_the_same_line_with_another_generation_stamp_has_the_same_template(parsed):
    added = [r[0] for _, r in parsed["nn1"] if not isinstance(r, ParseError) and "addStoredBlock" in r[0].message]
    stamps = {re.search(r"blk_\d+_(\d+)", e.message).group(1) for e in added}
    assert len(stamps) >= 2 and len({e.template_id for e in added}) == 1
    assert all(e.params[1].startswith("blk_1073741") for e in added)   # the block, stamp and all, is a parameter


def test_a_block_is_one_session_across_the_three_hosts_as_2008_blocks_are(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("BlockId,Label\n" + "".join(f"{b},0\n" for b in BLOCKS))
    sequences, session_labels, sources = sessions_from_logs([FIXTURE / f"{h}.log" for h in HOSTS], labels)
    assert len(sequences) == 2 and session_labels == [0, 0]
    assert {s["unparsed_lines"] for s in sources if s["role"] == "log"} > {0}   # the continuation lines
    by_length = sorted(sequences, key=lambda s: len(s.keys))
    corrupted = by_length[-1]          # blk_1073741923: written, read with a checksum error, appended, deleted
    assert len(corrupted.keys) == sum(line.count("blk_1073741923") > 0 for h in HOSTS for line in lines(h)
                                      if HEADER.match(line)) == 28
    assert corrupted.timestamps == sorted(corrupted.timestamps)
    texts = " | ".join(corrupted.templates)
    for step in ("allocate", "Receiving", "addStoredBlock", "Checksum error", "reportBadBlocks",
                 "updatePipeline", "Appending", "Deleted"):
        assert step in texts, step


def test_raw_lab_logs_read_as_log_records_with_continuations_joined(tmp_path):
    (tmp_path / "log").mkdir()
    for host in HOSTS:
        (tmp_path / "log" / f"{host}.log").write_bytes((FIXTURE / f"{host}.log").read_bytes())
    layout = find_layout(tmp_path)
    assert [p.name for p in layout.log] == ["dn1.log", "dn2.log", "nn1.log"]
    records = list(read_logs(layout.log))
    headers = sum(1 for h in HOSTS for line in lines(h) if HEADER.match(line))
    assert len(records) == headers
    assert {r.pod for r in records} == set(HOSTS) and all(r.node == r.pod and r.trace_id is None for r in records)
    appended = next(r for r in read_raw_log(tmp_path / "log" / "dn1.log") if "Appending to FinalizedReplica" in r.message)
    assert "\n  getBlockURI()" in appended.message
    first = records[0]                 # dn1.log's first line: 2026-12-01 23:11:35,949 (UTC)
    assert first.pod == "dn1" and first.timestamp == pytest.approx(1796166695.949, abs=1e-6)
