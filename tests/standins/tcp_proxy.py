"""A TCP proxy in front of Postgres (or anything) that can make the service go away, for real sockets.

- `cut()`: every open connection is reset (a server restart, a failover); new ones go through.
- `refuse()`: connections are reset and new ones refused (a server that is down) until `restore()`.
- `blackhole()`: nothing is forwarded either way and nothing is answered, yet connections are accepted
  and stay open (a network that drops packets: the caller's reads just wait) until `restore()`, which
  resets the connections that lived through it, as keepalives would have ended them by then.
- `close()`: all of it, for good.

A connection whose one side closes is closed on the other side too, so a client that dies (a killed
process) ends its server session, and with it the locks that session held.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket | None, doomed: bool) -> None:
        self.client = client
        self.upstream = upstream
        self.doomed = doomed  # lived through a black hole: reset when it ends
        self.closed = False


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "open"  # open | blackhole | refused | closed
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._start_accepting()

    # ------------------------------------------------------------------ faults
    def cut(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            self._reset(link)

    def refuse(self) -> None:
        with self._lock:
            self.mode = "refused"
            self._stop_listening()
        self.cut()

    def blackhole(self) -> None:
        with self._lock:
            self.mode = "blackhole"
            for link in self._links:
                link.doomed = True

    def restore(self) -> None:
        with self._lock:
            was = self.mode
            self.mode = "open"
            doomed = [link for link in self._links if link.doomed]
            self._links = [link for link in self._links if not link.doomed]
            if was == "refused":
                self.server = socket.create_server(("127.0.0.1", self.port))
                self._start_accepting()
        for link in doomed:
            self._reset(link)

    def close(self) -> None:
        with self._lock:
            self.mode = "closed"
            self._stop_listening()
        self.cut()

    # ------------------------------------------------------------------ plumbing
    def _start_accepting(self) -> None:
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _stop_listening(self) -> None:
        # close() alone would not wake the thread blocked in accept(): the socket would go on listening
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
            if mode in ("refused", "closed"):
                self._abort(client)
                continue
            upstream = None
            if mode == "open":
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                    upstream.settimeout(None)
                except OSError:
                    self._abort(client)
                    continue
            link = _Link(client, upstream, doomed=mode == "blackhole")
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pipe, args=(link, client, upstream), daemon=True).start()
            if upstream is not None:
                threading.Thread(target=self._pipe, args=(link, upstream, client), daemon=True).start()

    def _pipe(self, link: _Link, src: socket.socket, dst: socket.socket | None) -> None:
        try:
            while data := src.recv(65536):
                if self.mode != "open" or link.doomed or dst is None:
                    continue  # dropped on the floor
                dst.sendall(data)
        except OSError:
            pass
        # One side is done: so is the other (a dead client ends its server session).
        if not link.doomed or self.mode == "open":
            self._reset(link, graceful=True)

    def _reset(self, link: _Link, *, graceful: bool = False) -> None:
        with self._lock:
            if link.closed:
                return
            link.closed = True
            if link in self._links:
                self._links.remove(link)
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            if graceful:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            else:
                self._abort(sock)

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        """Close with a reset, not a goodbye."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
