"""``edge-agent loadtest``: drive a model's KServe v2 API the way perf_analyzer does.

The model's metadata (``GET /v2/models/{name}``) says its inputs; :func:`make_request` makes one
request body of the right names, datatypes and shapes (random data; ``-1`` in the leading
dimension takes the batch size, any other ``-1`` takes 1), in binary tensors or JSON. Then
``concurrency`` threads each keep one connection and send that request again as soon as the
answer is in (a closed loop), until ``duration_s`` seconds or ``max_requests`` requests, and
every answer's latency and status is kept. A 503 is counted apart with its Retry-After, and
the thread that got it waits that long (at most :data:`MAX_BACKOFF_S`) before its next
request, as a well-behaved client of the agent does.

Works against the daemon's API (TCP or its Unix socket) and against ``edge-agent serve``.
Bounded in count and time: at most :data:`MAX_CONCURRENCY` threads, :data:`MAX_DURATION_S`
seconds and :data:`MAX_REQUESTS` requests. Also the request maker of ``bench/locustfile.py``.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from agent._lazy import lazy_module
from agent.errors import ConfigError, EdgeAgentError

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

MAX_CONCURRENCY = 256
MAX_DURATION_S = 3600.0
MAX_REQUESTS = 10_000_000
MAX_BACKOFF_S = 5.0
TIMEOUT_S = 30.0
_NUMPY = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}  # fmt: skip


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to the agent's API on its Unix socket."""

    def __init__(self, path: Path, timeout: float = TIMEOUT_S) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.unix_path))
        except BaseException:  # no agent listening: nothing is left open
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Target:
    """Where the API answers: ``url`` (``http://host:port``) or a Unix ``socket``."""

    url: str | None = None
    socket: Path | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.socket is None):
            raise ConfigError("give the API as --url URL or --socket PATH (one of them)")
        if self.url is not None:
            u = urlsplit(self.url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ConfigError(f"--url {self.url!r}: give http://HOST:PORT")

    def connection(self) -> http.client.HTTPConnection:
        if self.socket is not None:
            return UnixHTTPConnection(self.socket)
        u = urlsplit(self.url or "")
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        return cls(u.hostname or "", u.port, timeout=TIMEOUT_S)

    @property
    def where(self) -> str:
        return self.url if self.url is not None else f"unix:{self.socket}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get_json(self, path: str) -> Any:
        conn = self.connection()
        try:
            conn.request("GET", path, headers=self.headers())
            reply = conn.getresponse()
            body = reply.read()
        except OSError as exc:
            raise EdgeAgentError(f"cannot reach the API at {self.where}: {exc}") from None
        finally:
            conn.close()
        if reply.status != 200:
            text = body.decode("utf-8", "replace")[:300]
            raise ConfigError(f"GET {path} answered {reply.status}: {text}")
        try:
            return json.loads(body)
        except ValueError:
            raise EdgeAgentError(f"GET {path} did not answer JSON") from None


@dataclass(frozen=True)
class Request:
    """One inference request, ready to send again and again."""

    path: str
    body: bytes
    headers: dict[str, str]
    batch: int
    binary: bool


def model_path(model: str, version: str | None = None) -> str:
    base = f"/v2/models/{quote(model, safe='')}"
    return base + (f"/versions/{quote(version, safe='')}" if version else "")


def read_metadata(target: Target, model: str, version: str | None = None) -> dict[str, Any]:
    doc = target.get_json(model_path(model, version))
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise EdgeAgentError(f"the metadata of {model} names no inputs")
    return doc


def shapes(metadata: Mapping[str, Any], batch: int) -> list[tuple[str, str, list[int]]]:
    """Each input's (name, datatype, shape): -1 in the leading dimension is ``batch``,
    elsewhere 1."""
    out = []
    for spec in metadata["inputs"]:
        dims = [int(d) for d in spec.get("shape", [])]
        shape = [(batch if i == 0 else 1) if d < 0 else d for i, d in enumerate(dims)]
        if batch != 1 and not (dims and dims[0] < 0):
            raise ConfigError(
                f"input {spec['name']} has a fixed leading dimension ({dims[:1] or 'none'}): "
                "the model takes no --batch"
            )
        out.append((str(spec["name"]), str(spec["datatype"]), shape))
    return out


def _random(datatype: str, shape: Sequence[int], rng: Any) -> Any:
    if datatype == "BYTES":
        count = math.prod(shape)
        return [bytes(rng.integers(97, 123, size=8, dtype=np.uint8)) for _ in range(count)]
    if datatype not in _NUMPY:
        raise ConfigError(f"cannot make {datatype} inputs")
    dtype = np.dtype(_NUMPY[datatype])
    if dtype.kind == "f":
        return rng.standard_normal(size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, dtype=dtype)


def make_request(
    metadata: Mapping[str, Any],
    *,
    batch: int = 1,
    binary: bool = True,
    version: str | None = None,
    seed: int = 0,
) -> Request:
    """The request a load test sends: random inputs of the shapes :func:`shapes` says."""
    rng = np.random.default_rng(seed)
    inputs, raw = [], []
    for name, datatype, shape in shapes(metadata, batch):
        data = _random(datatype, shape, rng)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            if datatype == "BYTES":
                chunk = b"".join(struct.pack("<I", len(b)) + b for b in data)
            else:
                chunk = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            raw.append(chunk)
        elif datatype == "BYTES":
            tensor["data"] = [b.decode() for b in data]
        else:
            tensor["data"] = data.ravel().tolist()
        inputs.append(tensor)
    doc: dict[str, Any] = {"inputs": inputs}
    headers = {"Content-Type": "application/json"}
    if binary:
        doc["parameters"] = {"binary_data_output": True}
    head = json.dumps(doc, separators=(",", ":")).encode()
    if binary:
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        }
    path = model_path(str(metadata.get("name") or ""), version) + "/infer"
    return Request(path, head + b"".join(raw), headers, batch, binary)


# -- running ------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the threads saw so far (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)  # seconds, of 200 answers
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: Counter[str] = field(default_factory=Counter)  # header value -> 503s with it
    failures: Counter[str] = field(default_factory=Counter)  # connection errors by kind
    sent: int = 0

    def answered(self) -> int:
        return sum(self.statuses.values())


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Progress:
    elapsed_s: float
    answered: int
    ok: int
    rps: float
    p99_ms: float | None
    errors: int
    busy: int


def run(
    target: Target,
    request: Request,
    *,
    concurrency: int = 4,
    duration_s: float = 10.0,
    max_requests: int | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_every_s: float = 1.0,
) -> dict[str, Any]:
    """Drive the API; return the summary (see :func:`summary`)."""
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ConfigError(f"--concurrency must be 1 to {MAX_CONCURRENCY}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ConfigError(f"--duration must be above 0 and at most {MAX_DURATION_S:.0f} s")
    if max_requests is not None and not 1 <= max_requests <= MAX_REQUESTS:
        raise ConfigError(f"--requests must be 1 to {MAX_REQUESTS}")
    stop = stop or threading.Event()
    tally = Tally()
    started = time.monotonic()
    deadline = started + duration_s
    budget = max_requests if max_requests is not None else MAX_REQUESTS
    headers = {**request.headers, **target.headers()}

    def take_one() -> bool:
        with tally.lock:
            if tally.sent >= budget:
                return False
            tally.sent += 1
            return True

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            while not stop.is_set() and time.monotonic() < deadline and take_one():
                conn = conn or target.connection()
                t0 = time.perf_counter()
                try:
                    conn.request("POST", request.path, request.body, headers)
                    reply = conn.getresponse()
                    reply.read()
                except (OSError, http.client.HTTPException) as exc:
                    with tally.lock:
                        tally.failures[type(exc).__name__] += 1
                    conn.close()
                    conn = None
                    stop.wait(0.1)
                    continue
                took = time.perf_counter() - t0
                with tally.lock:
                    tally.statuses[reply.status] += 1
                    if reply.status == 200:
                        tally.latencies.append(took)
                    elif reply.status == 503:
                        tally.retry_after[reply.getheader("Retry-After") or "none"] += 1
                if reply.status == 503:
                    wait = _seconds(reply.getheader("Retry-After"))
                    stop.wait(min(wait, MAX_BACKOFF_S, max(0.0, deadline - time.monotonic())))
                if reply.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    threads = [
        threading.Thread(target=worker, name=f"loadtest-{i}", daemon=True)
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    last = (started, 0)
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(progress_every_s / max(1, len(threads)))
        now = time.monotonic()
        if on_progress is not None and now - last[0] >= progress_every_s:
            with tally.lock:
                answered = tally.answered()
                ok = len(tally.latencies)
                recent = sorted(tally.latencies[-2000:])
                errors = answered - ok - tally.statuses[503] + sum(tally.failures.values())
                busy = tally.statuses[503]
            rps = (answered - last[1]) / max(1e-9, now - last[0])
            p99 = percentile(recent, 99)
            on_progress(
                Progress(now - started, answered, ok, rps, None if p99 is None else p99 * 1e3,
                         errors, busy)
            )  # fmt: skip
            last = (now, answered)
    elapsed = time.monotonic() - started
    return summary(tally, elapsed, request, concurrency, target)


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0


def summary(
    tally: Tally, elapsed_s: float, request: Request, concurrency: int, target: Target
) -> dict[str, Any]:
    lat = sorted(tally.latencies)
    answered = tally.answered()
    ok = len(lat)
    busy = tally.statuses[503]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1e3, 3)

    return {
        "target": target.where,
        "path": request.path,
        "encoding": "binary" if request.binary else "json",
        "batch": request.batch,
        "concurrency": concurrency,
        "duration_s": round(elapsed_s, 3),
        "requests": answered,
        "ok": ok,
        "throughput_rps": round(ok / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "inferences_per_s": round(ok * request.batch / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "latency_ms": {
            "p50": ms(percentile(lat, 50)),
            "p90": ms(percentile(lat, 90)),
            "p99": ms(percentile(lat, 99)),
            "mean": ms(sum(lat) / ok) if ok else None,
            "max": ms(lat[-1]) if lat else None,
        },
        "errors": answered - ok - busy + sum(tally.failures.values()),
        "busy_503": busy,
        "retry_after": dict(sorted(tally.retry_after.items())),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "connection_errors": dict(sorted(tally.failures.items())),
    }


def render(s: Mapping[str, Any]) -> str:
    lat = s["latency_ms"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    lines = [
        f"{s['target']} {s['path']}: {s['encoding']} inputs, batch {s['batch']}, "
        f"{s['concurrency']} at once, {s['duration_s']:.1f} s",
        f"requests    {s['requests']} answered, {s['ok']} ok "
        f"({s['throughput_rps']:.1f}/s, {s['inferences_per_s']:.1f} inferences/s)",
        f"latency     p50 {f(lat['p50'])}  p90 {f(lat['p90'])}  p99 {f(lat['p99'])}  "
        f"max {f(lat['max'])}",
        f"errors      {s['errors']}"
        + (
            f" (statuses {s['statuses']}, connections {s['connection_errors']})"
            if s["errors"]
            else ""
        ),
    ]
    if s["busy_503"]:
        after = ", ".join(f"{n} with Retry-After {v}" for v, n in s["retry_after"].items())
        lines.append(f"busy (503)  {s['busy_503']}: {after}")
    else:
        lines.append("busy (503)  0")
    return "\n".join(lines)
