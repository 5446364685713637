"""A bounded store-and-forward queue on disk for outgoing telemetry and events (SQLite).

While the broker is unreachable, messages wait here and go out in order after the reconnect
(:class:`Forwarder`). What it promises:

* **Order**: items keep the order of :meth:`StoreQueue.put`; ids grow and are never reused.
* **Bound**: at most ``max_items`` items and ``max_bytes`` of topic plus payload; beyond either,
  the OLDEST go (a box that was offline for a week reports its last hours, not its first), and
  ``dropped`` counts them, persisted with the queue.
* **Flash wear**: writes are batched. ``put`` appends to an in-memory batch, written in one
  transaction every ``batch_items`` items, or at the first ``put``/:meth:`tick` at least
  ``batch_seconds`` after the last write, and on :meth:`close`. Acknowledgements and drops are
  applied at the same writes. While the broker is up, an item that is sent and acknowledged
  before its batch is written never touches the disk. WAL journal, ``synchronous=NORMAL``: a
  power cut may lose the last transactions but never corrupts the file.
* **Restart**: a clean close loses nothing. A ``kill -9`` or a power cut loses at most the items
  still in the unwritten batch (up to ``batch_items`` items, or ``batch_seconds`` of them), and
  items acknowledged since the last write are sent again (at least once; the fleet side dedups
  by the message's own time if it cares).

Threads: every method may be called from any thread (one lock; the SQLite connection is used
only under it). :meth:`Forwarder.drain` publishes without holding the lock, so producers are not
held up by a slow broker.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("agent.telemetry")

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_ITEMS = 100_000
DEFAULT_BATCH_ITEMS = 64
DEFAULT_BATCH_SECONDS = 30.0
_DROP_CHUNK = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Item:
    id: int
    topic: str
    payload: bytes

    @property
    def size(self) -> int:
        return _size(self.topic, self.payload)


def _size(topic: str, payload: bytes) -> int:
    return len(topic.encode()) + len(payload)


class StoreQueue:
    """The queue; see the module docstring. ``clock`` is monotonic seconds (tests pass their own)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_items: int = DEFAULT_MAX_ITEMS,
        batch_items: int = DEFAULT_BATCH_ITEMS,
        batch_seconds: float = DEFAULT_BATCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0 or max_items <= 0 or batch_items <= 0 or batch_seconds < 0:
            raise ValueError("queue bounds and batch sizes must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.batch_items = batch_items
        self.batch_seconds = batch_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False
        )
        self.commits = 0  # write transactions so far (each one a flush)
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        first, last, count, size = db.execute(
            "SELECT MIN(id), MAX(id), COUNT(*), COALESCE(SUM(size), 0) FROM items"
        ).fetchone()
        row = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        next_row = db.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()
        self._dropped = int(row[0]) if row else 0
        self._next_id = max(int(last or 0) + 1, int(next_row[0]) if next_row else 1)
        self._head = int(first) if first is not None else self._next_id  # oldest live id
        self._disk_count = int(count)  # live items on disk (ids >= head, below the batch)
        self._bytes = int(size)  # live items, disk and batch
        self._batch: list[Item] = []  # not yet written; ids above every id on disk
        self._dirty = False  # acks or drops not yet written
        self._last_flush = clock()

    # -- producers ------------------------------------------------------------------------------
    def put(self, topic: str, payload: bytes) -> None:
        """Append one message; the oldest go if the queue would exceed its bounds."""
        size = _size(topic, payload)
        with self._lock:
            db = self._open()
            if size > self.max_bytes:
                self._dropped += 1
                self._dirty = True
                log.warning("telemetry: a %d-byte message exceeds the queue's bound", size)
            else:
                self._batch.append(Item(self._next_id, topic, bytes(payload)))
                self._next_id += 1
                self._bytes += size
                self._enforce_bounds(db)
            if len(self._batch) >= self.batch_items:
                self._flush(db)
            else:
                self._flush_if_due(db)

    def tick(self) -> None:
        """Write the batch if ``batch_seconds`` have passed since the last write (call it often)."""
        with self._lock:
            self._flush_if_due(self._open())

    def unwritten(self) -> bool:
        """Items, acknowledgements or drops are waiting for :meth:`tick` to write them."""
        with self._lock:
            return bool(self._batch or self._dirty)

    def flush(self) -> None:
        """Write the batch and pending acknowledgements now."""
        with self._lock:
            self._flush(self._open())

    # -- the sender -----------------------------------------------------------------------------
    def peek(self, n: int) -> list[Item]:
        """The ``n`` oldest items, oldest first (left in the queue until :meth:`ack`)."""
        with self._lock:
            db = self._open()
            items = [
                Item(int(i), str(t), bytes(p))
                for i, t, p in db.execute(
                    "SELECT id, topic, payload FROM items WHERE id >= ? ORDER BY id LIMIT ?",
                    (self._head, n),
                )
            ]
            if len(items) < n:
                items += [i for i in self._batch if i.id >= self._head][: n - len(items)]
            return items

    def ack(self, through_id: int) -> None:
        """Everything up to and including ``through_id`` was delivered (items go in order)."""
        with self._lock:
            db = self._open()
            if through_id < self._head:
                return  # acknowledged already, or dropped meanwhile
            on_disk = self._disk_count
            self._remove_through(db, through_id)
            # Items acknowledged before their batch was written never reach the disk.
            self._dirty = self._dirty or self._disk_count != on_disk
            self._flush_if_due(db)

    # -- state ----------------------------------------------------------------------------------
    @property
    def dropped(self) -> int:
        """Items dropped by the bound since the queue file was made (persisted)."""
        with self._lock:
            return self._dropped

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return self._disk_count + len(self._batch)

    def close(self) -> None:
        """Write everything pending and close the file (idempotent)."""
        with self._lock:
            if self._db is None:
                return
            self._flush(self._db)
            self._db.close()
            self._db = None

    def __enter__(self) -> StoreQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (lock held) ------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the queue is closed")
        return self._db

    def _enforce_bounds(self, db: sqlite3.Connection) -> None:
        while self._disk_count + len(self._batch) > self.max_items or self._bytes > self.max_bytes:
            excess_items = self._disk_count + len(self._batch) - self.max_items
            if self._disk_count:
                # The oldest are on disk: read their sizes (a read, no write) and move the head.
                rows = db.execute(
                    "SELECT id, size FROM items WHERE id >= ? ORDER BY id LIMIT ?",
                    (self._head, _DROP_CHUNK),
                ).fetchall()
                through, freed = self._head - 1, 0
                for n, (item_id, size) in enumerate(rows, start=1):
                    through, freed = int(item_id), freed + int(size)
                    if n >= excess_items and self._bytes - freed <= self.max_bytes:
                        break
            else:
                through = self._batch[0].id
            dropped = self._remove_through(db, through)
            self._dropped += dropped
            self._dirty = True

    def _remove_through(self, db: sqlite3.Connection, through: int) -> int:
        """Forget every live item with an id up to ``through``; the count of them."""
        removed = 0
        if self._disk_count:
            count, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM items WHERE id >= ? AND id <= ?",
                (self._head, through),
            ).fetchone()
            self._disk_count -= int(count)
            self._bytes -= int(size)
            removed += int(count)
        while self._batch and self._batch[0].id <= through:
            item = self._batch.pop(0)
            self._bytes -= item.size
            removed += 1
        self._head = max(self._head, through + 1)
        return removed

    def _flush_if_due(self, db: sqlite3.Connection) -> None:
        if (self._batch or self._dirty) and self._clock() - self._last_flush >= self.batch_seconds:
            self._flush(db)

    def _flush(self, db: sqlite3.Connection) -> None:
        self._last_flush = self._clock()
        if not self._batch and not self._dirty:
            return
        db.execute("BEGIN")
        try:
            db.execute("DELETE FROM items WHERE id < ?", (self._head,))
            db.executemany(
                "INSERT INTO items (id, topic, payload, size) VALUES (?, ?, ?, ?)",
                [(i.id, i.topic, i.payload, i.size) for i in self._batch],
            )
            db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("dropped", self._dropped), ("next_id", self._next_id)],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.commits += 1
        self._disk_count += len(self._batch)
        self._batch = []
        self._dirty = False


# -- sending --------------------------------------------------------------------------------------


class PublishInfo(Protocol):
    """What paho's ``MQTTMessageInfo`` (returned by ``Session.publish``) offers."""

    def wait_for_publish(self, timeout: float | None = None) -> None: ...

    def is_published(self) -> bool: ...


def acked_publish(
    publish: Callable[[str, bytes], PublishInfo], timeout: float = 10.0
) -> Callable[[str, bytes], bool]:
    """A publish callable for :class:`Forwarder` that is true once the broker acknowledged.

    ``publish`` is e.g. ``session.publish`` (QoS 1): this waits for the PUBACK, up to
    ``timeout`` seconds. Not connected, or paho's queue full: false. A QoS 1 message paho
    accepted but the broker did not acknowledge in time stays in paho's session and may arrive
    as well as the retry from the queue: delivery is at least once.
    """

    def send(topic: str, payload: bytes) -> bool:
        try:
            info = publish(topic, payload)
            info.wait_for_publish(timeout)
            return info.is_published()
        except (RuntimeError, ValueError):  # paho: not connected, or its queue is full
            return False

    return send


class Forwarder:
    """Sends what the queue holds, in order, while ``connected()``; leaves it otherwise.

    ``publish(topic, payload)`` returns true once the broker has the message (see
    :func:`acked_publish`); the first false stops the drain and that item is tried again on the
    next one. Call :meth:`drain` from one thread (the daemon's telemetry thread), after each
    ``put`` and whenever the connection comes up.
    """

    def __init__(
        self,
        queue: StoreQueue,
        publish: Callable[[str, bytes], bool],
        connected: Callable[[], bool],
        *,
        batch: int = 32,
    ) -> None:
        self.queue = queue
        self._publish = publish
        self.connected = connected
        self._batch = batch
        self.sent = 0

    def drain(self, limit: int | None = None) -> int:
        """Send up to ``limit`` items (default: all); the number sent."""
        sent = 0
        while self.connected() and (limit is None or sent < limit):
            want = self._batch if limit is None else min(self._batch, limit - sent)
            items: Sequence[Item] = self.queue.peek(want)
            if not items:
                break
            last: int | None = None
            for item in items:
                if not self.connected() or not self._publish(item.topic, item.payload):
                    break
                last = item.id
                sent += 1
            if last is not None:
                self.queue.ack(last)
            if last is None or last != items[-1].id:
                break
        self.sent += sent
        return sent
