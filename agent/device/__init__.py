"""The device agent's parts, each with one job; agent.daemon wires them into the loop.

* :mod:`.machine`: each model's rollout, its table of phases, the rules for late results (no I/O).
* :mod:`.pipeline`: the ``prepare`` worker and the steps it runs on a bundle.
* :mod:`.documents`: the deployment documents followed and the trust that verifies them.
* :mod:`.trials`: the versions handed to the slot layer, until they commit.
* :mod:`.reporting`: reported state, events, ``edge-agent status`` and STATUS=.
* :mod:`.transfer`: a bundle's download, the block fetch over its part file.

Internal to the agent (see :mod:`agent` for the public surface). The fleet's simulator runs some
of these parts for its simulated devices too, so none of them imports the daemon's process
(config, upstream, standalone).
"""
