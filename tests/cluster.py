"""A real NATS cluster for tests: N ``nats-server`` nodes on loopback, each with an MQTT listener.

nats-server speaks MQTT 3.1.1 through JetStream: sessions, retained messages and QoS 1 deliveries
are kept in streams replicated across the cluster, so a node needs a ``server_name``, a JetStream
store and routes to its peers, and an MQTT client is served only once the cluster has elected its
JetStream metadata leader. Each node has its own config file and store under the test's tmp dir,
and free loopback ports of its own (client, route, monitoring, MQTT) outside the ephemeral range,
so a node restarts on them; it is ready when its MQTT
port accepts and its monitoring endpoint (``/healthz``, ``/jsz``) says its JetStream is current
with the cluster's leader. Every wait is bounded; a failure says which node and shows the end of its log.

    with nats_cluster(tmp_path, 3) as cluster:
        one, two, three = cluster.nodes
        two.kill()       # SIGKILL, as a crash
        two.start()      # same ports, same store; waits until it has rejoined

A :class:`Node` has what agent/testing/fleet.py needs of a broker (``host``, ``port``, ``certs``,
``log()``), so ``agent_config(..., node, ...)`` and ``bundle_server(node, ...)`` work with it.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.testing.broker import HOST, free_port

START_TIMEOUT = 30.0  # a cluster elects its metadata leader in a second or two
LOG_TAIL = 40  # lines of a node's log in an error


def nats_binary() -> str | None:
    """The nats-server binary, or None where it is not installed."""
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)),
        None,
    )


def nats_version() -> tuple[int, ...]:
    """nats-server's version, as (2, 9, 10)."""
    out = subprocess.run([_binary(), "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out.stdout)
    if found is None:
        raise RuntimeError(f"nats-server --version said {out.stdout!r}")
    return tuple(int(n) for n in found.groups())


@dataclass
class Node:
    """One nats-server of a cluster; ``port`` is its MQTT listener."""

    name: str
    dir: Path
    port: int
    client_port: int
    route_port: int
    http_port: int
    cluster_size: int
    host: str = HOST
    certs: Path | None = None  # plain MQTT: no TLS
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "nats.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self, routes: list[int]) -> None:
        store = self.dir / "jetstream"
        lines = [
            f"server_name: {self.name}",
            f"listen: {HOST}:{self.client_port}",
            f"http: {HOST}:{self.http_port}",
            # Small limits: a test's streams hold a few MiB.
            f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, max_file_store: 1GB }}',
            "cluster {",
            "  name: ema-test",
            f"  listen: {HOST}:{self.route_port}",
            "  routes: [" + ", ".join(f"nats-route://{HOST}:{p}" for p in routes) + "]",
            "}",
            f"mqtt {{ listen: {HOST}:{self.port} }}",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is still running")
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [_binary(), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the node again (same ports and store) and wait until it serves MQTT."""
        self.spawn()
        self.wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would: no clean disconnect, no will sent."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        """What the node logged so far (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def monitor(self, path: str) -> dict[str, Any] | None:
        """GET the monitoring endpoint ``path`` as JSON; None if the node does not answer.

        http.client, not urllib: no proxy from the environment is ever asked for loopback.
        """
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=1.0)
        try:
            conn.request("GET", path)
            body = conn.getresponse().read()
        except OSError:
            return None
        finally:
            conn.close()
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def mqtt_clients(self) -> set[str]:
        """The client ids of the MQTT clients connected to this node now (``/connz``)."""
        connz = self.monitor("/connz?limit=1024") or {}
        return {
            str(c["mqtt_client"]) for c in connz.get("connections") or [] if c.get("mqtt_client")
        }

    def _not_ready(self) -> str | None:
        """Why the node does not serve MQTT yet, or None when it does."""
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                pass
        except OSError:
            return f"its MQTT port {self.port} does not accept"
        # This server's JetStream is current with the metadata leader. Not every stream and
        # consumer: after a restart one may take long to catch up while MQTT is served already.
        health = self.monitor("/healthz?js-server-only=true")
        if health is None or health.get("status") != "ok":
            return f"/healthz says {health}"
        jsz = self.monitor("/jsz")
        meta = (jsz or {}).get("meta_cluster") or {}
        if not meta.get("leader"):
            return f"no JetStream metadata leader yet ({meta or jsz})"
        if meta.get("cluster_size") != self.cluster_size:
            return f"JetStream sees {meta.get('cluster_size')} of {self.cluster_size} nodes"
        return None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        why = "not started"
        while time.monotonic() < deadline:
            if not self.running:
                code = None if self.process is None else self.process.returncode
                raise NodeError(self, f"exited with {code}")
            found = self._not_ready()
            if found is None:
                return
            why = found
            time.sleep(0.05)
        raise NodeError(self, f"not ready within {timeout:.0f} s: {why}")


class NodeError(RuntimeError):
    def __init__(self, node: Node, what: str) -> None:
        tail = "\n".join(node.log().splitlines()[-LOG_TAIL:])
        super().__init__(
            f"nats-server {node.name} ({node.config_path}) {what}\n--- log ---\n{tail}"
        )
        self.node = node
        self.address_in_use = "address already in use" in tail


@dataclass
class Cluster:
    nodes: list[Node]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.running:
                node.wait_ready(max(0.1, deadline - time.monotonic()))


def _binary() -> str:
    found = nats_binary()
    if found is None:
        raise RuntimeError("nats-server is not installed (run 'sudo make sysdeps')")
    return found


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _restartable_ports(count: int) -> list[int]:
    """Free loopback ports outside the kernel's ephemeral range.

    A port picked by binding port 0 lies inside that range, and while its node is down any
    outgoing connection (a client reconnecting, a route dialling) may take it as its source
    port, so the node could not start on it again. Ports below the range are only ever bound.
    """
    low, high = _ephemeral_range()
    pool = range(10000, low) if low > 11000 else range(high + 1, 65536)
    if len(pool) < 1000:
        return [free_port() for _ in range(count)]  # no room outside: take the risk
    rng = random.Random()
    ports: list[int] = []
    for _ in range(100 * count):
        port = rng.choice(pool)
        if port not in ports and _bindable(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free loopback ports in {pool.start}-{pool.stop - 1}")


def _layout(base: Path, size: int) -> list[Node]:
    ports = _restartable_ports(4 * size)
    nodes = []
    for i in range(size):
        name = f"n{i + 1}"
        workdir = base / name
        workdir.mkdir(parents=True, exist_ok=True)
        mqtt, client, route, monitor = ports[4 * i : 4 * i + 4]
        nodes.append(Node(name, workdir, mqtt, client, route, monitor, size))
    routes = [n.route_port for n in nodes]
    for node in nodes:
        node.write_config(routes)
    return nodes


@contextmanager
def nats_cluster(tmp_dir: Path, size: int = 3) -> Iterator[Cluster]:
    """``size`` nodes routed to each other, each serving MQTT; all stopped on exit.

    If a port picked as free was taken before a node bound it, the cluster is laid out again on
    other ports (up to three times).
    """
    base = Path(tmp_dir) / "nats"
    for attempt in range(3):
        with ExitStack() as stack:
            cluster = Cluster(_layout(base / f"try{attempt}", size))
            for node in cluster.nodes:
                stack.callback(node.stop)
                node.spawn()
            try:
                cluster.wait_ready()
            except NodeError as exc:
                if exc.address_in_use and attempt < 2:
                    continue
                raise
            yield cluster
            return
    raise AssertionError("unreachable")  # pragma: no cover
