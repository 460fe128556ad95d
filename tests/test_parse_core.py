"""The parse core without Kafka: headers, masking, templates and their ids, keys, state, dedup."""
from __future__ import annotations

import collections
import csv
import json
import random
import re
from datetime import datetime, timezone

import msgspec
import pytest
from drain3 import TemplateMiner
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

from services.cores.parse import (UNKNOWN, ParseConfig, ParseConfigError, ParseCore, ParseError,
                            ParseStateError, digit_blind, load_catalog)
from services.records import ParsedEvent, Source, decode, encode, stable_id

HDFS_LINE = ("081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_-1608999687919862906 "
             "src: /10.250.19.102:54106 dest: /10.250.19.102:50010")


def utc(*fields) -> float:
    return datetime(*fields, tzinfo=timezone.utc).timestamp()


def source(offset: int = 0, host: str = "dn1", path: str = "/var/log/hadoop/hdfs.log") -> Source:
    return Source(host=host, topic=f"logs.{host}", partition=0, offset=offset, file_path=path, file_offset=offset)


def parse(core: ParseCore, line: str, offset: int = 0, host: str = "dn1", fallback_ts: float = 0.0):
    return core.parse(line, host, source(offset, host), fallback_ts)


@pytest.fixture(scope="module")
def config() -> ParseConfig:
    return ParseConfig.load()


@pytest.fixture(scope="module")
def hdfs_catalog(datasets) -> dict[str, str]:
    return load_catalog(datasets / "hdfs" / "HDFS_templates.csv")


@pytest.fixture(scope="module")
def hdfs_lines(datasets) -> list[str]:
    return (datasets / "hdfs" / "HDFS_20000.log").read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------------------
# headers
@pytest.mark.parametrize("line, fmt, timestamp, level, component, content", [
    (HDFS_LINE, "hdfs", utc(2008, 11, 9, 20, 35, 18), "INFO", "dfs.DataNode$DataXceiver",
     "Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010"),
    ("2015-10-18 18:01:47,978 INFO [main] org.apache.hadoop.mapreduce.v2.app.MRAppMaster: Created MRAppMaster "
     "for application appattempt_1445144423722_0020_000001", "log4j", utc(2015, 10, 18, 18, 1, 47) + 0.978, "INFO",
     "org.apache.hadoop.mapreduce.v2.app.MRAppMaster",
     "Created MRAppMaster for application appattempt_1445144423722_0020_000001"),
    ("2015-10-18 18:05:01,100 WARN org.apache.hadoop.yarn.server.nodemanager.NodeManager: Node unhealthy",
     "log4j", utc(2015, 10, 18, 18, 5, 1) + 0.1, "WARN", "org.apache.hadoop.yarn.server.nodemanager.NodeManager",
     "Node unhealthy"),
    ("- 1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL INFO "
     "instruction cache parity error corrected", "bgl", utc(2005, 6, 3, 15, 42, 50) + 0.675872, "INFO", "KERNEL",
     "instruction cache parity error corrected"),
    ("17/06/09 20:10:40 INFO executor.CoarseGrainedExecutorBackend: Registered signal handlers for [TERM, HUP, INT]",
     "log4j-short", utc(2017, 6, 9, 20, 10, 40), "INFO", "executor.CoarseGrainedExecutorBackend",
     "Registered signal handlers for [TERM, HUP, INT]"),
    ("2023-01-29T08:30:00.250+02:00 ERROR payment failed for order 42", "generic",
     utc(2023, 1, 29, 6, 30, 0) + 0.25, "ERROR", None, "payment failed for order 42"),
    ("2015-07-29 17:41:44,747 - INFO  [QuorumPeer[myid=1]/0:0:0:0:0:0:0:0:2181:FastLeaderElection@774] - "
     "Notification time out: 3200", "generic", utc(2015, 7, 29, 17, 41, 44) + 0.747, "INFO", None,
     "[QuorumPeer[myid=1]/0:0:0:0:0:0:0:0:2181:FastLeaderElection@774] - Notification time out: 3200"),
])
def test_header_formats_split_time_level_component_and_content(config, line, fmt, timestamp, level, component, content):
    core = ParseCore(config)
    assert core.split_header(line, 0.0) == (fmt, pytest.approx(timestamp, abs=1e-6), level, component, content)
    (event,) = parse(core, line)
    assert event.timestamp == pytest.approx(timestamp, abs=1e-6)
    assert (event.level, event.component) == (level, component)


def test_syslog_header_takes_the_year_from_the_fallback_time(config):
    core = ParseCore(config)
    line = "Jun 14 15:16:01 combo sshd(pam_unix)[19939]: check pass; user unknown"
    fmt, timestamp, _, component, content = core.split_header(line, utc(2005, 7, 1))
    assert (fmt, component, content) == ("syslog", "sshd(pam_unix)", "check pass; user unknown")
    assert timestamp == utc(2005, 6, 14, 15, 16, 1)
    # a December line read in early January belongs to the year before
    assert core.split_header("Dec 31 23:59:59 combo cron[1]: tick", utc(2006, 1, 1, 0, 5))[1] == utc(2005, 12, 31, 23, 59, 59)
    # ... and the same header read at the end of that year is that year's
    assert core.split_header("Dec 31 23:59:59 combo cron[1]: tick", utc(2006, 12, 31, 23, 59))[1] == utc(2006, 12, 31, 23, 59, 59)


def test_a_line_without_a_known_header_is_a_parse_error(config):
    core = ParseCore(config)
    with pytest.raises(ParseError) as err:
        parse(core, "just some words without a timestamp")
    assert err.value.reason == "bad_header" and "just some words" in err.value.detail
    with pytest.raises(ParseError) as err:    # month 13: the header shape fits, the time does not
        parse(core, "081309 203518 143 INFO dfs.DataNode: Receiving block blk_1 src: /1.2.3.4:5 dest: /1.2.3.4:6")
    assert err.value.reason == "bad_header"
    assert core.stats()["bad_header"] == 2 and core.stats()["lines"] == 0


def test_without_required_header_the_fallback_time_and_whole_line_are_used(config):
    core = ParseCore(config.model_copy(update={"require_header": False}))
    (event,) = parse(core, "no header at all, 17 retries", fallback_ts=1234.5)
    assert event.timestamp == 1234.5 and event.level is None
    assert event.params == ["17"] and "<NUM>" in core.match_content("no header at all, 17 retries").template


# ------------------------------------------------------------------------------------------
# masking
def test_masking_replaces_blocks_ips_paths_hex_uuids_numbers_and_keeps_words_with_digits(config):
    core = ParseCore(config)
    masked, values = core.mask("blk_-42 from /10.1.2.3:50010 wrote /mnt/hadoop/job_1/job.jar at 0x7fed806e "
                               "id 0b2c6a4e-1f2a-4c8e-9d3b-5e6f7a8b9c0d took 0.25 s on dn228, 3 of 17")
    assert masked == "<BLK> from /<IP> wrote <PATH> at <HEX> id <UUID> took <DUR> on dn228, <NUM> of <NUM>"
    assert values == ["blk_-42", "10.1.2.3:50010", "/mnt/hadoop/job_1/job.jar", "0x7fed806e",
                      "0b2c6a4e-1f2a-4c8e-9d3b-5e6f7a8b9c0d", "0.25 s", "3", "17"]


@pytest.mark.parametrize("content, masked", [
    ("connection from 63.197.98.106 (adsl-63-197-98-106.dsl.mtry01.pacbell.net) at Mon Jul  4 12:52:44 2005",
     "connection from <IP> (<HOST>) at <DATE>"),
    ("tcpconn3.tencent.com:443 close, 1190 bytes (1.16 KB) sent, 815 bytes received, lifetime 00:02",
     "<HOST> close, <SIZE> sent, <SIZE> received, lifetime <TIME>"),
    ("attempt_1445144423722_0020_m_000000_0 TaskAttempt Transitioned from NEW to UNASSIGNED",
     "<ID> TaskAttempt Transitioned from NEW to UNASSIGNED"),
    ("Block broadcast_9_piece0 stored as bytes in memory (estimated size 5.2 KB, free 14.0 MB)",
     "Block <ID> stored as bytes in memory (estimated size <SIZE>, free <SIZE>)"),
    ("Invalid user admin from 5.188.10.180", "Invalid user <USER> from <IP>"),
    ("GET /v2/54fadb412c4e40cdbaed9335e4c35a9e/servers/detail?all_tenants=True HTTP/1.1 took 12ms, seq 0000000d",
     "GET <PATH> HTTP/<NUM> took <DUR>, seq <HEX>"),
    ("written to hdfs://msra-sa-41:9000/tmp/x at 2017-05-16T05:54:58.530", "written to <URL> at <DATE>"),
])
def test_masking_takes_out_the_values_programs_fill_in(config, content, masked):
    assert ParseCore(config).mask(content)[0] == masked


def test_one_combined_masking_pass_equals_drain3_applying_the_same_rules_one_by_one(config, hdfs_lines):
    core = ParseCore(config)
    tmc = TemplateMinerConfig()
    tmc.mask_prefix = tmc.mask_suffix = ""
    tmc.masking_instructions = [MaskingInstruction(r.pattern, r.placeholder) for r in config.masking]
    masker = TemplateMiner(config=tmc).masker
    contents = [core.split_header(line, 0.0)[4] for line in hdfs_lines[::4]]
    differing = [c for c in contents if core.mask(c)[0] != masker.mask(c)]
    assert not differing, differing[:3]


def test_digit_blindness_of_regexes():
    assert digit_blind(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?(?![\w.])")
    assert digit_blind(r"[0-9a-f]{8}\b[^a-z]")
    assert not digit_blind(r"0x[0-9a-f]+")       # names the digit 0
    assert not digit_blind(r"[1-9]\d*")         # a class with some digits only
    assert not digit_blind(r"(\d)\1")           # a back-reference compares digit values


# ------------------------------------------------------------------------------------------
# templates
def test_every_hdfs_20000_line_maps_to_its_loghub_event(datasets, config, hdfs_catalog, hdfs_lines):
    core = ParseCore(config, catalog=hdfs_catalog)
    sequences: dict[str, list[str]] = collections.defaultdict(list)
    for offset, line in enumerate(hdfs_lines):
        for event in parse(core, line, offset):
            sequences[event.key].append(event.template_id)
    with open(datasets / "hdfs" / "HDFS_100k_block_labels.csv", newline="") as fh:
        truth = {r["BlockId"]: r["EventSequence_first_100k_lines"].split() for r in csv.DictReader(fh)}
    with open(datasets / "hdfs" / "HDFS_20000_block_labels.csv", newline="") as fh:
        blocks = {r["BlockId"] for r in csv.DictReader(fh)}
    assert set(sequences) == blocks and len(blocks) == 1782
    # HDFS_20000 is the first 20k of those 100k lines: each block's events are a prefix
    wrong = {b: (s, truth[b][:len(s)]) for b, s in sequences.items() if truth[b][:len(s)] != s}
    assert not wrong, list(wrong.items())[:3]
    assert core.stats()["known"] == len(hdfs_lines) and core.stats()["mined"] == 0


def test_parse_fills_a_parsed_event_as_records_defines_it(config, hdfs_catalog):
    core = ParseCore(config, catalog=hdfs_catalog)
    (event,) = core.parse(HDFS_LINE + "\r\n", "dn7", source(4242, "dn7"), 0.0)
    assert event == msgspec.convert(msgspec.to_builtins(event), ParsedEvent)       # every field of the right type
    assert decode(encode(event), ParsedEvent) == event
    assert event.event_id == stable_id("dn7", "/var/log/hadoop/hdfs.log", 4242)
    assert (event.template_id, event.template) == ("E5", "<*>Receiving block<*>src:<*>dest:<*>")
    assert event.params == ["", "blk_-1608999687919862906", "/10.250.19.102:54106", "/10.250.19.102:50010"]
    assert event.message == HDFS_LINE and event.key == "blk_-1608999687919862906"


def test_catalog_ids_do_not_depend_on_the_order_lines_arrive_in(config, hdfs_catalog, hdfs_lines):
    lines = hdfs_lines[:3000]
    shuffled = list(enumerate(lines))
    random.Random(7).shuffle(shuffled)
    first, second = ParseCore(config, catalog=hdfs_catalog), ParseCore(config, catalog=hdfs_catalog)
    in_order = [parse(first, line)[0].template_id for line in lines]
    reordered = dict((i, parse(second, line)[0].template_id) for i, line in shuffled)
    assert in_order == [reordered[i] for i in range(len(lines))]
    assert len(set(in_order)) > 5


def test_most_specific_catalog_template_wins(config):
    core = ParseCore(config, catalog={"E1": "<*>Exception<*>", "E2": "<*>Exception in receiveBlock for block<*>"})
    assert core.match_content("Exception in receiveBlock for block blk_1 java.io.IOException").template_id == "E2"
    assert core.match_content("Exception while reading").template_id == "E1"


def test_a_mined_template_keeps_its_first_id_as_drain_generalises_it(config):
    core = ParseCore(config)
    first = parse(core, "2015-10-18 18:01:47,978 INFO [main] a.B: Starting task alpha1 now", 0)[0]
    second = parse(core, "2015-10-18 18:01:48,000 INFO [main] a.B: Starting task beta2 now", 1)[0]
    assert first.template == "Starting task alpha1 now"
    assert first.template_id == "T" + stable_id("Starting task alpha1 now", size=12)
    # drain merged the second line into the first's template: the id already emitted stays
    assert second.template == "Starting task <*> now" and second.params == ["beta2"]
    assert second.template_id == first.template_id
    again = parse(core, "2015-10-18 18:01:49,000 INFO [main] a.B: Starting task alpha1 now", 2)[0]
    assert (again.template_id, again.params) == (first.template_id, ["alpha1"])
    assert core.templates() == {first.template_id: "Starting task <*> now"}
    other = ParseCore(config)          # another replica reading the same first line: the same id
    assert parse(other, "2015-10-18 18:03:00,000 INFO [main] a.B: Starting task alpha1 now")[0].template_id == first.template_id
    assert core.stats()["new_templates"] == 1 and core.stats()["mined"] == 3


def test_plain_words_are_constants_two_states_are_two_templates(config):
    core = ParseCore(config)
    line = "2015-10-18 18:01:47,978 INFO [AsyncDispatcher] a.TaskImpl: task_1445144423722_0020_m_00000{} Task Transitioned from {} to {}"
    ids = [parse(core, line.format(i, a, b), i)[0].template_id
           for i, (a, b) in enumerate([("NEW", "SCHEDULED"), ("SCHEDULED", "RUNNING"), ("NEW", "SCHEDULED"),
                                       ("SCHEDULED", "RUNNING")])]
    assert ids[0] == ids[2] and ids[1] == ids[3] and ids[0] != ids[1]
    # at drain3's own threshold, the rule still keeps them apart; without it they become one
    # template "... from <*> to <*>"
    for constants, templates in ((config.drain.constant_tokens, 2), (None, 1)):
        drain = config.drain.model_copy(update={"sim_th": 0.4, "constant_tokens": constants})
        loose = ParseCore(config.model_copy(update={"drain": drain}))
        assert len({parse(loose, line.format(i, a, b), i)[0].template_id
                    for i, (a, b) in enumerate([("NEW", "SCHEDULED"), ("SCHEDULED", "RUNNING")])}) == templates


def test_params_of_mined_templates_are_masked_values_and_wildcards_in_order(config):
    core = ParseCore(config)
    core.match_content("worker w1 logged in from 10.0.0.1:22 after 3 tries")
    match = core.match_content("worker w2b logged in from 10.0.0.2:22 after 5 tries")
    assert match.template == "worker <*> logged in from <IP> after <NUM> tries"
    assert match.params == ["w2b", "10.0.0.2:22", "5"]


def test_frozen_vocabulary_maps_new_lines_to_unknown_and_counts_them(config, hdfs_catalog):
    core = ParseCore(config, catalog=hdfs_catalog, frozen=True)
    assert parse(core, HDFS_LINE)[0].template_id == "E5"
    (event,) = parse(core, "081109 203519 143 INFO dfs.DataNode: Disk /data7 failed after 12 errors")
    assert (event.template_id, event.template) == (UNKNOWN, "Disk /data7 failed after <NUM> errors")
    assert event.params == ["12"]
    stats = core.stats()
    assert (stats["known"], stats["unknown"], stats["mined"], stats["mined_templates"]) == (1, 1, 0, 0)


def test_a_frozen_core_knows_the_templates_mined_before_its_snapshot(config):
    trainer = ParseCore(config)
    mined = [parse(trainer, f"2015-10-18 18:01:4{i},000 INFO [main] a.B: Starting task {n} now", i)[0]
             for i, n in enumerate(("alpha1", "beta2", "gamma3"))]
    frozen = ParseCore(config, frozen=True)
    frozen.restore(trainer.snapshot())
    known = parse(frozen, "2015-10-18 18:05:00,000 INFO [main] a.B: Starting task omega4 now")[0]
    assert known.template_id == mined[-1].template_id
    assert parse(frozen, "2015-10-18 18:05:01,000 INFO [main] a.B: Stopping everything")[0].template_id == UNKNOWN
    assert frozen.stats()["known"] == 1 and frozen.stats()["unknown"] == 1 and frozen.stats()["mined_templates"] == 1


def test_emitted_ids_group_the_hadoop_familys_lines_as_loghub_does(datasets, config):
    """Issue 19's target for the ids detectors see (BENCHMARKS.md has every system)."""
    from bench.parse_bench import grouping_accuracy, loghub_sets, ours_groups

    scores = {system: grouping_accuracy(truth, ours_groups(contents, ParseCore(config))[1])
              for system, contents, truth, _, _ in loghub_sets(datasets) if system in ("Hadoop", "Spark", "Zookeeper")}
    assert len(scores) == 3 and min(scores.values()) >= 0.98, scores


def test_grouping_accuracy_counts_a_line_only_when_its_group_is_exactly_its_true_one():
    from bench.parse_bench import grouping_accuracy

    assert grouping_accuracy(list("aabbc"), [1, 1, 2, 2, 3]) == 1.0
    assert grouping_accuracy(list("aabbc"), [1, 1, 2, 2, 2]) == 0.4      # b and c merged: 3 lines wrong
    assert grouping_accuracy(list("aabbc"), [1, 9, 2, 2, 3]) == 0.6      # a split: both its lines wrong


# ------------------------------------------------------------------------------------------
# keys
def test_a_line_naming_several_blocks_gives_one_event_per_block(config, hdfs_catalog):
    core = ParseCore(config, catalog=hdfs_catalog)
    line = ("081109 204005 35 INFO dfs.FSNamesystem: BLOCK* ask 10.251.71.16:50010 to delete  "
            "blk_-5140072410813878235 blk_7721371530452357398 blk_-5140072410813878235")
    events = parse(core, line, 99)
    assert [e.key for e in events] == ["blk_-5140072410813878235", "blk_7721371530452357398"]
    assert all(e.keys == ["blk_-5140072410813878235", "blk_7721371530452357398"] for e in events)
    assert len({e.event_id for e in events}) == 1 and {e.template_id for e in events} == {"E30"}


@pytest.fixture(scope="module")
def hadoop_lines(datasets) -> list[str]:
    return (datasets / "loghub_2k" / "Hadoop" / "Hadoop_2k.log").read_text(encoding="utf-8").splitlines()


def test_yarn_and_mapreduce_ids_are_session_keys(config, hadoop_lines):
    core = ParseCore(config)
    keys = {n: parse(core, hadoop_lines[n - 1], n)[0].keys for n in (1, 117, 128, 132)}
    assert keys[1] == ["appattempt_1445144423722_0020_000001"]
    assert keys[117] == ["container_1445144423722_0020_01_000002", "attempt_1445144423722_0020_m_000000_0"]
    assert keys[128] == keys[132] == keys[117]
    events = parse(core, hadoop_lines[116], 117)          # one event per session the line belongs to
    assert [e.key for e in events] == keys[117] and len({e.event_id for e in events}) == 1
    every = collections.Counter(k for i, line in enumerate(hadoop_lines) for k in parse(core, line, i)[0].keys)
    assert every["application_1445144423722_0020"] > 0 and every["job_1445144423722_0020"] > 0
    assert every["task_1445144423722_0020_m_000000"] > 0 and every["attempt_1445144423722_0020_r_000000_0"] > 0
    # "job_1445144423722_0020Job Transitioned from NEW to INITED" still names the job
    assert parse(core, "2015-10-18 18:01:52,000 INFO [main] a.JobImpl: job_1445144423722_0020Job Transitioned "
                       "from NEW to INITED")[0].keys == ["job_1445144423722_0020"]
    # and an id inside a file name is no session: HDFS's .../job_200811092030_0001/job.jar
    assert parse(core, "081109 203518 35 INFO dfs.FSNamesystem: BLOCK* NameSystem.allocateBlock: "
                       "/mnt/hadoop/mapred/system/job_200811092030_0001/job.jar. blk_-1608999687919862906")[0].keys \
        == ["blk_-1608999687919862906"]


def test_container_ids_with_and_without_an_epoch(config):
    core = ParseCore(config)
    for container in ("container_1445144423722_0020_01_000002", "container_e17_1445144423722_0020_01_000002"):
        line = f"2017-06-09 20:10:40,001 INFO [main] a.NM: Container {container} transitioned from LOCALIZED to RUNNING"
        assert parse(core, line)[0].keys == [container]


def test_a_container_log_line_naming_no_id_is_keyed_by_its_files_path(config, hadoop_lines):
    core = ParseCore(config)
    path = ("/var/log/hadoop-yarn/containers/application_1445144423722_0020/"
            "container_e17_1445144423722_0020_01_000001/syslog")
    at = Source(host="nm3", topic="logs.nm3", partition=0, offset=5, file_path=path, file_offset=700)
    events = core.parse(hadoop_lines[3], "nm3", at, 0.0)       # "Using mapred newApiCommitter."
    assert [e.key for e in events] == ["application_1445144423722_0020", "container_e17_1445144423722_0020_01_000001"]
    # a line that names ids of its own belongs to those sessions and to its file's
    (first, *_) = core.parse(hadoop_lines[116], "nm3", at, 0.0)
    assert first.keys == ["container_1445144423722_0020_01_000002", "attempt_1445144423722_0020_m_000000_0",
                          "application_1445144423722_0020", "container_e17_1445144423722_0020_01_000001"]
    # the same container named in the line and by the path is one session, not two
    (line_and_path,) = {tuple(e.keys) for e in core.parse(
        "2015-10-18 18:01:57,000 INFO [main] a.B: Launching container_e17_1445144423722_0020_01_000001", "nm3", at, 0.0)}
    assert line_and_path == ("container_e17_1445144423722_0020_01_000001", "application_1445144423722_0020")
    # files outside YARN's layout add nothing
    assert parse(core, hadoop_lines[3])[0].keys == []


def test_key_extractors_may_share_a_name_and_scope_is_checked(tmp_path, config):
    names = [k.name for k in config.session_keys]
    assert names.count("yarn_container") == 2 and {k.scope for k in config.session_keys} == {"content", "path"}
    path = tmp_path / "parse.yaml"
    path.write_text("headers:\n  - name: x\n    pattern: '(?P<ts>\\d+) (?P<content>.*)'\n    time_format: epoch\n"
                    "session_keys:\n  - name: k\n    pattern: 'k\\d+'\n    scope: filename\n")
    with pytest.raises(ParseConfigError, match=r"session_keys\[0\]\.scope"):
        ParseConfig.load(path)


def test_a_line_without_a_session_key_is_keyed_by_its_host(config, datasets):
    core = ParseCore(config)
    lines = (datasets / "bgl" / "BGL_first10k.log").read_text().splitlines()[:200]
    events = [e for i, line in enumerate(lines) for e in parse(core, line, i, host="bgl-node")]
    assert len(events) == 200
    assert all(e.key == "bgl-node" and e.keys == [] for e in events)
    assert events[0].template == "instruction cache parity error corrected"


# ------------------------------------------------------------------------------------------
# the line-shape cache must not change any result
def test_shape_cache_gives_exactly_what_the_long_way_gives(config, hdfs_catalog, hdfs_lines, datasets):
    bgl = (datasets / "bgl" / "BGL_first10k.log").read_text().splitlines()[:2000]
    lines = hdfs_lines[:6000] + bgl
    fast, slow = ParseCore(config, catalog=hdfs_catalog), ParseCore(config, catalog=hdfs_catalog)
    slow.shape_cache_enabled = False
    assert fast.shape_cache_enabled
    for offset, line in enumerate(lines):
        assert [msgspec.to_builtins(e) for e in parse(fast, line, offset)] == [msgspec.to_builtins(e) for e in parse(slow, line, offset)]
    assert fast.stats() == slow.stats()


def test_a_rule_naming_particular_digits_turns_the_shape_cache_off_and_is_still_right(config):
    rules = [r.model_dump() for r in config.masking]
    rules.insert(0, {"name": "hex0", "pattern": r"(?<!\w)0x[0-9a-f]+\b", "placeholder": "<HEX0>"})
    core = ParseCore(ParseConfig.model_validate({**config.model_dump(), "masking": rules}), frozen=True)
    assert not core.shape_cache_enabled
    # one shape (digits read as 0), two different maskings; frozen, so the masked content shows
    (event,) = parse(core, "081109 203518 143 INFO dfs.DataNode: wrote 0x1f")
    (other,) = parse(core, "081109 203518 143 INFO dfs.DataNode: wrote 5x1f")
    assert (event.template, other.template) == ("wrote <HEX0>", "wrote <HEX>")


# ------------------------------------------------------------------------------------------
# state
def test_snapshot_restore_keeps_every_template_id(config, hdfs_lines):
    lines = hdfs_lines[:4000]
    original = ParseCore(config)                    # no catalog: everything is mined
    for i, line in enumerate(lines[:2000]):
        parse(original, line, i)
    data = original.snapshot()
    restored = ParseCore(config)
    restored.restore(data)
    assert restored.snapshot() == data
    for i, line in enumerate(lines[2000:]):
        assert parse(restored, line, i)[0].template_id == parse(original, line, i)[0].template_id
    assert restored.snapshot() == original.snapshot()
    assert restored.templates() == original.templates() and len(original.templates()) > 5


def test_a_generalised_template_keeps_its_first_id_across_a_restart(config):
    line = "2015-10-18 18:01:4{},000 INFO [main] a.B: Starting task {} now"
    core = ParseCore(config)
    first = parse(core, line.format(0, "alpha1"))[0].template_id
    assert parse(core, line.format(1, "beta2"))[0].template == "Starting task <*> now"
    data = core.snapshot()
    restarted = ParseCore(config)
    restarted.restore(data)
    assert parse(restarted, line.format(2, "gamma3"))[0].template_id == first
    assert restarted.templates() == {first: "Starting task <*> now"} and restarted.snapshot() == data
    # a snapshot written before ids were kept per template: the id of the text it has now, which
    # is the id such a core emitted last
    state = json.loads(data)
    del state["drain"]["template_ids"]
    old = ParseCore(config)
    old.restore(json.dumps(state).encode())
    assert parse(old, line.format(3, "delta4"))[0].template_id == "T" + stable_id("Starting task <*> now", size=12)


def test_a_snapshot_without_the_newer_drain_options_restores_with_their_defaults(config):
    plain = config.model_copy(update={"drain": config.drain.model_copy(update={"constant_tokens": None,
                                                                                "wildcards_count": False})})
    core = ParseCore(plain)
    parse(core, "2015-10-18 18:01:47,978 INFO [main] a.B: hello 1")
    state = json.loads(core.snapshot())
    for option in ("constant_tokens", "wildcards_count"):
        del state["config"]["drain"][option]
    restored = ParseCore(plain)
    restored.restore(json.dumps(state).encode())
    assert restored.templates() == core.templates()


def test_snapshot_is_json_and_refuses_other_masking(config):
    core = ParseCore(config)
    parse(core, "2015-10-18 18:01:47,978 INFO [main] a.B: hello 1")
    data = core.snapshot()
    assert data.startswith(b"{") and b"py/object" not in data
    other = ParseCore(config.model_copy(update={"masking": config.masking[:2]}))
    with pytest.raises(ParseStateError):
        other.restore(data)
    with pytest.raises(ParseStateError):
        core.restore(b"not json")
    with pytest.raises(ParseStateError):
        core.restore(b"[1, 2]")
    adopted = ParseCore.from_snapshot(data, config.model_copy(update={"masking": config.masking[:2]}))
    assert adopted.config.masking == config.masking and adopted.templates() == core.templates()


# ------------------------------------------------------------------------------------------
# configuration errors
def test_the_packaged_config_loads(config):
    assert [h.name for h in config.headers][:2] == ["hdfs", "log4j"]
    assert any(k.pattern == r"blk_-?\d+" for k in config.session_keys)


@pytest.mark.parametrize("text, problem", [
    ("headers:\n  - name: x\n    pattern: '(?P<ts>\\d+ (?P<content>.*)'\n    time_format: epoch\n",
     r"headers\[0\]\.pattern: not a valid regular expression"),
    ("headers:\n  - name: x\n    pattern: '(?P<ts>\\d+) (?P<body>.*)'\n    time_format: epoch\n",
     r"headers\[0\]\.pattern: needs named groups .* missing content"),
    ("headers:\n  - name: x\n    pattern: '(?P<ts>\\d+) (?P<content>.*)'\n    time_format: epoch\n"
     "masking:\n  - name: n\n    pattern: '\\d+('\n    placeholder: '<N>'\n", r"masking\[0\]\.pattern"),
    ("headers:\n  - name: x\n    pattern: '(?P<ts>\\d+) (?P<content>.*)'\n    time_format: epoch\n"
     "masking:\n  - name: n\n    pattern: '\\d+'\n    placeholder: '<A NUMBER>'\n", r"masking\[0\]\.placeholder"),
    ("headers:\n  - name: x\n    pattern: '(?P<ts>\\d+) (?P<content>.*)'\n    time_format: epoch\n"
     "drain: {sim_th: 3}\n", r"drain\.sim_th"),
    ("headers: []\nmaskin: []\n", r"headers|maskin"),
    ("headers: [unclosed\n", r"not valid YAML at line"),
    ("- just a list\n", r"expected a mapping"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "parse.yaml"
    path.write_text(text)
    with pytest.raises(ParseConfigError) as err:
        ParseConfig.load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert re.search(problem, message), message


def test_missing_config_and_catalog_files_are_clear_errors(tmp_path):
    with pytest.raises(ParseConfigError, match="no such file"):
        ParseConfig.load(tmp_path / "nope.yaml")
    bad = tmp_path / "templates.csv"
    bad.write_text("Id,Text\nE1,x\n")
    with pytest.raises(ParseConfigError, match="EventId,EventTemplate"):
        load_catalog(bad)
