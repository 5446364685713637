"""Entry points: ``edge-agent`` (on the box, :mod:`agent.cli.agent`) and ``edge-fleet`` (for
fleet managers, :mod:`agent.cli.fleet`).

Thin: parse arguments, call the library, print. Only the project's own errors are caught; each
becomes one line a person can act on, and an exit status:

    0  done            1  content rejected (bad signature, tampered, unsafe, expired, ...)
    2  usage or config 3  storage or tool failure (disk, missing runtime)
"""

from agent.cli.agent import STOP_LIMIT_S
from agent.cli.agent import build_parser as agent_parser
from agent.cli.agent import main as agent_main
from agent.cli.fleet import build_parser as fleet_parser
from agent.cli.fleet import main as fleet_main

__all__ = ["STOP_LIMIT_S", "agent_main", "agent_parser", "fleet_main", "fleet_parser"]
