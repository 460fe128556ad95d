"""The lab's client relay (toolkit.lab.relay) as its own process, with real sockets: a cut resets
the connections open through it and refuses new ones, and the link comes back after it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from toolkit.lab.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]


def echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1024):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        return conn.recv(1024)


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(0.05)


@pytest.fixture
def relay(tmp_path):
    server, target = echo_server()
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "toolkit.lab.relay", str(port), str(target),
                                str(tmp_path / "relay.pid")], cwd=ROOT, stderr=subprocess.PIPE)
    wait_for(lambda: echo(port, b"up") == b"up")
    yield process, port
    process.kill()
    process.wait()
    server.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_cut_with_connections_open_resets_them_refuses_new_ones_and_the_link_comes_back(relay):
    process, port = relay
    # Several clients mid-conversation when the cut comes: the relay holds two sockets for each,
    # and the cut must end both of every pair (it died here once, ending the link for good).
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    for conn in held:
        conn.sendall(b"ping")
        assert conn.recv(16) == b"ping"
    os.kill(process.pid, signal.SIGUSR1)
    wait_for(lambda: refused(port))
    for conn in held:
        with pytest.raises(OSError):          # reset (RST) or ended: never another echo
            conn.sendall(b"again")
            if not conn.recv(16):
                raise ConnectionResetError("closed")
        conn.close()
    time.sleep(1.2)                           # a loop turn or more while cut
    assert process.poll() is None and refused(port)
    os.kill(process.pid, signal.SIGUSR2)
    wait_for(lambda: echo(port, b"back") == b"back")
    # and a second cut and open, as a schedule with two cuts does
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    os.kill(process.pid, signal.SIGUSR1)
    wait_for(lambda: refused(port))
    os.kill(process.pid, signal.SIGUSR2)
    wait_for(lambda: echo(port, b"twice") == b"twice")
    held.close()
    assert process.poll() is None


def test_sigterm_ends_the_relay(relay):
    process, port = relay
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


def test_a_port_taken_while_cut_is_retried_and_said_once_not_every_second(relay):
    process, port = relay
    os.kill(process.pid, signal.SIGUSR1)
    wait_for(lambda: refused(port))
    blocker = socket.create_server(("127.0.0.1", port))      # another socket takes the port meanwhile
    os.kill(process.pid, signal.SIGUSR2)
    time.sleep(3.5)                                           # three retries or more
    assert process.poll() is None
    blocker.close()
    wait_for(lambda: echo(port, b"back") == b"back")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    said = process.stderr.read().decode()
    assert said.count("cannot listen on") == 1, said
    assert said.count(f"listening on {port} again after") == 1, said
