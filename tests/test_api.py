"""The local inference API end to end: uvicorn on a free loopback port and a Unix socket, real
ONNX Runtime sessions on tiny models the tests build, and stock clients (tritonclient's HTTP
client; ``http.client`` for hand-made requests and for the Unix socket).

One server serves this whole module (requests do not change its state; metrics are compared as
differences). Models: ``tiny`` (tests/models.py, FP32), ``pair`` (INT32 a + b, two inputs) and
``faulty``: ``tiny`` wrapped so that its ``infer`` raises when asked to, because a real runtime
cannot be made to fail on demand.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import re
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from agent import __version__
from agent.bundle.manifest import TensorSpec
from agent.errors import FormatError
from agent.serving.admission import MemoryReader
from agent.serving.api import ApiSettings, InferenceApi
from agent.serving.server import ApiServer, serve_api
from agent.serving.slots import SlotManager
from agent.serving.source import StaticSource
from agent.testing.fleet import UnixHTTPConnection
from agent.testing.models import make_onnx, make_two_inputs, reference, slot_candidate
from agent.transport.messages import Phase

WAIT = 10.0  # seconds; the bound of every wait in these tests

_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


def _spec(arg: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) else -1 for d in arg.shape]
    return TensorSpec(name=arg.name, datatype=_ORT_TYPES[arg.type], shape=shape)


class OrtModel:
    """A ServedModel on a real ONNX Runtime CPU session."""

    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, name: str, version: str = "1.0.0") -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = name
        self.version = version
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in self.outputs]
        return dict(zip(names, self.session.run(names, dict(inputs)), strict=True))


class Faulty(OrtModel):
    """``tiny`` under another name; x[0, 0] == 7 makes it refuse the input, 13 makes it crash."""

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = float(inputs["x"].reshape(-1)[0])
        if first == 7:
            raise FormatError("the model refuses 7")
        if first == 13:
            raise RuntimeError("the runtime crashed")
        return super().infer(inputs)


class Gated(OrtModel):
    """A real model whose ``infer`` waits until the test opens the gate (counts who entered)."""

    def __init__(self, path: Path, name: str) -> None:
        super().__init__(path, name)
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.release()
        if not self.gate.wait(WAIT):
            raise TimeoutError("the test never opened the gate")
        return super().infer(inputs)


def make_pair(path: Path) -> Path:
    """s = a + b, all INT32[N]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"])],
        "pair",
        [
            helper.make_tensor_value_info("a", TensorProto.INT32, ["N"]),
            helper.make_tensor_value_info("b", TensorProto.INT32, ["N"]),
        ],
        [helper.make_tensor_value_info("s", TensorProto.INT32, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# -- plain HTTP over TCP or a Unix socket ----------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Api:
    server: ApiServer
    app: InferenceApi
    source: StaticSource
    token: str | None = None
    models: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.server.tcp_address is not None
        return f"127.0.0.1:{self.server.tcp_address[1]}"

    def connection(self, unix: bool = False) -> http.client.HTTPConnection:
        if unix:
            assert self.server.unix_socket is not None
            return UnixHTTPConnection(self.server.unix_socket)
        assert self.server.tcp_address is not None
        return http.client.HTTPConnection("127.0.0.1", self.server.tcp_address[1], timeout=WAIT)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        unix: bool = False,
        auth: bool = True,
    ) -> Reply:
        headers = dict(headers or {})
        if self.token and auth:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        conn = self.connection(unix)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Reply(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        finally:
            conn.close()

    def infer_json(self, model: str, doc: Any, **kw: Any) -> Reply:
        return self.request("POST", f"/v2/models/{model}/infer", json.dumps(doc).encode(), **kw)

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.url, connection_timeout=WAIT, network_timeout=WAIT)

    def auth_headers(self) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {self.token}"} if self.token else None


@contextlib.contextmanager
def start_api(
    tmp: Path,
    models: list[Any],
    *,
    memory: MemoryReader | None = None,
    gpu_memory: MemoryReader | None = None,
    **settings: Any,
) -> Iterator[Api]:
    """Serve ``models`` on a free loopback port and ``tmp/api.sock``; stops on exit."""
    config = ApiSettings(port=0, unix_socket=tmp / "api.sock", **settings)
    source = StaticSource(models)
    token = config.token.get_secret_value() if config.token else None
    app = InferenceApi(source, config, memory=memory or (lambda: 0.1), gpu_memory=gpu_memory)
    server = serve_api(app, config)
    try:
        yield Api(server, app, source, token)
    finally:
        server.stop()


def good_x(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)


def json_request(x: np.ndarray, name: str = "x") -> dict[str, Any]:
    return {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


def metric_values(text: str) -> dict[str, float]:
    """``series{labels} value`` lines of the Prometheus text format, checked line by line."""
    out = {}
    line_re = re.compile(
        r'^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})?) (\S+)$'
    )
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = line_re.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        out[match.group(1)] = float(match.group(2))
    return out


# -- the module's server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("api")
    tiny = make_onnx(tmp / "tiny.onnx")
    pair = make_pair(tmp / "pair.onnx")
    total = make_two_inputs(tmp / "sum.onnx")
    models = [
        OrtModel(tiny, "tiny"),
        OrtModel(pair, "pair"),
        Faulty(tiny, "faulty"),
        OrtModel(total, "sum"),
    ]
    with start_api(tmp, models, max_body_bytes=1024 * 1024) as running:
        running.models = {"tiny": tiny, "pair": pair, "sum": total}
        yield running


def assert_serving(api: Api) -> None:
    """A good request still gets the right answer."""
    x = good_x(2)
    reply = api.infer_json("tiny", json_request(x))
    assert reply.status == 200, reply.body
    y = np.array(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(y, reference(api.models["tiny"], x), rtol=1e-5, atol=1e-6)


# -- tritonclient ----------------------------------------------------------------------------


def test_tritonclient_reads_health_and_metadata(api: Api) -> None:
    with api.client() as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.get_server_metadata() == {
            "name": "edge-model-agent",
            "version": __version__,
            "extensions": ["binary_tensor_data"],
        }
        assert client.is_model_ready("tiny")
        assert client.is_model_ready("tiny", "1.0.0")
        assert not client.is_model_ready("tiny", "9.9.9")
        assert not client.is_model_ready("nonexistent")
        meta = client.get_model_metadata("tiny")
        assert meta == {
            "name": "tiny",
            "versions": ["1.0.0"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 8]}],
        }
        assert client.get_model_metadata("tiny", "1.0.0") == meta
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("nonexistent")
        assert info.value.status() == "404"
        assert "unknown model 'nonexistent'" in info.value.message()


def test_tritonclient_infers_with_json_tensors(api: Api) -> None:
    x = good_x(4)
    with api.client() as client:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=False)
        wanted = triton.InferRequestedOutput("y", binary_data=False)
        result = client.infer("tiny", [tensor], outputs=[wanted], request_id="json-1")
        response = result.get_response()
        assert response["model_name"] == "tiny"
        assert response["model_version"] == "1.0.0"
        assert response["id"] == "json-1"
        (output,) = response["outputs"]
        assert output["datatype"] == "FP32"
        assert output["shape"] == [4, 8]
        assert "data" in output
        assert "parameters" not in output
        np.testing.assert_allclose(
            result.as_numpy("y"), reference(api.models["tiny"], x), rtol=1e-5, atol=1e-6
        )

        a = np.array([1, -2, 2**30], dtype=np.int32)
        b = np.array([5, 7, 2**30 - 1], dtype=np.int32)
        inputs = [triton.InferInput("a", [3], "INT32"), triton.InferInput("b", [3], "INT32")]
        inputs[0].set_data_from_numpy(a, binary_data=False)
        inputs[1].set_data_from_numpy(b, binary_data=False)
        result = client.infer(
            "pair", inputs, outputs=[triton.InferRequestedOutput("s", binary_data=False)]
        )
        assert result.as_numpy("s").dtype == np.int32
        np.testing.assert_array_equal(result.as_numpy("s"), a + b)


def test_tritonclient_infers_with_binary_tensors(api: Api) -> None:
    x = good_x(5)
    want = reference(api.models["tiny"], x)
    with api.client() as client:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)

        # Binary outputs asked for by name; versioned route; the id comes back.
        result = client.infer(
            "tiny",
            [tensor],
            model_version="1.0.0",
            outputs=[triton.InferRequestedOutput("y", binary_data=True)],
            request_id="bin-1",
        )
        response = result.get_response()
        assert response["id"] == "bin-1"
        assert response["outputs"][0]["parameters"] == {"binary_data_size": 5 * 8 * 4}
        np.testing.assert_allclose(result.as_numpy("y"), want, rtol=1e-5, atol=1e-6)

        # No outputs named: tritonclient sets binary_data_output and expects every output raw.
        result = client.infer("tiny", [tensor])
        assert "binary_data_size" in result.get_response()["outputs"][0]["parameters"]
        np.testing.assert_allclose(result.as_numpy("y"), want, rtol=1e-5, atol=1e-6)

        # Binary input, JSON output.
        result = client.infer(
            "tiny", [tensor], outputs=[triton.InferRequestedOutput("y", binary_data=False)]
        )
        assert "data" in result.get_response()["outputs"][0]
        np.testing.assert_allclose(result.as_numpy("y"), want, rtol=1e-5, atol=1e-6)

        # Compressed request body (tritonclient's request_compression_algorithm).
        result = client.infer("tiny", [tensor], request_compression_algorithm="gzip")
        np.testing.assert_allclose(result.as_numpy("y"), want, rtol=1e-5, atol=1e-6)

        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tensor], model_version="2.0.0")
        assert info.value.status() == "404"


def test_binary_wire_format(api: Api) -> None:
    """The extension byte for byte: JSON header, then the raw inputs in order; the response's
    Inference-Header-Content-Length splits it the same way."""
    a = np.array([1, 2, 3, 4], dtype=np.int32)
    b = np.array([10, 20, 30, 40], dtype=np.int32)
    header = json.dumps(
        {
            "id": "wire",
            "inputs": [
                {
                    "name": "a",
                    "shape": [4],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 16},
                },
                {"name": "b", "shape": [4], "datatype": "INT32", "data": b.tolist()},
            ],
            "outputs": [{"name": "s", "parameters": {"binary_data": True}}],
        }
    ).encode()
    reply = api.request(
        "POST",
        "/v2/models/pair/infer",
        header + a.astype("<i4").tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert reply.status == 200, reply.body
    n = int(reply.headers["inference-header-content-length"])
    doc = json.loads(reply.body[:n])
    assert doc == {
        "model_name": "pair",
        "model_version": "1.0.0",
        "id": "wire",
        "outputs": [
            {"name": "s", "datatype": "INT32", "shape": [4], "parameters": {"binary_data_size": 16}}
        ],
    }
    np.testing.assert_array_equal(np.frombuffer(reply.body[n:], "<i4"), a + b)

    # JSON in, JSON out: no header, no parameters.
    reply = api.infer_json("tiny", json_request(good_x(1)))
    assert reply.status == 200
    assert "inference-header-content-length" not in reply.headers
    assert reply.headers["content-type"] == "application/json"
    assert set(reply.json()) == {"model_name", "model_version", "outputs"}


# -- bad input -------------------------------------------------------------------------------

X = good_x(3)
XJ = json_request(X)
HL = "Inference-Header-Content-Length"


def _binary(
    doc: dict[str, Any], raw: bytes, header_length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(doc).encode()
    return head + raw, {HL: str(len(head) if header_length is None else header_length)}


def _with(**changes: Any) -> bytes:
    tensor = {**XJ["inputs"][0], **changes}
    return json.dumps({"inputs": [tensor]}).encode()


_BIN_DOC = {
    "inputs": [
        {"name": "x", "shape": [3, 16], "datatype": "FP32", "parameters": {"binary_data_size": 192}}
    ]
}

# (id, method, path, body, headers, status, words the error must contain)
BAD: list[tuple[str, str, str, bytes, dict[str, str], int, str]] = [
    ("bad-json", "POST", "/v2/models/tiny/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not-utf8", "POST", "/v2/models/tiny/infer", b"\xff\xfe{}", {}, 400, "not valid JSON"),
    ("json-array", "POST", "/v2/models/tiny/infer", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("duplicate-key", "POST", "/v2/models/tiny/infer", b'{"inputs": [], "inputs": []}', {}, 400, "duplicate key"),
    ("no-inputs", "POST", "/v2/models/tiny/infer", b'{"inputs": []}', {}, 400, "inputs"),
    ("unknown-field", "POST", "/v2/models/tiny/infer", json.dumps({**XJ, "extra": 1}).encode(), {}, 400, "extra"),
    ("wrong-datatype", "POST", "/v2/models/tiny/infer", _with(datatype="FP64"), {}, 400, "datatype FP64; the model takes FP32"),
    ("unknown-datatype", "POST", "/v2/models/tiny/infer", _with(datatype="FLOAT"), {}, 400, "unknown datatype"),
    ("wrong-dim", "POST", "/v2/models/tiny/infer", _with(shape=[3, 15]), {}, 400, "shape [3, 15]; the model takes [-1, 16]"),
    ("wrong-rank", "POST", "/v2/models/tiny/infer", _with(shape=[48]), {}, 400, "shape [48]"),
    ("negative-dim", "POST", "/v2/models/tiny/infer", _with(shape=[-1, 16]), {}, 400, "shape"),
    ("string-shape", "POST", "/v2/models/tiny/infer", _with(shape=["3", 16]), {}, 400, "shape"),
    ("short-data", "POST", "/v2/models/tiny/infer", _with(data=X.ravel().tolist()[:-1]), {}, 400, "47 elements"),
    ("long-data", "POST", "/v2/models/tiny/infer", _with(data=[*X.ravel().tolist(), 1.0]), {}, 400, "49 elements"),
    ("ragged-data", "POST", "/v2/models/tiny/infer", _with(data=[[1.0] * 16, [1.0] * 15, [1.0] * 16]), {}, 400, "evenly nested"),
    ("strings-for-fp32", "POST", "/v2/models/tiny/infer", _with(data=["1.0"] * 48), {}, 400, "numbers only"),
    ("null-in-data", "POST", "/v2/models/tiny/infer", _with(data=[None] * 48), {}, 400, "numbers only"),
    ("no-data", "POST", "/v2/models/tiny/infer", _with(data=None), {}, 400, "neither data nor binary_data_size"),
    ("unknown-input", "POST", "/v2/models/tiny/infer", _with(name="z"), {}, 400, "unknown input 'z'"),
    ("twice", "POST", "/v2/models/tiny/infer", json.dumps({"inputs": XJ["inputs"] * 2}).encode(), {}, 400, "given twice"),
    ("missing-input", "POST", "/v2/models/pair/infer", json.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "INT32", "data": [1]}]}).encode(), {}, 400, "missing input 'b'"),
    ("int-out-of-range", "POST", "/v2/models/pair/infer", json.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "INT32", "data": [2**31]}, {"name": "b", "shape": [1], "datatype": "INT32", "data": [1]}]}).encode(), {}, 400, "out of range"),
    ("float-for-int", "POST", "/v2/models/pair/infer", json.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "INT32", "data": [1.5]}, {"name": "b", "shape": [1], "datatype": "INT32", "data": [1]}]}).encode(), {}, 400, "integers only"),
    ("unknown-output", "POST", "/v2/models/tiny/infer", json.dumps({**XJ, "outputs": [{"name": "q"}]}).encode(), {}, 400, "unknown output 'q'"),
    ("truncated-binary", "POST", "/v2/models/tiny/infer", *_binary(_BIN_DOC, X.tobytes()[:100]), 400, "runs past the end"),
    ("extra-binary", "POST", "/v2/models/tiny/infer", *_binary(_BIN_DOC, X.tobytes() + b"\0" * 4), 400, "add up to 192"),
    ("binary-size-vs-shape", "POST", "/v2/models/tiny/infer", *_binary({"inputs": [{**_BIN_DOC["inputs"][0], "parameters": {"binary_data_size": 188}}]}, X.tobytes()[:188]), 400, "needs 192"),
    ("header-past-body", "POST", "/v2/models/tiny/infer", *_binary(_BIN_DOC, X.tobytes(), header_length=10**6), 400, "does not fit the body"),
    ("header-not-a-number", "POST", "/v2/models/tiny/infer", json.dumps(XJ).encode(), {HL: "ten"}, 400, "not a number"),
    ("binary-without-header", "POST", "/v2/models/tiny/infer", json.dumps(_BIN_DOC).encode() + X.tobytes(), {}, 400, "not valid JSON"),
    ("binary-size-no-header", "POST", "/v2/models/tiny/infer", json.dumps(_BIN_DOC).encode(), {}, 400, "no Inference-Header-Content-Length"),
    ("bad-encoding", "POST", "/v2/models/tiny/infer", json.dumps(XJ).encode(), {"Content-Encoding": "br"}, 400, "not supported"),
    ("bad-gzip", "POST", "/v2/models/tiny/infer", b"not gzip", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    ("gzip-bomb", "POST", "/v2/models/tiny/infer", gzip.compress(b" " * (2 * 1024 * 1024)), {"Content-Encoding": "gzip"}, 413, "decompressed body"),
    ("huge-declared", "POST", "/v2/models/tiny/infer", b"", {"Content-Length": str(10**10)}, 413, "over the limit"),
    ("huge-sent", "POST", "/v2/models/tiny/infer", b" " * (2 * 1024 * 1024), {}, 413, "over the limit"),
    ("unknown-model", "POST", "/v2/models/nonexistent/infer", json.dumps(XJ).encode(), {}, 404, "unknown model 'nonexistent'"),
    ("unknown-version", "POST", "/v2/models/tiny/versions/0.0.1/infer", json.dumps(XJ).encode(), {}, 404, "no version '0.0.1'"),
    ("unknown-route", "GET", "/v2/models/tiny/trace/setting", b"", {}, 404, "no route"),
    ("unknown-top", "GET", "/v1/models", b"", {}, 404, "no route"),
    ("infer-with-get", "GET", "/v2/models/tiny/infer", b"", {}, 405, "use POST"),
    ("metadata-with-post", "POST", "/v2/models/tiny", b"{}", {}, 405, "use GET"),
    ("backend-refuses", "POST", "/v2/models/faulty/infer", json.dumps(json_request(np.full((1, 16), 7, np.float32))).encode(), {}, 400, "the model refuses 7"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "words"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_requests_get_4xx_and_serving_goes_on(
    api: Api,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    words: str,
) -> None:
    if "Content-Length" in headers:  # a declared size, nothing sent
        conn = api.connection()
        try:
            conn.putrequest(method, path)
            conn.putheader("Content-Length", headers["Content-Length"])
            conn.endheaders()
            response = conn.getresponse()
            reply = Reply(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            conn.close()
    else:
        reply = api.request(method, path, body, headers)
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert words in reply.json()["error"]
    assert_serving(api)


def test_chunked_body_over_the_limit_gets_413(api: Api) -> None:
    conn = api.connection()
    try:
        chunks = (b" " * 65536 for _ in range(32))  # 2 MiB, no Content-Length
        conn.request("POST", "/v2/models/tiny/infer", body=chunks, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        assert "over the limit" in json.loads(response.read())["error"]
    finally:
        conn.close()
    assert_serving(api)


def test_backend_crash_is_500_logged_and_serving_goes_on(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    crash = json_request(np.full((1, 16), 13, np.float32))
    with caplog.at_level("ERROR", logger="agent.serving.api"):
        reply = api.infer_json("faulty", crash)
    assert reply.status == 500
    assert "failed" in reply.json()["error"]
    (record,) = [r for r in caplog.records if r.name == "agent.serving.api"]
    assert record.exc_info is not None
    assert "the runtime crashed" in str(record.exc_info[1])
    reply = api.infer_json("faulty", json_request(good_x(2)))
    assert reply.status == 200
    assert_serving(api)


# -- metrics and the Unix socket -------------------------------------------------------------


def test_metrics_count_requests_errors_and_swaps(api: Api) -> None:
    def scrape() -> dict[str, float]:
        reply = api.request("GET", "/metrics")
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
        return metric_values(reply.body.decode())

    def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    before = scrape()
    for _ in range(3):
        assert api.infer_json("tiny", json_request(good_x(1))).status == 200
    assert api.request("POST", "/v2/models/tiny/infer", _with(shape=[3, 15])).status == 400
    assert api.infer_json("nonexistent", XJ).status == 404
    assert api.infer_json("faulty", json_request(np.full((1, 16), 13, np.float32))).status == 500
    api.app.metrics.on_swap("tiny", "1.0.1", False)
    api.app.metrics.on_swap("tiny", "1.0.0", True)
    after = scrape()

    ok = 'edge_agent_inference_requests_total{model="tiny",outcome="success"}'
    assert delta(after, before, ok) == 3
    bad = 'edge_agent_inference_requests_total{model="tiny",outcome="bad_request"}'
    assert delta(after, before, bad) == 1
    assert (
        delta(after, before, 'edge_agent_inference_errors_total{model="tiny",reason="bad-request"}')
        == 1
    )
    assert (
        delta(
            after,
            before,
            'edge_agent_inference_requests_total{model="_unknown",outcome="not_found"}',
        )
        == 1
    )
    assert (
        delta(after, before, 'edge_agent_inference_requests_total{model="faulty",outcome="error"}')
        == 1
    )
    assert (
        delta(after, before, 'edge_agent_inference_errors_total{model="faulty",reason="internal"}')
        == 1
    )
    assert delta(after, before, 'edge_agent_inference_duration_seconds_count{model="tiny"}') == 4
    assert (
        after['edge_agent_inference_duration_seconds_bucket{model="tiny",le="+Inf"}']
        == after['edge_agent_inference_duration_seconds_count{model="tiny"}']
    )
    assert (
        after['edge_agent_model_active{model="tiny",version="1.0.0",platform="onnxruntime_onnx"}']
        == 1
    )
    assert delta(after, before, 'edge_agent_model_swaps_total{model="tiny"}') == 2
    assert delta(after, before, 'edge_agent_model_rollbacks_total{model="tiny"}') == 1
    assert after["edge_agent_inference_queue_capacity"] == 2 + 16
    assert after["edge_agent_inference_queue_depth"] == 0
    assert after["edge_agent_memory_used_ratio"] == pytest.approx(0.1)


def test_unix_socket_serves(api: Api) -> None:
    path = api.server.unix_socket
    assert path is not None
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert not list(path.parent.glob(".api.sock.*"))  # the temporary name is gone

    assert api.request("GET", "/v2/health/ready", unix=True).status == 200
    meta = api.request("GET", "/v2/models/pair", unix=True)
    assert meta.status == 200
    assert meta.json()["inputs"][1]["name"] == "b"
    x = good_x(2)
    reply = api.infer_json("tiny", json_request(x), unix=True)
    assert reply.status == 200
    y = np.array(reply.json()["outputs"][0]["data"], np.float32).reshape(2, 8)
    np.testing.assert_allclose(y, reference(api.models["tiny"], x), rtol=1e-5, atol=1e-6)
    bad = api.request("POST", "/v2/models/tiny/infer", _with(datatype="INT8"), unix=True)
    assert bad.status == 400


def test_health_answers_without_a_body(api: Api) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready"):
        reply = api.request("GET", path)
        assert (reply.status, reply.body) == (200, b"")
    assert api.request("GET", "/v2/models/tiny/versions/0.0.1/ready").status == 404
    assert api.request("GET", "/v2/models/nonexistent/ready").status == 404


# -- inputs that share a dimension, through the slot layer ----------------------------------


def _tensor(name: str, array: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_mismatched_batches_get_400_and_never_count_against_the_model(tmp_path: Path) -> None:
    """The daemon's path: the slot layer's version on ONNX Runtime behind the API. x and y
    share the symbolic batch N; batches 2 and 3, as JSON and as binary tensors, get 400 naming
    both inputs and N, the version's probation statistics count none of them, and it serves."""
    manager = SlotManager()
    candidate = slot_candidate(
        make_two_inputs(tmp_path / "sum.onnx"), tmp_path, version="1.0.0", name="sum"
    )
    assert manager.restore(candidate).result(timeout=30) == Phase.ACTIVE
    settings = ApiSettings(port=0, unix_socket=None)
    server = serve_api(InferenceApi(manager, settings, memory=lambda: 0.1), settings)
    try:
        api = Api(server, server.app, manager)  # type: ignore[arg-type]
        x, y = np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)
        doc = {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()},
                {"name": "y", "shape": [3, 4], "datatype": "FP32", "data": y.ravel().tolist()},
            ]
        }
        reply = api.infer_json("sum", doc)
        assert reply.status == 400, reply.body
        assert (
            "inputs 'x' and 'y' disagree on dimension 'N', which the model shares between them: "
            "'x' has 2 (axis 0), 'y' has 3 (axis 0)"
        ) in reply.json()["error"]
        version = manager.describe("sum")
        assert version is not None
        with api.client() as client:
            with pytest.raises(InferenceServerException) as info:
                client.infer("sum", [_tensor("x", x, True), _tensor("y", y, True)])
            assert info.value.status() == "400"
            assert "disagree on dimension 'N'" in info.value.message()
            assert version.stats.snapshot() == (0, 0, None)
            result = client.infer("sum", [_tensor("x", x, True), _tensor("y", 2 * x, True)])
            np.testing.assert_array_equal(result.as_numpy("z"), np.full((2, 4), 3, np.float32))
        requests, errors, _ = version.stats.snapshot()
        assert (requests, errors) == (1, 0)
        metrics = metric_values(api.request("GET", "/metrics").body.decode())
        assert (
            metrics['edge_agent_inference_requests_total{model="sum",outcome="bad_request"}'] == 2
        )
    finally:
        server.stop()
        manager.close()


# -- batch size --------------------------------------------------------------------------------


def test_a_batch_over_max_batch_size_gets_400(tmp_path: Path) -> None:
    tiny = make_onnx(tmp_path / "tiny.onnx")
    fixed = make_two_inputs(tmp_path / "fixed.onnx", dims=(2, 2))
    models = [OrtModel(tiny, "tiny"), OrtModel(fixed, "fixed")]
    with start_api(tmp_path, models, max_batch_size=4) as api, api.client() as client:
        assert api.infer_json("tiny", json_request(good_x(4))).status == 200
        reply = api.infer_json("tiny", json_request(good_x(5)))
        assert reply.status == 400
        assert reply.json()["error"] == (
            "input 'x' has a batch of 5 (its leading dimension); model 'tiny' takes at most 4 "
            "here (max_batch_size)"
        )
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [_tensor("x", good_x(5), True)])
        assert info.value.status() == "400"
        assert "a batch of 5" in info.value.message()
        assert client.get_model_config("tiny")["max_batch_size"] == 4
        # A fixed leading dimension is the model's own limit: its shape says so.
        config = client.get_model_config("fixed")
        assert config["max_batch_size"] == 0
        assert config["input"][0]["dims"] == [2, 4]
        ones = np.ones((3, 4), np.float32)
        with pytest.raises(InferenceServerException) as info:
            client.infer("fixed", [_tensor("x", ones, True), _tensor("y", ones, True)])
        assert info.value.status() == "400"
        assert "has shape [3, 4]; the model takes [2, 4]" in info.value.message()
        result = client.infer("tiny", [_tensor("x", good_x(3), True)])
        np.testing.assert_allclose(result.as_numpy("y"), reference(tiny, good_x(3)), atol=1e-5)


# -- non-finite numbers ------------------------------------------------------------------------


def _strict_json(body: bytes) -> Any:
    """Parse as RFC 8259 JSON, which has no NaN or Infinity (orjson and most parsers refuse)."""

    def refuse(token: str) -> Any:
        raise ValueError(f"bare {token} in a JSON answer")

    return json.loads(body, parse_constant=refuse)


def test_json_never_carries_nan_or_infinity(api: Api) -> None:
    x = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    zero = np.zeros((1, 4), np.float32)
    with api.client() as client:
        # tritonclient writes bare NaN and Infinity into a JSON input: refused, with the way out.
        with pytest.raises(InferenceServerException) as info:
            client.infer("sum", [_tensor("x", x, False), _tensor("y", zero, False)])
        assert info.value.status() == "400"
        assert "NaN is not valid JSON" in info.value.message()
        assert "send NaN and infinities as binary tensor data" in info.value.message()

        # Binary in, binary out: every IEEE value goes through exactly.
        inputs = [_tensor("x", x, True), _tensor("y", zero, True)]
        result = client.infer("sum", inputs, outputs=[triton.InferRequestedOutput("z", True)])
        np.testing.assert_array_equal(result.as_numpy("z"), x)

        # Binary in, JSON out: the answer would need NaN; refused, naming the output.
        with pytest.raises(InferenceServerException) as info:
            client.infer("sum", inputs, outputs=[triton.InferRequestedOutput("z", False)])
        assert info.value.status() == "400"
        assert info.value.message() == (
            "output 'z' holds NaN or an infinity, which JSON cannot carry; ask for it with "
            "binary_data: true"
        )

    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 16},
                },
                {"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]},
            ]
        }
    ).encode()
    reply = api.request(
        "POST", "/v2/models/sum/infer", head + x.astype("<f4").tobytes(), {HL: str(len(head))}
    )
    assert reply.status == 400
    assert "output 'z' holds NaN" in _strict_json(reply.body)["error"]

    # Finite outputs as JSON: strict parsers read the answer.
    finite = np.array([[1.0, -2.0, 3.4e38, 1e-45]], np.float32)
    reply = api.infer_json(
        "sum",
        {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": finite.ravel().tolist()},
                {"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]},
            ]
        },
    )
    assert reply.status == 200
    data = _strict_json(reply.body)["outputs"][0]["data"]
    np.testing.assert_array_equal(np.array(data, np.float32), finite.ravel())
    assert_serving(api)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("1e39", "out of range for FP32 (at most 3.40282e+38 in magnitude)"),
        ("-1e39", "out of range for FP32"),
        ("1e400", "out of range for FP32"),  # beyond float64: Python reads an infinity
        ("NaN", "NaN is not valid JSON"),
        ("-Infinity", "-Infinity is not valid JSON"),
    ],
)
def test_json_numbers_beyond_the_datatype_get_400(api: Api, value: str, words: str) -> None:
    body = (
        '{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, '
        + value
        + ']}, {"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}'
    ).encode()
    reply = api.request("POST", "/v2/models/sum/infer", body)
    assert reply.status == 400
    assert words in reply.json()["error"]
    assert_serving(api)


# -- repository index, model configuration, statistics (Triton's extensions) -----------------


def test_tritonclient_reads_the_repository_index(api: Api) -> None:
    want = [
        {"name": name, "version": "1.0.0", "state": "READY"}
        for name in ("faulty", "pair", "sum", "tiny")
    ]
    with api.client() as client:
        assert client.get_model_repository_index() == want
    assert api.request("GET", "/v2/models").json() == want
    ready = api.request("POST", "/v2/repository/index", json.dumps({"ready": True}).encode())
    assert ready.json() == want
    for body in (b'{"ready": 1}', b'{"ready": true, "x": 1}', b"[true]", b"{"):
        reply = api.request("POST", "/v2/repository/index", body)
        assert reply.status == 400, body
    assert api.request("GET", "/v2/repository/index").status == 405
    assert api.request("POST", "/v2/models", b"").status == 405


def test_tritonclient_reads_the_model_config(api: Api) -> None:
    with api.client() as client:
        assert client.get_model_config("tiny") == {
            "name": "tiny",
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": 1024,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [16]}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [8]}],
        }
        pair = client.get_model_config("pair", "1.0.0")
        assert pair["input"] == [
            {"name": "a", "data_type": "TYPE_INT32", "dims": []},
            {"name": "b", "data_type": "TYPE_INT32", "dims": []},
        ]
        for name, version in (("nonexistent", ""), ("tiny", "9.9.9")):
            with pytest.raises(InferenceServerException) as info:
                client.get_model_config(name, version)
            assert info.value.status() == "404"


def test_tritonclient_reads_inference_statistics(api: Api) -> None:
    def stats(client: triton.InferenceServerClient) -> dict[str, Any]:
        (entry,) = client.get_inference_statistics("tiny")["model_stats"]
        assert (entry["name"], entry["version"]) == ("tiny", "1.0.0")
        return entry  # type: ignore[no-any-return]

    with api.client() as client:
        before = stats(client)
        for _ in range(3):
            client.infer("tiny", [_tensor("x", good_x(2), True)])
        assert api.request("POST", "/v2/models/tiny/infer", _with(shape=[3, 15])).status == 400
        after = stats(client)
        everything = client.get_inference_statistics()["model_stats"]
        versioned = client.get_inference_statistics("tiny", "1.0.0")["model_stats"]
        with pytest.raises(InferenceServerException) as info:
            client.get_inference_statistics("tiny", "9.9.9")
        assert info.value.status() == "404"

    def delta(*path: str) -> int:
        a: Any = after
        b: Any = before
        for key in path:
            a, b = a[key], b[key]
        return int(a) - int(b)

    assert delta("inference_count") == 6  # three requests of two rows
    assert delta("execution_count") == 3
    assert delta("inference_stats", "success", "count") == 3
    assert delta("inference_stats", "fail", "count") == 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", phase, "count") == 3
    assert delta("inference_stats", "success", "ns") > 0
    assert after["last_inference"] >= before["last_inference"]
    assert after["last_inference"] > 0  # milliseconds since the epoch
    batch = {b["batch_size"]: b for b in after["batch_stats"]}
    old = {b["batch_size"]: b for b in before["batch_stats"]}
    seen = old.get(2, {"compute_infer": {"count": 0}})["compute_infer"]["count"]
    assert batch[2]["compute_infer"]["count"] - seen == 3
    assert after["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
    assert {e["name"] for e in everything} == {"faulty", "pair", "sum", "tiny"}
    assert versioned[0]["version"] == "1.0.0"
    assert api.request("GET", "/v2/models/tiny/versions/1.0.0/stats").status == 200
