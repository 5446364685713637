"""An MLServer model around one ONNX Runtime session, for bench/serve.py's baseline.

Runs in MLServer's own virtual environment (never imported by the agent). The session gets the
options the agent's ONNX Runtime backend gives its own (``agent.runtime.onnxrt``): all graph
optimizations, the CPU provider, and ``intra_op_threads`` from the model settings'
``parameters.extra`` (0: the runtime's choice).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel  # type: ignore[import-not-found]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found]
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found]
from mlserver.utils import get_model_uri  # type: ignore[import-not-found]


class OrtModel(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        extra: dict[str, Any] = dict(self._settings.parameters.extra or {})
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = int(extra.get("intra_op_threads", 0))
        if threads:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(
            uri, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: Any) -> Any:
        request: InferenceRequest = payload
        feeds = {i.name: np.ascontiguousarray(NumpyCodec.decode_input(i)) for i in request.inputs}
        values = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, values, strict=True)
            ],
        )
