"""The service manager's end of sd_notify for tests: a datagram socket and what arrived on it."""

from __future__ import annotations

import socket
import time

from agent.testing.fleet import WAIT


class Listener:
    """The manager's end: a bound datagram socket and the messages it received."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.messages: list[str] = []

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        message = data.decode()
        self.messages.append(message)
        return message

    def drain(self) -> list[str]:
        got: list[str] = []
        while (m := self.receive(0.01)) is not None:
            got.append(m)
        return got

    def wait_for(self, wanted: str, timeout: float = WAIT) -> list[str]:
        """Messages up to and including the first that is ``wanted``."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            m = self.receive(left)
            if m is None:
                break
            got.append(m)
            if m == wanted:
                return got
        raise AssertionError(f"no {wanted!r} within {timeout} s; got {got}")
