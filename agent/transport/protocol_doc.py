"""Render ``docs/protocol.md`` from the topic scheme and the message models.

Run ``python -m agent.transport.protocol_doc > docs/protocol.md`` (``make docs``); a test
fails when the committed document differs from what this renders.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from pydantic import BaseModel

from agent import errors
from agent.errors import EdgeAgentError
from agent.transport.messages import (
    BLOCK_LIST_PAGE,
    MAX_WINDOW,
    MESSAGES,
    Event,
    HardwareProfile,
    ModelStatus,
    Phase,
    Reported,
)
from agent.transport.topics import Topics
from agent.transport.transfer import BITMAP_EVERY, TransferSettings
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
| `{d.online}` | yes | device -> fleet | `Online`; the will says `"state": "offline"` |
| `{d.telemetry}` | no | device -> fleet | `Telemetry` |
| `{d.events}` | no | device -> fleet | `Event` |
| `{request}` | no | device -> bundle servers | `BlockRequest` |
| `{d.blocks}` | no | bundle server -> device | block reply frame |
| `{trust}` | yes | fleet -> devices | `TrustUpdate` |

Bundle servers subscribe to `{shared}` (an MQTT 5 shared subscription, so several servers
split the load; on a 3.1.1 broker one server subscribes to `{plain}`).

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

## Sessions

Devices connect with a persistent session (MQTT 5: `clean_start` false and a session expiry,
a week by default; 3.1.1: `clean_session` false) under their device id as client id, so QoS 1
messages sent while a device is away wait for it. The will, retained, on `{d.online}` says
`offline`; on every connect the device publishes a retained `online`. A lost connection is
retried with jittered exponential backoff (between half and all of `min(max, initial * 2^n)`).
Everything is published with QoS 1; desired, reported, online and trust are retained.

## Reported state and events

`{d.reported}` (retained) holds a `Reported` document: the agent version, the hardware profile,
the deployment id and sequence it follows, and for each model slot what it runs (version,
release, variant, bundle) and where its deployment stands (`phase`, `progress` while
downloading, `error`). Each model moves on its own through the phases

    pending -> downloading -> verifying -> unpacking -> loading -> warming -> self-testing
            -> probation -> active
    (any of them) -> failed;  probation -> rolled-back

and every change is also sent to `{d.events}` (`kind: "phase"`). A refused message sends a
`rejected` event naming the topic and the reason; a refused document also sets
`Reported.error`. Reason codes:

| code | meaning |
|---|---|
{codes}

A model the effective document no longer names is removed once every model it names is active.

## Block transfer

Devices pull bundles. After a deployment verifies, a device asks for pages of the bundle's
block-hash list (`kind: "block-list"`, {page} SHA-256 digests a page) and checks them against
the hash the descriptor signs, then asks for blocks (`kind: "blocks"`), at most {window} indexes
a request, and checks each block against the list before it is written. Replies come on the
device's own `blocks` topic as frames:

    "EMB1" (4 bytes) | header length (2 bytes, big-endian) | JSON BlockReplyHeader | raw bytes

Device rules (the `[transfer]` table of agent.toml): at most `window` blocks (default {dwindow})
asked for and not yet received, so a stock mosquitto (1000 queued, 20 in flight per client)
never drops a reply; a block not received within `request_timeout_s` (default {rto:g} s) is
asked for again, as is everything outstanding after a reconnect; free disk for twice the bundle
plus a reserve is checked before the first block. The bitmap of verified blocks is saved after
every {bitmap_every} blocks, so a restart fetches at most {bitmap_every} verified blocks again. Blocks the device holds in bundles
it already has (same SHA-256) are copied, not fetched. With no block for `stall_timeout_s`
(default {stall:g} s) the model's phase becomes `failed` with `transfer-timeout`, or
`bundle-unavailable` when servers answered that they lack the bundle.

A server answers what it cannot serve with a frame whose header has `kind: "error"` and an
`error.code`: `unknown-bundle`, `bad-index`, `rate-limited` (the per-device limit; ask again
later) or `server-storage`.

## Worked example: driving a device with the mosquitto clients

The fleet's certificate (`fleet.crt`, CN `fleet`) may publish desired documents; a device's may
not. Sign a deployment without publishing it (signing needs the release key, nothing else):

    edge-fleet deploy model.emb --device cam-01 --key keys/private/release-KEYID.pem \\
        --bundles /srv/bundles -o deployment.json --no-publish

and make sure a bundle server serves `/srv/bundles` (`edge-fleet serve --bundles /srv/bundles`).
Then, with the mosquitto clients alone:

    # what every device reports, and their events (leave running)
    mosquitto_sub -h BROKER -p 8883 --cafile ca.crt --cert fleet.crt --key fleet.key -V mqttv5 \\
        -t '{all_reported}' -t '{all_events}' -t '{all_online}' -v

    # deploy: the retained desired document (a device that is offline gets it on reconnect)
    mosquitto_pub -h BROKER -p 8883 --cafile ca.crt --cert fleet.crt --key fleet.key -V mqttv5 \\
        -t '{example.desired}' -r -q 1 -f deployment.json

The device answers on its events topic with one message per phase, for example

    {event}

and its retained reported state ends as

    {reported}

A document it refuses (say, the same deployment signed by a key the keyring does not list)
changes nothing; `Reported.error` says `{{"code": "untrusted-key", ...}}`. Publishing an empty
retained message to a desired topic (`-r -n`) removes the document from the broker; the device
keeps what it runs. To roll a device back, deploy the earlier bundle again: a new document with a
higher sequence.

Watch the blocks a device receives (frames; the JSON header is readable):

    mosquitto_sub ... -t '{example.blocks}' -C 1 | head -c 300

A block request by hand, as a device sends it (a bundle server answers on the device's `blocks`
topic; the ACL lets a device publish requests, and receive only its own replies):

    mosquitto_pub ... -t '{prefix}/bundles/SHA256/request/cam-01' -q 1 \\
        -m '{{"type":"block-request","device_id":"cam-01","bundle_sha256":"SHA256","kind":"blocks","indexes":[0,1]}}'

## Schemas
"""


_AT = datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc)
_EXAMPLE_EVENT = Event(
    device_id="cam-01",
    seq=3,
    at=_AT,
    kind="phase",
    model="detector",
    deployment_id="dep-1767605400000",
    phase=Phase.DOWNLOADING,
)
_EXAMPLE_REPORTED = Reported(
    device_id="cam-01",
    agent_version="0.1.0",
    at=_AT,
    hardware=HardwareProfile(arch="aarch64", cpu_count=6, memory_mb=7620),
    deployment_id="dep-1767605400000",
    sequence=1767605400000,
    models={
        "detector": ModelStatus(
            phase=Phase.ACTIVE,
            version="1.2.0",
            release=1002000,
            variant="onnx-fp32",
            bundle_sha256="3f" * 32,
        )
    },
)


def _codes() -> str:
    """One row per error class, described by the tree in agent.errors' docstring."""
    described = {}
    for line in (errors.__doc__ or "").splitlines():
        found = re.match(r"^[\s│├└─]*([A-Za-z]+Error)\s{2,}(.+)$", line)
        if found:
            described[found.group(1)] = found.group(2).strip()
    rows = []
    for cls in _error_classes(EdgeAgentError)[1:]:
        if cls.__module__ != errors.__name__:
            continue
        rows.append(f"| `{cls.code}` | {described.get(cls.__name__, cls.__name__)} |")
    return "\n".join(rows)


def _error_classes(base: type[EdgeAgentError]) -> list[type[EdgeAgentError]]:
    found = [base]
    for sub in base.__subclasses__():
        found += _error_classes(sub)
    return found


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
            request=f"{prefix}/bundles/{{sha256}}/request/{{id}}",
            trust=topics.trust,
            shared=topics.bundle_requests_filter(),
            plain=topics.bundle_requests_filter(shared=False),
            deployment_type=DEPLOYMENT_TYPE,
            descriptor_type=DESCRIPTOR_TYPE,
            page=BLOCK_LIST_PAGE,
            window=MAX_WINDOW,
            all_reported=topics.all_devices_filter("reported"),
            all_events=topics.all_devices_filter("events"),
            all_online=topics.all_devices_filter("online"),
            example=topics.device("cam-01"),
            codes=_codes(),
            dwindow=TransferSettings().window,
            bitmap_every=BITMAP_EVERY,
            rto=TransferSettings().request_timeout_s,
            stall=TransferSettings().stall_timeout_s,
            event=_EXAMPLE_EVENT.to_bytes().decode(),
            reported=_EXAMPLE_REPORTED.to_bytes().decode(),
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
