"""Maintenance over a whole repository: fsck and object counts (FORMAT.md §11)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from keepsake.errors import CorruptObject, KeyNotFound
from keepsake.objects.envelope import open_object
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.manifests import Blob
from keepsake.objects.records import CheckpointRecord, HeadRecord, referenced_ids
from keepsake.objects.pack import PackEntry, PackId, pack_id_of_key, pack_key
from keepsake.repository import Repository


@dataclass
class Problem:
    """One damaged or suspicious thing fsck found."""

    kind: str  # missing | corrupt | unreachable | broken-ref | unindexed-pack | corrupt-pack
    id: str
    type: str
    detail: str

    def line(self) -> str:
        return f"{self.kind} {self.type} {self.id}" + (f": {self.detail}" if self.detail else "")


@dataclass
class FsckReport:
    objects_checked: int = 0
    bytes_checked: int = 0
    refs_checked: int = 0
    reachable: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: experiments, checkpoints and refs that reach damaged objects, one line each
    affected: list[str] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        """True when something reachable from a ref is missing or corrupt, a ref is broken,
        or an index file does not decode (readers and writers stop at it)."""
        return any(p.kind in ("missing", "corrupt", "broken-ref", "corrupt-index") for p in self.problems)

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]


def fsck(repo: Repository, progress: Callable[[str], None] | None = None) -> FsckReport:
    """Read and verify every stored object, then walk everything reachable from refs.

    Reports objects that are referenced but missing, objects whose bytes do not decode or
    hash to their id, broken refs, unreachable objects and packs no index names.
    """
    report = FsckReport()
    db = repo.objects
    bad_indexes: dict[str, str] = {}
    db.refresh(full=True, damaged=bad_indexes)
    for index_id, reason in sorted(bad_indexes.items()):
        report.problems.append(Problem("corrupt-index", index_id, "index", reason))
    entries = db.entries()  # the copy of each object that readers use
    # every copy an index names (an object may be in several packs: gc's repacking, two
    # writers storing it at once); only damage to the copy readers use is damage
    copies: dict[PackId, dict[ObjectId, PackEntry]] = defaultdict(dict)
    for packs in db.index_files().values():
        for named, pack_entries in packs.items():
            for e in pack_entries:
                copies[named][e.id] = e
    by_pack: dict[PackId, list[PackEntry]] = {named: list(members.values()) for named, members in copies.items()}

    def note_damage(e: PackEntry, reason: str) -> None:
        if entries.get(e.id) == e:
            damage[e.id] = reason
        else:
            report.problems.append(Problem("corrupt-copy", e.id, e.type.label, f"a spare copy in pack {e.pack}: {reason}"))

    listed = {pid: info.size for info in repo.storage.list("packs/") if (pid := pack_id_of_key(info.key))}

    damage: dict[ObjectId, str] = {}
    contents: dict[ObjectId, bytes] = {}
    for n, (pack_id, pentries) in enumerate(sorted(by_pack.items())):
        if progress:
            progress(f"checking pack {n + 1}/{len(by_pack)}")
        if pack_id not in listed:
            for e in pentries:
                note_damage(e, f"its pack {pack_id} is missing")
            continue
        try:
            data = repo.storage.read(pack_key(pack_id))
        except KeyNotFound:
            for e in pentries:
                note_damage(e, f"its pack {pack_id} is missing")
            continue
        if xxhash.xxh3_128_hexdigest(data) != pack_id:
            report.problems.append(Problem("corrupt-pack", pack_id, "pack", "pack bytes do not hash to its name"))
        for e in pentries:
            report.objects_checked += 1
            if e.end > len(data):
                note_damage(e, f"its pack {pack_id} is truncated")
                continue
            try:
                otype, content = open_object(data[e.offset : e.end], e.id)
            except CorruptObject as exc:
                note_damage(e, exc.reason)
                continue
            report.bytes_checked += len(content)
            if otype != e.type:
                note_damage(e, f"stored as a {otype.label}, indexed as a {e.type.label}")
            elif otype != ObjectType.CHUNK:
                contents[e.id] = content

    stack: list[tuple[ObjectId, ObjectType | None, str]] = []
    for info in repo.storage.list("refs/"):
        name = info.key[len("refs/") :]
        report.refs_checked += 1
        try:
            target = repo.refs.get(name)
        except (CorruptObject, KeyNotFound) as exc:
            report.problems.append(Problem("broken-ref", name, "ref", str(exc)))
            continue
        if target not in entries:
            report.problems.append(Problem("broken-ref", name, "ref", f"points at missing object {target}"))
            continue
        stack.append((target, None, f"ref {name}"))

    reachable: set[ObjectId] = set()
    while stack:
        oid, expected, referrer = stack.pop()
        if oid in reachable:
            continue
        reachable.add(oid)
        entry = entries.get(oid)
        label = expected.label if expected else "object"
        if entry is None:
            report.problems.append(Problem("missing", oid, label, f"referenced by {referrer}"))
            continue
        if oid in damage:
            report.problems.append(Problem("corrupt", oid, entry.type.label, f"{damage[oid]} (referenced by {referrer})"))
            continue
        if expected is not None and entry.type != expected:
            report.problems.append(
                Problem("corrupt", oid, entry.type.label, f"{referrer} expects a {expected.label}")
            )
            continue
        if oid in contents:
            try:
                refs = referenced_ids(entry.type, contents[oid], oid)
            except CorruptObject as exc:
                report.problems.append(Problem("corrupt", oid, entry.type.label, exc.reason))
                continue
            stack.extend((child, ctype, f"{entry.type.label} {oid}") for child, ctype in refs)
    report.reachable = len(reachable)

    for oid, e in sorted(entries.items()):
        if oid not in reachable:
            # FIX: damage found in an unreachable object used to be dropped here, so fsck
            # said "ok" with every pack gone; keep the reason (exit status is unchanged:
            # only reachable damage counts, see FsckReport.damaged).
            report.problems.append(Problem("unreachable", oid, e.type.label, damage.get(oid, "")))
    for pack_id in sorted(set(listed) - set(by_pack)):
        report.problems.append(Problem("unindexed-pack", pack_id, "pack", "no index names it (left by an interrupted write)"))
    damaged_ids = {ObjectId(p.id) for p in report.problems if p.kind in ("missing", "corrupt")}
    if damaged_ids:
        report.affected = _affected(repo, contents, damaged_ids)
    return report


def _affected(repo: Repository, contents: dict[ObjectId, bytes], damaged: set[ObjectId]) -> list[str]:
    """Which experiments and checkpoints (and other refs) reach a damaged object."""

    def reaches(root: ObjectId, root_type: ObjectType) -> bool:
        stack, seen = [(root, root_type)], set()
        while stack:
            oid, otype = stack.pop()
            if oid in damaged:
                return True
            if oid in seen or oid not in contents:
                continue
            seen.add(oid)
            try:
                stack.extend(referenced_ids(otype, contents[oid], oid))
            except CorruptObject:
                return True
        return False

    lines = []
    for name, target in sorted(repo.refs.list().items()):
        if target not in contents and target not in damaged:
            continue
        if target in damaged:
            lines.append(f"ref {name}: its target {target} is damaged")
            continue
        try:
            head = HeadRecord.decode(contents[target], target) if name.startswith("experiments/") else None
        except CorruptObject:
            head = None
        if head is None:
            if reaches(target, repo.objects.locate(target).type):
                lines.append(f"ref {name} reaches damaged objects")
            continue
        if reaches(head.experiment, ObjectType.EXPERIMENT):
            lines.append(f"experiment {head.experiment[:7]}: its record or code is damaged")
        for cid in head.checkpoints:
            if reaches(cid, ObjectType.CHECKPOINT):
                step = ""
                if cid in contents:
                    try:
                        record = CheckpointRecord.decode(contents[cid], cid)
                        step = f" (step {record.step})" if record.step is not None else ""
                    except CorruptObject:
                        pass  # the record itself is what is damaged; the line says so below
                lines.append(f"experiment {head.experiment[:7]}: checkpoint {cid[:7]}{step} cannot be restored")
    return lines


@dataclass
class ObjectCounts:
    objects: dict[str, int]
    packs: int
    pack_bytes: int
    index_files: int
    index_bytes: int
    unique_bytes: int  # uncompressed bytes of all distinct chunks and inline files
    logical_bytes: int  # sum of the sizes of all distinct files (blobs)

    @property
    def stored_bytes(self) -> int:
        return self.pack_bytes + self.index_bytes

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.stored_bytes / self.unique_bytes if self.unique_bytes else 1.0


def count_objects(repo: Repository) -> ObjectCounts:
    """Count objects by type and sum stored, unique and logical bytes."""
    db = repo.objects
    db.refresh()
    entries = db.entries()
    counts: dict[str, int] = defaultdict(int)
    unique = 0
    blobs = []
    for e in entries.values():
        counts[e.type.label] += 1
        if e.type == ObjectType.CHUNK:
            unique += e.raw_length
        elif e.type == ObjectType.BLOB:
            blobs.append(e)
    logical = 0
    for e, envelope in zip(blobs, db.read_envelopes(blobs)):
        blob = Blob.decode(open_object(envelope, e.id)[1], e.id)
        logical += blob.size
        if blob.inline is not None:
            unique += blob.size
    packs = [i for i in repo.storage.list("packs/") if pack_id_of_key(i.key)]
    indexes = repo.storage.list("index/")
    return ObjectCounts(
        dict(counts),
        len(packs),
        sum(i.size for i in packs),
        len(indexes),
        sum(i.size for i in indexes),
        unique,
        logical,
    )
