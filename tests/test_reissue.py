"""A rollback the fleet wants: the earlier bundle's descriptor re-issued under a higher release.

tiny 1.0.0 (release 1) runs, then 2.0.0 (release 2) commits. A deployment of 1.0.0's descriptor
re-issued as release 3 brings 1.0.0 back from the bundle the device kept: no block of it is
asked for again, and the device reports release 3. Anti-rollback stays absolute: 1.0.0's
original descriptor replayed afterwards is refused, a re-issue that misnames the manifest's
release is refused, and the fleet re-issues only what a key it trusts signed. Real mosquitto,
real agents (on a thread of the test), real bundles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent._strictjson import canonical
from agent.daemon import DeviceAgent
from agent.errors import BadSignatureError, ConfigError, ExpiredError, UntrustedKeyError
from agent.fleet.sign import descriptor_to_reissue, reissue_descriptor, sign_bundle
from agent.state.store import StateStore
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    Watcher,
    agent,
    agent_config,
    bundle_server,
    deployment,
    failed,
    watcher,
)
from agent.testing.models import make_onnx
from agent.transport.messages import Phase, Reported
from agent.trust.envelope import parse_envelope, sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import DESCRIPTOR_TYPE, BundleDescriptor
from tests.conftest import NOW, Keys

DEVICE = "cam-01"
DESIRED = TOPICS.device(DEVICE).desired
REQUESTS = TOPICS.bundle_requests_filter(shared=False)  # what devices ask bundle servers for


@dataclass(frozen=True)
class Fleet:
    served: Path
    a: bytes  # tiny 1.0.0's descriptor envelope, release 1
    b: bytes  # tiny 2.0.0's, release 2
    sha_a: str
    sha_b: str
    state: Path

    def descriptor_a(self) -> BundleDescriptor:
        return BundleDescriptor.model_validate_json(parse_envelope(self.a).payload)


@pytest.fixture
def fleet(tmp_path: Path, signed) -> Fleet:  # type: ignore[no-untyped-def]
    served = tmp_path / "served"
    served.mkdir()
    out: dict[str, tuple[bytes, str]] = {}
    for version, release in (("1.0.0", 1), ("2.0.0", 2)):
        model = make_onnx(tmp_path / f"m{release}.onnx", seed=release)
        path, envelope = signed(version, models=[model], block_size=4096, release=release)
        (served / path.name).write_bytes(path.read_bytes())
        out[version] = envelope, hashlib.sha256(path.read_bytes()).hexdigest()
    (a, sha_a), (b, sha_b) = out["1.0.0"], out["2.0.0"]
    return Fleet(served, a, b, sha_a, sha_b, tmp_path / "state")


@contextmanager
def running(broker: Broker, keys: Keys, w: Fleet) -> Iterator[tuple[Watcher, DeviceAgent]]:
    """The watcher (block requests too), a bundle server and the device agent."""
    config = agent_config(w.state, keys.dir, broker, DEVICE)
    with (
        watcher(broker, also=[REQUESTS]) as watch,
        bundle_server(broker, w.served),
        agent(config) as dev,
    ):
        yield watch, dev


def serves(version: str, release: int) -> Callable[[Reported], bool]:
    """``tiny`` serves ``version`` under ``release``, its deployment done."""

    def check(r: Reported) -> bool:
        m = r.models.get("tiny")
        return (
            m is not None
            and m.phase == Phase.ACTIVE
            and m.version == version
            and m.release == release
            and m.runtime is not None
        )

    return check


def asked_for(watch: Watcher, sha: str, since: int = 0) -> list[str]:
    """The block requests for bundle ``sha`` the watcher saw, from ``raw[since]`` on."""
    return [i.topic for i in watch.raw[since:] if f"/bundles/{sha}/request/" in i.topic]


def lasting(state: Path) -> dict[str, bytes]:
    """What must not change when a document is refused: floors, records, documents, bundles."""
    return {
        str(p.relative_to(state)): p.read_bytes()
        for sub in ("trust", "slots", "desired", "bundles", "models")
        for p in sorted((state / sub).rglob("*"))
        if p.is_file()
    }


def reissued_a(w: Fleet, keys: Keys, release: int) -> bytes:
    """What the fleet signs to roll back to 1.0.0: its descriptor, once verified, re-issued."""
    now = datetime.now(timezone.utc)
    original = descriptor_to_reissue(w.a, keys.state(now), now)
    return reissue_descriptor(original, [keys.release], release=release, now=now, days=30)


def a_then_b(watch: Watcher, keys: Keys, w: Fleet) -> None:
    """1.0.0 (release 1) deployed, then 2.0.0 (release 2) deployed and committed."""
    watch.publish(DESIRED, deployment({"tiny": w.a}, keys.release, device=DEVICE, sequence=1))
    watch.wait(DEVICE, serves("1.0.0", 1), what="1.0.0 release 1")
    watch.publish(DESIRED, deployment({"tiny": w.b}, keys.release, device=DEVICE, sequence=2))
    watch.wait(DEVICE, serves("2.0.0", 2), what="2.0.0 release 2")
    store = StateStore(w.state)
    assert store.load_floors().release_floor["tiny"] == 2
    assert store.load_installed()["tiny"].previous_sha256 == w.sha_a
    assert store.bundle_path(w.sha_a).exists()  # the last good bundle, kept
    assert asked_for(watch, w.sha_a), "the watcher sees 1.0.0's block requests"


def rolled_back_to_a(watch: Watcher, keys: Keys, w: Fleet) -> Reported:
    """1.0.0 re-issued as release 3, deployed; it serves again."""
    watch.publish(
        DESIRED,
        deployment({"tiny": reissued_a(w, keys, 3)}, keys.release, device=DEVICE, sequence=3),
    )
    return watch.wait(DEVICE, serves("1.0.0", 3), what="1.0.0 back as release 3")


def test_a_reissued_descriptor_brings_the_earlier_bundle_back_without_fetching_it(
    broker: Broker, keys: Keys, fleet: Fleet
) -> None:
    with running(broker, keys, fleet) as (watch, dev):
        a_then_b(watch, keys, fleet)
        mark = len(watch.raw)
        reported = rolled_back_to_a(watch, keys, fleet)
        tiny = reported.models["tiny"]
        assert tiny.bundle_sha256 == fleet.sha_a
        assert tiny.fallback is None
        served = dev.models.describe("tiny")
        assert served is not None
        assert served.candidate.bundle_sha256 == fleet.sha_a
        assert served.candidate.manifest.release == 1  # the bytes are 1.0.0's, as built
        # Served from the bundle the device kept: neither its block list nor a block was asked for.
        watch._drain(0.5)
        assert asked_for(watch, fleet.sha_a, since=mark) == []
    store = StateStore(fleet.state)
    assert store.load_floors().release_floor["tiny"] == 3
    installed = store.load_installed()["tiny"]
    assert (installed.bundle_sha256, installed.release) == (fleet.sha_a, 3)
    assert installed.previous_sha256 == fleet.sha_b


def test_the_original_descriptor_replayed_after_a_reissue_is_refused(
    broker: Broker, keys: Keys, fleet: Fleet
) -> None:
    """An attacker on the broker replays the old document; even a fresh document that carries
    the old descriptor (release 1) is below the floor the re-issue raised."""
    with running(broker, keys, fleet) as (watch, _):
        a_then_b(watch, keys, fleet)
        before = rolled_back_to_a(watch, keys, fleet)
        first = deployment({"tiny": fleet.a}, keys.release, device=DEVICE, sequence=1)
        fresh = deployment({"tiny": fleet.a}, keys.release, device=DEVICE, sequence=4)
        for what, document in (("the first document", first), ("a fresh one", fresh)):
            disk = lasting(fleet.state)
            t0 = datetime.now(timezone.utc)
            watch.publish(DESIRED, document)
            report = watch.wait(
                DEVICE, lambda r, t0=t0: r.at >= t0 and r.error is not None, what=f"{what} refused"
            )
            assert report.error is not None
            assert report.error.code == "rollback", report.error
            assert report.models == before.models
            assert report.sequence == before.sequence == 3
            assert lasting(fleet.state) == disk
        assert "release 1 is older than the trusted release 3" in report.error.message


def test_a_reissue_that_misnames_the_manifest_release_is_refused(
    broker: Broker, keys: Keys, fleet: Fleet
) -> None:
    """A descriptor for 1.0.0's bytes that says they were built as release 2 (they were built
    as 1) fails the manifest check, and the stored bundle stays; one whose bundle_release is
    not below its release is refused as malformed before anything is looked at."""
    original = fleet.descriptor_a()
    with running(broker, keys, fleet) as (watch, _):
        a_then_b(watch, keys, fleet)
        mark = len(watch.raw)
        wrong = original.model_copy(update={"release": 3, "bundle_release": 2})
        envelope = sign_envelope(DESCRIPTOR_TYPE, wrong.to_payload(), [keys.release]).to_bytes()
        watch.publish(
            DESIRED, deployment({"tiny": envelope}, keys.release, device=DEVICE, sequence=3)
        )
        report = watch.wait(DEVICE, failed("tiny", "digest-mismatch"), what="refused")
        tiny = report.models["tiny"]
        assert (tiny.version, tiny.release, tiny.bundle_sha256) == ("2.0.0", 2, fleet.sha_b)
        assert tiny.runtime is not None  # 2.0.0 serves on
        assert tiny.error is not None
        assert "the descriptor signs ('tiny', '1.0.0', 2, " in tiny.error.message
        store = StateStore(fleet.state)
        assert store.load_floors().release_floor["tiny"] == 2
        assert store.bundle_path(fleet.sha_a).exists()  # the bytes are good: kept
        watch._drain(0.5)
        assert asked_for(watch, fleet.sha_a, since=mark) == []

        # bundle_release must be below release: the schema refuses it, whoever signed it.
        payload = original.model_dump(mode="json") | {"release": 3, "bundle_release": 3}
        bad = sign_envelope(DESCRIPTOR_TYPE, canonical(payload), [keys.release]).to_bytes()
        disk = lasting(fleet.state)
        t0 = datetime.now(timezone.utc)
        watch.publish(DESIRED, deployment({"tiny": bad}, keys.release, device=DEVICE, sequence=4))
        report = watch.wait(DEVICE, lambda r: r.at >= t0 and r.error is not None, what="malformed")
        assert report.error is not None
        assert report.error.code == "format", report.error
        assert "bundle_release 3 must be below release 3" in report.error.message
        assert report.sequence == 3
        assert lasting(fleet.state) == disk


def test_a_reissue_of_the_version_that_runs_raises_its_release_in_place(
    broker: Broker, keys: Keys, fleet: Fleet
) -> None:
    """A device that never left 1.0.0 gets the rollback document too: nothing is fetched or
    loaded, and it reports, and keeps as its floor, the re-issued release."""
    with running(broker, keys, fleet) as (watch, dev):
        watch.publish(
            DESIRED, deployment({"tiny": fleet.a}, keys.release, device=DEVICE, sequence=1)
        )
        watch.wait(DEVICE, serves("1.0.0", 1), what="1.0.0 release 1")
        served = dev.models.describe("tiny")
        mark, events = len(watch.raw), len(watch.events)
        rolled_back_to_a(watch, keys, fleet)
        assert dev.models.describe("tiny") is served  # the same loaded version: no reload
        watch._drain(0.5)
        assert asked_for(watch, fleet.sha_a, since=mark) == []
        phases = {e.phase for e in watch.events[events:] if e.kind == "phase"}
        assert phases <= {Phase.ACTIVE}, phases
    store = StateStore(fleet.state)
    assert store.load_floors().release_floor["tiny"] == 3
    assert store.load_installed()["tiny"].release == 3


# -- the fleet side: what it re-issues ------------------------------------------------------------
def test_reissue_descriptor_raises_the_release_and_keeps_the_bytes_pinned(
    keys: Keys, fleet: Fleet
) -> None:
    original = fleet.descriptor_a()
    later = NOW + timedelta(days=200)
    once = BundleDescriptor.model_validate_json(
        parse_envelope(
            reissue_descriptor(original, [keys.release], release=3, now=later, days=30)
        ).payload
    )
    pinned = ("bundle_sha256", "bundle_size", "block_size", "block_list_sha256", "manifest_sha256")
    assert all(getattr(once, f) == getattr(original, f) for f in pinned)
    assert (once.model, once.version, once.release, once.bundle_release) == ("tiny", "1.0.0", 3, 1)
    assert (once.created, once.expires) == (later, later + timedelta(days=30))
    # A re-issue of a re-issue still names the release the manifest was built with.
    twice = reissue_descriptor(once, [keys.release], release=7, now=later, days=30)
    verified = keys.state(later).verify_descriptor(twice, later).descriptor
    assert (verified.release, verified.bundle_release) == (7, 1)
    for release in (3, 2):
        with pytest.raises(ConfigError, match=f"release {release} is not above"):
            reissue_descriptor(once, [keys.release], release=release, now=later, days=30)
    with pytest.raises(ConfigError, match="release key"):
        reissue_descriptor(original, [], release=3, now=later, days=30)


def test_the_fleet_reissues_an_expired_descriptor_but_only_one_a_trusted_key_signed(
    tmp_path: Path, keys: Keys, build
) -> None:  # type: ignore[no-untyped-def]
    bundle = build("1.0.0", release=1).path
    _, envelope = sign_bundle(bundle, [keys.release], now=NOW, days=1)
    later = NOW + timedelta(days=100)
    state = keys.state(later)
    with pytest.raises(ExpiredError):
        state.verify_descriptor(envelope.to_bytes(), later)  # what a device says of it
    assert descriptor_to_reissue(envelope.to_bytes(), state, later).release == 1
    # Someone who writes the documents the fleet reads back cannot have it sign another hash.
    forged = BundleDescriptor.model_validate_json(envelope.payload).model_copy(
        update={"bundle_sha256": "0" * 64}
    )
    tampered = type(envelope)(envelope.payload_type, forged.to_payload(), envelope.signatures)
    with pytest.raises(BadSignatureError):
        descriptor_to_reissue(tampered.to_bytes(), state, later)
    stranger = sign_envelope(DESCRIPTOR_TYPE, forged.to_payload(), [Signer.generate()])
    with pytest.raises(UntrustedKeyError):
        descriptor_to_reissue(stranger.to_bytes(), state, later)
    # A key revoked since counts for nothing: re-issue from the bundle file instead.
    keys.store.rotate_release(now=NOW)
    with pytest.raises(UntrustedKeyError):
        descriptor_to_reissue(envelope.to_bytes(), keys.state(later), later)
