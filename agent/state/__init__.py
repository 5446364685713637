"""On-disk state: trust, accepted deployments, downloads, bundles, installed models."""
