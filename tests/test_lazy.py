"""What keeps an idle daemon light: numpy imported on first use only."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy

from agent._lazy import lazy_module
from agent.runtime.base import DATATYPES, kserve_datatype


def test_the_daemon_and_its_api_import_without_numpy() -> None:
    code = (
        "import sys, json; import agent.cli, agent.daemon, agent.serving.api, agent.serving.slots;"
        "from agent.runtime.base import DATATYPES; ok = 'FP32' in DATATYPES and len(DATATYPES) == 12;"
        "print(json.dumps(['numpy' in sys.modules, ok]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == [False, True]


def test_the_stand_in_is_numpy_once_used() -> None:
    np = lazy_module("numpy")
    assert np.float32 is numpy.float32
    assert "zeros" in np.__dict__  # copied: later reads are plain lookups
    assert np.zeros(3).sum() == 0


def test_datatypes_map_to_numpy_both_ways() -> None:
    assert DATATYPES["FP16"] == numpy.dtype(numpy.float16)
    assert DATATYPES.get("BYTES") is None
    assert kserve_datatype(numpy.int64) == "INT64"
    assert kserve_datatype(numpy.complex64) is None
    assert set(DATATYPES) == {kserve_datatype(d) for d in DATATYPES.values()}


def test_release_free_memory_returns_freed_heap_pages() -> None:
    """Freed blocks below the heap's top stay resident until malloc_trim hands them back."""
    code = """
import gc
from agent._lazy import release_free_memory
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
blocks = [bytearray(100_000) for _ in range(1000)]  # below the mmap threshold: on the heap
pin = bytearray(100_000)  # keeps the top of the heap in use
del blocks
gc.collect()
before = rss()
release_free_memory()
print(before - rss())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) > 50_000  # KiB: most of the ~100 MB freed
