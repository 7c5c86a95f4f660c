"""A loopback TCP forwarder that a test can stop and restart: a database (or any server) that
goes away and comes back, without touching the real server."""

from __future__ import annotations

import contextlib
import socket
import threading


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PortProxy:
    """A TCP forwarder on a loopback port, stoppable and restartable: a database that goes away
    and comes back without touching the PostgreSQL server itself."""

    def __init__(self, target_port: int, host: str = "127.0.0.1", port: int | None = None
                 ) -> None:
        """Listens on ``host``:``port`` (a free loopback port by default); ``host`` may be
        another address of this machine, e.g. a veth end a network namespace reaches."""
        self.target, self.host, self.port = target_port, host, port or free_port()
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []

    def start(self) -> None:
        self.listener = socket.create_server((self.host, self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self) -> None:
        """Shut down (not just close) every socket: that wakes the threads blocked on them."""
        assert self.listener is not None
        for end in [self.listener, *self.connections]:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server is down: the client sees its connection closed
                client.close()
                continue
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            end.close()
