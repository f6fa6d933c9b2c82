"""A TCP proxy for outage tests: forwards 127.0.0.1:<free port> to a target (PostgreSQL by default)
and can cut the link on command.

`cut()` closes every open connection (both sides) and, until `restore()`, accepts new ones only to
close them at once: a client sees its connection drop and every reconnect refused straight away,
as when the database process goes down, without the listening port ever being given up (so it
cannot be taken by someone else between the cut and the restore).

`blackhole()` is the nastier outage of a partition or a dead host: nothing is closed and nothing
answers. Open connections stay open but carry no bytes either way; new ones are accepted and then
left waiting. `restore()` lets the open connections carry on (what was sent meanwhile is delivered,
as TCP would once the network heals) and closes the connections that were left waiting.

Bounded and self-stopping: at most `max_connections` open at once (more are closed on arrival),
one thread per connection plus the acceptor, all daemons, and everything stops after `lifetime_s`
even if the test forgets `stop()`. Use it as a context manager or call `start()` / `stop()`.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from types import TracebackType
from typing import Self

_CHUNK = 65536


class TcpProxy:
    def __init__(
        self,
        target: tuple[str, int] = ("127.0.0.1", 5432),
        *,
        max_connections: int = 200,
        lifetime_s: float = 300.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.target = target
        self._max_connections = max_connections
        self._lifetime_s = lifetime_s
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._open: set[tuple[socket.socket, socket.socket]] = set()
        self._threads: list[threading.Thread] = []
        self._cut = threading.Event()
        self._stopping = threading.Event()
        self._blackhole = threading.Event()
        self._held: list[socket.socket] = []  # accepted during a blackhole, never answered
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)  # the acceptor notices stop() within this
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True)
        self._started_at = 0.0
        # What happened, for the test's report.
        self.forwarded = 0  # connections accepted and forwarded
        self.refused = 0  # connections accepted and closed at once (cut, or over the bound)
        self.dropped = 0  # open connections closed by cut()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def start(self) -> Self:
        self._started_at = time.monotonic()
        self._acceptor.start()
        return self

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore()`."""
        with self._lock:  # under the lock: no connection being set up can slip past the cut
            self._cut.set()
            pairs = list(self._open)
            self.dropped += len(pairs)
        for pair in pairs:
            _shut(*pair)
        # The pump threads see the shutdown at once; wait (bounded) until they have let go.
        deadline = time.monotonic() + 2.0
        while self.open_connections() and time.monotonic() < deadline:
            time.sleep(0.005)

    def blackhole(self) -> None:
        """Stop carrying bytes without closing anything, and leave new connections unanswered."""
        self._blackhole.set()

    def restore(self) -> None:
        """Forward again: after a cut, new connections; after a blackhole, the open ones too."""
        self._cut.clear()
        self._blackhole.clear()
        self._close_held()

    def _close_held(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            _close(sock)

    def stop(self) -> None:
        """Close everything and join the threads (bounded)."""
        self._stopping.set()
        self._cut.set()
        with self._lock:
            pairs = list(self._open)
        for pair in pairs:
            _shut(*pair)
        if self._acceptor.is_alive() and threading.current_thread() is not self._acceptor:
            self._acceptor.join(2.0)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_held()
        for thread in list(self._threads):
            thread.join(2.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _expired(self) -> bool:
        return time.monotonic() - self._started_at > self._lifetime_s

    def _accept_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._expired():
                    self._stopping.set()
                    break
                try:
                    client, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break
                if self._blackhole.is_set() and not self._cut.is_set():
                    with self._lock:
                        if len(self._held) < self._max_connections:
                            self._held.append(client)
                            continue
                if self._cut.is_set() or self.open_connections() >= self._max_connections:
                    self.refused += 1
                    _close(client)
                    continue
                self._forward(client)
        finally:
            # Self-stopping (lifetime over) closes what is still open; stop() may run it again.
            if self._stopping.is_set():
                with self._lock:
                    pairs = list(self._open)
                for pair in pairs:
                    _shut(*pair)
                self._close_held()
                with contextlib.suppress(OSError):
                    self._listener.close()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self._connect_timeout_s)
        except OSError:
            self.refused += 1
            _close(client)
            return
        client.settimeout(None)
        upstream.settimeout(None)
        pair = (client, upstream)
        with self._lock:
            if self._cut.is_set():  # cut while this one was being connected
                self.refused += 1
                _close(client)
                _close(upstream)
                return
            self._open.add(pair)
            self.forwarded += 1
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._pump, args=pair, name="tcp-proxy-pump", daemon=True)
            self._threads.append(thread)
        thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until either side closes, the link is cut or the proxy stops."""
        peer = {client: upstream, upstream: client}
        selector = selectors.DefaultSelector()
        try:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            while not self._stopping.is_set() and not self._expired():
                if self._blackhole.is_set():
                    # Not reading: what the peers send stays in the socket buffers, unanswered.
                    self._stopping.wait(0.01)
                    continue
                ready = selector.select(timeout=0.05)
                if self._blackhole.is_set():
                    continue  # it began while this thread was waiting: leave the bytes where they are
                for key, _ in ready:
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(_CHUNK)
                    if not data:
                        return
                    peer[source].sendall(data)
        except OSError:
            pass
        finally:
            selector.close()
            with self._lock:
                self._open.discard((client, upstream))
            _shut(client, upstream)
            _close(client)
            _close(upstream)


def _shut(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
