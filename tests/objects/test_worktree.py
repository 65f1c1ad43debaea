"""Snapshots of directories into a repository and checkouts back: exact round trips,
ignore rules, errors, conflicts, and hostile trees that must not write outside the target."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash

from keepsake.errors import CheckoutConflict, CorruptObject, ObjectNotFound, PathNotFound, WrongObjectType
from keepsake.objects.chunking import Chunker, ChunkerParams
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.manifests import (
    INLINE_LIMIT,
    MODE_EXECUTABLE,
    MODE_FILE,
    MODE_SYMLINK,
    MODE_TREE,
    Blob,
    Tree,
)
from keepsake.objects.worktree import HashOnly, checkout_tree, write_blob_from_file, write_tree
from keepsake.repository import Repository

P = ChunkerParams()
MIN, AVG, MAX = P.min_size, P.avg_size, P.max_size
TINY = ChunkerParams(avg_size=256, min_size=64, max_size=1024)

Entry = tuple[Any, ...]


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = Repository.init(str(tmp_path / "repo"))
    yield r
    r.close()


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def store(repo: Repository, src: Path, chunker: Chunker | None = None, **kw: Any) -> tuple[ObjectId, Tree]:
    with repo.objects.writer() as w:
        return write_tree(w, chunker or repo.chunker, str(src), **kw)


def describe(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` (symlinks not followed): kind, content hash, exec bit / target."""
    out: dict[str, Entry] = {}

    def walk(path: str, rel: str) -> None:
        with os.scandir(path) as it:
            items = list(it)
        for item in items:
            r = rel + item.name
            st = os.lstat(item.path)
            if stat.S_ISLNK(st.st_mode):
                out[r] = ("link", os.readlink(item.path))
            elif stat.S_ISDIR(st.st_mode):
                out[r] = ("dir",)
                walk(item.path, r + "/")
            else:
                assert stat.S_ISREG(st.st_mode), r
                with open(item.path, "rb") as f:
                    digest = xxhash.xxh3_128_hexdigest(f.read())
                out[r] = ("file", digest, st.st_size, bool(st.st_mode & 0o111))

    walk(str(root), "")
    return out


def tree_names(repo: Repository, tree_id: ObjectId) -> set[str]:
    names: set[str] = set()
    for e in repo.objects.get_tree(tree_id).entries:
        names.add(e.name)
        if e.is_tree:
            assert e.id is not None
            names |= tree_names(repo, e.id)
    return names


def make(path: Path, data: bytes = b"", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


# -- exact round trips -------------------------------------------------------------------------


def build_source(root: Path, outside: Path) -> None:
    make(root / "plain.txt", b"hello\n")
    make(root / "run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    make(root / "bin" / "tool", random_bytes(5000, 1), 0o700)
    make(root / "private.txt", b"secret-ish\n", 0o600)
    make(root / "multi.bin", random_bytes(3 * MAX + 12345, 2))
    make(root / "naïve file.txt", "ünïcödé\n".encode())
    make(root / "日本語" / "データ.bin", random_bytes(20_000, 3))
    make(root / "emoji 😀.txt", b"smile")
    make(root / " leading space", b"l")
    make(root / "trailing space ", b"t")
    make(root / "dir with space" / "inner file", b"inner")
    make(root / "..." / ".hidden", b"dots")
    make(root / "empty-file", b"")
    (root / "empty" / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty2").mkdir()
    (root / "subdir" / "x").mkdir(parents=True)
    make(root / "subdir" / "x" / "f", b"f")
    os.symlink(str(outside), root / "link-outside-abs")
    os.symlink("../../outside", root / "link-outside-rel")
    os.symlink("subdir", root / "link-to-dir")
    os.symlink(str(outside / "secret.txt"), root / "link-to-outside-file")
    os.symlink("no/such/target", root / "dangling")
    os.symlink("naïve file.txt", root / "link to ünïcode")
    os.symlink("x" * 1000, root / "long-target")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    make(d / "secret.txt", b"do not snapshot or overwrite me")
    return d


def test_exact_round_trip(repo: Repository, tmp_path: Path, outside: Path) -> None:
    src = tmp_path / "src"
    build_source(src, outside)
    outside_before = describe(outside)
    tree_id, tree = store(repo, src)

    out = tmp_path / "out"
    written = checkout_tree(repo.objects, tree_id, str(out))
    assert describe(out) == describe(src)
    assert written == sum(1 for v in describe(src).values() if v[0] == "file")
    assert describe(outside) == outside_before

    # symlinks are stored as links with their target text, never followed
    for name, target in [
        ("link-outside-abs", str(outside)),
        ("link-to-dir", "subdir"),
        ("dangling", "no/such/target"),
        ("long-target", "x" * 1000),
    ]:
        e = tree.get(name)
        assert e is not None and e.mode == MODE_SYMLINK and e.target == target and e.id is None
        assert e.size == len(target.encode())
    assert "secret.txt" not in tree_names(repo, tree_id)
    assert os.path.islink(out / "link-to-dir") and os.readlink(out / "link-to-dir") == "subdir"
    # modes and sizes
    assert tree.get("run.sh").mode == MODE_EXECUTABLE  # type: ignore[union-attr]
    assert tree.get("plain.txt").mode == MODE_FILE  # type: ignore[union-attr]
    assert tree.get("private.txt").mode == MODE_FILE  # type: ignore[union-attr]
    assert tree.get("empty").mode == MODE_TREE  # type: ignore[union-attr]
    assert tree.get("multi.bin").size == 3 * MAX + 12345  # type: ignore[union-attr]
    assert tree.size == sum(e.size for e in tree.entries)
    assert os.stat(out / "bin" / "tool").st_mode & 0o777 == 0o755
    assert os.stat(out / "plain.txt").st_mode & 0o777 == 0o644


def test_hash_only_ids_equal_stored_ids(repo: Repository, tmp_path: Path, outside: Path) -> None:
    src = tmp_path / "src"
    build_source(src, outside)
    stored_id, stored_tree = store(repo, src)
    hashed_id, hashed_tree = write_tree(HashOnly(), repo.chunker, str(src))
    assert hashed_id == stored_id == stored_tree.id
    assert hashed_tree == stored_tree
    blob_id, blob = write_blob_from_file(HashOnly(), repo.chunker, str(src / "multi.bin"))
    assert blob_id == stored_tree.get("multi.bin").id  # type: ignore[union-attr]
    assert repo.objects.get_blob(blob_id) == blob
    # snapshotting again stores nothing new
    with repo.objects.writer() as w:
        again, _ = write_tree(w, repo.chunker, str(src))
    assert again == stored_id
    assert w.stats.objects_written == 0


SIZES = sorted(
    {0, 1, INLINE_LIMIT - 1, INLINE_LIMIT, INLINE_LIMIT + 1, MIN - 1, MIN, MIN + 1, AVG - 1, AVG, AVG + 1,
     MAX - 1, MAX, MAX + 1, 5 * MAX + 3}
)


@pytest.mark.parametrize("size", SIZES)
def test_file_sizes_round_trip(repo: Repository, tmp_path: Path, size: int) -> None:
    data = random_bytes(size, seed=size)
    src = tmp_path / "src"
    make(src / "f.bin", data)
    tree_id, tree = store(repo, src)
    entry = tree.get("f.bin")
    assert entry is not None and entry.size == size
    assert entry.id is not None
    blob = repo.objects.get_blob(entry.id)
    assert blob.size == size
    if size < INLINE_LIMIT:
        assert blob.inline == data and blob.chunks == ()
    else:
        assert blob.inline is None
        lengths = [n for _, n in blob.chunks]
        assert sum(lengths) == size and all(0 < n <= MAX for n in lengths)
        assert all(n >= MIN for n in lengths[:-1])
        if size <= MIN:
            assert len(lengths) == 1  # nothing can be cut below the minimum chunk size
        if size > MAX:
            assert len(lengths) >= 2
    assert write_blob_from_file(HashOnly(), repo.chunker, str(src / "f.bin"))[0] == entry.id
    out = tmp_path / "out"
    assert checkout_tree(repo.objects, tree_id, str(out)) == 1
    assert (out / "f.bin").read_bytes() == data


@pytest.mark.parametrize("size", [0, 1, 100, 3000, INLINE_LIMIT - 1, INLINE_LIMIT, 5000, 50_000])
def test_small_chunker_params_round_trip(repo: Repository, tmp_path: Path, size: int) -> None:
    # A repository may use chunks smaller than INLINE_LIMIT. The first chunk of a file used
    # to be taken for the whole file whenever it was shorter than INLINE_LIMIT, silently
    # dropping the rest (fixed in worktree.py).
    data = random_bytes(size, seed=size + 1)
    src = tmp_path / "src"
    make(src / "f", data)
    chunker = Chunker(TINY)
    tree_id, tree = store(repo, src, chunker)
    assert tree.get("f").size == size  # type: ignore[union-attr]
    blob = repo.objects.get_blob(tree.get("f").id)  # type: ignore[arg-type,union-attr]
    assert blob.size == size
    assert (blob.inline is not None) == (size < INLINE_LIMIT)
    if blob.inline is None:
        assert all(n <= TINY.max_size for _, n in blob.chunks)
    out = tmp_path / "out"
    checkout_tree(repo.objects, tree_id, str(out))
    assert (out / "f").read_bytes() == data


# -- ignore rules ------------------------------------------------------------------------------


def test_keepsakeignore_and_always_skipped(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src).mkdir()
    (src / ".keepsakeignore").write_text(
        "# comment\n*.log\n!keep.log\nbuild/\n/rootonly.txt\n**/cache/\ndata/*.tmp\n\\#hash.txt\n"
    )
    kept = [
        "keep.log", "sub/rootonly.txt", "data/sub/y.tmp", "sub/keep.log", "src.py", "sub/build.txt",
        "cache.txt",
    ]
    ignored = [
        "a.log", "sub/b.log", "build/x", "sub/build/y", "rootonly.txt", "sub/deep/cache/z", "cache/z",
        "data/x.tmp", "#hash.txt",
    ]
    skipped = [".keepsake/config", ".git/HEAD", "sub/.git/objects/x", "sub/.keepsake", "venv/lib/x.py", "sub/venv"]
    for rel in kept + ignored + skipped:
        make(src / rel, rel.encode())
    tree_id, _ = store(repo, src, extra_skip=frozenset({"venv"}))
    out = tmp_path / "out"
    checkout_tree(repo.objects, tree_id, str(out))
    files = {k for k, v in describe(out).items() if v[0] == "file"}
    assert files == set(kept) | {".keepsakeignore"}
    assert ".git" not in tree_names(repo, tree_id) and ".keepsake" not in tree_names(repo, tree_id)
    assert write_tree(HashOnly(), repo.chunker, str(src), extra_skip=frozenset({"venv"}))[0] == tree_id


def test_ignored_directory_is_not_read(repo: Repository, tmp_path: Path) -> None:
    # an ignored directory is never descended into: unreadable content there cannot fail
    src = tmp_path / "src"
    make(src / "ok.txt", b"ok")
    (src / ".keepsakeignore").write_text("bad/\n")
    (src / "bad").mkdir()
    os.mkfifo(src / "bad" / "fifo")
    os.symlink(b"\xff\xfe", os.path.join(bytes(src / "bad"), b"\xffname"))
    tree_id, tree = store(repo, src)
    assert [e.name for e in tree.entries] == [".keepsakeignore", "ok.txt"]


def test_special_files_are_skipped(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make(src / "a.txt", b"a")
    os.mkfifo(src / "fifo")  # opening it would block forever
    tree_id, tree = store(repo, src)
    assert [e.name for e in tree.entries] == ["a.txt"]


# -- errors ------------------------------------------------------------------------------------


def test_missing_or_wrong_kind_paths(repo: Repository, tmp_path: Path) -> None:
    make(tmp_path / "file", b"x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(PathNotFound):
        write_tree(HashOnly(), repo.chunker, str(tmp_path / "missing"))
    with pytest.raises(PathNotFound):
        write_tree(HashOnly(), repo.chunker, str(tmp_path / "file"))
    with pytest.raises(PathNotFound):
        write_blob_from_file(HashOnly(), repo.chunker, str(tmp_path / "missing"))
    with pytest.raises(PathNotFound, match="directory"):
        write_blob_from_file(HashOnly(), repo.chunker, str(tmp_path / "dir"))
    os.symlink("missing", tmp_path / "dangling")
    with pytest.raises(PathNotFound):
        write_blob_from_file(HashOnly(), repo.chunker, str(tmp_path / "dangling"))


class MutatingSink(HashOnly):
    """Runs ``action`` once, when the first object is put: the walk is under way then."""

    def __init__(self, action: Callable[[], None]) -> None:
        self._action: Callable[[], None] | None = action

    def put(self, object_type: ObjectType, data: bytes | memoryview, object_id: ObjectId | None = None) -> ObjectId:
        if self._action is not None:
            action, self._action = self._action, None
            action()
        return super().put(object_type, data, object_id)


@pytest.mark.parametrize("victim", ["b-file", "c-dir", "d-link"])
def test_path_vanishing_during_the_walk(repo: Repository, tmp_path: Path, victim: str) -> None:
    # Listed, then removed before it is read: PathNotFound, not a raw FileNotFoundError
    # (fixed in worktree.py).
    src = tmp_path / "src"
    make(src / "a-file", b"a")  # sorted first: its blob is put before the others are read
    make(src / "b-file", b"b")
    make(src / "c-dir" / "inner", b"c")
    os.symlink("a-file", src / "d-link")

    def remove() -> None:
        path = src / victim
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    with pytest.raises(PathNotFound) as info:
        write_tree(MutatingSink(remove), repo.chunker, str(src))
    assert victim in info.value.path


def test_non_utf8_names_are_reported(repo: Repository, tmp_path: Path) -> None:
    # used to crash with UnicodeEncodeError (fixed in worktree.py)
    src = tmp_path / "src"
    make(src / "ok", b"ok")
    bad = os.path.join(bytes(src), b"bad-\xff.bin")
    with open(bad, "wb") as f:
        f.write(b"x")
    with pytest.raises(PathNotFound, match="UTF-8"):
        write_tree(HashOnly(), repo.chunker, str(src))
    # it can be ignored
    (src / ".keepsakeignore").write_text("bad-*\n")
    _, tree = write_tree(HashOnly(), repo.chunker, str(src))
    assert [e.name for e in tree.entries] == [".keepsakeignore", "ok"]


def test_non_utf8_symlink_target_is_reported(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(b"target-\xff", os.path.join(bytes(src), b"link"))
    with pytest.raises(PathNotFound, match="UTF-8"):
        write_tree(HashOnly(), repo.chunker, str(src))


# -- checkout conflicts ------------------------------------------------------------------------


@pytest.fixture
def simple_tree(repo: Repository, tmp_path: Path) -> ObjectId:
    src = tmp_path / "simple"
    make(src / "README.md", b"readme\n")
    make(src / "sub" / "f.txt", b"sub file\n")
    os.symlink("README.md", src / "link")
    make(src / "plain", b"not executable\n")
    return store(repo, src)[0]


def test_checkout_refuses_non_empty_dir_without_force(repo: Repository, tmp_path: Path, simple_tree: ObjectId) -> None:
    out = tmp_path / "out"
    make(out / "README.md", b"mine\n")
    with pytest.raises(CheckoutConflict):
        checkout_tree(repo.objects, simple_tree, str(out))
    assert (out / "README.md").read_bytes() == b"mine\n"
    assert sorted(os.listdir(out)) == ["README.md"]
    # a file where the directory should be: refused even with force
    make(tmp_path / "afile", b"x")
    for force in (False, True):
        with pytest.raises(CheckoutConflict):
            checkout_tree(repo.objects, simple_tree, str(tmp_path / "afile"), force=force)
    assert (tmp_path / "afile").read_bytes() == b"x"


def test_checkout_into_empty_or_missing_dir(repo: Repository, tmp_path: Path, simple_tree: ObjectId) -> None:
    (tmp_path / "empty").mkdir()
    assert checkout_tree(repo.objects, simple_tree, str(tmp_path / "empty")) == 3
    assert checkout_tree(repo.objects, simple_tree, str(tmp_path / "new" / "nested")) == 3
    assert describe(tmp_path / "empty") == describe(tmp_path / "new" / "nested") == describe(tmp_path / "simple")


def test_checkout_of_missing_tree_writes_nothing(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        checkout_tree(repo.objects, ObjectId("0" * 32), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_force_replaces_whatever_is_in_the_way(repo: Repository, tmp_path: Path, simple_tree: ObjectId) -> None:
    outside = tmp_path / "outside"
    make(outside / "sentinel.txt", b"sentinel")
    make(outside / "f.txt", b"outside f")
    outside_before = describe(outside)

    out = tmp_path / "out"
    out.mkdir()
    os.symlink(str(outside / "sentinel.txt"), out / "README.md")  # file entry: symlink in the way
    os.symlink(str(outside), out / "sub")  # tree entry: symlink to a directory in the way
    make(out / "link" / "x", b"dir where a symlink goes")  # symlink entry: directory in the way
    make(out / "plain", b"old", 0o755)  # file entry: old executable file
    make(out / "extra.txt", b"extra")  # not in the tree: left alone
    make(out / "sub-holder", b"")
    os.link(outside / "f.txt", out / "hardlink-probe")  # (not in the tree: stays a hard link)

    assert checkout_tree(repo.objects, simple_tree, str(out), force=True) == 3
    assert describe(outside) == outside_before  # nothing written through the links
    expected = describe(tmp_path / "simple")
    got = describe(out)
    assert got.pop("extra.txt")[0] == "file"
    assert got.pop("sub-holder")[0] == "file"
    assert got.pop("hardlink-probe")[0] == "file"
    assert got == expected
    assert not os.path.islink(out / "README.md") and not os.path.islink(out / "sub")
    assert os.stat(out / "plain").st_mode & 0o777 == 0o644


def test_force_does_not_write_through_a_hard_link(repo: Repository, tmp_path: Path, simple_tree: ObjectId) -> None:
    outside = tmp_path / "outside"
    make(outside / "linked.txt", b"outside content")
    out = tmp_path / "out"
    out.mkdir()
    os.link(outside / "linked.txt", out / "README.md")
    checkout_tree(repo.objects, simple_tree, str(out), force=True)
    assert (outside / "linked.txt").read_bytes() == b"outside content"
    assert (out / "README.md").read_bytes() == b"readme\n"


def test_force_replaces_file_in_the_way_of_a_directory(repo: Repository, tmp_path: Path, simple_tree: ObjectId) -> None:
    out = tmp_path / "out"
    make(out / "sub", b"a file where a directory goes")
    make(out / "README.md" / "deep" / "x", b"a directory where a file goes")
    checkout_tree(repo.objects, simple_tree, str(out), force=True)
    assert describe(out) == describe(tmp_path / "simple")


# -- hostile trees -----------------------------------------------------------------------------


def raw_tree(*entries: list[Any]) -> bytes:
    return bytes(msgpack.packb({"entries": list(entries)}, use_bin_type=True))


@pytest.fixture
def arena(tmp_path: Path) -> Path:
    """tmp/arena/{target, sentinel/keep.txt}: the checkout goes into target."""
    a = tmp_path / "arena"
    make(a / "sentinel" / "keep.txt", b"keep")
    return a


def everything_outside(root: Path, target: Path) -> dict[str, Entry]:
    """Everything under ``root`` except the checkout target and the repository."""
    full = describe(root)
    excluded = (str(target.relative_to(root)), "repo")
    return {k: v for k, v in full.items() if not any(k == t or k.startswith(t + "/") for t in excluded)}


HOSTILE_NAMES = [
    "..", ".", "", "a/b", "../escape", "../sentinel/keep.txt", "../sentinel", "a\0b", "a\\b", "..\\escape",
    "ABS",  # replaced by an absolute path into the sentinel directory
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_entry_names_write_nothing_outside(repo: Repository, tmp_path: Path, arena: Path, name: str) -> None:
    # every (entry kind) x (at the root or one level down) x (force or not), in one repository
    if name == "ABS":
        name = str(arena / "sentinel" / "pwned")
    variants: list[tuple[str, bool, int, ObjectId]] = []
    with repo.objects.writer() as w:
        blob_id = w.put(ObjectType.BLOB, Blob(5, (), b"PWNED").encode())
        empty_tree = w.put(ObjectType.TREE, raw_tree())
        for kind, mode, ref in [
            ("file", MODE_FILE, bytes.fromhex(blob_id)),
            ("tree", MODE_TREE, bytes.fromhex(empty_tree)),
            ("link", MODE_SYMLINK, "../sentinel"),
        ]:
            hostile = w.put(ObjectType.TREE, raw_tree(["a-ok", MODE_FILE, 5, bytes.fromhex(blob_id)], [name, mode, 5, ref]))
            nested = w.put(
                ObjectType.TREE,
                raw_tree(["0", MODE_FILE, 5, bytes.fromhex(blob_id)], ["d", MODE_TREE, 10, bytes.fromhex(hostile)]),
            )
            for force in (False, True):
                variants += [(kind, force, 0, hostile), (kind, force, 1, nested)]
    for kind, force, depth, root in variants:
        where = f"{kind}, force={force}, depth={depth}"
        target = arena / f"target-{kind}-{force}-{depth}"
        if force:
            make(target / "existing.txt", b"existing")
        before = everything_outside(tmp_path, target)
        with pytest.raises(CorruptObject):
            checkout_tree(repo.objects, root, str(target), force=force)
        assert everything_outside(tmp_path, target) == before, where
        assert (arena / "sentinel" / "keep.txt").read_bytes() == b"keep", where
        assert sorted(os.listdir(arena / "sentinel")) == ["keep.txt"], where
        if depth == 0 and not force:
            assert not target.exists(), where  # root tree rejected before anything is written


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([["b", MODE_FILE, 5, None], ["a", MODE_FILE, 5, None]], id="unsorted"),
        pytest.param([["a", MODE_FILE, 5, None], ["a", MODE_FILE, 5, None]], id="duplicate"),
        pytest.param([["a", MODE_SYMLINK, 5, "../sentinel"], ["a", MODE_TREE, 0, None]], id="link-then-dir-same-name"),
        pytest.param([["a", 0o100600, 5, None]], id="unknown-mode"),
        pytest.param([["a", MODE_SYMLINK, 0, ""]], id="empty-symlink-target"),
        pytest.param([["a", MODE_SYMLINK, 0, "x\0y"]], id="nul-in-symlink-target"),
        pytest.param([["a", MODE_FILE, 5, b"short"]], id="bad-id-length"),
    ],
)
def test_hostile_tree_shapes_write_nothing_outside(
    repo: Repository, tmp_path: Path, arena: Path, entries: list[list[Any]]
) -> None:
    target = arena / "target"
    before = everything_outside(tmp_path, target)
    with repo.objects.writer() as w:
        blob_id = w.put(ObjectType.BLOB, Blob(5, (), b"PWNED").encode())
        empty_tree = w.put(ObjectType.TREE, raw_tree())
        fixed = [
            [n, m, s, (bytes.fromhex(blob_id) if m == MODE_FILE else bytes.fromhex(empty_tree)) if r is None else r]
            for n, m, s, r in entries
        ]
        hostile = w.put(ObjectType.TREE, raw_tree(*fixed))
        root = w.put(ObjectType.TREE, raw_tree(["d", MODE_TREE, 5, bytes.fromhex(hostile)]))
    for tree_id in (hostile, root):
        with pytest.raises(CorruptObject):
            checkout_tree(repo.objects, tree_id, str(target), force=True)
        assert everything_outside(tmp_path, target) == before
    assert not (target / "a").exists() and not (target / "d" / "a").exists()


def test_symlink_out_of_the_tree_is_created_not_followed(repo: Repository, tmp_path: Path, arena: Path) -> None:
    # A legitimate tree may hold a link pointing outside: checkout creates the link and
    # never writes through it, even into an existing link of the same name.
    target = arena / "target"
    with repo.objects.writer() as w:
        blob_id = w.put(ObjectType.BLOB, Blob(5, (), b"PWNED").encode())
        inner = w.put(ObjectType.TREE, raw_tree(["keep.txt", MODE_FILE, 5, bytes.fromhex(blob_id)]))
        root = w.put(
            ObjectType.TREE,
            raw_tree(["esc", MODE_SYMLINK, 12, "../sentinel"], ["sub", MODE_TREE, 5, bytes.fromhex(inner)]),
        )
    make(target / "x", b"x")
    os.symlink("../sentinel", target / "sub")
    before = everything_outside(tmp_path, target)
    checkout_tree(repo.objects, root, str(target), force=True)
    assert everything_outside(tmp_path, target) == before
    assert (arena / "sentinel" / "keep.txt").read_bytes() == b"keep"
    assert os.readlink(target / "esc") == "../sentinel"
    assert (target / "sub" / "keep.txt").read_bytes() == b"PWNED" and not (target / "sub").is_symlink()


def test_blob_of_wrong_type_is_rejected(repo: Repository, tmp_path: Path) -> None:
    with repo.objects.writer() as w:
        tree_as_file = w.put(ObjectType.TREE, raw_tree())
        root = w.put(ObjectType.TREE, raw_tree(["f", MODE_FILE, 0, bytes.fromhex(tree_as_file)]))
    with pytest.raises(WrongObjectType):
        checkout_tree(repo.objects, root, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "f").exists()


def test_hostile_tree_object_ids_are_content_hashes(repo: Repository) -> None:
    # the helpers above really store the raw (unvalidated) bytes
    raw = raw_tree(["..", MODE_FILE, 0, b"\0" * 16])
    with repo.objects.writer() as w:
        oid = w.put(ObjectType.TREE, raw)
    assert oid == hash_object(ObjectType.TREE, raw)
    assert repo.objects.get(oid, ObjectType.TREE) == raw


# -- a file larger than 2 and 3 GiB ------------------------------------------------------------


def streaming_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.mark.slow
def test_3gib_file_round_trip(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big.bin"
    mib = 1 << 20
    size = 3 * 1024 * mib + 12345
    pattern = random_bytes(mib, seed=99)
    hole = range(1000, 1256)  # 256 MiB never written: a sparse hole, reads as zeros
    try:
        with open(big, "wb") as f:
            for i in range(3 * 1024):
                if i in hole:
                    continue
                f.seek(i * mib)
                if i % 97 == 0:  # some variation: new chunks every ~97 MiB
                    f.write(pattern[:5000] + i.to_bytes(4, "little") * 25 + pattern[5100:])
                else:
                    f.write(pattern)
            f.seek(size - 12345)
            f.write(pattern[:12345])
        assert big.stat().st_size == size
        make(src / "small.txt", b"small")

        with repo.objects.writer() as w:
            tree_id, tree = write_tree(w, repo.chunker, str(src))
        assert w.stats.stored_bytes < 64 * mib  # deduplicated: the pattern is stored once
        entry = tree.get("big.bin")
        assert entry is not None and entry.size == size
        blob = repo.objects.get_blob(entry.id)  # type: ignore[arg-type]
        assert blob.size == size == sum(n for _, n in blob.chunks)
        assert all(n <= MAX for _, n in blob.chunks)

        out = tmp_path / "out"
        assert checkout_tree(repo.objects, tree_id, str(out)) == 2
        assert (out / "big.bin").stat().st_size == size
        assert streaming_digest(out / "big.bin") == streaming_digest(big)
        assert (out / "small.txt").read_bytes() == b"small"
    finally:
        # do not leave 6 GiB behind in pytest's retained temporary directories
        for p in (src, tmp_path / "out"):
            shutil.rmtree(p, ignore_errors=True)
