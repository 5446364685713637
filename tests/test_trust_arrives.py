"""A deployment refused for want of trust material is deployed when the trust arrives.

A new box set up with root.json alone (the README's first steps) has no keyring, so it refuses
every deployment (``no trusted keyring``). ``edge-fleet keys publish`` then brings the keyring
on the retained trust topic: the agent verifies the document it refused again, with no restart
and no new document, and says in ``reported`` which root and keyring it trusts now.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent.config import TrustSettings
from agent.testing.broker import Broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    active,
    agent,
    agent_config,
    bundle_server,
    deployment,
    serve_copy,
    watcher,
)
from tests.conftest import Keys

DEVICE = "cam-01"


def test_a_document_refused_for_want_of_a_keyring_is_deployed_once_trust_arrives(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    served = tmp_path / "served"
    served.mkdir()
    envelope = serve_copy(signed("1.0.0"), served)
    config = agent_config(tmp_path / "state", keys.dir, broker, DEVICE).model_copy(
        update={"trust": TrustSettings(root=keys.dir / "root.json", keyring=None)}
    )
    with watcher(broker) as fleet, bundle_server(broker, served), agent(config) as dev:
        fleet.publish(
            TOPICS.device(DEVICE).desired,
            deployment({"tiny": envelope}, keys.release, device=DEVICE),
        )
        refused = fleet.wait(
            DEVICE,
            lambda r: r.error is not None and "no trusted keyring" in r.error.message,
            what="refused: no keyring",
        )
        assert refused.trust is not None
        assert (refused.trust.root_version, refused.trust.keyring_version) == (1, None)
        assert "tiny" not in refused.models
        connects = dev.session.connects

        env = {
            **os.environ,
            "EDGE_FLEET_BROKER": f"{broker.host}:{broker.port}",
            "EDGE_FLEET_TLS": "false",
        }
        done = subprocess.run(
            [str(Path(sys.executable).parent / "edge-fleet"), "keys", "publish", str(keys.dir)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

        reported = fleet.wait(DEVICE, active("tiny", "1.0.0"), what="deployed once trust came")
        assert reported.error is None
        assert reported.trust is not None
        assert reported.trust.keyring_version == 1
        assert reported.trust.keyring_expires is not None
        assert dev.session.connects == connects, "no reconnect needed"


def test_a_refused_document_the_fleet_withdrew_is_not_deployed_when_trust_arrives(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    from agent.transport.messages import TrustUpdate

    served = tmp_path / "served"
    served.mkdir()
    envelope = serve_copy(signed("1.0.0"), served)
    config = agent_config(tmp_path / "state", keys.dir, broker, DEVICE).model_copy(
        update={"trust": TrustSettings(root=keys.dir / "root.json", keyring=None)}
    )
    desired = TOPICS.device(DEVICE).desired
    with watcher(broker) as fleet, bundle_server(broker, served), agent(config) as dev:
        fleet.publish(desired, deployment({"tiny": envelope}, keys.release, device=DEVICE))
        fleet.wait(DEVICE, lambda r: r.error is not None, what="refused: no keyring")
        fleet.publish(desired, b"")  # withdrawn: the retained message cleared
        update = TrustUpdate(keyring=json.loads(keys.store.keyring_bytes()))
        fleet.publish(TOPICS.trust, update.to_bytes())
        reported = fleet.wait(
            DEVICE,
            lambda r: r.trust is not None and r.trust.keyring_version == 1,
            what="the keyring taken",
        )
        assert "tiny" not in reported.models
        assert not dev.documents
