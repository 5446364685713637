"""edge-fleet as a fleet manager runs it: exit codes, one-line reasons, files it writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.bundle.reader import read_index
from agent.cli import agent_main, fleet_main
from agent.testing.models import make_onnx

BIN = Path(sys.executable).parent


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = fleet_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    keys = tmp_path / "keys"
    assert run(capsys, "keys", "init", keys)[0] == 0
    model = make_onnx(tmp_path / "m.onnx")
    bundle = tmp_path / "m-1.0.0.emb"
    assert (
        run(capsys, "bundle", "build", "--name", "m", "--version", "1.0.0", "-o", bundle, model)[0]
        == 0
    )
    release = next((keys / "private").glob("release-*.pem"))
    assert run(capsys, "bundle", "sign", bundle, "--key", release)[0] == 0
    return {"keys": keys, "bundle": bundle, "release": release, "model": model}


def test_keys_init_writes_private_keys_owner_only(fleet: dict[str, Path]) -> None:
    private = fleet["keys"] / "private"
    pems = sorted(p.name.split("-")[0] for p in private.glob("*.pem"))
    assert pems == ["release", "root", "root", "root"]
    for pem in private.glob("*.pem"):
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert (fleet["keys"] / "history" / "root.v1.json").read_bytes() == (
        fleet["keys"] / "root.json"
    ).read_bytes()


def test_keys_init_refuses_an_existing_directory(fleet: dict[str, Path], capsys) -> None:
    code, _, err = run(capsys, "keys", "init", fleet["keys"])
    assert code == 2
    assert "already holds keys" in err


def test_keys_init_refuses_a_threshold_above_the_key_count(tmp_path: Path, capsys) -> None:
    code, _, err = run(
        capsys, "keys", "init", tmp_path / "k", "--root-keys", "2", "--threshold", "3"
    )
    assert code == 2
    assert "threshold" in err
    assert not (tmp_path / "k" / "root.json").exists()


@pytest.mark.parametrize("trust", ["dir", "root", "keyring"])
def test_verify_accepts_dir_root_or_keyring(fleet: dict[str, Path], capsys, trust: str) -> None:
    path = {
        "dir": fleet["keys"],
        "root": fleet["keys"] / "root.json",
        "keyring": fleet["keys"] / "keyring.json",
    }[trust]
    code, out, err = run(capsys, "bundle", "verify", fleet["bundle"], "--trust", path)
    assert (code, err) == (0, "")
    assert out.startswith(f"verified {fleet['bundle']}: m 1.0.0 (release 1000000)")


def test_tampered_bundle_is_rejected_with_one_line(fleet: dict[str, Path], capsys) -> None:
    data = bytearray(fleet["bundle"].read_bytes())
    with open(fleet["bundle"], "rb") as f:
        member = read_index(f).members["variants/onnx-fp32/m.onnx"]
    data[member.offset + 10] ^= 0xFF
    fleet["bundle"].write_bytes(bytes(data))
    code, out, err = run(capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"])
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("edge-fleet: rejected (digest-mismatch):")
    assert "variants/onnx-fp32/m.onnx" in err


def test_verify_json(fleet: dict[str, Path], capsys) -> None:
    code, out, _ = run(
        capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"], "--json"
    )
    doc = json.loads(out)
    assert code == 0
    assert doc["verified"] is True
    assert doc["descriptor"]["model"] == "m"
    assert (
        doc["descriptor"]["bundle_sha256"]
        == __import__("hashlib").sha256(fleet["bundle"].read_bytes()).hexdigest()
    )


def test_verify_rollback_and_freeze(fleet: dict[str, Path], capsys) -> None:
    code, _, err = run(
        capsys,
        "bundle",
        "verify",
        fleet["bundle"],
        "--trust",
        fleet["keys"],
        "--min-release",
        "1000001",
    )
    assert code == 1
    assert "rejected (rollback)" in err
    code, _, err = run(
        capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"], "--at", "2099-01-01"
    )
    assert code == 1
    assert "rejected (expired)" in err
    code, _, err = run(
        capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"], "--at", "yesterday"
    )
    assert code == 2
    assert "ISO 8601" in err


def test_verify_without_an_envelope_or_trust(
    fleet: dict[str, Path], tmp_path: Path, capsys
) -> None:
    os.unlink(f"{fleet['bundle']}.dsse")
    code, _, err = run(capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"])
    assert code == 3
    assert "signature envelope" in err
    code, _, err = run(capsys, "bundle", "verify", fleet["bundle"], "--trust", tmp_path / "nowhere")
    assert code == 3
    assert "nowhere" in err


def test_release_rotation_revokes_the_old_key(fleet: dict[str, Path], capsys) -> None:
    assert run(capsys, "keys", "rotate", fleet["keys"], "--release")[0] == 0
    assert not fleet["release"].exists()
    assert (fleet["keys"] / "private" / "retired" / fleet["release"].name).exists()
    code, _, err = run(capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"])
    assert code == 1
    assert "rejected (untrusted-key)" in err
    new = next((fleet["keys"] / "private").glob("release-*.pem"))
    assert run(capsys, "bundle", "sign", fleet["bundle"], "--key", new)[0] == 0
    code, out, _ = run(capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"])
    assert code == 0
    assert new.name[8:24] in out


def test_revoke(fleet: dict[str, Path], capsys) -> None:
    keyid = fleet["release"].name[8:24]
    assert run(capsys, "keys", "rotate", fleet["keys"], "--release", "--keep", keyid)[0] == 0
    assert run(capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"])[0] == 0
    assert run(capsys, "keys", "revoke", fleet["keys"], keyid)[0] == 0
    code, _, err = run(capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"])
    assert code == 1
    assert "untrusted-key" in err
    code, _, err = run(capsys, "keys", "revoke", fleet["keys"], "ffffffff")
    assert code == 2
    assert "no release key" in err


def test_root_rotation_needs_the_offline_keys(
    fleet: dict[str, Path], tmp_path: Path, capsys
) -> None:
    offline = tmp_path / "offline"
    offline.mkdir()
    roots = sorted((fleet["keys"] / "private").glob("root-*.pem"))
    for pem in roots[1:]:
        shutil.move(pem, offline / pem.name)
    code, _, err = run(capsys, "keys", "rotate", fleet["keys"], "--root")
    assert code == 2
    assert "threshold is 2" in err
    shutil.move(offline / roots[1].name, roots[1])
    code, out, _ = run(
        capsys, "keys", "rotate", fleet["keys"], "--root", "--root-keys", "4", "--threshold", "3"
    )
    assert code == 0
    assert "root v2" in out
    code, out, _ = run(capsys, "keys", "show", fleet["keys"], "--json")
    doc = json.loads(out)
    assert doc["root"]["version"] == 2
    assert doc["root"]["threshold"] == 3
    assert len(doc["root"]["keys"]) == 4
    assert doc["keyring"]["version"] == 2
    # The release key survives a root rotation: the bundle still verifies against the new root.
    assert run(capsys, "bundle", "verify", fleet["bundle"], "--trust", fleet["keys"])[0] == 0


def test_inspect(fleet: dict[str, Path], capsys) -> None:
    code, out, _ = run(capsys, "bundle", "inspect", fleet["bundle"], "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["manifest"]["name"] == "m"
    assert doc["envelope"]["verified"] is False
    assert doc["envelope"]["descriptor"]["bundle_size"] == fleet["bundle"].stat().st_size
    code, out, _ = run(capsys, "bundle", "inspect", fleet["bundle"])
    assert code == 0
    assert "variant    onnx-fp32" in out
    assert "not verified here" in out


def test_inspect_refuses_a_hostile_archive(tmp_path: Path, capsys) -> None:
    import tarfile

    bad = tmp_path / "bad.emb"
    with tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    code, _, err = run(capsys, "bundle", "inspect", bad)
    assert code == 1
    assert "rejected (unsafe-member-type)" in err
    assert "symlink" in err


def test_installed_entry_points(fleet: dict[str, Path]) -> None:
    """The console scripts, as a fleet manager runs them."""
    done = subprocess.run(
        [
            BIN / "edge-fleet",
            "bundle",
            "verify",
            fleet["bundle"],
            "--trust",
            fleet["keys"] / "root.json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout
    version = subprocess.run(
        [BIN / "edge-agent", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("edge-agent ")


def test_no_command_prints_help(capsys) -> None:
    assert fleet_main([]) == 2
    assert agent_main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_inspect_with_an_unreadable_signature_file(fleet: dict[str, Path], capsys) -> None:
    Path(f"{fleet['bundle']}.dsse").write_text(
        '{"payload": "AAAA", "payloadType": "x", "signatures": []}'
    )
    code, out, _ = run(capsys, "bundle", "inspect", fleet["bundle"])
    assert code == 0
    assert "unreadable (descriptor is not valid JSON" in out
    code, out, _ = run(capsys, "bundle", "inspect", fleet["bundle"], "--json")
    assert code == 0
    assert "not valid JSON" in json.loads(out)["envelope"]["error"]


def test_a_corrupted_keyring_is_a_one_line_error(fleet: dict[str, Path], capsys) -> None:
    (fleet["keys"] / "keyring.json").write_text("garbage")
    code, out, err = run(capsys, "keys", "show", fleet["keys"])
    assert code == 1
    assert out == ""
    assert err.startswith("edge-fleet: rejected (format): envelope is not valid JSON")


def test_cosigning_keeps_the_terms_signed_first(fleet: dict[str, Path], capsys) -> None:
    """A second signer adds to the same descriptor, but never to one with a later expiry."""
    import base64

    from agent.trust.keys import Signer

    sidecar = Path(f"{fleet['bundle']}.dsse")
    second = fleet["keys"].parent / "second.pem"
    second.write_bytes(Signer.generate().to_pem())
    assert run(capsys, "bundle", "sign", fleet["bundle"], "--key", second)[0] == 0
    doc = json.loads(sidecar.read_text())
    assert len(doc["signatures"]) == 2
    # Someone edits the envelope to push the expiry out; a co-signer must not vouch for that.
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["expires"] = "2999-12-31T00:00:00Z"
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    sidecar.write_text(json.dumps(doc))
    third = fleet["keys"].parent / "third.pem"
    third.write_bytes(Signer.generate().to_pem())
    code, _, err = run(capsys, "bundle", "sign", fleet["bundle"], "--key", third)
    assert code == 2
    assert "later than --days allows" in err
    assert json.loads(sidecar.read_text()) == doc  # left as it was


def test_output_read_by_a_reader_that_stops_early_is_no_error(keys) -> None:  # type: ignore[no-untyped-def]
    """`edge-fleet ... | head -1` or `| grep -q`: the reader has gone when the tool writes, and
    the tool exits quietly (a reader gone before the first write is the sure way to test it)."""
    fleet = str(Path(sys.executable).parent / "edge-fleet")
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [fleet, "keys", "show", str(keys.dir)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0


def test_reissue_signs_the_bundle_afresh_under_a_higher_release(
    fleet: dict[str, Path], capsys
) -> None:
    """Beside BUNDLE.dsse, which stays; verified as a device at the old floor verifies it; and
    deploy takes it with --descriptor."""
    from agent.trust.envelope import parse_envelope

    bundle, key, trust = fleet["bundle"], fleet["release"], fleet["keys"]
    original = Path(f"{bundle}.dsse").read_bytes()
    code, out, err = run(capsys, "bundle", "reissue", bundle, "--release", 1000005, "--key", key)
    assert (code, err) == (0, "")
    reissued = Path(f"{bundle}.r1000005.dsse")
    assert out == f"re-issued {bundle} as release 1000005: {reissued} (1 signature(s))\n"
    assert Path(f"{bundle}.dsse").read_bytes() == original
    payload = json.loads(parse_envelope(reissued.read_bytes()).payload)
    assert (payload["release"], payload["bundle_release"]) == (1000005, 1000000)
    code, out, err = run(
        capsys,
        "bundle",
        "verify",
        bundle,
        "--trust",
        trust,
        "--envelope",
        reissued,
        "--min-release",
        1000003,
    )
    assert (code, err) == (0, "")
    assert "m 1.0.0 (release 1000005, built as 1000000)" in out
    # The release must rise.
    code, _, err = run(capsys, "bundle", "reissue", bundle, "--release", 1000000, "--key", key)
    assert code == 2
    assert "release 1000000 is not above m 1.0.0's release 1000000" in err

    document = fleet["keys"].parent / "deployment.json"
    served = fleet["keys"].parent / "served"
    deploy = ["deploy", bundle, "--device", "cam-01", "--key", key, "--bundles", served]
    code, _, err = run(capsys, *deploy, "--descriptor", reissued, "-o", document, "--no-publish")
    assert (code, err) == (0, "")
    models = json.loads(parse_envelope(document.read_bytes()).payload)["models"]
    assert models["m"]["descriptor"] == json.loads(reissued.read_bytes())
    # A descriptor of none of the bundles named is a mistake, said so.
    other = fleet["keys"].parent / "other.emb"
    model = make_onnx(fleet["keys"].parent / "o.onnx", seed=9)
    assert (
        run(capsys, "bundle", "build", "--name", "m", "--version", "1.0.1", "-o", other, model)[0]
        == 0
    )
    code, _, err = run(
        capsys,
        *deploy[:1],
        other,
        *deploy[2:],
        "--descriptor",
        reissued,
        "-o",
        document,
        "--no-publish",
    )
    assert code == 2
    assert "describes m 1.0.0, which is none of the bundles given" in err
