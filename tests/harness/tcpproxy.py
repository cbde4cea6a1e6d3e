# SPDX-License-Identifier: Apache-2.0
"""A TCP proxy between a client and a real server, for network faults in tests.

    proxy = TcpProxy("127.0.0.1", api_port).start()   # forwards
    proxy.refuse()          # nothing listens: connections are refused (server down)
    proxy.accept()          # listens again on the same port
    proxy.blackhole()       # open connections stay open but carry nothing, either way
    proxy.stop()

It is plain byte forwarding (TLS passes through untouched), one thread per
direction of every connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Link:
    client: socket.socket
    upstream: socket.socket
    blackholed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to (host, port) until told otherwise."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.connections = 0  # accepted so far
        self._listener: socket.socket | None = None
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> TcpProxy:
        self.accept()
        return self

    def accept(self) -> None:
        """Listen (again) on the proxy's port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def refuse(self) -> None:
        """Stop listening and drop every open connection: like a server that is down."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def blackhole(self) -> None:
        """Open connections stay open and silently swallow everything, both ways;
        new connections are forwarded normally."""
        with self._lock:
            for link in self._links:
                link.blackholed.set()

    def stop(self) -> None:
        self._stopped = True
        self.refuse()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopped:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(link, src, dst), daemon=True).start()

    @staticmethod
    def _pump(link: _Link, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                if not link.blackholed.is_set():
                    link.close()
                return
            if link.blackholed.is_set():
                continue  # swallowed: the other side never hears of it
            try:
                dst.sendall(data)
            except OSError:
                link.close()
                return
