"""An application on the box for `make demo`: asks the model without pause until told to stop.

    python docs/demo_client.py PORT MODEL STOP_FILE [--seconds 120]

Requests alternate between a batch of one and a batch of two, over one keep-alive connection
(KServe v2 JSON). When STOP_FILE appears (or after --seconds) it prints one JSON line: how many
requests each version answered, how many failed, and the first failures' reasons.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from collections import Counter


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("model")
    p.add_argument("stop_file")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--inputs", type=int, default=64)
    args = p.parse_args()
    bodies = [
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [batch, args.inputs],
                        "data": [0.25] * (batch * args.inputs),
                    }
                ]
            }
        )
        for batch in (1, 2)
    ]
    answered: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    reasons: list[str] = []
    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=10)
    deadline = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < deadline and not os.path.exists(args.stop_file):
        batch = 1 + n % 2
        n += 1
        try:
            conn.request(
                "POST",
                f"/v2/models/{args.model}/infer",
                bodies[batch - 1],
                {"Content-Type": "application/json"},
            )
            reply = conn.getresponse()
            data = json.loads(reply.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            conn.close()
            failed["connection"] += 1
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if reply.status == 200:
                answered[data["model_version"]] += 1
                continue
            failed[f"HTTP {reply.status}"] += 1
            reason = f"HTTP {reply.status} (batch of {batch}): {data.get('error', data)}"
        if len(reasons) < 3:
            reasons.append(reason[:200])
    summary = {
        "requests": n,
        "answered": dict(answered),
        "failed": sum(failed.values()),
        "failures": dict(failed),
        "first_failures": reasons,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
