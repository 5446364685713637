"""The harness the tests and the benchmarks share: a real mosquitto on a free loopback port
(:mod:`.broker`), a small fleet around it - watcher, bundle server, device agents on a thread or
as processes (:mod:`.fleet`) - tiny models built on the spot (:mod:`.models`), bounded waits
(:mod:`.wait`), and the Python broker ``make demo`` falls back to without mosquitto
(:mod:`.embedded_broker`).

For the source tree only: the built wheel, and so the .deb, leaves this package out (see
``[tool.hatch.build.targets.wheel]`` in pyproject.toml), and nothing else in ``agent`` imports
it. Its modules import numpy, onnx and paho at the top: import them from tests and benchmarks
alone.
"""
