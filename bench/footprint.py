"""Memory and idle CPU of a real ``edge-agent run`` process, against a bare paho process.

Everything runs on 127.0.0.1: a mosquitto this script starts on a free port (never 1883), keys
made for the run (``KeyStore.init``), and the daemon as a process of its own with its local API
on a free loopback port and a unix socket in the run's temp dir. Progress goes to stderr; the
last line of stdout is one JSON object:

  idle_rss_mib      VmRSS (/proc/PID/status) of the daemon, connected, no model, at the end of
                    the idle window (``idle_pss_mib``: Pss from smaps_rollup, when readable)
  idle_cpu_pct      CPU (utime + stime, /proc/PID/stat) of the daemon over ``--idle-seconds``
                    (default 60) of idle after it came online and ``--settle-seconds`` passed,
                    as a percentage of one core
  baseline_rss_mib  VmRSS of a bare python that only imported paho.mqtt.client (same run)
  rss_delta_mib     idle_rss_mib - baseline_rss_mib
  model_rss_mib     VmRSS of the same daemon once a small ONNX model (a signed bundle pulled
                    over MQTT from a bundle server thread, deployed by a signed deployment on
                    the device's desired topic) is active; ``model_rss_after_infer_mib`` after
                    one inference on the local API

Also: where the idle RSS lies (``idle_rss_top``: Rss per mapping from /proc/PID/smaps), the
native extensions the idle daemon has mapped (``idle_native_packages``), the heavy Python
modules an identical ``edge-agent run`` (a second device, with an exit hook) had imported at
idle (``idle_heavy_modules``), what each heavy import costs alone above the baseline
(``import_rss_mib``, each in a fresh python), the idle CPU per thread, and how long the daemon
took to exit after SIGTERM (``daemon_stop_s``; null: killed after 10 s). Goals: idle RSS <= 45
MiB, idle CPU <= 0.1 %.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_s, say

if TYPE_CHECKING:
    from agent.testing.broker import Broker
    from agent.testing.fleet import Watcher

REPO = Path(__file__).resolve().parents[1]
KiB = 1024
MiB = 1 << 20
WAIT_S = 30.0  # a process starting, coming online, a model becoming active
STOP_S = 10.0  # a daemon exiting after SIGTERM
GOAL_RSS_MIB = 45.0
GOAL_CPU_PCT = 0.1
DEVICE = "bench-footprint"
PROBE_DEVICE = "bench-footprint-modules"
MODEL = "fp-model"
MODEL_INPUTS, MODEL_OUTPUTS = 256, 1024  # 1 MiB of FP32 weights
# Modules worth knowing about at idle: runtimes, numeric, web stack, metrics.
HEAVY = re.compile(
    r"^(onnxruntime|openvino|tflite_runtime|ai_edge_litert|tensorrt|numpy|onnx|uvicorn|"
    r"starlette|fastapi|httptools|uvloop|h11|websockets|psutil|pynvml|cryptography|"
    r"pydantic|pydantic_core|sqlite3|asyncio|ssl|paho)(\.|$)"
)
# Run by a second ``edge-agent run``: on exit, write the heavy modules it had imported.
MODULES_HOOK = """
import atexit, json, re, sys
from agent.cli import agent_main
out, config, pattern = sys.argv[1], sys.argv[2], re.compile(sys.argv[3])
def dump():
    tops = sorted({m.split(".")[0] for m in sys.modules if pattern.match(m)})
    with open(out, "w") as f:
        json.dump({"heavy": tops, "total_modules": len(sys.modules)}, f)
atexit.register(dump)
sys.exit(agent_main(["run", "--config", config]))
"""
# What a piece of the daemon costs on its own, above the baseline (each in a fresh python).
IMPORTS = {
    "numpy": "import numpy",
    "uvicorn": "import uvicorn",
    "cryptography": "import cryptography.hazmat.primitives.asymmetric.ed25519",
    "onnxruntime_providers": "import onnxruntime; onnxruntime.get_available_providers()",
    "openvino_core_devices": "import openvino; openvino.Core().available_devices",
    "agent_daemon_import": "import agent.daemon",
    "agent_daemon_import_and_hardware_probe": (
        "import agent.daemon; from agent.runtime.probe import probe; probe()"
    ),
}


# -- /proc --------------------------------------------------------------------------------------
def status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/PID/status (kB values as given)."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            found[key] = int(parts[0])
    return found


def rss_mib(pid: int) -> float:
    return status(pid)["VmRSS"] * KiB / MiB


def pss_mib(pid: int) -> float | None:
    """Pss from /proc/PID/smaps_rollup; None where it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return round(int(match.group(1)) * KiB / MiB, 1) if match else None


def _mapping_name(path: str) -> str:
    if not path:
        return "[anon]"
    if path.startswith("["):
        return path
    site = re.search(r"site-packages/([^/]+)/", path)
    return f"{site.group(1)}/{Path(path).name}" if site else Path(path).name


def rss_by_mapping(pid: int, top: int = 10) -> dict[str, float] | None:
    """Rss per mapped file (anonymous memory as ``[anon]``, ``[heap]``), MiB, largest first."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    sizes: dict[str, int] = {}
    name = "[anon]"
    header = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
    for line in text.splitlines():
        if header.match(line):
            parts = line.split(None, 5)
            name = _mapping_name(parts[5].strip() if len(parts) > 5 else "")
        elif line.startswith("Rss:"):
            sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v * KiB / MiB, 2) for k, v in ranked}


def native_packages(pid: int) -> list[str] | None:
    """Packages (site-packages top level) with a shared object mapped into process ``pid``."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return sorted(set(re.findall(r"site-packages/([^/\s]+)/\S*\.so", text)))


def threads(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[int(task.name)] = (task / "comm").read_text().strip()
    return out


@dataclass
class Idle:
    cpu_pct: float
    cpu_s: float
    wall_s: float
    rss_max_mib: float
    by_thread: dict[str, float]


def watch_idle(pid: int, seconds: float) -> Idle:
    """CPU of ``pid`` (and each of its threads) over ``seconds``; RSS sampled every second."""
    names = threads(pid)
    start_threads = {tid: cpu_s(pid, tid) for tid in names}
    start, began = cpu_s(pid), time.monotonic()
    rss_max = rss_mib(pid)
    deadline = began + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        rss_max = max(rss_max, rss_mib(pid))
    used, wall = cpu_s(pid) - start, time.monotonic() - began
    by_thread: dict[str, float] = {}
    for tid, name in threads(pid).items():
        label = f"{name}:{tid}"
        by_thread[label] = round(cpu_s(pid, tid) - start_threads.get(tid, 0.0), 3)
    busiest = dict(sorted(by_thread.items(), key=lambda kv: -kv[1])[:8])
    return Idle(round(100 * used / wall, 3), round(used, 3), round(wall, 1), rss_max, busiest)


# -- processes ----------------------------------------------------------------------------------
def stop_process(proc: subprocess.Popen[Any], timeout: float = WAIT_S) -> float | None:
    """SIGTERM, then SIGKILL after ``timeout``: seconds it took to exit, None if it was killed."""
    if proc.poll() is not None:
        return 0.0
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return round(time.monotonic() - began, 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(WAIT_S)
        return None


def python_rss(code: str = "") -> tuple[float, float | None]:
    """VmRSS and Pss (MiB) of a python that imported paho.mqtt.client, then ran ``code``."""
    script = f"import sys, paho.mqtt.client\n{code}\nprint('ready', flush=True)\nsys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the python running {code!r} did not start")
        time.sleep(0.3)
        return rss_mib(proc.pid), pss_mib(proc.pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def import_costs(baseline: float) -> dict[str, float]:
    """VmRSS above the baseline of a python that did only this (each in a fresh process)."""
    out: dict[str, float] = {}
    for name, code in IMPORTS.items():
        try:
            out[name] = round(python_rss(code)[0] - baseline, 1)
        except RuntimeError as exc:
            say(f"  {name}: {exc}")
    return out


def device_toml(directory: Path, keys: Path, broker: Broker, device: str, api_port: int) -> Path:
    from agent.serving.api import ApiSettings
    from agent.testing.fleet import agent_config, write_agent_toml

    config = agent_config(directory / device, keys, broker, device).model_copy(
        update={
            "report_interval_s": 1.0,  # the shipped default
            "api": ApiSettings(port=api_port, unix_socket=directory / f"{device}.sock"),
        }
    )
    return write_agent_toml(config, directory / f"{device}.toml")


def wait_online(fleet: Watcher, device: str, proc: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{device} exited with {proc.returncode}:\n{log.read_text()}")
        if fleet.online(device):
            return
    raise RuntimeError(f"{device} did not come online:\n{log.read_text()}")


@contextlib.contextmanager
def daemon(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``edge-agent run --config FILE``, as installed; SIGTERM on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "edge-agent"), "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


def idle_modules(directory: Path, fleet: Watcher, broker: Broker) -> dict[str, Any]:
    """What an ``edge-agent run`` (another device, same settings) had imported once online."""
    from agent.testing.broker import free_port

    config = device_toml(directory, directory / "keys", broker, PROBE_DEVICE, free_port())
    out, log = directory / "modules.json", directory / f"{PROBE_DEVICE}.log"
    command = [sys.executable, "-c", MODULES_HOOK, str(out), str(config), HEAVY.pattern]
    with open(log, "ab") as err:
        proc = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_online(fleet, PROBE_DEVICE, proc, log)
        time.sleep(1.0)
    finally:
        stop_s = stop_process(proc, STOP_S)
    if stop_s is None or not out.exists():
        say(f"  {PROBE_DEVICE} did not exit within {STOP_S:g} s of SIGTERM; killed")
        return {"error": f"did not exit within {STOP_S:g} s of SIGTERM (killed)"}
    found: dict[str, Any] = json.loads(out.read_text())
    found["stop_s"] = stop_s
    return found


def infer(port: int, inputs: int) -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, inputs], "datatype": "FP32", "data": [0.5] * inputs}
            ]
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request(
            "POST",
            f"/v2/models/{MODEL}/infer",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"inference: HTTP {response.status}: {data[:300]!r}")
    finally:
        conn.close()


def signed_bundle(directory: Path, served: Path, signer: Any) -> tuple[bytes, int]:
    """A small ONNX model built into a bundle in ``served`` and signed: (envelope, bytes)."""
    from agent.fleet.build import BuildOptions, build_bundle
    from agent.fleet.sign import sign_bundle
    from agent.testing.models import make_onnx

    model = make_onnx(directory / f"{MODEL}.onnx", inputs=MODEL_INPUTS, outputs=MODEL_OUTPUTS)
    result = build_bundle([model], served / f"{MODEL}.emb", BuildOptions(MODEL, "1.0.0"))
    envelope, _ = sign_bundle(result.path, [signer], now=datetime.now(timezone.utc))
    return envelope.read_bytes(), result.size


# -- the run ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    from agent.fleet.keys import KeyStore, load_signer
    from agent.testing.broker import free_port, plain_broker
    from agent.testing.fleet import TOPICS, bundle_server, deployment, watcher
    from agent.transport.messages import Phase, Reported

    began = time.monotonic()
    result: dict[str, Any] = {}
    say("baseline: python + paho.mqtt.client")
    result["baseline_rss_mib"], result["baseline_pss_mib"] = python_rss()
    if not args.skip_modules:
        say("what each heavy import costs on its own")
        result["import_rss_mib"] = import_costs(result["baseline_rss_mib"])
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        directory = Path(tmp)
        store = KeyStore.init(directory / "keys", now=datetime.now(timezone.utc))
        signer = load_signer(store.release_key_paths()[0])
        served = directory / "served"
        served.mkdir()
        api_port = free_port()
        with plain_broker(directory) as broker, watcher(broker) as fleet:
            say(f"mosquitto on {broker.host}:{broker.port}")
            if not args.skip_modules:
                say("which modules an edge-agent run imports by the time it is online")
                result["idle_heavy_modules"] = idle_modules(directory, fleet, broker)
            config = device_toml(directory, store.root, broker, DEVICE, api_port)
            log = directory / f"{DEVICE}.log"
            with daemon(config, log) as proc:
                t = time.monotonic()
                wait_online(fleet, DEVICE, proc, log)
                result["online_s"] = round(time.monotonic() - t, 2)
                fleet.wait(DEVICE, lambda r: True, what="a reported document")
                say(f"online in {result['online_s']} s; settling {args.settle_seconds:g} s")
                time.sleep(args.settle_seconds)
                say(f"idle for {args.idle_seconds:g} s")
                idle = watch_idle(proc.pid, args.idle_seconds)
                st = status(proc.pid)
                result["idle_rss_mib"] = round(st["VmRSS"] * KiB / MiB, 1)
                result["idle_pss_mib"] = pss_mib(proc.pid)
                result["idle_rss_anon_mib"] = round(st.get("RssAnon", 0) * KiB / MiB, 1)
                result["idle_rss_file_mib"] = round(st.get("RssFile", 0) * KiB / MiB, 1)
                result["idle_rss_max_mib"] = round(idle.rss_max_mib, 1)
                result["idle_threads"] = st.get("Threads")
                result["idle_cpu_pct"] = idle.cpu_pct
                result["idle_cpu_s"] = idle.cpu_s
                result["idle_wall_s"] = idle.wall_s
                result["idle_cpu_by_thread_s"] = idle.by_thread
                result["idle_rss_top"] = rss_by_mapping(proc.pid)
                result["idle_native_packages"] = native_packages(proc.pid)
                say(f"  idle: {result['idle_rss_mib']} MiB, {idle.cpu_pct} % CPU")

                envelope, size = signed_bundle(directory, served, signer)
                result["model_bundle_bytes"] = size
                say(f"deploying {MODEL} ({size} bytes)")
                with bundle_server(broker, served):
                    t = time.monotonic()
                    fleet.publish(
                        TOPICS.device(DEVICE).desired,
                        deployment({MODEL: envelope}, signer, device=DEVICE, sequence=1),
                    )

                    def active(r: Reported) -> bool:
                        m = r.models.get(MODEL)
                        return m is not None and m.phase == Phase.ACTIVE

                    reported = fleet.wait(DEVICE, active, timeout=60, what="the model active")
                    result["deploy_s"] = round(time.monotonic() - t, 2)
                runtime = reported.models[MODEL].runtime
                say(f"  active in {result['deploy_s']} s on {runtime}")
                time.sleep(args.settle_seconds)
                window = watch_idle(proc.pid, args.model_seconds)
                st = status(proc.pid)
                result["model_rss_mib"] = round(st["VmRSS"] * KiB / MiB, 1)
                result["model_pss_mib"] = pss_mib(proc.pid)
                result["model_threads"] = st.get("Threads")
                result["model_cpu_pct"] = window.cpu_pct
                result["model_runtime"] = runtime
                result["model_rss_top"] = rss_by_mapping(proc.pid, top=6)
                result["model_native_packages"] = native_packages(proc.pid)
                infer(api_port, MODEL_INPUTS)
                time.sleep(0.5)
                result["model_rss_after_infer_mib"] = round(rss_mib(proc.pid), 1)
                result["peak_rss_mib"] = round(status(proc.pid)["VmHWM"] * KiB / MiB, 1)
                say(f"  model: {result['model_rss_mib']} MiB")
                result["daemon_stop_s"] = stop_process(proc, STOP_S)
                if result["daemon_stop_s"] is None:
                    say(f"  the daemon did not exit within {STOP_S:g} s of SIGTERM; killed")
    result["rss_delta_mib"] = round(result["idle_rss_mib"] - result["baseline_rss_mib"], 1)
    result["baseline_rss_mib"] = round(result["baseline_rss_mib"], 1)
    result["goals"] = {
        "idle_rss_mib_max": GOAL_RSS_MIB,
        "idle_cpu_pct_max": GOAL_CPU_PCT,
        "idle_rss_ok": result["idle_rss_mib"] <= GOAL_RSS_MIB,
        "idle_cpu_ok": result["idle_cpu_pct"] <= GOAL_CPU_PCT,
    }
    result.update(
        {
            "method": (
                "an edge-agent run process (plain MQTT 5 to a loopback mosquitto, API on a free "
                "loopback port and a unix socket, shipped report_interval_s and telemetry "
                f"defaults); idle: from online + {args.settle_seconds:g} s settle, CPU = "
                "utime+stime delta from /proc/PID/stat over the window / wall, RSS = VmRSS from "
                "/proc/PID/status at its end (Pss from smaps_rollup); model: the same process "
                f"after a signed deployment of a {MODEL_INPUTS}x{MODEL_OUTPUTS} FP32 ONNX MatMul "
                "bundle (pulled from a bundle server thread) reported active, then "
                f"{args.settle_seconds:g} s settle + {args.model_seconds:g} s window; baseline: "
                "python -c 'import paho.mqtt.client', VmRSS, same run"
            ),
            "idle_seconds": args.idle_seconds,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "clk_tck": os.sysconf("SC_CLK_TCK"),
            "total_s": round(time.monotonic() - began, 1),
        }
    )
    return result


def parse_args() -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--idle-seconds", type=float, default=60.0, help="the idle CPU window")
    p.add_argument("--settle-seconds", type=float, default=5.0, help="after online / active")
    p.add_argument("--model-seconds", type=float, default=10.0, help="CPU window, model active")
    p.add_argument("--skip-modules", action="store_true", help="no module listing, no import costs")
    return p.parse_args()


def main() -> int:
    result = run(parse_args())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
