"""``edge-agent loadtest`` against a real ``edge-agent serve`` of the tiny model: counts and
times bounded, binary and JSON inputs, TCP and the Unix socket, 503s with their Retry-After
when the queue is full (health stays 200), and clear refusals of what cannot be driven."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.serving.loadtest import make_request, percentile, shapes
from agent.testing.fleet import REPO
from tests.conftest import Keys
from tests.test_agent_serve import serving

AGENT = str(Path(sys.executable).parent / "edge-agent")


def loadtest(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AGENT, "loadtest", "--model", "tiny", "--format", "json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return doc


def test_binary_and_json_over_tcp_and_the_socket(keys: Keys, signed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle, _ = signed("1.0.0")
    sock = tmp_path / "api.sock"
    flags = ["--bundle", str(bundle), "--trust", str(keys.dir), "--port", "0"]
    with serving(*flags, "--socket", str(sock)) as (address, _):
        url = f"http://{address}"
        got = summary(loadtest("--url", url, "--requests", "300", "--concurrency", "3"))
        assert got["requests"] == 300  # bounded by count, well inside the 10 s default
        assert got["ok"] == 300
        assert got["errors"] == 0
        assert got["busy_503"] == 0
        assert got["encoding"] == "binary"
        assert got["duration_s"] < 10
        lat = got["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert got["throughput_rps"] > 0

        got = summary(loadtest("--socket", str(sock), "--json", "--batch", "4", "--requests", "50"))
        assert got["target"] == f"unix:{sock}"
        assert got["encoding"] == "json"
        assert got["ok"] == 50
        assert got["inferences_per_s"] == pytest.approx(4 * got["throughput_rps"], rel=0.01)

        # Bounded in time: a second and a half, then the threads stop.
        got = summary(loadtest("--url", url, "--duration", "1.5", "--concurrency", "2"))
        assert 1.4 <= got["duration_s"] < 5
        assert got["ok"] > 0

        text = subprocess.run(
            [AGENT, "loadtest", "--url", url, "--model", "tiny", "--requests", "20", "-q"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert text.returncode == 0, text.stderr
        assert "requests    20 answered, 20 ok" in text.stdout
        assert "busy (503)  0" in text.stdout


def test_a_full_queue_answers_503_with_retry_after_and_health_stays_200(  # type: ignore[no-untyped-def]
    keys: Keys, signed
) -> None:
    bundle, _ = signed("1.0.0")
    flags = ["--bundle", str(bundle), "--trust", str(keys.dir), "--port", "0"]
    with serving(*flags, "--workers", "1", "--max-queue", "0") as (address, _):
        got = summary(
            loadtest("--url", f"http://{address}", "--concurrency", "12", "--duration", "3",
                     "--batch", "256")
        )  # fmt: skip
        assert got["busy_503"] > 0, got
        assert set(got["retry_after"]) == {"1"}
        assert got["ok"] > 0
        assert got["errors"] == 0
        host, port = address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
        conn.close()


def test_what_cannot_be_driven_is_refused_clearly(keys: Keys, signed) -> None:  # type: ignore[no-untyped-def]
    bundle, _ = signed("1.0.0")
    flags = ["--bundle", str(bundle), "--trust", str(keys.dir), "--port", "0"]
    with serving(*flags) as (address, _):
        url = f"http://{address}"
        done = subprocess.run(
            [AGENT, "loadtest", "--url", url, "--model", "nope"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2
        assert "/v2/models/nope answered 404" in done.stderr
        for bad, says in (
            (["--concurrency", "0"], "--concurrency must be 1 to 256"),
            (["--duration", "0"], "--duration must be above 0"),
            (["--batch", "0"], "--batch must be 1 or more"),
        ):
            done = loadtest("--url", url, *bad)
            assert done.returncode == 2, bad
            assert says in done.stderr
    done = loadtest("--url", "http://127.0.0.1:9", "--requests", "1")
    assert done.returncode == 3
    assert "cannot reach the API" in done.stderr


def test_inputs_follow_the_metadata() -> None:
    meta = {
        "name": "m",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 3, -1]},
            {"name": "ids", "datatype": "INT64", "shape": [-1]},
            {"name": "text", "datatype": "BYTES", "shape": [-1, 2]},
        ],
    }
    assert shapes(meta, 5) == [("x", "FP32", [5, 3, 1]), ("ids", "INT64", [5]),
                               ("text", "BYTES", [5, 2])]  # fmt: skip
    binary = make_request(meta, batch=5)
    head_len = int(binary.headers["Inference-Header-Content-Length"])
    head = json.loads(binary.body[:head_len])
    sizes = [t["parameters"]["binary_data_size"] for t in head["inputs"]]
    assert sizes[:2] == [5 * 3 * 4, 5 * 8]
    assert len(binary.body) == head_len + sum(sizes)
    assert binary.path == "/v2/models/m/infer"
    js = json.loads(make_request(meta, batch=2, binary=False, version="7").body)
    assert len(js["inputs"][0]["data"]) == 6
    assert all(isinstance(s, str) for s in js["inputs"][2]["data"])
    with pytest.raises(ConfigError, match="fixed leading dimension"):
        shapes({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3]}]}, 4)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert percentile([], 50) is None


def test_locust_runs_the_shipped_locustfile_headless(keys: Keys, signed) -> None:  # type: ignore[no-untyped-def]
    bundle, _ = signed("1.0.0")
    flags = ["--bundle", str(bundle), "--trust", str(keys.dir), "--port", "0"]
    locust = str(Path(sys.executable).parent / "locust")
    with serving(*flags) as (address, _):
        done = subprocess.run(
            [
                locust, "-f", str(REPO / "bench" / "locustfile.py"), "--headless",
                "--host", f"http://{address}", "--model", "tiny", "--batch", "2",
                "-u", "3", "-r", "3", "-t", "10s", "--json", "--only-summary",
                "--loglevel", "WARNING",
            ],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stats = {s["name"]: s for s in json.loads(done.stdout)}
    assert stats["metadata"]["num_requests"] == 3  # once per user
    assert stats["infer"]["num_requests"] > 10, stats["infer"]
    assert stats["infer"]["num_failures"] == 0
    assert stats["infer"]["method"] == "POST"


def _used() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(info["MemTotal"].split()[0])
    return 1 - int(info["MemAvailable"].split()[0]) / total


def test_the_memory_breaker_sheds_load_while_memory_is_high_and_serves_again_after(  # type: ignore[no-untyped-def]
    keys: Keys, signed
) -> None:
    """The threshold sits 8 points above the memory in use now; a second process then takes
    16 points more (written, so the pages are real): requests get 503 with Retry-After while it
    holds them, health stays 200, and once it lets go, the same load is served again."""
    bundle, _ = signed("1.0.0")
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    threshold = round(_used() + 0.08, 3)
    assert threshold < 0.8, "the box is too full to take 16% more for this test"
    flags = ["--bundle", str(bundle), "--trust", str(keys.dir), "--port", "0"]
    with serving(*flags, "--memory-threshold", str(threshold)) as (address, _):
        url = f"http://{address}"
        before = summary(loadtest("--url", url, "--duration", "1.5"))
        assert before["ok"] > 0
        assert before["busy_503"] == 0, before

        hog = subprocess.Popen(
            [sys.executable, "-c",
             f"import sys, time; b = b'x' * {int(total * 0.16)}; print('held', flush=True); "
             "sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert hog.stdout is not None
            assert hog.stdout.readline() == "held\n"
            assert _used() > threshold
            shed = loadtest("--url", url, "--duration", "2.5", "--concurrency", "2")
            host, port = address.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/v2/health/live")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            hog.communicate("", timeout=30)  # it lets go
        during = json.loads(shed.stdout.strip().splitlines()[-1])
        assert shed.returncode == (0 if during["ok"] else 1)  # 1: not one request served
        assert during["busy_503"] > 0, during
        assert during["busy_503"] > during["ok"], during
        assert set(during["retry_after"]) == {"1"}
        assert during["errors"] == 0

        after = summary(loadtest("--url", url, "--duration", "1.5"))
        assert after["ok"] > 0, after
        assert after["errors"] == 0
