"""Serving: model slots (load, warm up, self-test, swap, probation, rollback) and the local
inference API."""
