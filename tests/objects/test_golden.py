"""Golden files: the on-disk encodings of format version N, committed under tests/golden/.

Every value here is rebuilt from deterministic inputs (integer arithmetic and xxhash only: no
RNG whose stream could change between library versions) and compared with the committed
files, so any change to an encoding, an id, or the chunk cut points fails this test unless
the format version is bumped and the golden files regenerated on purpose.

What is compared byte for byte, and what is not:
  * manifests (blobs, trees, a whole snapshot made by write_tree): bytes and ids;
  * chunk cut points of the default (and one small) FastCDC parameter set: exact lengths;
  * envelopes, pack footers and index files hold zstd output, which depends on the zstd
    library and on codec choices that may be optimized: their canonical *content* bytes and
    ids are compared, and the committed envelopes (one per codec: raw, zstd, bytegroup) must
    still *decode* to the same content. Freshly compressed bytes are not compared.
  * pack object regions are compared byte for byte (objects are sealed with the RAW codec).

Regenerate (only together with a format version bump, or an intended encoding change):

    .venv/bin/python tests/objects/test_golden.py --regenerate

The test itself never writes golden files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from keepsake.objects.chunking import Chunker, ChunkerParams
from keepsake.objects.codec import Codec
from keepsake.objects.envelope import FORMAT_VERSION as ENVELOPE_VERSION
from keepsake.objects.envelope import HEADER_SIZE, open_object, read_header, seal, unseal
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.manifests import (
    MODE_EXECUTABLE,
    MODE_FILE,
    MODE_SYMLINK,
    MODE_TREE,
    Blob,
    Tree,
    TreeEntry,
)
from keepsake.objects.pack import INDEX_VERSION, PackBuilder, PackEntry, decode_index, encode_index, read_pack_footer
from keepsake.objects.worktree import HashOnly, write_tree
from keepsake.repository import FORMAT_VERSION as REPOSITORY_VERSION

GOLDEN_ROOT = Path(__file__).resolve().parents[1] / "golden"
GOLDEN_DIR = GOLDEN_ROOT / f"format-v{REPOSITORY_VERSION}"
MANIFEST = GOLDEN_DIR / "golden.json"


# -- deterministic inputs ----------------------------------------------------------------------


def prng_bytes(n: int, seed: int) -> bytes:
    """n pseudo-random bytes from xxh3 of a counter: identical on every platform and version."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += xxhash.xxh3_128_digest(counter.to_bytes(8, "little"), seed=seed)
        counter += 1
    return bytes(out[:n])


def float32_bytes(count: int, seed: int) -> bytes:
    """Weights-like little-endian float32 (random mantissa, exponents 2^-7..2^0), built from bits."""
    words = np.frombuffer(prng_bytes(4 * count, seed), dtype="<u4")
    sign = (words >> np.uint32(31)) << np.uint32(31)
    exponent = (np.uint32(120) + (words >> np.uint32(23)) % np.uint32(8)) << np.uint32(23)
    mantissa = words & np.uint32(0x7FFFFF)
    return bytes((sign | exponent | mantissa).astype("<u4").tobytes())


def bf16_bytes(count: int, seed: int) -> bytes:
    return (np.frombuffer(float32_bytes(count, seed), dtype="<u4") >> np.uint32(16)).astype("<u2").tobytes()


_WORDS = b"keepsake stores every checkpoint of every training run once verified by id".split()


def text_bytes(n: int, seed: int) -> bytes:
    picks = prng_bytes(n, seed)
    out = bytearray()
    i = 0
    while len(out) < n:
        out += _WORDS[picks[i % len(picks)] % len(_WORDS)] + b" "
        i += 1
    return bytes(out[:n])


#: chunk contents, one per codec (the codec the committed envelope was written with)
CHUNKS: dict[str, tuple[bytes, Codec]] = {
    "chunk-float32": (float32_bytes(16384, seed=1), Codec.BYTEGROUP),
    "chunk-float32-tail3": (float32_bytes(3000, seed=2) + b"\x01\x02\x03", Codec.BYTEGROUP),
    "chunk-bf16": (bf16_bytes(20000, seed=3), Codec.BYTEGROUP),
    "chunk-text": (text_bytes(20000, seed=4), Codec.ZSTD),
    "chunk-random": (prng_bytes(5000, seed=5), Codec.RAW),
    "chunk-empty": (b"", Codec.RAW),
}

BOUNDARY_PARAMS = {
    "default": ChunkerParams(),
    "small": ChunkerParams(avg_size=4096, min_size=1024, max_size=16384),
}
BOUNDARY_INPUT_SIZE = 1 << 20


def boundary_input() -> bytes:
    # random bytes with runs of zeros and of text, so some cuts are content-defined and some forced
    parts = [prng_bytes(400_000, seed=10), bytes(300_000), text_bytes(200_000, seed=11)]
    data = b"".join(parts)
    return data + prng_bytes(BOUNDARY_INPUT_SIZE - len(data), seed=12)


def synthetic_chunk_id(i: int) -> ObjectId:
    return hash_object(ObjectType.CHUNK, f"chunk {i}".encode())


def manifests() -> dict[str, Blob | Tree]:
    """Hand-built manifests covering every field and mode."""
    inline = Blob(12, (), b"hello world\n")
    chunked = Blob(
        262144 + 65536 + 17, ((synthetic_chunk_id(0), 262144), (synthetic_chunk_id(1), 65536), (synthetic_chunk_id(2), 17))
    )
    empty_blob = Blob(0, (), b"")
    sub = Tree((TreeEntry("weights.bin", MODE_FILE, chunked.size, chunked.id),))
    tree = Tree(
        (
            TreeEntry("README.md", MODE_FILE, inline.size, inline.id),
            TreeEntry("train.sh", MODE_EXECUTABLE, inline.size, inline.id),
            TreeEntry("latest", MODE_SYMLINK, len(b"checkpoints/step-100"), None, "checkpoints/step-100"),
            TreeEntry("outside", MODE_SYMLINK, len("../../ï".encode()), None, "../../ï"),
            TreeEntry("checkpoints", MODE_TREE, sub.size, sub.id),
            TreeEntry("empty", MODE_TREE, 0, Tree().id),
            TreeEntry("naïve name.txt", MODE_FILE, 0, empty_blob.id),
        )
    )
    return {
        "blob-inline": inline,
        "blob-chunked": chunked,
        "blob-empty": empty_blob,
        "tree-empty": Tree(),
        "tree-sub": sub,
        "tree-all-modes": tree,
    }


#: a directory snapshotted with write_tree (default chunker); (kind, content or target)
SNAPSHOT_SPEC: dict[str, tuple[str, bytes | str]] = {
    "README.md": ("file", b"# demo\n"),
    "train.sh": ("exec", b"#!/bin/sh\npython train.py\n"),
    "latest": ("link", "checkpoints/step-100"),
    "checkpoints/step-100/weights.bin": ("file", float32_bytes(150_000, seed=20)),
    "checkpoints/step-100/config.json": ("file", b'{"lr": 0.001}\n'),
    "checkpoints/step-100/empty.txt": ("file", b""),
    "data/naïve name.txt": ("file", "héllo wörld\n".encode()),
    "data/sub dir/4095.bin": ("file", prng_bytes(4095, seed=21)),
    "data/sub dir/4096.bin": ("file", prng_bytes(4096, seed=22)),
    "data/link to dir": ("link", "../checkpoints"),
    "empty/nested/": ("dir", b""),
}


def materialize(root: Path) -> None:
    for rel, (kind, value) in SNAPSHOT_SPEC.items():
        path = root / rel
        if kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "link":
            assert isinstance(value, str)
            os.symlink(value, path)
        else:
            assert isinstance(value, bytes)
            path.write_bytes(value)
            os.chmod(path, 0o755 if kind == "exec" else 0o644)


class RecordingSink(HashOnly):
    """Hashes like HashOnly and keeps every manifest (not chunks) it is given."""

    def __init__(self) -> None:
        self.objects: dict[ObjectId, tuple[ObjectType, bytes]] = {}

    def put(self, object_type: ObjectType, data: bytes | memoryview, object_id: ObjectId | None = None) -> ObjectId:
        oid = super().put(object_type, data, object_id)
        if object_type != ObjectType.CHUNK:
            self.objects[oid] = (object_type, bytes(data))
        return oid


def snapshot(root: Path) -> tuple[ObjectId, dict[ObjectId, tuple[ObjectType, bytes]]]:
    sink = RecordingSink()
    tree_id, _ = write_tree(sink, Chunker(), str(root))
    return tree_id, sink.objects


def pack_objects() -> list[tuple[ObjectType, bytes]]:
    m = manifests()
    return [
        (ObjectType.BLOB, m["blob-inline"].encode()),
        (ObjectType.TREE, m["tree-all-modes"].encode()),
        (ObjectType.CHUNK, CHUNKS["chunk-random"][0][:1000]),
        (ObjectType.CHUNK, b""),
    ]


@dataclass
class BuiltPack:
    pack_id: ObjectId
    data: bytes
    entries: list[PackEntry]
    objects_end: int = field(default=0)


def build_pack() -> BuiltPack:
    builder = PackBuilder(1 << 16)
    for otype, content in pack_objects():
        builder.add(hash_object(otype, content), otype, len(content), seal(otype, content, codec=Codec.RAW))
    objects_end = builder.size
    pack_id, data, entries, _ = builder.finish()
    return BuiltPack(pack_id, bytes(data), entries, objects_end)


def entries_to_json(entries: list[PackEntry]) -> list[list[Any]]:
    return [[e.id, int(e.type), e.offset, e.length, e.raw_length] for e in entries]


# -- regeneration ------------------------------------------------------------------------------


def regenerate() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for old in GOLDEN_DIR.iterdir():
        old.unlink()
    doc: dict[str, Any] = {
        "versions": {"repository": REPOSITORY_VERSION, "envelope": ENVELOPE_VERSION, "index": INDEX_VERSION},
        "regenerate": "python tests/objects/test_golden.py --regenerate",
        "manifests": {},
        "chunks": {},
    }
    for name, value in manifests().items():
        (GOLDEN_DIR / f"{name}.msgpack").write_bytes(value.encode())
        doc["manifests"][name] = {"type": value.TYPE.label, "id": value.id, "file": f"{name}.msgpack"}
    for name, (content, codec) in CHUNKS.items():
        env = seal(ObjectType.CHUNK, content, codec=Codec.RAW if codec == Codec.RAW else None)
        got = Codec(read_header(env, name).codec)
        if got != codec:
            raise SystemExit(f"{name}: compress() now picks {got.name}, expected {codec.name}; update CHUNKS")
        (GOLDEN_DIR / f"{name}.envelope").write_bytes(env)
        doc["chunks"][name] = {
            "id": hash_object(ObjectType.CHUNK, content),
            "length": len(content),
            "codec": codec.name.lower(),
            "file": f"{name}.envelope",
        }
    data = boundary_input()
    doc["chunk_boundaries"] = {
        "input": "boundary_input() in tests/objects/test_golden.py",
        "input_xxh3_128": xxhash.xxh3_128_hexdigest(data),
        **{
            name: {"params": params.to_dict(), "lengths": [len(c) for c in Chunker(params).cut_bytes(data)]}
            for name, params in BOUNDARY_PARAMS.items()
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        materialize(Path(tmp))
        root_id, objects = snapshot(Path(tmp))
    snap: dict[str, Any] = {"root": root_id, "objects": {}}
    for oid, (otype, content) in sorted(objects.items()):
        fname = f"snapshot-{otype.label}-{oid}.msgpack"
        (GOLDEN_DIR / fname).write_bytes(content)
        snap["objects"][oid] = {"type": otype.label, "file": fname}
    doc["snapshot"] = snap
    pack = build_pack()
    (GOLDEN_DIR / f"{pack.pack_id}.pack").write_bytes(pack.data)
    doc["pack"] = {
        "id": pack.pack_id,
        "file": f"{pack.pack_id}.pack",
        "objects_end": pack.objects_end,
        "entries": entries_to_json(pack.entries),
    }
    index_id, index_bytes = encode_index({pack.pack_id: pack.entries})
    (GOLDEN_DIR / f"index-{index_id}").write_bytes(index_bytes)
    doc["index"] = {"id": index_id, "file": f"index-{index_id}"}
    MANIFEST.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(list(GOLDEN_DIR.iterdir()))} files to {GOLDEN_DIR}")


# -- tests -------------------------------------------------------------------------------------


def golden() -> dict[str, Any]:
    assert MANIFEST.is_file(), (
        f"no golden files for repository format {REPOSITORY_VERSION} at {GOLDEN_DIR}; a format version "
        "was bumped: run `python tests/objects/test_golden.py --regenerate` and commit the result"
    )
    doc: dict[str, Any] = json.loads(MANIFEST.read_text(encoding="utf-8"))
    return doc


def read(name: str) -> bytes:
    return (GOLDEN_DIR / name).read_bytes()


def test_format_versions_match_the_golden_files() -> None:
    # bumping a version without regenerating (or changing an encoding without bumping) fails here
    assert golden()["versions"] == {
        "repository": REPOSITORY_VERSION,
        "envelope": ENVELOPE_VERSION,
        "index": INDEX_VERSION,
    }


def test_golden_directory_holds_exactly_the_listed_files() -> None:
    doc = golden()
    listed = {"golden.json", doc["pack"]["file"], doc["index"]["file"]}
    listed |= {m["file"] for m in doc["manifests"].values()}
    listed |= {c["file"] for c in doc["chunks"].values()}
    listed |= {o["file"] for o in doc["snapshot"]["objects"].values()}
    assert {p.name for p in GOLDEN_DIR.iterdir()} == listed


def test_manifest_bytes_and_ids() -> None:
    doc = golden()["manifests"]
    values = manifests()
    assert sorted(doc) == sorted(values)
    for name, value in values.items():
        stored = read(doc[name]["file"])
        assert value.encode() == stored, f"{name}: encoding changed"
        assert value.id == doc[name]["id"], f"{name}: id changed"
        assert hash_object(value.TYPE, stored) == doc[name]["id"]
        assert value.TYPE.label == doc[name]["type"]
        assert type(value).decode(stored, name) == value


def test_chunk_contents_and_ids() -> None:
    doc = golden()["chunks"]
    assert sorted(doc) == sorted(CHUNKS)
    for name, (content, _) in CHUNKS.items():
        assert len(content) == doc[name]["length"]
        assert hash_object(ObjectType.CHUNK, content) == doc[name]["id"], f"{name}: generator or id changed"


def test_committed_envelopes_still_decode() -> None:
    # one envelope per codec, written by an earlier build: every codec must keep reading them
    doc = golden()["chunks"]
    codecs_seen = set()
    for name, (content, _) in CHUNKS.items():
        env = read(doc[name]["file"])
        header = read_header(env, name)
        assert Codec(header.codec).name.lower() == doc[name]["codec"]
        codecs_seen.add(header.codec)
        assert header.raw_length == len(content)
        assert open_object(env, ObjectId(doc[name]["id"])) == (ObjectType.CHUNK, content)
    assert codecs_seen == {Codec.RAW, Codec.ZSTD, Codec.BYTEGROUP}


def test_fresh_envelopes_decode_to_the_same_content() -> None:
    doc = golden()["chunks"]
    for name, (content, _) in CHUNKS.items():
        env = seal(ObjectType.CHUNK, content)
        assert open_object(env, ObjectId(doc[name]["id"])) == (ObjectType.CHUNK, content)


def test_chunk_boundaries() -> None:
    doc = golden()["chunk_boundaries"]
    data = boundary_input()
    assert xxhash.xxh3_128_hexdigest(data) == doc["input_xxh3_128"]
    for name, params in BOUNDARY_PARAMS.items():
        assert doc[name]["params"] == params.to_dict()
        got = [len(c) for c in Chunker(params).cut_bytes(data)]
        assert got == doc[name]["lengths"], f"{name}: cut points changed: dedup against old data breaks"


def test_write_tree_snapshot_bytes_and_ids(tmp_path: Path) -> None:
    doc = golden()["snapshot"]
    materialize(tmp_path)
    root_id, objects = snapshot(tmp_path)
    assert root_id == doc["root"]
    assert sorted(objects) == sorted(doc["objects"])
    for oid, (otype, content) in objects.items():
        assert otype.label == doc["objects"][oid]["type"]
        assert content == read(doc["objects"][oid]["file"]), f"{otype.label} {oid}: encoding changed"
        assert hash_object(otype, content) == oid
    # the chunked file really is chunked, the 4095-byte file inline, the 4096-byte one not
    blobs = [Blob.decode(c) for t, c in objects.values() if t == ObjectType.BLOB]
    assert any(len(b.chunks) > 1 for b in blobs)
    assert any(b.inline is not None and b.size == 4095 for b in blobs)
    assert any(b.inline is None and b.size == 4096 for b in blobs)


def test_pack_footer_and_objects() -> None:
    doc = golden()["pack"]
    stored = read(doc["file"])
    assert xxhash.xxh3_128_hexdigest(stored) == doc["id"]  # a pack is named by its bytes
    entries = read_pack_footer(doc["id"], stored, len(stored))
    assert entries_to_json(entries) == doc["entries"]
    for entry, (otype, content) in zip(entries, pack_objects()):
        assert entry.type == otype and entry.raw_length == len(content)
        assert open_object(stored[entry.offset : entry.end], entry.id) == (otype, content)
    fresh = build_pack()
    assert entries_to_json(fresh.entries) == doc["entries"]
    assert fresh.objects_end == doc["objects_end"]
    assert fresh.data[: fresh.objects_end] == stored[: doc["objects_end"]]
    # the footer envelope may be compressed differently; its content may not differ
    fresh_footer = fresh.data[fresh.objects_end : -8]
    stored_footer = stored[doc["objects_end"] : -8]
    assert unseal(fresh_footer, "fresh") == unseal(stored_footer, "golden")
    assert stored[-4:] == b"KSKP"
    assert int.from_bytes(stored[-8:-4], "little") == len(stored_footer)


def test_index_file() -> None:
    doc = golden()
    stored = read(doc["index"]["file"])
    index_id = doc["index"]["id"]
    packs = decode_index(stored, index_id)
    assert list(packs) == [doc["pack"]["id"]]
    assert entries_to_json(packs[doc["pack"]["id"]]) == doc["pack"]["entries"]
    # re-encode from freshly built entries, named by the golden pack id (the pack id hashes the
    # footer envelope, whose compression may legitimately change)
    fresh = build_pack()
    pack_id = doc["pack"]["id"]
    fresh_entries = [PackEntry(e.id, e.type, pack_id, e.offset, e.length, e.raw_length) for e in fresh.entries]
    fresh_id, fresh_bytes = encode_index({pack_id: fresh_entries})
    assert fresh_id == index_id
    assert unseal(fresh_bytes, "fresh") == unseal(stored, "golden")
    assert len(stored) > HEADER_SIZE


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        raise SystemExit(__doc__)
    regenerate()
