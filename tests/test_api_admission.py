"""Admission control, authentication and the listeners' life cycle, each on a server of its own.

Memory readings are injected (the reader is a parameter of the API) so a test can put the box
"above the threshold"; a full queue is made with ``Gated``, a real ONNX Runtime model whose
``infer`` waits for the test to open a gate (a real model cannot be made slow on demand).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pydantic
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent.errors import ConfigError
from agent.serving.admission import SystemMemory
from agent.serving.api import ApiSettings, InferenceApi
from agent.serving.server import ApiServer
from agent.serving.source import StaticSource
from agent.testing.models import make_onnx, reference
from agent.testing.wait import wait_until
from tests.test_api import (
    WAIT,
    Api,
    Gated,
    OrtModel,
    Reply,
    good_x,
    json_request,
    metric_values,
    start_api,
)

TOKEN = "s3cret-token-for-tests-0123"


def infer_in_thread(api: Api, results: list[Reply]) -> threading.Thread:
    def run() -> None:
        results.append(api.infer_json("gated", json_request(good_x(1))))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_onnx(tmp_path / "tiny.onnx")


def test_memory_above_threshold_answers_503_with_retry_after(tmp_path: Path, tiny: Path) -> None:
    reading: dict[str, float | None] = {"ram": 0.5, "gpu": None}
    with start_api(
        tmp_path,
        [OrtModel(tiny, "tiny")],
        memory=lambda: reading["ram"],
        gpu_memory=lambda: reading["gpu"],
        retry_after_s=3,
    ) as api:
        request = json_request(good_x(1))
        assert api.infer_json("tiny", request).status == 200

        reading["ram"] = 0.85
        reply = api.infer_json("tiny", request)
        assert reply.status == 503
        assert reply.headers["retry-after"] == "3"
        assert "memory use 85% is above the threshold 80%" in reply.json()["error"]
        # Health and metadata still answer: only inference is shed.
        assert api.request("GET", "/v2/health/ready").status == 200
        assert api.request("GET", "/v2/models/tiny").status == 200

        reading["ram"] = 0.5
        assert api.infer_json("tiny", request).status == 200

        reading["gpu"] = 0.95
        reply = api.infer_json("tiny", request)
        assert reply.status == 503
        assert reply.headers["retry-after"] == "3"
        assert "GPU memory use 95%" in reply.json()["error"]

        reading["gpu"] = 0.2
        assert api.infer_json("tiny", request).status == 200

        metrics = metric_values(api.request("GET", "/metrics").body.decode())
        assert metrics['edge_agent_inference_requests_total{model="tiny",outcome="rejected"}'] == 2
        assert metrics['edge_agent_inference_errors_total{model="tiny",reason="memory"}'] == 1
        assert metrics['edge_agent_inference_errors_total{model="tiny",reason="gpu-memory"}'] == 1


def test_full_queue_answers_503_with_retry_after(tmp_path: Path, tiny: Path) -> None:
    gated = Gated(tiny, "gated")
    with start_api(tmp_path, [gated], workers=1, max_queue=1) as api:
        results: list[Reply] = []
        first = infer_in_thread(api, results)
        assert gated.entered.acquire(timeout=WAIT)  # running on the one worker
        second = infer_in_thread(api, results)
        wait_until(
            lambda: api.app.admission.depth == 2,
            WAIT,
            interval=0.005,
            message="the second request to be queued",
        )
        try:
            reply = api.infer_json("gated", json_request(good_x(1)))
            assert reply.status == 503
            assert reply.headers["retry-after"] == "1"
            assert "queue is full" in reply.json()["error"]
        finally:
            gated.gate.set()
            first.join(WAIT)
            second.join(WAIT)
        assert [r.status for r in results] == [200, 200]
        assert gated.entered.acquire(timeout=WAIT)  # the queued one ran after the first
        assert api.infer_json("gated", json_request(good_x(1))).status == 200

        metrics = metric_values(api.request("GET", "/metrics").body.decode())
        assert metrics['edge_agent_inference_errors_total{model="gated",reason="queue-full"}'] == 1
        assert metrics["edge_agent_inference_queue_capacity"] == 2


def test_bearer_token_is_enforced(tmp_path: Path, tiny: Path) -> None:
    with start_api(tmp_path, [OrtModel(tiny, "tiny")], token=TOKEN) as api:
        # Health stays open (probes need no secret).
        assert api.request("GET", "/v2/health/live", auth=False).status == 200
        assert api.request("GET", "/v2/health/ready", auth=False).status == 200
        paths = (
            "/v2",
            "/v2/models/tiny",
            "/v2/models/tiny/ready",
            "/metrics",
            "/v2/models",
            "/v2/models/tiny/config",
            "/v2/models/stats",
            "/v2/models/tiny/versions/1.0.0/stats",
        )
        for path in paths:
            reply = api.request("GET", path, auth=False)
            assert reply.status == 401, path
            assert reply.headers["www-authenticate"].startswith("Bearer")
            assert "bearer token is required" in reply.json()["error"]
            wrong = api.request("GET", path, headers={"Authorization": "Bearer nope"})
            assert wrong.status == 401
            assert api.request("GET", path).status == 200
        index = api.request("POST", "/v2/repository/index", b"", auth=False)
        assert index.status == 401
        assert api.request("POST", "/v2/repository/index", b"").status == 200
        reply = api.infer_json("tiny", json_request(good_x(1)), auth=False)
        assert reply.status == 401
        reply = api.infer_json("tiny", json_request(good_x(1)), auth=False, unix=True)
        assert reply.status == 401
        reply = api.infer_json(
            "tiny", json_request(good_x(1)), headers={"Authorization": f"Basic {TOKEN}"}
        )
        assert reply.status == 401

        x = good_x(2)
        with api.client() as client:
            assert client.is_server_live()
            with pytest.raises(InferenceServerException) as info:
                client.get_server_metadata()
            assert info.value.status() == "401"
            tensor = triton.InferInput("x", [2, 16], "FP32")
            tensor.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException) as info:
                client.infer("tiny", [tensor])
            assert info.value.status() == "401"
            result = client.infer("tiny", [tensor], headers=api.auth_headers())
            np.testing.assert_allclose(
                result.as_numpy("y"), reference(tiny, x), rtol=1e-5, atol=1e-6
            )
            meta = client.get_server_metadata(headers=api.auth_headers())
            assert meta["name"] == "edge-model-agent"
            for call in (
                client.get_model_repository_index,
                lambda **kw: client.get_model_config("tiny", **kw),
                lambda **kw: client.get_inference_statistics("tiny", **kw),
            ):
                with pytest.raises(InferenceServerException) as info:
                    call()
                assert info.value.status() == "401"
                assert call(headers=api.auth_headers())


def test_model_not_ready_answers_503_and_ready_says_no(tmp_path: Path, tiny: Path) -> None:
    class Warming(StaticSource):
        """A source that lists a model whose first version is still loading."""

        def names(self) -> list[str]:
            return [*super().names(), "warming"]

    source = Warming([OrtModel(tiny, "tiny")])
    settings = ApiSettings(port=0, unix_socket=None)
    server = ApiServer(InferenceApi(source, settings, memory=lambda: 0.1), settings)
    server.start()
    try:
        assert server.tcp_address is not None
        api = Api(server, server.app, source)  # type: ignore[arg-type]
        reply = api.infer_json("warming", json_request(good_x(1)))
        assert reply.status == 503
        assert reply.headers["retry-after"] == "1"
        assert "model 'warming' is not ready" in reply.json()["error"]
        assert api.request("GET", "/v2/models/warming/ready").status == 400
        assert api.request("GET", "/v2/health/ready").status == 400  # not every model is ready
        assert api.request("GET", "/v2/models/tiny/ready").status == 200
        assert api.request("GET", "/v2/models").json() == [
            {"name": "tiny", "version": "1.0.0", "state": "READY"},
            {"name": "warming", "state": "UNAVAILABLE", "reason": "no version is loaded"},
        ]
        ready = api.request("POST", "/v2/repository/index", b'{"ready": true}')
        assert [m["name"] for m in ready.json()] == ["tiny"]
        assert api.request("GET", "/v2/models/warming/config").status == 503
        assert api.infer_json("tiny", json_request(good_x(1))).status == 200
        metrics = metric_values(api.request("GET", "/metrics").body.decode())
        assert metrics['edge_agent_inference_errors_total{model="warming",reason="not-ready"}'] == 1
        assert not any("warming" in key for key in metrics if key.startswith("edge_agent_model_"))
    finally:
        server.stop()


def test_a_new_version_in_the_source_is_served(tmp_path: Path, tiny: Path) -> None:
    """What a swap looks like from outside: metadata, answers and the active gauge follow the
    source; the old version's routes are 404; the old model is idle once requests end."""
    old = OrtModel(tiny, "tiny", "1.0.0")
    tiny2 = make_onnx(tmp_path / "tiny2.onnx", seed=2)
    with start_api(tmp_path, [old]) as api:
        x = good_x(2)
        assert api.infer_json("tiny", json_request(x)).json()["model_version"] == "1.0.0"
        assert api.source.put(OrtModel(tiny2, "tiny", "1.1.0")) is old
        assert api.source.wait_idle(old, timeout=WAIT)

        reply = api.infer_json("tiny", json_request(x))
        assert reply.json()["model_version"] == "1.1.0"
        y = np.array(reply.json()["outputs"][0]["data"], np.float32).reshape(2, 8)
        np.testing.assert_allclose(y, reference(tiny2, x), rtol=1e-5, atol=1e-6)
        assert api.request("GET", "/v2/models/tiny").json()["versions"] == ["1.1.0"]
        assert api.request("GET", "/v2/models/tiny/versions/1.0.0").status == 404
        reply = api.request("POST", "/v2/models/tiny/versions/1.0.0/infer", b"{}")
        assert reply.status == 404
        assert "the active version is 1.1.0" in reply.json()["error"]
        metrics = metric_values(api.request("GET", "/metrics").body.decode())
        active = [k for k in metrics if k.startswith("edge_agent_model_active")]
        assert active == [
            'edge_agent_model_active{model="tiny",version="1.1.0",platform="onnxruntime_onnx"}'
        ]
        assert metrics['edge_agent_inference_errors_total{model="tiny",reason="not-found"}'] == 1


def test_stop_lets_in_flight_requests_finish(tmp_path: Path, tiny: Path) -> None:
    gated = Gated(tiny, "gated")
    with start_api(tmp_path, [gated]) as api:
        assert api.server.tcp_address is not None
        port = api.server.tcp_address[1]
        sock_path = api.server.unix_socket
        assert sock_path is not None
        results: list[Reply] = []
        request = infer_in_thread(api, results)
        assert gated.entered.acquire(timeout=WAIT)
        stopper = threading.Thread(target=api.server.stop)
        stopper.start()

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, WAIT, interval=0.005, message="the listener to close")
        gated.gate.set()
        request.join(WAIT)
        stopper.join(WAIT)
        assert not stopper.is_alive()
        assert [r.status for r in results] == [200]
        assert not sock_path.exists()
        assert not api.server.running


def test_unix_socket_stale_replaced_live_refused(tmp_path: Path, tiny: Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves
    with start_api(tmp_path, [OrtModel(tiny, "tiny")]) as api:
        assert api.request("GET", "/v2/health/ready", unix=True).status == 200

        second = ApiServer(InferenceApi(StaticSource()), ApiSettings(port=None, unix_socket=path))
        with pytest.raises(ConfigError, match="another process answers"):
            second.start()
        assert api.server.tcp_address is not None
        busy_port = ApiSettings(port=api.server.tcp_address[1], unix_socket=None)
        with pytest.raises(ConfigError, match="cannot listen"):
            ApiServer(InferenceApi(StaticSource()), busy_port).start()
        assert api.request("GET", "/v2/health/ready", unix=True).status == 200

    assert not path.exists()
    plain = tmp_path / "not-a-socket"
    plain.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        ApiServer(InferenceApi(StaticSource()), ApiSettings(port=None, unix_socket=plain)).start()
    assert plain.read_text() == "keep me"


def test_settings_defaults_and_refusals() -> None:
    settings = ApiSettings()
    assert settings.host == "127.0.0.1"
    assert settings.unix_socket == Path("/run/edge-agent/api.sock")
    assert settings.unix_socket_mode == 0o660
    assert settings.memory_threshold == 0.8
    assert settings.token is None
    assert settings.max_batch_size == 1024
    with pytest.raises(pydantic.ValidationError):
        ApiSettings(max_batch_size=0)
    with pytest.raises(pydantic.ValidationError, match="absolute"):
        ApiSettings(unix_socket=Path("api.sock"))
    with pytest.raises(pydantic.ValidationError, match="at least 16"):
        ApiSettings(token="short")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError):
        ApiSettings(memory_threshold=1.5)
    with pytest.raises(ConfigError, match="TCP port or a Unix socket"):
        ApiServer(InferenceApi(StaticSource()), ApiSettings(port=None, unix_socket=None))


# -- the memory reader ---------------------------------------------------------------------


def _fake_box(tmp: Path, *, cgroup_line: str, limits: dict[str, str], current: int) -> SystemMemory:
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(
        "MemTotal:        1000000 kB\nMemFree:          100000 kB\nMemAvailable:     600000 kB\n"
    )
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    root = tmp / "cgroup"
    own = root / "system.slice" / "edge-agent.service"
    own.mkdir(parents=True)
    for rel, value in limits.items():
        (root / rel / "memory.max").write_text(value + "\n")
    (own / "memory.current").write_text(f"{current}\n")
    (own / "memory.stat").write_text("anon 1000\nfile 5000\ninactive_file 100000000\n")
    return SystemMemory(proc=proc, cgroup_root=root, ttl_s=0)


def test_memory_reader_uses_ram_or_a_lower_cgroup_limit(tmp_path: Path) -> None:
    # RAM alone: 1 - 600000/1000000.
    ram_only = _fake_box(
        tmp_path / "a", cgroup_line="0::/system.slice/edge-agent.service", limits={}, current=0
    )
    assert ram_only() == pytest.approx(0.4)

    # A limit on the parent slice below the RAM size: working set (current - inactive_file)
    # over the tightest limit on the way up: (450 MB - 100 MB) / 500 MB.
    limited = _fake_box(
        tmp_path / "b",
        cgroup_line="0::/system.slice/edge-agent.service",
        limits={"system.slice": "500000000", "system.slice/edge-agent.service": "max"},
        current=450_000_000,
    )
    assert limited() == pytest.approx(0.7)

    # A limit above the RAM size changes nothing; cgroup v1 lines are ignored.
    loose = _fake_box(
        tmp_path / "c",
        cgroup_line="0::/system.slice/edge-agent.service",
        limits={"system.slice/edge-agent.service": str(10**13)},
        current=10**12,
    )
    assert loose() == pytest.approx(0.4)
    v1 = _fake_box(
        tmp_path / "d",
        cgroup_line="4:memory:/system.slice/edge-agent.service",
        limits={"system.slice": "500000000"},
        current=450_000_000,
    )
    assert v1() == pytest.approx(0.4)

    assert SystemMemory(proc=tmp_path / "nowhere")() is None


def test_memory_reader_caches_for_its_ttl(tmp_path: Path) -> None:
    box = _fake_box(
        tmp_path, cgroup_line="0::/system.slice/edge-agent.service", limits={}, current=0
    )
    now = [100.0]
    reader = SystemMemory(
        proc=tmp_path / "proc", cgroup_root=tmp_path / "cgroup", ttl_s=1.0, clock=lambda: now[0]
    )
    assert box() == reader() == pytest.approx(0.4)
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 100 kB\n")
    assert reader() == pytest.approx(0.4)
    now[0] += 1.5
    assert reader() == pytest.approx(0.9)
