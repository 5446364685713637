"""``edge-fleet bundle verify`` says "verified" only for what a device installs.

The bundle here is signed as it is (its descriptor signs exactly these bytes), but a model file
inside differs from the SHA-256 its manifest lists: a build that went wrong after the manifest
was written. The fleet's verify, ``edge-agent serve`` and a device's agent must all refuse it,
with the same code, before anything is stored or unpacked.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent._strictjson import dump_model
from agent.bundle.blocks import digest_file
from agent.cli import agent_main, fleet_main
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    agent,
    agent_config,
    bundle_server,
    deployment,
    failed,
    watcher,
)
from agent.trust.envelope import sign_envelope
from agent.trust.metadata import DESCRIPTOR_TYPE, BundleDescriptor
from agent.verify import envelope_path
from tests.conftest import Keys
from tests.test_bundle_verify import index_of, rebuild


def _member_differs(tmp_path: Path, signed, keys: Keys) -> tuple[Path, bytes, str]:  # type: ignore[no-untyped-def]
    """A bundle whose model file is not the one its manifest lists, with a descriptor signed
    for exactly its bytes; returns (bundle, envelope, the member's name)."""
    good, _ = signed("1.0.0")
    index = index_of(good)
    name = index.manifest.variants[0].entrypoint
    member = index.members[name]
    original = good.read_bytes()[member.offset : member.offset + member.size]
    altered = bytes([original[0] ^ 0x01]) + original[1:]
    bundle = rebuild(good, tmp_path / "served" / "tiny-1.0.0.emb", {name: altered})
    with open(bundle, "rb") as f:
        digests = digest_file(f, index.manifest.block_size)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    m = index.manifest
    descriptor = BundleDescriptor(
        model=m.name,
        version=m.version,
        release=m.release,
        bundle_sha256=digests.sha256,
        bundle_size=digests.size,
        block_size=m.block_size,
        block_list_sha256=digests.block_list_sha256,
        manifest_sha256=index.manifest_sha256,
        created=now,
        expires=now + timedelta(days=30),
    )
    envelope = sign_envelope(DESCRIPTOR_TYPE, dump_model(descriptor), [keys.release]).to_bytes()
    envelope_path(bundle).write_bytes(envelope)
    return bundle, envelope, name


@pytest.fixture
def bad(tmp_path: Path, signed, keys: Keys) -> tuple[Path, bytes, str]:  # type: ignore[no-untyped-def]
    (tmp_path / "served").mkdir()
    return _member_differs(tmp_path, signed, keys)


def test_fleet_verify_refuses_a_member_that_differs_from_its_manifest(
    bad: tuple[Path, bytes, str], keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, _, name = bad
    code = fleet_main(["bundle", "verify", str(bundle), "--trust", str(keys.dir)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "rejected (digest-mismatch)" in err
    assert f"member {name!r} differs from its manifest entry" in err


def test_edge_agent_serve_refuses_it_before_listening(
    bad: tuple[Path, bytes, str], keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, _, name = bad
    code = agent_main(["serve", "--bundle", str(bundle), "--trust", str(keys.dir), "--port", "0"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "rejected (digest-mismatch)" in captured.err
    assert f"member {name!r}" in captured.err
    assert "serving on" not in captured.out


def test_a_device_refuses_it_before_storing_it(
    tmp_path: Path, broker: Broker, keys: Keys, bad: tuple[Path, bytes, str]
) -> None:
    bundle, envelope, name = bad
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    config = agent_config(tmp_path / "state", keys.dir, broker, "cam-01")
    with watcher(broker) as fleet, bundle_server(broker, bundle.parent), agent(config) as dev:
        fleet.publish(
            TOPICS.device("cam-01").desired,
            deployment({"tiny": envelope}, keys.release, device="cam-01"),
        )
        reported = fleet.wait("cam-01", failed("tiny", "digest-mismatch"), what="refused")
        error = reported.models["tiny"].error
        assert error is not None
        assert f"member {name!r} differs from its manifest entry" in error.message
        # Refused at the check after the download, not at the unpack: nothing was stored.
        assert not dev.store.bundle_path(sha).exists()
        assert not (tmp_path / "state" / "models" / "tiny").exists()
