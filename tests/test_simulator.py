"""Simulated devices (``edge-fleet simulate``) against a real mosquitto and a real bundle server:
they verify, fetch, report and fail as the agent does, with only the runtime simulated.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.fleet.keys import KeyStore, load_signer
from agent.fleet.sign import descriptor_to_reissue, reissue_descriptor
from agent.fleet.simulator import Simulator
from agent.fleet.simulator_settings import LoadFailure, make_settings
from agent.testing.broker import Broker, free_port, make_certs, tls_broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    WAIT,
    Watcher,
    active,
    bundle_server,
    deployment,
    failed,
    hand_back,
    mqtt_settings,
    serve_copy,
    simulated,
    two_versions,
    watcher,
)
from agent.testing.wait import wait_until
from agent.transport.messages import Online, Phase, Reported, Telemetry
from agent.trust.envelope import parse_envelope
from agent.verify import load_trust
from tests.conftest import Keys

GROUP = "site-a"


def wait_all(fleet: Watcher, sim: Simulator, check: Callable[[Reported], bool], what: str) -> None:
    for d in sim.devices:
        fleet.wait(d.id, check, what=what)


def phases(fleet: Watcher, device: str, since: int = 0) -> list[Phase | None]:
    return [e.phase for e in fleet.events[since:] if e.device_id == device and e.kind == "phase"]


def running(model: str, sha: str, deployment_id: str) -> Callable[[Reported], bool]:
    def check(r: Reported) -> bool:
        m = r.models.get(model)
        return (
            m is not None
            and m.phase == Phase.ACTIVE
            and m.bundle_sha256 == sha
            and r.deployment_id == deployment_id
        )

    return check


def dep_id(document: bytes) -> str:
    return str(json.loads(parse_envelope(document).payload)["deployment_id"])


def test_a_fleet_in_a_group_converges_on_the_group_deployment(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    sha = keys.state().verify_descriptor(v.envelopes["1.0.0"], datetime.now(timezone.utc))
    want = sha.descriptor.bundle_sha256
    doc = deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group=GROUP)
    with bundle_server(broker, v.served), watcher(broker) as fleet:
        with simulated(
            broker, keys, tmp_path / "state", devices=30, hardware={"cpu": 2, "jetson": 1}
        ) as sim:
            wait_all(fleet, sim, lambda r: r.groups == [GROUP], "a first report")
            fleet.publish(TOPICS.group_desired(GROUP), doc)
            wait_all(fleet, sim, running("tiny", want, dep_id(doc)), "tiny 1.0.0 from the group")
            assert all(fleet.view.devices[d.id].online for d in sim.devices)
            reports = [fleet.view.devices[d.id].reported for d in sim.devices]
            arches = set()
            for d, r in zip(sim.devices, reports, strict=True):
                assert r is not None
                assert r.hardware is not None
                arches.add(r.hardware.arch)
                m = r.models["tiny"]
                assert (m.version, m.release, m.variant) == (
                    "1.0.0",
                    sha.descriptor.release,
                    "onnx-fp32",
                )
                jetson = "jetson" in r.hardware.accelerators
                assert m.runtime is not None
                assert ("Tensorrt" in m.runtime) == jetson
                seen = phases(fleet, d.id)
                assert seen[seen.index(Phase.DOWNLOADING) :] == [
                    Phase.DOWNLOADING,
                    Phase.VERIFYING,
                    Phase.LOADING,
                    Phase.ACTIVE,
                ], seen
            assert arches == {"x86_64", "aarch64"}  # both profiles drawn, as reported
            assert sim.stats.transfers == 30
            assert sim.stats.fetched_bytes == 30 * sha.descriptor.bundle_size

        # Stopped: each device said offline on its retained online topic.
        def offline() -> bool:
            if any(fleet.view.devices[d.id].online is not False for d in sim.devices):
                fleet._drain(0.1)
                return False
            return True

        wait_until(offline, WAIT, interval=0, message="not every device said offline")


def test_a_device_document_takes_over_from_the_group_one(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    other = serve_copy(signed("3.1.0", name="detector", block_size=4096), v.served)
    group_doc = deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group=GROUP)
    with (
        bundle_server(broker, v.served),
        watcher(broker) as fleet,
        simulated(broker, keys, tmp_path / "state", devices=4) as sim,
    ):
        fleet.publish(TOPICS.group_desired(GROUP), group_doc)
        wait_all(fleet, sim, active("tiny", "1.0.0"), "the group's version")
        one = sim.devices[2].id
        own = deployment(
            {"tiny": v.envelopes["2.0.0"], "detector": other}, keys.release, device=one
        )
        fleet.publish(TOPICS.device(one).desired, own)
        reported = fleet.wait(
            one,
            lambda r: active("tiny", "2.0.0")(r) and active("detector", "3.1.0")(r),
            what="its own two models",
        )
        assert reported.deployment_id == dep_id(own)
        # One download at a time: the second model's began after the first one's ended.
        events = [e for e in fleet.events if e.device_id == one and e.kind == "phase"]
        starts = [i for i, e in enumerate(events) if e.phase == Phase.DOWNLOADING]
        ends = [i for i, e in enumerate(events) if e.phase == Phase.VERIFYING]
        assert len(starts) == 3  # tiny 1.0.0, then the two of its own document
        assert ends[1] < starts[2]
        for d in sim.devices:
            if d.id != one:
                view = fleet.view.devices[d.id].reported
                assert view is not None
                assert view.models["tiny"].version == "1.0.0"


def test_a_device_handed_back_follows_its_group_again(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    v3 = serve_copy(signed("3.0.0", block_size=4096), v.served)
    group = TOPICS.group_desired(GROUP)
    with (
        bundle_server(broker, v.served),
        watcher(broker) as fleet,
        simulated(broker, keys, tmp_path / "state", devices=2) as sim,
    ):
        other, one = (d.id for d in sim.devices)
        first = deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group=GROUP, sequence=1)
        fleet.publish(group, first)
        own = deployment({"tiny": v.envelopes["2.0.0"]}, keys.release, device=one, sequence=10)
        fleet.publish(TOPICS.device(one).desired, own)
        fleet.wait(one, active("tiny", "2.0.0"), what="its own document")
        # The group moves on; the device keeps to its own document ...
        fleet.publish(group, deployment({"tiny": v3}, keys.release, group=GROUP, sequence=2))
        fleet.wait(other, active("tiny", "3.0.0"), what="the group's new version")
        assert fleet.wait(one, active("tiny", "2.0.0")).sequence == 10
        # ... until it is handed back, and then runs the group's.
        fleet.publish(TOPICS.device(one).desired, hand_back(keys.release, one, sequence=11))
        fleet.wait(one, active("tiny", "3.0.0"), what="handed back: the group's 3.0.0")
        # Its own older document cannot be replayed to take it back.
        fleet.publish(TOPICS.device(one).desired, own)
        event = fleet.wait_event(
            lambda e: e.kind == "rejected" and e.device_id == one, what="the replay refused"
        )
        assert event.error is not None
        assert event.error.code == "rollback"
        assert fleet.wait(one, active("tiny", "3.0.0")).sequence == 2


def test_refused_documents_are_reported_with_their_codes(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    stranger = KeyStore.init(tmp_path / "other-keys", now=datetime.now(timezone.utc))
    wrong_key = load_signer(stranger.release_key_paths()[0])
    envelope = v.envelopes["1.0.0"]
    with (
        bundle_server(broker, v.served),
        watcher(broker) as fleet,
        simulated(broker, keys, tmp_path / "state", devices=3, groups=[]) as sim,
    ):
        a, b, c = (d.id for d in sim.devices)
        fleet.publish(TOPICS.device(a).desired, deployment({"tiny": envelope}, wrong_key, device=a))
        past = datetime.now(timezone.utc) - timedelta(days=40)
        fleet.publish(
            TOPICS.device(b).desired,
            deployment({"tiny": envelope}, keys.release, device=b, now=past, days=30),
        )
        fleet.publish(
            TOPICS.device(c).desired,
            deployment({"tiny": envelope}, keys.release, device=c, sequence=50),
        )
        fleet.wait(c, active("tiny", "1.0.0"), what="the good document")
        fleet.publish(  # an older sequence on the same topic
            TOPICS.device(c).desired,
            deployment({"tiny": v.envelopes["2.0.0"]}, keys.release, device=c, sequence=49),
        )
        for device, code in ((a, "untrusted-key"), (b, "expired"), (c, "rollback")):
            r = fleet.wait(
                device,
                lambda r, code=code: r.error is not None and r.error.code == code,  # type: ignore[misc]
                what=f"error {code}",
            )
            event = fleet.wait_event(
                lambda e, d=device, code=code: (  # type: ignore[misc]
                    e.device_id == d
                    and e.kind == "rejected"
                    and e.error is not None
                    and e.error.code == code
                ),
                what=f"rejected {code}",
            )
            assert event.topic == TOPICS.device(device).desired
        for device in (a, b):
            view = fleet.view.devices[device].reported
            assert view is not None
            assert view.models == {}
        assert r.models["tiny"].version == "1.0.0"  # c keeps what it runs
        assert sim.stats.transfers == 1


def test_injected_load_failures_are_reported_as_failed_with_their_code(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    failure = LoadFailure(version="2.0.0", fraction=0.3, devices=frozenset({"sim-00000"}))
    with (
        bundle_server(broker, v.served),
        watcher(broker) as fleet,
        simulated(broker, keys, tmp_path / "state", devices=12, failures=[failure]) as sim,
    ):
        fleet.publish(
            TOPICS.group_desired(GROUP),
            deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group=GROUP),
        )
        wait_all(fleet, sim, active("tiny", "1.0.0"), "1.0.0, which every device loads")
        fleet.publish(
            TOPICS.group_desired(GROUP),
            deployment({"tiny": v.envelopes["2.0.0"]}, keys.release, group=GROUP),
        )
        chosen = {d.id for d in sim.devices if failure.hits(d.id, "2.0.0")}
        assert "sim-00000" in chosen
        assert 1 < len(chosen) < 12
        for d in sim.devices:
            if d.id in chosen:
                r = fleet.wait(d.id, failed("tiny", "self-test"), what="a failed self-test")
                m = r.models["tiny"]
                assert m.version == "1.0.0"  # what still serves
                assert m.error is not None
                assert "2.0.0" in m.error.message
            else:
                fleet.wait(d.id, active("tiny", "2.0.0"), what="2.0.0")


def test_a_stored_bundle_is_not_fetched_again(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    flaky = LoadFailure(version="1.0.0", times=1)  # the first load fails, on every device
    with (
        bundle_server(broker, v.served),
        watcher(broker) as fleet,
        simulated(broker, keys, tmp_path / "state", devices=3, failures=[flaky]) as sim,
    ):
        first = deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group=GROUP)
        fleet.publish(TOPICS.group_desired(GROUP), first)
        wait_all(fleet, sim, failed("tiny", "self-test"), "the first, failed load")
        fetched = sim.stats.fetched_bytes
        assert sim.stats.transfers == 3
        mark = len(fleet.events)
        again = deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group=GROUP)
        fleet.publish(TOPICS.group_desired(GROUP), again)
        wait_all(
            fleet,
            sim,
            lambda r: active("tiny", "1.0.0")(r) and r.deployment_id == dep_id(again),
            "1.0.0 again",
        )
        for d in sim.devices:
            assert phases(fleet, d.id, mark) == [
                Phase.PENDING,
                Phase.VERIFYING,
                Phase.LOADING,
                Phase.ACTIVE,
            ]
        assert (sim.stats.transfers, sim.stats.not_fetched) == (3, 3)
        assert sim.stats.fetched_bytes == fetched


def test_a_reissued_descriptor_brings_a_kept_bundle_back_without_fetching_it(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    now = datetime.now(timezone.utc)
    original = descriptor_to_reissue(v.envelopes["1.0.0"], keys.state(now), now)
    back = reissue_descriptor(original, [keys.release], release=3_000_000, now=now, days=30)
    again = reissue_descriptor(original, [keys.release], release=4_000_000, now=now, days=30)
    group = TOPICS.group_desired(GROUP)

    def publish(envelope: bytes, sequence: int) -> None:
        fleet.publish(
            group, deployment({"tiny": envelope}, keys.release, group=GROUP, sequence=sequence)
        )

    def serving(version: str, release: int) -> Callable[[Reported], bool]:
        return lambda r: active("tiny", version)(r) and r.models["tiny"].release == release

    with (
        bundle_server(broker, v.served),
        watcher(broker) as fleet,
        simulated(broker, keys, tmp_path / "state", devices=3) as sim,
    ):
        publish(v.envelopes["1.0.0"], 1)
        wait_all(fleet, sim, serving("1.0.0", 1_000_000), "1.0.0")
        publish(v.envelopes["2.0.0"], 2)
        wait_all(fleet, sim, serving("2.0.0", 2_000_000), "2.0.0")
        publish(back, 3)  # the rollback the fleet wants: 1.0.0's bytes as release 3000000
        wait_all(fleet, sim, serving("1.0.0", 3_000_000), "1.0.0 re-issued")
        assert (sim.stats.transfers, sim.stats.not_fetched) == (6, 3)  # nothing fetched again
        publish(again, 4)  # the version that runs, re-issued: its release rises in place
        wait_all(fleet, sim, serving("1.0.0", 4_000_000), "1.0.0 re-issued again")
        publish(v.envelopes["1.0.0"], 5)  # the original descriptor: below the floor now
        wait_all(
            fleet, sim, lambda r: r.error is not None and r.error.code == "rollback", "refused"
        )
        assert sim.stats.transfers == 6


def test_telemetry_says_what_each_version_is_set_to(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    metrics = {
        "1.0.0": {"rps": 20.0, "error_rate": 0.0, "p99_ms": 20.0},
        "2.0.0": {"rps": 20.0, "error_rate": 0.25, "p99_ms": 80.0},
    }
    with (
        bundle_server(broker, v.served),
        watcher(broker) as fleet,
        simulated(
            broker, keys, tmp_path / "state", devices=2, telemetry_interval_s=0.2, metrics=metrics
        ) as sim,
    ):
        fleet.session.subscribe(TOPICS.all_devices_filter("telemetry"))
        for version in ("1.0.0", "2.0.0"):
            fleet.publish(
                TOPICS.group_desired(GROUP),
                deployment({"tiny": v.envelopes[version]}, keys.release, group=GROUP),
            )
            wait_all(fleet, sim, active("tiny", version), version)
            mark = len(fleet.raw)
            for d in sim.devices:
                found = _telemetry(fleet, d.id, mark)
                rps = found["model.tiny.rps"]
                assert 18.0 <= rps <= 22.0
                rate = metrics[version]["error_rate"]
                assert found["model.tiny.errors_per_s"] == pytest.approx(rps * rate, abs=0.01)
                p99 = metrics[version]["p99_ms"]
                assert 0.9 * p99 <= found["model.tiny.p99_ms"] <= 1.1 * p99


def _telemetry(fleet: Watcher, device: str, since: int) -> dict[str, float]:
    deadline = time.monotonic() + WAIT
    topic = TOPICS.device(device).telemetry
    while time.monotonic() < deadline:
        for item in fleet.raw[since:]:
            if item.topic == topic:
                return Telemetry.from_bytes(item.payload).metrics
        fleet._drain(0.1)
    raise AssertionError(f"no telemetry from {device}")


def test_devices_with_their_own_certificates_work_under_the_shipped_acl(
    tmp_path: Path, keys: Keys, signed: Callable[..., tuple[Path, bytes]]
) -> None:
    v = two_versions(tmp_path, signed)
    ids = ["sim-00000", "sim-00001", "sim-00002"]
    certs = make_certs(tmp_path / "certs", *ids)
    doc = deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group=GROUP)
    with (
        tls_broker(tmp_path, certs) as broker,
        bundle_server(broker, v.served),
        watcher(broker) as fleet,
    ):
        device_side = mqtt_settings(broker, "fleet").model_copy(
            update={"cert_file": None, "key_file": None}
        )
        sim = Simulator(
            make_settings({"devices": 3, "groups": [GROUP], "load_s": 0.05}),
            device_side,
            load_trust(keys.dir, datetime.now(timezone.utc)),
            topics=TOPICS,
            state_dir=tmp_path / "state",
            cert_dir=certs,
        )
        stop = threading.Event()
        thread = threading.Thread(target=sim.run, args=(stop,), daemon=True)
        thread.start()
        try:
            fleet.publish(TOPICS.group_desired(GROUP), doc)
            for device in ids:  # reported, online and blocks all passed the ACL of their own
                fleet.wait(device, active("tiny", "1.0.0"), what="1.0.0 under the ACL")
                assert fleet.view.devices[device].online
                assert f"as {device} (p5, c0, k5, u'{device}')" in broker.log()  # its own CN
        finally:
            stop.set()
            thread.join(15)
        assert not thread.is_alive()
    with pytest.raises(ConfigError, match="need TLS"):
        Simulator(
            make_settings({}),
            device_side.model_copy(update={"tls": False}),
            load_trust(keys.dir, datetime.now(timezone.utc)),
            topics=TOPICS,
            state_dir=tmp_path / "state",
            cert_dir=certs,
        )


def test_devices_try_the_next_broker_node_when_the_first_is_down(
    tmp_path: Path, broker: Broker, keys: Keys
) -> None:
    down = free_port()  # nothing listens there
    settings = mqtt_settings(broker).model_copy(
        update={"port": down, "failover": [f"{broker.host}:{broker.port}"]}
    )
    sim = Simulator(
        make_settings({"devices": 3}),
        settings,
        load_trust(keys.dir, datetime.now(timezone.utc)),
        topics=TOPICS,
        state_dir=tmp_path / "state",
    )
    stop = threading.Event()
    thread = threading.Thread(target=sim.run, args=(stop,), daemon=True)
    with watcher(broker) as fleet:
        thread.start()
        try:
            wait_until(
                lambda: all(fleet.online(d.id) for d in sim.devices),
                WAIT,
                interval=0,
                message="the devices did not reach the second node",
            )
        finally:
            stop.set()
            thread.join(15)
    assert sim.stats.connects == 3


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "edge-fleet"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_edge_fleet_simulate_runs_devices_and_refuses_bad_options(
    tmp_path: Path, broker: Broker, keys: Keys
) -> None:
    common = ["--no-tls", "--broker", f"{broker.host}:{broker.port}", "--trust", str(keys.dir)]
    bad = _cli("simulate", *common, "--hardware", "tpu=1")
    assert bad.returncode == 2
    assert "no hardware profile tpu" in bad.stderr, bad.stderr
    bad = _cli("simulate", *common, "--fail-load", "*", "--fail-code", "oops")
    assert bad.returncode == 2
    assert "'oops' is not one of" in bad.stderr, bad.stderr
    with watcher(broker) as fleet:
        done = _cli(
            "simulate", *common, "--devices", "3", "--id-prefix", "cli", "--duration", "3", "--json"
        )
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout.strip().splitlines()[-1])
        assert (stats["devices"], stats["connects"]) == (3, 3)
        fleet._drain(0.5)
        for device in ("cli-00000", "cli-00001", "cli-00002"):
            view = fleet.view.devices[device]
            assert view.online is False  # online while it ran, offline once it stopped
            assert view.reported is not None
            assert view.reported.models == {}
        onlines = [
            Online.from_bytes(i.payload).state
            for i in fleet.raw
            if i.topic == TOPICS.device("cli-00000").online
        ]
        assert onlines == ["online", "offline"]
