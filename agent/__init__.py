"""Edge Model Agent: signed model bundles, hot-swapped inference runtimes, a local inference API.

The public surface, for a program that builds, signs, deploys or verifies bundles without the
command-line tools (each module lists what it offers in ``__all__``):

================== ===========================================================================
``agent.fleet``    the fleet side: keys (:class:`KeyStore`), build (:func:`build_bundle`), sign
                   and reissue (:func:`sign_bundle`, :func:`reissue_bundle`), deploy
                   (:func:`stage_descriptors`, :func:`make_deployment`) and wait for the
                   devices (:func:`watch_deployment`), the fleet's view (:func:`collect`,
                   :class:`FleetView`), rollouts (:class:`Controller`, :func:`plan_rollout`) and
                   the bundle server (:class:`BlockServer`)
``agent.verify``   the whole verification of a bundle file, as a device runs it
``agent.trust``    the trust core: keys, signed envelopes, root and keyring metadata, verdicts
``agent.bundle``   the bundle format: manifest, archive reading, safe unpack, checks
``agent.errors``   the one exception tree every error of the project belongs to
``agent.values``   the value types the wire documents share (hashes, names, versions, phases)
================== ===========================================================================

Everything else is the agent's own machinery, internal to it: the device's process (``daemon``,
``device``, ``serving``, ``runtime``, ``transport``, ``state``, ``telemetry``, ``config``,
``upstream``, ``standalone``, ``statusd``, ``logs``, ``notify``), the command-line tools
(``cli``), modules whose names start with an underscore, and the source tree's test harness
(``testing``, left out of the wheel). Their names may change in any release; the wire protocol in
docs/protocol.md, not these modules, is what devices and fleets agree on.
"""

__version__ = "0.1.0"

PUBLIC_MODULES = (
    "agent.fleet",
    "agent.verify",
    "agent.trust",
    "agent.bundle",
    "agent.errors",
    "agent.values",
)
"""The modules of the public surface; ``tests/test_public_surface.py`` holds them to it."""
