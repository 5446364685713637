"""The topic scheme: names, filters, parsing, and ids that cannot escape their level."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError, FormatError
from agent.transport.topics import TopicRef, Topics

SHA = "ab" * 32


def test_device_topics() -> None:
    t = Topics().device("cam-01")
    assert t.desired == "ema/v1/devices/cam-01/desired"
    assert t.reported == "ema/v1/devices/cam-01/reported"
    assert t.online == "ema/v1/devices/cam-01/online"
    assert t.telemetry == "ema/v1/devices/cam-01/telemetry"
    assert t.events == "ema/v1/devices/cam-01/events"
    assert t.blocks == "ema/v1/devices/cam-01/blocks"


def test_other_topics_and_filters() -> None:
    t = Topics("acme/edge")
    assert t.group_desired("store_7") == "acme/edge/groups/store_7/desired"
    assert t.bundle_request(SHA, "cam-01") == f"acme/edge/bundles/{SHA}/request/cam-01"
    assert t.trust == "acme/edge/trust"
    assert t.bundle_requests_filter() == "$share/ema-bundle-servers/acme/edge/bundles/+/request/+"
    assert t.bundle_requests_filter(shared=False) == "acme/edge/bundles/+/request/+"
    assert t.all_devices_filter("reported") == "acme/edge/devices/+/reported"


@pytest.mark.parametrize(
    "bad", ["", "a/b", "+", "#", "cam+1", "cam#", "-lead", ".hidden", "x" * 65, "tab\t", "é"]
)
def test_ids_stay_in_their_level(bad: str) -> None:
    with pytest.raises(ConfigError):
        Topics().device(bad)
    with pytest.raises(ConfigError):
        Topics().group_desired(bad)


@pytest.mark.parametrize("bad", ["", "/ema", "ema/", "ema//v1", "ema/+", "ema/#", "$SYS"])
def test_bad_prefix(bad: str) -> None:
    with pytest.raises(ConfigError):
        Topics(bad)


def test_bundle_request_needs_a_sha256() -> None:
    with pytest.raises(ConfigError):
        Topics().bundle_request("AB" * 32, "cam-01")


@pytest.mark.parametrize(
    ("topic", "ref"),
    [
        ("ema/v1/devices/cam-01/desired", TopicRef("device", "desired", "cam-01")),
        ("ema/v1/devices/cam-01/blocks", TopicRef("device", "blocks", "cam-01")),
        ("ema/v1/groups/store-7/desired", TopicRef("group", "desired", "store-7")),
        (f"ema/v1/bundles/{SHA}/request/cam-01", TopicRef("bundle", "request", SHA, "cam-01")),
        ("ema/v1/trust", TopicRef("trust", "trust")),
    ],
)
def test_parse_round_trip(topic: str, ref: TopicRef) -> None:
    assert Topics().parse(topic) == ref


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/devices/cam-01/desired",
        "ema/v1/devices/cam-01/secret",
        "ema/v1/devices/cam/01/desired",
        "ema/v1/groups/g/reported",
        "ema/v1/bundles/xyz/request",
        "ema/v1/trust/extra",
        "ema/v1",
        "ema/v1/devices/+/desired",
    ],
)
def test_parse_refuses_topics_outside_the_scheme(topic: str) -> None:
    with pytest.raises(FormatError):
        Topics().parse(topic)
