"""The fleet's key directory: root keys, release keys, the signed root and keyring.

Layout of ``DIR`` (what ``edge-fleet keys init`` writes)::

    root.json                 current root, a signed envelope (public: ship it to devices)
    keyring.json              current keyring, signed by the root threshold (public)
    history/root.v<N>.json    every root version, for devices that must walk the chain
    private/root-<id>.pem     root private keys (0600; move them offline after init)
    private/release-<id>.pem  release private keys (0600; these sign bundles)
    private/retired/          keys replaced by rotation, kept until the operator shreds them

Private keys are PKCS#8 PEM, encrypted when ``EDGE_FLEET_KEY_PASSPHRASE`` is set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from agent._fsutil import atomic_write_bytes
from agent._strictjson import dump_model, loads, parse_model
from agent.errors import ConfigError, FormatError, StorageError
from agent.transport.messages import TrustUpdate
from agent.trust.envelope import parse_envelope, sign_envelope
from agent.trust.keys import Signer
from agent.trust.metadata import (
    KEYRING_TYPE,
    MAX_METADATA_BYTES,
    ROOT_TYPE,
    KeyringMetadata,
    PublicKey,
    ReleaseKey,
    RootMetadata,
)
from agent.trust.verifier import TrustedState
from agent.verify import KEYRING_FILE, ROOT_FILE, load_trust

PASSPHRASE_ENV = "EDGE_FLEET_KEY_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def load_signer(path: Path) -> Signer:
    """Read a private key file, mapping the reasons it cannot be used to project errors."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read key {path}: {exc.strerror}") from None
    try:
        return Signer.from_pem(pem, _passphrase())
    except FormatError as exc:
        hint = f" (set {PASSPHRASE_ENV}?)" if b"ENCRYPTED" in pem else ""
        raise FormatError(f"{path}: {exc}{hint}") from None


def key_directory(key: Path) -> Path | None:
    """The key directory that holds the private key file ``key`` (``DIR/private/NAME.pem``)."""
    private = Path(key).resolve().parent
    if private.name == "private" and (private.parent / ROOT_FILE).is_file():
        return private.parent
    return None


def fleet_trust(trust: Path | None, keys: Sequence[Path], now: datetime) -> TrustedState:
    """The fleet's trust (root and keyring): ``trust`` (a key directory, root.json or
    keyring.json), else the key directory the first of the private key files ``keys`` is in."""
    found = trust or next(filter(None, map(key_directory, keys)), None)
    if found is None:
        raise ConfigError(
            f"{keys[0]} is not in a key directory (DIR/private/), so the bundles' signatures "
            "cannot be checked against the fleet's keyring: give --trust (the key directory, "
            "root.json or keyring.json)"
        )
    return load_trust(found, now)


def _public(signer: Signer) -> PublicKey:
    return PublicKey(public=signer.public_raw.hex())


@dataclass(frozen=True)
class KeyStore:
    root: Path

    @property
    def private(self) -> Path:
        return self.root / "private"

    def _write_private(self, role: str, signer: Signer) -> Path:
        self.private.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.private / f"{role}-{signer.keyid[:16]}.pem"
        atomic_write_bytes(path, signer.to_pem(_passphrase()), mode=0o600)
        return path

    def _retire(self, role: str, keyids: Sequence[str]) -> None:
        retired = self.private / "retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        for keyid in keyids:
            src = self.private / f"{role}-{keyid[:16]}.pem"
            if src.exists():
                shutil.move(src, retired / src.name)

    def _signers(self, role: str, keyids: Sequence[str]) -> list[Signer]:
        out = []
        for keyid in keyids:
            path = self.private / f"{role}-{keyid[:16]}.pem"
            if path.exists():
                out.append(load_signer(path))
        return out

    # -- reading ------------------------------------------------------------------------------
    def root_bytes(self) -> bytes:
        return self._read(ROOT_FILE)

    def keyring_bytes(self) -> bytes:
        return self._read(KEYRING_FILE)

    def _read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"{self.root / name} is missing: is {self.root} a key directory?"
            ) from None

    def state(self, now: datetime) -> TrustedState:
        return TrustedState.from_root(self.root_bytes()).update_keyring(self.keyring_bytes(), now)

    def current_root(self) -> RootMetadata:
        return TrustedState.from_root(self.root_bytes()).root

    def current_keyring(self) -> KeyringMetadata:
        envelope = parse_envelope(self.keyring_bytes())
        return parse_model(
            KeyringMetadata, envelope.payload, what="keyring", max_bytes=MAX_METADATA_BYTES
        )

    def trust_update(self) -> TrustUpdate:
        """The message of the trust topic: every root after v1 (a device holds v1 from
        installation and walks the chain from there) and the current keyring."""
        history = sorted(
            (self.root / "history").glob("root.v*.json"), key=lambda p: int(p.stem.split(".v")[1])
        )
        roots = [loads(p.read_bytes(), what=str(p), max_bytes=1 << 20) for p in history[1:]]
        return TrustUpdate(
            roots=roots, keyring=loads(self.keyring_bytes(), what="keyring", max_bytes=1 << 20)
        )

    def release_key_paths(self) -> list[Path]:
        keyring = self.current_keyring()
        return [
            self.private / f"release-{k[:16]}.pem"
            for k in keyring.release_keys
            if (self.private / f"release-{k[:16]}.pem").exists()
        ]

    # -- writing ------------------------------------------------------------------------------
    def _publish_root(self, root: RootMetadata, signers: Sequence[Signer]) -> None:
        data = sign_envelope(ROOT_TYPE, dump_model(root), signers).to_bytes()
        (self.root / "history").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "history" / f"root.v{root.version}.json", data)
        atomic_write_bytes(self.root / ROOT_FILE, data)

    def _publish_keyring(self, keyring: KeyringMetadata, root_signers: Sequence[Signer]) -> None:
        data = sign_envelope(KEYRING_TYPE, dump_model(keyring), root_signers).to_bytes()
        atomic_write_bytes(self.root / KEYRING_FILE, data)

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        now: datetime,
        root_keys: int = 3,
        threshold: int = 2,
        models: Sequence[str] = ("*",),
        root_days: int = 730,
        keyring_days: int = 365,
        release_days: int = 365,
    ) -> KeyStore:
        if not 1 <= threshold <= root_keys:
            raise ConfigError(f"threshold must be between 1 and --root-keys ({root_keys})")
        directory = Path(directory)
        if (directory / ROOT_FILE).exists():
            raise ConfigError(f"{directory} already holds keys; use 'edge-fleet keys rotate'")
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory)
        roots = [Signer.generate() for _ in range(root_keys)]
        for s in roots:
            store._write_private("root", s)
        root = RootMetadata(
            version=1,
            expires=now + timedelta(days=root_days),
            keys={s.keyid: _public(s) for s in roots},
            threshold=threshold,
        )
        store._publish_root(root, roots)
        release = Signer.generate()
        store._write_private("release", release)
        keyring = KeyringMetadata(
            version=1,
            expires=now + timedelta(days=keyring_days),
            release_keys={
                release.keyid: ReleaseKey(
                    key=_public(release),
                    expires=now + timedelta(days=release_days),
                    models=list(models),
                )
            },
        )
        store._publish_keyring(keyring, roots)
        return store

    def _root_signers(self, root: RootMetadata) -> list[Signer]:
        signers = self._signers("root", list(root.keys))
        if len(signers) < root.threshold:
            raise ConfigError(
                f"{len(signers)} of the root keys are in {self.private}; the root threshold is "
                f"{root.threshold} (bring the offline root keys back to sign)"
            )
        return signers[: root.threshold]

    def _replace_release_keys(
        self, keys: dict[str, ReleaseKey], *, now: datetime, keyring_days: int
    ) -> KeyringMetadata:
        """Publish keyring v+1 holding ``keys``; keys left out are revoked and retired."""
        root_signers = self._root_signers(self.current_root())
        old = self.current_keyring()
        keyring = KeyringMetadata(
            version=old.version + 1,
            expires=now + timedelta(days=keyring_days),
            release_keys=keys,
            threshold=min(old.threshold, max(1, len(keys))),
        )
        self._publish_keyring(keyring, root_signers)
        self._retire("release", [k for k in old.release_keys if k not in keys])
        return keyring

    def rotate_release(
        self,
        *,
        now: datetime,
        models: Sequence[str] = ("*",),
        release_days: int = 365,
        keyring_days: int = 365,
        keep: Sequence[str] = (),
    ) -> tuple[KeyringMetadata, Signer]:
        """Add a new release key; every old one not named in ``keep`` (id prefixes) is revoked."""
        old = self.current_keyring()
        keys = {k: v for k, v in old.release_keys.items() if any(k.startswith(p) for p in keep)}
        signer = Signer.generate()
        self._write_private("release", signer)
        keys[signer.keyid] = ReleaseKey(
            key=_public(signer), expires=now + timedelta(days=release_days), models=list(models)
        )
        return self._replace_release_keys(keys, now=now, keyring_days=keyring_days), signer

    def revoke_release(
        self, prefixes: Sequence[str], *, now: datetime, keyring_days: int = 365
    ) -> KeyringMetadata:
        """Drop the release keys whose ids start with one of ``prefixes``."""
        old = self.current_keyring()
        keys = {
            k: v for k, v in old.release_keys.items() if not any(k.startswith(p) for p in prefixes)
        }
        if len(keys) == len(old.release_keys):
            raise ConfigError(f"no release key id starts with {', '.join(prefixes)}")
        return self._replace_release_keys(keys, now=now, keyring_days=keyring_days)

    def rotate_root(
        self,
        *,
        now: datetime,
        root_keys: int | None = None,
        threshold: int | None = None,
        root_days: int = 730,
        keyring_days: int = 365,
    ) -> RootMetadata:
        """Publish root v+1 with new keys, signed by the old threshold and the new one (TUF 5.3)."""
        old = self.current_root()
        old_signers = self._root_signers(old)
        count = root_keys or len(old.keys)
        new_threshold = threshold or old.threshold
        if not 1 <= new_threshold <= count:
            raise ConfigError(f"threshold must be between 1 and the number of root keys ({count})")
        new_signers = [Signer.generate() for _ in range(count)]
        for s in new_signers:
            self._write_private("root", s)
        root = RootMetadata(
            version=old.version + 1,
            expires=now + timedelta(days=root_days),
            keys={s.keyid: _public(s) for s in new_signers},
            threshold=new_threshold,
        )
        self._publish_root(root, [*old_signers, *new_signers])
        keyring = self.current_keyring()
        self._publish_keyring(
            keyring.model_copy(
                update={
                    "version": keyring.version + 1,
                    "expires": now + timedelta(days=keyring_days),
                }
            ),
            new_signers,
        )
        self._retire("root", list(old.keys))
        return root
