"""The fleet side as a library: what ``edge-fleet`` does, for programs of a fleet's own.

Keys, build, sign, deploy and wait for the devices, the fleet's view, rollouts and the bundle
server. Names are imported on first use, so ``import agent.fleet`` stays light: building needs
numpy and onnx, the view and the rollouts need a broker session, and a program that only signs
or writes deployment documents pulls in neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.fleet.build import BuildOptions, BuildResult, build_bundle
    from agent.fleet.control import DeviceView, FleetView, collect, fleet_session
    from agent.fleet.deploy import make_deployment, stage_descriptors
    from agent.fleet.keys import KeyStore, fleet_trust, load_signer
    from agent.fleet.plan import plan_rollout
    from agent.fleet.rollout import Controller
    from agent.fleet.server import BlockServer, BundleCatalog
    from agent.fleet.sign import describe_bundle, reissue_bundle, sign_bundle
    from agent.fleet.watch import Watched, watch_deployment

# Each public name and the module that defines it.
_HOMES = {
    "BuildOptions": "build",
    "BuildResult": "build",
    "build_bundle": "build",
    "DeviceView": "control",
    "FleetView": "control",
    "collect": "control",
    "fleet_session": "control",
    "make_deployment": "deploy",
    "stage_descriptors": "deploy",
    "KeyStore": "keys",
    "load_signer": "keys",
    "fleet_trust": "keys",
    "Controller": "rollout",
    "plan_rollout": "plan",
    "BlockServer": "server",
    "BundleCatalog": "server",
    "describe_bundle": "sign",
    "reissue_bundle": "sign",
    "sign_bundle": "sign",
    "Watched": "watch",
    "watch_deployment": "watch",
}

__all__ = [
    "BlockServer",
    "BuildOptions",
    "BuildResult",
    "BundleCatalog",
    "Controller",
    "DeviceView",
    "FleetView",
    "KeyStore",
    "Watched",
    "build_bundle",
    "collect",
    "describe_bundle",
    "fleet_session",
    "fleet_trust",
    "load_signer",
    "make_deployment",
    "plan_rollout",
    "reissue_bundle",
    "sign_bundle",
    "stage_descriptors",
    "watch_deployment",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'agent.fleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agent.fleet.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
