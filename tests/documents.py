"""Well-formed signed-metadata documents as JSON data, for tests to alter."""

from __future__ import annotations

from datetime import timedelta

from tests.conftest import NOW

DAY = timedelta(days=1)


def descriptor_doc(**over: object) -> dict[str, object]:
    """A well-formed bundle descriptor (as JSON data) that expires 30 days after NOW."""
    doc: dict[str, object] = {
        "type": "bundle-descriptor",
        "spec_version": 1,
        "model": "tiny",
        "version": "1.0.0",
        "release": 1,
        "bundle_sha256": "ab" * 32,
        "bundle_size": 8192,
        "block_size": 4096,
        "block_list_sha256": "cd" * 32,
        "manifest_sha256": "ef" * 32,
        "created": (NOW - timedelta(hours=1)).isoformat(),
        "expires": (NOW + 30 * DAY).isoformat(),
    }
    doc.update(over)
    return doc
