"""``edge-fleet dashboard`` without a browser: the model built from the broker's messages, the
bounded history, the Prometheus exposition (read back with Prometheus' own parser), the
Grafana dashboard's queries, and the web server's access control on a real listener against a
real mosquitto. tests/test_dashboard_browser.py looks at the page itself in chromium.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.errors import ConfigError
from agent.fleet.dashboard import Dashboard, DashboardSettings
from agent.fleet.dashboard.actions import Signing
from agent.fleet.dashboard.history import History
from agent.fleet.dashboard.model import FleetModel, allowed_actions, hardware_class
from agent.fleet.dashboard.prometheus import SERIES, render
from agent.testing.broker import Broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    active,
    bundle_server,
    deployment,
    mqtt_settings,
    simulated,
    two_versions,
    watcher,
)
from agent.testing.wait import wait_until
from agent.transport.messages import (
    DocumentTerms,
    ErrorInfo,
    Event,
    Gate,
    HardwareProfile,
    ModelStatus,
    Online,
    Phase,
    Reported,
    RolloutModel,
    RolloutPlan,
    RolloutState,
    Telemetry,
)
from agent.transport.session import Connection, Incoming
from tests.conftest import Keys

NOW = datetime.now(timezone.utc)
SHA = "ab" * 32
TOKEN = "s3cret-token-for-the-dashboard"


def msg(topic: str, payload: bytes, retain: bool = True) -> Incoming:
    return Incoming(topic, payload, retain)


def reported(device: str, **kw: object) -> Incoming:
    r = Reported(device_id=device, agent_version="1.2.3", at=NOW, **kw)  # type: ignore[arg-type]
    return msg(TOPICS.device(device).reported, r.to_bytes())


def telemetry(device: str, metrics: dict[str, float]) -> Incoming:
    t = Telemetry(device_id=device, at=NOW, metrics=metrics)
    return msg(TOPICS.device(device).telemetry, t.to_bytes(), retain=False)


def event(device: str, seq: int, **kw: object) -> Incoming:
    e = Event(device_id=device, seq=seq, at=NOW, **kw)  # type: ignore[arg-type]
    return msg(TOPICS.device(device).events, e.to_bytes(), retain=False)


def hw(*accelerators: str, cpu: str = "AMD EPYC") -> HardwareProfile:
    return HardwareProfile(
        arch="x86_64",
        cpu_count=4,
        memory_mb=8192,
        accelerators=["cpu", *accelerators],
        details={"cpu": cpu},
    )


def a_rollout(
    rid: str, status: str, published: int = 1, owner: str | None = None
) -> list[Incoming]:
    plan = RolloutPlan(
        rollout_id=rid,
        created=NOW,
        created_by="ops",
        group="lobby",
        models={"tiny": RolloutModel(version="2.0.0", release=2, bundle_sha256=SHA, descriptor={})},
        terms=DocumentTerms(
            deployment_id=rid, sequence=1, issued=NOW, expires=NOW + timedelta(days=1)
        ),
        gate=Gate(wave_timeout_s=60),
        waves=[["cam-1"], ["cam-2", "cam-3"]],
    )
    state = RolloutState(
        rollout_id=rid,
        status=status,  # type: ignore[arg-type]
        published=published,
        owner=owner,
        heartbeat=NOW if owner else None,
        updated=NOW,
    )
    return [
        msg(TOPICS.rollout(rid, "plan"), plan.to_bytes()),
        msg(TOPICS.rollout(rid, "state"), state.to_bytes()),
    ]


def fleet_model() -> FleetModel:
    m = FleetModel(TOPICS)
    m.take(Connection(up=True))
    online = Online(state="online", agent_version="1.2.3", since=NOW)
    for dev in ("cam-1", "cam-2", "cam-3"):
        m.take(msg(TOPICS.device(dev).online, online.to_bytes()))
    m.take(
        reported(
            "cam-1",
            hardware=hw("jetson"),
            groups=["lobby"],
            deployment_id="ro-1",
            models={
                "tiny": ModelStatus(
                    phase=Phase.ACTIVE, version="2.0.0", release=2, bundle_sha256=SHA,
                    variant="onnx-fp16", runtime="onnxruntime 1.20.1 TensorrtExecutionProvider",
                )
            },
        )
    )  # fmt: skip
    m.take(
        reported(
            "cam-2",
            hardware=hw("nvidia-gpu"),
            groups=["lobby"],
            models={"tiny": ModelStatus(phase=Phase.DOWNLOADING, progress=42.5)},
        )
    )
    m.take(
        reported(
            "cam-3",
            hardware=hw(cpu="Intel(R) Core(TM) i5"),
            groups=["lobby", "north"],
            error=ErrorInfo(code="untrusted-key", message='signed by "k1"\nnot in the keyring'),
            models={
                "tiny": ModelStatus(
                    phase=Phase.FAILED,
                    error=ErrorInfo(code="self-test-failed", message="output 3 differs"),
                )
            },
        )
    )
    m.take(
        telemetry(
            "cam-1",
            {
                "cpu.percent": 12.5, "mem.used_mb": 512.0, "mem.percent": 20.0,
                "proc.rss_mb": 48.0, "gpu0.util_pct": 70.0, "gpu0.mem_used_mb": 1024.0,
                "gpu0.temp_c": 61.0, "model.tiny.rps": 30.0, "model.tiny.p99_ms": 8.0,
                "model.tiny.p50_ms": 3.0, "model.tiny.requests": 1200.0, "model.tiny.errors": 2.0,
            },
        )
    )  # fmt: skip
    m.take(event("cam-3", 7, kind="rejected", topic=TOPICS.device("cam-3").desired,
                 error=ErrorInfo(code="untrusted-key", message="no such key")))  # fmt: skip
    for item in a_rollout("ro-1", "running", owner=None):
        m.take(item)
    return m


# -- the model --------------------------------------------------------------------------------
def test_hardware_is_classed_as_a_manager_reads_it() -> None:
    assert hardware_class(hw("jetson", "nvidia-gpu")) == "Jetson"
    assert hardware_class(hw("nvidia-gpu")) == "NVIDIA GPU"
    assert hardware_class(hw("intel-gpu")) == "Intel"
    assert hardware_class(hw(cpu="Intel(R) Xeon(R) Silver")) == "Intel"
    assert hardware_class(hw()) == "CPU"
    assert hardware_class(None) == "?"


def test_rows_carry_what_each_device_reported_and_its_newest_telemetry() -> None:
    m = fleet_model()
    rows = {r["id"]: r for r in m.snapshot()["devices"]}
    assert list(rows) == ["cam-1", "cam-2", "cam-3"]
    one = rows["cam-1"]
    assert one["online"] is True
    assert one["hardware"] == "Jetson"
    assert one["groups"] == ["lobby"]
    assert one["agent"] == "1.2.3"
    [tiny] = one["models"]
    assert tiny["version"] == "2.0.0"
    assert tiny["variant"] == "onnx-fp16"
    assert tiny["phase"] == "active"
    assert tiny["final"] is True
    assert tiny["rps"] == 30.0
    assert tiny["p99_ms"] == 8.0
    assert one["telemetry"] == {"cpu.percent": 12.5, "mem.percent": 20.0, "proc.rss_mb": 48.0}
    assert rows["cam-2"]["models"][0]["progress"] == 42.5
    assert rows["cam-2"]["models"][0]["final"] is False
    three = rows["cam-3"]
    assert three["hardware"] == "Intel"
    assert three["error"] == {
        "code": "untrusted-key",
        "message": 'signed by "k1"\nnot in the keyring',
    }
    assert three["models"][0]["error"]["code"] == "self-test-failed"
    counts = m.counts()
    assert counts == {"devices": 3, "online": 3, "offline": 0, "failing": 1, "updating": 1}


def test_a_device_page_has_its_events_newest_first_and_its_series() -> None:
    m = fleet_model()
    m.take(event("cam-3", 8, kind="phase", model="tiny", phase=Phase.FAILED))
    d = m.device_detail("cam-3")
    assert d is not None
    assert [e["seq"] for e in d["events"]] == [8, 7]
    assert d["events"][1]["error"]["code"] == "untrusted-key"
    one = m.device_detail("cam-1")
    assert one is not None
    assert set(one["series"]) >= {"cpu.percent", "gpu0.util_pct", "model.tiny.rps"}
    assert "model.tiny.requests" not in one["series"]  # a total is not charted
    assert one["hardware_profile"]["accelerators"] == ["cpu", "jetson"]
    assert m.device_detail("nobody") is None


def test_changes_name_only_the_devices_that_changed_since_a_version() -> None:
    m = fleet_model()
    v = m.version
    assert m.changes(v) is None
    m.take(telemetry("cam-2", {"cpu.percent": 99.0}))
    ch = m.changes(v)
    assert ch is not None
    assert [r["id"] for r in ch["devices"]] == ["cam-2"]
    assert ch["devices"][0]["telemetry"]["cpu.percent"] == 99.0
    assert "rollouts" not in ch  # telemetry moves no rollout along
    m.take(reported("cam-2", models={"tiny": ModelStatus(phase=Phase.LOADING)}))
    ch = m.changes(ch["version"])
    assert ch is not None
    assert [r["id"] for r in ch["devices"]] == ["cam-2"]
    assert "rollouts" in ch  # a report does: the page's rollout counts follow it
    v2 = ch["version"]
    for item in a_rollout("ro-2", "paused"):
        m.take(item)
    ch2 = m.changes(v2)
    assert ch2 is not None
    assert ch2["devices"] == []
    assert {r["rollout"] for r in ch2["rollouts"]} == {"ro-1", "ro-2"}


def test_bad_messages_are_named_on_the_device_and_change_nothing_else() -> None:
    m = fleet_model()
    before = m.device_row("cam-1")
    m.take(msg(TOPICS.device("cam-1").telemetry, b"{not json", retain=False))
    m.take(msg(TOPICS.device("cam-1").events, b'{"type": "event"}', retain=False))
    m.take(msg("ema/v1/devices/cam-1/nonsense", b"x"))
    m.take(msg("elsewhere/entirely", b"x"))
    after = m.device_row("cam-1")
    assert after is not None
    assert before is not None
    assert len(after["problems"]) == 2
    assert after["problems"][0].startswith("telemetry: ")
    assert after["models"] == before["models"]
    assert after["telemetry"] == before["telemetry"]


def test_what_may_be_asked_of_a_rollout_follows_its_status_and_its_controller() -> None:
    def st(status: str, published: int = 1) -> RolloutState:
        return RolloutState(rollout_id="r", status=status, published=published, updated=NOW)  # type: ignore[arg-type]

    assert allowed_actions(st("running"), live_owner=True) == ["pause", "abort", "rollback"]
    assert allowed_actions(st("running"), live_owner=False) == [
        "pause", "resume", "abort", "rollback",
    ]  # fmt: skip
    assert allowed_actions(st("paused"), live_owner=True) == ["resume", "abort", "rollback"]
    assert allowed_actions(st("halted", 0), live_owner=False) == ["resume", "abort"]
    assert allowed_actions(st("done"), live_owner=False) == ["rollback"]
    assert allowed_actions(st("rolled-back"), live_owner=False) == []
    assert allowed_actions(st("rolling-back"), live_owner=True) == []
    assert allowed_actions(st("rolling-back"), live_owner=False) == ["resume", "rollback"]
    assert allowed_actions(None, live_owner=False) == []


def test_a_lost_broker_shows_on_the_model() -> None:
    m = fleet_model()
    m.take(Connection(up=False, reason="connection refused"))
    snap = m.snapshot()
    assert snap["broker"] == {"connected": False, "note": "lost: connection refused"}


# -- the history ------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_history_keeps_one_point_per_slot_and_only_the_window() -> None:
    clock = Clock()
    h = History(window_s=100, points=10, clock=clock)  # a slot every 10 s
    for i in range(50):  # a reading a second for 50 s
        h.add("d", {"cpu.percent": float(i)})
        clock.t += 1
    pts = h.series("d")["cpu.percent"]
    assert len(pts) == 5
    assert [v for _, v in pts] == [9.0, 19.0, 29.0, 39.0, 49.0]  # the newest of each slot
    clock.t += 200  # past the window: nothing left to draw
    assert h.series("d") == {}
    h.add("d", {"cpu.percent": 1.0, "model.x.requests": 5.0, "nan.metric": 1.0})
    assert list(h.series("d")) == ["cpu.percent"]


def test_history_is_bounded_in_devices_series_and_points() -> None:
    clock = Clock()
    h = History(window_s=1000, points=20, series=3, devices=4, clock=clock)
    for i in range(100):
        for dev in range(6):
            h.add(f"d{dev}", {f"model.m{k}.rps": float(i) for k in range(5)})
        clock.t += 50
    devices, series, points = h.size()
    assert devices == 4  # the ones that reported least recently went first
    assert series == 4 * 3
    assert points <= 4 * 3 * 20
    assert h.series("d0") == {}
    assert len(h.series("d5")) == 3
    assert float("nan") not in [v for pts in h.series("d5").values() for _, v in pts]
    with pytest.raises(ValueError, match="positive"):
        History(points=1)


# -- Prometheus -------------------------------------------------------------------------------
def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_metrics_read_back_with_prometheus_own_parser() -> None:
    m = fleet_model()
    text = render(m)
    got = families(text)
    assert got["edge_fleet_broker_connected"] == [({}, 1.0)]
    assert ({"state": "online"}, 3.0) in got["edge_fleet_devices"]
    assert ({"device": "cam-1"}, 1.0) in got["edge_fleet_device_online"]
    info = {s[0]["device"]: s[0] for s in got["edge_fleet_device_info"]}
    assert info["cam-1"]["hardware"] == "Jetson"
    assert info["cam-3"]["groups"] == "lobby,north"
    model_info = {s[0]["device"]: s[0] for s in got["edge_fleet_model_info"]}
    assert model_info["cam-1"] == {
        "device": "cam-1", "model": "tiny", "version": "2.0.0", "variant": "onnx-fp16",
        "runtime": "onnxruntime 1.20.1 TensorrtExecutionProvider", "phase": "active",
    }  # fmt: skip
    assert ({"device": "cam-2", "model": "tiny"}, 42.5) in got["edge_fleet_model_progress_percent"]
    assert ({"device": "cam-3", "model": "tiny", "code": "self-test-failed"}, 1.0) in got[
        "edge_fleet_model_error"
    ]
    # The device's own text, quotes and a newline in it, comes back as it was sent.
    assert ({"device": "cam-3", "code": "untrusted-key"}, 1.0) in got["edge_fleet_device_error"]
    assert ({"device": "cam-1", "model": "tiny", "quantile": "0.99"}, 0.008) in got[
        "edge_fleet_model_latency_seconds"
    ]
    assert ({"device": "cam-1", "model": "tiny"}, 1200.0) in got["edge_fleet_model_requests_total"]
    assert ({"device": "cam-1", "gpu": "0"}, 1024.0 * 1024 * 1024) in got[
        "edge_fleet_gpu_memory_used_bytes"
    ]
    assert ({"device": "cam-1"}, 48.0 * 1024 * 1024) in got[
        "edge_fleet_agent_resident_memory_bytes"
    ]
    assert ({"rollout": "ro-1"}, 3.0) in got["edge_fleet_rollout_devices"]
    [(labels, _)] = got["edge_fleet_rollout_info"]
    assert labels == {"rollout": "ro-1", "status": "running", "models": "tiny=2.0.0"}


def test_label_values_a_device_chose_are_escaped() -> None:
    m = FleetModel(TOPICS)
    nasty = 'v1"} edge_fleet_broker_connected 0\n# x\\'
    m.take(
        reported(
            "cam-9",
            models={"tiny": ModelStatus(phase=Phase.ACTIVE, version="1", runtime=nasty)},
        )
    )
    got = families(render(m))
    [(labels, value)] = got["edge_fleet_model_info"]
    assert labels["runtime"] == nasty
    assert value == 1.0
    assert got["edge_fleet_broker_connected"] == [({}, 0.0)]  # never connected, not injected


def test_the_grafana_dashboard_asks_only_for_series_the_dashboard_exports() -> None:
    doc = json.loads((REPO / "docs" / "grafana" / "edge-fleet.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    used = {name for e in exprs for name in re.findall(r"\bedge_fleet_[a-z_]+", e)}
    exported = set(SERIES)
    assert used <= exported, used - exported
    # The panels cover the devices, the models, the GPUs and the rollouts.
    assert {
        "edge_fleet_device_online", "edge_fleet_model_requests_per_second",
        "edge_fleet_model_latency_seconds", "edge_fleet_gpu_utilization_percent",
        "edge_fleet_rollout_active_devices",
    } <= used  # fmt: skip
    assert doc["templating"]["list"][0]["query"]["query"].startswith(
        "label_values(edge_fleet_device_info"
    )


# -- the server -------------------------------------------------------------------------------
class Client:
    def __init__(self, url: str, context: ssl.SSLContext | None = None) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "", u.port or 80
        self.context = context

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        if self.context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=30, context=self.context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


@pytest.fixture
def served(broker: Broker) -> Iterator[Dashboard]:
    with Dashboard(mqtt_settings(broker), TOPICS, DashboardSettings(port=0, token=TOKEN)) as d:
        yield d


def test_a_token_guards_every_page_but_the_login_and_never_reaches_the_page(
    served: Dashboard,
) -> None:
    c = Client(served.url)
    for path in ("/api/fleet", "/metrics", "/api/devices/cam-1", "/api/stream"):
        status, headers, _ = c.request("GET", path)
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Bearer")
    status, headers, _ = c.request("GET", "/")
    assert status == 303
    assert headers["location"] == "/login"
    assert c.request("GET", "/healthz")[0] == 200
    status, _, page = c.request("GET", "/login")
    assert status == 200
    assert b'name="token"' in page

    # Bearer, as Prometheus and curl send it.
    assert c.request("GET", "/metrics", authorization=f"Bearer {TOKEN}")[0] == 200
    assert c.request("GET", "/metrics", authorization="Bearer wrong-token-xxxxxxxx")[0] == 401

    # The form: a wrong token is told so; the right one sets a cookie that is not the token.
    form = "application/x-www-form-urlencoded"
    status, headers, _ = c.request("POST", "/login", b"token=nope", content_type=form)
    assert status == 303
    assert headers["location"] == "/login?failed=1"
    assert "set-cookie" not in headers
    assert b"not the dashboard" in c.request("GET", "/login?failed=1")[2]
    status, headers, _ = c.request("POST", "/login", f"token={TOKEN}".encode(), content_type=form)
    assert status == 303
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    value = cookie.split(";")[0]
    assert c.request("GET", "/api/fleet", cookie=value)[0] == 200
    assert c.request("GET", "/api/fleet", cookie=value[:-4] + "0000")[0] == 401

    # Nothing served to a logged-in page holds the token.
    for path in ("/", "/static/app.js", "/static/style.css", "/api/fleet", "/metrics"):
        status, headers, body = c.request("GET", path, cookie=value)
        assert status == 200, path
        assert TOKEN.encode() not in body, path
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"


def test_only_loopback_host_names_are_served_on_a_loopback_listener(served: Dashboard) -> None:
    c = Client(served.url)
    auth = f"Bearer {TOKEN}"
    for host in ("evil.example", "evil.example:8600", "10.0.0.5", "a1.localhost:8600", ""):
        status, _, body = c.request("GET", "/api/fleet", host=host, authorization=auth)
        assert status == 421, host
        assert b"loopback host names" in body
    for host in ("localhost:8600", "127.0.0.1", "[::1]:8600", "127.1.2.3"):
        assert c.request("GET", "/api/fleet", host=host, authorization=auth)[0] == 200, host


def test_another_site_gets_no_data_and_a_login_runs_out(served: Dashboard) -> None:
    c = Client(served.url)
    auth = f"Bearer {TOKEN}"
    for path in ("/api/fleet", "/api/stream", "/metrics"):
        status, _, text = c.request("GET", path, authorization=auth, sec_fetch_site="cross-site")
        assert status == 403, path
        assert b"other sites" in text
    assert (
        c.request("GET", "/api/fleet", authorization=auth, sec_fetch_site="same-origin")[0] == 200
    )
    # A link from elsewhere to the page itself still opens it (then the login).
    assert c.request("GET", "/", sec_fetch_site="cross-site")[0] == 303
    # The login form has its style before a login.
    assert c.request("GET", "/static/style.css")[0] == 200
    assert c.request("GET", "/static/app.js")[0] == 401
    # A cookie carries its expiry under the MAC: an old one, or one with its time moved, fails.
    access = served.app.access
    old = access.session_value(now=time.time() - 13 * 3600)
    assert c.request("GET", "/api/fleet", cookie=f"edge_fleet_dashboard={old}")[0] == 401
    expiry, _, mac = old.partition(".")
    moved = f"{int(expiry) + 86400}.{mac}"
    assert c.request("GET", "/api/fleet", cookie=f"edge_fleet_dashboard={moved}")[0] == 401
    fresh = access.session_value()
    assert c.request("GET", "/api/fleet", cookie=f"edge_fleet_dashboard={fresh}")[0] == 200


def test_the_release_key_needs_a_token_even_on_loopback(broker: Broker, keys: Keys) -> None:
    signing = Signing.load(keys.store.release_key_paths())
    with pytest.raises(ConfigError, match="needs a token too"):
        Dashboard(mqtt_settings(broker), TOPICS, DashboardSettings(port=0), signing)


def test_a_device_sending_infinity_does_not_break_the_page(broker: Broker) -> None:
    with (
        watcher(broker) as w,
        Dashboard(mqtt_settings(broker), TOPICS, DashboardSettings(port=0)) as d,
    ):
        w.publish(TOPICS.device("cam-1").reported, reported("cam-1").payload)
        raw = b'{"type":"telemetry","device_id":"cam-1","at":"2026-01-01T00:00:00Z",'
        raw += b'"metrics":{"cpu.percent":1e400,"mem.percent":-1e999,"proc.rss_mb":50.0}}'
        w.publish(TOPICS.device("cam-1").telemetry, raw, retain=False)
        wait_until(lambda: d.model.latest("cam-1"), 10, message="the telemetry taken")
        c = Client(d.url)
        for path in ("/api/fleet", "/api/devices/cam-1"):
            status, _, body = c.request("GET", path)
            assert status == 200
            assert b"Infinity" not in body
            json.loads(body, parse_constant=lambda name, p=path: pytest.fail(f"{name} in {p}"))
        assert d.model.latest("cam-1") == {"proc.rss_mb": 50.0}
        assert b"edge_fleet_device_cpu_percent{" not in c.request("GET", "/metrics")[2]


def test_actions_are_refused_cross_site_unconfirmed_or_without_the_release_key(
    served: Dashboard,
) -> None:
    c = Client(served.url)
    auth = f"Bearer {TOKEN}"
    path = "/api/rollouts/ro-1/pause"
    body = b'{"confirm": "ro-1"}'
    status, _, text = c.request("POST", path, body, authorization=auth)
    assert status == 403
    assert b"X-Edge-Fleet" in text
    status, _, text = c.request(
        "POST", path, body, authorization=auth, x_edge_fleet="dashboard",
        origin="https://evil.example",
    )  # fmt: skip
    assert status == 403
    assert b"evil.example" in text
    status, _, text = c.request("POST", path, body, authorization=auth, x_edge_fleet="dashboard")
    assert status == 403
    assert b"--key" in text  # this dashboard has no release key
    status, _, text = c.request(
        "POST", "/api/rollouts/ro-1/explode", body, authorization=auth, x_edge_fleet="dashboard"
    )
    assert status == 404
    status, _, _ = c.request("POST", path, body)
    assert status == 401
    _, _, fleet = c.request("GET", "/api/fleet", authorization=auth)
    assert json.loads(fleet)["actions"]["available"] is False


def test_an_action_needs_its_confirmation_and_a_finished_rollout_refuses_it(
    broker: Broker, keys: Keys
) -> None:
    signing = Signing.load(keys.store.release_key_paths())
    with (
        watcher(broker) as w,
        Dashboard(
            mqtt_settings(broker), TOPICS, DashboardSettings(port=0, token=TOKEN), signing
        ) as d,
    ):
        for item in a_rollout("ro-9", "done"):
            w.publish(item.topic, item.payload)
        c = Client(d.url)
        hdr = {"x_edge_fleet": "dashboard", "authorization": f"Bearer {TOKEN}"}
        path = "/api/rollouts/ro-9/abort"
        status, _, text = c.request("POST", path, b"{}", **hdr)
        assert status == 400
        assert json.loads(text)["error"] == 'confirm the abort: send {"confirm": "ro-9"}'
        status, _, text = c.request("POST", path, b'{"confirm": "ro-8"}', **hdr)
        assert status == 400
        status, _, text = c.request("POST", path, b"not json", **hdr)
        assert status == 400
        status, _, text = c.request("POST", path, b'{"confirm": "ro-9"}', **hdr)
        assert status == 409, text
        assert b"ro-9 is done" in text
        status, _, text = c.request(
            "POST", "/api/rollouts/ro-none/pause", b'{"confirm": "ro-none"}', **hdr
        )
        assert status == 409, text
        # And the dashboard serves on.
        assert c.request("GET", "/healthz")[0] == 200


def test_the_stream_sends_a_snapshot_then_only_what_changed(broker: Broker) -> None:
    with (
        watcher(broker) as w,
        Dashboard(mqtt_settings(broker), TOPICS, DashboardSettings(port=0)) as d,
    ):
        w.publish(TOPICS.device("cam-1").reported, reported("cam-1").payload)
        u = urlsplit(d.url)
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
        conn.request("GET", "/api/stream")
        r = conn.getresponse()
        assert r.status == 200
        assert r.getheader("content-type") == "text/event-stream"

        def next_event() -> tuple[str, str, dict[str, Any]]:
            fields: dict[str, str] = {}
            while True:
                line = r.fp.readline().decode().rstrip("\n")
                if line.startswith(":"):
                    continue
                if not line and fields:
                    return fields["id"], fields["event"], json.loads(fields["data"])
                if line:
                    key, _, value = line.partition(": ")
                    fields[key] = value

        deadline = time.monotonic() + 30
        while True:  # the snapshot, then changes until cam-1 is in (it may come in later)
            ident, kind, doc = next_event()
            devices = [x["id"] for x in doc["devices"]]
            if "cam-1" in devices or time.monotonic() > deadline:
                break
        assert "cam-1" in devices
        first_kind = kind
        w.publish(TOPICS.device("cam-2").reported, reported("cam-2").payload)
        while True:
            ident2, kind, doc = next_event()
            devices = [x["id"] for x in doc["devices"]]
            if devices or time.monotonic() > deadline:
                break
        assert kind == "changes"
        assert devices == ["cam-2"]  # not cam-1 again
        assert ident2.split(":")[0] == ident.split(":")[0]
        assert int(ident2.split(":")[1]) > int(ident.split(":")[1])
        assert first_kind in ("snapshot", "changes")
        conn.close()

        # A page that reconnects with the last id it saw gets the changes, not a snapshot.
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
        conn.request("GET", "/api/stream", headers={"Last-Event-ID": ident})
        r = conn.getresponse()
        _, kind, doc = next_event()
        assert kind == "changes"
        assert [x["id"] for x in doc["devices"]] == ["cam-2"]
        conn.close()
        # One from another dashboard (or before a restart) gets a snapshot.
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
        conn.request("GET", "/api/stream", headers={"Last-Event-ID": "feedbeef:3"})
        r = conn.getresponse()
        _, kind, doc = next_event()
        assert kind == "snapshot"
        assert {x["id"] for x in doc["devices"]} == {"cam-1", "cam-2"}
        conn.close()


def test_tls_client_certificates_are_required_when_a_client_ca_is_given(
    broker: Broker, certs: Path
) -> None:
    settings = DashboardSettings(
        host="127.0.0.1",
        port=0,
        tls_cert=certs / "broker.crt",
        tls_key=certs / "broker.key",
        client_ca=certs / "ca.crt",
    )
    with Dashboard(mqtt_settings(broker), TOPICS, settings) as d:
        assert d.url.startswith("https://127.0.0.1:")
        anonymous = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            Client(d.url, anonymous).request("GET", "/api/fleet")
        holder = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        holder.load_cert_chain(certs / "fleet.crt", certs / "fleet.key")
        status, _, body = Client(d.url, holder).request("GET", "/api/fleet")
        assert status == 200
        assert b'"devices"' in body


def test_a_listener_beyond_loopback_needs_a_token_or_client_certificates() -> None:
    with pytest.raises(ConfigError, match="open to anyone"):
        DashboardSettings(host="0.0.0.0", port=0).check()
    DashboardSettings(host="0.0.0.0", port=0, token=TOKEN).check()
    with pytest.raises(ConfigError, match="at least 16"):
        DashboardSettings(token="short").check()
    with pytest.raises(ConfigError, match="go together"):
        DashboardSettings(tls_cert=Path("/x.crt")).check()
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        DashboardSettings(client_ca=Path("/ca.crt")).check()
    assert DashboardSettings.parse_listen("[::1]:8600") == ("::1", 8600)
    assert DashboardSettings.parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        DashboardSettings.parse_listen("localhost:http")


def test_the_command_serves_until_sigterm_and_refuses_an_open_listener(
    broker: Broker, tmp_path: Path
) -> None:
    base = [sys.executable, "-m", "agent.cli", "dashboard"]
    where = ["--broker", f"{broker.host}:{broker.port}", "--no-tls"]
    refused = subprocess.run(
        [*base, "--listen", "0.0.0.0:0", *where], capture_output=True, text=True, cwd=REPO
    )
    assert refused.returncode == 2
    assert "open to anyone" in refused.stderr
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [*base, "--listen", "127.0.0.1:0", "--token-file", str(token), *where],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "edge-fleet dashboard: http" not in line:
            line = proc.stderr.readline()
        assert "token required" in line
        assert "read-only" in line
        url = re.search(r"(http://\S+?)/ ", line)
        assert url, line
        status, _, body = Client(url.group(1)).request(
            "GET", "/metrics", authorization=f"Bearer {TOKEN}"
        )
        assert status == 200
        assert b"edge_fleet_broker_connected" in body
        assert TOKEN not in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_resume_and_rollback_from_the_dashboard_drive_the_rollout_from_it(
    tmp_path: Path, broker: Broker, keys: Keys, signed: Callable[..., Any]
) -> None:
    """The CLI starts a rollout and is stopped while it is paused; the dashboard's Resume takes
    it over and drives it, its Roll back takes it from that controller and returns the devices
    to 1.0.0, and stopping the dashboard leaves no controller behind."""
    v = two_versions(tmp_path, signed)
    with ExitStack() as stack:
        stack.enter_context(bundle_server(broker, v.served))
        w = stack.enter_context(watcher(broker))
        sims = stack.enter_context(
            simulated(broker, keys, tmp_path / "sim", group="hall", devices=4)
        )
        w.publish(
            TOPICS.group_desired("hall"),
            deployment({"tiny": v.envelopes["1.0.0"]}, keys.release, group="hall"),
        )
        for dev in sims.devices:
            w.wait(dev.id, active("tiny", "1.0.0"), what="1.0.0 from the group")
        d = Dashboard(
            mqtt_settings(broker), TOPICS, DashboardSettings(port=0, token=TOKEN),
            Signing.load(keys.store.release_key_paths()),
        )  # fmt: skip
        stack.enter_context(d)
        c = Client(d.url)

        def act(action: str) -> dict[str, Any]:
            status, _, text = c.request(
                "POST", f"/api/rollouts/ro-d/{action}", b'{"confirm": "ro-d"}',
                x_edge_fleet="dashboard", authorization=f"Bearer {TOKEN}",
            )  # fmt: skip
            assert status == 200, text
            doc: dict[str, Any] = json.loads(text)
            return doc

        def rollout() -> dict[str, Any]:
            found = [r for r in d.model.rollouts() if r["rollout"] == "ro-d"]
            return found[0] if found else {}

        cli = subprocess.Popen(
            [
                sys.executable, "-m", "agent.cli", "rollout", "start", str(v.bundles["2.0.0"]),
                "--group", "hall", "--waves", "1,100%", "--soak", "10m", "--id", "ro-d",
                "--bundles", str(v.served), "--key", str(keys.store.release_key_paths()[0]),
                "--broker", f"{broker.host}:{broker.port}", "--no-tls",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        try:
            wait_until(lambda: rollout().get("status") == "running", 60, message="ro-d running")
            assert "pause taken by" in act("pause")["message"]
            assert rollout()["status"] == "paused"
            cli.send_signal(signal.SIGTERM)  # it hands the paused rollout back
            cli.communicate(timeout=60)
            wait_until(
                lambda: not rollout().get("driven"), 30, message="the CLI's lease given back"
            )
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate(timeout=10)

        done = act("resume")
        assert done["driving"] is True, done
        assert done["message"] == "resumed, driven from the dashboard"
        wait_until(lambda: rollout().get("status") == "running", 30, message="resumed")
        assert d.actions.driving() == ["ro-d"]
        assert "resume" not in rollout()["actions"]  # a live controller holds it

        done = act("rollback")
        assert done["driving"] is True, done
        wait_until(lambda: rollout().get("status") == "rolled-back", 120, message="rolled back")
        for dev in sims.devices:
            w.wait(dev.id, active("tiny", "1.0.0"), what="1.0.0 again")
        wait_until(lambda: d.actions.driving() == [], 30, message="the controllers finished")
        d.stop()
        assert d.actions.driving() == []
        assert rollout()["owner"] is None
