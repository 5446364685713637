"""Throughput of the agent's local inference API, against MLServer and plain ONNX Runtime.

One small ONNX model, y = relu(x @ W + B) with x FP32[N, 64] and y FP32[N, 10]; requests cycle
through batch sizes 1..8 (one pool of 64 inputs, the same for every server). Everything runs on
127.0.0.1, on free ports:

* the agent: ``--role agent``, a process of its own running what the daemon runs for a model
  (the model built into a bundle and unpacked, loaded by ``SlotManager.restore`` with the ONNX
  Runtime backend, an ``InferenceApi`` on ``serve_api``'s uvicorn), ``ApiSettings`` defaults
  apart from the listeners;
* MLServer: ``mlserver start`` in a virtual environment of its own (``--mlserver-venv``,
  created on first use and reused after; its dependencies clash with the agent's), serving the
  same model file through ``bench/mlserver_model/ort_model.py``, an ``MLModel`` around an ONNX
  Runtime session with the agent's session options. Its REST API has no binary tensor
  extension, so it gets JSON tensors. It runs in each of ``MLSERVER_CONFIGS``: ``parallel``
  (its default: inference in one worker process), ``inline`` (inference in the server process)
  and ``inline_no_metrics`` (that without its Prometheus middleware); the best counts.

The load generator is this process: ``--concurrency`` threads, each with its own
``tritonclient.http`` client (one keep-alive connection), each sending its next request when the
last one is answered; ``--warmup`` seconds are not counted, the ``--duration`` seconds after
them are. Every answer is checked against numpy's: a wrong answer, an exception or a non-200
counts as a failed request. Client and servers share the machine's cores, the same way for
every server. ``direct_rps`` is ``session.run`` on the same inputs from as many threads of this
process, with the agent's session options. Every server (and the direct run) runs once in each
of ``--rounds`` rounds, one after the other; each figure is from the best round.

Progress goes to stderr; the last line of stdout is one JSON object:

  rps_binary, p50_ms, p99_ms          the agent, binary tensors both ways
  rps_json, json_p50_ms, json_p99_ms  the agent, JSON tensors both ways
  direct_rps                          ONNX Runtime without a server
  mlserver_rps, mlserver_p50_ms, mlserver_p99_ms
                                      MLServer (JSON tensors), its best configuration
                                      (``mlserver_best``; each one's ``mlserver_<name>_rps``);
                                      null with ``mlserver_error`` when it could not be
                                      installed or did not answer
  ratio_vs_mlserver                   rps_binary / mlserver_rps (goal >= 1.5)
  ratio_json_vs_mlserver              rps_json / mlserver_rps (the same wire format)
  *_cpu_ms_per_request                CPU time of the server's processes (or of this, the
                                      client, process) per counted request
  failed_requests                     over every run (goal 0)
  runs_rps                            every run's requests per second, by server, in order
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort
import tritonclient.http as triton  # type: ignore[import-untyped]
from _common import cpu_s, say

from agent.runtime.base import OnnxRuntimeSettings
from agent.serving.api import ApiSettings, InferenceApi
from agent.serving.server import serve_api
from agent.serving.slots import SlotManager
from agent.testing.models import make_onnx, reference, slot_candidate
from agent.transport.messages import Phase

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny"
MLSERVER_VERSION = "1.7.1"
MLSERVER_MODEL = Path(__file__).resolve().parent / "mlserver_model" / "ort_model.py"
DEFAULT_VENV = ROOT / ".bench-venvs" / "mlserver"
WAIT_S = 60.0


# -- the model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    x: np.ndarray
    want: np.ndarray


def make_cases(model: Path, *, inputs: int, max_batch: int, count: int, seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        x = rng.standard_normal((i % max_batch + 1, inputs), dtype=np.float32)
        cases.append(Case(x, reference(model, x)))
    return cases


def session_options(intra_op_threads: int) -> Any:
    """The options ``agent.runtime.onnxrt`` gives its sessions."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    return so


# -- processes ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root`` and its live descendants so far."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is None:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid, seconds in times.items():
        p = pid
        while p > 1:
            if p == root:
                total += seconds
                break
            p = parents.get(p, 0)
    return total


def stop_process(proc: subprocess.Popen[Any], *, group: bool = False) -> None:
    """SIGTERM (to the process group it leads, with ``group``), then SIGKILL after WAIT_S/4."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
    try:
        proc.wait(WAIT_S / 4)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(WAIT_S / 4)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(url: str, proc: subprocess.Popen[Any], log_file: Path, what: str) -> None:
    client = triton.InferenceServerClient(url, connection_timeout=2.0, network_timeout=2.0)
    deadline = time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log_file)}")
            with contextlib.suppress(Exception):
                if client.is_model_ready(MODEL_NAME):
                    return
            time.sleep(0.2)
    finally:
        client.close()
    raise RuntimeError(f"{what} was not ready in {WAIT_S:.0f} s:\n{tail(log_file)}")


# -- load -------------------------------------------------------------------------------------------
Worker = Callable[[int], np.ndarray]  # case index -> the answer
WorkerFactory = Callable[[], tuple[Worker, Callable[[], None]]]  # -> (worker, close it)


@dataclass
class Load:
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.percentile_ms(0.50), self.percentile_ms(0.99)
        per_request = 1000 / self.requests if self.requests else None
        return {
            "rps": round(self.rps, 1),
            "p50_ms": None if p50 is None else round(p50, 3),
            "p99_ms": None if p99 is None else round(p99, 3),
            "requests": self.requests,
            "failures": self.failures,
            "first_error": self.first_error,
            "server_cpu_ms_per_request": None
            if self.server_cpu_s is None or per_request is None
            else round(self.server_cpu_s * per_request, 3),
            "client_cpu_ms_per_request": None
            if per_request is None
            else round(self.client_cpu_s * per_request, 3),
        }


def drive(
    make_worker: WorkerFactory,
    cases: Sequence[Case],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    server_pid: int | None = None,
) -> Load:
    """``concurrency`` threads, each calling its own worker back to back; requests that start in
    the counted window are counted (and timed), every answer is checked against ``cases``."""
    load = Load(seconds=duration_s)
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)
    window: list[float] = []  # [start, end] on the monotonic clock, set once all are ready

    def run(offset: int) -> None:
        try:
            worker, close = make_worker()
        except Exception as exc:
            with lock:
                load.failures += 1
                load.first_error = load.first_error or f"{type(exc).__name__}: {exc}"
            ready.abort()
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            close()
            return
        start, end = window
        latencies: list[float] = []
        failures = counted_failures = 0
        error: str | None = None
        i = offset
        while True:
            began = time.monotonic()
            if began >= end:
                break
            case = cases[i % len(cases)]
            i += 1
            try:
                got = worker(i - 1)
                ok = got.shape == case.want.shape and bool(
                    np.allclose(got, case.want, rtol=1e-4, atol=1e-4)
                )
                problem = None if ok else "an answer differs from the reference"
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:  # counted as failed in the warm-up too
                failures += 1
                error = error or problem
                if began >= start:
                    counted_failures += 1
            elif began >= start:
                latencies.append(time.monotonic() - began)
        close()
        with lock:
            load.latencies += latencies
            load.requests += len(latencies) + counted_failures
            load.failures += failures
            load.first_error = load.first_error or error

    threads = [
        threading.Thread(target=run, args=(n * 7,), name=f"load-{n}") for n in range(concurrency)
    ]
    for t in threads:
        t.start()
    try:
        window += [time.monotonic() + 0.05 + warmup_s, 0.0]
        window[1] = window[0] + duration_s
        ready.wait(WAIT_S)
    except threading.BrokenBarrierError:
        for t in threads:
            t.join(WAIT_S)
        return load
    time.sleep(max(0.0, window[0] - time.monotonic()))
    server0 = tree_cpu_s(server_pid) if server_pid else 0.0
    client0 = cpu_s(os.getpid())
    time.sleep(max(0.0, window[1] - time.monotonic()))
    if server_pid:
        load.server_cpu_s = tree_cpu_s(server_pid) - server0
    load.client_cpu_s = cpu_s(os.getpid()) - client0
    for t in threads:
        t.join(WAIT_S)
    return load


def triton_worker(url: str, cases: Sequence[Case], *, binary: bool) -> WorkerFactory:
    """A factory of workers, each with its own client and its own prepared requests."""

    def make() -> tuple[Worker, Callable[[], None]]:
        client = triton.InferenceServerClient(url, connection_timeout=10.0, network_timeout=30.0)
        prepared = []
        for case in cases:
            tensor = triton.InferInput("x", list(case.x.shape), "FP32")
            tensor.set_data_from_numpy(case.x, binary_data=binary)
            output = triton.InferRequestedOutput("y", binary_data=binary)
            prepared.append(([tensor], [output]))

        def call(index: int) -> np.ndarray:
            inputs, outputs = prepared[index % len(prepared)]
            result = client.infer(MODEL_NAME, inputs, outputs=outputs)
            answer: np.ndarray = result.as_numpy("y")
            return answer

        return call, client.close

    return make


def direct_worker(session: Any, cases: Sequence[Case]) -> WorkerFactory:
    def make() -> tuple[Worker, Callable[[], None]]:
        def call(index: int) -> np.ndarray:
            answer: np.ndarray = session.run(["y"], {"x": cases[index % len(cases)].x})[0]
            return answer

        return call, lambda: None

    return make


# -- the agent (its own process) ------------------------------------------------------------------
def agent_role(args: argparse.Namespace) -> int:
    """Serve ``--model`` as the daemon would; print the port; serve until stdin closes."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        candidate = slot_candidate(
            Path(args.model),
            Path(tmp),
            version="1.0.0",
            name=MODEL_NAME,
            intra_op_threads=args.intra_op_threads,
        )
        slots = SlotManager()
        phase = slots.restore(candidate).result(timeout=WAIT_S)
        if phase != Phase.ACTIVE:
            print(f"the model did not load: {phase}", file=sys.stderr)
            return 1
        settings = ApiSettings(port=0, unix_socket=None, workers=args.workers)
        server = serve_api(InferenceApi(slots, settings), settings)
        try:
            assert server.tcp_address is not None
            print(f"port {server.tcp_address[1]}", flush=True)
            sys.stdin.read()  # until the parent closes it (or exits)
        finally:
            server.stop()
            slots.close()
    return 0


@contextlib.contextmanager
def agent_process(
    model: Path, logs: Path, *, intra_op_threads: int, workers: int
) -> Iterator[tuple[str, int]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--role", "agent"]
    command += ["--model", str(model), "--intra-op-threads", str(intra_op_threads)]
    command += ["--workers", str(workers)]
    log_file = logs / "agent.log"
    with open(log_file, "ab") as err:
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("port "):
            raise RuntimeError(f"the agent did not start:\n{tail(log_file)}")
        url = f"127.0.0.1:{int(line.split()[1])}"
        wait_ready(url, proc, log_file, "the agent")
        yield url, proc.pid
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(WAIT_S / 2)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# -- MLServer (its own virtual environment and processes) -----------------------------------------
def mlserver_requirements() -> list[str]:
    ort_version = importlib.metadata.version("onnxruntime")
    # Newer uvloop (0.23 here) raises in asyncio.get_event_loop() without a running loop, which
    # MLServer 1.7's parallel inference workers call as they start: they die at once with it.
    return [f"mlserver=={MLSERVER_VERSION}", f"onnxruntime=={ort_version}", "uvloop<0.22", "numpy"]


def ensure_mlserver(venv: Path) -> Path:
    """The ``mlserver`` executable of ``venv``, creating the environment on first use."""
    wanted = " ".join(mlserver_requirements())
    marker = venv / ".bench-requirements"
    mlserver = venv / "bin" / "mlserver"
    if mlserver.exists() and marker.exists() and marker.read_text().strip() == wanted:
        return mlserver
    say(f"creating MLServer's environment in {venv} ({wanted})")
    if venv.exists():
        if not (venv / "pyvenv.cfg").exists():
            raise RuntimeError(f"{venv} exists and is not a virtual environment")
        shutil.rmtree(venv)
    python = shutil.which("python3") or sys.executable
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [python, "-m", "venv", str(venv)],
        [*pip, "--disable-pip-version-check", *wanted.split()],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip().splitlines()
            raise RuntimeError(
                f"{' '.join(step[:4])} ... failed ({done.returncode}): " + " | ".join(output[-5:])
            )
        if step[1:3] == ["-m", "venv"]:
            (venv / ".gitignore").write_text("*\n")  # never part of the repository around it
    marker.write_text(wanted + "\n")
    return mlserver


# name -> MLServer settings: ``parallel`` is its default (one inference worker process).
MLSERVER_CONFIGS: dict[str, dict[str, Any]] = {
    "inline": {"parallel_workers": 0},
    "inline_no_metrics": {"parallel_workers": 0, "metrics_endpoint": None},
    "parallel": {"parallel_workers": 1},
}


def mlserver_repository(
    directory: Path, model: Path, config: dict[str, Any], intra_op_threads: int
) -> int:
    """A model repository for ``mlserver start`` with ``config`` on top; returns its HTTP port."""
    directory.mkdir(parents=True)
    shutil.copyfile(model, directory / "model.onnx")
    shutil.copyfile(MLSERVER_MODEL, directory / MLSERVER_MODEL.name)
    port = free_port()
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "metrics_dir": str(directory / ".metrics"),
        "environments_dir": str(directory / ".envs"),
        **config,
    }
    (directory / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": MODEL_NAME,
        "implementation": f"{MLSERVER_MODEL.stem}.OrtModel",
        "parameters": {
            "uri": "./model.onnx",
            "version": "1.0.0",
            "extra": {"intra_op_threads": intra_op_threads},
        },
    }
    (directory / "model-settings.json").write_text(json.dumps(model_settings))
    return port


@contextlib.contextmanager
def mlserver_process(
    mlserver: Path, directory: Path, port: int, logs: Path, tag: str
) -> Iterator[tuple[str, int]]:
    log_file = logs / f"mlserver-{tag}.log"
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            [str(mlserver), "start", str(directory)],
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its worker processes stop with it
        )
    try:
        url = f"127.0.0.1:{port}"
        wait_ready(url, proc, log_file, "MLServer")
        yield url, proc.pid
    finally:
        stop_process(proc, group=True)


# -- main -------------------------------------------------------------------------------------------
@dataclass
class Best:
    """The best run of each configuration over the rounds (by requests per second)."""

    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: int = 0
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, load: Load) -> dict[str, Any]:
        summary = load.summary()
        self.failures += load.failures
        self.runs.setdefault(key, []).append(summary)
        say(f"  {key}: {summary}")
        return summary

    def best(self, key: str) -> dict[str, Any] | None:
        clean = [r for r in self.runs.get(key, []) if r["failures"] == 0 and r["requests"]]
        return max(clean, key=lambda r: r["rps"]) if clean else None


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--role", choices=["bench", "agent"], default="bench")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--duration", type=float, default=4.0, help="counted seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds first")
    parser.add_argument("--rounds", type=int, default=3, help="every server runs once a round")
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=8, help="batches cycle 1..max-batch")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=OnnxRuntimeSettings().intra_op_threads,
        help="ONNX Runtime intra-op threads of every session (0: the runtime's choice)",
    )
    parser.add_argument("--workers", type=int, default=ApiSettings().workers, help="api.workers")
    parser.add_argument("--mlserver-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument(
        "--mlserver-configs",
        default=",".join(MLSERVER_CONFIGS),
        help="MLServer configurations to run (comma-separated); the best counts",
    )
    parser.add_argument("--skip-mlserver", action="store_true")
    args = parser.parse_args()
    if args.role == "agent":
        return agent_role(args)

    began = time.monotonic()
    configs = [c.strip() for c in args.mlserver_configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in MLSERVER_CONFIGS]
    if unknown:
        parser.error(f"unknown MLServer configurations {unknown}; known: {list(MLSERVER_CONFIGS)}")
    result: dict[str, Any] = {
        "model": f"relu(x @ W + B), x FP32[N, {args.inputs}], y FP32[N, {args.outputs}]",
        "batch": f"1..{args.max_batch}, cycled",
        "concurrency": args.concurrency,
        "client": f"{args.concurrency} threads in one process, a tritonclient.http client each",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "intra_op_threads": args.intra_op_threads,
        "agent": "own process: bundle -> SlotManager.restore -> InferenceApi on serve_api",
        "agent_workers": args.workers,
    }
    mlserver: Path | None = None
    if args.skip_mlserver:
        result["mlserver_error"] = "skipped (--skip-mlserver)"
    else:
        try:
            mlserver = ensure_mlserver(args.mlserver_venv)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            result["mlserver_error"] = f"cannot install MLServer: {exc}"
            say(result["mlserver_error"])

    best = Best()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        model = make_onnx(work / "model.onnx", inputs=args.inputs, outputs=args.outputs, seed=1)
        cases = make_cases(model, inputs=args.inputs, max_batch=args.max_batch, count=64, seed=2)
        timing: dict[str, Any] = {
            "concurrency": args.concurrency,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
        }
        session = ort.InferenceSession(
            str(model),
            sess_options=session_options(args.intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
        for round_ in range(1, args.rounds + 1):
            say(f"round {round_} of {args.rounds}")
            best.add("direct", drive(direct_worker(session, cases), cases, **timing))
            try:
                with agent_process(
                    model, logs, intra_op_threads=args.intra_op_threads, workers=args.workers
                ) as (url, pid):
                    for binary in (True, False):
                        load = drive(
                            triton_worker(url, cases, binary=binary),
                            cases,
                            **timing,
                            server_pid=pid,
                        )
                        best.add("agent_binary" if binary else "agent_json", load)
            except RuntimeError as exc:
                best.errors["agent"] = str(exc)
                say(f"  agent: {exc}")
            if mlserver is None:
                continue
            for name in configs:
                key = f"mlserver_{name}"
                directory = work / f"{key}-{round_}"
                port = mlserver_repository(
                    directory, model, MLSERVER_CONFIGS[name], args.intra_op_threads
                )
                try:
                    with mlserver_process(mlserver, directory, port, logs, key) as (url, pid):
                        load = drive(
                            triton_worker(url, cases, binary=False), cases, **timing, server_pid=pid
                        )
                except RuntimeError as exc:
                    best.errors[key] = str(exc)
                    say(f"  {key}: {exc}")
                    continue
                best.add(key, load)

    result |= summarize(best, configs, mlserver is not None)
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(result))
    return 0


def summarize(best: Best, configs: Sequence[str], ran_mlserver: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "agent" in best.errors:
        out["agent_error"] = best.errors.pop("agent")
    direct, binary, plain = best.best("direct"), best.best("agent_binary"), best.best("agent_json")
    out["direct_rps"] = direct["rps"] if direct else None
    out |= {
        "rps_binary": binary["rps"] if binary else None,
        "p50_ms": binary["p50_ms"] if binary else None,
        "p99_ms": binary["p99_ms"] if binary else None,
        "rps_json": plain["rps"] if plain else None,
        "json_p50_ms": plain["p50_ms"] if plain else None,
        "json_p99_ms": plain["p99_ms"] if plain else None,
        "agent_cpu_ms_per_request": binary["server_cpu_ms_per_request"] if binary else None,
        "agent_json_cpu_ms_per_request": plain["server_cpu_ms_per_request"] if plain else None,
        "client_cpu_ms_per_request": binary["client_cpu_ms_per_request"] if binary else None,
    }
    out |= {
        "mlserver_rps": None,
        "mlserver_binary": False,
        "mlserver_note": "MLServer's REST API has no binary tensor extension: it gets JSON tensors",
    }
    if ran_mlserver:
        out["mlserver_version"] = MLSERVER_VERSION
        found = {}
        for name in configs:
            key = f"mlserver_{name}"
            run = best.best(key)
            out[f"{key}_rps"] = run["rps"] if run else None
            if run is not None:
                found[key] = run
        if found:
            key, run = max(found.items(), key=lambda kv: kv[1]["rps"])
            out |= {
                "mlserver_rps": run["rps"],
                "mlserver_p50_ms": run["p50_ms"],
                "mlserver_p99_ms": run["p99_ms"],
                "mlserver_cpu_ms_per_request": run["server_cpu_ms_per_request"],
                "mlserver_best": key.removeprefix("mlserver_"),
            }
        else:
            out["mlserver_error"] = "no MLServer run answered every request"
        if best.errors:
            out["mlserver_errors"] = best.errors
    mlserver_rps = out["mlserver_rps"]
    out["ratio_vs_mlserver"] = (
        round(out["rps_binary"] / mlserver_rps, 3) if mlserver_rps and out["rps_binary"] else None
    )
    out["ratio_json_vs_mlserver"] = (
        round(out["rps_json"] / mlserver_rps, 3) if mlserver_rps and out["rps_json"] else None
    )
    out["failed_requests"] = best.failures
    out["runs_rps"] = {key: [r["rps"] for r in runs] for key, runs in best.runs.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
