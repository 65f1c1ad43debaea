"""Disk usage: what the repository stores, and what each experiment alone holds (``keepsake du``).

Every stored object is attributed to the *owners* whose refs reach it: each experiment (its
``experiments/<id>`` ref, plus the tags naming it or one of its current checkpoints, since
``keepsake rm`` removes those with it) and "other refs" (any other tag or ref). An object
reached by exactly one owner is that owner's *unique* bytes: what deleting the owner lets gc
free. Objects reached by several owners are *shared*; objects no ref reaches are
*unreachable* (garbage that gc reclaims once its grace period is over).

Sizes are stored bytes: an object's envelope in its pack (compressed), from the index entry.
Only manifests and records are read (in batches, with ranged reads); chunks never are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from keepsake.errors import CorruptObject
from keepsake.objects.graph import walk
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.manifests import Tree
from keepsake.objects.pack import PackEntry, pack_id_of_key
from keepsake.repository import Repository

EXPERIMENTS = "experiments/"
TAGS = "tags/"


@dataclass
class OwnerUsage:
    """The bytes one experiment (or the group of other refs) holds.

    Attributes:
        name: the experiment id, or ``"other refs"``.
        refs: the refs that make this owner (its experiment ref and tags, or the others).
        checkpoints: checkpoints in the experiment's head (0 for other refs).
        logical_bytes: size of its code snapshot plus the files of each checkpoint, counted
            once per checkpoint: what storing a full copy per checkpoint would take.
        stored_bytes: stored bytes of every object it reaches, shared ones included.
        unique_bytes: stored bytes of the objects only it reaches: what deleting it frees.
    """

    name: str
    refs: list[str] = field(default_factory=list)
    checkpoints: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0
    unique_bytes: int = 0

    @property
    def shared_bytes(self) -> int:
        """Stored bytes it reaches that some other owner reaches too."""
        return self.stored_bytes - self.unique_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "refs": sorted(self.refs),
            "checkpoints": self.checkpoints,
            "logical_bytes": self.logical_bytes,
            "stored_bytes": self.stored_bytes,
            "unique_bytes": self.unique_bytes,
            "shared_bytes": self.shared_bytes,
        }


@dataclass
class RepositoryUsage:
    """Usage of a whole repository (``keepsake du``).

    Attributes:
        experiments: one entry per experiment, most unique bytes first.
        other: what refs that belong to no experiment hold (None when there are none).
        total_bytes: every key under the repository: packs, indexes, refs, summaries...
        pack_bytes, index_bytes: the pack files and index files among them.
        object_bytes: stored bytes of every indexed object (packs minus their headers and
            any bytes no index names).
        reachable_bytes: stored bytes of the objects some ref reaches.
        shared_bytes: stored bytes of the objects several owners reach.
        unreachable_bytes: stored bytes of the indexed objects no ref reaches.
        missing: objects a ref reaches that no index names (see ``keepsake fsck``).
    """

    experiments: list[OwnerUsage] = field(default_factory=list)
    other: OwnerUsage | None = None
    total_bytes: int = 0
    pack_bytes: int = 0
    index_bytes: int = 0
    object_bytes: int = 0
    reachable_bytes: int = 0
    shared_bytes: int = 0
    unreachable_bytes: int = 0
    missing: int = 0

    @property
    def logical_bytes(self) -> int:
        """The experiments' logical bytes added up: the size without any dedup."""
        return sum(e.logical_bytes for e in self.experiments)

    @property
    def unique_bytes(self) -> int:
        return sum(o.unique_bytes for o in self.owners)

    @property
    def owners(self) -> list[OwnerUsage]:
        return self.experiments + ([self.other] if self.other else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiments": [{"id": e.name, **e.to_dict()} for e in self.experiments],
            "other_refs": self.other.to_dict() if self.other else None,
            "total_bytes": self.total_bytes,
            "pack_bytes": self.pack_bytes,
            "index_bytes": self.index_bytes,
            "object_bytes": self.object_bytes,
            "logical_bytes": self.logical_bytes,
            "reachable_bytes": self.reachable_bytes,
            "unique_bytes": self.unique_bytes,
            "shared_bytes": self.shared_bytes,
            "unreachable_bytes": self.unreachable_bytes,
            "missing_objects": self.missing,
        }


@dataclass
class ObjectGraph:
    """The objects reachable from a set of roots, read once.

    Attributes:
        entries: every indexed object.
        children: for each reachable manifest or record, the objects it points at
            (a blob's chunks are in ``chunks`` instead).
        chunks: for each reachable blob, its distinct chunk ids.
        heads: each reachable head: its experiment and its checkpoints.
        files: each reachable checkpoint's tree of files (None when it saved none).
        code: each reachable experiment's code tree (None without one).
        sizes: logical size of each reachable tree (its files, recursively).
        missing: reachable ids that no index names.
    """

    entries: dict[ObjectId, PackEntry]
    children: dict[ObjectId, tuple[ObjectId, ...]] = field(default_factory=dict)
    chunks: dict[ObjectId, frozenset[ObjectId]] = field(default_factory=dict)
    heads: dict[ObjectId, tuple[ObjectId, tuple[ObjectId, ...]]] = field(default_factory=dict)
    files: dict[ObjectId, ObjectId | None] = field(default_factory=dict)
    code: dict[ObjectId, ObjectId | None] = field(default_factory=dict)
    sizes: dict[ObjectId, int] = field(default_factory=dict)
    missing: set[ObjectId] = field(default_factory=set)

    def reach(self, roots: Iterable[ObjectId]) -> set[ObjectId]:
        """Every object reachable from ``roots`` (missing ones left out).

        Manifests and records are walked one by one; a blob's chunks are added as a set
        (in C), since chunks are most of the objects and have no children.
        """
        seen: set[ObjectId] = set()
        chunk_ids: set[ObjectId] = set()
        stack = list(roots)
        while stack:
            oid = stack.pop()
            if oid in seen or oid not in self.entries:
                continue
            seen.add(oid)
            blob_chunks = self.chunks.get(oid)
            if blob_chunks is not None:
                chunk_ids.update(blob_chunks)
            stack.extend(c for c in self.children.get(oid, ()) if c not in seen)
        chunk_ids.difference_update(self.missing)
        seen.update(chunk_ids)
        return seen


def read_graph(
    repo: Repository, roots: Iterable[ObjectId], progress: Callable[[str], None] | None = None
) -> ObjectGraph:
    """Read every manifest and record reachable from ``roots`` (the graph walk that gc and
    fsck use, level by level in batched reads; chunks are never read), keeping what du needs
    of each object. Every object read is verified against its id.

    Raises:
        CorruptObject: a reachable object does not decode or hash to its id.
    """
    db = repo.objects
    db.refresh()
    graph = ObjectGraph(db.entries())

    def visit(entry: PackEntry, otype: ObjectType, content: bytes, typed: list[tuple[ObjectId, ObjectType]]) -> None:
        oid = entry.id
        if otype == ObjectType.BLOB:
            graph.chunks[oid] = frozenset(child for child, _ in typed)
            return  # chunks are not read: their stored size is in the index
        if otype == ObjectType.TREE:
            graph.sizes[oid] = Tree.decode(content, oid).size
        trees = [child for child, ctype in typed if ctype == ObjectType.TREE]
        if otype == ObjectType.HEAD:
            experiment = next(child for child, ctype in typed if ctype == ObjectType.EXPERIMENT)
            checkpoints = tuple(child for child, ctype in typed if ctype == ObjectType.CHECKPOINT)
            graph.heads[oid] = (experiment, checkpoints)
        elif otype == ObjectType.CHECKPOINT:
            graph.files[oid] = trees[0] if trees else None
        elif otype == ObjectType.EXPERIMENT:
            graph.code[oid] = trees[0] if trees else None
        graph.children[oid] = tuple(child for child, _ in typed)

    reach = walk(db, [(r, None, "a ref") for r in roots], graph.entries, visit, progress)
    if reach.corrupt:
        oid, why = next(iter(sorted(reach.corrupt.items())))
        raise CorruptObject(oid, why)
    graph.missing = set(reach.missing)
    return graph


def compute_usage(repo: Repository, progress: Callable[[str], None] | None = None) -> RepositoryUsage:
    """Measure the repository: totals, and what each experiment uniquely holds.

    Cost: one listing of the repository and of the refs, one read of every reachable
    manifest and record (batched), none of any chunk; then set operations over the
    objects each experiment reaches (in C for chunks, which are most of them).

    Raises:
        CorruptObject: a reachable manifest or record is damaged.
    """
    refs = repo.refs.list()
    experiment_refs = {name: target for name, target in refs.items() if _experiment_of(name)}
    graph = read_graph(repo, refs.values(), progress)

    # owners: each experiment (its ref, then the tags naming it or its checkpoints), then the rest
    owners: dict[str, OwnerUsage] = {}
    roots: dict[str, list[ObjectId]] = {}
    of_checkpoint: dict[ObjectId, str] = {}
    for name, head_id in sorted(experiment_refs.items()):
        eid = _experiment_of(name)
        assert eid is not None
        owners[eid] = OwnerUsage(eid, [name])
        roots[eid] = [head_id]
        head = graph.heads.get(head_id)
        if head is not None:
            owners[eid].checkpoints = len(head[1])
            for cid in head[1]:
                of_checkpoint.setdefault(cid, eid)
    other = OwnerUsage("other refs")
    other_roots: list[ObjectId] = []
    for name, target in sorted(refs.items()):
        if name in experiment_refs:
            continue
        owner = (target if target in owners else of_checkpoint.get(target)) if name.startswith(TAGS) else None
        if owner is not None:
            owners[owner].refs.append(name)
            roots[owner].append(target)
        else:
            other.refs.append(name)
            other_roots.append(target)

    sizes = {oid: e.length for oid, e in graph.entries.items()}
    count: Counter[ObjectId] = Counter()
    owner_of: dict[ObjectId, int] = {}
    ordered = list(owners.values()) + ([other] if other.refs else [])
    ordered_roots = [roots[o.name] for o in owners.values()] + ([other_roots] if other.refs else [])
    for n, (holder, holder_roots) in enumerate(zip(ordered, ordered_roots)):
        if progress and n % 100 == 0:
            progress(f"attributing objects ({n}/{len(ordered)} owners)")
        reached = graph.reach(holder_roots)
        count.update(reached)
        owner_of.update(dict.fromkeys(reached, n))
        holder.stored_bytes = sum(map(sizes.__getitem__, reached))
        if holder is not other:
            holder.logical_bytes = _logical_bytes(graph, holder_roots[0])
    usage = RepositoryUsage(missing=len(graph.missing))
    for oid, times in count.items():
        size = sizes[oid]
        usage.reachable_bytes += size
        if times == 1:
            ordered[owner_of[oid]].unique_bytes += size
        else:
            usage.shared_bytes += size
    usage.experiments = sorted(owners.values(), key=lambda o: (-o.unique_bytes, o.name))
    usage.other = other if other.refs else None
    usage.object_bytes = sum(sizes.values())
    usage.unreachable_bytes = usage.object_bytes - usage.reachable_bytes
    for info in repo.storage.list(""):
        usage.total_bytes += info.size
        if pack_id_of_key(info.key):
            usage.pack_bytes += info.size
        elif info.key.startswith("index/"):
            usage.index_bytes += info.size
    return usage


def _experiment_of(ref_name: str) -> str | None:
    """The experiment id of an ``experiments/<id>`` ref, else None."""
    if not ref_name.startswith(EXPERIMENTS):
        return None
    rest = ref_name[len(EXPERIMENTS) :]
    return rest if rest and "/" not in rest else None


def _logical_bytes(graph: ObjectGraph, head_id: ObjectId) -> int:
    """Code snapshot size plus each checkpoint's files, from the head's records."""
    head = graph.heads.get(head_id)
    if head is None:
        return 0
    experiment, checkpoints = head
    code = graph.code.get(experiment)
    total = graph.sizes.get(code, 0) if code else 0
    for cid in checkpoints:
        files = graph.files.get(cid)
        if files:
            total += graph.sizes.get(files, 0)
    return total
