from pathlib import Path

from agent.verify import verify_bundle
from tests.conftest import NOW, Keys


def test_signed_bundle_verifies(signed, keys: Keys) -> None:
    path, envelope = signed()
    verified = verify_bundle(path, envelope, keys.state(), NOW)
    assert verified.descriptor.model == "tiny"
    assert verified.signers == {keys.release.keyid}
    assert isinstance(path, Path)
