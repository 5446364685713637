"""Render ``docs/protocol.md`` from the topic scheme and the message models.

Run ``python -m agent.transport.protocol_doc > docs/protocol.md`` (``make docs``); a test
fails when the committed document differs from what this renders.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from agent.transport.messages import BLOCK_LIST_PAGE, MAX_WINDOW, MESSAGES
from agent.transport.topics import Topics
from agent.trust.metadata import (
    DEPLOYMENT_TYPE,
    DESCRIPTOR_TYPE,
    BundleDescriptor,
    DeploymentDocument,
)

_HEAD = """\
# Edge Model Agent: the MQTT protocol, version 1

Generated from the code by `make docs` (`python -m agent.transport.protocol_doc`); do not edit.
Any standard MQTT 3.1.1 or 5.0 broker carries it; nothing here is broker-specific.

## Topics

All topics sit under one prefix, `{prefix}` by default. Device and group ids are one topic level
of letters, digits, `.`, `_` and `-` (at most 64 characters).

| topic | retained | from -> to | payload |
|---|---|---|---|
| `{d.desired}` | yes | fleet -> device | signed deployment (DSSE envelope, below) |
| `{group}` | yes | fleet -> devices of the group | signed deployment |
| `{d.reported}` | yes | device -> fleet | `Reported` |
| `{d.online}` | yes | device -> fleet | `Online`; the will is `{{"state": "offline"}}` |
| `{d.telemetry}` | no | device -> fleet | `Telemetry` |
| `{d.events}` | no | device -> fleet | `Event` |
| `{request}` | no | device -> bundle servers | `BlockRequest` |
| `{d.blocks}` | no | bundle server -> device | block reply frame |
| `{trust}` | yes | fleet -> devices | `TrustUpdate` |

Bundle servers subscribe to `{shared}` (an MQTT 5 shared subscription, so several servers
split the load; on a 3.1.1 broker one server subscribes to `{plain}`).
Everything is published with QoS 1.

## Deployments

A desired topic holds a DSSE envelope (`{{"payloadType", "payload", "signatures"}}`) whose
payload type is `{deployment_type}` and whose payload is a `DeploymentDocument`. A device accepts
it only when:

- release keys of the device's keyring sign it, at the keyring's threshold, and each of them may
  sign every model it names;
- it is addressed to the device itself or to one of its groups (`target`);
- it has not expired;
- its `sequence` is higher than that of the last document accepted from the same topic (the same
  document again, as a retained message is redelivered on every reconnect, changes nothing);
- every model's embedded bundle descriptor (payload type `{descriptor_type}`) verifies on its own,
  names that model, and is not older than the release the device already runs.

A device-level document overrides its groups'. A refused document changes nothing; the device
reports why in `Reported.error` and sends a `rejected` event.

## Block transfer

Devices pull bundles. After a deployment verifies, a device asks for pages of the bundle's
block-hash list (`kind: "block-list"`, {page} SHA-256 digests a page) and checks them against
the hash the descriptor signs, then asks for blocks (`kind: "blocks"`), at most {window} indexes
a request, and checks each block against the list before it is written. Replies come on the
device's own `blocks` topic as frames:

    "EMB1" (4 bytes) | header length (2 bytes, big-endian) | JSON BlockReplyHeader | raw bytes

## Watching and driving devices with the mosquitto clients

    mosquitto_sub -h BROKER -p 8883 --cafile ca.crt --cert fleet.crt --key fleet.key \\
        -t '{all_reported}' -t '{all_events}' -v

    mosquitto_pub -h BROKER -p 8883 --cafile ca.crt --cert fleet.crt --key fleet.key \\
        -t '{d.desired}' -r -q 1 -f deployment.json

`deployment.json` is a signed deployment envelope. Publishing an empty retained message to a
desired topic (`-r -n`) removes the document from the broker; the device keeps what it runs.

## Schemas
"""


def _schema(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True)


def render(prefix: str = "ema/v1") -> str:
    topics = Topics(prefix)
    d = _Placeholders(prefix)  # device topics with "{id}": real ids are validated
    out = [
        _HEAD.format(
            prefix=prefix,
            d=d,
            group=f"{prefix}/groups/{{group}}/desired",
            request=f"{prefix}/bundles/{{sha256}}/request",
            trust=topics.trust,
            shared=topics.bundle_requests_filter(),
            plain=topics.bundle_requests_filter(shared=False),
            deployment_type=DEPLOYMENT_TYPE,
            descriptor_type=DESCRIPTOR_TYPE,
            page=BLOCK_LIST_PAGE,
            window=MAX_WINDOW,
            all_reported=topics.all_devices_filter("reported"),
            all_events=topics.all_devices_filter("events"),
        )
    ]
    sections: list[tuple[str, type[BaseModel]]] = [
        ("DeploymentDocument (payload of a desired envelope)", DeploymentDocument),
        ("BundleDescriptor (payload of an embedded descriptor envelope)", BundleDescriptor),
        *((f"{model.__name__} ({topic})", model) for topic, model in MESSAGES.items()),
    ]
    for title, model in sections:
        out.append(f"\n### {title}\n\n```json\n{_schema(model)}\n```\n")
    return "".join(out)


class _Placeholders:
    """Device topics with ``{id}`` in place of a device id, for the document."""

    def __init__(self, prefix: str) -> None:
        base = f"{prefix}/devices/{{id}}"
        self.desired = f"{base}/desired"
        self.reported = f"{base}/reported"
        self.online = f"{base}/online"
        self.telemetry = f"{base}/telemetry"
        self.events = f"{base}/events"
        self.blocks = f"{base}/blocks"


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
