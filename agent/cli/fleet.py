"""``edge-fleet``: keys, bundles, the bundle server, deployments, the fleet's state, rollouts,
the device simulator and the dashboard, one module per command group. Exit status as
``agent.cli`` says."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from agent import __version__
from agent.cli import (
    _bundle,
    _dashboard,
    _deploy,
    _device,
    _keys,
    _rollout,
    _serve,
    _simulate,
)
from agent.cli._common import run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-fleet", description="Build, sign and verify model bundles."
    )
    p.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    top = p.add_subparsers(title="commands")
    # In the order `edge-fleet --help` lists them.
    for group in (_keys, _device, _bundle, _serve, _deploy, _simulate, _rollout, _dashboard):
        group.add_parser(top)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run("edge-fleet", build_parser(), argv)
