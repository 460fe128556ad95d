"""The network link between HDFS clients and the NameNode's client RPC port, as one small TCP
relay process, so that the lab can cut it ("cut the NameNode's client traffic") without root and
without touching the machine's firewall.

The cluster's ``fs.defaultFS`` names the relay's port: every DFSClient (the DataNodes' WebHDFS
handlers, which do the workload's creates, appends and reads) reaches the NameNode through it,
while the DataNodes' own heartbeats and block reports use the NameNode's separate service RPC port
(``dfs.namenode.servicerpc-address``) and keep flowing. So a cut is what a broken client network
looks like: the NameNode stays healthy and sees no client calls; clients see refused connections.

    python -m toolkit.lab.relay LISTEN_PORT TARGET_PORT PIDFILE

SIGUSR1 cuts: open connections are reset and new ones are refused (the listening socket is
closed, so a connect fails at once as with a firewall REJECT). SIGUSR2 restores the link.
SIGTERM ends the relay.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
BUFFER = 1 << 16
REOPEN_NOTE_S = 30.0      # a re-listen that keeps failing is said at most this often


class Relay:
    def __init__(self, listen_port: int, target_port: int):
        self.listen_port = listen_port
        self.target_port = target_port
        self.listener: socket.socket | None = None
        self.pairs: dict[socket.socket, socket.socket] = {}
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = socket.socketpair()
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.wanted = "open"          # what the signal handlers ask for; applied in the loop
        self.running = True
        self._reopen_failing_since: float | None = None
        self._reopen_noted = 0.0

    # -- link state (called from the loop only) ------------------------------------------
    def _open(self) -> None:
        if self.listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.listen_port))
        listener.listen(128)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        self.listener = listener

    def _cut(self) -> None:
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
        while self.pairs:        # each _drop takes a pair's two sockets out
            self._drop(next(iter(self.pairs)), reset=True)

    def _drop(self, sock: socket.socket, reset: bool = False) -> None:
        peer = self.pairs.pop(sock, None)
        for s in (sock, peer):
            if s is None or s.fileno() == -1:      # already closed (its peer's drop closed it)
                continue
            self.pairs.pop(s, None)
            try:
                self.selector.unregister(s)
            except (KeyError, ValueError):
                pass
            try:
                if reset:   # RST, not FIN: the client sees "connection reset", as on a dropped link
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            s.close()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, OSError):
            return
        try:
            upstream = socket.create_connection((HOST, self.target_port), timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pairs[client], self.pairs[upstream] = upstream, client
        self.selector.register(client, selectors.EVENT_READ, "data")
        self.selector.register(upstream, selectors.EVENT_READ, "data")

    def _forward(self, sock: socket.socket) -> None:
        peer = self.pairs.get(sock)
        if peer is None:
            return
        try:
            data = sock.recv(BUFFER)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        try:
            peer.setblocking(True)          # back-pressure: a slow peer slows its sender
            peer.sendall(data)
            peer.setblocking(False)
        except OSError:
            self._drop(sock)

    # -- loop ----------------------------------------------------------------------------
    def request(self, state: str) -> None:
        """From a signal handler: ask the loop to cut, open or stop."""
        self.wanted = state
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def serve(self) -> None:
        self._open()
        while self.running:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "wake":
                    self.wake_r.recv(64)
                elif key.data == "accept" and self.listener is not None:
                    self._accept()
                elif key.data == "data":
                    self._forward(key.fileobj)
            if self.wanted == "stop":
                self.running = False
            elif self.wanted == "cut":
                self._cut()
            elif self.wanted == "open":
                try:
                    self._open()
                except OSError as exc:
                    # The port is free while cut, so another socket may take it meanwhile: say
                    # so and try again next second rather than end the link for good (said once,
                    # then every REOPEN_NOTE_S, not once a second into the lab's log).
                    now = time.monotonic()
                    if self._reopen_failing_since is None or now - self._reopen_noted >= REOPEN_NOTE_S:
                        print(f"relay: cannot listen on {self.listen_port} again ({exc}); retrying", file=sys.stderr)
                        self._reopen_noted = now
                    if self._reopen_failing_since is None:
                        self._reopen_failing_since = now
                else:
                    if self._reopen_failing_since is not None:
                        print(f"relay: listening on {self.listen_port} again after "
                              f"{time.monotonic() - self._reopen_failing_since:.0f} s", file=sys.stderr)
                        self._reopen_failing_since = None
        self._cut()


def main(argv: list[str]) -> int:
    listen_port, target_port, pid_file = int(argv[0]), int(argv[1]), argv[2]
    relay = Relay(listen_port, target_port)
    signal.signal(signal.SIGUSR1, lambda *_: relay.request("cut"))
    signal.signal(signal.SIGUSR2, lambda *_: relay.request("open"))
    signal.signal(signal.SIGTERM, lambda *_: relay.request("stop"))
    signal.signal(signal.SIGINT, lambda *_: relay.request("stop"))
    with open(pid_file, "w") as fh:
        fh.write(str(os.getpid()))
    relay.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
