"""A real mosquitto for tests: started on a free loopback port, from a config in a tmp dir.

Three variants:

* :func:`plain_broker` - a plain MQTT listener, anonymous clients allowed;
* :func:`tls_broker` - a TLS listener requiring client certificates made by
  ``config/broker/make-certs.sh``, the certificate CN as username, and an ACL file;
* :func:`shipped_broker` - the shipped ``config/broker/mosquitto.conf`` as a conf.d fragment of
  Debian's default main file, only its paths and ports redirected (both listeners: devices and
  bundle servers on :attr:`Broker.port`, operators on :attr:`Broker.operator_port`).

Both are context managers that yield a :class:`Broker` and always stop the process on exit. They
never use port 1883 (the system broker's) and only ever bind or connect to 127.0.0.1. A missing
``mosquitto`` or ``openssl`` is an error, not a skip: ``make test`` installs them.

    with plain_broker(tmp_path) as broker:
        client.connect(broker.host, broker.port)
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

REPO = Path(__file__).resolve().parents[2]
MAKE_CERTS = REPO / "config" / "broker" / "make-certs.sh"
SHIPPED_ACL = REPO / "config" / "broker" / "acl"
SHIPPED_CONF = REPO / "config" / "broker" / "mosquitto.conf"

# Debian 12's /etc/mosquitto/mosquitto.conf as the mosquitto package installs it.
DEBIAN_MAIN_CONF = """\
# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""

HOST = "127.0.0.1"
SYSTEM_PORT = 1883
START_TIMEOUT = 5.0


class Endpoint(Protocol):
    """What a test's MQTT client needs of a broker: a :class:`Broker` or a cluster's node."""

    host: str
    port: int
    certs: Path | None

    def log(self) -> str: ...


@dataclass
class Broker:
    host: str
    port: int
    dir: Path
    process: subprocess.Popen[bytes]
    certs: Path | None = None  # make-certs.sh output for the TLS variant
    _log: Path = field(repr=False, default=Path())
    operator_port: int | None = None  # the shipped config's operator listener

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM), as an outage would."""
        _stop(self.process)

    def start(self) -> None:
        """Start mosquitto again on the same port with the same configuration."""
        if self.process.poll() is None:
            raise RuntimeError("mosquitto is still running")
        self.process = _spawn(self.dir)
        try:
            _wait_listening(self.process, self.port, self._log)
        except BaseException:
            _stop(self.process)
            raise

    def log(self) -> str:
        """What mosquitto logged so far (for assertion messages)."""
        try:
            return self._log.read_text(errors="replace")
        except OSError:
            return ""


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed (run 'sudo make sysdeps')")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never 1883)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port != SYSTEM_PORT:
            return port


def make_certs(
    out: Path,
    *device_ids: str,
    fleet: str = "fleet",
    servers: Sequence[str] = (),
    operators: Sequence[str] = (),
    revoke: Sequence[str] = (),
) -> Path:
    """Run the shipped ``make-certs.sh`` into ``out``; return ``out``."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not installed")
    options = [
        *(a for name in servers for a in ("--server", name)),
        *(a for name in operators for a in ("--operator", name)),
        *(a for name in revoke for a in ("--revoke", name)),
    ]
    subprocess.run(
        ["bash", str(MAKE_CERTS), str(out), *device_ids, "--fleet", fleet, *options],
        check=True,
        capture_output=True,
    )
    return out


def common_config(workdir: Path, port: int) -> list[str]:
    lines = [
        "per_listener_settings false",
        "persistence false",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type all",
        "connection_messages true",
        "set_tcp_nodelay true",  # as the shipped mosquitto.conf
        f"listener {port} {HOST}",
    ]
    # Run as root, mosquitto would drop privileges to the `mosquitto` user, which cannot read
    # the 0600 keys in our tmp dir; `user root` keeps it as is (as non-root `user` is ignored).
    if os.geteuid() == 0:
        lines.insert(0, "user root")
    else:
        lines.insert(0, f"user {getpass.getuser()}")
    return lines


class _StartError(RuntimeError):
    pass


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _StartError(_failure(f"mosquitto exited with {proc.returncode}", proc, log))
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.02)
            continue
        # Whoever answered, make sure it is our mosquitto (not a process that took the port).
        if proc.poll() is None and f"listen socket on port {port}" in _read(log):
            return
        time.sleep(0.02)
    raise RuntimeError(_failure(f"mosquitto did not listen on {HOST}:{port}", proc, log))


def _failure(what: str, proc: subprocess.Popen[bytes], log: Path) -> str:
    out = b""
    if proc.poll() is not None and proc.stdout is not None:
        out = proc.stdout.read() or b""
    text = _read(log)
    return f"{what}\n--- output ---\n{out.decode(errors='replace')}\n--- log ---\n{text}"


def _read(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


def _spawn(workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [mosquitto_binary(), "-c", str(workdir / "mosquitto.conf")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )


def _launch(
    workdir: Path, build: Callable[[int], list[str]]
) -> tuple[subprocess.Popen[bytes], int]:
    """Start mosquitto on a free port; retry with another port if the one picked got taken."""
    log = workdir / "mosquitto.log"
    conf = workdir / "mosquitto.conf"
    for attempt in range(3):
        port = free_port()
        conf.write_text("\n".join(build(port)) + "\n")
        log.unlink(missing_ok=True)
        proc = _spawn(workdir)
        try:
            _wait_listening(proc, port, log)
        except _StartError:
            _stop(proc)
            if attempt == 2:
                raise
            continue
        except BaseException:
            _stop(proc)
            raise
        return proc, port
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def run_broker(
    workdir: Path, build: Callable[[int], list[str]], certs: Path | None = None
) -> Iterator[Broker]:
    proc, port = _launch(workdir, build)
    broker = Broker(HOST, port, workdir, proc, certs, workdir / "mosquitto.log")
    try:
        yield broker
    finally:
        _stop(broker.process)  # the one running now (a test may have restarted it)


@contextmanager
def plain_broker(tmp_dir: Path, extra: Sequence[str] = ()) -> Iterator[Broker]:
    """A plain listener on a free loopback port, anonymous clients allowed, no ACL.

    ``extra`` lines are appended to the config (e.g. ``["max_queued_messages 10"]``).
    """
    workdir = Path(tmp_dir) / "mosquitto-plain"
    workdir.mkdir(parents=True, exist_ok=True)

    def build(port: int) -> list[str]:
        return [*common_config(workdir, port), "allow_anonymous true", *extra]

    with run_broker(workdir, build) as broker:
        yield broker


@contextmanager
def tls_broker(
    tmp_dir: Path,
    certs: Path,
    acl: Path | None = SHIPPED_ACL,
    extra: Sequence[str] = (),
) -> Iterator[Broker]:
    """A TLS listener on a free loopback port with client certificates required.

    ``certs`` is a ``make-certs.sh`` output directory (see :func:`make_certs`). The certificate CN
    is the username (``use_identity_as_username``); ``acl`` is copied verbatim into the broker's
    dir and used as its ``acl_file`` (``None``: no ACL, every authenticated client may do
    anything).
    """
    workdir = Path(tmp_dir) / "mosquitto-tls"
    workdir.mkdir(parents=True, exist_ok=True)
    security = [
        f"cafile {certs / 'ca.crt'}",
        f"certfile {certs / 'broker.crt'}",
        f"keyfile {certs / 'broker.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
    ]
    if acl is not None:
        acl_copy = workdir / "acl"
        shutil.copyfile(acl, acl_copy)
        security.append(f"acl_file {acl_copy}")

    def build(port: int) -> list[str]:
        return [*common_config(workdir, port), *security, *extra]

    with run_broker(workdir, build, certs) as broker:
        yield broker


def _redirect(text: str, replacements: dict[str, str], what: str) -> str:
    for old, new in replacements.items():
        if old not in text:
            raise RuntimeError(f"{what} has no {old!r} to redirect")
        text = text.replace(old, new)
    return text


@contextmanager
def shipped_broker(
    tmp_dir: Path,
    certs: Path,
    acl: Path = SHIPPED_ACL,
    extra: Sequence[str] = (),
) -> Iterator[Broker]:
    """mosquitto as a Debian host runs the shipped config: Debian's main file, the shipped
    ``mosquitto.conf`` in its conf.d, the shipped ACL and ``certs`` (a make-certs.sh output).

    Only paths (pid file, persistence, log, conf.d, certificates, ACL) and the listeners'
    ports and address (127.0.0.1) are changed, and the main file gets a ``user`` line: Debian's
    mosquitto drops root to the ``mosquitto`` user, which cannot read a test's tmp dir.
    ``extra`` lines are appended to the fragment.
    """
    workdir = Path(tmp_dir) / "mosquitto-shipped"
    confd = workdir / "conf.d"
    confd.mkdir(parents=True, exist_ok=True)
    store = workdir / "store"
    store.mkdir(exist_ok=True)
    shutil.copyfile(acl, workdir / "acl")
    operator_port = 0

    def build(port: int) -> list[str]:
        nonlocal operator_port
        operator_port = free_port()
        while operator_port == port:
            operator_port = free_port()
        fragment = _redirect(
            SHIPPED_CONF.read_text(),
            {
                "\nlistener 8883\n": f"\nlistener {port} {HOST}\n",
                "\nlistener 8884\n": f"\nlistener {operator_port} {HOST}\n",
                "/etc/mosquitto/certs/": f"{certs}/",
                "/etc/mosquitto/acl": str(workdir / "acl"),
            },
            str(SHIPPED_CONF),
        )
        (confd / "ema.conf").write_text(fragment + "\n".join(extra) + "\n")
        main = _redirect(
            DEBIAN_MAIN_CONF,
            {
                "/run/mosquitto/mosquitto.pid": str(workdir / "mosquitto.pid"),
                "/var/lib/mosquitto/": f"{store}/",
                "/var/log/mosquitto/mosquitto.log": str(workdir / "mosquitto.log"),
                "/etc/mosquitto/conf.d": str(confd),
            },
            "Debian's main file",
        )
        user = "root" if os.geteuid() == 0 else getpass.getuser()
        return [f"user {user}", *main.splitlines()]

    with run_broker(workdir, build, certs) as broker:
        broker.operator_port = operator_port
        yield broker
