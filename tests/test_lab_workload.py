"""The lab workload's WebHDFS client against a real HTTP server that behaves as a DataNode does
when a replica is corrupt: it starts the transfer, finds the bad checksum and cuts it."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from models.faults import Fault
from toolkit.lab.workload import Operation, WebHdfs, WebHdfsError, Workload, WorkloadConfig, WorkloadStats


class CutReadHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):          # quiet test output
        pass

    def do_GET(self):
        if self.path.startswith("/webhdfs/v1/"):          # the NameNode: where to read from
            body = json.dumps({"Location": f"http://127.0.0.1:{self.server.server_port}/datanode/read"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:                                             # the DataNode: half the block, then closed
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"x" * (1 << 19))
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def cut_reads():
    server = HTTPServer(("127.0.0.1", 0), CutReadHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_read_cut_mid_transfer_is_a_failed_call_not_a_crash(cut_reads):
    client = WebHdfs(cut_reads, timeout=5.0)
    with pytest.raises(WebHdfsError, match="IncompleteRead"):
        client.read("/lab/f00001")
    # The workload thread counts it as a failed read and goes on (it once died here, and the
    # rest of the recording had no workload).
    workload = Workload(cut_reads, WorkloadConfig(timeout_s=5.0))
    assert workload.execute(Operation(0, "read", "/lab/f00001", 0)) is False
    assert workload.stats.done[("read", "failed")] == 1
    assert [ok for _, ok in workload.stats.calls] == [False]


def test_calls_away_from_faults_leave_out_each_fault_and_its_recovery():
    stats = WorkloadStats()
    stats.calls = [(10.0, True), (100.0, False), (129.0, False), (150.0, False), (200.0, True), (300.0, False)]
    faults = [Fault(100.0, 130.0, "dn1", "kill_datanode")]
    # 100 and 129 inside the fault, 150 within its 60 s of recovery: left out
    assert stats.outside(faults, recovery_s=60.0) == (2, 3)
    assert stats.outside(faults, recovery_s=0.0) == (2, 4)
    assert stats.outside([]) == (2, 6)
