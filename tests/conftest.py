"""Shared fixtures: a key directory, tiny models, built and signed bundles, a fixed clock, a
real mosquitto (``broker``; :func:`broker_fixture` for a module that needs another one) and the
test CA with its client certificates (``certs``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import pytest

from agent.fleet.build import BuildOptions, BuildResult, build_bundle
from agent.fleet.keys import KeyStore, load_signer
from agent.fleet.sign import sign_bundle
from agent.testing.broker import Broker, make_certs, mosquitto_binary, plain_broker, tls_broker
from agent.testing.models import make_onnx
from agent.trust.keys import Signer
from agent.trust.verifier import TrustedState

# Keys and signatures are made at the real time; NOW is a little later, well inside every expiry.
NOW = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=1)


@dataclass
class Keys:
    store: KeyStore
    release: Signer

    @property
    def dir(self) -> Path:
        return self.store.root

    def state(self, now: datetime = NOW) -> TrustedState:
        return self.store.state(now)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    store = KeyStore.init(
        tmp_path / "keys", now=datetime.now(timezone.utc), root_keys=3, threshold=2
    )
    return Keys(store, load_signer(store.release_key_paths()[0]))


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    return make_onnx(tmp_path / "tiny.onnx")


BuildFn = Callable[..., BuildResult]


@pytest.fixture
def build(tmp_path: Path, onnx_model: Path) -> BuildFn:
    """Build a bundle: ``build(version="1.0.0", models=[...], **BuildOptions fields)``."""
    counter = iter(range(1000))

    def _build(
        version: str = "1.0.0", models: list[Path] | None = None, name: str = "tiny", **kw: object
    ) -> BuildResult:
        out = tmp_path / f"{name}-{version}-{next(counter)}.emb"
        return build_bundle(
            models or [onnx_model], out, BuildOptions(name=name, version=version, **kw)
        )  # type: ignore[arg-type]

    return _build


@pytest.fixture
def signed(build: BuildFn, keys: Keys) -> Callable[..., tuple[Path, bytes]]:
    """Build and sign: returns (bundle path, envelope bytes)."""

    def _signed(
        version: str = "1.0.0", signers: list[Signer] | None = None, **kw: object
    ) -> tuple[Path, bytes]:
        result = build(version, **kw)
        out, _ = sign_bundle(result.path, signers or [keys.release], now=datetime.now(timezone.utc))
        return result.path, out.read_bytes()

    return _signed


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make-certs.sh`` output: the test CA, the broker, devices cam-01 and cam-02, the fleet."""
    mosquitto_binary()  # fail early if there is no mosquitto
    return make_certs(tmp_path_factory.mktemp("certs"), "cam-01", "cam-02")


def broker_fixture(
    *,
    extra: Sequence[str] = (),
    tls: bool = False,
    persistent: bool = False,
    scope: Literal["function", "module"] = "function",
) -> Callable[..., Iterator[Broker]]:
    """A ``broker`` fixture: ``broker = broker_fixture(...)`` in a module replaces the plain one.

    ``extra``: config lines appended; ``tls``: the TLS listener with client certificates from
    ``certs`` and the shipped ACL; ``persistent``: mosquitto keeps sessions and subscriptions
    across a restart (``Broker.stop``/``start``); ``scope="module"``: one broker for the module.
    """

    def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
        if scope == "function":
            tmp: Path = request.getfixturevalue("tmp_path")
        else:
            tmp = request.getfixturevalue("tmp_path_factory").mktemp("broker")
        lines = list(extra)
        if persistent:
            store = tmp / "mosquitto-store"
            store.mkdir()
            lines = ["persistence true", f"persistence_location {store}/", *lines]
        if tls:
            with tls_broker(tmp, request.getfixturevalue("certs"), extra=lines) as b:
                yield b
        else:
            with plain_broker(tmp, lines) as b:
                yield b

    return pytest.fixture(scope=scope, name="broker")(broker)


broker = broker_fixture()


# The modules that take longest (minutes: a package built and installed, agent processes started
# one after another), in the order they should start. Under `make test`'s parallel workers
# (pytest-xdist, one module per worker at a time, in collection order) they go first, so the
# run does not end waiting on one slow module that started last.
SLOW_FIRST = (
    "test_deb_suites.py",
    "test_deb.py",
    "test_rollback.py",
    "test_rollout.py",
    "test_cli_fleet.py",
    "test_crash_recovery.py",
    "test_daemon_robustness.py",
    "test_loadtest.py",
    "test_enrol.py",
    "test_transfer.py",
    "test_state_litter.py",
    "test_rollout_fleet.py",
    "test_reporting.py",
    "test_status.py",
    "test_cluster.py",
    "test_simulator.py",
    "test_dashboard_browser.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
