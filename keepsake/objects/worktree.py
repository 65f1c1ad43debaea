"""Snapshots of local files and directories into objects, and checkouts back (FORMAT.md §5).

Symlinks are stored as links (their target text) and never followed inside a tree.
``.keepsakeignore`` files use gitignore syntax; ``.keepsake`` and ``.git`` are always skipped.
Checkout never writes outside its target directory: entry names are validated on decode,
existing symlinks in the way are replaced rather than followed, and files are opened with
O_NOFOLLOW.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import pathspec

from keepsake.errors import CheckoutConflict, PathNotFound, UnsafePath
from keepsake.objects.chunking import Chunker
from keepsake.objects.database import BlobReader, ObjectDB
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.manifests import (
    INLINE_LIMIT,
    MODE_EXECUTABLE,
    MODE_FILE,
    MODE_SYMLINK,
    MODE_TREE,
    Blob,
    Tree,
    TreeEntry,
    check_entry_name,
)

IGNORE_FILE = ".keepsakeignore"
ALWAYS_SKIP = frozenset({".keepsake", ".git"})


class ObjectSink(Protocol):
    """Where snapshots put objects: an ObjectWriter, or a HashOnly sink that stores nothing."""

    def put(self, object_type: ObjectType, data: bytes | memoryview, object_id: ObjectId | None = None) -> ObjectId: ...


class HashOnly:
    """An ObjectSink that computes ids and stores nothing (``hash-object`` without ``-w``)."""

    def put(self, object_type: ObjectType, data: bytes | memoryview, object_id: ObjectId | None = None) -> ObjectId:
        return object_id or hash_object(object_type, data)


def _blob_from_chunks(sink: ObjectSink, chunks: Iterable[tuple[memoryview, ObjectId | None]]) -> Blob:
    """A file's blob from its chunks, each with its id when the chunker already hashed it."""
    it = iter(chunks)
    # FIX (tests/objects/test_worktree.py): this used to inline the first chunk whenever it
    # was shorter than INLINE_LIMIT, assuming it was then the whole file. That only holds
    # when min_size >= INLINE_LIMIT; with smaller chunker params (a repository config may
    # set them) every byte after the first chunk was silently dropped. Now: read chunks
    # until INLINE_LIMIT bytes are seen; only a whole file shorter than that is inlined.
    # With the default params (min_size 16 KiB) the result is unchanged.
    head: list[tuple[memoryview, ObjectId | None]] = []
    total = 0
    for item in it:
        head.append(item)
        total += len(item[0])
        if total >= INLINE_LIMIT:
            break
    else:
        return Blob(total, (), b"".join(view for view, _ in head))
    parts = [(sink.put(ObjectType.CHUNK, view, known), len(view)) for view, known in head]
    parts.extend((sink.put(ObjectType.CHUNK, view, known), len(view)) for view, known in it)
    return Blob(sum(n for _, n in parts), tuple(parts))


def _chunk_id(view: memoryview) -> ObjectId:
    return hash_object(ObjectType.CHUNK, view)


class EarlierVersions:
    """The blobs of the files a snapshot stored, by path, for the next snapshot of the same
    paths: a file found again is cut against its earlier chunks (Chunker.cut_file_like),
    which confirms unchanged stretches by hashing instead of cutting them again.

    ``earlier`` is read; :attr:`stored` collects this snapshot's blobs, to be the next one's
    ``earlier``. Paths are ``/``-separated, relative to the snapshot's root.
    """

    def __init__(self, earlier: dict[str, Blob] | None = None) -> None:
        self.earlier = earlier or {}
        self.stored: dict[str, Blob] = {}

    def chunks_of(self, relpath: str) -> tuple[tuple[ObjectId, int], ...]:
        blob = self.earlier.get(relpath)
        return blob.chunks if blob is not None else ()

    def record(self, relpath: str, blob: Blob) -> None:
        if blob.chunks:  # an inlined file is read whole anyway
            self.stored[relpath] = blob


def write_blob_from_file(
    sink: ObjectSink, chunker: Chunker, path: str, earlier: tuple[tuple[ObjectId, int], ...] = ()
) -> tuple[ObjectId, Blob]:
    """Store the file at ``path``; returns its blob id and blob.

    Args:
        earlier: the chunks of an earlier version of the file, if known: its unchanged
            parts are then found by hashing (same result, less work).
    """
    try:
        if earlier:
            blob = _blob_from_chunks(sink, chunker.cut_file_like(path, earlier, _chunk_id))  # type: ignore[arg-type]
        else:
            blob = _blob_from_chunks(sink, ((view, None) for view in chunker.cut_file(path)))
    except FileNotFoundError as exc:
        raise PathNotFound(path) from exc
    except IsADirectoryError as exc:
        raise PathNotFound(path, "is a directory") from exc
    except PermissionError as exc:
        raise PathNotFound(path, "permission denied") from exc
    except OSError as exc:
        raise PathNotFound(path, exc.strerror or str(exc)) from exc
    return sink.put(ObjectType.BLOB, blob.encode()), blob


def write_blob_from_stream(sink: ObjectSink, chunker: Chunker, stream: BinaryIO) -> tuple[ObjectId, Blob]:
    blob = _blob_from_chunks(sink, ((view, None) for view in chunker.cut_stream(stream)))
    return sink.put(ObjectType.BLOB, blob.encode()), blob


@dataclass
class _Ignore:
    root: str
    spec: pathspec.GitIgnoreSpec | None
    virtualenvs: bool = False

    @classmethod
    def load(cls, root: str) -> _Ignore:
        try:
            with open(os.path.join(root, IGNORE_FILE), encoding="utf-8") as f:
                return cls(root, pathspec.GitIgnoreSpec.from_lines(f.read().splitlines()))
        except FileNotFoundError:
            return cls(root, None)

    def skips(self, relpath: str, is_dir: bool) -> bool:
        if is_dir and self.virtualenvs and os.path.isfile(os.path.join(self.root, relpath, "pyvenv.cfg")):
            return True  # a virtualenv, whatever its name
        if self.spec is None:
            return False
        return self.spec.match_file(relpath + "/" if is_dir else relpath)


def write_tree(
    sink: ObjectSink,
    chunker: Chunker,
    directory: str,
    extra_skip: frozenset[str] = frozenset(),
    skip_virtualenvs: bool = False,
    versions: EarlierVersions | None = None,
    prefix: str = "",
) -> tuple[ObjectId, Tree]:
    """Store ``directory`` recursively; returns the root tree id and tree.

    Args:
        extra_skip: more directory/file names to skip anywhere (e.g. virtualenvs).
        versions: earlier versions of the files (keyed ``prefix`` + path inside
            ``directory``), and where this snapshot's are recorded.

    Raises:
        PathNotFound: ``directory`` is missing, not a directory, or something in it is
            unreadable.
    """
    if not os.path.isdir(directory):
        raise PathNotFound(directory, "not a directory" if os.path.exists(directory) else "no such directory")
    ignore = _Ignore.load(directory)
    skip = ALWAYS_SKIP | extra_skip
    ignore.virtualenvs = skip_virtualenvs
    return _write_dir(sink, chunker, directory, "", ignore, skip, versions or EarlierVersions(), prefix)


def _write_dir(
    sink: ObjectSink,
    chunker: Chunker,
    path: str,
    rel: str,
    ignore: _Ignore,
    skip: frozenset[str],
    versions: EarlierVersions,
    prefix: str,
) -> tuple[ObjectId, Tree]:
    entries = []
    # FIX (tests/objects/test_worktree.py): a directory, file or symlink that vanishes (or
    # changes kind) while we walk used to escape as a raw FileNotFoundError/OSError, and a
    # name or symlink target that is not valid UTF-8 as UnicodeEncodeError; both are now
    # PathNotFound, as the docstring of write_tree promises.
    try:
        listing = sorted(os.scandir(path), key=lambda d: d.name.encode("utf-8", "surrogateescape"))
    except PermissionError as exc:
        raise PathNotFound(path, "permission denied") from exc
    except OSError as exc:
        raise PathNotFound(path, exc.strerror or str(exc)) from exc
    for item in listing:
        name = item.name
        if name in skip or check_entry_name(name) is not None:
            continue
        relpath = f"{rel}{name}"
        try:
            st = item.stat(follow_symlinks=False)
        except OSError as exc:
            raise PathNotFound(item.path, exc.strerror or str(exc)) from exc
        is_dir = stat.S_ISDIR(st.st_mode)
        if ignore.skips(relpath, is_dir):
            continue
        if not _is_utf8(name):
            raise PathNotFound(item.path, "its name is not valid UTF-8 (rename it or add it to .keepsakeignore)")
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(item.path)
            except OSError as exc:
                raise PathNotFound(item.path, exc.strerror or str(exc)) from exc
            if not _is_utf8(target):
                raise PathNotFound(item.path, "its symlink target is not valid UTF-8")
            entries.append(TreeEntry(name, MODE_SYMLINK, len(target.encode()), None, target))
        elif is_dir:
            tree_id, tree = _write_dir(sink, chunker, item.path, relpath + "/", ignore, skip, versions, prefix)
            entries.append(TreeEntry(name, MODE_TREE, tree.size, tree_id))
        elif stat.S_ISREG(st.st_mode):
            blob_id, blob = write_blob_from_file(sink, chunker, item.path, versions.chunks_of(prefix + relpath))
            versions.record(prefix + relpath, blob)
            mode = MODE_EXECUTABLE if st.st_mode & 0o111 else MODE_FILE
            entries.append(TreeEntry(name, mode, blob.size, blob_id))
        # sockets, fifos and devices are not content: skipped
    tree = Tree(tuple(entries))
    return sink.put(ObjectType.TREE, tree.encode()), tree


def _is_utf8(text: str) -> bool:
    """False for names os.fsdecode() produced from non-UTF-8 bytes (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_empty_dir(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except FileNotFoundError:
        return True


def checkout_tree(db: ObjectDB, tree_id: ObjectId, directory: str, force: bool = False) -> int:
    """Write the tree ``tree_id`` into ``directory``; returns the number of files written.

    Raises:
        CheckoutConflict: ``directory`` exists, is not empty, and ``force`` is False.
        UnsafePath: the tree holds an entry that would land outside ``directory``.
    """
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise CheckoutConflict(directory)
    try:
        if not force and not _is_empty_dir(directory):
            raise CheckoutConflict(directory)
        tree = db.get_tree(tree_id)
        os.makedirs(directory, exist_ok=True)
    except NotADirectoryError as exc:
        raise PathNotFound(directory, "a parent of it is a file, not a directory") from exc
    return _checkout_dir(db, tree_id, tree, os.path.realpath(directory))


def _checkout_dir(db: ObjectDB, tree_id: ObjectId, tree: Tree, root: str) -> int:
    written = 0
    for entry in tree.entries:
        if check_entry_name(entry.name) is not None:
            raise UnsafePath(tree_id, entry.name)
        path = os.path.join(root, entry.name)
        if os.path.dirname(path) != root:
            raise UnsafePath(tree_id, entry.name)
        if entry.is_tree:
            assert entry.id is not None
            _clear_for(path, want_dir=True)
            os.makedirs(path, exist_ok=True)
            written += _checkout_dir(db, entry.id, db.get_tree(entry.id), path)
        elif entry.is_symlink:
            assert entry.target is not None
            _clear_for(path, want_dir=False)
            os.symlink(entry.target, path)
        else:
            assert entry.id is not None
            _clear_for(path, want_dir=False)
            write_file(db, db.get_blob(entry.id), path, executable=entry.mode == MODE_EXECUTABLE)
            written += 1
    return written


def _clear_for(path: str, want_dir: bool) -> None:
    """Remove whatever is at ``path`` that is in the way; symlinks are removed, not followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not want_dir:
            shutil.rmtree(path)
    else:
        os.unlink(path)


def write_file(db: ObjectDB, blob: Blob, path: str, executable: bool = False) -> None:
    """Write the content of ``blob`` to a new file at ``path`` (never through a symlink).

    The chunks are decoded ~8 MiB at a time on the database's workers straight into
    reused buffers (:class:`BlobReader`), each written with one write() while the next
    ones decode. Each chunk's size is checked against the blob, so a damaged manifest
    cannot produce a file of the wrong size.

    Raises:
        CorruptObject: a chunk is damaged, or its size differs from the one the blob records.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o755 if executable else 0o644)
    try:
        reader = BlobReader(db, blob)
        try:
            for view in reader.iter_views():
                _write_all(fd, view)
                if db.progress is not None:
                    db.progress(len(view))
        finally:
            reader.close()
        os.fchmod(fd, 0o755 if executable else 0o644)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        # write may write less than asked: retry the rest
        data = data[os.write(fd, data) :]


def write_subpath(
    sink: ObjectSink,
    chunker: Chunker,
    root: str,
    relpath: str,
    extra_skip: frozenset[str] = frozenset(),
    versions: EarlierVersions | None = None,
) -> tuple[ObjectId, Tree]:
    """Store ``root/relpath`` (a file, link or directory) as a tree rooted at ``root``
    that holds only that path, so checkout recreates it at the same relative place.

    ``versions`` (keyed by path relative to ``root``) gives the files' earlier versions and
    records this snapshot's; see :class:`EarlierVersions`.

    Raises:
        PathNotFound: the path does not exist, or is not inside ``root``.
    """
    parts = [p for p in relpath.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if not parts or any(check_entry_name(p) is not None for p in parts):
        raise PathNotFound(relpath, "must be a path inside the project directory")
    full = os.path.join(root, *parts)
    try:
        st = os.lstat(full)
    except FileNotFoundError as exc:
        raise PathNotFound(full) from exc
    name = parts[-1]
    if stat.S_ISDIR(st.st_mode):
        tree_id, tree = write_tree(sink, chunker, full, extra_skip, versions=versions, prefix="/".join(parts) + "/")
        entry = TreeEntry(name, MODE_TREE, tree.size, tree_id)
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(full)
        entry = TreeEntry(name, MODE_SYMLINK, len(target.encode()), None, target)
    elif stat.S_ISREG(st.st_mode):
        key = "/".join(parts)
        blob_id, blob = write_blob_from_file(sink, chunker, full, versions.chunks_of(key) if versions else ())
        if versions is not None:
            versions.record(key, blob)
        entry = TreeEntry(name, MODE_EXECUTABLE if st.st_mode & 0o111 else MODE_FILE, blob.size, blob_id)
    else:
        raise PathNotFound(full, "is not a regular file, link or directory")
    for parent in reversed(parts[:-1]):
        tree = Tree((entry,))
        entry = TreeEntry(parent, MODE_TREE, tree.size, sink.put(ObjectType.TREE, tree.encode()))
    tree = Tree((entry,))
    return sink.put(ObjectType.TREE, tree.encode()), tree


def find_entry(db: ObjectDB, tree_id: ObjectId, path: str) -> TreeEntry | None:
    """The entry at ``path`` (``/``-separated) inside a tree, or None."""
    parts = [p for p in path.replace(os.sep, "/").split("/") if p not in ("", ".")]
    entry: TreeEntry | None = None
    current: ObjectId | None = tree_id
    for part in parts:
        if current is None:
            return None
        entry = db.get_tree(current).get(part)
        if entry is None:
            return None
        current = entry.id if entry.is_tree else None
    return entry
