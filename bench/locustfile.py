"""A Locust load test of one model on the agent's inference API, for teams that use Locust.

    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --model tiny \\
        [--batch 8] [--json-inputs] [--headless -u 16 -r 16 -t 60s]

Each simulated user reads the model's metadata once (``GET /v2/models/NAME``), makes its
request with what ``edge-agent loadtest`` uses (agent.serving.loadtest.make_request: inputs of
the model's names, datatypes and shapes, binary tensors unless ``--json-inputs``), then sends
it in a loop. A 503 (the agent shedding load: queue full or memory above its threshold) is
reported as a failure named ``503 busy`` with its Retry-After, and that user waits as long
before its next request. A token for the API is read from $EDGE_AGENT_API_TOKEN.
"""

from __future__ import annotations

import os
from typing import Any

from locust import HttpUser, events, task
from locust.argument_parser import LocustArgumentParser

from agent.serving.loadtest import MAX_BACKOFF_S, Request, make_request, model_path


def _options(parser: LocustArgumentParser) -> None:
    parser.add_argument("--model", default="", help="the model to drive (required)")
    parser.add_argument("--model-version", default="", help="one of its versions")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--json-inputs", action="store_true", help="JSON tensors, not binary")


events.init_command_line_parser.add_listener(_options)  # type: ignore[no-untyped-call]


class ModelUser(HttpUser):
    """One client of the API: its request made from the model's metadata, sent in a loop."""

    request: Request
    auth: dict[str, str]

    def on_start(self) -> None:
        opts: Any = self.environment.parsed_options
        if not opts.model:
            raise RuntimeError("give the model: --model NAME")
        token = os.environ.get("EDGE_AGENT_API_TOKEN")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        version = opts.model_version or None
        reply = self.client.get(model_path(opts.model, version), headers=self.auth, name="metadata")
        reply.raise_for_status()
        self.request = make_request(
            reply.json(), batch=opts.batch, binary=not opts.json_inputs, version=version
        )

    @task
    def infer(self) -> None:
        r = self.request
        with self.client.post(
            r.path,
            data=r.body,
            headers={**r.headers, **self.auth},
            name="infer",
            catch_response=True,
        ) as reply:
            if reply.status_code == 503:
                after = reply.headers.get("Retry-After", "1")
                reply.failure(f"503 busy, Retry-After {after}")
                try:
                    wait = float(after)
                except ValueError:
                    wait = 1.0
                self.wait_time_override = min(max(wait, 0.0), MAX_BACKOFF_S)
            elif reply.status_code != 200:
                reply.failure(f"{reply.status_code}: {reply.text[:200]}")
            else:
                reply.success()

    wait_time_override = 0.0

    def wait_time(self) -> float:
        wait, self.wait_time_override = self.wait_time_override, 0.0
        return wait
