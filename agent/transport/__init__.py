"""MQTT transport: the topic scheme, message schemas, the session, and the block fetch.

Internal to the agent (see :mod:`agent` for the public surface): names here may change in any
release.
"""
