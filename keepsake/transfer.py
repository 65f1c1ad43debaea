"""Transfers: copy the objects and refs one repository lacks from another (FORMAT.md §16).

``push``, ``pull`` and ``clone`` are one operation, :func:`transfer`, from a source to a
destination repository (any two URLs: a cluster's local repository to a bucket, a bucket to
a laptop). It is a write operation on the destination (FORMAT.md §11): it holds an operation
marker for the whole copy, treats every object on a doomed list as absent, and follows the
write ordering of §8: packs, then the index files naming them, then refs, then summaries.
So a crash at any point leaves the destination readable, and running the transfer again
finishes the job: what is already indexed at the destination is never sent twice.

What is sent: every object reachable from the refs that change, that the destination does
not have. A big source pack made of needed chunks is copied verbatim (one GET, one PUT);
the other objects are read with coalesced ranged reads and repacked by an
:class:`~keepsake.objects.database.ObjectWriter` without recompressing them, chunks first
and metadata children first, so no index ever names a manifest before what it names.
Everything copied is verified first (each object's content hash, and a verbatim pack's
hash), so corruption at the source is reported, naming the object, and never propagated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from keepsake.errors import CorruptObject, InvalidRefName, KeyNotFound, ObjectNotFound, RefConflict, RefNotFound
from keepsake.objects.database import MERGE_AT, SMALL_INDEX, ObjectDB
from keepsake.objects.envelope import open_object
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.pack import PackEntry, PackId, encode_index, index_key, pack_id_of_key, pack_key
from keepsake.objects.records import HeadRecord, referenced_ids
from keepsake.repository import CONFIG_KEY, Config, Repository
from keepsake.storage import Storage

EXPERIMENTS = "experiments/"
SUMMARIES = "summaries/"

#: requests in flight at once (reads of object batches, verbatim pack copies)
WORKERS = 8
#: verbatim pack copies in flight: each holds a whole pack (up to ~33 MiB) in memory
PACKS_IN_FLIGHT = 4
#: a pack is copied verbatim only from this size up: small packs (a metrics-only
#: checkpoint writes one of a few KB) are cheaper merged into big ones, one PUT per 32 MiB
VERBATIM_MIN_BYTES = 4 << 20
#: ... and only when the objects needed from it fill this much of it. The rest is sent as
#: dead weight, never indexed at the destination: typically a checkpoint's pack holds the
#: experiment's head of that moment, superseded (unreachable) since, a few hundred bytes.
VERBATIM_MIN_FILL = 0.9
#: objects fetched per batch on the repacking path (one task, coalesced ranged reads)
BATCH_BYTES = 8 << 20
#: summaries read and written per batch of concurrent requests
SUMMARY_BATCH = 64
#: an index file is written at least this often (bytes copied), so an interrupted
#: transfer keeps what it sent: rerunning it sends only the rest
CHECKPOINT_BYTES = 256 << 20

#: what :func:`transfer` does with each ref
CREATE = "create"
FAST_FORWARD = "fast-forward"
FORCE = "force"
UP_TO_DATE = "up-to-date"
BEHIND = "behind"
DIVERGED = "diverged"
CONFLICT = "conflict"
UPDATING = frozenset({CREATE, FAST_FORWARD, FORCE})


@dataclass
class RefUpdate:
    """One source ref and what the transfer does (or did) with it at the destination.

    ``action`` is one of: ``create`` (the destination lacked it), ``fast-forward`` (the
    destination's experiment head is an earlier state of the source's), ``force``
    (overwritten with --force), ``up-to-date`` (already equal), ``behind`` (the
    destination's experiment head is a later state of the source's: kept), ``diverged``
    (both changed: refused without --force) and ``conflict`` (it changed at the
    destination while the transfer ran: refused, rerun).
    """

    name: str
    source: ObjectId
    destination: ObjectId | None
    action: str
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.action in (DIVERGED, CONFLICT)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "destination": self.destination,
            "action": self.action,
            "reason": self.reason,
        }


@dataclass
class TransferStats:
    """Counters of one transfer; ``bytes_*`` are stored (compressed) bytes."""

    objects_reachable: int = 0
    objects_needed: int = 0
    #: envelope bytes of the objects the destination lacks (what a dry run would send)
    bytes_needed: int = 0
    objects_sent: int = 0
    #: everything written to the destination: packs, index files and summaries
    bytes_sent: int = 0
    objects_skipped: int = 0
    #: envelope bytes of reachable objects the destination already had (dedup)
    bytes_skipped: int = 0
    packs_copied: int = 0
    packs_written: int = 0
    index_files_written: int = 0
    refs_updated: int = 0
    summaries_written: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class TransferResult:
    source: str
    destination: str
    dry_run: bool
    refs: list[RefUpdate] = field(default_factory=list)
    stats: TransferStats = field(default_factory=TransferStats)

    @property
    def refused(self) -> list[RefUpdate]:
        return [r for r in self.refs if r.refused]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "dry_run": self.dry_run,
            "refs": [r.to_dict() for r in self.refs],
            "stats": self.stats.to_dict(),
        }


Progress = Callable[[TransferStats], None]


def init_like(url: str, options: dict[str, Any] | None, source: Repository) -> Repository:
    """Create a repository at ``url`` with the source's chunker parameters (so both cut
    files the same way and keep deduplicating against each other), or open the one there.

    A clone gets a new repository id: the id names the local cache directory, and two
    repositories must not share one.
    """
    storage = Storage.open(url, options)
    config = Config(chunker=source.config.chunker)
    if storage.create(CONFIG_KEY, config.encode()):
        return Repository(storage, config)
    return Repository.open(url, options)


def transfer(
    source: Repository,
    destination: Repository,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    workers: int = WORKERS,
    refs: Collection[str] | None = None,
    partial: bool = False,
    summaries: bool = True,
    expect: Mapping[str, ObjectId] | None = None,
) -> TransferResult:
    """Copy to ``destination`` every ref of ``source`` it can take, and the objects they need.

    Refs the destination lacks are created; experiment refs whose destination head is an
    earlier state of the source's are fast-forwarded; equal refs are left alone, and so are
    experiment refs the destination has a later state of. Any other difference (diverged
    experiments, tags pointing elsewhere) is refused and listed in the result, unless
    ``force``. Refs only the destination has are never touched.

    Args:
        force: overwrite diverged refs (and experiment refs the destination is ahead on).
        dry_run: work out what would be sent, and write nothing.
        progress: called (on the calling thread) as objects are sent.
        workers: reads and pack copies in flight at once.
        refs: transfer only these ref names (the others are not even listed at the
            destination: one read per named ref instead of a LIST of all of them).
        partial: the source is a spool (FORMAT.md §18): it may lack objects that the
            destination's current value of the ref holds. The walk stops at an object the
            source lacks and the destination indexes, and only fast-forwards (and
            up-to-date refs) are accepted, so every such object lies below the ref the
            transfer moves at the destination (see :func:`_walk`).
        summaries: copy the experiments' summaries after the refs (the spool's uploader
            writes its own, naming exactly the head it published).
        expect: ref name -> the value it must have at the destination; any other value is
            refused (``diverged``), even one the source's head would fast-forward. The
            spool's uploader passes the head it published last: a ``keepsake rm`` of the
            last checkpoint at the destination looks like a destination that is merely
            behind, and a fast-forward would undo it.

    Returns:
        What was done with each ref, and counters. Refused refs do not raise here; the CLI
        turns them into DivergedRefs after reporting.

    Raises:
        CorruptObject: an object the transfer needs is damaged or missing at the source.
        StorageError: either side's storage failed; rerun to finish the job.
    """
    result = TransferResult(source.url, destination.url, dry_run)
    names = None if refs is None else frozenset(refs)
    if dry_run:
        destination.objects.doomed.refresh()
        _plan(source, destination, force, result, workers, names, partial, expect)
        return result
    # The marker comes first: the dedup snapshot below (indexes and doomed lists) is only
    # safe against gc while the marker says which doomed lists this operation has seen.
    with destination.objects.operation() as operation:
        destination.objects.refresh()
        plan = _plan(source, destination, force, result, workers, names, partial, expect)
        copier = _Copier(source, destination, result.stats, progress, workers, operation.touch)
        copier.copy(plan)
        _update_refs(destination, result)
        _merge_small_indexes(destination.objects, result.stats)
        if summaries:
            _copy_summaries(source, destination, result, names is None)
    return result


# -- planning ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    #: source packs to copy byte for byte, with the needed objects in them (the ones indexed)
    verbatim: dict[PackId, list[PackEntry]]
    #: objects to repack (source entries): chunks in source (pack, offset) order, then
    #: metadata objects children first (§8: a manifest is never indexed before what it names)
    sealed: list[PackEntry]
    #: verified envelopes of needed metadata objects, read while walking
    envelopes: dict[ObjectId, bytes]


def _plan(
    source: Repository,
    destination: Repository,
    force: bool,
    result: TransferResult,
    workers: int,
    names: frozenset[str] | None = None,
    partial: bool = False,
    expect: Mapping[str, ObjectId] | None = None,
) -> _Plan:
    result.refs = _classify_refs(source, destination, force, names, partial, expect or {})
    roots = {r.source: f"ref {r.name}" for r in result.refs if r.action in UPDATING}
    stats = result.stats
    dst = destination.objects

    def missing(oid: ObjectId) -> bool:
        # an object gc has doomed at the destination counts as absent there (FORMAT.md §11)
        return not dst.has_live(oid)

    reachable, envelopes, children = _walk(source.objects, roots, missing, workers, dst.has if partial else None)
    needed: dict[ObjectId, PackEntry] = {}
    for oid, entry in reachable.items():
        if missing(oid):
            needed[oid] = entry
            stats.bytes_needed += entry.length
        else:
            stats.objects_skipped += 1
            stats.bytes_skipped += entry.length
    stats.objects_reachable = len(reachable)
    stats.objects_needed = len(needed)

    by_pack: dict[PackId, list[PackEntry]] = {}
    for entry in needed.values():
        by_pack.setdefault(entry.pack, []).append(entry)
    sizes = {pid: info.size for info in source.storage.list("packs/") if (pid := pack_id_of_key(info.key))}
    # A pack the destination indexes already (it holds objects gc doomed there) must not be
    # written again under its name: doomed objects are stored again in new packs (§11).
    indexed_there = {e.pack for e in dst.entries().values()}
    verbatim: dict[PackId, list[PackEntry]] = {}
    sealed: list[PackEntry] = []
    for pack_id, entries in by_pack.items():
        size = sizes.get(pack_id, 0)
        if (
            size >= VERBATIM_MIN_BYTES
            and pack_id not in indexed_there
            # chunks only: an index naming a copied manifest could otherwise be published
            # before the objects it names (in other packs); a checkpoint's metadata sits in
            # its last pack, so this repacks one pack per checkpoint at most
            and all(e.type == ObjectType.CHUNK for e in entries)
            and sum(e.length for e in entries) >= VERBATIM_MIN_FILL * size
        ):
            verbatim[pack_id] = sorted(entries, key=lambda e: e.offset)
        else:
            sealed.extend(e for e in entries if e.type == ObjectType.CHUNK)
    sealed.sort(key=lambda e: (e.pack, e.offset))
    sealed.extend(needed[oid] for oid in _children_first(list(roots), children) if oid in needed)
    return _Plan(verbatim, sealed, {oid: env for oid, env in envelopes.items() if oid in needed})


def _children_first(roots: list[ObjectId], children: dict[ObjectId, list[ObjectId]]) -> list[ObjectId]:
    """The metadata objects below ``roots`` in post-order: each after everything it names."""
    out: list[ObjectId] = []
    done: set[ObjectId] = set()
    for root in roots:
        if root in done:
            continue
        done.add(root)
        stack: list[tuple[ObjectId, Iterator[ObjectId]]] = [(root, iter(children.get(root, ())))]
        while stack:
            oid, below = stack[-1]
            child = next(below, None)
            if child is None:
                stack.pop()
                out.append(oid)
            elif child not in done:
                done.add(child)
                stack.append((child, iter(children.get(child, ()))))
    return out


def _classify_refs(
    source: Repository,
    destination: Repository,
    force: bool,
    names: frozenset[str] | None = None,
    partial: bool = False,
    expect: Mapping[str, ObjectId] | None = None,
) -> list[RefUpdate]:
    expect = expect or {}
    ours = source.refs.list()
    if names is None:
        theirs = destination.refs.list()
    else:
        ours = {name: target for name, target in ours.items() if name in names}
        theirs = {}
        for name in ours:
            try:
                theirs[name] = destination.refs.get(name)
            except RefNotFound:
                pass
    out = []
    for name, target in sorted(ours.items()):
        current = theirs.get(name)
        if current is None:
            if partial:
                # a spool holds only what the destination lacked when it was written: its
                # objects need the destination's ref, so it cannot create one
                out.append(RefUpdate(name, target, None, DIVERGED, "it is missing at the destination (deleted there?)"))
            else:
                out.append(RefUpdate(name, target, None, CREATE))
            continue
        if current == target:
            out.append(RefUpdate(name, target, current, UP_TO_DATE))
            continue
        if name in expect and current != expect[name]:
            out.append(RefUpdate(name, target, current, DIVERGED, f"it moved at the destination (from {expect[name][:7]})"))
            continue
        if name.startswith(EXPERIMENTS):
            action, reason = _compare_heads(source, destination, target, current)
        else:
            action, reason = DIVERGED, f"it points at {current[:7]} at the destination and {target[:7]} at the source"
        if force and action in (DIVERGED, BEHIND) and not partial:
            action, reason = FORCE, f"was {current[:7]}: {reason}"
        out.append(RefUpdate(name, target, current, action, reason))
    return out


def _compare_heads(source: Repository, destination: Repository, ours: ObjectId, theirs: ObjectId) -> tuple[str, str]:
    """Whether the destination's head of an experiment is an earlier state of the source's.

    A head lists the live checkpoints, oldest first (FORMAT.md §14.3): a checkpoint adds
    one at the end, a stop changes only the status, and ``keepsake rm`` of a checkpoint
    removes one anywhere, the last one included. So a list alone cannot tell "the other side
    is behind" from "a checkpoint was removed here": the heads' ``updated`` times do (all
    heads of one experiment are written by its own process, except for ``rm``).
    """
    try:
        src = HeadRecord.decode(source.objects.get(ours, ObjectType.HEAD), ours)
    except ObjectNotFound:
        # a spool prunes what it uploaded (FORMAT.md §18): its head is gone once the
        # destination had it, so a differing destination head moved there since
        return DIVERGED, f"its head {ours[:7]} is no longer at the source, and the destination's moved to {theirs[:7]}"
    try:
        dst = HeadRecord.decode(destination.objects.get(theirs, ObjectType.HEAD), theirs)
    except ObjectNotFound:
        return DIVERGED, f"its head {theirs[:7]} at the destination is missing (run keepsake fsck there)"
    if src.experiment != dst.experiment:
        return DIVERGED, "the two heads belong to different experiments"
    a, b = src.checkpoints, dst.checkpoints
    newer = src.updated > dst.updated
    if a[: len(b)] == b:  # the destination's checkpoints are a prefix of the source's
        if newer:
            added = len(a) - len(b)
            return FAST_FORWARD, f"{added} new checkpoint(s)" if added else f"status {dst.status} -> {src.status}"
        if a == b:
            return BEHIND, "the destination's head is newer"
        return DIVERGED, f"{len(a) - len(b)} checkpoint(s) were removed at the destination"
    if b[: len(a)] == a:  # the source's checkpoints are a prefix of the destination's
        if not newer:
            return BEHIND, f"the destination has {len(b) - len(a)} newer checkpoint(s)"
        return DIVERGED, f"{len(b) - len(a)} checkpoint(s) were removed at the source"
    return DIVERGED, (
        f"the source has {len(set(a) - set(b))} checkpoint(s) the destination lacks, and the destination "
        f"{len(set(b) - set(a))} the source lacks (checkpoints removed on one side?)"
    )


def _walk(
    db: ObjectDB,
    roots: dict[ObjectId, str],
    missing: Callable[[ObjectId], bool],
    workers: int,
    boundary: Callable[[ObjectId], bool] | None = None,
) -> tuple[dict[ObjectId, PackEntry], dict[ObjectId, bytes], dict[ObjectId, list[ObjectId]]]:
    """Everything reachable from ``roots`` in the source, verified as it is read.

    Every metadata object reachable is read (chunks are leaves: they are read only when
    sent). Objects the destination has are walked too: an object being there does not prove
    its children are (gc may have doomed them), and the walk is metadata only.

    With ``boundary`` (a spool as the source, FORMAT.md §18), an object the source lacks
    is not an error when ``boundary`` says the destination indexes it: the walk stops
    there. This is sound because a spool drops only objects an upload made reachable from
    the experiment's ref at the destination, and the partial transfer only fast-forwards
    that ref: every object below it is reachable there now, so gc has not doomed it (it
    dooms unreachable objects only) and cannot before the ref moves on (the compare-and-swap
    fails if someone else moved it). Doomed or not, it is live.

    Returns:
        source entries of every reachable object; the envelopes of the metadata objects
        ``missing`` says the destination lacks (so they are not read twice); and for each
        metadata object, the metadata objects it names (chunks left out: they are leaves).
    """
    entries = db.entries()
    reachable: dict[ObjectId, PackEntry] = {}
    envelopes: dict[ObjectId, bytes] = {}
    children: dict[ObjectId, list[ObjectId]] = {}
    frontier: list[tuple[ObjectId, ObjectType | None, str]] = [(oid, None, why) for oid, why in roots.items()]
    with ThreadPoolExecutor(workers, thread_name_prefix="keepsake-walk") as pool:
        while frontier:
            to_read: list[PackEntry] = []
            for oid, expected, referrer in frontier:
                if oid in reachable:
                    continue
                entry = entries.get(oid)
                if entry is None:
                    try:
                        entry = db.locate(oid)  # written since the snapshot
                    except ObjectNotFound:
                        if boundary is not None and boundary(oid):
                            continue  # uploaded from the spool earlier: the destination holds it
                        raise CorruptObject(oid, f"it is referenced by {referrer} but missing from {db.storage.url}") from None
                if expected is not None and entry.type != expected:
                    raise CorruptObject(oid, f"{referrer} expects a {expected.label}, but it is a {entry.type.label}")
                reachable[oid] = entry
                if entry.type != ObjectType.CHUNK:
                    to_read.append(entry)
            frontier = []
            for batch, envs, contents in _read_verified(db, pool, _batches(to_read, BATCH_BYTES), workers):
                for entry, env, content in zip(batch, envs, contents):
                    if missing(entry.id):
                        envelopes[entry.id] = bytes(env)
                    label = f"{entry.type.label} {entry.id}"
                    named = referenced_ids(entry.type, content, entry.id)
                    children[entry.id] = [child for child, ctype in named if ctype != ObjectType.CHUNK]
                    frontier.extend((child, ctype, label) for child, ctype in named)
    return reachable, envelopes, children


def _batches(entries: Iterable[PackEntry], limit: int, keep_order: bool = False) -> Iterator[list[PackEntry]]:
    """Groups of about ``limit`` envelope bytes, in (pack, offset) order unless ``keep_order``."""
    batch: list[PackEntry] = []
    size = 0
    for e in entries if keep_order else sorted(entries, key=lambda e: (e.pack, e.offset)):
        batch.append(e)
        size += e.length
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _read_verified(
    db: ObjectDB, pool: ThreadPoolExecutor, batches: Iterable[list[PackEntry]], in_flight: int
) -> Iterator[tuple[list[PackEntry], list[bytes], list[bytes]]]:
    """Read batches of envelopes concurrently and verify every object (its content hashes
    to its id, its type is the indexed one); yield (entries, envelopes, contents) in order.

    Contents are kept for metadata objects only (the walk decodes them); chunks' are
    dropped once verified, so memory stays at a few batches.
    """

    def fetch(batch: list[PackEntry]) -> tuple[list[bytes], list[bytes]]:
        envelopes = db.read_envelopes(batch)
        contents = []
        for entry, env in zip(batch, envelopes):
            otype, content = open_object(env, entry.id)
            if otype != entry.type:
                raise CorruptObject(entry.id, f"it is stored as a {otype.label} but indexed as a {entry.type.label}")
            contents.append(content if otype != ObjectType.CHUNK else b"")
        return envelopes, contents

    pending: deque[tuple[list[PackEntry], Future[tuple[list[bytes], list[bytes]]]]] = deque()
    try:
        for batch in batches:
            pending.append((batch, pool.submit(fetch, batch)))
            if len(pending) >= in_flight:
                done, fut = pending.popleft()
                yield (done, *fut.result())
        while pending:
            done, fut = pending.popleft()
            yield (done, *fut.result())
    finally:
        for _, fut in pending:
            fut.cancel()


# -- copying ----------------------------------------------------------------------------------


class _Copier:
    """Sends a plan's objects: verbatim packs first, then the repacked objects."""

    def __init__(
        self,
        source: Repository,
        destination: Repository,
        stats: TransferStats,
        progress: Progress | None,
        workers: int,
        touch: Callable[[], None],
    ) -> None:
        self._src = source
        self._dst = destination
        self._stats = stats
        self._progress = progress
        self._workers = workers
        self._touch = touch

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self._stats)

    def copy(self, plan: _Plan) -> None:
        self._copy_verbatim(plan.verbatim)
        self._copy_sealed(plan.sealed, plan.envelopes)

    def _copy_verbatim(self, packs: dict[PackId, list[PackEntry]]) -> None:
        if not packs:
            return
        written: dict[PackId, list[PackEntry]] = {}  # stored completely, not yet indexed
        since_index = 0
        pending: deque[tuple[PackId, Future[int]]] = deque()

        def copy_pack(pack_id: PackId, entries: list[PackEntry]) -> int:
            data = self._src.storage.read(pack_key(pack_id))
            # objects first, so damage is reported naming the object; then the whole pack
            # (its footer, and the bytes between objects, are copied too)
            view = memoryview(data)
            for e in entries:
                if e.end > len(data):
                    raise CorruptObject(e.id, f"its source pack {pack_id} is truncated")
                otype = open_object(view[e.offset : e.end], e.id)[0]
                if otype != e.type:
                    raise CorruptObject(e.id, f"it is stored as a {otype.label} but indexed as a {e.type.label}")
            if xxhash.xxh3_128_hexdigest(data) != pack_id:
                raise CorruptObject(pack_id, f"source pack {pack_key(pack_id)} does not hash to its name")
            self._dst.storage.write(pack_key(pack_id), data)
            return len(data)

        def finish_one() -> None:
            nonlocal since_index
            pack_id, fut = pending.popleft()
            size = fut.result()
            written[pack_id] = packs[pack_id]
            self._stats.objects_sent += len(packs[pack_id])
            self._stats.packs_copied += 1
            self._stats.bytes_sent += size
            since_index += size
            self._touch()
            if since_index >= CHECKPOINT_BYTES:
                self._publish(written)
                since_index = 0
            self._report()

        pool = ThreadPoolExecutor(min(self._workers, PACKS_IN_FLIGHT), thread_name_prefix="keepsake-copy")
        try:
            for pack_id, entries in packs.items():
                pending.append((pack_id, pool.submit(copy_pack, pack_id, entries)))
                if len(pending) >= PACKS_IN_FLIGHT:
                    finish_one()
            while pending:
                finish_one()
            self._publish(written)
        except BaseException:
            # Packs copied but not indexed yet are left for gc (FORMAT.md §16): another
            # transfer of the same source may have stored and indexed the very same pack
            # (same bytes, same name), and deleting it would break that one.
            for _, fut in pending:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True)

    def _publish(self, written: dict[PackId, list[PackEntry]]) -> None:
        """Write one index file naming the packs stored completely so far."""
        if not written:
            return
        index_id, data = encode_index(written)
        self._dst.storage.write(index_key(index_id), data)
        self._stats.index_files_written += 1
        self._stats.bytes_sent += len(data)
        written.clear()
        self._report()

    def _copy_sealed(self, entries: list[PackEntry], envelopes: dict[ObjectId, bytes]) -> None:
        if not entries:
            return
        stats = self._stats
        base_bytes, base_objects, base_indexes = stats.bytes_sent, stats.objects_sent, stats.index_files_written
        flushes = 0
        since_flush = 0
        # the writer joins this thread's operation marker; leaving the block with an error
        # deletes the packs it wrote that no index names (they are unique to this writer)
        with self._dst.objects.writer() as writer, ThreadPoolExecutor(
            self._workers, thread_name_prefix="keepsake-fetch"
        ) as pool:

            def update() -> None:
                stats.bytes_sent = base_bytes + writer.stats.stored_bytes
                stats.objects_sent = base_objects + writer.stats.objects_written
                stats.packs_written = writer.stats.packs_written
                stats.index_files_written = base_indexes + flushes

            def flush() -> None:
                nonlocal flushes, since_flush
                packs_before = writer.stats.packs_written
                writer.flush()  # packs, then one index naming them
                flushes += writer.stats.packs_written > packs_before  # else it wrote no index
                since_flush = 0
                update()

            def put(entry: PackEntry, envelope: bytes | memoryview) -> None:
                nonlocal since_flush
                writer.put_sealed(entry, envelope)
                since_flush += entry.length
                if since_flush >= CHECKPOINT_BYTES:
                    flush()  # an interrupted transfer keeps what is indexed by now

            # chunks first, then the metadata objects (read and verified while walking)
            # children first: whenever an index is written, what it names is complete
            to_read = [e for e in entries if e.id not in envelopes]
            batches = _batches(to_read, BATCH_BYTES, keep_order=True)
            for batch, envs, _ in _read_verified(self._src.objects, pool, batches, self._workers):
                for entry, env in zip(batch, envs):
                    put(entry, env)
                update()
                self._touch()
                self._report()
            for entry in entries:
                if entry.id in envelopes:
                    put(entry, envelopes[entry.id])
            flush()
        self._report()


# -- refs and summaries -----------------------------------------------------------------------


def _update_refs(destination: Repository, result: TransferResult) -> None:
    """Move each accepted ref by compare-and-swap from the value seen while planning."""
    for update in result.refs:
        if update.action not in UPDATING:
            continue
        try:
            destination.refs.set(update.name, update.source, update.destination)
        except RefConflict as exc:
            update.action = CONFLICT
            update.reason = f"it changed at the destination during the transfer (now {exc.actual or 'deleted'}); rerun"
            continue
        except InvalidRefName as exc:
            update.action = CONFLICT
            update.reason = exc.reason
            continue
        result.stats.refs_updated += 1


def _merge_small_indexes(db: ObjectDB, stats: TransferStats) -> None:
    """Merge the destination's small index files when they pile up, as writers do (§7)."""
    if not stats.index_files_written:
        return
    small = [info for info in db.storage.list("index/") if info.size < SMALL_INDEX]
    if len(small) > MERGE_AT:
        db.merge_indexes()


def _copy_summaries(source: Repository, destination: Repository, result: TransferResult, listed: bool = True) -> None:
    """Copy each sent experiment's summary (derived listing data, FORMAT.md §14.4), and
    any the destination lacks for an experiment it already had (an interrupted transfer).

    Copied byte for byte: a reader rebuilds a summary that names another head than the
    ref, so a stale one is harmless, and none at the source means none is copied. With
    ``listed`` False (a transfer of named refs) the destination's summaries are not
    listed: those of up-to-date experiments are written again (a few small files).
    """
    present = {info.key[len(SUMMARIES) :] for info in destination.storage.list(SUMMARIES)} if listed else set()
    keys = []
    for update in result.refs:
        if not update.name.startswith(EXPERIMENTS):
            continue
        experiment_id = update.name[len(EXPERIMENTS) :]
        if update.action == UP_TO_DATE and experiment_id in present:
            continue
        if update.action not in UPDATING and update.action != UP_TO_DATE:
            continue
        keys.append(SUMMARIES + experiment_id)
    # many requests in flight on object stores: a push of 1,000 new experiments is not
    # 2,000 requests one after another
    for start in range(0, len(keys), SUMMARY_BATCH):
        batch = keys[start : start + SUMMARY_BATCH]
        try:
            found = dict(zip(batch, source.storage.read_many(batch)))
        except KeyNotFound:  # some have none (rebuilt by readers): read them one by one
            found = {}
            for key in batch:
                try:
                    found[key] = source.storage.read(key)
                except KeyNotFound:
                    continue
        destination.storage.write_many(list(found.items()), durable=False)
        result.stats.summaries_written += len(found)
        result.stats.bytes_sent += sum(len(data) for data in found.values())
