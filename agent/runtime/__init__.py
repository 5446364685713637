"""Inference backends (imported lazily), the hardware probe and the choice of variant."""
