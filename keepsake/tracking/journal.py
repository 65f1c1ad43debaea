"""The checkpoint journal: on a local repository, checkpoint() returns once the checkpoint's
new bytes are in a journal file; a background thread stores them (FORMAT.md §19).

Taking a checkpoint has two parts. *Capturing* it has to happen before checkpoint() returns,
because training may overwrite the file right after: cut and hash the files (unchanged
stretches are only hashed, Chunker.cut_file_like) and copy the bytes the repository lacks
into ``journal/<experiment id>/<sequence>.journal``. *Storing* it (compressing, writing
packs and their index durably, then the experiment's ref) happens on a background thread,
in order, one journal at a time; the journal is deleted once the ref names the checkpoint.

A process killed in between leaves its journals behind. Whoever opens the repository to
write next (the next run, ``keepsake push``, ``keepsake gc``) stores them
(:func:`recover_journals`): each object is hashed again (a journal is not fsynced, so a
power loss can tear it), everything the checkpoint relies on must still be in the
repository, and the checkpoint is appended to its experiment's head by compare-and-swap. A
journal that fails a check is dropped with a warning: that checkpoint is lost, nothing
else is.

Each experiment's journal folder has an ``owner`` file that its live process holds locked
(flock, released by the kernel when the process dies), so recovery never touches the
journal of a process that is still running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack

from keepsake.errors import CorruptObject, KeepsakeError, ObjectNotFound, RefConflict, RefNotFound
from keepsake.objects.database import ObjectDB
from keepsake.objects.graph import walk
from keepsake.objects.ids import ObjectId, ObjectType, hash_object, id_from_bytes, id_to_bytes
from keepsake.objects.records import HeadRecord, referenced_ids
from keepsake.repository import Repository
from keepsake.tracking.metadata import experiment_ref, utc_now

log = logging.getLogger("keepsake")

FOLDER = "journal"
SUFFIX = ".journal"
TEMP_PREFIX = ".tmp-"
OWNER = "owner"
MAGIC = b"KSJRNL01"
VERSION = 1
#: bytes gathered (as views, no copies) before one writev into the journal
WRITE_BATCH = 8 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_TRAILER_END = struct.Struct("<Q8s")  # trailer length, MAGIC
RefReader = Callable[[str], ObjectId]


class CorruptJournal(KeepsakeError):
    """A journal file that is incomplete or does not decode."""

    exit_code = 9

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"journal {path} is damaged ({why})")


def journal_folder(repo: Repository, experiment: ObjectId | None = None) -> str | None:
    """The journal folder of ``repo`` (or of one experiment in it); None unless the
    repository is on local disk."""
    return repo.storage.local_path(FOLDER if experiment is None else f"{FOLDER}/{experiment}")


@contextlib.contextmanager
def owner_lock(path: str, create: bool = False) -> Iterator[bool]:
    """Hold the owner file ``path`` for the block, as :func:`take_owner` (without waiting);
    yields False when a live process holds it (or, unless ``create``, the file is gone)."""
    fd = take_owner(path, create=create)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def take_owner(path: str, wait: bool = False, create: bool = False) -> int | None:
    """Lock the owner file ``path`` (flock, released by the kernel when the process dies);
    returns the file descriptor that holds the lock (closing it releases it), or None.

    The lock is always on the file that is at ``path`` now: a recoverer may remove a folder
    (and its owner file) it found empty while another process waits on, or has just
    opened, the file; a lock on the unlinked file would protect nothing, so that is seen
    (inode compared) and, with ``create``, taken again on the new file.

    Args:
        wait: wait for the lock instead of returning None (the recording process, whose
            own new folder only a recoverer can be holding, briefly).
        create: create the file (and its folder) if missing; without it a missing file
            gives None (recovery never recreates what it may have just removed).
    """
    while True:
        if create:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if create:
                continue  # removed between makedirs and open: again
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)
        if not create:
            return None


class JournalWriter:
    """An ObjectSink that copies the objects the repository lacks into a new journal file.

    Objects the repository already has are not copied: the checkpoint relies on them, and
    the caller's write operation (begun before the first put and ended only after the
    checkpoint is published) keeps gc from deleting them meanwhile (FORMAT.md §11).
    Objects in ``queued`` (held by this experiment's earlier journals, stored before this
    one) are not copied either. Views passed to :meth:`put` must stay valid until
    :meth:`commit` (views into mapped files are: they keep the mapping alive).
    """

    def __init__(self, db: ObjectDB, folder: str, sequence: int, queued: frozenset[ObjectId] = frozenset()) -> None:
        self._db = db
        self._queued = queued
        self.folder = folder
        self.sequence = sequence
        os.makedirs(folder, exist_ok=True)
        self._tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._objects: list[tuple[int, ObjectId, int]] = []
        self._seen: set[ObjectId] = set()
        self._batch: list[bytes | memoryview] = []
        self._batch_bytes = 0
        self.bytes_written = 0

    @property
    def ids(self) -> frozenset[ObjectId]:
        """The objects this journal holds."""
        return frozenset(self._seen)

    def put(self, object_type: ObjectType, data: bytes | memoryview, object_id: ObjectId | None = None) -> ObjectId:
        oid = object_id or hash_object(object_type, data)
        if oid in self._seen or oid in self._queued or self._db.has_live(oid):
            return oid
        self._seen.add(oid)
        self._objects.append((int(object_type), oid, len(data)))
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= WRITE_BATCH:
            self._write_batch()
        return oid

    def _write_batch(self) -> None:
        assert self._fd is not None
        # at most IOV_MAX buffers per writev; a short write is finished by plain writes
        batch = self._batch
        for start in range(0, len(batch), IOV_MAX):
            group = batch[start : start + IOV_MAX]
            written = os.writev(self._fd, group)
            for buf in group:
                n = len(buf)
                if written >= n:
                    written -= n
                    continue
                rest = memoryview(buf)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
                written = 0
        self.bytes_written += self._batch_bytes
        self._batch = []
        self._batch_bytes = 0

    def commit(self, experiment: ObjectId, checkpoint: ObjectId) -> str:
        """Finish the journal of ``checkpoint`` (of ``experiment``); returns its path.

        Not fsynced: a journal has to survive the process, not the machine (recovery
        checks every object's hash, and drops a journal torn by a power loss).
        """
        self._write_batch()
        trailer = msgpack.packb(
            {
                "version": VERSION,
                "experiment": id_to_bytes(experiment),
                "checkpoint": id_to_bytes(checkpoint),
                "objects": [[t, id_to_bytes(oid), n] for t, oid, n in self._objects],
            }
        )
        self._batch = [trailer, _TRAILER_END.pack(len(trailer), MAGIC)]
        self._batch_bytes = len(trailer) + _TRAILER_END.size
        self._write_batch()
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        path = os.path.join(self.folder, f"{self.sequence:012d}{SUFFIX}")
        os.rename(self._tmp, path)
        return path

    def discard(self) -> None:
        """Remove the unfinished journal (the checkpoint failed before it returned)."""
        self._batch = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


@dataclass(frozen=True)
class Journal:
    """A journal file, decoded: its objects are ``data[offset : offset + length]``."""

    path: str
    experiment: ObjectId
    checkpoint: ObjectId
    objects: tuple[tuple[ObjectType, ObjectId, int, int], ...]
    data: memoryview

    @classmethod
    def read(cls, path: str) -> Journal:
        """Map and decode the journal at ``path``.

        Raises:
            CorruptJournal: it is incomplete (no trailer) or does not decode.
        """
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _TRAILER_END.size:
                raise CorruptJournal(path, f"{size} bytes, too short for a trailer")
            data = memoryview(mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ))
        try:
            length, magic = _TRAILER_END.unpack(data[size - _TRAILER_END.size :])
            if magic != MAGIC or length > size - _TRAILER_END.size:
                raise CorruptJournal(path, "no trailer: it was not finished")
            start = size - _TRAILER_END.size - length
            doc = msgpack.unpackb(data[start : size - _TRAILER_END.size])
            if doc.get("version") != VERSION:
                raise CorruptJournal(path, f"version {doc.get('version')!r}, this keepsake reads {VERSION}")
            objects = []
            offset = 0
            for object_type, raw_id, n in doc["objects"]:
                objects.append((ObjectType(object_type), id_from_bytes(raw_id), offset, n))
                offset += n
            if offset != start:
                raise CorruptJournal(path, f"its objects add up to {offset} bytes, not {start}")
            return cls(path, id_from_bytes(doc["experiment"]), id_from_bytes(doc["checkpoint"]), tuple(objects), data)
        except CorruptJournal:
            raise
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise CorruptJournal(path, f"trailer does not decode: {exc}") from exc

    def views(self) -> Iterator[tuple[ObjectType, ObjectId, memoryview]]:
        for object_type, oid, offset, n in self.objects:
            yield object_type, oid, self.data[offset : offset + n]


def journals_in(folder: str) -> list[str]:
    """The finished journals in an experiment's journal folder, oldest first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [os.path.join(folder, n) for n in sorted(names) if n.endswith(SUFFIX)]


def next_sequence(folder: str) -> int:
    paths = journals_in(folder)
    return int(os.path.basename(paths[-1])[: -len(SUFFIX)]) + 1 if paths else 0


@dataclass(frozen=True)
class Recovered:
    """What :func:`recover_journals` did with one journal left by a process that is gone."""

    path: str
    experiment: ObjectId | None
    checkpoint: ObjectId | None
    stored: bool
    why: str = ""


def recover_journals(repo: Repository, remote: Repository | None = None) -> list[Recovered]:
    """Store the checkpoints of journals whose process is gone (FORMAT.md §19). For a spool
    (§18), ``remote`` is its remote repository: a journal may rely on objects the spool
    pruned after uploading them, and the spool's ref starts from the remote's head."""
    root = journal_folder(repo)
    if root is None or not os.path.isdir(root):
        return []
    done: list[Recovered] = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        with owner_lock(os.path.join(folder, OWNER)) as ours:
            if not ours:
                continue  # its process is alive and storing them itself
            done.extend(store_journals(repo, folder, remote))
            remove_if_empty(folder)
    return done


def waiting_journals(repo: Repository) -> int:
    """How many journals processes that are gone left in ``repo`` (creates nothing)."""
    root = journal_folder(repo)
    if root is None or not os.path.isdir(root):
        return 0
    waiting = 0
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        found = journals_in(folder)
        if found:
            with owner_lock(os.path.join(folder, OWNER)) as gone:
                waiting += len(found) if gone else 0
    return waiting


def store_journals(repo: Repository, folder: str, remote: Repository | None = None) -> list[Recovered]:
    """Store every journal in ``folder`` in order, as recovery does; the caller holds the
    folder's owner lock. Unfinished journals (a checkpoint that never returned) are removed."""
    out = []
    stored: set[ObjectId] = set()  # by the journals before: the later ones rely on them
    for path in journals_in(folder):
        out.append(_recover_one(repo, path, stored, remote))
    for n in os.listdir(folder):
        if n.startswith(TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, n))
    return out


def remove_if_empty(folder: str) -> None:
    """Remove an experiment's journal folder once it holds no journal (caller holds its owner lock)."""
    try:
        if journals_in(folder) or any(n.startswith(TEMP_PREFIX) for n in os.listdir(folder)):
            return
    except FileNotFoundError:
        return  # gone with its spool
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, OWNER))
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def _recover_one(repo: Repository, path: str, stored: set[ObjectId], remote: Repository | None) -> Recovered:
    try:
        journal = Journal.read(path)
    except CorruptJournal as exc:
        log.warning("keepsake: dropping %s", exc)
        os.unlink(path)
        return Recovered(path, None, None, False, str(exc))
    why = ""
    try:
        db = repo.objects
        with db.operation(), db.writer() as writer:
            why = _check(db, journal, stored, repo.refs.get, remote.objects.has if remote is not None else None)
            if not why:
                for object_type, oid, view in journal.views():
                    writer.put(object_type, view, oid)
                writer.flush()
                why = append_checkpoint(repo, writer, journal.experiment, journal.checkpoint, remote)
                if not why:
                    stored.update(oid for _, oid, _, _ in journal.objects)
    finally:
        journal.data.release()
    if why:
        log.warning("keepsake: dropping journal %s of experiment %s: %s", path, journal.experiment[:7], why)
    os.unlink(path)
    return Recovered(path, journal.experiment, journal.checkpoint, not why, why)


def _check(
    db: ObjectDB,
    journal: Journal,
    stored: set[ObjectId],
    ref_reader: RefReader,
    elsewhere: Callable[[ObjectId], bool] | None = None,
) -> str:
    """Why ``journal`` cannot be stored ("" when it can): a torn object, or an object it
    relies on that the repository no longer has. Objects in ``stored`` (just stored from
    the experiment's earlier journals) count as present even if gc has doomed an older copy."""
    have = {oid for _, oid, _, _ in journal.objects} | stored
    needed: dict[ObjectId, ObjectType] = {}
    for object_type, oid, view in journal.views():
        if hash_object(object_type, view) != oid:
            return f"object {oid} does not match its id (the journal was torn)"
        try:
            needed.update(referenced_ids(object_type, bytes(view), oid))
        except (CorruptObject, ValueError) as exc:
            return f"object {oid} does not decode: {exc}"
    if journal.checkpoint not in have and not db.has(journal.checkpoint):
        return f"the checkpoint {journal.checkpoint} is neither in the journal nor stored"
    missing = [oid for oid in needed if oid not in have and not db.has_live(oid)]
    if missing:
        # a doomed object that is stored and reachable from the experiment's published
        # head stays (gc keeps what is reachable when it sweeps): an earlier checkpoint of
        # this run stored it again after the doomed list was written
        reachable = _reachable_from_head(db, journal.experiment, ref_reader)
        missing = [oid for oid in missing if not (db.has(oid) and oid in reachable)]
    if missing and elsewhere is not None:
        missing = [oid for oid in missing if not elsewhere(oid)]
    if missing:
        return f"{len(missing)} object(s) it relies on are no longer stored (e.g. {missing[0]})"
    return ""


def _reachable_from_head(db: ObjectDB, experiment: ObjectId, ref_reader: RefReader) -> set[ObjectId]:
    """The objects reachable from the published head of ``experiment`` (empty if none);
    what the database lacks (a spool's pruned objects) is not followed."""
    try:
        head_id = ref_reader(experiment_ref(experiment))
    except RefNotFound:
        return set()
    found = walk(db, [(head_id, ObjectType.HEAD, f"ref {experiment_ref(experiment)}")])
    return found.objects - found.missing.keys()


def _get_head(repo: Repository, remote: Repository | None, head_id: ObjectId) -> bytes:
    """A head object; from a spool's remote when the spool pruned it after uploading it."""
    try:
        return repo.objects.get(head_id, ObjectType.HEAD)
    except ObjectNotFound:
        if remote is None:
            raise
        return remote.objects.get(head_id, ObjectType.HEAD)


def append_checkpoint(
    repo: Repository, writer: object, experiment: ObjectId, checkpoint: ObjectId, remote: Repository | None = None
) -> str:
    """Append ``checkpoint`` to ``experiment``'s head by compare-and-swap (``writer`` is an
    ObjectWriter of the caller's write operation); returns "" or why it could not. In a
    spool (``remote`` given) whose ref is not set yet, the head the remote's ref names is
    the one appended to."""
    from keepsake.objects.database import ObjectWriter

    assert isinstance(writer, ObjectWriter)
    ref = experiment_ref(experiment)
    for _ in range(10):
        current: ObjectId | None
        try:
            current = repo.refs.get(ref)
            theirs = HeadRecord.decode(_get_head(repo, remote, current), current)
        except RefNotFound:
            if remote is None:
                return "its experiment was deleted"
            try:
                base = remote.refs.get(ref)
            except RefNotFound:
                return "its experiment was deleted"
            current = None
            theirs = HeadRecord.decode(remote.objects.get(base, ObjectType.HEAD), base)
        if checkpoint in theirs.checkpoints:
            return ""  # stored already (the process died after its ref update)
        head = HeadRecord(experiment, theirs.checkpoints + (checkpoint,), theirs.status, utc_now())
        head_id = writer.put(ObjectType.HEAD, head.encode())
        writer.flush()
        try:
            repo.refs.set(ref, head_id, current)
            return ""
        except RefConflict:
            continue
    return "its experiment's head kept changing"
