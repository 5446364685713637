"""Many paho clients on one thread: one selector and one timer heap, no network thread each.

A :class:`~agent.transport.session.Session` runs a network thread per connection, which is
what a device needs. A process that holds hundreds of connections (the fleet simulator) cannot
afford hundreds of threads fighting over one interpreter, so :class:`Multiplexer` drives them
all through paho's external-loop interface: the ``on_socket_open`` / ``on_socket_close``
callbacks register each client's socket with one selector, ``on_socket_register_write`` /
``on_socket_unregister_write`` ask for write readiness only while paho has bytes queued, and
:meth:`Multiplexer.poll` calls ``loop_read`` / ``loop_write`` for the sockets that are ready and
``loop_misc`` (keepalive) for every client once a second.

Threads: none of its own. :meth:`Multiplexer.poll`, every paho callback of every attached
client and every timer run on the thread that calls ``poll``; ``publish`` and ``subscribe``
must be called on that thread too. Nothing here is thread-safe.

Connecting is the caller's (:func:`agent.transport.session.connect`; it blocks for the TCP
and TLS handshakes, at most ``connect_timeout_s``).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("agent.transport.multiplex")

MISC_INTERVAL_S = 1.0  # how often every client's keepalive is looked after


@dataclass(order=True)
class Timer:
    """A call scheduled with :meth:`Multiplexer.call_at`; :meth:`cancel` drops it."""

    when: float
    seq: int
    fn: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class Multiplexer:
    """Drives attached paho clients and timers from :meth:`poll`."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._clients: dict[mqtt.Client, Callable[..., None] | None] = {}
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._next_misc = 0.0

    @property
    def now(self) -> float:
        return self._clock()

    # -- clients --------------------------------------------------------------------------------
    def attach(self, client: mqtt.Client) -> None:
        """Drive ``client`` from now on (before it connects). An ``on_socket_open`` callback it
        has already (TCP_NODELAY) is kept and called first."""
        self._clients[client] = client.on_socket_open
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote

    def detach(self, client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is not None:
            self._unregister(sock)
        self._clients.pop(client, None)

    @property
    def clients(self) -> int:
        return len(self._clients)

    # paho calls these four on the polling thread, from inside connect(), loop_read() and the rest.
    def _opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        previous = self._clients.get(client)
        if previous is not None:
            previous(client, userdata, sock)
        self._unregister(sock)  # (a descriptor number reused by a socket closed unseen)
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._unregister(sock)

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _wrote(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ, client)

    def _unregister(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # -- timers ---------------------------------------------------------------------------------
    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` from :meth:`poll` once the clock reaches ``when``."""
        timer = Timer(when, next(self._seq), fn)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(self._clock() + delay, fn)

    def _run_timers(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0].when <= now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.fn()

    # -- the loop -------------------------------------------------------------------------------
    def poll(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds (less if a timer is due) for sockets, then serve
        the ready ones, the timers that are due and, once a second, every client's keepalive."""
        now = self._clock()
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            timeout = min(timeout, self._timers[0].when - now)
        timeout = max(0.0, min(timeout, self._next_misc - now))
        if self._selector.get_map():
            ready = self._selector.select(timeout)
        else:  # nothing to wait on: select() would return at once
            time.sleep(timeout)
            ready = []
        for key, mask in ready:
            client: mqtt.Client = key.data
            sock = key.fileobj
            if mask & selectors.EVENT_READ and client.socket() is sock:
                client.loop_read()
                # TLS: a record read whole may hold more than paho took; select() cannot see it.
                while client.socket() is sock and _tls_pending(sock):
                    client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is sock:
                client.loop_write()
        self._run_timers()
        now = self._clock()
        if now >= self._next_misc:
            self._next_misc = now + MISC_INTERVAL_S
            for client in list(self._clients):
                if client.socket() is not None:
                    client.loop_misc()

    def close(self) -> None:
        self._selector.close()
        self._clients.clear()
        self._timers.clear()


def _tls_pending(sock: object) -> bool:
    """Bytes a TLS socket has decrypted and not handed out yet."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
