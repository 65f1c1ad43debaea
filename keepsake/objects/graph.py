"""Walking the object graph: everything reachable from a set of roots (refs).

gc, fsck and du all need the same walk. It reads every non-chunk object it reaches (records,
trees, blob manifests) in batches of coalesced ranged reads and verifies each one; chunks are
leaves, known from their blob's manifest and never read. Objects the walk reaches but cannot
find or decode are reported, never skipped silently: gc must not run on a graph it could not
see whole, or it would take what lies below a damaged object for garbage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from keepsake.errors import CorruptObject
from keepsake.objects.database import ObjectDB
from keepsake.objects.envelope import open_object
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.pack import PackEntry
from keepsake.objects.records import referenced_ids

#: non-chunk objects read per batch (their envelopes are small: records, trees, manifests)
BATCH = 2048

Root = tuple[ObjectId, ObjectType | None, str]


@dataclass
class Reachable:
    """What a walk found. ``parents`` maps each object to one object (or ref) that refers
    to it, for messages that say what a damaged object belongs to."""

    objects: set[ObjectId] = field(default_factory=set)
    missing: dict[ObjectId, str] = field(default_factory=dict)
    corrupt: dict[ObjectId, str] = field(default_factory=dict)
    parents: dict[ObjectId, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.corrupt


#: ``visit(entry, type, content, children)``: called once for each object the walk reads
Visitor = Callable[[PackEntry, ObjectType, bytes, list[tuple[ObjectId, ObjectType]]], None]


def walk(
    db: ObjectDB,
    roots: Iterable[Root],
    entries: dict[ObjectId, PackEntry] | None = None,
    visit: Visitor | None = None,
    progress: Callable[[str], None] | None = None,
) -> Reachable:
    """Everything reachable from ``roots`` (id, expected type or None, who refers to it),
    level by level: each level's objects are read in batches of coalesced ranged reads.

    ``entries`` is the index snapshot to walk in (default: the database's current one).
    ``visit`` sees every object read (all but chunks) with its decoded content and the
    objects it points at, so callers that need more than reachability (du) decode nothing
    twice.
    """
    index = db.entries() if entries is None else entries
    out = Reachable()
    frontier: list[Root] = list(roots)
    level = 0
    while frontier:
        level += 1
        to_read: list[tuple[PackEntry, str]] = []
        for oid, expected, referrer in frontier:
            if oid in out.objects:
                continue
            out.objects.add(oid)
            out.parents[oid] = referrer
            entry = index.get(oid)
            if entry is None:
                out.missing[oid] = f"referenced by {referrer}"
                continue
            if expected is not None and entry.type != expected:
                out.corrupt[oid] = f"{referrer} expects a {expected.label}, found a {entry.type.label}"
                continue
            if entry.type != ObjectType.CHUNK:
                to_read.append((entry, referrer))
        frontier = []
        if progress and to_read:
            progress(f"reading {len(to_read)} objects (level {level})")
        for start in range(0, len(to_read), BATCH):
            batch = to_read[start : start + BATCH]
            envelopes: list[bytes | None]
            try:
                envelopes = list(db.read_metadata([e for e, _ in batch]))
            except CorruptObject:
                envelopes = [_read_or_none(db, e) for e, _ in batch]
            for (entry, referrer), envelope in zip(batch, envelopes):
                if envelope is None:
                    out.corrupt[entry.id] = f"its pack {entry.pack} is missing or truncated (referenced by {referrer})"
                    continue
                try:
                    otype, content = open_object(envelope, entry.id)
                    children = referenced_ids(otype, content, entry.id)
                except CorruptObject as exc:
                    out.corrupt[entry.id] = f"{exc.reason} (referenced by {referrer})"
                    continue
                if visit is not None:
                    visit(entry, otype, content, children)
                label = f"{otype.label} {entry.id}"
                frontier.extend((child, ctype, label) for child, ctype in children)
    return out


def _read_or_none(db: ObjectDB, entry: PackEntry) -> bytes | None:
    try:
        return db.read_metadata([entry])[0]
    except CorruptObject:
        return None
