"""Render ``docs/protocol.md`` from the topic scheme and the message models.

Run ``python -m agent.transport.protocol_doc > docs/protocol.md`` (``make docs``); a test
fails when the committed document differs from what this renders.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import get_args

from pydantic import BaseModel

from agent import errors
from agent.errors import EdgeAgentError
from agent.transport.fetch import BITMAP_EVERY, TransferSettings
from agent.transport.messages import (
    BLOCK_LIST_PAGE,
    HEARTBEAT_S,
    LEASE_S,
    MAX_TELEMETRY_METRICS,
    MAX_WINDOW,
    MESSAGES,
    METRICS,
    OFFLINE,
    TIMED_OUT,
    Event,
    HardwareProfile,
    ModelStatus,
    Online,
    Phase,
    Reported,
    RolloutStatus,
    TrustStatus,
)
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
| `{d.online}` | yes | device -> fleet | `Online`; the will is `{will}` |
| `{d.telemetry}` | no | device -> fleet | `Telemetry` |
| `{d.events}` | no | device -> fleet | `Event` |
| `{request}` | no | device -> bundle servers | `BlockRequest` |
| `{d.blocks}` | no | bundle server -> device | block reply frame |
| `{trust}` | yes | fleet -> devices | `TrustUpdate` |
| `{rollouts}/plan` | yes | fleet -> fleet | `RolloutPlan` |
| `{rollouts}/state` | yes | fleet -> fleet | `RolloutState` |
| `{rollouts}/control` | yes | fleet -> fleet | `RolloutControl` |

Bundle servers subscribe to `{shared}` (an MQTT 5 shared subscription, so several servers
split the load; on a 3.1.1 broker each server subscribes to `{plain}` and answers every
request). A device writes the first reply for a block it asked for and drops any later copy.

## Deployments

A desired topic holds a DSSE envelope (`{{"payloadType", "payload", "signatures"}}`) whose
payload type is `{deployment_type}` and whose payload is a `DeploymentDocument`. A device accepts
it only when:

- release keys of the device's keyring sign it, at the keyring's threshold, and each of them may
  sign every model it names (a document that names no model affects every model a device runs:
  only keys that may sign any model, `*`, may sign it);
- it is addressed to the device itself or to one of its groups (`target`);
- it has not expired;
- its `sequence` is higher than that of the last document accepted from the same topic (the same
  document again, as a retained message is redelivered on every reconnect, changes nothing);
- every model's embedded bundle descriptor (payload type `{descriptor_type}`) verifies on its own,
  names that model, and is not older than the release the device already runs.

A device-level document overrides its groups'; among its groups, the first listed in the
device's `groups` wins. A refused document changes nothing; the device reports why in
`Reported.error` and sends a `rejected` event.

`models` names every model the device (or group) runs, each with its bundle. A model a new
document no longer names is removed once every model it names is active; an empty `models`
removes them all.

**Handing a device back to its group.** A device's own document holds until a newer one
replaces it. A device document with `"follow_groups": true` (and no models) hands it back: the
device follows its groups' documents again (keeping what runs while none names a model). Its
sequence counts like any other, so the device's older documents stay refused if replayed. A
group document that takes over is verified again first: one that has expired, or names a
release below one the device has run since, is refused (`Reported.error`) and what runs stays.
`edge-fleet deploy --device cam-01 --follow-groups --key ...` signs and publishes one. (An empty
retained message on the desired topic only clears the broker; the device keeps its document.)

## Sessions

Devices connect with a persistent session (MQTT 5: `clean_start` false and a session expiry,
a week by default; 3.1.1: `clean_session` false) under their device id as client id, so QoS 1
messages sent while a device is away wait for it. The will, retained with QoS 1 on
`{d.online}`, is exactly `{will}`; a clean stop publishes the same before it disconnects. On
every connect the device publishes a retained `online`, for example `{online}`. A lost connection is
retried with jittered exponential backoff (between half and all of `min(max, initial * 2^n)`).
Everything is published with QoS 1; desired, reported, online and trust are retained.

## Reported state and events

`{d.reported}` (retained) holds a `Reported` document: the agent version, the hardware profile,
the deployment id and sequence it follows, what it trusts (`trust`: the root and keyring
versions, the acknowledgement of a trust update), and for each model slot what serves requests
now (`version`, `release`, `variant`, `runtime`, `bundle_sha256`) and where its deployment
stands (`phase`, `progress` while downloading or warming up, `error`). During `probation` the
new version serves, and `fallback` names the committed version a failed probation goes back to
(absent on a first deployment); in every other phase the committed version serves while the new
one is fetched, loaded and tested beside it. Each model moves on its own through the phases

    pending -> downloading -> verifying -> unpacking -> loading -> warming -> self-testing
            -> probation -> active
    (any of them) -> failed;  probation -> rolled-back

and every change is also sent to `{d.events}` (`kind: "phase"`). A refused message sends a
`rejected` event naming the topic and the reason; a refused document also sets
`Reported.error`. At most one `rejected` event goes out per topic, reason code and second:
refusals beyond that are counted into the next one (`count`, with the last one's error), never
dropped. Events are sent through a queue on disk, in order, also after a broker outage; `seq`
grows with every event, across restarts too (numbers may be skipped after a restart).

A version that failed its probation (`rolled-back`), or whose deployment the agent's own death
cut short three times (`failed`, code `interrupted`), stays refused for the deployment document
that named it, across restarts: the device serves the last good version and does not try the
refused one again until a newer document names it. The release floor moves only when a version
commits. Reason codes:

| code | meaning |
|---|---|
{codes}

A model the effective document no longer names is removed once every model it names is active.

## Block transfer

Devices pull bundles. After a deployment verifies, a device asks for pages of the bundle's
block-hash list (`kind: "block-list"`) and checks them against the hash the descriptor signs,
then asks for blocks (`kind: "blocks"`), at most {window} indexes a request, and checks each
block against the list before it is written. Replies come on the device's own `blocks` topic as
frames:

    "EMB1" (4 bytes) | header length (2 bytes, big-endian) | JSON BlockReplyHeader | raw bytes

The block list is the raw 32-byte SHA-256 of each block (`block_size` bytes; the last block
may be shorter), in block order; its SHA-256 is the descriptor's `block_list_sha256`. Page `p`
holds the digests of blocks `p * {page}` up to `p * {page} + {page} - 1` (the last page fewer):
`32 * n` bytes for its `n` blocks. Its frame header says `kind: "block-list"`, `index: p` and
`total`: the number of pages. A block's header says `kind: "block"`, its index, and `total`: the
number of blocks.

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
later), `server-storage`, or `block-too-large`: the frame would exceed the broker's packet
limit (MQTT 5 brokers announce it in CONNACK; for 3.1.1 the server is told with
`--max-packet-bytes`). A server never sends a larger packet; the device fails the transfer at
once with `block-too-large`. Bundles for brokers that allow 128 KiB packets (AWS IoT Core,
mosquitto's common `max_packet_size`) need blocks below 128 KiB; `edge-fleet bundle build`
warns of larger ones.

## Trust updates

`{trust}` (retained) holds a `TrustUpdate`: the root versions after the first one (each a DSSE
envelope exactly as `edge-fleet keys` wrote it, in order) and the current keyring. A device
accepts root N+1 only when it is signed by the thresholds of root N and of itself, and a keyring
only when the root's threshold signs it, its version is not older than the one it trusts, and
it has not expired. Nothing else in the message is trusted. Once accepted, `Reported.trust`
says the new `root_version` and `keyring_version`: that is the acknowledgement. A deployment a
device refused for want of trust material (`no trusted keyring` on a box set up with a root
alone, a key its keyring did not list) is verified again as soon as new trust arrives.

With the mosquitto clients: write the message without publishing it, then publish it retained.

    edge-fleet keys publish fleet-keys -o trust.json --no-publish
    mosquitto_pub -h BROKER -p 8883 --cafile ca.crt --cert fleet.crt --key fleet.key -V mqttv5 \\
        -t '{trust}' -r -q 1 -f trust.json

## Going back to an earlier bundle

A device refuses a bundle descriptor whose `release` is below its release floor for the model:
the highest release it has committed, which only rises. To send devices back to an earlier
bundle the fleet does not rebuild it: it *re-issues* the earlier bundle's descriptor, signed
afresh by release keys, under a new `release` above every release the devices have run, with
`bundle_release` set to the release the bundle's manifest was built with:

    edge-fleet bundle reissue classifier-1.1.0.emb --release 1003000 \\
        --key keys/private/release-KEYID.pem
    edge-fleet deploy classifier-1.1.0.emb --descriptor classifier-1.1.0.emb.r1003000.dsse \\
        --device cam-01 --key keys/private/release-KEYID.pem

As in TUF and Uptane, the anti-rollback counter belongs to the signed metadata, and the bytes
stay pinned by their hash: they do not change, so a device that kept the bundle (it keeps the
last good one) fetches nothing, and blocks it holds in other stored bundles are copied, not
fetched. The device checks the manifest against the descriptor as for any bundle, comparing the
manifest's release with `bundle_release` where it is set (else with `release`); it reports the
descriptor's `release` and raises its floor to it when the version commits. A device that runs
those very bytes already takes the higher release at once, with no reload. `bundle_release`
appears only in a re-issued descriptor and must be below its `release`.

## Threats, in TUF and Uptane terms

An attacker who controls the broker or the network can drop, delay, reorder and replay any
message, and publish whatever the broker lets them; they hold no release or root key.

- **Rollback and replay.** An older deployment replayed on a desired topic is refused by its
  `sequence` (kept per topic, never lower after a restart); an older descriptor inside a newer
  document is refused by the release floor (`rollback`). Once a device has run a re-issued
  descriptor, the bundle's original one (a lower release) is refused like any older release.
- **Freeze.** Holding a device on old metadata is bounded by expiry: roots, keyrings, release
  keys, descriptors and deployments all expire, and the device refuses what has (`expired`).
- **Mix and match.** The descriptor pins the bundle's SHA-256 and size, the hash of its block
  list and the manifest's digest together: each block is checked against the list before it is
  written, the file and each member before anything is installed (`digest-mismatch`).
- **Arbitrary bundle, endless data.** Only keyring release keys, at the keyring's threshold and
  allowed the model, sign descriptors and deployments; every size is bounded by the descriptor
  and by the device's limits.

A re-issue needs a release key, and gives it no power it lacked: a key that may sign a
descriptor of the model under any release can as well build and sign a new bundle with a
higher `--release`. The fleet re-issues only a descriptor that release keys it trusts today
signed (whatever that descriptor's own expiry: the hashes a re-issue keeps do not go stale), or
one it describes afresh from the bundle file (`edge-fleet bundle reissue`); otherwise whoever
writes the documents the fleet reads back could have it sign any bytes under a fresh release.

What a re-issue cannot do: lower a floor (the device compares the descriptor's `release`, and
nothing takes a device below a release it has committed), or change the bytes (they stay pinned
by their hash). An agent that predates `bundle_release` refuses a re-issued descriptor as
malformed (`format`) and keeps what it runs: upgrade it first, or build the bundle again with a
higher `--release` for it. Descriptors that are not re-issues carry no `bundle_release`, so
such agents read all of them as before.

## Telemetry

`{d.telemetry}` carries a `Telemetry` message every `[telemetry] interval_s` (60 s by
default): named numbers at one instant, at most {max_metrics} of them. Sources a box lacks (an
NVIDIA GPU, a Jetson, temperature sensors) are left out. The `model.*` metrics name only the
models that run.

| metric | unit | what |
|---|---|---|
{metrics}

## Rollouts

A rollout (`edge-fleet rollout start`) takes a version to a target set in waves. Its state lives
on the broker, retained, so that any controller on any machine can carry it on after a crash and
every operator sees the same thing; devices never read these topics (the shipped ACL gives them
no access):

- `{rollouts}/plan` is written once, when the rollout starts: the rolled-out models with
  their signed descriptors, the target (a group, narrowed by selectors on what devices report),
  the waves (device ids, ordered by a hash of the rollout id and the device id), the gate, the
  terms every device document is signed on (`deployment_id`, `sequence`, `issued`, `expires`),
  and what each device ran of each model before, with those versions' signed descriptors.
- `{rollouts}/state` is written by the controller that drives the rollout, before and after
  every step: `status` ({statuses}), the current `wave` and how many waves are `published`, the
  failures with their reason codes, why it halted, the rollback's terms, and `owner` and
  `heartbeat` (every {heartbeat:g} s). Another controller takes over only when the heartbeat is
  older than {lease:g} s or the owner's process is gone.
- `{rollouts}/control` carries an operator's `pause`, `resume` or `abort`; the driving
  controller applies a request newer than the last it took (`control_at`).

During a rollout each device gets a document of its own on its desired topic: what its
effective document named, with the rolled-out models replaced (so its other models stay), signed
on the plan's terms. The same terms give the same bytes, so a controller that publishes a
document again after a restart changes nothing on the device. A wave passes its gate once each
of its devices reports `active` on the new bundles, with failures (`failed`, `rolled-back`, a
refusal -- a `rejected` event on its desired topic --, `{timed_out}` or `{offline}` at the
wave's timeout) counted over every device published so far at most the threshold; with a soak
time, the new version's error rate and p99 latency from `model.<name>.*` telemetry are then
compared with those of devices still on the old version. A gate that fails halts the rollout.

A rollback (`edge-fleet rollout rollback`) sends every device the rollout reached a document
that names what it ran before, each earlier bundle's descriptor re-issued with a release above
every one the rollout reached (see "Going back to an earlier bundle" above): devices keep
refusing older releases, and the bytes, so the blocks a device kept, are the same. Two rollouts
that share a device are refused: a new one is checked against every rollout not yet done,
aborted or rolled back, and of two started at the same moment the one whose plan the broker
took first stands (the other aborts itself before it publishes to any device). On a clustered
broker that order is the order of the node that holds the retained plans; start rollouts from
one place there.

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
keeps what it runs. A device refuses a bundle whose release counter is below the one it runs
(anti-rollback): to go back to an earlier model, re-issue its descriptor under a higher release
(below, "Going back to an earlier bundle") and deploy that.

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
    groups=["lobby"],
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
    trust=TrustStatus(root_version=1, keyring_version=2, keyring_expires=_AT.replace(year=2027)),
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
        if cls.__module__ != errors.__name__ or "code" not in vars(cls):
            continue  # a class that keeps its parent's code has no row of its own
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
            rollouts=f"{prefix}/rollouts/{{id}}",
            statuses=", ".join(f"`{x}`" for x in get_args(RolloutStatus)),
            heartbeat=HEARTBEAT_S,
            lease=LEASE_S,
            timed_out=TIMED_OUT,
            offline=OFFLINE,
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
            will=Online(state="offline").to_bytes().decode(),
            online=Online(state="online", agent_version="0.1.0", since=_AT).to_bytes().decode(),
            max_metrics=MAX_TELEMETRY_METRICS,
            metrics="\n".join(f"| `{n}` | {u} | {w} |" for n, u, w in METRICS),
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
