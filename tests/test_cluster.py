"""The protocol on a clustered broker: three nats-server nodes, nothing of mosquitto.

NATS speaks MQTT 3.1.1 only, so every part runs on 3.1.1: the bundle servers subscribe to the
plain request filter (no shared subscription), and each answers every block request; the device
keeps the first copy of a block and drops the rest. Sessions, retained messages and QoS 1
deliveries live in JetStream, replicated across the nodes, so they survive the node that held
them. Each part connects to its own node and everything between them crosses the cluster's
routes.

Skipped only where nats-server is not installed (``make test`` installs it).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.testing.fleet import (
    TOPICS,
    WAIT,
    active,
    agent,
    agent_config,
    bundle_server,
    deployment,
    downloading_past,
    mqtt_settings,
    serve_copy,
    watcher,
)
from agent.testing.models import make_onnx
from agent.testing.wait import wait_until
from agent.transport.fetch import TransferSettings
from agent.transport.session import InboxItem, Incoming, Session
from tests.cluster import Cluster, nats_binary, nats_cluster, nats_version
from tests.conftest import Keys

pytestmark = pytest.mark.skipif(
    nats_binary() is None, reason="nats-server is not installed (make test installs it)"
)

V311 = "3.1.1"  # all NATS speaks
BLOCK = 4096
# After a node dies, nats-server 2.9 takes some 5-15 s to elect new leaders for the streams and
# consumers it led; meanwhile it holds QoS 1 messages and subscriptions, and drops clients whose
# publish it could not store within 4 s. The waits that span it are this long (the test takes
# only as long as the outage does).
OUTAGE = 60.0
# Lost requests are asked again soon; a transfer stalls only when nothing serves it for long.
TRANSFER = TransferSettings(window=8, request_timeout_s=1.0, stall_timeout_s=OUTAGE)
SLOW = 512 << 10  # bytes/s per server: a 1 MiB bundle takes about two seconds


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the module (its first MQTT client waits for JetStream to make the
    streams MQTT keeps its state in); each test uses device ids of its own."""
    with nats_cluster(tmp_path_factory.mktemp("cluster"), 3) as c:
        yield c


@pytest.fixture
def cluster(nats: Cluster) -> Cluster:
    """The cluster with every node up, whatever an earlier test left."""
    for node in nats.nodes:
        if not node.running:
            node.spawn()
    nats.wait_ready()
    return nats


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    d = tmp_path / "served"
    d.mkdir()
    return d


@pytest.fixture
def big_model(tmp_path: Path) -> Path:
    """About 1 MiB of weights: some 260 blocks of 4 KiB."""
    return make_onnx(tmp_path / "big.onnx", inputs=512, outputs=512, seed=7)


def test_deploy_and_swap_through_the_cluster_and_survive_a_bundle_servers_node(
    tmp_path: Path, cluster: Cluster, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    one, two, three = cluster.nodes
    device = "cam-01"
    desired = TOPICS.device(device).desired
    small = serve_copy(signed("1.0.0", block_size=BLOCK, samples="none"), bundles)
    big = serve_copy(signed("2.0.0", models=[big_model], block_size=BLOCK, samples="none"), bundles)
    config = agent_config(
        tmp_path / device, keys.dir, one, device, protocol=V311, transfer=TRANSFER
    )
    with (
        bundle_server(two, bundles, protocol=V311, rate_bytes_s=SLOW, name="server-2") as on_two,
        bundle_server(
            three, bundles, protocol=V311, rate_bytes_s=SLOW, name="server-3"
        ) as on_three,
        watcher(two, protocol=V311, name="publisher") as publisher,
        watcher(three, protocol=V311) as fleet,
        agent(config) as dev,
    ):
        # Version 1: the document goes in on node 2, the device reads it on node 1, its
        # reports come out on node 3.
        publisher.publish(desired, deployment({"tiny": small}, keys.release, device=device))
        fleet.wait(device, active("tiny", "1.0.0"), what="1.0.0 active")

        # Version 2, a swap; node 2 (one server's, and the publisher's) dies mid-transfer.
        publisher.publish(desired, deployment({"tiny": big}, keys.release, device=device))
        fleet.wait(device, downloading_past("tiny", 20), what="a fifth of 2.0.0 downloaded")
        transfer = dev.rollouts["tiny"].transfer
        assert transfer is not None
        two.kill()
        at_kill = transfer.have_count
        assert 0 < at_kill < transfer.count, "killed mid-transfer"
        reported = fleet.wait(device, active("tiny", "2.0.0"), OUTAGE, "2.0.0 active")
        assert reported.models["tiny"].error is None
        assert transfer.have_count == transfer.count
        # Both servers answered every request until the kill (3.1.1: no shared subscription);
        # the device wrote each block once and dropped the second copy.
        assert transfer.duplicates > 0
        assert transfer.bad_blocks == 0

        # Node 2 comes back: it serves the retained state the cluster kept while it was away,
        # and its bundle server and the publisher reconnect to it.
        two.start()
        cluster.wait_ready()
        publisher.wait(device, active("tiny", "2.0.0"), OUTAGE, "2.0.0 seen on node 2 again")
        wait_until(
            lambda: any(c.startswith("server-2-") for c in two.mqtt_clients()),
            WAIT,
            interval=0.05,
            message="the bundle server is back on node 2",
        )
    assert on_three[0].stats.blocks > 0
    assert on_two[0].stats.connects >= 2
    # The device may have been dropped by its own node meanwhile: nats-server closes a client
    # whose QoS 1 publish JetStream did not store within 4 s, as happens while the streams that
    # node 2 led elect new leaders. It came back to node 1, its only node, and went on.
    assert dev.session.endpoint == (one.host, one.port)


def test_a_device_whose_node_dies_resumes_on_another_node(
    tmp_path: Path, cluster: Cluster, keys: Keys, signed, big_model: Path, bundles: Path
) -> None:
    one, two, three = cluster.nodes
    device = "cam-02"
    desired = TOPICS.device(device).desired
    envelope = serve_copy(
        signed("1.0.0", models=[big_model], block_size=BLOCK, samples="none"), bundles
    )
    config = agent_config(
        tmp_path / device,
        keys.dir,
        one,
        device,
        protocol=V311,
        transfer=TRANSFER,
        failover=[two, three],
    )
    with (
        bundle_server(three, bundles, protocol=V311, rate_bytes_s=SLOW) as served,
        watcher(three, protocol=V311) as fleet,
        agent(config) as dev,
    ):
        fleet.publish(desired, deployment({"tiny": envelope}, keys.release, device=device))
        fleet.wait(device, downloading_past("tiny", 20), what="a fifth downloaded")
        transfer = dev.rollouts["tiny"].transfer
        assert transfer is not None
        one.kill()
        at_kill = transfer.have_count
        assert 0 < at_kill < transfer.count, "killed mid-transfer"
        fleet.wait(device, active("tiny", "1.0.0"), OUTAGE, "active after its node died")
        assert dev.session.endpoint in ((two.host, two.port), (three.host, three.port))
        assert dev.session.connects >= 2  # more than once if its new node dropped it too
        assert transfer.have_count == transfer.count, "the same transfer went on"
        assert device in two.mqtt_clients() | three.mqtt_clients()
        one.start()
        cluster.wait_ready()
        # No will went out when node 1 died (that node held it); the device said "online"
        # again from its new node.
        assert fleet.online(device) is True
    assert served[0].stats.blocks > 0


def test_a_device_id_with_a_dot(
    tmp_path: Path,
    cluster: Cluster,
    keys: Keys,
    signed,
    bundles: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ids may contain '.', a NATS subject's separator. nats-server maps '.' in a topic to '//'
    since 2.10. 2.9 refuses such topics: for the will's, at CONNECT, it closes the connection
    without a CONNACK (3.1.1 has no reason code to give); the agent says so and keeps trying."""
    one, two, _ = cluster.nodes
    device = "cam.03"
    envelope = serve_copy(signed("1.0.0", block_size=BLOCK, samples="none"), bundles)
    config = agent_config(tmp_path / device, keys.dir, one, device, protocol=V311)
    with (
        bundle_server(two, bundles, protocol=V311),
        watcher(two, protocol=V311) as fleet,
        caplog.at_level(logging.WARNING, logger="agent.transport"),
    ):
        if nats_version() >= (2, 10):
            with agent(config):
                fleet.publish(
                    TOPICS.device(device).desired,
                    deployment({"tiny": envelope}, keys.release, device=device),
                )
                fleet.wait(device, active("tiny", "1.0.0"), what="cam.03 active")
        else:
            with agent(config) as dev:
                wait_until(
                    lambda: "without answering the CONNECT" in caplog.text,
                    WAIT,
                    interval=0.05,
                    message="the agent says the broker closed the connection",
                )
                assert dev.session.connects == 0
            assert "characters ' ' and '.' not supported" in one.log()


def test_a_refused_subscription_is_named_and_asked_for_again(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-server refuses a filter with a space (no NATS subject holds one) in its SUBACK, as it
    refuses any while JetStream has no leader for the stream that keeps subscriptions: the
    session says which topic and asks again; the rest of the SUBSCRIBE works meanwhile."""
    inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
    session = Session(
        mqtt_settings(cluster.nodes[0], protocol=V311),
        "refusals",
        inbox,
        subscriptions=["ema-test/a b", "ema-test/ok"],
        persistent=False,
    )
    refused = "broker refused the subscription to ema-test/a b"
    with caplog.at_level(logging.INFO, logger="agent.transport"):
        session.start()
        try:
            wait_until(
                lambda: caplog.text.count(refused) >= 2,
                WAIT,
                interval=0.05,
                message="refused, asked again, refused",
            )
            session.publish("ema-test/ok", b"fine", retain=True).wait_for_publish(5)
            deadline = time.monotonic() + WAIT
            while True:
                item = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
                if isinstance(item, Incoming) and item.topic == "ema-test/ok":
                    break
        finally:
            session.stop()
    assert "subscribing again to ema-test/a b" in caplog.text
    assert "refused the subscription to ema-test/ok" not in caplog.text
    assert session.connects == 1, "a refusal is no reason to reconnect"
