"""Health and metrics collectors, and the store-and-forward queue for what goes upstream.

Internal to the agent (see :mod:`agent` for the public surface): names here may change in any
release.

* :mod:`agent.telemetry.collect`: :func:`collect_system` (the box), :func:`collect_inference`
  and :class:`InferenceCollector` (the models), :func:`bounded` (what one Telemetry message holds).
* :mod:`agent.telemetry.queue`: :class:`StoreQueue` (bounded, on disk, batched writes) and
  :class:`Forwarder` (drains it in order while connected).

Imports nothing else of the agent: the daemon feeds it (see ``snapshot_from_metrics`` for the
inference API's counters) and hands it a publish callable.
"""

from agent.telemetry.collect import (
    InferenceCollector,
    InferenceSnapshot,
    ModelStats,
    bounded,
    collect_inference,
    collect_system,
    snapshot_from_exposition,
    snapshot_from_metrics,
)
from agent.telemetry.queue import Forwarder, Item, StoreQueue, acked_publish

__all__ = [
    "Forwarder",
    "InferenceCollector",
    "InferenceSnapshot",
    "Item",
    "ModelStats",
    "StoreQueue",
    "acked_publish",
    "bounded",
    "collect_inference",
    "collect_system",
    "snapshot_from_exposition",
    "snapshot_from_metrics",
]
