"""What ``edge-fleet dashboard`` costs at 100, 300 and 1000 devices, server and page.

For each size, that many devices' retained ``reported`` and ``online`` (one model each, a tenth
of them downloading, one in fifty with an error) and a telemetry message each are published to
a loopback mosquitto; the dashboard takes them over its own session, then:

  take_ms_per_device      wall time per device from the dashboard's start (its broker
                          session included) until every device's reported state, online and
                          telemetry is taken
  snapshot_ms             FleetModel.snapshot(): every device's row, rollouts, counts (median)
  snapshot_kib            its JSON, what a page gets when it connects
  changes_ms              FleetModel.changes() after a tenth of the devices changed (median)
  baseline_dumps_ms       json.dumps of the devices' reported state as they sent it (median):
                          the least a page of every device could cost
  ratio_snapshot_vs_dumps snapshot_ms + its JSON encoding over baseline_dumps_ms
  page_load_ms            chromium (headless, Debian's, through Playwright): navigation until
                          the table holds every device
  render_ms               one full redraw of the devices table in the page (median of 10)

Usage: ``.venv/bin/python bench/dashboard.py [--sizes 100,300,1000]``; one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from _common import say
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.dashboard import Dashboard, DashboardSettings
from agent.testing.broker import plain_broker
from agent.testing.fleet import TOPICS, mqtt_settings
from agent.transport.messages import (
    ErrorInfo,
    HardwareProfile,
    ModelStatus,
    Online,
    Phase,
    Reported,
    Telemetry,
)

SHA = "cd" * 32


def messages(n: int) -> tuple[list[tuple[str, bytes, bool]], list[dict[str, Any]]]:
    now = datetime.now(timezone.utc)
    out: list[tuple[str, bytes, bool]] = []
    docs = []
    hw = HardwareProfile(
        arch="aarch64", cpu_count=6, memory_mb=7620, accelerators=["cpu", "jetson"]
    )
    for i in range(n):
        dev = f"cam-{i:05d}"
        phase = Phase.DOWNLOADING if i % 10 == 0 else Phase.ACTIVE
        model = ModelStatus(
            phase=phase, version="2.0.0", release=2, bundle_sha256=SHA, variant="onnx-fp16",
            runtime="onnxruntime 1.20.1 TensorrtExecutionProvider",
            progress=42.0 if phase == Phase.DOWNLOADING else None,
            error=ErrorInfo(code="self-test-failed", message="output 3 differs") if i % 50 == 7 else None,
        )  # fmt: skip
        r = Reported(
            device_id=dev, agent_version="0.1.0", at=now, hardware=hw, groups=["lobby"],
            deployment_id="ro-1", models={"tiny": model},
        )  # fmt: skip
        t = Telemetry(
            device_id=dev, at=now,
            metrics={"cpu.percent": 12.0, "mem.percent": 30.0, "proc.rss_mb": 50.0,
                     "model.tiny.rps": 20.0, "model.tiny.p99_ms": 9.0},
        )  # fmt: skip
        on = Online(state="online", agent_version="0.1.0", since=now)
        out += [
            (TOPICS.device(dev).reported, r.to_bytes(), True),
            (TOPICS.device(dev).online, on.to_bytes(), True),
            (TOPICS.device(dev).telemetry, t.to_bytes(), False),
        ]
        docs.append(r.model_dump(mode="json"))
    return out, docs


def publish(host: str, port: int, items: list[tuple[str, bytes, bool]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-dash-{time.time_ns()}")
    c.connect(host, port)
    c.loop_start()
    infos = [c.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in items]
    for info in infos:
        info.wait_for_publish(30)
    c.loop_stop()
    c.disconnect()


def median_ms(fn: Any, repeat: int = 9) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def one_size(n: int, tmp: Path, browser: Any) -> dict[str, Any]:
    items, docs = messages(n)
    with plain_broker(tmp / f"broker-{n}", ["max_queued_messages 100000"]) as broker:
        publish(broker.host, broker.port, [i for i in items if i[2]])
        settings = DashboardSettings(port=0)
        with Dashboard(mqtt_settings(broker), TOPICS, settings) as d:
            t0 = time.monotonic()
            while len(list(d.model.known())) < n and time.monotonic() - t0 < 60:
                time.sleep(0.01)
            publish(broker.host, broker.port, [i for i in items if not i[2]])
            while time.monotonic() - t0 < 60:
                if sum(1 for dev in d.model.known() if d.model.latest(dev)) >= n:
                    break
                time.sleep(0.01)
            took = time.monotonic() - t0
            snap = d.model.snapshot()
            encoded = json.dumps(snap, separators=(",", ":"))
            snapshot_ms = median_ms(d.model.snapshot)
            encode_ms = median_ms(lambda: json.dumps(d.model.snapshot(), separators=(",", ":")))
            baseline_ms = median_ms(lambda: json.dumps(docs, separators=(",", ":")))
            v = d.model.version
            publish(broker.host, broker.port, [i for i in items[2::3]][: max(1, n // 10)])
            time.sleep(0.5)
            changes_ms = median_ms(lambda: d.model.changes(v))
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            t1 = time.perf_counter()
            page.goto(d.url + "/")
            page.wait_for_function(
                f"() => document.querySelectorAll('#devices tbody tr').length >= {n}"
            )
            load_ms = (time.perf_counter() - t1) * 1e3
            renders = page.evaluate(
                """() => { const t = []; for (let i = 0; i < 10; i++) {
                    const a = performance.now(); render(); t.push(performance.now() - a); }
                    t.sort((x, y) => x - y); return t[5]; }"""
            )
            page.close()
    return {
        "devices": n,
        "take_ms_per_device": round(took * 1e3 / n, 3),
        "snapshot_ms": snapshot_ms,
        "snapshot_kib": round(len(encoded) / 1024, 1),
        "changes_ms": changes_ms,
        "baseline_dumps_ms": baseline_ms,
        "ratio_snapshot_vs_dumps": round(encode_ms / baseline_ms, 2) if baseline_ms else None,
        "page_load_ms": round(load_ms, 1),
        "render_ms": round(float(renders), 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,300,1000")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for n in (int(s) for s in args.sizes.split(",")):
                say(f"{n} devices")
                results.append(one_size(n, Path(tmp), browser))
                say(json.dumps(results[-1]))
        finally:
            browser.close()
    print(json.dumps({"bench": "dashboard", "sizes": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
