"""Serving: model slots and the local inference API.

Internal to the agent (see :mod:`agent` for the public surface): names here may change in any
release.

* :mod:`agent.serving.slots`: load, warm up, self-test, swap, probation, rollback.
* :mod:`agent.serving.source`: the ``ModelSource`` / ``ServedModel`` protocols the API serves from.
* :mod:`agent.serving.api`: the Open Inference Protocol (KServe v2 REST) as an ASGI app, and its
  ``ApiSettings``.
* :mod:`agent.serving.server`: uvicorn on loopback TCP and a Unix socket (``serve_api``).
* :mod:`agent.serving.metrics`: Prometheus metrics, including the slot layer's swap counters.
* :mod:`agent.serving.admission`, :mod:`agent.serving.tensors`: admission control; request and
  response encoding.
"""
