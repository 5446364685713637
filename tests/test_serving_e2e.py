"""From a deployment over MQTT to an answer on the local inference API, and across a restart.

A real mosquitto, a bundle server and a device agent with its API on a free loopback port;
tritonclient is the application.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import tritonclient.http as triton

from agent.serving.api import ApiSettings
from agent.testing.broker import Broker
from agent.testing.fleet import (
    TOPICS,
    active,
    agent,
    agent_config,
    bundle_server,
    deployment,
    two_versions,
    watcher,
)
from agent.testing.models import reference
from agent.testing.wait import wait_until
from agent.transport.messages import Phase
from tests.conftest import Keys


def _client(device) -> triton.InferenceServerClient:  # type: ignore[no-untyped-def]
    """A client of the agent's API, once its loop has started it."""
    wait_until(
        lambda: device.api is not None and device.api.tcp_address is not None,
        10.0,
        interval=0.05,
        message="the agent's API did not start",
    )
    assert device.api is not None
    assert device.api.tcp_address is not None
    host, port = device.api.tcp_address
    return triton.InferenceServerClient(f"{host}:{port}")


def _infer(client: triton.InferenceServerClient, x: np.ndarray) -> tuple[str, np.ndarray]:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer(
        "tiny", [tensor], outputs=[triton.InferRequestedOutput("y", binary_data=True)]
    )
    return result.get_response()["model_version"], result.as_numpy("y")


def test_deployed_model_answers_on_the_local_api_and_swaps_without_a_failed_request(
    tmp_path: Path, broker: Broker, keys: Keys, signed
) -> None:  # type: ignore[no-untyped-def]
    two = two_versions(tmp_path, signed)
    served, models = two.served, two.models
    e1, e2 = two.envelopes["1.0.0"], two.envelopes["2.0.0"]
    config = agent_config(tmp_path / "cam-01", keys.dir, broker, "cam-01").model_copy(
        update={"api": ApiSettings(port=0, unix_socket=tmp_path / "api.sock")}
    )
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    want = {v: reference(m, x) for v, m in models.items()}
    desired = TOPICS.device("cam-01").desired
    with watcher(broker) as fleet, bundle_server(broker, served), agent(config) as device:
        fleet.publish(desired, deployment({"tiny": e1}, keys.release, device="cam-01", sequence=1))
        reported = fleet.wait("cam-01", active("tiny", "1.0.0"))
        assert reported.models["tiny"].runtime is not None
        assert reported.models["tiny"].runtime.startswith("onnxruntime")
        client = _client(device)
        assert client.is_model_ready("tiny")
        version, y = _infer(client, x)
        assert version == "1.0.0"
        np.testing.assert_allclose(y, want["1.0.0"], rtol=1e-5, atol=1e-5)

        stop = threading.Event()
        seen: list[str] = []
        failures: list[BaseException] = []

        def stream() -> None:
            own = _client(device)
            for _ in range(100_000):
                if stop.is_set():
                    return
                try:
                    v, out = _infer(own, x)
                except BaseException as exc:
                    failures.append(exc)
                    return
                if not np.allclose(out, want[v], rtol=1e-5, atol=1e-5):
                    failures.append(AssertionError(f"an answer of {v} is not {v}'s"))
                seen.append(v)

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            fleet.publish(
                desired, deployment({"tiny": e2}, keys.release, device="cam-01", sequence=2)
            )
            fleet.wait("cam-01", active("tiny", "2.0.0"))
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert failures == []
        assert {"1.0.0", "2.0.0"} <= set(seen)
        assert _infer(client, x)[0] == "2.0.0"

        # Events travel through the device's store-and-forward queue: wait for the second
        # `active`, then read the swap's phases between the last `pending` and it.
        def actives() -> int:
            return sum(1 for e in fleet.events if e.model == "tiny" and e.phase == Phase.ACTIVE)

        fleet.wait_event(lambda e: actives() >= 2, what="the second active")
        phases = [e.phase for e in fleet.events if e.kind == "phase" and e.model == "tiny"]
        last_pending = len(phases) - 1 - phases[::-1].index(Phase.PENDING)
        assert phases[last_pending:] == [
            Phase.PENDING,
            Phase.DOWNLOADING,
            Phase.VERIFYING,
            Phase.UNPACKING,
            Phase.LOADING,
            Phase.WARMING,
            Phase.SELF_TESTING,
            Phase.PROBATION,
            Phase.ACTIVE,
        ]

    # Restarted, the agent serves the committed version before any message arrives.
    with agent(config) as device:
        client = _client(device)
        for _ in range(200):
            if client.is_model_ready("tiny"):
                break
            threading.Event().wait(0.05)
        version, y = _infer(client, x)
    assert version == "2.0.0"
    np.testing.assert_allclose(y, want["2.0.0"], rtol=1e-5, atol=1e-5)
