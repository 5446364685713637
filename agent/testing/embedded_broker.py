"""An MQTT 3.1.1 broker in Python (amqtt), for `make demo` on a machine without mosquitto.

    python -m agent.testing.embedded_broker --port 18830

Plain TCP on loopback, anonymous, no ACL: a stand-in for trying the agent out, not a broker to
run a fleet on (that is mosquitto with config/broker/). Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from amqtt.broker import Broker  # type: ignore[import-untyped]


async def run(host: str, port: int) -> None:
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    print(f"embedded MQTT 3.1.1 broker on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if not args.host.startswith("127.") and args.host != "::1":
        parser.error("loopback only")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
