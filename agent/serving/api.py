"""The local inference API: the Open Inference Protocol (KServe v2 REST) as an ASGI application.

Routes (``{v}`` is the model's active version; another version is 404)::

    GET  /v2                                   server metadata
    GET  /v2/health/live                       200 while the process serves HTTP
    GET  /v2/health/ready                      200 when at least one model is listed and every
                                               listed model is ready; 400 otherwise (spec: 4xx)
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer
    GET  /v2/models                            repository index (as POST /v2/repository/index)
    POST /v2/repository/index                  Triton's repository index: [{name, version,
                                               state, reason}]; body {"ready": true}: READY only
    GET  /v2/models/{name}[/versions/{v}]/config   Triton's model configuration (see below)
    GET  /v2/models/stats                      Triton's statistics extension, every model
    GET  /v2/models/{name}[/versions/{v}]/stats    ... one model
    GET  /metrics                              Prometheus text format

``/v2/models/stats`` is the statistics of every model, as in Triton: a model named ``stats`` has
its metadata at ``/v2/models/stats/versions/{v}``.

Errors are ``{"error": "..."}`` with 400 (bad JSON, unknown or missing input, wrong datatype or
shape, inputs that disagree on a dimension the model shares between them, a batch over
``max_batch_size``, data that does not fit the shape or the datatype, binary sizes that do not
add up, a JSON output that JSON cannot carry), 401 (token), 404 (unknown model, version or
route), 405, 413 (body over ``max_body_bytes``), 503 with Retry-After (queue full, memory above
the threshold, model not ready) and 500 (the model failed; the traceback is logged and serving
goes on). Bad input never gets a 5xx: a backend raising :class:`~agent.errors.BadContentError`
(FormatError, InputShapeError) is answered with 400 too, and the slot layer does not count it
against the model's probation.

Batch size: the leading dimension of an input whose leading dimension the model leaves dynamic
is the batch, at most ``max_batch_size`` (default 1024); a larger batch gets 400, as Triton
answers a batch over a model's ``max_batch_size`` ("inference request batch-size must be <=
N"). A model with a fixed leading dimension takes exactly that many (its shape says so). The
model configuration reports, as Triton does, ``max_batch_size`` and each tensor's ``dims``
without the batch dimension for a *batched* model (every input and output has a dynamic leading
dimension), and ``max_batch_size: 0`` with the whole shapes for any other.

Non-finite numbers: a JSON answer never holds a bare ``NaN`` or ``Infinity``. RFC 8259 has no
such numbers, and stock clients disagree on them: Triton writes and reads them (rapidjson's
``kWriteNanAndInfFlag``/``kParseNanAndInfFlag``, and tritonclient parses with python-rapidjson),
KServe's Python SDK parses with orjson, which refuses them. So a request for a JSON output that
holds a NaN or an infinity gets 400 naming the output and saying to ask for it with
``binary_data: true``, which carries every IEEE value exactly and which every client reads (a
BYTES output that is not UTF-8 is refused the same way). In requests, the ``NaN``/``Infinity``
tokens and numbers beyond the datatype's range (FP16 ``1e6``, FP32 ``1e39``) get 400; binary
inputs are taken as they come.

Statistics (``model_stats``, for the active version): ``inference_count`` counts inferences
(each row of a batch), ``execution_count`` successful runs; ``success`` and ``fail`` count
requests that reached a worker and their time from admission to the answer; ``queue`` is the
wait for a worker, ``compute_input`` decoding, ``compute_infer`` the model, ``compute_output``
encoding, all in nanoseconds; ``batch_stats`` splits the compute times by batch size.

Authentication: with ``token`` set, every route but ``/v2/health/live`` and
``/v2/health/ready`` needs ``Authorization: Bearer <token>`` (401 otherwise). The health routes
stay open so that probes and ``systemctl``-side checks need no secret; they say nothing about
the models beyond "ready".

Threads: the ASGI callable runs on the event-loop thread of :class:`agent.serving.server.ApiServer`
(routing, auth, admission, reading the body). Everything that parses tensors, leases the model,
runs it and encodes the answer runs on the app's own worker pool (``edge-agent-infer_N``,
``workers`` threads), never on the event loop; admitted requests beyond the workers wait in the
pool's queue, at most ``max_queue`` of them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from agent import __version__
from agent._strictjson import loads
from agent.errors import BadContentError, SizeLimitError
from agent.serving import tensors
from agent.serving.admission import Admission, MemoryReader, SystemMemory
from agent.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.serving.metrics import UNKNOWN_MODEL, ApiMetrics, InferenceStatistics
from agent.serving.replies import (
    Receive,
    Reply,
    Scope,
    Send,
    error_reply,
    json_reply,
    request_headers,
    send_reply,
)
from agent.serving.source import ModelSource, ServedModel, TensorSpec

log = logging.getLogger("agent.serving.api")

SERVER_NAME = "edge-model-agent"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"


class ApiSettings(BaseModel):
    """The ``[api]`` table of agent.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # TCP listener; loopback unless the operator says otherwise. port None: no TCP listener;
    # 0: any free port (tests).
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] | None = 8000
    # Unix socket listener (None: none), created with ``unix_socket_mode``.
    unix_socket: Path | None = Path("/run/edge-agent/api.sock")
    unix_socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    max_body_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    workers: Annotated[int, Field(ge=1, le=256)] = 2  # requests run at once
    max_queue: Annotated[int, Field(ge=0)] = 16  # admitted requests waiting for a worker
    memory_threshold: Annotated[float, Field(gt=0, le=1)] = 0.8  # fraction of RAM (or cgroup)
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 1
    token: Annotated[SecretStr, Field(min_length=16)] | None = None  # bearer token
    max_connections: Annotated[int, Field(ge=1)] = 128  # open connections; beyond: 503
    drain_timeout_s: Annotated[float, Field(gt=0)] = 10.0  # stop(): time for in-flight requests
    access_log: bool = False
    # The most rows one request may carry in a leading dimension the model leaves dynamic.
    # Beyond the body limit this bounds what a request makes the runtime allocate: a model with
    # small rows and large outputs or activations (16 floats in, 1000 out) would otherwise take
    # 64 MiB of input as a million rows and answer with gigabytes. 1024 is far above what an
    # application on the box batches (frames of a few cameras, a page of text) and small enough
    # that such a model's answer stays in megabytes.
    max_batch_size: Annotated[int, Field(ge=1, le=2**31 - 1)] = 1024

    @field_validator("port", "unix_socket", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        """TOML has no null: ``false`` (or ``""`` for the socket) turns a listener off."""
        return None if value is False or value == "" else value

    @field_validator("unix_socket")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        reason: str,
        *headers: tuple[str, str],
        model: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason  # for the errors counter
        self.headers = headers
        self.model = model  # a model the source knows, for the metrics label


_OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "bad_request"}
_OUTCOMES |= {413: "bad_request", 415: "bad_request", 503: "rejected", 500: "error"}


# KServe datatype -> Triton's model configuration DataType.
_CONFIG_TYPES = {"BYTES": "TYPE_STRING"}
# platform -> Triton's backend name, where Triton has one.
_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "openvino": "openvino"}


def batched(model: ServedModel) -> bool:
    """Every input and output has a dynamic leading dimension: Triton's batching model."""
    tensors = [*model.inputs, *model.outputs]
    return bool(model.inputs) and all(t.shape and t.shape[0] == -1 for t in tensors)


def _config_tensor(spec: TensorSpec, batch: bool) -> dict[str, Any]:
    return {
        "name": spec.name,
        "data_type": _CONFIG_TYPES.get(spec.datatype, f"TYPE_{spec.datatype}"),
        "dims": list(spec.shape[1:] if batch else spec.shape),
    }


class InferenceApi:
    """The ASGI application. ``source`` supplies the models; see the module docstring.

    ``memory`` reads the fraction of memory in use (default: :class:`SystemMemory`);
    ``gpu_memory`` is the runtime layer's reader for GPU memory, where there is a GPU. Both are
    called on the event-loop thread before each inference request, so they must be quick
    (cache a reading that is slow to take, as SystemMemory does).

    The app owns a pool of ``workers`` threads; :meth:`close` (which ``ApiServer.stop`` calls)
    ends it.
    """

    def __init__(
        self,
        source: ModelSource,
        settings: ApiSettings | None = None,
        *,
        metrics: ApiMetrics | None = None,
        memory: MemoryReader | None = None,
        gpu_memory: MemoryReader | None = None,
    ) -> None:
        self.source = source
        self.settings = settings or ApiSettings()
        self.metrics = metrics or ApiMetrics()
        self.admission = Admission(
            self.settings.workers + self.settings.max_queue,
            threshold=self.settings.memory_threshold,
            memory=memory or SystemMemory(),
            gpu_memory=gpu_memory,
        )
        self.metrics.queue_capacity.set(value=self.admission.capacity)
        self.metrics.queue_depth.set(value=0)
        self._token = (
            self.settings.token.get_secret_value().encode() if self.settings.token else None
        )
        self._pool = ThreadPoolExecutor(
            self.settings.workers, thread_name_prefix="edge-agent-infer"
        )
        self.statistics = InferenceStatistics()

    def close(self) -> None:
        """Let running and queued requests finish, then stop the worker threads."""
        self._pool.shutdown(wait=True)

    # -- ASGI entry (event-loop thread) ---------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = request_headers(scope)
        try:
            reply = await self._route(scope, receive, headers)
        except _HttpError as exc:
            reply = error_reply(exc.status, exc.message, *exc.headers)
        except Exception:
            log.exception("the inference API failed on %s %s", scope["method"], scope["path"])
            reply = error_reply(500, "internal error (see the agent's log)")
        await send_reply(send, reply, head=scope["method"] == "HEAD")

    async def _route(self, scope: Scope, receive: Receive, headers: dict[str, str]) -> Reply:
        method: str = scope["method"]
        parts = [p for p in scope["path"].split("/") if p]
        if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
            _allow(method, "GET")
            if parts[2] == "live":
                return Reply(200, content_type="text/plain")
            names = self.source.names()
            ready = bool(names) and all(self.source.ready(n) for n in names)
            return Reply(200 if ready else 400, content_type="text/plain")

        if parts in (["v2", "models"], ["v2", "repository", "index"]):
            self._authorize(headers)
            ready_only = False
            if parts[1] == "repository":
                _allow(method, "POST")
                ready_only = self._index_request(await self._read_body(receive, headers, 65536))
            else:
                _allow(method, "GET")
            return json_reply(200, self._index(ready_only))
        if parts == ["v2", "models", "stats"]:
            self._authorize(headers)
            _allow(method, "GET")
            return json_reply(200, {"model_stats": self._all_stats()})

        if parts[:2] == ["v2", "models"] and len(parts) >= 3 and parts[2]:
            name, rest = parts[2], parts[3:]
            version: str | None = None
            if rest[:1] == ["versions"]:
                if len(rest) < 2:
                    raise _HttpError(404, f"no route {scope['path']}", "not-found")
                version, rest = rest[1], rest[2:]
            if rest == ["infer"]:
                return await self._infer(name, version, receive, headers, method)
            self._authorize(headers)
            if rest == []:
                _allow(method, "GET")
                return json_reply(200, self._metadata(name, version))
            if rest == ["ready"]:
                _allow(method, "GET")
                ready = self._model_ready(name, version)
                return Reply(200 if ready else 400, content_type="text/plain")
            if rest == ["config"]:
                _allow(method, "GET")
                return json_reply(200, self._config(self._model(name, version)))
            if rest == ["stats"]:
                _allow(method, "GET")
                model = self._model(name, version)
                stats = self.statistics.model_stats(model.name, model.version)
                return json_reply(200, {"model_stats": [stats]})
            raise _HttpError(404, f"no route {scope['path']}", "not-found")

        self._authorize(headers)
        if parts == ["v2"]:
            _allow(method, "GET")
            meta = {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}
            return json_reply(200, meta)
        if parts == ["metrics"]:
            _allow(method, "GET")
            return Reply(200, self._render_metrics().encode(), METRICS_CONTENT_TYPE)
        raise _HttpError(404, f"no route {scope['path']}", "not-found")

    def _authorize(self, headers: dict[str, str]) -> None:
        if self._token is None:
            return
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            raise _HttpError(
                401,
                "a bearer token is required (Authorization: Bearer <token>)",
                "unauthorized",
                ("WWW-Authenticate", 'Bearer realm="edge-model-agent"'),
            )

    def _model(self, name: str, version: str | None) -> ServedModel:
        """The active version of ``name`` (matching ``version`` when given), or an HTTP error."""
        return self._present(
            name,
            version,
            self.source.describe(name),
            "has no version {version!r} (the active version is {active})",
        )

    def _present(
        self, name: str, version: str | None, model: ServedModel | None, other_version: str
    ) -> ServedModel:
        """``model`` if it is there and is ``version`` (when given); the HTTP error otherwise."""
        if model is None:
            if name in self.source.names():
                raise self._not_ready(name)
            raise _HttpError(404, f"unknown model {name!r}", "not-found")
        if version is not None and version != model.version:
            raise _HttpError(
                404,
                f"model {name!r} " + other_version.format(version=version, active=model.version),
                "not-found",
                model=name,
            )
        return model

    def _model_ready(self, name: str, version: str | None) -> bool:
        model = self.source.describe(name)
        if model is None:
            if name in self.source.names():
                return False
            raise _HttpError(404, f"unknown model {name!r}", "not-found")
        if version is not None and version != model.version:
            raise _HttpError(404, f"model {name!r} has no version {version!r}", "not-found")
        return self.source.ready(name)

    def _not_ready(self, name: str) -> _HttpError:
        return _HttpError(
            503,
            f"model {name!r} is not ready",
            "not-ready",
            ("Retry-After", str(self.settings.retry_after_s)),
            model=name,
        )

    def _metadata(self, name: str, version: str | None) -> dict[str, Any]:
        model = self._model(name, version)
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": model.platform,
            "inputs": [t.model_dump() for t in model.inputs],
            "outputs": [t.model_dump() for t in model.outputs],
        }

    def _index_request(self, body: bytes | bytearray) -> bool:
        """The ``ready`` flag of a repository index request (an empty body: all models)."""
        if not body.strip():
            return False
        try:
            doc = loads(bytes(body), what="the repository index request", max_bytes=len(body))
        except BadContentError as exc:
            raise _HttpError(400, str(exc), "bad-request") from None
        ready = doc.get("ready", False) if isinstance(doc, dict) else None
        if not isinstance(ready, bool) or set(doc) - {"ready"}:
            raise _HttpError(
                400, 'the repository index request is {} or {"ready": true|false}', "bad-request"
            )
        return ready

    def _index(self, ready_only: bool) -> list[dict[str, str]]:
        """Triton's repository index: each model with its active version and state."""
        out = []
        for name in self.source.names():
            model = self.source.describe(name)
            ready = model is not None and self.source.ready(name)
            if ready_only and not ready:
                continue
            entry = {"name": name}
            if model is not None:
                entry["version"] = model.version
            entry["state"] = "READY" if ready else "UNAVAILABLE"
            if not ready:
                entry["reason"] = "no version is loaded" if model is None else "not ready"
            out.append(entry)
        return out

    def _config(self, model: ServedModel) -> dict[str, Any]:
        """The model's configuration in the shape of Triton's (``model_config.proto`` as JSON)."""
        batch = batched(model)
        config: dict[str, Any] = {"name": model.name, "platform": model.platform}
        if model.platform in _BACKENDS:
            config["backend"] = _BACKENDS[model.platform]
        config["max_batch_size"] = self.settings.max_batch_size if batch else 0
        config["input"] = [_config_tensor(t, batch) for t in model.inputs]
        config["output"] = [_config_tensor(t, batch) for t in model.outputs]
        return config

    def _all_stats(self) -> list[dict[str, Any]]:
        out = []
        for name in self.source.names():
            model = self.source.describe(name)
            if model is not None:
                out.append(self.statistics.model_stats(model.name, model.version))
        return out

    def _render_metrics(self) -> str:
        active = []
        for name in self.source.names():
            model = self.source.describe(name)
            if model is not None:
                active.append((model.name, model.version, model.platform))
        self.metrics.queue_depth.set(value=self.admission.depth)
        if self.admission.last_memory is not None:
            self.metrics.memory_used.set(value=self.admission.last_memory)
        return self.metrics.render(active)

    # -- inference ------------------------------------------------------------------------
    async def _infer(
        self,
        name: str,
        version: str | None,
        receive: Receive,
        headers: dict[str, str],
        method: str,
    ) -> Reply:
        label = UNKNOWN_MODEL
        started: float | None = None
        try:
            self._authorize(headers)
            _allow(method, "POST")
            self._model(name, version)
            label = name
            refusal = self.admission.check()
            if refusal is not None:
                raise self._busy(refusal.reason, refusal.message)
            body = await self._read_body(receive, headers)
            if not self.admission.try_acquire():
                raise self._busy("queue-full", "the inference queue is full")
            started = time.perf_counter()
            try:
                future = self._pool.submit(
                    self._run, name, version, body, headers, time.perf_counter_ns()
                )
            except RuntimeError:  # the pool is shut down: the server is stopping
                self.admission.release()
                raise self._busy("stopping", "the inference API is stopping") from None
            future.add_done_callback(lambda _: self.admission.release())
            reply = await asyncio.wrap_future(future)
        except _HttpError as exc:
            seconds = None if started is None else time.perf_counter() - started
            outcome = _OUTCOMES.get(exc.status, "bad_request")
            self.metrics.record_request(exc.model or label, outcome, exc.reason, seconds)
            raise
        self.metrics.record_request(label, "success", None, time.perf_counter() - started)
        return reply

    def _busy(self, reason: str, message: str) -> _HttpError:
        return _HttpError(503, message, reason, ("Retry-After", str(self.settings.retry_after_s)))

    async def _read_body(
        self, receive: Receive, headers: dict[str, str], limit: int | None = None
    ) -> bytearray:
        limit = self.settings.max_body_bytes if limit is None else limit
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _HttpError(
                413, f"the body of {declared} bytes is over the limit of {limit}", "too-large"
            )
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _HttpError(400, "the client went away", "disconnected")
            body += message.get("body", b"")
            if len(body) > limit:
                raise _HttpError(413, f"the body is over the limit of {limit} bytes", "too-large")
            if not message.get("more_body", False):
                return body

    # -- worker threads -------------------------------------------------------------------
    def _run(
        self,
        name: str,
        version: str | None,
        body: bytearray,
        headers: dict[str, str],
        submitted_ns: int,
    ) -> Reply:
        """Decode, lease, run and encode one request (on a worker thread)."""
        begun = time.perf_counter_ns()
        served: ServedModel | None = None  # the version that took the request, for statistics
        try:
            header_length = _header_length(headers)
            with self.source.lease(name) as leased:
                model = self._present(name, version, leased, "no longer serves version {version!r}")
                served = model
                data = tensors.decompress(
                    body, headers.get("content-encoding"), self.settings.max_body_bytes
                )
                request = tensors.decode_request(
                    data, header_length, model, max_batch_size=self.settings.max_batch_size
                )
                decoded = time.perf_counter_ns()
                results = model.infer(request.inputs)
                ran = time.perf_counter_ns()
                try:
                    encoded = tensors.encode_response(
                        model_name=model.name,
                        model_version=model.version,
                        request=request,
                        results=results,
                    )
                except (KeyError, TypeError) as exc:
                    raise _ModelFailure(
                        f"model {name} {model.version} did not return what its metadata says: "
                        f"{exc!r}"
                    ) from exc
            done = time.perf_counter_ns()
        except Exception as exc:
            if served is not None:
                self.statistics.record_failure(
                    served.name,
                    served.version,
                    total_ns=time.perf_counter_ns() - submitted_ns,
                    now_ms=time.time_ns() // 1_000_000,
                )
            raise _http_error(exc, name) from None
        self.statistics.record_success(
            model.name,
            model.version,
            batch=_batch_size(model, request),
            queue=begun - submitted_ns,
            compute_input=decoded - begun,
            compute_infer=ran - decoded,
            compute_output=done - ran,
            now_ms=time.time_ns() // 1_000_000,
        )
        headers_out: tuple[tuple[str, str], ...] = ()
        content_type = "application/json"
        if encoded.header_length is not None:
            headers_out = (("Inference-Header-Content-Length", str(encoded.header_length)),)
            content_type = "application/octet-stream"
        return Reply(200, encoded.body, content_type, headers_out)


class _ModelFailure(RuntimeError):
    pass


def _http_error(exc: Exception, name: str) -> _HttpError:
    """The answer to an exception from a worker: client errors are 4xx, anything else 500."""
    if isinstance(exc, _HttpError):
        return exc
    if isinstance(exc, SizeLimitError):
        return _HttpError(413, str(exc), "too-large")
    if isinstance(exc, BadContentError):
        return _HttpError(400, str(exc), "bad-request")
    log.error("inference on model %s failed", name, exc_info=exc)
    return _HttpError(500, f"inference on model {name!r} failed (see the agent's log)", "internal")


def _batch_size(model: ServedModel, request: tensors.InferRequest) -> int:
    """How many inferences a request carried: its batch for a batched model, else one."""
    if not batched(model):
        return 1
    first = request.inputs[model.inputs[0].name]
    return max(1, int(first.shape[0])) if first.ndim else 1


def _header_length(headers: dict[str, str]) -> int | None:
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise _HttpError(
            400, f"Inference-Header-Content-Length {value!r} is not a number", "bad-request"
        )
    return int(value)


def _allow(method: str, allowed: str) -> None:
    if method == allowed or (allowed == "GET" and method == "HEAD"):
        return
    raise _HttpError(
        405, f"method {method} is not allowed here; use {allowed}", "bad-method", ("Allow", allowed)
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
