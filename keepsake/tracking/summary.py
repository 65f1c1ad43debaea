"""Experiment summaries: what listing needs, per experiment and packed (FORMAT.md §14.4, §17).

``summaries/<experiment id>`` is derived data: it is rebuilt from the head, experiment and
checkpoint objects whenever it is missing or names a different head than the ref does.
Only the experiment's own process writes it (at start, at each checkpoint, on every
heartbeat, at stop), so it needs no locking.

``summaries/packed/<name>`` (the summary index) holds every experiment's summary and the
listed stamp of its ref, so that listing 1,000 experiments on an object store reads two
LISTs and one cached file instead of 2,000 keys. Refs stay the truth: see SummaryLoader.
"""

from __future__ import annotations

import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import xxhash

from keepsake.errors import CorruptObject, InvalidObjectId, KeyNotFound, StorageError
from keepsake.objects.envelope import seal, unseal
from keepsake.objects.ids import ID_BYTES, ObjectId, ObjectType, id_from_bytes, id_to_bytes, parse_object_id
from keepsake.objects.records import CheckpointRecord, ExperimentRecord, HeadRecord
from keepsake.objects.values import pack_values, unpack_values
from keepsake.repository import Repository
from keepsake.storage import KeyInfo

SUMMARY_VERSION = 1
PREFIX = "summaries/"


def summary_key(experiment_id: str) -> str:
    return PREFIX + experiment_id


@dataclass(frozen=True)
class CheckpointSummary:
    id: ObjectId
    step: int | None
    created: str
    metrics: dict[str, Any]
    primary_metric: tuple[str, str] | None
    path: str | None

    @classmethod
    def of(cls, object_id: ObjectId, record: CheckpointRecord) -> CheckpointSummary:
        return cls(object_id, record.step, record.created, record.metrics, record.primary_metric, record.path)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": id_to_bytes(self.id),
            "step": self.step,
            "created": self.created,
            "metrics": self.metrics,
            "primary_metric": list(self.primary_metric) if self.primary_metric else None,
            "path": self.path,
        }

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> CheckpointSummary:
        pm = doc.get("primary_metric")
        return cls(
            id_from_bytes(doc["id"]),
            doc.get("step"),
            doc["created"],
            doc.get("metrics") or {},
            (pm[0], pm[1]) if pm else None,
            doc.get("path"),
        )


@dataclass(frozen=True)
class Summary:
    """Everything ``ls`` shows about one experiment."""

    experiment: ObjectId
    head: ObjectId
    status: str
    created: str
    user: str
    host: str
    command: tuple[str, ...]
    params: dict[str, Any]
    path: str | None
    git: dict[str, Any] | None
    checkpoints: tuple[CheckpointSummary, ...] = ()
    heartbeat: float | None = None
    #: recorded from the command line (keepsake experiment start): no heartbeats expected
    detached: bool = False

    def encode(self) -> bytes:
        return pack_values(self.to_doc())

    def to_doc(self) -> dict[str, Any]:
        """The msgpack map of ``summaries/<id>`` (FORMAT.md §14.4), also one entry of a packed
        summary index (§17)."""
        return {
            "version": SUMMARY_VERSION,
            "experiment": id_to_bytes(self.experiment),
            "head": id_to_bytes(self.head),
            "status": self.status,
            "created": self.created,
            "user": self.user,
            "host": self.host,
            "command": list(self.command),
            "params": self.params,
            "path": self.path,
            "git": self.git,
            "checkpoints": [c.to_wire() for c in self.checkpoints],
            "heartbeat": self.heartbeat,
            "detached": self.detached,
        }

    @classmethod
    def decode(cls, data: bytes, key: str) -> Summary:
        return cls.from_doc(unpack_values(data, key), key)

    @classmethod
    def from_doc(cls, doc: Any, key: str) -> Summary:
        """Raises CorruptObject when ``doc`` is not a summary map."""
        try:
            if doc["version"] != SUMMARY_VERSION:
                raise ValueError(f"summary version {doc['version']}")
            return cls(
                experiment=id_from_bytes(doc["experiment"]),
                head=id_from_bytes(doc["head"]),
                status=doc["status"],
                created=doc["created"],
                user=doc["user"],
                host=doc["host"],
                command=tuple(doc["command"]),
                params=doc["params"],
                path=doc["path"],
                git=doc["git"],
                checkpoints=tuple(CheckpointSummary.from_wire(c) for c in doc["checkpoints"]),
                heartbeat=doc.get("heartbeat"),
                detached=bool(doc.get("detached", False)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CorruptObject(key, f"summary is malformed: {exc}") from exc

    @classmethod
    def of(
        cls,
        experiment_id: ObjectId,
        experiment: ExperimentRecord,
        head_id: ObjectId,
        head: HeadRecord,
        checkpoints: tuple[CheckpointSummary, ...],
        heartbeat: float | None = None,
    ) -> Summary:
        return cls(
            experiment=experiment_id,
            head=head_id,
            status=head.status,
            created=experiment.created,
            user=experiment.user,
            host=experiment.host,
            command=experiment.command,
            params=experiment.params,
            path=experiment.path,
            git=experiment.git,
            checkpoints=checkpoints,
            heartbeat=heartbeat,
        )

    def with_heartbeat(self, when: float) -> Summary:
        return replace(self, heartbeat=when)


@dataclass
class SummaryCache:
    """Reads summaries, rebuilding any that are missing or stale from the objects."""

    repo: Repository
    rebuilt: list[ObjectId] = field(default_factory=list)

    def load(self, experiment_id: ObjectId, head_id: ObjectId) -> Summary:
        key = summary_key(experiment_id)
        old: Summary | None = None
        try:
            old = Summary.decode(self.repo.storage.read(key), key)
            if old.head == head_id:
                return old
        except (KeyNotFound, CorruptObject):
            pass  # missing or damaged derived data: rebuilt below
        self.rebuilt.append(experiment_id)
        summary = build_summary(self.repo, head_id, old.heartbeat if old else None)
        return replace(summary, detached=old.detached) if old else summary


def build_summary(repo: Repository, head_id: ObjectId, heartbeat: float | None = None) -> Summary:
    """Build a summary from the objects a head names."""
    head = HeadRecord.decode(repo.objects.get(head_id, ObjectType.HEAD), head_id)
    experiment = ExperimentRecord.decode(repo.objects.get(head.experiment, ObjectType.EXPERIMENT), head.experiment)
    checkpoints = tuple(
        CheckpointSummary.of(cid, CheckpointRecord.decode(repo.objects.get(cid, ObjectType.CHECKPOINT), cid))
        for cid in head.checkpoints
    )
    return Summary.of(head.experiment, experiment, head_id, head, checkpoints, heartbeat)


# -- the summary index (FORMAT.md §17) -------------------------------------------------------

#: Where packed summary indexes live; each is named by the hash of its content.
PACKED_PREFIX = "summaries/packed/"
REFS_PREFIX = "refs/experiments/"
INDEX_VERSION = 1
#: A listing that had to read more refs than this (new, changed or unsettled entries, or
#: entries of deleted experiments) writes a new packed index: git's packed-refs, where
#: loose refs pile up until a pack folds them in.
PACK_THRESHOLD = 32
#: A ref's listed modification time identifies its version only once no later write can
#: share it: object stores report whole seconds (S3, moto), so a ref observed in the same
#: second as its last write may be rewritten unseen within that second. An entry keeps its
#: stamp only when the listing shows a write at least this much later than the ref's.
SETTLE_SECONDS = 2.0
#: Concurrent reads of refs and loose summaries on remote backends.
READ_WORKERS = 16

log = logging.getLogger("keepsake")


@dataclass(frozen=True)
class Stamp:
    """What a listing shows about one version of a ref key: size and modification time.

    Equal stamps mean an unchanged ref only for settled stamps (see SETTLE_SECONDS). Stored
    as ``["m", size, mtime]``; other kinds (a future ``["e", etag]``) never match this one.
    """

    size: int
    mtime: float

    @classmethod
    def of(cls, info: KeyInfo) -> Stamp | None:
        return None if info.mtime is None else cls(info.size, info.mtime)

    def to_wire(self) -> list[Any]:
        return ["m", self.size, self.mtime]

    @classmethod
    def from_wire(cls, value: Any) -> Stamp | None:
        if isinstance(value, list) and len(value) == 3 and value[0] == "m":
            size, mtime = value[1], value[2]
            if isinstance(size, int) and isinstance(mtime, (int, float)):
                return cls(size, float(mtime))
        return None  # nil (unsettled) or a kind this version does not produce


@dataclass(frozen=True)
class IndexEntry:
    """One experiment in a packed index: its summary (naming the head the ref held) and
    the settled stamp of the ref when that head was read, or None."""

    summary: Summary
    stamp: Stamp | None


@dataclass(frozen=True)
class SummaryIndex:
    """A packed summary index: every experiment's summary and ref stamp, in one file."""

    entries: dict[ObjectId, IndexEntry]

    def content(self) -> bytes:
        doc = {
            "version": INDEX_VERSION,
            "entries": [[e.stamp.to_wire() if e.stamp else None, _index_doc(e.summary)] for e in self.entries.values()],
        }
        return pack_values(doc)

    def encode(self) -> tuple[str, bytes]:
        """(key, envelope bytes): the key names the xxh3-128 of the content, seed 18."""
        content = self.content()
        name = xxhash.xxh3_128_hexdigest(content, seed=int(ObjectType.SUMMARY_INDEX))
        return PACKED_PREFIX + name, seal(ObjectType.SUMMARY_INDEX, content)

    @classmethod
    def decode(cls, data: bytes, key: str) -> SummaryIndex:
        """Raises CorruptObject: bad envelope, wrong type, content not matching the name."""
        otype, content = unseal(data, key)
        if otype != ObjectType.SUMMARY_INDEX:
            raise CorruptObject(key, f"envelope type {otype} is not a summary index ({int(ObjectType.SUMMARY_INDEX)})")
        if PACKED_PREFIX + xxhash.xxh3_128_hexdigest(content, seed=int(ObjectType.SUMMARY_INDEX)) != key:
            raise CorruptObject(key, "content does not hash to its name")
        # Decoding allocates ~10 objects per checkpoint (200,000 for 1,000 x 20) and none
        # of them form cycles: the cyclic collector would only rescan them, over and over
        # (measured: 20-30% of the decode time).
        collecting = gc.isenabled()
        gc.disable()
        try:
            doc = unpack_values(content, key)
            if doc["version"] != INDEX_VERSION:
                raise ValueError(f"summary index version {doc['version']}")
            entries = {}
            for stamp, summary_doc in doc["entries"]:
                summary = _summary_from_index_doc(summary_doc, key)
                entries[summary.experiment] = IndexEntry(summary, Stamp.from_wire(stamp))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptObject(key, f"summary index is malformed: {exc}") from exc
        finally:
            if collecting:
                gc.enable()
        return cls(entries)


@dataclass
class ListingStats:
    """What one :func:`load_summaries` call read and wrote (for tests and benchmarks)."""

    experiments: int = 0
    packed: str | None = None
    ref_reads: int = 0
    summary_reads: int = 0
    rebuilt: int = 0
    stale: int = 0
    written: str | None = None


def _index_doc(summary: Summary) -> dict[str, Any]:
    """A summary as a packed index holds it: the map of §14.4 with the checkpoints stored
    column by column (one list per field), which decodes in about half the time of one map
    per checkpoint: listing decodes every checkpoint of every experiment."""
    doc = summary.to_doc()
    cs = summary.checkpoints
    doc["checkpoints"] = {
        "id": b"".join(id_to_bytes(c.id) for c in cs),
        "step": [c.step for c in cs],
        "created": [c.created for c in cs],
        "metrics": [c.metrics for c in cs],
        "primary_metric": [list(c.primary_metric) if c.primary_metric else None for c in cs],
        "path": [c.path for c in cs],
    }
    return doc


def _summary_from_index_doc(doc: Any, key: str) -> Summary:
    try:
        columns = doc["checkpoints"]
        ids = columns["id"]
        steps, created, metrics = columns["step"], columns["created"], columns["metrics"]
        primary, paths = columns["primary_metric"], columns["path"]
        n = len(steps)
        if len(ids) != ID_BYTES * n or not len(created) == len(metrics) == len(primary) == len(paths) == n:
            raise ValueError("checkpoint columns of different lengths")
        checkpoints = tuple(
            CheckpointSummary(
                ObjectId(ids[i * ID_BYTES : (i + 1) * ID_BYTES].hex()),
                steps[i],
                created[i],
                metrics[i] or {},
                (primary[i][0], primary[i][1]) if primary[i] else None,
                paths[i],
            )
            for i in range(n)
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptObject(key, f"summary index entry is malformed: {exc}") from exc
    return replace(Summary.from_doc({**doc, "checkpoints": []}, key), checkpoints=checkpoints)


def _settled(stamp: Stamp | None, clock: float | None) -> Stamp | None:
    if stamp is None or clock is None or stamp.mtime + SETTLE_SECONDS > clock:
        return None
    return stamp


class SummaryLoader:
    """Reads every experiment's summary through the packed index (FORMAT.md §17).

    Refs stay the truth: the experiments are exactly the keys a LIST of
    ``refs/experiments/`` shows, and each summary names the head its ref holds. What the
    index saves is the reads: a ref whose listed stamp equals the settled stamp recorded in
    the newest packed index still holds the recorded head, so neither it nor the loose
    summary is read. Packed indexes never change, so remote repositories cache them locally.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.storage = repo.storage
        self.remote = repo.storage.backend not in ("local", "memory")
        self.cache = repo.cache if self.remote else None
        self.stats = ListingStats()

    # -- reading -------------------------------------------------------------------------------

    def load(self, pack: bool = True) -> dict[ObjectId, Summary]:
        """Every experiment's summary, by experiment id (in no particular order).

        Args:
            pack: write a new packed index when this listing found more than
                PACK_THRESHOLD entries stale (a failed write is logged, not raised: a
                reader may have no write access).
        """
        if self.remote:
            # The LIST of 1,000 refs is the slowest request (0.25 s on moto); loading and
            # decoding the index meanwhile takes ~0.1 s of this process's CPU.
            with ThreadPoolExecutor(max_workers=1) as pool:
                listing = pool.submit(self.storage.list, REFS_PREFIX)
                packed_infos = self.storage.list(PACKED_PREFIX)
                index = self._newest_index(packed_infos)
                ref_infos = listing.result()
        else:
            ref_infos = self.storage.list(REFS_PREFIX)
            packed_infos = self.storage.list(PACKED_PREFIX)
            index = self._newest_index(packed_infos)
        refs: dict[ObjectId, KeyInfo] = {}
        for info in ref_infos:
            try:
                refs[parse_object_id(info.key[len(REFS_PREFIX) :])] = info
            except InvalidObjectId:
                continue  # not an experiment ref (FORMAT.md §9 names them by id)
        # Every listed key was written before its listing, and both listings end before any
        # ref is read: the newest listed time bounds from below the server's clock at those
        # reads (see SETTLE_SECONDS).
        times = [i.mtime for i in (*refs.values(), *packed_infos) if i.mtime is not None]
        clock = max(times) if times else None
        entries = index.entries if index else {}

        heads: dict[ObjectId, ObjectId] = {}
        stamps: dict[ObjectId, Stamp | None] = {}
        unknown: list[ObjectId] = []
        for eid, info in refs.items():
            entry = entries.get(eid)
            stamp = Stamp.of(info)
            if entry is not None and entry.stamp is not None and entry.stamp == stamp:
                heads[eid] = entry.summary.head
                stamps[eid] = entry.stamp
            else:
                unknown.append(eid)
        for eid, data in zip(unknown, self._read_many([REFS_PREFIX + eid for eid in unknown])):
            if data is None:
                continue  # deleted since the listing
            heads[eid] = _parse_ref(eid, data)
            # the stamp listed before the read: if the ref moved in between, it will not
            # match next time, and the ref is read again
            stamps[eid] = _settled(Stamp.of(refs[eid]), clock)
        self.stats.ref_reads = len(unknown)
        self.stats.stale = len(unknown) + sum(1 for eid in entries if eid not in refs)

        def packed(eid: ObjectId) -> Summary | None:
            entry = entries.get(eid)
            return entry.summary if entry is not None and entry.summary.head == heads[eid] else None

        # Loose summaries: when the packed one is not for the current head, and for running
        # experiments, whose heartbeat (running or lost) only the loose summary keeps fresh.
        wanted = [
            eid
            for eid in heads
            if (s := packed(eid)) is None or (s.status == "running" and not s.detached)
        ]
        loose: dict[ObjectId, Summary] = {}
        for eid, data in zip(wanted, self._read_many([summary_key(eid) for eid in wanted])):
            if data is None:
                continue
            try:
                summary = Summary.decode(data, summary_key(eid))
            except CorruptObject as exc:
                log.warning("keepsake: ignoring summary %s (derived data, rebuilt): %s", eid, exc.reason)
                continue
            if summary.experiment == eid:
                loose[eid] = summary
        self.stats.summary_reads = len(wanted)

        out: dict[ObjectId, Summary] = {}
        for eid, head in heads.items():
            out[eid] = self._choose(eid, head, packed(eid), loose.get(eid), entries.get(eid))
        self.stats.experiments = len(out)
        if pack and self.stats.stale > PACK_THRESHOLD:
            self._write_index(out, stamps, packed_infos)
        return out

    def _choose(
        self, eid: ObjectId, head: ObjectId, packed: Summary | None, loose: Summary | None, entry: IndexEntry | None
    ) -> Summary:
        if loose is not None and loose.head == head:
            return loose
        if packed is not None:
            # the loose summary may name an older head (a heartbeat written by a process that
            # had not seen a `keepsake rm`) and still carry the newest heartbeat
            if loose is not None and (loose.heartbeat or 0) > (packed.heartbeat or 0):
                return replace(packed, heartbeat=loose.heartbeat)
            return packed
        # neither is for the ref's head (a writer crashed between ref and summary, or another
        # process moved the ref): rebuild from the objects, keeping what only summaries know
        self.stats.rebuilt += 1
        old = loose or (entry.summary if entry else None)
        summary = build_summary(self.repo, head, old.heartbeat if old else None)
        return replace(summary, detached=old.detached) if old else summary

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        """The values of ``keys`` (None for a missing key), concurrently on remote backends."""

        def read(key: str) -> bytes | None:
            try:
                return self.storage.read(key)
            except KeyNotFound:
                return None

        if not self.remote or len(keys) < 2:
            return [read(k) for k in keys]
        try:
            return list(self.storage.read_many(keys))
        except KeyNotFound:
            pass  # one vanished since the listing (rare): read them one by one to tell which
        with ThreadPoolExecutor(max_workers=min(READ_WORKERS, len(keys))) as pool:
            return list(pool.map(read, keys))

    def _newest_index(self, infos: list[KeyInfo]) -> SummaryIndex | None:
        """The newest packed index (by listed time), from the local cache when it has it.

        Another process may delete it between our listing and our read (it wrote a newer
        one): then list again, once.
        """
        for attempt in range(2):
            if not infos:
                return None
            newest = max(infos, key=lambda i: (i.mtime or 0.0, i.key))
            data = self.cache.get(newest.key) if self.cache else None
            cached = data is not None
            if data is None:
                try:
                    data = self.storage.read(newest.key)
                except KeyNotFound:
                    if attempt == 0:
                        infos = self.storage.list(PACKED_PREFIX)
                    continue
            try:
                index = SummaryIndex.decode(data, newest.key)
            except CorruptObject as exc:
                # derived data: listing goes on without it, and the next pack replaces it
                log.warning("keepsake: ignoring summary index %s: %s", newest.key, exc.reason)
                return None
            if self.cache and not cached:
                self.cache.put(newest.key, data)
            self.stats.packed = newest.key
            return index
        return None

    # -- packing -------------------------------------------------------------------------------

    def _write_index(
        self, summaries: dict[ObjectId, Summary], stamps: dict[ObjectId, Stamp | None], old: list[KeyInfo]
    ) -> None:
        """Write a packed index of ``summaries``, then delete the packed indexes listed before.

        The new file is complete before any old one goes, so readers always find one; two
        packers at once leave two files, and the next pack removes both.
        """
        index = SummaryIndex({eid: IndexEntry(s, stamps.get(eid)) for eid, s in summaries.items()})
        key, data = index.encode()
        try:
            self.storage.write(key, data, durable=False)
            if self.cache:
                self.cache.put(key, data)
            for info in old:
                if info.key != key:
                    self.storage.delete(info.key)
        except StorageError as exc:  # e.g. read-only credentials: listing still succeeded
            log.warning("keepsake: could not update the summary index: %s", exc)
            return
        self.stats.written = key


def _parse_ref(eid: ObjectId, data: bytes) -> ObjectId:
    try:
        return parse_object_id(data.decode("ascii").strip())
    except (UnicodeDecodeError, InvalidObjectId) as exc:
        raise CorruptObject(f"ref experiments/{eid}", "its value is not an object id") from exc


def load_summaries(repo: Repository, pack: bool = True) -> tuple[dict[ObjectId, Summary], ListingStats]:
    """Every experiment's summary (see :class:`SummaryLoader`), and what it cost."""
    loader = SummaryLoader(repo)
    return loader.load(pack), loader.stats
