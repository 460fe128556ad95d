"""services.cores.promtext: Prometheus text exposition -> samples, bad lines named, never fatal."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from services.cores.promtext import Sample, parse, parse_sample

FIXTURE = Path(__file__).parent / "fixtures" / "hadoop3"

PAGE = """\
# HELP http_requests_total The total number of HTTP requests.
# TYPE http_requests_total counter
http_requests_total{method="post",code="200"} 1027 1395066363000
http_requests_total{method="post",code="400"}    3 1395066363000

# Escaping in label values:
msdos_file_access_time_seconds{path="C:\\\\DIR\\\\FILE.TXT",error="Cannot find file:\\n\\"FILE.TXT\\""} 1.458255915e9

# Minimalistic line:
metric_without_timestamp_and_labels 12.47

# A weird metric from before the epoch:
something_weird{problem="division by zero"} +Inf -3982045

# TYPE rpc_duration_seconds summary
rpc_duration_seconds{quantile="0.5",} 4773
rpc_duration_seconds_sum 1.7560473e+07
nan_gauge NaN
neg_inf -Inf
# EOF
"""


def test_the_format_documentation_example_parses_in_full():
    page = parse(PAGE)
    assert page.errors == []
    assert page.types == {"http_requests_total": "counter", "rpc_duration_seconds": "summary"}
    assert page.helps["http_requests_total"] == "The total number of HTTP requests."
    names = [s.name for s in page.samples]
    assert names == ["http_requests_total", "http_requests_total", "msdos_file_access_time_seconds",
                     "metric_without_timestamp_and_labels", "something_weird", "rpc_duration_seconds",
                     "rpc_duration_seconds_sum", "nan_gauge", "neg_inf"]
    first = page.samples[0]
    assert first == Sample("http_requests_total", {"method": "post", "code": "200"}, 1027.0, 1395066363.0)
    assert page.samples[2].labels == {"path": "C:\\DIR\\FILE.TXT", "error": 'Cannot find file:\n"FILE.TXT"'}
    assert page.samples[3].labels == {} and page.samples[3].timestamp is None
    assert page.samples[4].value == math.inf and page.samples[4].timestamp == -3982.045
    assert page.samples[5].labels == {"quantile": "0.5"}          # trailing comma allowed
    assert math.isnan(page.samples[7].value) and page.samples[8].value == -math.inf


def test_label_values_may_hold_braces_commas_quotes_and_spaces_as_hadoop_writes_them():
    line = ("org_apache_hadoop_hdfs_server_datanode_fsdataset_impl_fs_dataset_impl_capacity{context=\"FSDatasetState\","
            "storageinfo=\"FSDataset{dirpath='[/lab/dn1/data1, /lab/dn1/data2]'}\",hostname=\"vm\"} 5.0E11")
    sample = parse_sample(line)
    assert sample.labels["storageinfo"] == "FSDataset{dirpath='[/lab/dn1/data1, /lab/dn1/data2]'}"
    assert sample.value == 5.0e11


def test_series_names_are_stable_sorted_and_can_drop_labels():
    sample = Sample("rpc_queue", {"port": "rpc", "hostname": "vm", "context": "rpc", "q": 'a"b'}, 1.0)
    assert sample.series(("hostname",)) == 'rpc_queue{context="rpc",port="rpc",q="a\\"b"}'
    assert Sample("up", {"hostname": "vm"}, 1.0).series(("hostname",)) == "up"
    assert parse_sample(sample.series() + " 1").labels == sample.labels    # round trip


@pytest.mark.parametrize("line, reason", [
    ("9bad_name 1", "no metric name"),
    ("metric{a=1} 1", 'label a: expected ="..."'),
    ('metric{a="1" 2', "expected , or }"),
    ('metric{a="1\\x"} 2', "bad escape"),
    ('metric{a="1",a="2"} 3', "given twice"),
    ('metric{a="unterminated} 3', "unterminated"),
    ("metric", "expected a space and a value"),
    ("metric one", "is not a number"),
    ("metric 1 2.5", "is not an integer"),
    ("metric 1 2 3", "more than a value"),
    ('metric{a="1"}2', "expected a space"),
])
def test_a_malformed_line_is_named_with_its_number_and_the_rest_still_parses(line, reason):
    page = parse(f"good_before 1\n{line}\ngood_after 2\n")
    assert [s.name for s in page.samples] == ["good_before", "good_after"]
    assert len(page.errors) == 1 and page.errors[0][0] == 2 and reason in page.errors[0][1], page.errors


def test_bad_type_and_help_lines_are_errors_other_comments_are_ignored():
    page = parse("# TYPE x fancy\n# HELP 9x text\n# just a comment\n# TYPE y gauge\ny 1\n")
    assert [n for n, _ in page.errors] == [1, 2]
    assert page.types == {"y": "gauge"} and [s.name for s in page.samples] == ["y"]


def test_help_text_unescapes_backslash_and_newline():
    assert parse("# HELP m a\\\\b\\nc\n").helps["m"] == "a\\b\nc"


def test_a_real_datanode_page_parses_without_errors():
    page = parse((FIXTURE / "dn1.prom").read_text())      # 72 lines of a lab DataNode's /prom (Hadoop 3.4.1)
    assert page.errors == [] and len(page.samples) == 24
    assert all(s.labels.get("hostname") == "vm" and s.timestamp is None for s in page.samples)
    assert {page.types[s.name] for s in page.samples} <= {"counter", "gauge"}
    assert any("storageinfo" in s.labels for s in page.samples) and any("port" in s.labels for s in page.samples)
