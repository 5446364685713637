"""On-disk state: trust, accepted deployments, downloads and their part files, bundles,
installed models.

Internal to the agent (see :mod:`agent` for the public surface): names here may change in any
release.
"""
