"""What the inference API serves from: a :class:`ModelSource` of :class:`ServedModel` objects.

The slot layer (:class:`agent.serving.slots.SlotManager`) is the source the daemon uses;
:class:`StaticSource` serves a fixed set of already loaded models (tools, tests, a box that never
swaps).

Threads: every method of a source may be called from the API's event-loop thread (``names``,
``ready``, ``describe``: quick, never blocking on a load) and from its worker threads (``lease``
and ``ServedModel.infer``, which block). A lease is entered and left on the same worker thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from agent._lazy import lazy_module
from agent.bundle.manifest import TensorSpec

__all__ = ["ModelSource", "ServedModel", "StaticSource", "TensorSpec"]


if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # imported on first use: an idle daemon does without


class ServedModel(Protocol):
    """One loaded version of a model, as the API sees it.

    ``inputs`` and ``outputs`` use KServe datatypes and -1 for a dimension of any size; the API
    checks every request against them before :meth:`infer` is called.
    """

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def platform(self) -> str:  # "onnxruntime_onnx", "openvino", "litert"
        ...

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model (blocking; called from several worker threads at once).

        Raise :class:`agent.errors.FormatError` (or another ``BadContentError``) for input the
        model refuses: the caller gets 400. Anything else is the model's failure: 500.
        """
        ...


class ModelSource(Protocol):
    def names(self) -> list[str]:
        """The names of the models this source knows."""
        ...

    def ready(self, name: str) -> bool:
        """True when ``name`` has an active version that takes requests."""
        ...

    def describe(self, name: str) -> ServedModel | None:
        """The active version of ``name`` (for its metadata), or None."""
        ...

    def lease(self, name: str) -> AbstractContextManager[ServedModel | None]:
        """Pin the active version of ``name`` for one request (None when there is none).

        A swap waits for the leases on the old version to end before it closes that version.
        """
        ...


class StaticSource:
    """A :class:`ModelSource` over models that are loaded already; ``put`` replaces one.

    ``put`` and ``remove`` do not close the model they replace: that stays the caller's, who can
    call :meth:`wait_idle` first to let requests on it finish.
    """

    def __init__(self, models: Iterable[ServedModel] = ()) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._models: dict[str, ServedModel] = {}
        self._leases: dict[int, int] = {}  # id(model) -> requests running on it
        for model in models:
            self._models[model.name] = model

    def put(self, model: ServedModel) -> ServedModel | None:
        """Make ``model`` the active version of its name; returns the version it replaced."""
        with self._lock:
            old = self._models.get(model.name)
            self._models[model.name] = model
            return old

    def remove(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._models.pop(name, None)

    def wait_idle(self, model: ServedModel, timeout: float | None = None) -> bool:
        """Block until no lease holds ``model``; False when ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._leases.get(id(model)), timeout)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def ready(self, name: str) -> bool:
        with self._lock:
            return name in self._models

    def describe(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._models.get(name)

    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[ServedModel | None]:
        with self._lock:
            model = self._models.get(name)
            if model is not None:
                self._leases[id(model)] = self._leases.get(id(model), 0) + 1
        try:
            yield model
        finally:
            if model is not None:
                with self._idle:
                    left = self._leases[id(model)] - 1
                    if left:
                        self._leases[id(model)] = left
                    else:
                        del self._leases[id(model)]
                        self._idle.notify_all()
