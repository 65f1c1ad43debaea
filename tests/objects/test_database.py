"""Contract suite for the object database (keepsake.objects.database) on every backend.

Objects go in through a writer, become visible only once their index file is written,
come back byte-exact and hash-verified, and damaged packs read as CorruptObject (never as
a missing object).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keepsake.errors import (
    AmbiguousObjectId,
    CorruptObject,
    ObjectNotFound,
    StorageError,
    WrongObjectType,
)
from keepsake.objects import database
from keepsake.objects.database import ObjectDB
from keepsake.objects.envelope import HEADER_SIZE, open_object
from keepsake.objects.ids import MIN_PREFIX, ObjectId, ObjectType, hash_object
from keepsake.objects.pack import PackId, decode_index, pack_id_of_key, pack_key
from keepsake.repository import Repository
from keepsake.storage import Storage
from tests.servers import S3Server

BackendURL = tuple[str, dict[str, Any]]


def random_bytes(seed: int, size: int) -> bytes:
    """Incompressible, reproducible content (stored raw, so one flipped byte stays one)."""
    return random.Random(seed).randbytes(size)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Remote repositories keep a local cache; never let tests touch the user's.
    path = tmp_path / "cache"
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(path))
    return path


@pytest.fixture
def repo(backend_url: BackendURL, cache_dir: Path) -> Iterator[Repository]:
    url, options = backend_url
    with Repository.init(url, options) as repo:
        yield repo


def reopen(backend_url: BackendURL) -> Repository:
    url, options = backend_url
    return Repository.open(url, options)


def indexed_packs(storage: Storage) -> set[PackId]:
    """Every pack named by some index file."""
    packs: set[PackId] = set()
    for info in storage.list("index/"):
        packs |= set(decode_index(storage.read(info.key), info.key.rsplit("/", 1)[-1]))
    return packs


def stored_packs(storage: Storage) -> set[PackId]:
    out = {pack_id_of_key(i.key) for i in storage.list("packs/")}
    assert None not in out, "only pack files live under packs/"
    return {p for p in out if p is not None}


def put_chunks(repo: Repository, chunks: list[bytes], pack_size: int = database.PACK_SIZE) -> list[ObjectId]:
    with repo.objects.writer(pack_size=pack_size) as w:
        return [w.put(ObjectType.CHUNK, c) for c in chunks]


# -- writing, visibility, reading ------------------------------------------------------------


def test_objects_are_visible_only_after_flush(repo: Repository, backend_url: BackendURL) -> None:
    data = [random_bytes(1, 5000), b"small", b""]
    with repo.objects.writer() as w:
        ids = [w.put(ObjectType.CHUNK, d) for d in data]
        assert ids == [hash_object(ObjectType.CHUNK, d) for d in data]
        other = reopen(backend_url)
        assert not any(other.objects.has(i) for i in ids)
        with pytest.raises(ObjectNotFound):
            other.objects.get(ids[0])
        assert repo.storage.list("index/") == []
    # flushed on leaving the block
    assert all(repo.objects.has(i) for i in ids)
    other.objects.refresh()
    assert [other.objects.get(i) for i in ids] == data
    with reopen(backend_url) as fresh:
        assert [fresh.objects.get(i) for i in ids] == data
    other.close()


def test_explicit_flush_publishes_and_the_writer_goes_on(repo: Repository, backend_url: BackendURL) -> None:
    with repo.objects.writer() as w:
        first = w.put(ObjectType.CHUNK, b"first")
        w.flush()
        with reopen(backend_url) as other:
            assert other.objects.get(first) == b"first"
        second = w.put(ObjectType.CHUNK, b"second")
    assert len(repo.storage.list("index/")) == 2
    with reopen(backend_url) as fresh:
        assert fresh.objects.get(second) == b"second"


@pytest.mark.parametrize(
    "object_type,data",
    [
        (ObjectType.CHUNK, bytes(100_000)),  # compresses (zstd)
        (ObjectType.CHUNK, random_bytes(2, 70_000)),  # stored raw
        (ObjectType.CHUNK, np.linspace(-1, 1, 20_000, dtype=np.float32).tobytes()),  # bytegroup
        (ObjectType.BLOB, b"blob payload " * 100),
        (ObjectType.TREE, b"tree payload"),
        (ObjectType.CHECKPOINT, b'{"step": 1}'),
    ],
    ids=["zeros", "random", "float32", "blob", "tree", "checkpoint"],
)
def test_get_returns_the_exact_bytes(
    repo: Repository, backend_url: BackendURL, object_type: ObjectType, data: bytes
) -> None:
    with repo.objects.writer() as w:
        oid = w.put(object_type, data)
    assert repo.objects.get(oid) == data
    assert repo.objects.get(oid, object_type) == data
    assert repo.objects.get_typed(oid) == (object_type, data)
    with reopen(backend_url) as fresh:
        assert fresh.objects.get(oid, object_type) == data
        assert fresh.objects.get(oid, object_type) == data  # again: from the cache if any
        entry = fresh.objects.locate(oid)
        assert (entry.id, entry.type, entry.raw_length) == (oid, object_type, len(data))


def test_has_and_get_of_an_unknown_id(repo: Repository) -> None:
    put_chunks(repo, [b"something"])
    unknown = hash_object(ObjectType.CHUNK, b"never stored")
    assert not repo.objects.has(unknown)
    with pytest.raises(ObjectNotFound) as info:
        repo.objects.get(unknown)
    assert not isinstance(info.value, CorruptObject)
    assert info.value.object_id == unknown


def test_dedup_writes_each_object_once(repo: Repository) -> None:
    data = random_bytes(3, 3000)
    with repo.objects.writer() as w:
        a = w.put(ObjectType.CHUNK, data)
        b = w.put(ObjectType.CHUNK, data)
        w.put(ObjectType.CHUNK, b"other")
    assert a == b
    assert (w.stats.objects_written, w.stats.objects_skipped) == (2, 1)
    assert (w.stats.logical_written, w.stats.logical_skipped) == (len(data) + 5, len(data))
    assert w.stats.packs_written == 1
    packs_before = stored_packs(repo.storage)
    indexes_before = repo.storage.list("index/")

    with repo.objects.writer() as w2:  # already in the repository: nothing new is written
        assert w2.put(ObjectType.CHUNK, data) == a
    assert (w2.stats.objects_written, w2.stats.objects_skipped, w2.stats.packs_written) == (0, 1, 0)
    assert stored_packs(repo.storage) == packs_before
    assert repo.storage.list("index/") == indexes_before


def test_same_bytes_as_another_type_is_another_object(repo: Repository) -> None:
    with repo.objects.writer() as w:
        chunk = w.put(ObjectType.CHUNK, b"same")
        blob = w.put(ObjectType.BLOB, b"same")
    assert chunk != blob
    assert w.stats.objects_written == 2
    assert repo.objects.get_typed(chunk) == (ObjectType.CHUNK, b"same")
    assert repo.objects.get_typed(blob) == (ObjectType.BLOB, b"same")


def test_a_fresh_open_loads_every_index(repo: Repository, backend_url: BackendURL) -> None:
    first = put_chunks(repo, [b"a1", b"a2"])
    second = put_chunks(repo, [b"b1", b"b2", b"b3"])
    assert len(repo.storage.list("index/")) == 2
    with reopen(backend_url) as fresh:
        assert set(fresh.objects.entries()) == set(first + second)
        assert [fresh.objects.get(i) for i in first + second] == [b"a1", b"a2", b"b1", b"b2", b"b3"]


def test_locate_refreshes_to_find_objects_written_since_load(repo: Repository, backend_url: BackendURL) -> None:
    put_chunks(repo, [b"early"])
    with reopen(backend_url) as reader:
        assert reader.objects.entries()  # loaded now
        (late,) = put_chunks(repo, [b"late"])
        assert reader.objects.get(late) == b"late"


# -- ids: prefixes and resolve ---------------------------------------------------------------


@functools.cache
def colliding_chunks() -> tuple[bytes, bytes]:
    """Two contents whose chunk ids share their first MIN_PREFIX hex characters.

    Birthday bound: ~16**3.5 (about 16k) candidates; deterministic, so always the same pair.
    """
    seen: dict[str, bytes] = {}
    for i in range(2_000_000):
        data = b"candidate %d" % i
        prefix = hash_object(ObjectType.CHUNK, data)[:MIN_PREFIX]
        if prefix in seen:
            return seen[prefix], data
        seen[prefix] = data
    raise AssertionError("no collision found")


def unused_prefix(ids: list[ObjectId]) -> str:
    return next(p for p in (c * MIN_PREFIX for c in "0123456789abcdef") if not any(i.startswith(p) for i in ids))


def test_resolve_unique_prefixes(repo: Repository) -> None:
    ids = put_chunks(repo, [b"one", b"two", b"three"])
    for oid in ids:
        for length in (MIN_PREFIX, 12, 32):
            assert repo.resolve(oid[:length]) == oid
            assert repo.objects.find_prefix(oid[:length]) == [oid]


def test_resolve_unknown_prefix_raises_object_not_found(repo: Repository) -> None:
    ids = put_chunks(repo, [b"one"])
    prefix = unused_prefix(ids)
    assert repo.objects.find_prefix(prefix) == []
    with pytest.raises(ObjectNotFound) as info:
        repo.resolve(prefix)
    assert info.value.object_id == prefix


def test_resolve_ambiguous_prefix(repo: Repository) -> None:
    one, two = colliding_chunks()
    ids = put_chunks(repo, [one, two, b"bystander"])
    prefix = ids[0][:MIN_PREFIX]
    assert ids[1].startswith(prefix) and ids[0] != ids[1]
    assert sorted(repo.objects.find_prefix(prefix)) == sorted(ids[:2])
    with pytest.raises(AmbiguousObjectId) as info:
        repo.resolve(prefix)
    assert info.value.prefix == prefix
    assert sorted(info.value.candidates) == sorted(ids[:2])
    assert repo.resolve(ids[0]) == ids[0]  # the full id is never ambiguous


def test_wrong_object_type(repo: Repository) -> None:
    with repo.objects.writer() as w:
        chunk = w.put(ObjectType.CHUNK, b"a chunk")
        blob = w.put(ObjectType.BLOB, b"a blob")
    with pytest.raises(WrongObjectType) as info:
        repo.objects.get(chunk, ObjectType.TREE)
    assert (info.value.object_id, info.value.expected, info.value.actual) == (chunk, "tree", "chunk")
    with pytest.raises(WrongObjectType):
        repo.resolve(chunk, ObjectType.TREE)
    assert repo.resolve(chunk[:10], ObjectType.CHUNK) == chunk
    with pytest.raises(WrongObjectType):
        list(repo.objects.iter_chunks([chunk, blob]))


# -- many packs: iter_chunks and read_envelopes ----------------------------------------------


@pytest.fixture
def many_packs(repo: Repository) -> tuple[Repository, list[ObjectId], list[bytes]]:
    chunks = [random_bytes(100 + i, 8000 + 97 * i) for i in range(40)]
    with repo.objects.writer(pack_size=100_000) as w:
        ids = [w.put(ObjectType.CHUNK, c) for c in chunks]
    assert w.stats.packs_written >= 3
    assert len({repo.objects.locate(i).pack for i in ids}) == w.stats.packs_written
    assert stored_packs(repo.storage) == indexed_packs(repo.storage)
    return repo, ids, chunks


def test_iter_chunks_yields_in_the_order_asked_across_packs(
    many_packs: tuple[Repository, list[ObjectId], list[bytes]], backend_url: BackendURL
) -> None:
    repo, ids, chunks = many_packs
    by_id = dict(zip(ids, chunks))
    order = ids[::-1] + ids[::3] + [ids[5], ids[5]]
    random.Random(7).shuffle(order)
    expected = [by_id[i] for i in order]
    assert list(repo.objects.iter_chunks(order)) == expected
    assert list(repo.objects.iter_chunks(order, batch_bytes=20_000)) == expected
    assert list(repo.objects.iter_chunks([])) == []
    with reopen(backend_url) as fresh:
        assert list(fresh.objects.iter_chunks(order, batch_bytes=50_000)) == expected


def test_iter_chunks_of_an_unknown_id(many_packs: tuple[Repository, list[ObjectId], list[bytes]]) -> None:
    repo, ids, _ = many_packs
    with pytest.raises(ObjectNotFound):
        list(repo.objects.iter_chunks([ids[0], hash_object(ObjectType.CHUNK, b"unknown")]))


def test_read_envelopes_coalesces_ranges_per_pack(
    many_packs: tuple[Repository, list[ObjectId], list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, ids, chunks = many_packs
    storage = repo.storage
    entries = [repo.objects.locate(i) for i in ids]
    random.Random(3).shuffle(entries)
    packs = {p: storage.read(pack_key(p)) for p in {e.pack for e in entries}}
    expected = [packs[e.pack][e.offset : e.end] for e in entries]

    calls: list[list[tuple[str, int, int]]] = []
    original = storage.read_ranges

    def spy(ranges: list[tuple[str, int, int]]) -> list[bytes]:
        calls.append(list(ranges))
        return original(ranges)

    monkeypatch.setattr(storage, "read_ranges", spy)
    envelopes = repo.objects.read_envelopes(entries)
    assert [bytes(e) for e in envelopes] == expected
    assert [open_object(env, e.id)[1] for env, e in zip(envelopes, entries)] == [
        dict(zip(ids, chunks))[e.id] for e in entries
    ]
    # objects of one pack are adjacent: one ranged read per pack, in one call
    assert len(calls) == 1
    assert sorted(k for k, _, _ in calls[0]) == sorted(pack_key(p) for p in {e.pack for e in entries})

    # with no gap allowed, nothing is merged: one range per object
    calls.clear()
    monkeypatch.setattr(database, "READ_GAP", 0)
    some = entries[:8]
    assert [bytes(e) for e in repo.objects.read_envelopes(some)] == expected[:8]
    assert len(calls[0]) == len(some)


# -- corruption ------------------------------------------------------------------------------


@pytest.fixture
def two_in_a_pack(repo: Repository) -> tuple[Repository, ObjectId, ObjectId]:
    ids = put_chunks(repo, [random_bytes(10, 3000), random_bytes(11, 3000)])
    return repo, ids[0], ids[1]


def rewrite_pack(repo: Repository, object_id: ObjectId, edit: Any) -> None:
    entry = repo.objects.locate(object_id)
    key = pack_key(entry.pack)
    repo.storage.write(key, edit(bytearray(repo.storage.read(key)), entry))


def assert_corrupt(repo: Repository, object_id: ObjectId, reason: str) -> None:
    for read in (lambda: repo.objects.get(object_id), lambda: list(repo.objects.iter_chunks([object_id]))):
        with pytest.raises(CorruptObject) as info:
            read()
        assert not isinstance(info.value, ObjectNotFound)
        assert info.value.object_id == object_id
        assert object_id in str(info.value)
        assert reason in info.value.reason


def test_flipped_byte_in_a_pack_is_corrupt(
    two_in_a_pack: tuple[Repository, ObjectId, ObjectId], backend_url: BackendURL
) -> None:
    repo, damaged, intact = two_in_a_pack

    def flip(data: bytearray, entry: Any) -> bytearray:
        data[entry.offset + HEADER_SIZE + 100] ^= 0x01
        return data

    rewrite_pack(repo, damaged, flip)
    with reopen(backend_url) as fresh:
        assert_corrupt(fresh, damaged, "does not hash to its id")
        assert fresh.objects.get(intact) == random_bytes(11, 3000)


def test_flipped_header_byte_in_a_pack_is_corrupt(
    two_in_a_pack: tuple[Repository, ObjectId, ObjectId], backend_url: BackendURL
) -> None:
    repo, damaged, _ = two_in_a_pack

    def flip_magic(data: bytearray, entry: Any) -> bytearray:
        data[entry.offset] ^= 0xFF
        return data

    rewrite_pack(repo, damaged, flip_magic)
    with reopen(backend_url) as fresh:
        assert_corrupt(fresh, damaged, "magic")


@pytest.mark.parametrize("cut", ["inside-the-object", "before-the-object"])
def test_truncated_pack_is_corrupt(
    two_in_a_pack: tuple[Repository, ObjectId, ObjectId], backend_url: BackendURL, cut: str
) -> None:
    repo, _, second = two_in_a_pack  # the second object lies further into the pack

    def truncate(data: bytearray, entry: Any) -> bytearray:
        return data[: entry.offset + 50] if cut == "inside-the-object" else data[: entry.offset - 10]

    rewrite_pack(repo, second, truncate)
    with reopen(backend_url) as fresh:
        assert_corrupt(fresh, second, "truncated")


def test_missing_pack_is_corrupt_not_missing(
    two_in_a_pack: tuple[Repository, ObjectId, ObjectId], backend_url: BackendURL
) -> None:
    repo, first, second = two_in_a_pack
    assert repo.storage.delete(pack_key(repo.objects.locate(first).pack)) is True
    with reopen(backend_url) as fresh:
        assert fresh.objects.has(first)  # still indexed ...
        assert_corrupt(fresh, first, "missing")  # ... so its absence is damage
        assert_corrupt(fresh, second, "missing")


# -- abort -----------------------------------------------------------------------------------


def test_abort_leaves_no_unindexed_pack(repo: Repository, backend_url: BackendURL) -> None:
    chunks = [random_bytes(200 + i, 10_000) for i in range(30)]
    with pytest.raises(RuntimeError, match="training crashed"):
        with repo.objects.writer(pack_size=40_000) as w:
            # Small batches and no backlog: packs are stored during put(), long before
            # flush, as they would be for a multi-GB checkpoint.
            w.BATCH_BYTES = 20_000
            w.MAX_PENDING = 0
            kept = [w.put(ObjectType.CHUNK, c) for c in chunks[:10]]
            w.flush()
            dropped = [w.put(ObjectType.CHUNK, c) for c in chunks[10:]]
            assert w.stats.packs_written > len(kept) * 10_000 // 40_000
            assert stored_packs(repo.storage) - indexed_packs(repo.storage), "packs before flush"
            raise RuntimeError("training crashed")
    assert stored_packs(repo.storage) == indexed_packs(repo.storage)
    with reopen(backend_url) as fresh:
        assert [fresh.objects.get(i) for i in kept] == chunks[:10]
        assert not any(fresh.objects.has(i) for i in dropped)
    assert not any(repo.objects.has(i) for i in dropped)


def test_abort_before_anything_was_written(repo: Repository) -> None:
    with pytest.raises(ValueError):
        with repo.objects.writer() as w:
            oid = w.put(ObjectType.CHUNK, b"never flushed")
            raise ValueError("stop")
    assert repo.storage.list("packs/") == []
    assert repo.storage.list("index/") == []
    assert not repo.objects.has(oid)


# -- local cache of a remote repository ------------------------------------------------------


@pytest.mark.remote
def test_s3_second_open_reads_index_files_from_the_cache(
    s3_server: S3Server, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = s3_server.new_url("cache"), s3_server.storage_options
    with Repository.init(url, options) as repo:
        first = put_chunks(repo, [b"one", b"two"])
        with repo.objects.writer() as w:
            blob = w.put(ObjectType.BLOB, b"blob content")
        config_id = repo.config.id
    index_keys = [i.key for i in repo.storage.list("index/")]
    assert len(index_keys) == 2
    cached = sorted(p.relative_to(cache_dir / config_id).as_posix() for p in (cache_dir / config_id).rglob("*"))
    assert [k for k in cached if k.startswith("index/")] == sorted(index_keys)

    def count_reads(repo: Repository) -> list[str]:
        reads: list[str] = []
        original = repo.storage.read

        def spy(key: str) -> bytes:
            reads.append(key)
            return original(key)

        monkeypatch.setattr(repo.storage, "read", spy)
        return reads

    with Repository.open(url, options) as warm:
        reads = count_reads(warm)
        assert set(warm.objects.entries()) == {*first, blob}
        assert reads == []  # every index came from the cache
        assert warm.objects.get(blob) == b"blob content"
    assert (cache_dir / config_id / "objects" / blob).is_file()  # metadata objects are cached too

    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "empty-cache"))
    with Repository.open(url, options) as cold:
        reads = count_reads(cold)
        assert [cold.objects.get(i) for i in first] == [b"one", b"two"]
        assert sorted(reads) == sorted(index_keys)
    assert sorted(p.name for p in (tmp_path / "empty-cache" / config_id / "index").iterdir()) == sorted(
        k.rsplit("/", 1)[-1] for k in index_keys
    )


def test_object_db_on_bare_storage(tmp_path: Path) -> None:
    """ObjectDB needs only a Storage: no repository config, no cache."""
    db = ObjectDB(Storage.open(str(tmp_path / "bare")), workers=2)
    with db.writer() as w:
        oid = w.put(ObjectType.CHUNK, b"bare")
    assert ObjectDB(Storage.open(str(tmp_path / "bare"))).get(oid) == b"bare"
    db.close()


def test_storage_error_is_not_corruption(
    two_in_a_pack: tuple[Repository, ObjectId, ObjectId], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend failure (network, auth) must surface as StorageError, not as damage."""
    repo, first, _ = two_in_a_pack

    def failing(*args: object, **kwargs: object) -> Any:
        raise StorageError(repo.url, "read packs/..", "connection reset")

    monkeypatch.setattr(repo.storage, "read_range", failing)
    monkeypatch.setattr(repo.storage, "read_ranges", failing)
    for read in (lambda: repo.objects.get(first), lambda: list(repo.objects.iter_chunks([first]))):
        with pytest.raises(StorageError) as info:
            read()
        assert not isinstance(info.value, CorruptObject)
