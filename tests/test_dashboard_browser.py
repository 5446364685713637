"""``edge-fleet dashboard`` in a real browser: Debian's chromium, headless, driven by Playwright,
against a real mosquitto, two real ``edge-agent run`` processes (cam-a, cam-b) and 200 simulated
devices (agent.fleet.simulator: the agent's protocol code with a stub runtime), all following
group ``lobby``.

The page is looked at as a fleet manager would: a deployment progressing to active, a device's
page with its telemetry charts and events, a refusal with its code, a rollout paused and
aborted with the page's buttons behind their confirmation, and text a device sent shown as
text, never as markup. Screenshots go to the test's directory, and to
``$EDGE_FLEET_SCREENSHOTS`` when it is set (docs/dashboard.png is made that way).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.request import Request, urlopen

import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from agent.fleet.build import BuildOptions, build_bundle
from agent.fleet.dashboard import Dashboard, DashboardSettings
from agent.fleet.dashboard.actions import Signing
from agent.fleet.keys import KeyStore, load_signer
from agent.fleet.sign import sign_bundle
from agent.testing.broker import Broker
from agent.testing.fleet import (
    REPO,
    TOPICS,
    Watcher,
    active,
    agent_config,
    agent_process,
    bundle_server,
    deployment,
    mqtt_settings,
    simulated,
    watcher,
    write_agent_toml,
)
from agent.testing.models import make_onnx
from agent.transport.messages import ErrorInfo, Reported
from agent.trust.keys import Signer
from agent.upstream import TelemetrySettings
from tests.conftest import Keys, broker_fixture

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
GROUP = "lobby"
AGENTS = ("cam-a", "cam-b")
SIMULATED = 200
WAIT_MS = 60_000
TOKEN = "a-dashboard-token-of-some-length"

broker = broker_fixture(scope="module")
expect.set_options(timeout=WAIT_MS)


@dataclass
class Fleet:
    tmp: Path
    broker: Broker
    store: KeyStore
    signer: Signer
    watch: Watcher
    bundles: dict[str, Path]
    envelopes: dict[str, bytes]
    dashboard: Dashboard
    browser: BrowserContext
    shots: list[Path]

    def page(self) -> Page:
        page = self.browser.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors  # type: ignore[attr-defined]
        return page

    def shot(self, page: Page, name: str) -> Path:
        path = self.tmp / f"{name}.png"
        page.screenshot(path=str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        out = os.environ.get("EDGE_FLEET_SCREENSHOTS")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(out) / path.name)
        self.shots.append(path)
        return path

    def rollout_cli(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable, "-m", "agent.cli", "rollout", *args,
                "--key", str(self.store.release_key_paths()[0]),
                "--broker", f"{self.broker.host}:{self.broker.port}", "--no-tls",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("dashboard")
    store = KeyStore.init(tmp / "keys", now=datetime.now(timezone.utc))
    signer = load_signer(store.release_key_paths()[0])
    served = tmp / "served"
    served.mkdir()
    bundles, envelopes = {}, {}
    for seed, version in enumerate(("1.0.0", "2.0.0"), start=1):
        model = make_onnx(tmp / f"m{seed}.onnx", seed=seed)
        built = build_bundle(
            [model],
            served / f"tiny-{version}.emb",
            BuildOptions(name="tiny", version=version, block_size=4096),
        )
        out, _ = sign_bundle(built.path, [signer], now=datetime.now(timezone.utc))
        bundles[version], envelopes[version] = built.path, out.read_bytes()
    with ExitStack() as stack:
        # Slow enough that a download is seen on the page: about six seconds per device.
        stack.enter_context(bundle_server(broker, served, rate_bytes_s=2 * 1024))
        watch = stack.enter_context(watcher(broker))
        for device in AGENTS:
            config = agent_config(tmp / device, store.root, broker, device, groups=(GROUP,))
            config = config.model_copy(update={"telemetry": TelemetrySettings(interval_s=1)})
            toml = write_agent_toml(config, tmp / f"{device}.toml")
            stack.enter_context(agent_process(toml, tmp / f"{device}.log"))
        stack.enter_context(
            simulated(
                broker, Keys(store, signer), tmp / "sim", group=GROUP, devices=SIMULATED,
                hardware={"cpu": 2, "jetson": 1, "nvidia-gpu": 1, "intel-gpu": 1},
                telemetry_interval_s=5.0, report_interval_s=2.0,
            )
        )  # fmt: skip
        dashboard = stack.enter_context(
            Dashboard(
                mqtt_settings(broker),
                TOPICS,
                # A two-minute window (points half a second apart), so that charts fill fast.
                DashboardSettings(port=0, history_minutes=2, token=TOKEN),
                Signing.load(store.release_key_paths()),
            )
        )
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        stack.callback(browser.close)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        login(context, dashboard.url)
        yield Fleet(tmp, broker, store, signer, watch, bundles, envelopes, dashboard, context, [])


def login(context: BrowserContext, url: str) -> None:
    """Through the form, as a manager logs in: a wrong token is told so, the right one in."""
    page = context.new_page()
    page.goto(url + "/")
    expect(page).to_have_url(url + "/login")
    page.fill("#token", "not-the-token-at-all")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not the dashboard's token")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(url + "/")
    expect(page.locator("#logout")).to_be_visible()
    cookie = next(c for c in context.cookies() if c["name"] == "edge_fleet_dashboard")
    assert cookie["httpOnly"]
    assert TOKEN not in cookie["value"]
    assert TOKEN not in page.content()
    page.close()


def row(page: Page, device: str) -> str:
    return f'#devices tr[data-device="{device}"]'


def test_the_fleet_page_follows_a_deployment_to_active(fleet: Fleet) -> None:
    page = fleet.page()
    page.goto(fleet.dashboard.url + "/")
    expect(page.locator("#devices tbody tr")).to_have_count(SIMULATED + len(AGENTS))
    expect(page.locator("#live")).to_have_text("live")

    model = f'{row(page, "cam-a")} .model[data-model="tiny"]'
    # Every state of cam-a's model the page draws, as it draws it (no reload in between),
    # watched from before the deployment is published, so no early phase is drawn unseen.
    page.evaluate(
        """(sel) => {
          window.seen = [];
          new MutationObserver(() => {
            const m = document.querySelector(sel);
            const p = m && m.querySelector('.progress');
            if (m) window.seen.push(m.dataset.phase + (p ? ' ' + p.textContent : ''));
          }).observe(document.querySelector('#devices tbody'), {childList: true});
        }""",
        model,
    )
    fleet.watch.publish(
        TOPICS.group_desired(GROUP),
        deployment({"tiny": fleet.envelopes["1.0.0"]}, fleet.signer, group=GROUP),
    )
    page.wait_for_selector(f'{model}[data-phase="active"]')
    seen = page.evaluate("window.seen")
    # On its way: downloading with a progress figure, then the later phases, then active.
    assert any(s.startswith("downloading ") and s.endswith("%") for s in seen), seen
    assert seen[-1] == "active", seen
    expect(page.locator(model)).to_contain_text("1.0.0")
    fleet.watch.wait("cam-a", active("tiny", "1.0.0"), what="1.0.0 on cam-a")
    fleet.watch.wait("cam-b", active("tiny", "1.0.0"), what="1.0.0 on cam-b")

    # Filter and sort, as a manager narrows a few hundred rows down.
    page.fill("#filter", "cam-")
    expect(page.locator("#devices tbody tr")).to_have_count(2)
    page.click('#devices th[data-sort="id"]')  # sorted by id already: now descending
    expect(page.locator("#devices tbody tr").first).to_have_attribute("data-device", "cam-b")
    page.fill("#filter", "jetson")
    count = page.locator("#devices tbody tr").count()
    assert 0 < count < SIMULATED, count
    page.fill("#filter", "")
    page.click('#devices th[data-sort="id"]')  # ascending again: the real boxes first
    expect(page.locator("#devices tbody tr").first).to_have_attribute("data-device", "cam-a")
    page.wait_for_selector('#devices tr[data-device^="sim-"] .model[data-phase="active"]')
    fleet.shot(page, "dashboard")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_device_page_shows_its_models_events_and_telemetry(fleet: Fleet) -> None:
    page = fleet.page()
    page.goto(fleet.dashboard.url + "/#/device/cam-a")
    card = page.locator('#device .card[data-device="cam-a"]')
    expect(card).to_contain_text("online")
    expect(page.locator('#device tr[data-model="tiny"]')).to_contain_text("1.0.0")
    # The events it sent on the way: downloading, ..., active.
    phases = page.locator("#device-events tr[data-kind=phase] .badge")
    expect(phases.first).to_have_text("active")
    assert "downloading" in phases.all_text_contents()
    # Telemetry every second: the box's CPU and the agent's memory drawn over time.
    chart = page.locator('#device .chart[data-metric="cpu.percent"]')
    expect(chart).to_be_visible()
    expect(page.locator('#device .chart[data-metric="proc.rss_mb"] polyline')).to_have_count(1)
    asked = Request(
        f"{fleet.dashboard.url}/api/devices/cam-a", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    detail = json.loads(urlopen(asked, timeout=10).read())
    assert len(detail["series"]["proc.rss_mb"]) >= 2, detail["series"]
    page.wait_for_function(
        """() => {
          const line = document.querySelector('.chart[data-metric="proc.rss_mb"] polyline');
          return line && line.getAttribute('points').trim().split(' ').length >= 3;
        }"""
    )
    fleet.shot(page, "dashboard-device")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_rollout_is_paused_and_aborted_from_the_page(fleet: Fleet) -> None:
    # Wave 1 is one device and a 10-minute soak: the rollout is still running when asked.
    cli = fleet.rollout_cli(
        "start", str(fleet.bundles["2.0.0"]), "--group", GROUP, "--waves", "1,100%",
        "--soak", "10m", "--wave-timeout", "120s", "--id", "ro-dash",
        "--bundles", str(fleet.bundles["2.0.0"].parent),
    )  # fmt: skip
    try:
        page = fleet.page()
        posts: list[str] = []
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        page.goto(fleet.dashboard.url + "/#/rollouts")
        card = page.locator('.card[data-rollout="ro-dash"]')
        expect(card).to_have_attribute("data-status", "running")
        expect(card).to_contain_text("tiny 2.0.0 to group lobby")
        expect(card.locator("tr[data-wave]")).to_have_count(2)
        waiting = f"{SIMULATED + len(AGENTS) - 1} waiting"  # wave 2: everyone but the canary
        expect(card.locator('tr[data-wave="2"]')).to_contain_text(waiting)
        expect(card).to_contain_text("soak 600")

        # Cancelled: nothing is asked of the broker.
        card.locator('button[data-action="pause"]').click()
        expect(page.locator("#confirm")).to_be_visible()
        expect(page.locator("#confirm-title")).to_have_text("Pause rollout ro-dash?")
        page.click("#confirm-cancel")
        expect(page.locator("#confirm")).to_be_hidden()
        assert posts == []

        card.locator('button[data-action="pause"]').click()
        page.click("#confirm-ok")
        expect(card).to_have_attribute("data-status", "paused")
        expect(page.locator("#toast")).to_contain_text("ro-dash: pause taken by")
        expect(card.locator('button[data-action="pause"]')).to_be_disabled()
        expect(card.locator('button[data-action="resume"]')).to_be_enabled()
        assert len(posts) == 1
        assert posts[0].endswith("/api/rollouts/ro-dash/pause")
        fleet.shot(page, "dashboard-rollout")

        card.locator('button[data-action="abort"]').click()
        page.click("#confirm-ok")
        expect(card).to_have_attribute("data-status", "aborted")
        expect(card).to_contain_text("aborted by")
        # The CLI that drove it ends as `edge-fleet rollout abort` makes it end: status 5.
        _, err = cli.communicate(timeout=60)
        assert cli.returncode == 5, err
        expect(card.locator('button[data-action="abort"]')).to_be_disabled()
        assert page.errors == []  # type: ignore[attr-defined]
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGTERM)
        cli.communicate(timeout=30)  # and its pipes closed


def test_a_refusal_shows_with_its_code(fleet: Fleet) -> None:
    page = fleet.page()
    page.goto(fleet.dashboard.url + "/")
    stranger = Signer.generate()  # a key the fleet's keyring does not hold
    fleet.watch.publish(
        TOPICS.device("cam-b").desired,
        deployment({"tiny": fleet.envelopes["2.0.0"]}, stranger, device="cam-b"),
    )
    error = page.locator(f"{row(page, 'cam-b')} .device-error .code")
    expect(error).to_have_text("untrusted-key")
    # Still serving what it ran: the refusal left its model alone.
    expect(page.locator(f'{row(page, "cam-b")} .model[data-model="tiny"]')).to_have_attribute(
        "data-phase", "active"
    )
    page.select_option("#state-filter", "failing")
    expect(page.locator("#devices tbody tr")).to_have_count(1)
    page.goto(fleet.dashboard.url + "/#/device/cam-b")
    rejected = page.locator("#device-events tr[data-kind=rejected]").first
    expect(rejected).to_contain_text("untrusted-key")
    assert page.errors == []  # type: ignore[attr-defined]


def test_what_a_device_sends_is_shown_as_text_never_as_markup(fleet: Fleet) -> None:
    hostile = '<img src=x onerror="window.owned=1"><script>window.owned=2</script>'
    report = Reported(
        device_id="evil-1",
        agent_version='<b id="bold">9</b>',
        at=datetime.now(timezone.utc),
        error=ErrorInfo(code="bad-signature", message=hostile),
    )
    fleet.watch.publish(TOPICS.device("evil-1").reported, report.to_bytes())
    page = fleet.page()
    page.goto(fleet.dashboard.url + "/")
    cell = page.locator(f"{row(page, 'evil-1')} .device-error")
    expect(cell).to_contain_text(hostile)
    expect(page.locator(row(page, "evil-1"))).to_contain_text('<b id="bold">9</b>')
    assert page.locator("#devices img, #bold, #devices script").count() == 0
    page.goto(fleet.dashboard.url + "/#/device/evil-1")
    expect(page.locator("#device .device-error")).to_contain_text(hostile)
    time.sleep(0.5)
    assert page.evaluate("window.owned") is None
    assert page.errors == []  # type: ignore[attr-defined]
