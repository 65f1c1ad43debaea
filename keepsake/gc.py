"""gc: delete what no ref reaches, safely while other processes write (FORMAT.md §11).

One run, in order (each step is safe to interrupt; the next run picks up from the state it
left):

1. mark: walk everything reachable from refs. A damaged graph stops gc here, changing
   nothing: what lies below a missing object would look like garbage;
2. take the gc lock ``gc/lock`` (create-only; a lock with no sign of life for
   LOCK_TIMEOUT is taken over);
3. tidy up after earlier runs: index entries naming packs that no longer exist are dropped
   (they would make writers skip objects that are gone), then earlier doomed lists removed;
4. doom the unreachable objects of packs older than the grace period: publish them as a
   doomed list, then wait until every live writer's marker says it has seen the list (or
   has ended). Writers from then on store those objects again instead of relying on them;
5. mark again: objects a writer published meanwhile are alive after all. The rest is dead;
6. sweep: packs with no live object go; packs whose live share fell below REPACK_BELOW get
   their live objects copied into a new pack first; index files are rewritten without the
   swept packs and the old ones deleted, and only then are the packs deleted. Packs no index
   names (left by crashed writers) go when older than the grace period and no live writer
   started before them.

The doomed list stays published until the next run's step 2, so a writer holding an index it
loaded before the sweep still treats those objects as absent.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgpack

from keepsake.errors import CorruptObject, KeepsakeError, KeyNotFound, RepositoryBusy, RepositoryDamaged
from keepsake.objects.envelope import open_object
from keepsake.objects.graph import Reachable, Root, walk
from keepsake.objects.ids import ObjectId
from keepsake.objects.pack import (
    TRAILER,
    PackEntry,
    PackId,
    encode_index,
    index_key,
    pack_id_of_key,
    pack_key,
    read_pack_footer,
)
from keepsake.objects.sessions import (
    DOOMED,
    MARKER_TIMEOUT,
    SESSIONS,
    Marker,
    decode_doomed,
    encode_doomed,
    process_is_gone,
    process_namespace,
    read_marker,
)
from keepsake.repository import Repository
from keepsake.storage import KeyInfo, Storage

LOCK_KEY = "gc/lock"
#: a gc lock with no sign of life for this long belongs to a dead gc and may be taken over
LOCK_TIMEOUT = 10 * 60.0
#: default grace period: unreachable objects younger than this are kept (a writer that died
#: mid-write is protected by it; live writers are protected by their markers)
DEFAULT_GRACE = 24 * 3600.0
#: a pack whose live bytes fall below this share of its object bytes is repacked
REPACK_BELOW = 0.5
#: how long gc waits for running writers to see its doomed list before deferring
DEFAULT_WAIT = 120.0
#: a pack written within this many seconds before a live writer started may be that
#: writer's (clocks of different machines differ a little)
CLOCK_SLACK = 60.0

Progress = Callable[[str], None]


@dataclass
class GcReport:
    """What a gc run found and did. Byte counts are stored bytes (packs + index files)."""

    dry_run: bool
    grace: float
    reachable_objects: int = 0
    unreachable_objects: int = 0
    young_objects: int = 0  # unreachable but inside the grace period: kept
    dead_objects: int = 0  # deleted (or, with dry_run, would be)
    deferred_objects: int = 0  # doomed, but writers that had not seen the list were still running
    revived_objects: int = 0  # doomed, then published by a writer before the sweep: kept
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_partly_dead: int = 0  # kept as they are: most of their bytes are live
    unindexed_packs_deleted: int = 0
    objects_copied: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    freed_estimate: int = 0  # dry run: bytes the sweep would free
    waiting_for: list[str] = field(default_factory=list)  # markers gc gave up waiting for

    @property
    def freed(self) -> int:
        return self.freed_estimate if self.dry_run else self.bytes_before - self.bytes_after


# -- the lock -------------------------------------------------------------------------------


class GcLock:
    """``gc/lock``: one gc at a time per repository (two would race on index rewrites)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._doc = {
            "version": 1,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ns": process_namespace(),
            "started": time.time(),
        }
        self._written = 0.0

    def _data(self) -> bytes:
        packed: bytes = msgpack.packb({**self._doc, "updated": time.time()})
        return packed

    def acquire(self) -> None:
        if self._storage.create(LOCK_KEY, self._data(), unique=True):
            self._written = time.monotonic()
            return
        try:
            data, version = self._storage.read_versioned(LOCK_KEY)
        except KeyNotFound:
            return self.acquire()  # released meanwhile
        holder, updated, gone = _describe_lock(data)
        mtime = next((i.mtime for i in self._storage.list("gc/") if i.key == LOCK_KEY and i.mtime), 0.0)
        if not gone and time.time() - max(updated, mtime) < LOCK_TIMEOUT:
            raise RepositoryBusy(self._storage.url, holder)
        if not self._storage.swap(LOCK_KEY, self._data(), version, unique=True):  # take over a dead gc's lock
            raise RepositoryBusy(self._storage.url, "another gc took over a stale lock first")
        self._written = time.monotonic()

    def refresh(self) -> None:
        if time.monotonic() - self._written > LOCK_TIMEOUT / 10:
            self._storage.write(LOCK_KEY, self._data(), durable=False)
            self._written = time.monotonic()

    def release(self) -> None:
        self._storage.delete(LOCK_KEY)


def _describe_lock(data: bytes) -> tuple[str, float, bool]:
    """(who holds it, when it was last refreshed, whether its holder is known dead: a
    process of this machine and PID namespace that no longer exists, e.g. a killed gc)."""
    try:
        doc = msgpack.unpackb(data, raw=False)
        pid = int(doc["pid"])
        return f"pid {pid} on {doc['host']}", float(doc["updated"]), process_is_gone(str(doc.get("ns", "")), pid)
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return "unreadable lock", 0.0, False  # a damaged lock counts as stale by age


# -- one run --------------------------------------------------------------------------------


class _Run:
    def __init__(self, repo: Repository, grace: float, wait: float, progress: Progress | None) -> None:
        self.repo = repo
        self.storage = repo.storage
        self.db = repo.objects
        self.grace = grace
        self.wait = wait
        self.say = progress or (lambda message: None)
        self.started = time.time()

    # -- state ------------------------------------------------------------------------------

    def stored_bytes(self) -> int:
        return sum(i.size for i in self.storage.list("packs/")) + sum(i.size for i in self.storage.list("index/"))

    def packs(self) -> dict[PackId, KeyInfo]:
        return {pid: info for info in self.storage.list("packs/") if (pid := pack_id_of_key(info.key))}

    def index_files(self) -> dict[str, dict[PackId, list[PackEntry]]]:
        """The index files as listed now (a refresh drops the vanished ones and reads only
        the new ones)."""
        self.db.refresh()
        return self.db.index_files()

    def markers(self) -> list[tuple[Marker, float | None]]:
        out = []
        for info in self.storage.list(SESSIONS):
            try:
                out.append((read_marker(self.storage.read(info.key), info.key), info.mtime))
            except KeyNotFound:
                continue  # the operation ended while we listed
            except CorruptObject:
                # unreadable: count it as a live writer that has seen nothing, until it is old
                out.append((Marker(info.key, frozenset(), "?", 0, info.mtime or 0.0, info.mtime or 0.0), info.mtime))
        return out

    def live(self, marker: Marker, mtime: float | None) -> bool:
        if marker.writer_is_gone():
            return False  # killed on this machine: no need to wait for its marker to age
        return time.time() - marker.last_sign_of_life(mtime) < MARKER_TIMEOUT

    def mark(self, replaced: dict[str, list[Root]] | None = None) -> Reachable:
        """Walk from the refs. Refs are listed before the index is loaded: a writer stores
        objects and their index before it publishes a ref, so whatever a listed ref needs is
        in the index loaded after it. (A merge that replaced an index file between our
        listing and our read can still hide objects: a damaged-looking walk is retried
        with a fresh index before it counts.)"""
        for attempt in range(3):
            roots: list[Root] = []
            for name, target in self.repo.refs.list().items():
                if replaced and name in replaced:
                    roots.extend(replaced[name])
                else:
                    roots.append((target, None, f"ref {name}"))
            self.db.refresh(full=attempt > 0)
            reach = walk(self.db, roots)
            if reach.complete:
                return reach
        if not reach.complete:
            damaged = {**reach.missing, **reach.corrupt}
            oid, why = next(iter(sorted(damaged.items())))
            raise RepositoryDamaged(self.storage.url, len(damaged), f"{oid}: {why}")
        return reach

    def old(self, info: KeyInfo) -> bool:
        mtime = info.mtime if info.mtime is not None else self.started
        return self.started - mtime >= self.grace

    # -- steps ------------------------------------------------------------------------------

    def tidy(self, lock: GcLock) -> None:
        """Drop index entries of packs that are gone, then the doomed lists of earlier runs.

        Index files are listed before packs: a writer stores a pack before the index that
        names it, so a pack missing from the later listing is really gone. (The other order
        took a pack written between the two listings for a vanished one.)
        """
        files = self.index_files()
        present = set(self.packs())
        self.rewrite_indexes(lambda pack: pack not in present, files)
        for info in self.storage.list(DOOMED):
            self.storage.delete(info.key)
        lock.refresh()

    def rewrite_indexes(self, gone: Callable[[PackId], bool], files: dict[str, dict[PackId, list[PackEntry]]]) -> int:
        """Replace the index files that name a pack ``gone`` says is going by one file
        naming their other packs: written first, then the old files deleted."""
        affected = {i: packs for i, packs in files.items() if any(gone(p) for p in packs)}
        if not affected:
            return 0
        kept: dict[PackId, list[PackEntry]] = {}
        for packs in affected.values():
            for pack_id, entries in packs.items():
                if not gone(pack_id):
                    kept.setdefault(pack_id, entries)
        if kept:
            new_id, data = encode_index(kept, nonce=os.urandom(16))
            self.storage.write(index_key(new_id), data)
        else:
            new_id = ""
        for index_id in affected:
            if index_id != new_id:
                self.storage.delete(index_key(index_id))
        return len(affected)

    def wait_for_writers(self, doomed_id: str, lock: GcLock) -> list[str]:
        """Wait until every live marker has seen ``doomed_id``; returns those still blocking
        when the wait ran out (empty: go ahead)."""
        deadline = time.monotonic() + self.wait
        delay = 0.05
        while True:
            blocking = [m.key for m, mtime in self.markers() if doomed_id not in m.seen and self.live(m, mtime)]
            if not blocking or time.monotonic() >= deadline:
                return blocking
            self.say(f"waiting for {len(blocking)} running writers to finish")
            lock.refresh()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def sweep(self, dead: set[ObjectId], candidates: set[PackId], report: GcReport) -> set[PackId]:
        """Delete the dead objects of ``candidates``; returns the packs deleted."""
        files = self.index_files()
        present = set(self.packs())  # after the index files: see tidy
        by_pack = _objects_by_pack(files, present)  # copies count only in packs that exist
        copies: dict[ObjectId, set[PackId]] = defaultdict(set)
        for pack_id, members in by_pack.items():
            for oid in members:
                copies[oid].add(pack_id)
        removing: set[PackId] = set()
        repack: set[PackId] = set()
        for pack_id in candidates & set(by_pack):
            fate, _ = _fate(by_pack[pack_id], dead)
            if fate in ("delete", "repack"):
                removing.add(pack_id)
            if fate == "repack":
                repack.add(pack_id)
            elif fate == "partly-dead":
                report.packs_partly_dead += 1
        # live objects whose every copy is in a pack that goes: copy them first
        to_copy: dict[ObjectId, PackEntry] = {}
        for pack_id in sorted(repack):
            for oid, e in by_pack[pack_id].items():
                if oid not in dead and copies[oid] <= removing:
                    to_copy.setdefault(oid, e)
        if to_copy:
            self.say(f"repacking {len(to_copy)} live objects from {len(repack)} packs")
            with self.db.writer() as writer:
                entries_list = sorted(to_copy.values(), key=lambda e: (e.pack, e.offset))
                for start in range(0, len(entries_list), 1024):
                    batch = entries_list[start : start + 1024]
                    for e, envelope in zip(batch, self.db.read_envelopes(batch)):
                        open_object(envelope, e.id)  # never copy damage into a new pack
                        writer.put_sealed(e, envelope, dedup=False)
            report.objects_copied = len(to_copy)
        # indexes first, then packs (a pack must never be named by no index while live, or
        # be named by an index once deleted)
        self.rewrite_indexes(lambda pack: pack in removing, self.index_files())
        for pack_id in sorted(removing):
            self.storage.delete(pack_key(pack_id))
        report.packs_deleted = len(removing)
        report.packs_repacked = len(repack)
        # an index merged by a writer from files read before our rewrite may still name a
        # swept pack: catch it now (and the next run's tidy catches a later one)
        self.rewrite_indexes(lambda pack: pack in removing, self.index_files())
        return removing

    def sweep_unindexed(self, report: GcReport) -> None:
        """Delete packs no index names, left by writers that died before writing their index.

        Listed in this order: packs, then markers, then index files. A pack that no index
        listed last names belongs to a writer that had not written its index by then, so
        had not ended its operation when markers were listed (a writer writes its index
        before it ends), and its marker, created before the pack, was listed. (Listing
        index files first lost a pack whose writer wrote its index and ended in between.)
        """
        packs = self.packs()
        starts = [m.started for m, mtime in self.markers() if self.live(m, mtime)]
        indexed = {p for files in self.index_files().values() for p in files}
        for pack_id, info in sorted(packs.items()):
            if pack_id in indexed or not self.old(info):
                continue
            written = info.mtime if info.mtime is not None else self.started
            if any(start <= written + CLOCK_SLACK for start in starts):
                continue  # may belong to a writer that is still running
            self.storage.delete(info.key)
            report.unindexed_packs_deleted += 1

    def stale_markers(self) -> None:
        """Markers of writers dead for long, or known dead, are noise; remove them."""
        for marker, mtime in self.markers():
            if marker.writer_is_gone() or time.time() - marker.last_sign_of_life(mtime) > 4 * MARKER_TIMEOUT:
                self.storage.delete(marker.key)


def collect_garbage(
    repo: Repository,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    wait: float = DEFAULT_WAIT,
    progress: Progress | None = None,
    planned_refs: dict[str, list[Root]] | None = None,
) -> GcReport:
    """Delete every object no ref reaches that is older than ``grace`` seconds.

    Safe while other processes write (see the module docstring). With ``dry_run`` nothing is
    written or deleted, and the report says what a run now would free; ``planned_refs``
    then stands in for refs as a planned change would leave them (ref name -> the roots
    it would have instead), so a retention dry run can say what it would free.

    Raises:
        RepositoryBusy: another gc holds the lock.
        RepositoryDamaged: something reachable is missing or corrupt; nothing was deleted.
    """
    run = _Run(repo, grace, wait, progress)
    report = GcReport(dry_run=dry_run, grace=grace)
    if dry_run:
        return _plan(run, report, planned_refs)
    run.say("marking reachable objects")
    # Marked before the lock, which is a write: a damaged repository is left exactly as it
    # is. What this mark misses (refs added meanwhile) is only doomed for now: the second
    # mark, after the wait, decides what dies.
    reach = run.mark()
    lock = GcLock(run.storage)
    lock.acquire()
    try:
        report.bytes_before = run.stored_bytes()
        run.say("tidying up after earlier runs")
        run.tidy(lock)
        packs = run.packs()
        candidates = {p for p, info in packs.items() if run.old(info)}
        doomed, young = _unreachable(run.index_files(), reach.objects, candidates)
        report.reachable_objects = len(reach.objects)
        report.unreachable_objects = len(doomed) + len(young)
        report.young_objects = len(young)
        if doomed:
            doomed_id = uuid.uuid4().hex
            run.storage.write(DOOMED + doomed_id, encode_doomed(sorted(doomed)))
            blocking = run.wait_for_writers(doomed_id, lock)
            if blocking:
                # the list stays: writers honour it from now on, and the next run sweeps
                report.deferred_objects = len(doomed)
                report.waiting_for = blocking
            else:
                lock.refresh()
                run.say("marking again")
                again = run.mark()
                dead = doomed - again.objects
                report.revived_objects = len(doomed) - len(dead)
                report.dead_objects = len(dead)
                run.sweep(dead, candidates, report)
        if not report.waiting_for:
            run.sweep_unindexed(report)
        run.stale_markers()
        # files a killed local writer left mid-write (never listed, never read)
        run.storage.remove_stale_temporaries(max(grace, MARKER_TIMEOUT))
        report.bytes_after = run.stored_bytes()
    except BaseException:
        # the error that stopped gc is the one to report; a lock we fail to release ages
        # out (LOCK_TIMEOUT) or, on this machine, is taken over once we are gone
        with contextlib.suppress(KeepsakeError):
            lock.release()
        raise
    lock.release()
    return report


def _unreachable(
    files: dict[str, dict[PackId, list[PackEntry]]], reachable: set[ObjectId], candidates: set[PackId]
) -> tuple[set[ObjectId], set[ObjectId]]:
    """Unreachable objects, split into doomed ones (in packs past the grace period) and
    young ones. An object with a copy in a young pack is young: it may be being reused."""
    doomed: set[ObjectId] = set()
    young: set[ObjectId] = set()
    for packs in files.values():
        for pack_id, entries in packs.items():
            for e in entries:
                if e.id not in reachable:
                    (doomed if pack_id in candidates else young).add(e.id)
    return doomed - young, young


def _objects_by_pack(
    files: dict[str, dict[PackId, list[PackEntry]]], present: set[PackId] | None = None
) -> dict[PackId, dict[ObjectId, PackEntry]]:
    """Each pack's objects, as all index files name them (only packs in ``present``, if given:
    a merge made from files read before a sweep can still name a deleted pack)."""
    by_pack: dict[PackId, dict[ObjectId, PackEntry]] = defaultdict(dict)
    for packs in files.values():
        for pack_id, entries in packs.items():
            if present is None or pack_id in present:
                for e in entries:
                    by_pack[pack_id][e.id] = e
    return by_pack


def _fate(members: dict[ObjectId, PackEntry], dead: set[ObjectId]) -> tuple[str, int]:
    """What the sweep does with a pack (``keep`` | ``delete`` | ``repack`` | ``partly-dead``)
    and the stored bytes of its dead objects."""
    dead_bytes = sum(e.length for oid, e in members.items() if oid in dead)
    if not dead_bytes:
        return "keep", 0
    live_bytes = sum(e.length for oid, e in members.items() if oid not in dead)
    if not live_bytes:
        return "delete", dead_bytes
    if live_bytes < REPACK_BELOW * (live_bytes + dead_bytes):
        return "repack", dead_bytes
    return "partly-dead", dead_bytes


def _plan(run: _Run, report: GcReport, planned_refs: dict[str, list[Root]] | None) -> GcReport:
    """A dry run: what a sweep now would free, if no writer revived anything."""
    report.bytes_before = report.bytes_after = run.stored_bytes()
    reach = run.mark(planned_refs)
    packs = run.packs()
    candidates = {p for p, info in packs.items() if run.old(info)}
    files = run.index_files()
    doomed, young = _unreachable(files, reach.objects, candidates)
    report.reachable_objects = len(reach.objects)
    report.unreachable_objects = len(doomed) + len(young)
    report.young_objects = len(young)
    report.dead_objects = len(doomed)
    by_pack = _objects_by_pack(files)
    for pack_id in candidates & set(by_pack):
        fate, dead_bytes = _fate(by_pack[pack_id], doomed)
        if fate == "delete":
            report.packs_deleted += 1
            report.freed_estimate += packs[pack_id].size
        elif fate == "repack":
            report.packs_repacked += 1
            report.freed_estimate += dead_bytes
        elif fate == "partly-dead":
            report.packs_partly_dead += 1
    indexed = set(by_pack)
    for pack_id, info in packs.items():
        if pack_id not in indexed and run.old(info):
            report.unindexed_packs_deleted += 1
            report.freed_estimate += info.size
    return report


def describe(report: GcReport) -> Iterable[str]:
    """Lines for humans."""
    verb = "would free" if report.dry_run else "freed"
    yield (
        f"{report.reachable_objects} objects reachable, {report.unreachable_objects} unreachable "
        f"({report.young_objects} younger than the grace period, kept)"
    )
    if report.deferred_objects:
        yield (
            f"{report.deferred_objects} objects deferred: {len(report.waiting_for)} writers that started "
            f"before this run are still running; the next gc deletes them"
        )
    if report.revived_objects:
        yield f"{report.revived_objects} objects kept: writers published them during the run"
    yield (
        f"packs: {report.packs_deleted} deleted ({report.packs_repacked} after repacking their live objects), "
        f"{report.packs_partly_dead} partly unreachable kept, {report.unindexed_packs_deleted} unindexed deleted"
    )
    yield f"{verb} {_human(report.freed)} ({report.dead_objects} objects)"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


# -- fsck --repair ----------------------------------------------------------------------------


@dataclass
class RepairReport:
    """What ``keepsake fsck --repair`` changed."""

    packs_reindexed: int = 0  # packs no readable index named, indexed again from their footers
    unreadable_packs: list[str] = field(default_factory=list)  # unindexed packs whose footer is damaged
    corrupt_indexes_removed: int = 0
    index_files_rewritten: int = 0  # index files that named packs that are gone
    doomed_lists_removed: int = 0  # undecodable doomed lists
    markers_removed: int = 0  # undecodable operation markers

    def lines(self) -> list[str]:
        out = [
            f"reindexed {self.packs_reindexed} packs from their footers",
            f"removed {self.corrupt_indexes_removed} undecodable index files",
            f"rewrote {self.index_files_rewritten} index files that named missing packs",
            f"removed {self.doomed_lists_removed} undecodable doomed lists and {self.markers_removed} undecodable markers",
        ]
        out += [f"pack {p} has a damaged footer: left in place (gc deletes it once old)" for p in self.unreadable_packs]
        return out


def repair(repo: Repository) -> RepairReport:
    """Rebuild what can be rebuilt, delete only what is provably not data (FORMAT.md §11).

    Index files are derived from pack footers: a pack that no readable index names gets a
    new index from its footer (its objects become visible again; if nothing reaches them,
    gc reclaims them), and only then are undecodable index files deleted. Entries naming
    packs that no longer exist are dropped (they would make writers skip re-storing those
    objects). Undecodable doomed lists and markers, which would stop every writer or hold
    gc back, are removed. Nothing a ref reaches is ever deleted. Runs under the gc lock.
    """
    storage = repo.storage
    report = RepairReport()
    lock = GcLock(storage)
    lock.acquire()
    try:
        bad: dict[str, str] = {}
        repo.objects.refresh(full=True, damaged=bad)
        files = repo.objects.index_files()
        indexed = {p for packs in files.values() for p in packs}
        recovered: dict[PackId, list[PackEntry]] = {}
        for info in storage.list("packs/"):
            pack_id = pack_id_of_key(info.key)
            if pack_id is None or pack_id in indexed:
                continue
            try:
                tail = storage.read_range(info.key, max(0, info.size - (1 << 20)), info.size)
                try:
                    entries = read_pack_footer(pack_id, tail, info.size)
                except CorruptObject as exc:
                    if "footer needs" not in exc.reason or len(tail) < TRAILER.size:
                        raise
                    entries = read_pack_footer(pack_id, storage.read(info.key), info.size)
            except CorruptObject:
                report.unreadable_packs.append(pack_id)
                continue
            recovered[pack_id] = entries
        rebuilt = ""
        if recovered:
            rebuilt, data = encode_index(recovered)
            storage.write(index_key(rebuilt), data)  # may overwrite a damaged file of that name
            report.packs_reindexed = len(recovered)
        for index_id in bad:
            if index_id != rebuilt:
                storage.delete(index_key(index_id))
        report.corrupt_indexes_removed = len(bad)
        run = _Run(repo, DEFAULT_GRACE, 0.0, None)
        files = run.index_files()  # before the packs: see _Run.tidy
        present = {p for info in storage.list("packs/") if (p := pack_id_of_key(info.key))}
        report.index_files_rewritten = run.rewrite_indexes(lambda pack: pack not in present, files)
        for info in storage.list(DOOMED):
            try:
                decode_doomed(storage.read(info.key), info.key)
            except CorruptObject:
                storage.delete(info.key)
                report.doomed_lists_removed += 1
            except KeyNotFound:
                continue
        for info in storage.list(SESSIONS):
            try:
                read_marker(storage.read(info.key), info.key)
            except CorruptObject:
                storage.delete(info.key)
                report.markers_removed += 1
            except KeyNotFound:
                continue
    finally:
        lock.release()
    return report
