"""``edge-fleet dashboard``: the fleet in a browser, from the broker alone.

- :mod:`.model`: the fleet as the page shows it (devices, models, rollouts, events), built
  message by message from the broker, with a version number per change.
- :mod:`.history`: the charted telemetry of the last hour, bounded in memory.
- :mod:`.prometheus`: the same fleet as Prometheus series (``/metrics``).
- :mod:`.actions`: pause, resume, abort and roll back a rollout, as the CLI does.
- :mod:`.app`: the ASGI application (the page, its JSON, server-sent events, access control).
- :mod:`.server`: the broker session and the web server, started and stopped together.
- ``static/``: the page itself, plain HTML, CSS and JavaScript (no build step).
"""

from __future__ import annotations

from agent.fleet.dashboard.server import DEFAULT_LISTEN, Dashboard, DashboardSettings

__all__ = ["DEFAULT_LISTEN", "Dashboard", "DashboardSettings"]
