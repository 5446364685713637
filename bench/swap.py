"""A hot swap under a request stream: failed requests, latency during the swap, time to swap.

The agent (``--role agent``, a process of its own) serves ``tiny`` 1.0.0 as the daemon does: two
ONNX models of the same shapes (y = relu(x @ W + B), x FP32[N, 64], y FP32[N, 10], different
weights) are built into bundles with self-test samples and unpacked, a ``SlotManager`` restores
1.0.0, and an ``InferenceApi`` on ``serve_api``'s uvicorn listens on a free port of 127.0.0.1.
This process streams requests at it: ``--concurrency`` threads, each with its own
``tritonclient.http`` client, binary tensors both ways, batch sizes cycling 1..8, each thread
sending its next request when the last one is answered. After ``--warmup`` + ``--steady``
seconds it tells the agent to ``SlotManager.deploy`` 2.0.0 (load, warm up, self-test, swap,
probation of ``--probation`` seconds) and streams on until the deployment is done and
``--window-after`` seconds more.

Every answer is checked: it must be 200, name a version, and equal (within 1e-4) numpy's answer
of that version's model for its input. Anything else (an exception, another status, a wrong or
unattributable answer) is a failed request.

Progress goes to stderr; the last line of stdout is one JSON object:

  failed_requests   failed requests over the whole stream (goal 0)
  swap_s            from the call to SlotManager.deploy to the first 2.0.0 answer (the
                    agent and this process read the same monotonic clock)
  steady_p99_ms     p99 latency of the requests that started after the ``--warmup`` seconds
                    and ended before the deploy call
  swap_p99_ms       p99 latency of the requests in flight at any time in the swap window:
                    from the deploy call until both the first 2.0.0 answer has arrived and
                    the old version is closed, and ``--window-after`` seconds more (load,
                    warm-up, self-test, swap, the old version's drain and close, and the new
                    version's first requests all fall in it)
  p99_ratio         swap_p99_ms / steady_p99_ms (goal <= 2)
  requests          requests answered or failed over the whole stream
  stale_answers     1.0.0 answers to requests sent after a 2.0.0 answer had arrived, when
                    the deployment ended active (the swap went back; counted in
                    failed_requests too)
  deployment_phase  how the deployment ended: active, or rolled-back when probation judged
                    2.0.0 worse than 1.0.0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tritonclient.http as triton  # type: ignore[import-untyped]
from _common import say

from agent.serving.api import ApiSettings, InferenceApi
from agent.serving.server import serve_api
from agent.serving.slots import SlotManager, SlotSettings, Version
from agent.testing.models import make_onnx, reference, slot_candidate
from agent.transport.messages import Phase

MODEL_NAME = "tiny"
VERSIONS = ("1.0.0", "2.0.0")
WAIT_S = 60.0


# -- models -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    x: np.ndarray
    want: dict[str, np.ndarray]  # version -> its model's answer


def make_cases(
    models: dict[str, Path], *, inputs: int, max_batch: int, count: int, seed: int
) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        x = rng.standard_normal((i % max_batch + 1, inputs), dtype=np.float32)
        cases.append(Case(x, {v: reference(m, x) for v, m in models.items()}))
    return cases


# -- the agent (its own process) ------------------------------------------------------------------
def agent_role(args: argparse.Namespace) -> int:
    """Serve 1.0.0; on ``deploy`` from stdin, deploy 2.0.0; stop when stdin closes.

    Says ``port N``, then ``deploying T`` (the monotonic time just before the deploy call) and
    ``done PHASE T C`` on stdout (C: when the old version was closed; 0 if it was not).
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    settings = SlotSettings(
        probation_s=args.probation, load_timeout_s=WAIT_S, drain_timeout_s=WAIT_S / 4
    )
    with tempfile.TemporaryDirectory(prefix="bench-swap-agent-") as tmp:
        work = Path(tmp)
        old = slot_candidate(Path(args.v1), work, version=VERSIONS[0], name=MODEL_NAME)
        new = slot_candidate(Path(args.v2), work, version=VERSIONS[1], name=MODEL_NAME)
        slots = SlotManager(settings)
        phase = slots.restore(old).result(timeout=WAIT_S)
        if phase != Phase.ACTIVE:
            print(f"{old.version} did not load: {phase}", file=sys.stderr)
            return 1
        api = ApiSettings(port=0, unix_socket=None)
        server = serve_api(InferenceApi(slots, api), api)
        try:
            assert server.tcp_address is not None
            print(f"port {server.tcp_address[1]}", flush=True)
            for line in sys.stdin:
                if line.strip() != "deploy":
                    continue
                retired = slots.describe(MODEL_NAME)
                assert retired is not None
                closed: list[float] = []

                def watch(version: Version = retired, at: list[float] = closed) -> None:
                    if version.closed.wait(WAIT_S * 2):
                        at.append(time.monotonic())

                watcher = threading.Thread(target=watch, name="watch-closed", daemon=True)
                watcher.start()
                started = time.monotonic()
                future = slots.deploy(new)
                print(f"deploying {started!r}", flush=True)
                phase = future.result(timeout=WAIT_S * 2)
                finished = time.monotonic()
                watcher.join(0 if phase == Phase.FAILED else WAIT_S)  # failed: 1.0.0 serves on
                print(
                    f"done {phase.value} {finished!r} {closed[0] if closed else 0.0!r}", flush=True
                )
        finally:
            server.stop()
            slots.close()
    return 0


@contextlib.contextmanager
def agent_process(
    v1: Path, v2: Path, probation: float, log_file: Path
) -> Iterator[subprocess.Popen[str]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--role", "agent"]
    command += ["--v1", str(v1), "--v2", str(v2), "--probation", str(probation)]
    with open(log_file, "ab") as err:
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        yield proc
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(WAIT_S / 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT_S / 4)
        if proc.stdout is not None:
            proc.stdout.close()


def read_line(proc: subprocess.Popen[str], timeout: float, log_file: Path) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        log = log_file.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError("the agent said nothing (or exited):\n" + "\n".join(log))
    return line.strip()


# -- the stream -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    began: float  # monotonic
    ended: float
    version: str | None  # None: failed
    error: str | None


class Stream:
    """``concurrency`` threads sending requests back to back until :meth:`stop`."""

    def __init__(self, url: str, cases: Sequence[Case], concurrency: int) -> None:
        self.url = url
        self.cases = cases
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Barrier(concurrency + 1)
        self._threads = [
            threading.Thread(target=self._run, args=(n * 7,), name=f"stream-{n}")
            for n in range(concurrency)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()
        self._ready.wait(WAIT_S)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WAIT_S)

    def _run(self, offset: int) -> None:
        client = triton.InferenceServerClient(self.url, connection_timeout=10, network_timeout=30)
        prepared = []
        for case in self.cases:
            tensor = triton.InferInput("x", list(case.x.shape), "FP32")
            tensor.set_data_from_numpy(case.x, binary_data=True)
            prepared.append(([tensor], [triton.InferRequestedOutput("y", binary_data=True)]))
        answers = []
        self._ready.wait(WAIT_S)
        i = offset
        while not self._stop.is_set():
            case = self.cases[i % len(self.cases)]
            inputs, outputs = prepared[i % len(self.cases)]
            i += 1
            began = time.monotonic()
            version: str | None = None
            error: str | None = None
            try:
                result = client.infer(MODEL_NAME, inputs, outputs=outputs)
                got = result.as_numpy("y")
                named = str(result.get_response().get("model_version"))
                want = case.want.get(named)
                if want is None:
                    error = f"an answer names version {named!r}"
                elif got is None or got.shape != want.shape:
                    error = f"an answer of {named} has the wrong shape"
                elif not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                    others = [v for v, w in case.want.items() if np.allclose(got, w, 1e-4, 1e-4)]
                    error = f"an answer named {named} is {others or 'no version'}'s"
                else:
                    version = named
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            answers.append(Answer(began, time.monotonic(), version, error))
        client.close()
        with self._lock:
            self.answers += answers


def percentile_ms(latencies: Sequence[float], q: float) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 3)


# -- main -------------------------------------------------------------------------------------------
@dataclass
class Timeline:
    """Monotonic times of the run (None: not reached)."""

    steady_from: float = 0.0
    deploy_at: float | None = None
    done_at: float | None = None
    closed_at: float | None = None  # the old version closed
    phase: str | None = None


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--role", choices=["bench", "agent"], default="bench")
    parser.add_argument("--v1", help=argparse.SUPPRESS)
    parser.add_argument("--v2", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not measured")
    parser.add_argument("--steady", type=float, default=5.0, help="steady seconds measured")
    parser.add_argument("--probation", type=float, default=2.0, help="SlotSettings.probation_s")
    parser.add_argument("--window-after", type=float, default=0.5, help="see swap_p99_ms")
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=8, help="batches cycle 1..max-batch")
    args = parser.parse_args()
    if args.role == "agent":
        return agent_role(args)

    began = time.monotonic()
    times = Timeline()
    answers: list[Answer] = []
    error: str | None = None
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        try:
            answers = run(Path(tmp), args, times)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            say(error)
    result = analyze(answers, times, args.window_after)
    if error is not None:
        result["error"] = error
    result |= {
        "deployment_phase": times.phase,
        "deployment_s": None
        if times.done_at is None or times.deploy_at is None
        else round(times.done_at - times.deploy_at, 3),
        "concurrency": args.concurrency,
        "client": f"{args.concurrency} threads, a tritonclient.http client each, binary tensors",
        "model": f"relu(x @ W + B), x FP32[N, {args.inputs}], y FP32[N, {args.outputs}]",
        "batch": f"1..{args.max_batch}, cycled",
        "probation_s": args.probation,
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - began, 1),
    }
    print(json.dumps(result))
    return 0 if error is None else 1


def run(work: Path, args: argparse.Namespace, times: Timeline) -> list[Answer]:
    models = {
        v: make_onnx(work / f"m{v}.onnx", inputs=args.inputs, outputs=args.outputs, seed=s)
        for v, s in zip(VERSIONS, (1, 2), strict=True)
    }
    cases = make_cases(models, inputs=args.inputs, max_batch=args.max_batch, count=64, seed=3)
    log_file = work / "agent.log"
    say("starting the agent (bundles of 1.0.0 and 2.0.0 built and unpacked, 1.0.0 restored)")
    with agent_process(models[VERSIONS[0]], models[VERSIONS[1]], args.probation, log_file) as proc:
        line = read_line(proc, WAIT_S, log_file)
        if not line.startswith("port "):
            raise RuntimeError(f"the agent said {line!r}")
        url = f"127.0.0.1:{int(line.split()[1])}"
        stream = Stream(url, cases, args.concurrency)
        say(f"streaming to {url} ({args.concurrency} threads, binary tensors)")
        stream.start()
        times.steady_from = time.monotonic() + args.warmup
        try:
            time.sleep(args.warmup + args.steady)
            assert proc.stdin is not None
            proc.stdin.write("deploy\n")
            proc.stdin.flush()
            say(f"deploying {VERSIONS[1]}")
            times.deploy_at = float(read_line(proc, WAIT_S, log_file).split()[1])
            _, phase, done_at, closed_at = read_line(proc, WAIT_S * 3, log_file).split()
            times.phase, times.done_at = phase, float(done_at)
            times.closed_at = float(closed_at) or None
            say(f"deployment {phase} after {times.done_at - times.deploy_at:.3f} s")
            time.sleep(args.window_after)
        finally:
            stream.stop()
    return stream.answers


def analyze(answers: Sequence[Answer], times: Timeline, window_after: float) -> dict[str, Any]:
    """The figures of the module docstring."""
    failed = [a for a in answers if a.version is None]
    new = [a.ended for a in answers if a.version == VERSIONS[1]]
    first_new = min(new) if new else None
    # A rollback serves 1.0.0 again on purpose: only a deployment that stayed active must not.
    stale = [
        a
        for a in answers
        if times.phase == Phase.ACTIVE.value
        and first_new is not None
        and a.began > first_new
        and a.version == VERSIONS[0]
    ]
    deploy_at = times.deploy_at
    steady = [
        a.ended - a.began
        for a in answers
        if times.steady_from <= a.began and (deploy_at is None or a.ended < deploy_at)
    ]
    swap: list[float] = []
    swap_end = None
    if deploy_at is not None:
        marks = [t for t in (first_new, times.closed_at) if t is not None]
        swap_end = max(marks, default=deploy_at)
        swap = [
            a.ended - a.began
            for a in answers
            if a.ended >= deploy_at and a.began < swap_end + window_after
        ]
    steady_p99, swap_p99 = percentile_ms(steady, 0.99), percentile_ms(swap, 0.99)
    errors: dict[str, int] = {}
    for a in failed:
        key = (a.error or "?")[:200]
        errors[key] = errors.get(key, 0) + 1
    steady_s = (deploy_at or times.steady_from) - times.steady_from
    return {
        "failed_requests": len(failed) + len(stale),
        "p99_ratio": round(swap_p99 / steady_p99, 3) if swap_p99 and steady_p99 else None,
        "swap_s": round(first_new - deploy_at, 4)
        if first_new is not None and deploy_at is not None
        else None,
        "requests": len(answers),
        "steady_p99_ms": steady_p99,
        "swap_p99_ms": swap_p99,
        "steady_p50_ms": percentile_ms(steady, 0.5),
        "swap_p50_ms": percentile_ms(swap, 0.5),
        "steady_max_ms": percentile_ms(steady, 1.0),
        "swap_max_ms": percentile_ms(swap, 1.0),
        "steady_requests": len(steady),
        "steady_rps": round(len(steady) / steady_s, 1) if steady_s > 0 else None,
        "swap_window_requests": len(swap),
        "swap_window_s": None
        if swap_end is None or deploy_at is None
        else round(swap_end + window_after - deploy_at, 3),
        "old_version_closed_s": None
        if times.closed_at is None or deploy_at is None
        else round(times.closed_at - deploy_at, 4),
        "answers_by_version": {v: sum(a.version == v for a in answers) for v in VERSIONS},
        "stale_answers": len(stale),
        "errors": errors,
    }


if __name__ == "__main__":
    sys.exit(main())
