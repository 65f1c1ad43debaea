"""The object database: content objects in packs, found through index files (FORMAT.md §6-§8).

Reads verify the hash of every object. Writes go through an :class:`ObjectWriter`, which
deduplicates against everything already indexed, compresses on worker threads, writes full
packs in the background, and on :meth:`ObjectWriter.flush` writes the remaining pack and then
one index file for the packs it wrote. An object is visible to readers only once its index
file exists, and the index is written only after its packs are stored (write ordering, §8).
"""

from __future__ import annotations

import bisect
import io
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from keepsake.errors import CorruptObject, KeyNotFound, ObjectNotFound, StorageError, WrongObjectType
from keepsake.objects.cache import FileCache
from keepsake.objects.codec import new_buffer
from keepsake.objects.envelope import HEADER_SIZE, SealedBatch, open_object, open_object_into, seal_batch
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.manifests import Blob, Tree
from keepsake.objects.sessions import DoomedLists, Operation, OperationScope
from keepsake.objects.pack import (
    PackBuilder,
    PackEntry,
    PackId,
    decode_index,
    encode_index,
    index_key,
    pack_key,
)
from keepsake.storage import Storage

#: Target pack size; a pack closes at the first object that takes it past this.
PACK_SIZE = 32 << 20
#: Ranged reads are merged when the gap between them is smaller than this.
READ_GAP = 256 << 10
#: Largest single ranged read.
READ_SPAN = 16 << 20
#: A writer merges index files smaller than SMALL_INDEX into one once more than
#: MERGE_AT of them exist, so readers load few files however many flushes happened
#: (every checkpoint writes one). Large index files are left alone: merging stays cheap.
MERGE_AT = 32
SMALL_INDEX = 4 << 20


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


@dataclass
class WriteStats:
    """What a writer did: objects and bytes new to the repository, and what dedup skipped."""

    objects_written: int = 0
    objects_skipped: int = 0
    logical_written: int = 0
    logical_skipped: int = 0
    stored_bytes: int = 0
    packs_written: int = 0


class ObjectDB:
    """Packs and indexes in one :class:`~keepsake.storage.Storage`."""

    def __init__(self, storage: Storage, cache: FileCache | None = None, workers: int | None = None) -> None:
        self.storage = storage
        self._cache = cache
        self._workers = workers or default_workers()
        self._entries: dict[ObjectId, PackEntry] = {}
        self._indexes: dict[str, dict[PackId, list[PackEntry]]] = {}
        self._index_sizes: dict[str, int] = {}
        self._loaded = False
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        #: called with a byte count as file contents are written out (checkout); the CLI
        #: sets it to draw a progress line
        self.progress: Callable[[int], None] | None = None
        self.doomed = DoomedLists(storage, cache)
        #: ``with db.operation():`` holds one write operation's marker (FORMAT.md §11)
        self.operation = OperationScope(storage, self.doomed, self.refresh)

    # -- index ------------------------------------------------------------------------------

    def refresh(self, full: bool = False, damaged: dict[str, str] | None = None) -> None:
        """Load every index file not loaded yet (from the local cache when it has them).

        When an index file loaded earlier is gone (gc or a merge replaced it), or with
        ``full``, everything is rebuilt from the files listed now: entries of packs that gc
        deleted must not linger, or a writer would skip storing an object that no longer
        exists (FORMAT.md §11).

        An index file that does not decode raises CorruptObject, unless ``damaged`` is
        given (fsck, repair): then its name and the reason are recorded there and it is
        skipped.
        """
        infos = self.storage.list("index/")
        listed = {info.key.rsplit("/", 1)[-1]: info for info in infos}
        if full or any(index_id not in listed for index_id in self._indexes):
            kept = {i: packs for i, packs in self._indexes.items() if i in listed and not full}
            with self._lock:
                self._entries = {}
                self._indexes = {}
            self._index_sizes = {}
            for index_id, packs in kept.items():
                self._add_index(index_id, packs)
        for index_id, info in listed.items():
            self._index_sizes[index_id] = info.size
            if index_id in self._indexes:
                continue
            data = self._cache.get(info.key) if self._cache else None
            fetched = data is None
            if data is None:
                try:
                    data = self.storage.read(info.key)
                except KeyNotFound:
                    continue  # removed by a concurrent repack; its replacement is listed too
            try:
                packs = decode_index(data, index_id)
            except CorruptObject as exc:
                if damaged is None:
                    raise
                damaged[index_id] = exc.reason
                continue
            if fetched and self._cache:
                self._cache.put(info.key, data)  # only what decoded: a repaired file is read again
            self._add_index(index_id, packs)
        self._loaded = True

    def _add_index(self, index_id: str, packs: dict[PackId, list[PackEntry]]) -> None:
        with self._lock:
            for entries in packs.values():
                for e in entries:
                    self._entries.setdefault(e.id, e)
            self._indexes[index_id] = packs

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.refresh()

    def has(self, object_id: ObjectId) -> bool:
        self._ensure_loaded()
        return object_id in self._entries

    def has_live(self, object_id: ObjectId) -> bool:
        """Whether a writer may rely on the stored copy of ``object_id``: it is stored and
        no gc has doomed it (a doomed object is stored again instead, FORMAT.md §11)."""
        return self.has(object_id) and not self.doomed.contains(object_id)

    def locate(self, object_id: ObjectId) -> PackEntry:
        """Return where ``object_id`` is stored. Raises ObjectNotFound."""
        self._ensure_loaded()
        entry = self._entries.get(object_id)
        if entry is None:
            self.refresh()  # another writer may have added it since we loaded
            entry = self._entries.get(object_id)
        if entry is None:
            raise ObjectNotFound(object_id)
        return entry

    def entries(self) -> dict[ObjectId, PackEntry]:
        """Every indexed object (a snapshot)."""
        self._ensure_loaded()
        with self._lock:
            return dict(self._entries)

    def index_files(self) -> dict[str, dict[PackId, list[PackEntry]]]:
        """The loaded index files and the packs each names (a snapshot)."""
        self._ensure_loaded()
        with self._lock:
            return dict(self._indexes)

    def find_prefix(self, prefix: str) -> list[ObjectId]:
        self._ensure_loaded()
        return [oid for oid in self._entries if oid.startswith(prefix)]

    # -- reads ------------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="keepsake-decode")
        return self._pool

    def read_envelopes(self, entries: list[PackEntry]) -> list[bytes]:
        """Fetch the stored envelopes of ``entries`` with as few ranged reads as possible."""
        order = sorted(range(len(entries)), key=lambda i: (entries[i].pack, entries[i].offset))
        spans: list[tuple[PackId, int, int, list[int]]] = []
        for i in order:
            e = entries[i]
            if spans:
                pack, start, end, members = spans[-1]
                if pack == e.pack and e.offset - end < READ_GAP and e.end - start <= READ_SPAN and e.offset >= start:
                    spans[-1] = (pack, start, max(end, e.end), members + [i])
                    continue
            spans.append((e.pack, e.offset, e.end, [i]))
        try:
            blobs = self.storage.read_ranges([(pack_key(p), s, e) for p, s, e, _ in spans])
        except KeyNotFound as exc:
            missing = next(e for e in entries if pack_key(e.pack) == exc.key)
            moved = self._relocate(missing)  # gc may have repacked it (reloads the indexes)
            if moved is None:
                raise CorruptObject(missing.id, f"its pack {missing.pack} is missing") from exc
            return self.read_envelopes([self._entries.get(e.id, e) for e in entries])
        except StorageError as exc:
            if "short read" not in str(exc):
                raise
            # A truncated pack must read as corruption here too, as in _read_one (which
            # get() uses). Re-read entry by entry to name the first damaged object.
            for e in entries:
                self._read_one(e)
            raise
        out: list[bytes] = [b""] * len(entries)
        for (_, start, _, members), data in zip(spans, blobs):
            view = memoryview(data)
            for i in members:
                e = entries[i]
                out[i] = view[e.offset - start : e.end - start]  # type: ignore[call-overload]
        return out

    def read_metadata(self, entries: list[PackEntry]) -> list[bytes]:
        """The stored envelopes of non-chunk objects (records, trees, manifests), from the
        local cache where it has them (remote repositories: objects are immutable, so a
        cached copy is good forever), the rest with :meth:`read_envelopes`, then cached.
        Walks over the whole graph (gc, du, push) read only what changed since last time.
        """
        if self._cache is None:
            return self.read_envelopes(entries)
        out: list[bytes | None] = []
        missing: list[int] = []
        for i, e in enumerate(entries):
            cached = self._cache.get(f"objects/{e.id}") if e.type != ObjectType.CHUNK else None
            out.append(cached)
            if cached is None:
                missing.append(i)
        if missing:
            fetched = self.read_envelopes([entries[i] for i in missing])
            for i, envelope in zip(missing, fetched):
                out[i] = envelope
                if entries[i].type != ObjectType.CHUNK:
                    self._cache.put(f"objects/{entries[i].id}", bytes(envelope))
        return [bytes(o) if o is not None else b"" for o in out]

    def get(self, object_id: ObjectId, expected: ObjectType | None = None) -> bytes:
        """Return the verified content of ``object_id``.

        Raises:
            ObjectNotFound: no such object is indexed.
            WrongObjectType: it exists but is not of type ``expected``.
            CorruptObject: its bytes are damaged or its pack is missing/truncated.
        """
        return self.get_typed(object_id, expected)[1]

    def get_typed(self, object_id: ObjectId, expected: ObjectType | None = None) -> tuple[ObjectType, bytes]:
        entry = self.locate(object_id)
        if expected is not None and entry.type != expected:
            raise WrongObjectType(object_id, expected.label, entry.type.label)
        cache_key = f"objects/{object_id}"
        if self._cache and entry.type != ObjectType.CHUNK:
            cached = self._cache.get(cache_key)
            if cached is not None:
                return open_object(cached, object_id)
        envelope = self._read_one(entry)
        result = open_object(envelope, object_id)
        if self._cache and entry.type != ObjectType.CHUNK:
            self._cache.put(cache_key, bytes(envelope))
        return result

    def _relocate(self, entry: PackEntry) -> PackEntry | None:
        """Where ``entry``'s object lives now that its pack is gone, if gc moved it.

        gc repacks live objects into new packs and replaces the index files before it
        deletes a pack, so a reader holding the old index finds the object again after a
        full reload. None when the reload still names the same missing pack.
        """
        self.refresh(full=True)
        moved = self._entries.get(entry.id)
        if moved is None or moved.pack == entry.pack:
            return None
        return moved

    def _read_one(self, entry: PackEntry) -> bytes:
        try:
            return self.storage.read_range(pack_key(entry.pack), entry.offset, entry.end)
        except KeyNotFound as exc:
            moved = self._relocate(entry)
            if moved is None:
                raise CorruptObject(entry.id, f"its pack {entry.pack} is missing") from exc
            return self._read_one(moved)
        except Exception as exc:
            if "short read" in str(exc):
                raise CorruptObject(entry.id, f"its pack {entry.pack} is truncated") from exc
            raise

    def get_blob(self, object_id: ObjectId) -> Blob:
        return Blob.decode(self.get(object_id, ObjectType.BLOB), object_id)

    def get_tree(self, object_id: ObjectId) -> Tree:
        return Tree.decode(self.get(object_id, ObjectType.TREE), object_id)

    def iter_chunks(self, chunk_ids: Iterable[ObjectId], batch_bytes: int = 8 << 20) -> Iterator[bytes]:
        """Yield the verified content of each chunk in order, reading ahead in batches.

        Each batch is read and decoded by one pool task, and up to ``workers + 1`` batches
        are in flight while the caller consumes the current one: reads, decoding and the
        caller's writes overlap, and memory stays at a few batches. (One task per chunk was
        measured slower: the hand-offs cost more GIL time than the decoding.)
        """
        pool = self._executor()

        def batches() -> Iterator[list[PackEntry]]:
            batch: list[PackEntry] = []
            size = 0
            for cid in chunk_ids:
                e = self.locate(cid)
                if e.type != ObjectType.CHUNK:
                    raise WrongObjectType(cid, "chunk", e.type.label)
                batch.append(e)
                size += e.raw_length
                if size >= batch_bytes:
                    yield batch
                    batch, size = [], 0
            if batch:
                yield batch

        def fetch_and_decode(batch: list[PackEntry]) -> list[bytes]:
            envelopes = self.read_envelopes(batch)
            return [open_object(env, e.id)[1] for e, env in zip(batch, envelopes)]

        pending: deque[Future[list[bytes]]] = deque()
        for batch in batches():
            pending.append(pool.submit(fetch_and_decode, batch))
            if len(pending) > self._workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def iter_blob(self, blob: Blob) -> Iterator[bytes]:
        """Yield the bytes of a file, chunk by chunk."""
        if blob.inline is not None:
            if blob.inline:
                yield blob.inline
            return
        yield from self.iter_chunks(cid for cid, _ in blob.chunks)

    def open_blob(self, blob: Blob) -> io.BufferedReader:
        """A seekable, read-only file object over a stored file; reads chunks on demand."""
        return io.BufferedReader(BlobReader(self, blob), buffer_size=1 << 20)

    # -- writes -----------------------------------------------------------------------------

    def writer(self, pack_size: int | None = None) -> ObjectWriter:
        return ObjectWriter(self, pack_size or PACK_SIZE)  # read at call time: tests may set it

    def _publish(self, index_id: str, packs: dict[PackId, list[PackEntry]], data: bytes) -> None:
        self.storage.write(index_key(index_id), data)
        if self._cache:
            self._cache.put(index_key(index_id), data)
        self._add_index(index_id, packs)
        self._index_sizes[index_id] = len(data)
        if sum(1 for size in self._index_sizes.values() if size < SMALL_INDEX) > MERGE_AT:
            self.merge_indexes()

    def merge_indexes(self) -> int:
        """Merge the small index files into one; returns how many were replaced.

        The merged file is written before any old one is deleted, so every pack stays
        named by some index at every moment. Concurrent merges are harmless: equal content
        gets the same name, and readers skip index files that vanish after listing.
        """
        self.refresh()
        small = sorted(i for i, size in self._index_sizes.items() if size < SMALL_INDEX and i in self._indexes)
        if len(small) < 2:
            return 0
        merged: dict[PackId, list[PackEntry]] = {}
        for index_id in small:
            for pack_id, entries in self._indexes[index_id].items():
                merged.setdefault(pack_id, entries)
        # a name only this merge can produce: it may have to take its file back (below)
        new_id, data = encode_index(merged, nonce=os.urandom(16))
        self.storage.write(index_key(new_id), data)
        # If a source vanished meanwhile, gc rewrote it (or another merge took it): the
        # merged file may name packs gc is deleting, possibly after gc's last look at the
        # index files. Take it back and keep the sources (FORMAT.md §7, §11).
        still = {info.key.rsplit("/", 1)[-1] for info in self.storage.list("index/")}
        if not all(index_id in still for index_id in small):
            self.storage.delete(index_key(new_id))
            return 0
        if self._cache:
            self._cache.put(index_key(new_id), data)
        with self._lock:
            self._indexes[new_id] = merged
        self._index_sizes[new_id] = len(data)
        for index_id in small:
            if index_id != new_id:
                self.storage.delete(index_key(index_id))
                with self._lock:
                    self._indexes.pop(index_id, None)
                self._index_sizes.pop(index_id, None)
        return len(small)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class BlobReader(io.RawIOBase):
    """Random access to a blob's bytes, decoded a window (~8 MiB of chunks) at a time.

    A window is read and decoded on the database's worker threads straight into a buffer
    that the reader reuses (no bytes object per chunk, no fresh memory per window: on the
    VMs measured, first-touch page faults cost more than the decoding). While reads stay
    sequential, the next window is decoded while the caller reads this one; a seek
    elsewhere drops it. :meth:`iter_views` hands out the decoded windows themselves, for
    writing a whole file without another copy, with ``workers + 1`` windows ahead (both
    cores decode while the caller writes). Memory: ~8 MiB per window held or in flight,
    and as much again for the stored bytes of each window being decoded.
    """

    WINDOW = 8 << 20
    #: windows decoded ahead of sequential reads through :meth:`readinto`
    READ_AHEAD = 1

    def __init__(self, db: ObjectDB, blob: Blob) -> None:
        super().__init__()
        self._db = db
        self._blob = blob
        self._ids = [cid for cid, _ in blob.chunks]
        self._starts = []
        offset = 0
        for _, length in blob.chunks:
            self._starts.append(offset)
            offset += length
        self._starts.append(offset)
        # window w holds chunks [_bounds[w], _bounds[w + 1]): fixed, whatever the reads
        self._bounds = [0]
        for index in range(len(self._ids)):
            if self._starts[index + 1] - self._starts[self._bounds[-1]] >= self.WINDOW:
                self._bounds.append(index + 1)
        if self._bounds[-1] != len(self._ids):
            self._bounds.append(len(self._ids))
        self._window_starts = [self._starts[index] for index in self._bounds]
        #: every window buffer has the size of the largest window: any one can be reused
        self._buffer_size = max((b - a for a, b in zip(self._window_starts, self._window_starts[1:])), default=0)
        self._pos = 0
        self._current: tuple[int, memoryview] | None = None
        self._current_buffer: memoryview | None = None
        self._ahead: deque[tuple[int, Future[tuple[memoryview, memoryview]]]] = deque()
        self._spare: list[memoryview] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._blob.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def close(self) -> None:
        for _, fut in self._ahead:
            fut.cancel()
        self._ahead.clear()
        self._current = self._current_buffer = None
        self._spare.clear()
        super().close()

    def _decode(self, window: int, buffer: memoryview | None, entries: list[PackEntry]) -> tuple[memoryview, memoryview]:
        """Read and decode one window (on a worker thread); returns its buffer and bytes."""
        first, end = self._bounds[window], self._bounds[window + 1]
        base = self._starts[first]
        size = self._starts[end] - base
        if buffer is None or len(buffer) < size:
            buffer = new_buffer(max(size, self._buffer_size))
        out = buffer[:size]
        for index, entry, envelope in zip(range(first, end), entries, self._db.read_envelopes(entries)):
            at = self._starts[index] - base
            open_object_into(envelope, entry.id, out[at : at + self._starts[index + 1] - self._starts[index]])
        return buffer, out

    def _schedule(self, window: int) -> None:
        buffer = self._spare.pop() if self._spare else None
        fut: Future[tuple[memoryview, memoryview]]
        try:
            entries = []
            for cid in self._ids[self._bounds[window] : self._bounds[window + 1]]:
                entry = self._db.locate(cid)
                if entry.type != ObjectType.CHUNK:
                    raise WrongObjectType(cid, "chunk", entry.type.label)
                entries.append(entry)
        except (ObjectNotFound, WrongObjectType) as exc:
            # raised when (and only if) the window is read, as a failed read would
            fut = Future()
            fut.set_exception(exc)
        else:
            fut = self._db._executor().submit(self._decode, window, buffer, entries)
        self._ahead.append((window, fut))

    def _window(self, window: int, depth: int) -> memoryview:
        """The decoded bytes of ``window``; while reads are sequential, up to ``depth``
        windows after it are scheduled."""
        if self._current is not None and self._current[0] == window:
            return self._current[1]
        if not (self._ahead and self._ahead[0][0] == window):
            for _, fut in self._ahead:
                fut.cancel()  # a running one finishes; its buffer is not reused
            self._ahead.clear()
            self._schedule(window)
            depth = 1  # a first read, or a seek: maybe not sequential
        if self._current_buffer is not None and len(self._spare) < 2:
            self._spare.append(self._current_buffer)
        self._current = self._current_buffer = None
        last = min(window + depth, len(self._bounds) - 2)
        while self._ahead[-1][0] < last:
            self._schedule(self._ahead[-1][0] + 1)
        buffer, data = self._ahead.popleft()[1].result()
        self._current, self._current_buffer = (window, data), buffer
        return data

    def _window_of(self, pos: int) -> int:
        return bisect.bisect_right(self._window_starts, pos) - 1

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= self._blob.size or not len(buffer):
            return 0
        if self._blob.inline is not None:
            data: bytes | memoryview = self._blob.inline[self._pos : self._pos + len(buffer)]
        else:
            window = self._window_of(self._pos)
            offset = self._pos - self._window_starts[window]
            data = self._window(window, self.READ_AHEAD)[offset : offset + len(buffer)]
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        self._pos += n
        return n

    def iter_views(self) -> Iterator[memoryview]:
        """Yield the rest of the blob from the current position, in order, as views of the
        reader's own buffers; each view is valid only until the next one is asked for."""
        if self._blob.inline is not None:
            if self._pos < self._blob.size:
                yield memoryview(self._blob.inline)[self._pos :]
                self._pos = self._blob.size
            return
        while self._pos < self._blob.size:
            window = self._window_of(self._pos)
            offset = self._pos - self._window_starts[window]
            data = self._window(window, self._db._workers + 1)[offset:]
            self._pos += len(data)
            yield data


class ObjectWriter:
    """Adds objects to an :class:`ObjectDB`; see the module docstring for the ordering.

    Use as a context manager: leaving the block normally flushes; leaving it with an
    exception removes the packs this writer wrote that no index names yet.
    """

    #: compression batches in flight, and the size of one batch: bound memory (~8 MiB)
    MAX_PENDING = 8
    BATCH_BYTES = 2 << 20
    #: finished packs being stored (one thread, in order) while the next one fills; each
    #: is a pack-sized buffer. 2 would absorb the occasional slow write+fsync (32 MiB took
    #: 20-90 ms here) but measured no clear gain on a loaded 2-core VM for +31 MB of peak
    #: RSS (4 GiB ingest: 252 vs 221 MB, against a 300 MB target).
    MAX_UPLOADS = 1

    def __init__(self, db: ObjectDB, pack_size: int) -> None:
        self._db = db
        self._pack_size = pack_size
        self._pool = ThreadPoolExecutor(db._workers, thread_name_prefix="keepsake-compress")
        self._uploader = ThreadPoolExecutor(self.MAX_UPLOADS, thread_name_prefix="keepsake-pack-writer")
        self._batch: list[tuple[ObjectId, ObjectType, bytes | memoryview]] = []
        self._batch_bytes = 0
        self._pending: deque[
            tuple[list[tuple[ObjectId, ObjectType, int]], Future[list[tuple[bytes, bytes]]] | Future[SealedBatch]]
        ] = deque()
        #: buffers of sealed batches already copied into a pack, for the next batches
        self._spare_batches: list[memoryview] = []
        self._builder = PackBuilder(pack_size + (1 << 20))
        self._uploads: deque[tuple[PackId, list[PackEntry], memoryview, Future[None]]] = deque()
        self._written: dict[PackId, list[PackEntry]] = {}
        self._seen: set[ObjectId] = set()
        self.stats = WriteStats()
        # a writer is (part of) a write operation: its marker protects what it relies on
        self._scope = db.operation()
        self._operation: Operation = self._scope.__enter__()
        self._closed = False

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.flush()
            self.close()
        else:
            self.abort()

    def put(self, object_type: ObjectType, data: bytes | memoryview, object_id: ObjectId | None = None) -> ObjectId:
        """Add an object unless the repository already has it; returns its id.

        ``data`` must stay unchanged until the next :meth:`flush` (views into a mapped file
        are fine: they keep the mapping alive).
        """
        oid = object_id or hash_object(object_type, data)
        # an object gc has doomed is stored again rather than relied on (FORMAT.md §11)
        if oid in self._seen or self._db.has_live(oid):
            self.stats.objects_skipped += 1
            self.stats.logical_skipped += len(data)
            return oid
        self._seen.add(oid)
        self._batch.append((oid, object_type, data))
        self._batch_bytes += len(data)
        self.stats.objects_written += 1
        self.stats.logical_written += len(data)
        if self._batch_bytes >= self.BATCH_BYTES:
            self._submit_batch()
            self._drain(self.MAX_PENDING)
        return oid

    def put_sealed(self, entry: PackEntry, envelope: bytes | memoryview, dedup: bool = True) -> bool:
        """Add an object already sealed elsewhere (a pack being copied or repacked), byte for
        byte, without compressing it again. Returns False when dedup skipped it.

        The caller vouches for the envelope (it came from a verified read); it is not
        decoded here. ``dedup=False`` stores it even when the index names a copy (gc
        repacking an object out of a pack it is about to delete).
        """
        oid = entry.id
        if oid in self._seen or (dedup and self._db.has_live(oid)):
            self.stats.objects_skipped += 1
            self.stats.logical_skipped += entry.raw_length
            return False
        self._seen.add(oid)
        self._submit_batch()  # keep the pack order of earlier puts
        done: Future[list[tuple[bytes, bytes]]] = Future()
        done.set_result([(bytes(envelope[:HEADER_SIZE]), bytes(envelope[HEADER_SIZE:]))])
        self._pending.append(([(oid, entry.type, entry.raw_length)], done))
        self.stats.objects_written += 1
        self.stats.logical_written += entry.raw_length
        self._drain(self.MAX_PENDING)
        return True

    def _submit_batch(self) -> None:
        # One task per ~2 MiB: per-chunk tasks cost more in executor overhead and GIL
        # hand-offs than the compression itself.
        if not self._batch:
            return
        batch = self._batch
        meta = [(oid, otype, len(data)) for oid, otype, data in batch]
        spare = self._spare_batches.pop() if self._spare_batches else None
        self._pending.append((meta, self._pool.submit(seal_batch, [(t, d) for _, t, d in batch], spare)))
        self._batch = []
        self._batch_bytes = 0

    def _drain(self, limit: int) -> None:
        while len(self._pending) > limit:
            meta, fut = self._pending.popleft()
            sealed = fut.result()
            if isinstance(sealed, SealedBatch):
                self._add_batch(meta, sealed)
                if len(self._spare_batches) <= self.MAX_PENDING:
                    self._spare_batches.append(sealed.buffer)
                continue
            for (oid, otype, raw_length), (header, payload) in zip(meta, sealed):
                self._builder.add(oid, otype, raw_length, header, payload)
                if self._builder.size >= self._pack_size:
                    self._finish_pack()

    def _add_batch(self, meta: list[tuple[ObjectId, ObjectType, int]], sealed: SealedBatch) -> None:
        """Add a sealed batch to packs, one copy per run of envelopes that stays in one pack.

        A pack still closes at the first object that takes it past the pack size, as with
        objects added one by one.
        """
        ends = sealed.ends
        data = memoryview(sealed.buffer)
        first = begin = 0
        while first < len(meta):
            # the first object whose end reaches the pack size closes the pack
            last = min(bisect.bisect_left(ends, begin + self._pack_size - self._builder.size, first), len(meta) - 1)
            self._builder.add_run(
                data[begin : ends[last]],
                [
                    (oid, otype, end - start, raw_length)
                    for (oid, otype, raw_length), start, end in zip(
                        meta[first : last + 1], [begin, *ends[first:last]], ends[first : last + 1]
                    )
                ],
            )
            if self._builder.size >= self._pack_size:
                self._finish_pack()
            first, begin = last + 1, ends[last]

    def _finish_pack(self) -> None:
        pack_id, data, entries, buf = self._builder.finish()
        # bounded memory: at most MAX_UPLOADS packs are stored while the next one fills
        while len(self._uploads) >= self.MAX_UPLOADS:
            self._complete_upload()
        fut = self._uploader.submit(self._db.storage.write, pack_key(pack_id), data)
        self._uploads.append((pack_id, entries, buf, fut))
        self._operation.touch()
        self.stats.stored_bytes += len(data)
        self.stats.packs_written += 1

    def _complete_upload(self) -> None:
        pack_id, entries, buf, fut = self._uploads.popleft()
        fut.result()
        self._builder.recycle(buf)
        self._written[pack_id] = entries

    def flush(self) -> None:
        """Store everything put so far: packs first, then one index file naming them."""
        self._submit_batch()
        self._drain(0)
        if len(self._builder):
            self._finish_pack()
        while self._uploads:
            self._complete_upload()
        if self._written:
            index_id, data = encode_index(self._written)
            self._db._publish(index_id, self._written, data)
            self.stats.stored_bytes += len(data)
            self._written = {}
        self._seen.clear()

    def abort(self) -> None:
        """Drop what was not flushed and delete packs that no index names."""
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._batch = []
        # (own name: ``fut`` above is a compression future, of another type for mypy)
        for pack_id, entries, _, upload in list(self._uploads):
            upload.exception()  # wait; a failed write may have left nothing, delete is a no-op then
            self._written[pack_id] = entries
        self._uploads.clear()
        for pack_id in self._written:
            self._db.storage.delete(pack_key(pack_id))
        self._written = {}
        self._builder = PackBuilder(self._pack_size + (1 << 20))
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._uploader.shutdown(wait=True)
        self._scope.__exit__(None, None, None)


def put_value(writer: ObjectWriter, value: Blob | Tree) -> ObjectId:
    """Store a manifest value and return its id."""
    return writer.put(value.TYPE, value.encode())
