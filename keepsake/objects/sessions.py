"""Write operations and gc's doomed lists: how writers and gc stay out of each other's way.

FORMAT.md §11. A write operation (a checkpoint, a write-tree) holds a marker
``sessions/<id>`` from the moment it takes its dedup snapshot until it has published what
it wrote (its ref). The marker names the doomed lists the operation had loaded. gc
publishes the objects it means to delete as an immutable list ``gc/doomed/<id>``; writers
treat those objects as absent and store them again, so nothing they publish can depend on
them. gc deletes a doomed list's objects only when every live marker has seen that list,
and only those objects that are still unreachable then.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import msgpack

from keepsake.errors import CorruptObject, KeyNotFound
from keepsake.objects.cache import FileCache
from keepsake.objects.ids import ID_BYTES, ObjectId, id_from_bytes
from keepsake.storage import Storage

SESSIONS = "sessions/"
DOOMED = "gc/doomed/"
#: a long operation rewrites its marker at most this often, so gc can tell it is alive
REFRESH_EVERY = 60.0


def encode_doomed(ids: list[ObjectId]) -> bytes:
    packed: bytes = msgpack.packb({"version": 1, "ids": b"".join(bytes.fromhex(i) for i in sorted(ids))})
    return packed


def decode_doomed(data: bytes, key: str) -> frozenset[ObjectId]:
    try:
        doc = msgpack.unpackb(data, raw=False)
        raw = doc["ids"]
        if doc.get("version") != 1 or not isinstance(raw, bytes) or len(raw) % ID_BYTES:
            raise ValueError("malformed")
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptObject(key, f"doomed list is malformed: {exc}") from exc
    return frozenset(id_from_bytes(raw[i : i + ID_BYTES]) for i in range(0, len(raw), ID_BYTES))


class DoomedLists:
    """The doomed lists currently published by gc, loaded on demand."""

    def __init__(self, storage: Storage, cache: FileCache | None) -> None:
        self._storage = storage
        self._cache = cache
        self._lists: dict[str, frozenset[ObjectId]] = {}
        self._lock = threading.Lock()

    def refresh(self) -> frozenset[str]:
        """Reload the listing; returns the ids of the lists now known."""
        listed = {info.key[len(DOOMED) :] for info in self._storage.list(DOOMED)}
        loaded: dict[str, frozenset[ObjectId]] = {}
        for list_id in listed:
            if list_id in self._lists:
                loaded[list_id] = self._lists[list_id]
                continue
            key = DOOMED + list_id
            data = self._cache.get(key) if self._cache else None
            if data is None:
                try:
                    data = self._storage.read(key)
                except KeyNotFound:
                    continue  # swept meanwhile
                if self._cache:
                    self._cache.put(key, data)
            loaded[list_id] = decode_doomed(data, key)
        with self._lock:
            self._lists = loaded
        return frozenset(loaded)

    def contains(self, object_id: ObjectId) -> bool:
        return any(object_id in ids for ids in self._lists.values())


class Operation:
    """One write operation's marker. Created by :meth:`ObjectDB.operation`."""

    def __init__(self, storage: Storage, seen: frozenset[str]) -> None:
        self._storage = storage
        self.id = uuid.uuid4().hex
        self.key = SESSIONS + self.id
        self.seen = seen
        self.started = time.time()
        self._written = 0.0

    def _write(self) -> None:
        doc = {
            "version": 1,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "seen": sorted(self.seen),
        }
        self._storage.write(self.key, msgpack.packb(doc), durable=False)  # gone after a reboot anyway
        self._written = time.monotonic()

    def start(self) -> None:
        self._write()

    def touch(self) -> None:
        """Rewrite the marker if it is getting old (called as packs are written)."""
        if time.monotonic() - self._written > REFRESH_EVERY:
            self._write()

    def end(self) -> None:
        self._storage.delete(self.key)


def read_operation(data: bytes, key: str) -> frozenset[str]:
    """The doomed list ids a marker says its operation has seen."""
    try:
        doc = msgpack.unpackb(data, raw=False)
        seen = doc["seen"]
        if not isinstance(seen, list):
            raise TypeError("seen is not a list")
        return frozenset(str(s) for s in seen)
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptObject(key, f"session marker is malformed: {exc}") from exc


class OperationScope:
    """Per-thread nesting, so a checkpoint's writers and its ref update share one marker."""

    def __init__(self, storage: Storage, doomed: DoomedLists) -> None:
        self._storage = storage
        self._doomed = doomed
        self._local = threading.local()

    @property
    def current(self) -> Operation | None:
        return getattr(self._local, "op", None)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Operation]:
        outer = self.current
        if outer is not None:
            yield outer
            return
        # the snapshot of doomed lists is taken before the marker names it: from here
        # on, every dedup decision of this operation excludes those objects
        op = Operation(self._storage, self._doomed.refresh())
        op.start()
        self._local.op = op
        try:
            yield op
        finally:
            self._local.op = None
            op.end()
