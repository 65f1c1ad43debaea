"""fsck and count_objects on repositories built (and damaged) on purpose."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from keepsake.maintenance import FsckReport, Problem, count_objects, fsck
from keepsake.objects.envelope import seal
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.manifests import MODE_FILE, Blob, Tree, TreeEntry
from keepsake.objects.pack import PackBuilder, pack_key
from keepsake.objects.worktree import write_tree
from keepsake.repository import Repository

BackendURL = tuple[str, dict[str, Any]]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))


def make_files(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "small.txt").write_bytes(b"s" * 100)
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(random.Random(21).randbytes(100_000))
    (root / "sub" / "same.txt").write_bytes(b"s" * 100)  # the same blob as small.txt


def tagged_repo(url: str, options: dict[str, Any], files: Path) -> tuple[Repository, ObjectId, Tree]:
    repo = Repository.init(url, options)
    with repo.objects.writer() as writer:
        tree_id, tree = write_tree(writer, repo.chunker, str(files))
    repo.refs.set("tags/base", tree_id, None)
    return repo, tree_id, tree


@pytest.fixture
def local(tmp_path: Path) -> tuple[Repository, ObjectId, Tree]:
    make_files(tmp_path / "files")
    return tagged_repo(str(tmp_path / "repo"), {}, tmp_path / "files")


def kinds(report: FsckReport) -> list[str]:
    return sorted(p.kind for p in report.problems)


def put(repo: Repository, otype: ObjectType, data: bytes) -> ObjectId:
    with repo.objects.writer() as writer:
        return writer.put(otype, data)


def flip_in(repo: Repository, object_id: ObjectId) -> None:
    """Flip one byte in the middle of a stored object (local repository)."""
    entry = repo.objects.locate(object_id)
    path = Path(repo.url) / pack_key(entry.pack)
    data = bytearray(path.read_bytes())
    data[entry.offset + entry.length // 2] ^= 0x04
    path.write_bytes(data)


# --------------------------------------------------------------------------- fsck


def test_fsck_clean(backend_url: BackendURL, tmp_path: Path) -> None:
    make_files(tmp_path / "files")
    repo, tree_id, _ = tagged_repo(*backend_url, tmp_path / "files")
    steps: list[str] = []
    report = fsck(repo, progress=steps.append)
    entries = repo.objects.entries()
    assert report.problems == []
    assert not report.damaged
    assert report.objects_checked == len(entries) == report.reachable
    assert report.refs_checked == 1
    # every verified object's content: chunks + blob and tree manifests
    assert report.bytes_checked == sum(e.raw_length for e in entries.values())
    assert steps == ["checking pack 1/1"]


def test_fsck_missing_object(local: tuple[Repository, ObjectId, Tree]) -> None:
    repo, _, _ = local
    ghost = hash_object(ObjectType.BLOB, b"never stored")
    tree = Tree((TreeEntry("ghost.bin", MODE_FILE, 5, ghost),))
    tree_id = put(repo, ObjectType.TREE, tree.encode())
    repo.refs.set("tags/ghost", tree_id, None)
    report = fsck(repo)
    assert report.problems == [Problem("missing", ghost, "blob", f"referenced by tree {tree_id}")]
    assert report.damaged
    assert report.problems[0].line() == f"missing blob {ghost}: referenced by tree {tree_id}"


def test_fsck_corrupt_object(local: tuple[Repository, ObjectId, Tree]) -> None:
    repo, _, tree = local
    small = tree.get("small.txt")
    assert small is not None and small.id is not None
    flip_in(repo, small.id)
    report = fsck(repo)
    assert report.damaged
    corrupt = report.of_kind("corrupt")
    assert [p.id for p in corrupt] == [small.id]
    assert corrupt[0].type == "blob"
    # referenced by two trees (root and sub): named by whichever the walk reached first
    assert corrupt[0].detail.endswith(")") and "(referenced by tree " in corrupt[0].detail
    assert len(report.of_kind("corrupt-pack")) == 1
    # the other objects were still verified
    assert report.objects_checked == len(repo.objects.entries())


def test_fsck_object_of_the_wrong_type(local: tuple[Repository, ObjectId, Tree]) -> None:
    repo, tree_id, _ = local
    # a tree entry of file mode whose id names a tree
    liar = Tree((TreeEntry("file", MODE_FILE, 1, tree_id),))
    liar_id = put(repo, ObjectType.TREE, liar.encode())
    repo.refs.set("tags/liar", liar_id, None)
    report = fsck(repo)
    assert report.damaged
    assert [p for p in report.problems if p.kind == "corrupt"] == [
        Problem("corrupt", tree_id, "tree", f"tree {liar_id} expects a blob")
    ]


def test_fsck_unreachable(local: tuple[Repository, ObjectId, Tree]) -> None:
    repo, _, _ = local
    loose = put(repo, ObjectType.BLOB, Blob(4, (), b"lost").encode())
    report = fsck(repo)
    assert not report.damaged
    assert report.problems == [Problem("unreachable", loose, "blob", "")]
    assert report.reachable == len(repo.objects.entries()) - 1


def test_fsck_unreachable_damage_is_described(local: tuple[Repository, ObjectId, Tree]) -> None:
    """Fixed in maintenance.py: damage in unreachable objects was dropped."""
    repo, _, _ = local
    loose = put(repo, ObjectType.BLOB, Blob(4, (), b"lost").encode())
    flip_in(repo, loose)
    report = fsck(repo)
    assert not report.damaged  # only reachable damage fails fsck (docs/FORMAT.md §11)
    [problem] = report.of_kind("unreachable")
    assert problem.id == loose
    assert problem.detail != ""


def test_fsck_unindexed_pack(local: tuple[Repository, ObjectId, Tree]) -> None:
    """A pack with no index: what an interrupted write leaves (pack stored, index not)."""
    repo, _, _ = local
    content = b"orphan object"
    oid = hash_object(ObjectType.CHUNK, content)
    builder = PackBuilder(1 << 16)
    envelope = seal(ObjectType.CHUNK, content)
    builder.add(oid, ObjectType.CHUNK, len(content), envelope)
    pack_id, data, _, _ = builder.finish()
    repo.storage.write(pack_key(pack_id), bytes(data))
    report = fsck(repo)
    assert report.problems == [
        Problem("unindexed-pack", pack_id, "pack", "no index names it (left by an interrupted write)")
    ]
    assert not report.damaged
    assert oid not in repo.objects.entries()


def test_fsck_broken_refs(local: tuple[Repository, ObjectId, Tree]) -> None:
    repo, _, _ = local
    repo.storage.write("refs/tags/garbage", b"not an object id\n")
    ghost = hash_object(ObjectType.TREE, b"nothing")
    repo.refs.set("tags/dangling", ghost, None)
    report = fsck(repo)
    assert report.damaged
    assert report.refs_checked == 3
    broken = {p.id: p for p in report.of_kind("broken-ref")}
    assert set(broken) == {"tags/garbage", "tags/dangling"}
    assert "not an object id" in broken["tags/garbage"].detail
    assert broken["tags/dangling"].detail == f"points at missing object {ghost}"
    assert kinds(report) == ["broken-ref", "broken-ref"]


def test_fsck_missing_pack(local: tuple[Repository, ObjectId, Tree]) -> None:
    repo, tree_id, _ = local
    for pack in (Path(repo.url) / "packs").rglob("*.pack"):
        pack.unlink()
    report = fsck(repo)
    assert report.damaged
    assert report.objects_checked == 0
    [problem] = report.of_kind("corrupt")  # the walk stops at the root tree
    assert (problem.id, problem.type) == (tree_id, "tree")
    assert "is missing" in problem.detail
    # everything below it is now unreachable, each with the reason it is lost
    lost = report.of_kind("unreachable")
    assert len(lost) == len(repo.objects.entries()) - 1
    assert all(p.detail.startswith("its pack ") and p.detail.endswith(" is missing") for p in lost)


def test_fsck_corrupt_pack_footer_only(local: tuple[Repository, ObjectId, Tree]) -> None:
    """Damage outside every object (here: the footer) fails the pack hash only."""
    repo, _, _ = local
    [pack] = list((Path(repo.url) / "packs").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[-20] ^= 0x01
    pack.write_bytes(data)
    report = fsck(repo)
    assert kinds(report) == ["corrupt-pack"]
    assert report.problems[0].id == pack.stem
    assert not report.damaged


# ------------------------------------------------------------------ count_objects


def test_count_objects_numbers(backend_url: BackendURL, tmp_path: Path) -> None:
    files = tmp_path / "files"
    make_files(files)
    repo, _, tree = tagged_repo(*backend_url, files)
    big = repo.objects.get_blob(tree.get("big.bin").id)  # type: ignore[union-attr,arg-type]
    chunk_bytes = sum(n for _, n in big.chunks)
    assert chunk_bytes == 100_000

    counts = count_objects(repo)
    # blobs: small (== sub/same), empty, big; trees: root, sub
    assert counts.objects == {"blob": 3, "tree": 2, "chunk": len(big.chunks)}
    assert counts.logical_bytes == 100 + 0 + 100_000
    assert counts.unique_bytes == chunk_bytes + 100 + 0
    assert counts.dedup_ratio == 1.0
    packs = [i for i in repo.storage.list("packs/")]
    indexes = repo.storage.list("index/")
    assert (counts.packs, counts.index_files) == (len(packs), len(indexes)) == (1, 1)
    assert counts.pack_bytes == sum(i.size for i in packs)
    assert counts.index_bytes == sum(i.size for i in indexes)
    assert counts.stored_bytes == counts.pack_bytes + counts.index_bytes
    assert counts.compression_ratio == counts.stored_bytes / counts.unique_bytes

    # the same big file under another name, with a different tail: mostly deduplicated
    (files / "big2.bin").write_bytes((files / "big.bin").read_bytes() + b"more")
    with repo.objects.writer() as writer:
        write_tree(writer, repo.chunker, str(files))
    again = count_objects(repo)
    assert again.logical_bytes == counts.logical_bytes + 100_004
    assert counts.unique_bytes < again.unique_bytes < counts.unique_bytes + 100_004
    assert again.dedup_ratio == again.logical_bytes / again.unique_bytes > 1.3
    assert again.packs == 2 and again.index_files == 2


def test_count_objects_empty(tmp_path: Path) -> None:
    counts = count_objects(Repository.init(str(tmp_path / "repo")))
    assert counts.objects == {}
    assert (counts.packs, counts.pack_bytes, counts.index_files, counts.index_bytes) == (0, 0, 0, 0)
    assert (counts.unique_bytes, counts.logical_bytes) == (0, 0)
    assert counts.dedup_ratio == 1.0 and counts.compression_ratio == 1.0


def test_count_objects_ignores_unindexed_objects_but_counts_the_pack(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"))
    builder = PackBuilder(1 << 16)
    builder.add(hash_object(ObjectType.CHUNK, b"x"), ObjectType.CHUNK, 1, seal(ObjectType.CHUNK, b"x"))
    pack_id, data, _, _ = builder.finish()
    repo.storage.write(pack_key(pack_id), bytes(data))
    counts = count_objects(repo)
    assert counts.objects == {}
    assert counts.packs == 1 and counts.pack_bytes == len(data)


def test_problem_line() -> None:
    assert Problem("unreachable", "abc", "blob", "").line() == "unreachable blob abc"
    assert Problem("corrupt", "abc", "tree", "why").line() == "corrupt tree abc: why"


def test_a_second_copy_of_an_object_in_another_pack_is_not_an_unindexed_pack(tmp_path: Path) -> None:
    """gc's repacking (or two writers at once) can leave an object in two packs, both indexed."""
    repo = Repository.init(str(tmp_path / "repo"))
    oid = put(repo, ObjectType.CHUNK, b"weights" * 1000)
    entry = repo.objects.locate(oid)
    envelope = repo.objects.read_envelopes([entry])[0]
    with repo.objects.writer(pack_size=1 << 20) as writer:
        writer.put_sealed(entry, envelope, dedup=False)
        writer.put(ObjectType.CHUNK, b"other" * 100)  # a different pack content than the first
    report = fsck(Repository.open(str(tmp_path / "repo")))
    assert kinds(report) == ["unreachable", "unreachable"]
    assert report.objects_checked == 3
