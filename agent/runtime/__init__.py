"""Inference backends (imported lazily), the hardware probe and the choice of variant.

Internal to the agent (see :mod:`agent` for the public surface): names here may change in any
release.
"""
