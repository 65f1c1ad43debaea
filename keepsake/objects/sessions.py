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
from dataclasses import dataclass
from collections.abc import Callable, Iterator

import msgpack

from keepsake.errors import CorruptObject, KeepsakeError, KeyNotFound
from keepsake.objects.cache import FileCache
from keepsake.objects.ids import ID_BYTES, ObjectId, id_from_bytes
from keepsake.storage import Storage

SESSIONS = "sessions/"
DOOMED = "gc/doomed/"
#: a live operation's marker is rewritten this often (by a daemon thread), so gc can tell
#: a live writer from a dead one however long a single upload takes
REFRESH_EVERY = 60.0
#: a marker with no sign of life for this long belongs to a dead writer (FORMAT.md §11)
MARKER_TIMEOUT = 5 * REFRESH_EVERY


def process_namespace() -> str:
    """Names this machine's boot and PID namespace: two markers with the same value were
    written by processes that can see each other's pids (empty when unknown)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists in our PID namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def process_is_gone(ns: str, pid: int) -> bool:
    """True when ``pid`` of namespace ``ns`` (see :func:`process_namespace`) is a process of
    this machine and PID namespace that no longer exists: its writer was killed."""
    return bool(ns) and ns == process_namespace() and pid > 0 and not pid_alive(pid)


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

    @property
    def known(self) -> frozenset[str]:
        """The lists loaded by the last refresh."""
        return frozenset(self._lists)

    def contains(self, object_id: ObjectId) -> bool:
        return any(object_id in ids for ids in self._lists.values())


class Operation:
    """One write operation's marker. Created by :meth:`ObjectDB.operation`."""

    def __init__(self, storage: Storage, seen: frozenset[str] = frozenset()) -> None:
        self._storage = storage
        self.id = uuid.uuid4().hex
        self.key = SESSIONS + self.id
        self.seen = seen
        self.started = time.time()
        self._written = 0.0
        # touch() runs on the keeper thread: it must never recreate a marker end() removed
        self._state = threading.Lock()
        self._ended = False

    def _write(self) -> None:
        doc = {
            "version": 1,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ns": process_namespace(),
            "started": self.started,
            "updated": time.time(),
            "seen": sorted(self.seen),
        }
        self._storage.write(self.key, msgpack.packb(doc), durable=False)  # gone after a reboot anyway
        self._written = time.monotonic()

    def start(self, doomed: DoomedLists) -> None:
        """Create the marker, then load the doomed lists it will honour.

        The marker exists before the lists are read, so a gc that publishes a list and then
        lists markers either finds this marker (and waits for it unless it names the list)
        or is sure this operation reads the list. The marker first claims the lists loaded
        last time (a claim the operation keeps: lists only get added, or removed once gc is
        done with them) and is rewritten only when new lists appeared: one write per
        operation in the common case.
        """
        self.seen = doomed.known
        self._write()
        now = doomed.refresh()
        if not now <= self.seen:
            self.seen = now
            self._write()

    def touch(self) -> None:
        """Rewrite the marker if it is getting old (called as packs are written)."""
        with self._state:
            if not self._ended and time.monotonic() - self._written > REFRESH_EVERY:
                self._write()

    def end(self) -> None:
        with self._state:
            self._ended = True
            self._storage.delete(self.key)


@dataclass(frozen=True)
class Marker:
    """A write operation's marker as gc reads it."""

    key: str
    seen: frozenset[str]
    host: str
    pid: int
    started: float
    updated: float
    ns: str = ""

    def writer_is_gone(self) -> bool:
        """True when the writer ran on this machine, in our PID namespace, and its process
        no longer exists: it died without removing its marker (e.g. SIGKILL)."""
        return process_is_gone(self.ns, self.pid)

    def last_sign_of_life(self, mtime: float | None) -> float:
        """The later of the writer's own clock and the storage's modification time."""
        return max(self.updated, mtime or 0.0)


def read_marker(data: bytes, key: str) -> Marker:
    try:
        doc = msgpack.unpackb(data, raw=False)
        seen = doc["seen"]
        if not isinstance(seen, list):
            raise TypeError("seen is not a list")
        started, updated = float(doc["started"]), float(doc["updated"])
        return Marker(
            key,
            frozenset(str(s) for s in seen),
            str(doc.get("host", "?")),
            int(doc.get("pid", 0)),
            started,
            updated,
            str(doc.get("ns", "")),
        )
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptObject(key, f"session marker is malformed: {exc}") from exc


def read_operation(data: bytes, key: str) -> frozenset[str]:
    """The doomed list ids a marker says its operation has seen."""
    return read_marker(data, key).seen


class OperationScope:
    """Per-thread nesting, so a checkpoint's writers and its ref update share one marker."""

    def __init__(self, storage: Storage, doomed: DoomedLists, snapshot: Callable[[], None]) -> None:
        self._storage = storage
        self._doomed = doomed
        self._snapshot = snapshot
        self._local = threading.local()

    _live: set[Operation] = set()
    _live_lock = threading.Lock()
    _keeper: threading.Thread | None = None

    @classmethod
    def _keep_alive(cls, op: Operation) -> None:
        """Register ``op`` with the process's one marker-refreshing daemon thread."""
        with cls._live_lock:
            cls._live.add(op)
            if cls._keeper is None or not cls._keeper.is_alive():
                cls._keeper = threading.Thread(target=cls._refresh_loop, name="keepsake-markers", daemon=True)
                cls._keeper.start()

    @classmethod
    def _refresh_loop(cls) -> None:
        while True:
            time.sleep(min(REFRESH_EVERY / 4, 1.0))  # touch() decides when to write
            with cls._live_lock:
                ops = list(cls._live)
            for op in ops:
                try:
                    op.touch()
                except KeepsakeError:
                    pass  # a transient storage error: the next round retries, well within the timeout

    @property
    def current(self) -> Operation | None:
        return getattr(self._local, "op", None)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Operation]:
        outer = self.current
        if outer is not None:
            yield outer
            return
        # marker, then doomed lists, then the dedup snapshot (the index), in that order:
        # every dedup decision of this operation excludes the doomed objects, and sees
        # index files gc rewrote
        op = Operation(self._storage)
        op.start(self._doomed)
        self._local.op = op
        self._keep_alive(op)
        try:
            self._snapshot()
            yield op
        except BaseException:
            self._end(op, quiet=True)  # the error that stopped the operation is the one to see
            raise
        else:
            self._end(op, quiet=False)

    def begin(self) -> Operation:
        """Start an operation that outlives this call and may move to another thread (a
        checkpoint captured on the training thread and stored by a background one): the
        same marker, doomed lists and dedup snapshot as ``with scope():``. Run work inside
        it with :meth:`adopt`; it ends with :meth:`end`."""
        op = Operation(self._storage)
        op.start(self._doomed)
        self._keep_alive(op)
        try:
            self._snapshot()
        except BaseException:
            self._forget(op)
            with contextlib.suppress(KeepsakeError):
                op.end()
            raise
        return op

    @contextlib.contextmanager
    def adopt(self, op: Operation) -> Iterator[Operation]:
        """Make ``op`` (from :meth:`begin`) this thread's operation for the block: writers
        and nested ``with scope():`` blocks in it share its marker. Does not end it."""
        outer = self.current
        self._local.op = op
        try:
            yield op
        finally:
            self._local.op = outer

    def end(self, op: Operation, quiet: bool = False) -> None:
        """End an operation from :meth:`begin` (its marker is removed)."""
        self._forget(op)
        try:
            op.end()
        except KeepsakeError:
            if not quiet:
                raise

    def _forget(self, op: Operation) -> None:
        with self._live_lock:
            self._live.discard(op)

    def _end(self, op: Operation, quiet: bool) -> None:
        self._local.op = None
        with self._live_lock:
            self._live.discard(op)
        try:
            op.end()
        except KeepsakeError:
            if not quiet:
                raise
            # the marker stays behind; it ages out (MARKER_TIMEOUT) and gc removes it
