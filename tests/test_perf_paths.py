"""The batched ingest and checkout paths: sealing a batch into one buffer, adding it to packs
as runs, decoding straight into a buffer, and BlobReader's windows.

Each fast path is checked against the plain one it replaces (seal_many, PackBuilder.add,
decompress, iter_chunks), byte for byte.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from keepsake.errors import CorruptObject, ObjectNotFound
from keepsake.objects import database
from keepsake.objects.chunking import Chunker, ChunkerParams
from keepsake.objects.codec import Codec, compress, decompress, decompress_into
from keepsake.objects.database import BlobReader
from keepsake.objects.envelope import HEADER_SIZE, open_object, open_object_into, seal_batch, seal_many
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.manifests import Blob
from keepsake.objects.pack import PackBuilder, read_pack_footer
from keepsake.objects.worktree import write_blob_from_file, write_file
from keepsake.repository import Repository

_rng = np.random.default_rng(7)
FLOAT32 = (_rng.standard_normal(40_000) * 0.02).astype(np.float32).tobytes()
SAMPLES: dict[str, bytes] = {
    "empty": b"",
    "3 bytes": b"abc",
    "float32": FLOAT32,
    "float32+3": FLOAT32[:50_003],
    "float32 odd": FLOAT32[:4097],
    "random": _rng.bytes(70_000),
    "text": b"every checkpoint is stored once " * 3000,
    "zeros": bytes(65_536),
}


def model_bytes(seed: int, size: int) -> bytes:
    """float32 weights (bytegroup), with a stretch of random bytes (raw) and of text (zstd)."""
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal(size // 4) * 0.02).astype(np.float32).tobytes()
    return weights[: size // 2] + rng.bytes(size // 8) + b"text " * (size // 40) + weights[size // 2 :]


def pack_path(tmp_path: Path, pack: str) -> Path:
    """The file of ``pack`` in the repository of the ``repo`` fixture."""
    return tmp_path / "repo" / "packs" / pack[:2] / f"{pack}.pack"


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    with Repository.init(str(tmp_path / "repo")) as repo:
        yield repo


# -- sealing a batch ----------------------------------------------------------------------


@pytest.mark.parametrize("reuse", [None, "small", "large"])
def test_seal_batch_holds_the_envelopes_of_seal_many(reuse: str | None) -> None:
    items = [(ObjectType.CHUNK, data) for data in SAMPLES.values()]
    items.append((ObjectType.BLOB, memoryview(FLOAT32)[:8000]))
    expected = [header + bytes(payload) for header, payload in seal_many(items)]
    total = sum(map(len, expected))
    buffer = {None: None, "small": bytearray(10), "large": bytearray(b"\xff" * (total + 999))}[reuse]
    sealed = seal_batch(items, buffer)
    if reuse == "large":
        assert sealed.buffer is buffer
    assert sealed.ends[-1] == total
    starts = [0, *sealed.ends[:-1]]
    got = [bytes(sealed.buffer[s:e]) for s, e in zip(starts, sealed.ends)]
    assert got == expected
    for (otype, data), envelope in zip(items, got):
        assert open_object(envelope, hash_object(otype, data)) == (otype, bytes(data))


def test_seal_batch_of_more_than_one_transposition_group() -> None:
    # > 4 MiB of float chunks: the second group must not overwrite the first one's planes
    chunks = [model_bytes(i, 300_000)[:262_144] for i in range(20)]
    items = [(ObjectType.CHUNK, c) for c in chunks]
    sealed = seal_batch(items)
    starts = [0, *sealed.ends[:-1]]
    for c, s, e in zip(chunks, starts, sealed.ends):
        assert open_object(memoryview(sealed.buffer)[s:e], hash_object(ObjectType.CHUNK, c))[1] == c


# -- packs from runs ----------------------------------------------------------------------


def test_add_run_gives_the_pack_of_add() -> None:
    items = [(ObjectType.CHUNK, data) for data in SAMPLES.values()]
    sealed = seal_batch(items)
    one_by_one, runs = PackBuilder(1 << 20), PackBuilder(1 << 20)
    starts = [0, *sealed.ends[:-1]]
    meta = []
    for (otype, data), s, e in zip(items, starts, sealed.ends):
        oid = hash_object(otype, data)
        env = bytes(sealed.buffer[s:e])
        one_by_one.add(oid, otype, len(data), env[:HEADER_SIZE], env[HEADER_SIZE:])
        meta.append((oid, otype, e - s, len(data)))
    runs.add_run(memoryview(sealed.buffer)[: sealed.ends[2]], meta[:3])
    runs.add_run(memoryview(sealed.buffer)[sealed.ends[2] : sealed.ends[-1]], meta[3:])
    a, b = one_by_one.finish(), runs.finish()
    assert (a[0], bytes(a[1]), a[2]) == (b[0], bytes(b[1]), b[2])


def test_add_run_refuses_lengths_that_do_not_add_up() -> None:
    builder = PackBuilder(1 << 20)
    oid = hash_object(ObjectType.CHUNK, b"x")
    with pytest.raises(ValueError):
        builder.add_run(b"0123456789", [(oid, ObjectType.CHUNK, 9, 1)])
    assert builder.size == 0 and len(builder) == 0


def test_writer_closes_packs_at_the_first_object_past_the_pack_size(repo: Repository, tmp_path: Path) -> None:
    chunks = [model_bytes(i, 20_000 + 3_001 * (i % 7)) for i in range(120)]
    pack_size = 300_000
    with repo.objects.writer(pack_size=pack_size) as w:
        ids = [w.put(ObjectType.CHUNK, c) for c in chunks]
    assert w.stats.packs_written >= 4
    packs: dict[str, list[ObjectId]] = {}
    for oid in ids:
        packs.setdefault(repo.objects.locate(oid).pack, []).append(oid)
    order = [repo.objects.locate(ids[0]).pack]
    for oid in ids:
        if repo.objects.locate(oid).pack != order[-1]:
            order.append(repo.objects.locate(oid).pack)
    assert len(order) == len(packs)  # each pack holds a run of consecutive puts
    for pack in order[:-1]:
        entries = sorted((repo.objects.locate(o) for o in packs[pack]), key=lambda e: e.offset)
        end = entries[-1].end
        assert end >= pack_size > entries[-1].offset  # the last object took it past the size
    for oid, data in zip(ids, chunks):
        assert repo.objects.get(oid) == data
    # the footers agree with the index
    for pack in order:
        raw = pack_path(tmp_path, pack).read_bytes()
        footer = {e.id: e for e in read_pack_footer(pack, raw, len(raw))}
        assert all(footer[o] == repo.objects.locate(o) for o in packs[pack])


# -- decoding into a buffer ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_decompress_into_matches_decompress(name: str) -> None:
    data = SAMPLES[name]
    codec, payload = compress(data)
    out = bytearray(b"\xee" * len(data))
    decompress_into(codec, payload, memoryview(out), "x")
    assert bytes(out) == data == decompress(codec, payload, len(data), "x")


@pytest.mark.parametrize("stride", [2, 8])
def test_decompress_into_other_strides(stride: int) -> None:
    # compress() writes stride 4; the format allows 2 and 8: planes stored raw here
    data = FLOAT32[:4003]
    n = len(data) // stride * stride
    planes = [data[q:n:stride] for q in range(stride)]
    payload = bytes([stride]) + b"".join(bytes([0]) + len(p).to_bytes(4, "little") for p in planes)
    payload += b"".join(planes) + data[n:]
    out = bytearray(len(data))
    decompress_into(Codec.BYTEGROUP, payload, memoryview(out), "x")
    assert bytes(out) == data == decompress(Codec.BYTEGROUP, payload, len(data), "x")


@pytest.mark.parametrize("name", ["float32", "float32+3", "random", "text"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_decompress_into_a_buffer_of_the_wrong_size_is_corrupt(name: str, delta: int) -> None:
    data = SAMPLES[name]
    codec, payload = compress(data)
    with pytest.raises(CorruptObject):
        decompress_into(codec, payload, memoryview(bytearray(len(data) + delta)), "x")


def test_open_object_into_checks_size_and_hash() -> None:
    data = SAMPLES["float32+3"]
    oid = hash_object(ObjectType.CHUNK, data)
    envelope = seal_many([(ObjectType.CHUNK, data)])[0]
    buf = envelope[0] + envelope[1]
    out = bytearray(len(data))
    assert open_object_into(buf, oid, memoryview(out)) == ObjectType.CHUNK and bytes(out) == data
    with pytest.raises(CorruptObject, match="expected"):
        open_object_into(buf, oid, memoryview(bytearray(len(data) - 1)))
    bad = bytearray(buf)
    bad[-10] ^= 1
    with pytest.raises(CorruptObject):
        open_object_into(bytes(bad), oid, memoryview(out))
    with pytest.raises(CorruptObject, match="hash"):
        open_object_into(buf, hash_object(ObjectType.CHUNK, b"other"), memoryview(out))


# -- BlobReader and write_file ------------------------------------------------------------


@pytest.fixture
def stored(repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Repository, Blob, bytes]:
    monkeypatch.setattr(BlobReader, "WINDOW", 50_000)  # many windows, some read ahead
    data = model_bytes(1, 700_003)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    chunker = Chunker(ChunkerParams(avg_size=8192, min_size=2048, max_size=32768))
    with repo.objects.writer(pack_size=100_000) as w:
        _, blob = write_blob_from_file(w, chunker, str(path))
    assert len(blob.chunks) > 40 and w.stats.packs_written > 3
    return repo, blob, data


def test_blob_reader_random_reads(stored: tuple[Repository, Blob, bytes]) -> None:
    repo, blob, data = stored
    reader = BlobReader(repo.objects, blob)
    rng = random.Random(3)
    for _ in range(200):
        pos = rng.randrange(len(data) + 10)
        size = rng.choice([1, 17, 4096, 60_000, 200_000])
        reader.seek(pos)
        buf = bytearray(size)
        n = reader.readinto(buf)
        assert bytes(buf[:n]) == data[pos : pos + size][:n]
        assert n == min(size, max(0, len(data) - pos), n) and (n > 0 or pos >= len(data))
    reader.seek(0)
    assert b"".join(iter(lambda: reader.read(33_333), b"")) == data
    reader.close()


def test_blob_reader_views_from_any_position(stored: tuple[Repository, Blob, bytes]) -> None:
    repo, blob, data = stored
    for pos in (0, 1, 49_999, 50_000, 123_457, len(data) - 1, len(data)):
        reader = BlobReader(repo.objects, blob)
        reader.seek(pos)
        assert b"".join(bytes(v) for v in reader.iter_views()) == data[pos:]
        assert reader.tell() == len(data)
        reader.close()


def test_open_blob_reads_like_a_file(stored: tuple[Repository, Blob, bytes]) -> None:
    repo, blob, data = stored
    with repo.objects.open_blob(blob) as f:
        assert f.read(10) == data[:10]
        f.seek(-5, os.SEEK_END)
        assert f.read() == data[-5:]
        f.seek(300_000)
        assert f.read(100_000) == data[300_000:400_000]


def test_write_file_is_byte_identical(stored: tuple[Repository, Blob, bytes], tmp_path: Path) -> None:
    repo, blob, data = stored
    out = tmp_path / "out.bin"
    write_file(repo.objects, blob, str(out), executable=True)
    assert out.read_bytes() == data
    assert os.stat(out).st_mode & 0o777 == 0o755
    write_file(repo.objects, Blob(3, (), b"abc"), str(out))
    assert out.read_bytes() == b"abc"


def test_write_file_of_a_blob_with_a_wrong_chunk_length_is_corrupt(
    stored: tuple[Repository, Blob, bytes], tmp_path: Path
) -> None:
    repo, blob, data = stored
    chunks = list(blob.chunks)
    (a, na), (b, nb) = chunks[10], chunks[11]
    chunks[10:12] = [(a, na + 1), (b, nb - 1)]  # same total size: only the chunk check can tell
    with pytest.raises(CorruptObject):
        write_file(repo.objects, Blob(blob.size, tuple(chunks)), str(tmp_path / "out.bin"))


def test_a_missing_chunk_fails_only_the_window_that_needs_it(stored: tuple[Repository, Blob, bytes]) -> None:
    repo, blob, data = stored
    chunks = list(blob.chunks)
    probe = BlobReader(repo.objects, blob)
    index, upto = probe._bounds[3], probe._window_starts[2] + 10  # first chunk of window 3
    chunks[index] = (hash_object(ObjectType.CHUNK, b"never stored"), chunks[index][1])
    reader = BlobReader(repo.objects, Blob(blob.size, tuple(chunks)))
    head = b""
    while len(head) < upto:  # a raw read returns at most the rest of one window
        head += reader.read(upto - len(head))
    assert head == data[:upto]  # while window 3, with the missing chunk, is already scheduled
    assert [w for w, _ in reader._ahead] == [3] and reader._ahead[0][1].exception() is not None
    with pytest.raises(ObjectNotFound):
        b"".join(bytes(v) for v in reader.iter_views())
    reader.close()


def test_a_damaged_pack_reads_as_corrupt(stored: tuple[Repository, Blob, bytes], tmp_path: Path) -> None:
    repo, blob, _ = stored
    entry = repo.objects.locate(blob.chunks[20][0])
    path = pack_path(tmp_path, entry.pack)
    raw = bytearray(path.read_bytes())
    raw[entry.end - 3] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptObject):
        write_file(repo.objects, blob, str(tmp_path / "out.bin"))


def test_iter_chunks_still_matches(stored: tuple[Repository, Blob, bytes]) -> None:
    repo, blob, data = stored
    assert b"".join(repo.objects.iter_chunks(cid for cid, _ in blob.chunks)) == data


def test_window_bounds_cover_every_chunk_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BlobReader, "WINDOW", 100)
    ids = [hash_object(ObjectType.CHUNK, bytes([i])) for i in range(7)]
    blob = Blob(7 * 60, tuple((i, 60) for i in ids))
    reader = BlobReader(database.ObjectDB.__new__(database.ObjectDB), blob)
    assert reader._bounds == [0, 2, 4, 6, 7]
    assert reader._window_starts == [0, 120, 240, 360, 420]
