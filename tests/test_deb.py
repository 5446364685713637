"""The Debian package: built by packaging/build-deb.sh, judged by lintian, installed with dpkg.

The package is built twice (the changelog's version from the working tree, and a newer one from
a copy whose shipped agent.toml changed a default, for an upgrade with apt-get that must not
stop at a conffile question), offline from uv's cache, into a tmp dir. Installing it is real: dpkg -i on this
machine, so these tests need root (CI runs as root) and a machine without the agent installed.
The module purges it at the end even when a test fails, and deletes the edge-agent user if it
made it. systemd is not needed: deb-systemd-invoke starts nothing where systemd is not running,
and the daemon is started here from the package's own paths with a NOTIFY_SOCKET of ours.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import __version__
from agent.config import load_config
from agent.testing.broker import make_certs, plain_broker
from agent.testing.fleet import REPO, WAIT, agent_config, write_agent_toml
from tests.conftest import Keys
from tests.sdnotify import Listener

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="installs the package with dpkg -i: needs root (CI runs as root)"
)

BUILD = REPO / "packaging" / "build-deb.sh"
PACKAGE = "edge-model-agent"
FLAVOURS = (PACKAGE, f"{PACKAGE}-openvino", f"{PACKAGE}-cuda", f"{PACKAGE}-jetson")
USER = "edge-agent"
PREFIX = Path("/opt/edge-model-agent")
CONFFILE = Path("/etc/edge-agent/agent.toml")
DROPINS = Path("/etc/edge-agent/agent.toml.d")
STATE = Path("/var/lib/edge-agent")
UNIT = Path("/lib/systemd/system/edge-agent.service")
# What the maintainer scripts and deb-systemd-helper create besides the package's files.
MADE_AT_INSTALL = (
    STATE,
    Path("/etc/systemd/system/multi-user.target.wants/edge-agent.service"),
    Path("/var/lib/systemd/deb-systemd-helper-enabled/edge-agent.service.dsh-also"),
    Path("/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/edge-agent.service"),
)


@dataclass(frozen=True)
class Deb:
    path: Path
    version: str


@dataclass(frozen=True)
class Lintian:
    proc: subprocess.Popen[bytes]
    report: Path


def _run(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,  # type: ignore[call-overload]
    )


def _build(out: Path, version: str | None = None, source: Path = REPO) -> Deb:
    """packaging/build-deb.sh of ``source`` (a tree like the repository's) into ``out``,
    offline: tests do not download."""
    build = source / BUILD.relative_to(REPO)
    args = [str(build), "--build-dir", str(out / "build"), "--dist", str(out / "dist")]
    if version is not None:
        args += ["--version", version]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["UV_OFFLINE"] = "1"
    uv = REPO / ".tools" / "uv" / "bin" / "uv"
    found = str(uv) if uv.exists() else shutil.which("uv")
    if found is not None:
        env.setdefault("UV", found)
    done = _run(*args, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = (out / "dist").glob(f"{PACKAGE}_*.deb")
    return Deb(path, _field(path, "Version"))


def _field(deb: Path, name: str) -> str:
    done = _run("dpkg-deb", "--field", str(deb), name)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _status(package: str = PACKAGE) -> str:
    """dpkg's state of ``package``: installed, config-files, not-installed, ..."""
    done = _run("dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package)
    return done.stdout.strip() if done.returncode == 0 else "not-installed"


def _dpkg(*args: str) -> None:
    done = _run("dpkg", *args)
    assert done.returncode == 0, f"dpkg {' '.join(args)}\n{done.stdout}\n{done.stderr}"


def _purge_everything() -> None:
    for flavour in FLAVOURS:
        if _status(flavour) != "not-installed":
            _run("dpkg", "--purge", flavour)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Deb:
    return _build(tmp_path_factory.mktemp("deb"))


# The newer package's shipped agent.toml differs from this one's: a changed default.
NEWER_DEFAULT = ("report_interval_s = 1.0", "report_interval_s = 2.0")


@pytest.fixture(scope="module")
def newer_deb(tmp_path_factory: pytest.TempPathFactory, deb: Deb) -> Deb:
    """A newer version built from a copy of the sources whose shipped agent.toml changed."""
    work = tmp_path_factory.mktemp("deb-newer")
    source = work / "src"
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    for name in ("agent", "config", "systemd", "packaging"):
        shutil.copytree(
            REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shipped = source / "config" / "agent.toml"
    old, new = NEWER_DEFAULT
    text = shipped.read_text()
    assert text.count(old) == 1
    shipped.write_text(text.replace(old, new))
    newer = _build(work, f"{deb.version}.1", source)
    assert _run("dpkg", "--compare-versions", newer.version, "gt", deb.version).returncode == 0
    return newer


@pytest.fixture(scope="module")
def lintian(deb: Deb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lintian]:
    """lintian on ``deb``, started in the background as soon as the package is built.

    It takes minutes on a loaded box; the install, daemon and upgrade tests run meanwhile, and
    the lintian test (the module's last) waits for its report.
    """
    report = tmp_path_factory.mktemp("lintian") / "report"
    with report.open("w") as out:
        proc = subprocess.Popen(
            ["lintian", "--fail-on", "error", str(deb.path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Lintian(proc, report)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def machine() -> Iterator[None]:
    """This machine without the agent; purged again afterwards, and the user gone if we made it."""
    found = {f: s for f in FLAVOURS if (s := _status(f)) != "not-installed"}
    if found:
        pytest.fail(
            f"the agent is installed on this machine ({found}): these tests would replace and "
            "purge it; remove it first (dpkg -P)"
        )
    had_user = _exists_user(USER)
    try:
        yield
    finally:
        _purge_everything()
        if not had_user and _exists_user(USER):
            _run("userdel", USER)
            if _exists_group(USER):
                _run("groupdel", USER)


@pytest.fixture
def installed(machine: None, deb: Deb, lintian: Lintian) -> Deb:
    """``deb`` installed (again, if an earlier test removed it)."""
    if _status() != f"installed {deb.version}":
        _dpkg("--install", str(deb.path))
    return deb


def _exists_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _exists_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


# -- the package as built -----------------------------------------------------------------------
def test_package_fields_and_contents(deb: Deb, tmp_path: Path) -> None:
    assert _field(deb.path, "Package") == PACKAGE
    assert _field(deb.path, "Version").startswith(f"{__version__}-")
    depends = {d.strip() for d in _field(deb.path, "Depends").split(",")}
    assert {"adduser", "python3-systemd", "python3 (>= 3.11~)", "python3 (<< 3.12)"} <= depends
    assert set(_field(deb.path, "Conflicts").replace(" ", "").split(",")) == set(FLAVOURS[1:])

    root = tmp_path / "root"
    assert _run("dpkg-deb", "--raw-extract", str(deb.path), str(root)).returncode == 0
    assert (root / "DEBIAN" / "conffiles").read_text().split() == [str(CONFFILE)]
    # The drop-in directory is the package's, and empty: nothing there is ever a conffile.
    dropins = root / DROPINS.relative_to("/")
    assert dropins.is_dir()
    assert not list(dropins.iterdir())
    # The shipped files, as they are in the repository.
    conf = root / CONFFILE.relative_to("/")
    assert conf.read_bytes() == (REPO / "config" / "agent.toml").read_bytes()
    unit = root / UNIT.relative_to("/")
    assert unit.read_bytes() == (REPO / "systemd" / "edge-agent.service").read_bytes()
    for command in ("edge-agent", "edge-fleet"):
        link = root / "usr" / "bin" / command
        assert os.readlink(link) == str(PREFIX / "bin" / command)
        script = root / PREFIX.relative_to("/") / "bin" / command
        assert script.read_text().startswith(f"#!{PREFIX}/bin/python\n")
    venv = root / PREFIX.relative_to("/")
    assert os.readlink(venv / "bin" / "python") == "/usr/bin/python3"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    # No bytecode (postinst compiles it), no trace of the build directory, no dev tools.
    assert not list(venv.rglob("__pycache__"))
    assert not list(venv.rglob("*.pyc"))
    assert not list(venv.rglob("direct_url.json"))
    site = next(venv.glob("lib/python3*/site-packages"))
    names = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"edge_model_agent", "onnxruntime", "ai_edge_litert", "numpy", "paho_mqtt"} <= names
    assert not names & {"pytest", "mypy", "ruff", "hypothesis", "onnx", "openvino"}
    assert not (site / "agent" / "testing").exists()  # the harness of tests and benchmarks
    assert os.readlink(site / "systemd") == "/usr/lib/python3/dist-packages/systemd"

    # Maintainer scripts: deb-systemd-helper enables on install and purges on purge;
    # deb-systemd-invoke restarts on upgrade (if running) and stops on remove.
    control = root / "DEBIAN"
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable 'edge-agent.service'" in postinst
    assert "deb-systemd-invoke try-restart 'edge-agent.service'" in postinst
    assert re.search(
        r'"\$1" = remove .*\n\s*deb-systemd-invoke stop edge-agent\.service',
        (control / "prerm").read_text(),
    )
    assert "deb-systemd-helper purge 'edge-agent.service'" in (control / "postrm").read_text()


# -- installed ----------------------------------------------------------------------------------
def test_install_makes_the_commands_the_user_and_the_state_directory(installed: Deb) -> None:
    done = _run("/usr/bin/edge-agent", "--version")
    assert (done.returncode, done.stdout) == (0, f"edge-agent {__version__}\n"), done.stderr
    done = _run("/usr/bin/edge-fleet", "--version")
    assert (done.returncode, done.stdout) == (0, f"edge-fleet {__version__}\n"), done.stderr

    user = pwd.getpwnam(USER)
    assert user.pw_uid < 1000  # a system user
    assert user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    groups = {g.gr_name for g in grp.getgrall() if USER in g.gr_mem}
    for device_group in ("render", "video"):
        assert (device_group in groups) == _exists_group(device_group), groups

    st = STATE.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (user.pw_uid, user.pw_gid, 0o700)
    assert Path("/etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()
    # postinst compiled the environment's bytecode.
    assert list((PREFIX / "lib").glob("python3*/site-packages/agent/__pycache__/*.pyc"))
    # The harness of tests and benchmarks is not installed.
    assert not list((PREFIX / "lib").glob("python3*/site-packages/agent/testing"))


def test_hardware_lists_the_flavours_runtimes(installed: Deb) -> None:
    done = _run("/usr/bin/edge-agent", "hardware", "--json")
    assert done.returncode == 0, done.stderr
    runtimes = json.loads(done.stdout)["profile"]["runtimes"]
    assert runtimes["onnxruntime"], runtimes
    assert runtimes["litert"], runtimes
    assert runtimes["openvino"] is None, runtimes  # the OpenVINO flavour's


def test_check_config_names_what_a_fresh_box_lacks(
    installed: Deb, keys: Keys, tmp_path: Path
) -> None:
    shipped = load_config(CONFFILE, {})
    done = _run("/usr/bin/edge-agent", "check-config", str(CONFFILE))
    assert done.returncode == 2, done.stdout + done.stderr
    problems = done.stderr.splitlines()
    wanted = {
        "device_id": "'CHANGE-ME'",
        "trust.root": shipped.trust.root,
        "mqtt.ca_file": shipped.mqtt.ca_file,
        "mqtt.cert_file": shipped.mqtt.cert_file,
        "mqtt.key_file": shipped.mqtt.key_file,
    }
    assert len(problems) == len(wanted), problems
    for (setting, path), line in zip(wanted.items(), problems, strict=True):
        assert setting in line, (setting, line)
        assert str(path) in line, (path, line)

    # With its id set, the trust root and the device's certificate in place, it passes.
    certs = make_certs(tmp_path / "certs", "cam-01")
    env = {
        "PATH": "/usr/bin:/bin",
        "EDGE_AGENT_DEVICE_ID": "cam-01",
        "EDGE_AGENT_TRUST__ROOT": str(keys.dir / "root.json"),
        "EDGE_AGENT_MQTT__CA_FILE": str(certs / "ca.crt"),
        "EDGE_AGENT_MQTT__CERT_FILE": str(certs / "cam-01.crt"),
        "EDGE_AGENT_MQTT__KEY_FILE": str(certs / "cam-01.key"),
    }
    done = _run("/usr/bin/edge-agent", "check-config", str(CONFFILE), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{CONFFILE}: ok\n"), done.stdout


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the edge-agent user can read (pytest's tmp_path is root's alone); short, for
    sun_path."""
    directory = Path(tempfile.mkdtemp(prefix="ead-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_installed_daemon_reaches_ready_as_its_user(
    installed: Deb, keys: Keys, tmp_path: Path, shared_dir: Path
) -> None:
    user = pwd.getpwnam(USER)
    trust = shared_dir / "trust"
    trust.mkdir()
    for name in ("root.json", "keyring.json"):
        shutil.copyfile(keys.dir / name, trust / name)
        (trust / name).chmod(0o644)
    state = shared_dir / "state"
    state.mkdir(mode=0o700)
    os.chown(state, user.pw_uid, user.pw_gid)

    address = str(shared_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    os.chmod(address, 0o666)
    listener = Listener(sock, address)

    log = tmp_path / "agent.log"
    with plain_broker(tmp_path) as broker, open(log, "wb") as out:
        config = write_agent_toml(
            agent_config(state, trust, broker, "cam-01"), shared_dir / "agent.toml"
        )
        config.chmod(0o644)
        proc = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={USER}",
                f"--regid={USER}",
                "--init-groups",
                "/usr/bin/edge-agent",
                "run",
                "--config",
                str(config),
                "-v",
            ],
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "NOTIFY_SOCKET": address},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                listener.wait_for("READY=1", timeout=WAIT)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{log.read_text(errors='replace')}") from None
            # The package's interpreter and environment, as the edge-agent user, with
            # python3-systemd's sd_notify loaded.
            proc_dir = Path(f"/proc/{proc.pid}")
            argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
            assert argv[:2] == [f"{PREFIX}/bin/python".encode(), b"/usr/bin/edge-agent"], argv
            uids = (proc_dir / "status").read_text().split("\nUid:")[1].split()[:2]
            assert uids == [str(user.pw_uid)] * 2
            maps = (proc_dir / "maps").read_text()
            assert "/usr/lib/python3/dist-packages/systemd/_daemon." in maps
            assert str(PREFIX / "lib") in maps  # the environment's compiled modules

            proc.send_signal(signal.SIGTERM)
            listener.wait_for("STOPPING=1", timeout=WAIT)
            assert proc.wait(30) == 0, log.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            sock.close()


# -- enrol, upgrade, remove, purge ---------------------------------------------------------------
def _as_service(*args: str) -> subprocess.CompletedProcess[str]:
    """A command as the service's user and groups (as systemd runs it)."""
    return _run(
        "setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", *args,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
    )  # fmt: skip


def test_enrol_then_upgrade_without_a_question_remove_keeps_purge_leaves_nothing(
    installed: Deb, newer_deb: Deb, keys: Keys, tmp_path: Path
) -> None:
    user = pwd.getpwnam(USER)
    shipped = CONFFILE.read_bytes()

    # Enrolment: the fleet's file (edge-fleet device add), installed by root on the box.
    pki = make_certs(tmp_path / "pki", "bundle-server-1")
    enrolment = tmp_path / "cam-07.enrol.json"
    done = _run(
        "/usr/bin/edge-fleet", "device", "add", "cam-07", "--group", "lobby",
        "--pki", str(pki), "--trust", str(keys.dir), "--broker", "broker.example",
        "-o", str(enrolment),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = _run("/usr/bin/edge-agent", "enroll", str(enrolment))
    assert done.returncode == 0, done.stdout + done.stderr
    tls = CONFFILE.parent / "tls"
    dropin = DROPINS / "50-enrolment.toml"
    expected = {
        tls: (0, user.pw_gid, 0o750),
        tls / "device.key": (0, user.pw_gid, 0o640),
        tls / "device.crt": (0, 0, 0o644),
        tls / "ca.crt": (0, 0, 0o644),
        CONFFILE.parent / "root.json": (0, 0, 0o644),
        CONFFILE.parent / "keyring.json": (0, 0, 0o644),
        dropin: (0, 0, 0o644),
    }
    for path, owner in expected.items():
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == owner, path
    assert CONFFILE.read_bytes() == shipped  # the conffile untouched
    # check-config of the system config, as root and as the service's user (who reads the key).
    for check in (
        _run("/usr/bin/edge-agent", "check-config"),
        _as_service("/usr/bin/edge-agent", "check-config"),
    ):
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith(f"{CONFFILE}: ok\n"), check.stdout
        assert "cam-07 (groups lobby)" in check.stdout
        assert str(dropin) in check.stdout
    # A local setting of the box's own, in a later drop-in.
    local = DROPINS / "90-local.toml"
    local.write_text("[mqtt]\nkeepalive_s = 45\n")
    enrolled = dropin.read_bytes()
    marker = STATE / "kept"
    marker.write_text("state\n")
    os.chown(marker, user.pw_uid, user.pw_gid)

    # Upgrade to a package whose shipped agent.toml changed, as unattended upgrades do it: no
    # terminal, stdin closed. The conffile was never edited, so dpkg replaces it without a
    # question; the drop-ins are no package's files and stay as they are.
    done = _run(
        "apt-get", "install", "-y", str(newer_deb.path),
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "conffile prompt" not in done.stdout + done.stderr
    assert _status() == f"installed {newer_deb.version}"
    old, new = NEWER_DEFAULT
    assert CONFFILE.read_text() == shipped.decode().replace(old, new)
    assert dropin.read_bytes() == enrolled
    assert local.read_text() == "[mqtt]\nkeepalive_s = 45\n"
    config = load_config(CONFFILE, {})
    assert (config.device_id, config.groups, config.mqtt.host) == (
        "cam-07",
        ["lobby"],
        "broker.example",
    )
    assert (config.report_interval_s, config.mqtt.keepalive_s) == (2.0, 45)
    assert marker.read_text() == "state\n"
    assert STATE.stat().st_uid == user.pw_uid
    assert _run("/usr/bin/edge-agent", "check-config").returncode == 0
    files = _run("dpkg", "--listfiles", PACKAGE).stdout.splitlines()
    assert str(CONFFILE) in files
    assert str(DROPINS) in files
    assert str(UNIT) in files

    # Remove: configuration, enrolment and state stay, the program goes (bytecode included).
    _dpkg("--remove", PACKAGE)
    assert _status() == f"config-files {newer_deb.version}"
    assert CONFFILE.exists()
    assert dropin.read_bytes() == enrolled
    assert marker.read_text() == "state\n"
    assert not PREFIX.exists()
    assert not os.path.lexists("/usr/bin/edge-agent")
    assert not UNIT.exists()

    # Purge: nothing of the package's is left, nor what enrolment wrote; the system user stays
    # (as Debian's do). What systemd makes for the running service (RuntimeDirectory=,
    # CacheDirectory=) goes too. (A drop-in put there by hand would stay, with its directory.)
    local.unlink()
    made_by_systemd = [Path("/run/edge-agent"), Path("/var/cache/edge-agent")]
    for directory in made_by_systemd:
        directory.mkdir(exist_ok=True)
    _dpkg("--purge", PACKAGE)
    assert _status() == "not-installed"
    left = [
        path
        for path in files
        if os.path.lexists(path)
        and (not os.path.isdir(path) or "edge-agent" in path or "edge-model-agent" in path)
    ]
    left += [str(path) for path in (*MADE_AT_INSTALL, *made_by_systemd) if os.path.lexists(path)]
    left += [str(p) for p in Path("/var/lib/dpkg/info").glob(f"{PACKAGE}.*")]
    assert not left, left
    assert not CONFFILE.parent.exists()
    assert _exists_user(USER)


# -- last, so that the tests above ran while lintian worked -----------------------------------------
def test_lintian_reports_no_errors(lintian: Lintian) -> None:
    returncode = lintian.proc.wait(timeout=600)
    report = lintian.report.read_text()
    assert returncode == 0, report
    assert not [line for line in report.splitlines() if line.startswith("E:")], report
    # Every override in packaging/debian/lintian-overrides still matches something.
    assert "mismatched-override" not in report, report
    assert "unused-override" not in report, report
