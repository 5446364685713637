"""The agent's on-disk state under the StateDirectory (default ``/var/lib/edge-agent``).

::

    trust/root.json            the newest root accepted (DSSE envelope, as received)
    trust/keyring.json         the keyring accepted last
    trust/floors.json          keyring floor, release floor per model, deployment sequence points
    desired/{source}.dsse      the deployment last accepted from each desired topic
    downloads/{sha256}/        transfers in progress (see agent.state.partfile)
    bundles/{sha256}.emb       verified bundles (and {sha256}.blocks: their block-hash lists)
    slots/{name}.json          what each model slot runs: its bundle and where it is unpacked
    trials/{name}.json         a version handed to the slot layer and not committed yet: how
                               often it was started, and its verdict once it failed
    models/{name}/{sha256}/    unpacked bundles
    events.seq                 event sequence numbers reserved so far (they never go back)
    upstream.sqlite            events and telemetry not sent yet (agent.telemetry.StoreQueue)

Every write is atomic (agent._fsutil): a ``kill -9`` leaves the old file or the new one. What is
loaded back is checked again by the trust core before it is used: the disk is not trusted more
than the network.

Garbage is what no record names: :meth:`StateStore.garbage` lists it (cheap: directory listings)
and :meth:`StateStore.remove` deletes it, which may take long (an unpacked model of gigabytes),
so the agent runs that off its loop.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from agent._fsutil import atomic_write_bytes, fsync_dir, read_if_exists
from agent._strictjson import dump_model, parse_model
from agent.bundle.blocks import LocalBlock, blocks_of
from agent.errors import BadContentError, StorageError
from agent.trust.verifier import SequencePoint, TrustedState
from agent.values import Hex64, ModelName

log = logging.getLogger("agent.state")

_SOURCE = r"^(device|group-[A-Za-z0-9][A-Za-z0-9._-]{0,63})$"


class _Point(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sequence: int
    envelope_sha256: Hex64


class Floors(BaseModel):
    """What must never go backwards, whatever the network offers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    keyring_floor: Annotated[int, Field(ge=0)] = 0
    release_floor: dict[ModelName, int] = {}
    sequence: dict[Annotated[str, Field(pattern=_SOURCE)], _Point] = {}


class InstalledModel(BaseModel):
    """``models/{name}.json``: the bundle a slot runs, and the one before it (kept for rollback)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: ModelName
    bundle_sha256: Hex64
    version: str
    release: int
    variant: str | None = None
    backend: str | None = None  # the runtime chosen for it (chosen again when missing)
    deployment_id: str | None = None
    path: Path  # the unpacked bundle
    previous_sha256: Hex64 | None = None


class Verdict(BaseModel):
    """Why a trial ended without a commit (an ErrorInfo's code and message)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")]
    message: Annotated[str, Field(max_length=1024)]


class Trial(BaseModel):
    """``trials/{name}.json``: a version the slot layer was given for one deployment.

    Written before the slot layer gets the version, removed once it commits. ``starts`` counts
    the times it was handed over: a trial still on disk at start-up was cut short by a crash.
    ``verdict`` is set when it failed (a failed probation is written before the last good
    version is swapped back): it is not tried again for the same deployment document.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: ModelName
    bundle_sha256: Hex64
    version: str
    release: int
    deployment_sha256: Hex64  # the SHA-256 of the deployment document's envelope
    deployment_id: str | None = None
    starts: Annotated[int, Field(ge=0)] = 1
    verdict: Verdict | None = None

    def for_deployment(self, bundle_sha256: str, deployment_sha256: str | None) -> bool:
        return self.bundle_sha256 == bundle_sha256 and self.deployment_sha256 == deployment_sha256


def bundle_sha(path: Path) -> str:
    """The bundle digest a path under ``bundles/``, ``models/{name}/`` or ``downloads/`` is
    named for: ``{sha256}.emb``, ``{sha256}``, ``.{sha256}.*.unpack`` ...; "" for any other."""
    sha = path.name.lstrip(".").split(".", 1)[0]
    return sha if len(sha) == 64 and all(c in "0123456789abcdef" for c in sha) else ""


EVENT_SEQ_BLOCK = 1024  # event numbers reserved on disk at a time: a restart skips the rest


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # Slot records load_installed could not read (an I/O error, not bad content): while
        # there are any, garbage() would not know what they keep, so it finds none.
        self.unreadable: list[Path] = []
        for sub in ("trust", "desired", "downloads", "bundles", "models", "slots", "trials"):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as exc:
                raise StorageError(f"cannot create {self.root / sub}: {exc.strerror}") from None

    # -- trust --------------------------------------------------------------------------------
    def load_trust(
        self, shipped_root: bytes, shipped_keyring: bytes | None, now: datetime
    ) -> TrustedState:
        """The shipped root, or the stored one if newer; the newest usable keyring; the floors.

        Stored files are verified again. One that no longer verifies (or has expired) is
        logged and skipped; the floors still hold, so an older keyring cannot come back.
        """
        state = TrustedState.from_root(shipped_root)
        stored = read_if_exists(self.root / "trust" / "root.json")
        if stored is not None:
            try:
                candidate = TrustedState.from_root(stored)
                if candidate.root.version > state.root.version:
                    state = candidate
            except BadContentError as exc:
                log.error("ignoring the stored root: %s", exc)
        for source, data in (("stored", self.stored_keyring()), ("shipped", shipped_keyring)):
            if data is None:
                continue
            try:
                state = state.update_keyring(data, now)
            except BadContentError as exc:
                log.warning("not using the %s keyring: %s", source, exc)
        floors = self.load_floors()
        current = state.keyring.version if state.keyring is not None else 0
        if state.keyring is not None and current < floors.keyring_floor:
            log.error(
                "keyring v%d is older than v%d, trusted before: not using it",
                current,
                floors.keyring_floor,
            )
            state = replace(state, keyring=None, keyring_bytes=None)
        return replace(
            state,
            keyring_floor=max(floors.keyring_floor, current),
            release_floor=dict(floors.release_floor),
        )

    def stored_keyring(self) -> bytes | None:
        return read_if_exists(self.root / "trust" / "keyring.json")

    def save_trust(self, state: TrustedState, points: dict[str, SequencePoint]) -> None:
        trust = self.root / "trust"
        if read_if_exists(trust / "root.json") != state.root_bytes:
            atomic_write_bytes(trust / "root.json", state.root_bytes)
        if (
            state.keyring_bytes is not None
            and read_if_exists(trust / "keyring.json") != state.keyring_bytes
        ):
            atomic_write_bytes(trust / "keyring.json", state.keyring_bytes)
        floors = Floors(
            keyring_floor=state.keyring_floor,
            release_floor=dict(state.release_floor),
            sequence={
                k: _Point(sequence=p.sequence, envelope_sha256=p.envelope_sha256)
                for k, p in points.items()
            },
        )
        atomic_write_bytes(trust / "floors.json", dump_model(floors))

    def load_floors(self) -> Floors:
        data = read_if_exists(self.root / "trust" / "floors.json")
        if data is None:
            return Floors()
        try:
            return parse_model(Floors, data, what="floors.json", max_bytes=1 << 20)
        except BadContentError as exc:
            # Refusing to start would leave the box without a model; starting with no floors
            # would reopen rollback. Refuse loudly: a person must look.
            raise StorageError(f"{self.root / 'trust' / 'floors.json'} is damaged: {exc}") from None

    def sequence_points(self) -> dict[str, SequencePoint]:
        return {
            k: SequencePoint(p.sequence, p.envelope_sha256)
            for k, p in self.load_floors().sequence.items()
        }

    # -- accepted deployments -----------------------------------------------------------------
    def save_desired(self, source: str, envelope: bytes) -> None:
        atomic_write_bytes(self.root / "desired" / f"{source}.dsse", envelope, 0o600)

    def load_desired(self) -> dict[str, bytes]:
        found = {}
        for path in sorted((self.root / "desired").glob("*.dsse")):
            if not re.fullmatch(_SOURCE, path.stem) or not path.is_file():
                continue  # not a file this store wrote
            data = read_if_exists(path)
            if data is not None:
                found[path.stem] = data
        return found

    # -- downloads and bundles ----------------------------------------------------------------
    def download_dir(self, sha256: str) -> Path:
        return self.root / "downloads" / sha256

    def bundle_path(self, sha256: str) -> Path:
        return self.root / "bundles" / f"{sha256}.emb"

    def store_bundle(self, part: Path, sha256: str, block_list: bytes) -> Path:
        """Move a finished download into ``bundles/`` (same filesystem: a rename)."""
        target = self.bundle_path(sha256)
        atomic_write_bytes(target.with_suffix(".blocks"), block_list, 0o600)
        try:
            os.replace(part, target)
            fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot store {target}: {exc.strerror}") from None
        return target

    def local_blocks(self, block_size: int) -> dict[bytes, LocalBlock]:
        """Every block of the stored bundles with this block size, by digest."""
        found: dict[bytes, LocalBlock] = {}
        for blocks in (self.root / "bundles").glob("*.blocks"):
            bundle = blocks.with_suffix(".emb")
            data = read_if_exists(blocks)
            try:
                size = bundle.stat().st_size
            except OSError:
                continue
            if data is None or len(data) % 32 or len(data) // 32 != -(-size // block_size):
                continue  # another block size (or damaged): the digests do not line up
            for digest, where in blocks_of(bundle, data, block_size, size).items():
                found.setdefault(digest, where)
        return found

    # -- installed models ---------------------------------------------------------------------
    def model_dir(self, name: str, sha256: str) -> Path:
        return self.root / "models" / name / sha256

    def save_installed(self, installed: InstalledModel) -> None:
        atomic_write_bytes(self.root / "slots" / f"{installed.model}.json", dump_model(installed))

    def load_installed(self) -> dict[str, InstalledModel]:
        """Every slot's record; one that cannot be read or names a missing directory is skipped."""
        found = {}
        for path in sorted((self.root / "slots").glob("*.json")):
            if not path.is_file():
                continue
            try:
                data = path.read_bytes()
                installed = parse_model(InstalledModel, data, what=str(path), max_bytes=1 << 16)
            except OSError as exc:
                log.error("cannot read %s: %s", path, exc)
                self.unreadable.append(path)
                continue
            except BadContentError as exc:
                log.error("ignoring %s: %s", path, exc)
                continue
            if installed.model != path.stem or not installed.path.is_dir():
                log.error("ignoring %s: it does not match what is on disk", path)
                continue
            found[installed.model] = installed
        return found

    def remove_installed(self, name: str) -> None:
        """Forget what ``name`` runs (its unpacked copies are garbage from now on)."""
        self._unlink(self.root / "slots" / f"{name}.json")

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot remove {path}: {exc.strerror}") from None

    # -- trials -------------------------------------------------------------------------------
    def save_trial(self, trial: Trial) -> None:
        atomic_write_bytes(self.root / "trials" / f"{trial.model}.json", dump_model(trial))

    def remove_trial(self, name: str) -> None:
        self._unlink(self.root / "trials" / f"{name}.json")

    def load_trials(self) -> dict[str, Trial]:
        """Every trial record; one that cannot be read is logged and left out."""
        found = {}
        for path in sorted((self.root / "trials").glob("*.json")):
            try:
                trial = parse_model(Trial, path.read_bytes(), what=str(path), max_bytes=1 << 16)
            except (OSError, BadContentError) as exc:
                log.error("ignoring %s: %s", path, exc)
                continue
            if trial.model == path.stem:
                found[trial.model] = trial
        return found

    # -- event numbers ------------------------------------------------------------------------
    def reserve_event_seq(self, after: int = 0) -> tuple[int, int]:
        """Reserve event numbers: ``(first, end)``, every number ``first <= n < end`` unused.

        ``first`` is past every number reserved before, whatever became of them, so events
        are numbered upwards across restarts (with a gap after each restart or crash).
        """
        path = self.root / "events.seq"
        data = read_if_exists(path)
        try:
            reserved = int(data.decode()) if data is not None else 0
        except (UnicodeDecodeError, ValueError):
            raise StorageError(f"{path} is damaged: {(data or b'')[:32]!r}") from None
        first = max(reserved, after)
        end = first + EVENT_SEQ_BLOCK
        atomic_write_bytes(path, f"{end}\n".encode())
        return first, end

    def garbage(
        self,
        keep: Iterable[str],
        *,
        busy: Iterable[str] = (),
        downloading: Iterable[str] = (),
        models: Iterable[str] = (),
        sources: Iterable[str] | None = None,
    ) -> list[Path]:
        """What no record names, for :meth:`remove`.

        ``keep``: bundle digests still wanted (installed, kept for rollback, or a deployment's
        target); ``downloading``: digests whose downloads are in progress; ``models``: the
        models that have a slot; ``sources``: the desired topics followed (None: keep every
        stored document). Nothing of a bundle in ``busy`` (being checked, moved, unpacked or
        removed elsewhere) is listed, not even an unpack's temporary directory; nothing at all
        while a slot record could not be read (see ``unreadable``). Temporary files of
        interrupted atomic writes are always garbage: a writer that is alive holds none of
        them across a step of the agent's loop.
        """
        if self.unreadable:
            log.warning("not collecting garbage: %s could not be read", self.unreadable[0])
            return []
        busy = set(busy)
        keep = set(keep) | busy
        downloading = set(downloading) | busy
        models = set(models)
        found: list[Path] = []
        for sub in ("trust", "desired", "slots", "trials", "bundles", "."):
            found += self.root.joinpath(sub).glob(".*.tmp")
        for path in self._list("bundles"):
            sha = bundle_sha(path)
            if (
                sha not in keep
                and path.suffix in (".emb", ".blocks")
                and not path.name.startswith(".")
            ):
                found.append(path)
        for model_dir in self._list("models"):
            if not model_dir.is_dir():
                continue
            if model_dir.name not in models:
                if not any(bundle_sha(p) in busy for p in self._list(model_dir)):
                    found.append(model_dir)
                continue
            for unpacked in self._list(model_dir):
                # Names are SHA-256s, or ".{sha256}.*.unpack" left by an interrupted unpack.
                sha = bundle_sha(unpacked)
                partial = unpacked.name.endswith(".unpack")
                if sha not in keep or (partial and sha not in busy):
                    found.append(unpacked)
        for download in self._list("downloads"):
            if download.name not in downloading:
                found.append(download)
            else:
                found += download.glob(".*.tmp")
        for records in ("slots", "trials"):
            for path in self._list(records):
                if path.suffix == ".json" and path.stem not in models:
                    found.append(path)
        if sources is not None:
            wanted = set(sources)
            for path in self._list("desired"):
                if path.suffix == ".dsse" and path.stem not in wanted:
                    found.append(path)
        return sorted(found)

    def _list(self, where: str | Path) -> list[Path]:
        try:
            return sorted(self.root.joinpath(where).iterdir())
        except FileNotFoundError:
            return []

    def remove(self, paths: Iterable[Path]) -> list[Path]:
        """Delete what :meth:`garbage` listed (files and whole directories); the paths removed."""
        removed = []
        for path in paths:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc)
                continue
            removed.append(path)
        return removed
