"""Pack files and index files (keepsake.objects.pack, FORMAT.md §6, §7)."""

from __future__ import annotations

import random

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from keepsake.errors import CorruptObject
from keepsake.objects.envelope import HEADER_SIZE, open_object, seal, seal_parts
from keepsake.objects.ids import ID_BYTES, CONTENT_TYPES, ObjectId, ObjectType, hash_object, id_to_bytes
from keepsake.objects.wire import pack_msgpack
from keepsake.objects.pack import (
    INDEX_VERSION,
    PACK_MAGIC,
    TRAILER,
    PackBuilder,
    PackEntry,
    PackId,
    decode_index,
    encode_index,
    index_key,
    pack_id_of_key,
    pack_key,
    read_pack_footer,
)

#: Byte 7 of an envelope header is "flags"; FORMAT.md §3 lets v1 readers ignore it.
FLAGS_OFFSET = 7

Item = tuple[ObjectType, bytes]


def build_pack(items: list[Item], capacity: int = 1 << 16) -> tuple[PackId, bytes, list[PackEntry]]:
    builder = PackBuilder(capacity)
    for object_type, data in items:
        builder.add(hash_object(object_type, data), object_type, len(data), *seal_parts(object_type, data))
    pack_id, view, entries, _ = builder.finish()
    return pack_id, bytes(view), entries


ITEMS: list[Item] = [
    (ObjectType.CHUNK, bytes(5000)),
    (ObjectType.CHUNK, random.Random(1).randbytes(3000)),
    (ObjectType.BLOB, b"blob"),
    (ObjectType.TREE, b""),
    (ObjectType.CHECKPOINT, b"checkpoint" * 50),
    (ObjectType.EXPERIMENT, b"experiment"),
]


# -- packs -----------------------------------------------------------------------------------


def test_finish_then_read_pack_footer_gives_the_same_entries() -> None:
    pack_id, data, entries = build_pack(ITEMS)
    assert pack_id == xxhash.xxh3_128_hexdigest(data)
    assert [(e.id, e.type, e.raw_length) for e in entries] == [
        (hash_object(t, d), t, len(d)) for t, d in ITEMS
    ]
    assert all(e.pack == pack_id for e in entries)
    assert read_pack_footer(pack_id, data, len(data)) == entries
    for entry, (object_type, content) in zip(entries, ITEMS):
        assert open_object(data[entry.offset : entry.end], entry.id) == (object_type, content)


def test_entries_are_back_to_back_from_offset_zero() -> None:
    _, data, entries = build_pack(ITEMS)
    assert entries[0].offset == 0
    for before, after in zip(entries, entries[1:]):
        assert after.offset == before.end
    footer_length, magic = TRAILER.unpack(data[-TRAILER.size :])
    assert magic == PACK_MAGIC
    assert entries[-1].end + footer_length + TRAILER.size == len(data)


def test_read_pack_footer_from_the_tail_only() -> None:
    """A reader fetches only the last bytes of a pack; offsets stay absolute."""
    pack_id, data, entries = build_pack(ITEMS)
    footer_length, _ = TRAILER.unpack(data[-TRAILER.size :])
    needed = footer_length + TRAILER.size
    assert read_pack_footer(pack_id, data[-needed:], len(data)) == entries
    with pytest.raises(CorruptObject, match=f"needs {needed} bytes"):
        read_pack_footer(pack_id, data[-(needed - 1) :], len(data))


def test_builder_grows_past_its_capacity_and_is_reusable() -> None:
    builder = PackBuilder(16)  # far smaller than one object
    first: list[Item] = [(ObjectType.CHUNK, random.Random(2).randbytes(1000)), (ObjectType.BLOB, b"x")]
    for t, d in first:
        builder.add(hash_object(t, d), t, len(d), *seal_parts(t, d))
    assert len(builder) == 2 and builder.size > 1000
    pack1, view1, entries1, buf1 = builder.finish()
    data1 = bytes(view1)
    assert (len(builder), builder.size) == (0, 0)
    builder.recycle(buf1)  # the first pack is stored: its buffer may be reused

    second: list[Item] = [(ObjectType.TREE, b"tree")]
    for t, d in second:
        builder.add(hash_object(t, d), t, len(d), *seal_parts(t, d))
    pack2, view2, entries2, _ = builder.finish()
    data2 = bytes(view2)
    assert pack1 != pack2
    assert read_pack_footer(pack1, data1, len(data1)) == entries1
    assert read_pack_footer(pack2, data2, len(data2)) == entries2
    assert [e.id for e in entries2] == [hash_object(ObjectType.TREE, b"tree")]
    assert open_object(data2[entries2[0].offset : entries2[0].end], entries2[0].id) == (ObjectType.TREE, b"tree")


def test_empty_pack_round_trips() -> None:
    pack_id, data, entries = build_pack([])
    assert entries == []
    assert read_pack_footer(pack_id, data, len(data)) == []


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(CONTENT_TYPES)), st.binary(max_size=3000)),
        max_size=12,
    )
)
def test_pack_round_trip_property(items: list[Item]) -> None:
    pack_id, data, entries = build_pack(items, capacity=256)
    assert read_pack_footer(pack_id, data, len(data)) == entries
    for entry, (object_type, content) in zip(entries, items):
        assert open_object(data[entry.offset : entry.end], entry.id) == (object_type, content)


@pytest.mark.parametrize("cut", [1, 4, 8, 20, 100])
def test_truncated_pack_is_corrupt(cut: int) -> None:
    pack_id, data, _ = build_pack(ITEMS)
    truncated = data[:-cut]
    with pytest.raises(CorruptObject) as info:
        read_pack_footer(pack_id, truncated, len(truncated))
    assert info.value.object_id == pack_id


@pytest.mark.parametrize("length", [0, 1, TRAILER.size - 1])
def test_pack_shorter_than_its_trailer_is_corrupt(length: int) -> None:
    pack_id, data, _ = build_pack(ITEMS)
    with pytest.raises(CorruptObject, match="shorter than its trailer"):
        read_pack_footer(pack_id, data[:length], length)


def test_every_truncation_of_a_pack_is_corrupt() -> None:
    pack_id, data, _ = build_pack(ITEMS[2:])
    for length in range(len(data)):
        with pytest.raises(CorruptObject):
            read_pack_footer(pack_id, data[:length], length)


def _pack_with_footer(wire_entries: object, body: bytes = bytes(64), footer_type: ObjectType = ObjectType.PACK_FOOTER) -> bytes:
    footer = seal(footer_type, pack_msgpack(wire_entries))
    return body + footer + TRAILER.pack(len(footer), PACK_MAGIC)


@pytest.mark.parametrize(
    "wire,reason",
    [
        ({"not": "a list"}, "not a list"),
        ([[b"x" * ID_BYTES, 1, 0, 20]], "malformed entry"),
        ([[b"short", 1, 0, 20, 4]], "id is malformed"),
        ([[b"x" * ID_BYTES, 1, -1, 20, 4]], "bad number"),
        ([[b"x" * ID_BYTES, 1, 0, "20", 4]], "bad number"),
        ([[b"x" * ID_BYTES, 99, 0, 20, 4]], "unknown type 99"),
        ([[b"x" * ID_BYTES, 1, 0, HEADER_SIZE - 1, 4]], "outside the pack"),
        ([[b"x" * ID_BYTES, 1, 50, 20, 4]], "outside the pack"),  # 50 + 20 > 64-byte body
    ],
)
def test_malformed_footer_is_corrupt(wire: object, reason: str) -> None:
    data = _pack_with_footer(wire)
    pack_id = PackId(xxhash.xxh3_128_hexdigest(data))
    with pytest.raises(CorruptObject, match=reason):
        read_pack_footer(pack_id, data, len(data))


def test_footer_of_the_wrong_type_is_corrupt() -> None:
    data = _pack_with_footer([], footer_type=ObjectType.CHUNK)
    with pytest.raises(CorruptObject, match="wrong type"):
        read_pack_footer(PackId("0" * 32), data, len(data))


def test_wrong_trailer_magic_is_corrupt() -> None:
    pack_id, data, _ = build_pack(ITEMS)
    with pytest.raises(CorruptObject, match="magic"):
        read_pack_footer(pack_id, data[:-4] + b"XXXX", len(data))


def test_pack_and_index_keys() -> None:
    pack_id = PackId("ab" + "0" * 30)
    assert pack_key(pack_id) == f"packs/ab/{pack_id}.pack"
    assert pack_id_of_key(pack_key(pack_id)) == pack_id
    assert pack_id_of_key("packs/ab/not-a-pack.txt") is None
    assert pack_id_of_key(f"index/{pack_id}.pack") is None
    assert index_key("f" * 32) == "index/" + "f" * 32


# -- index files -----------------------------------------------------------------------------


def _packs() -> dict[PackId, list[PackEntry]]:
    out: dict[PackId, list[PackEntry]] = {}
    for n in range(3):
        pack_id, _, entries = build_pack(ITEMS[n:])
        out[pack_id] = entries
    return out


def test_index_round_trip() -> None:
    packs = _packs()
    index_id, data = encode_index(packs)
    assert len(index_id) == 32
    assert decode_index(data, index_id) == packs


def test_index_id_does_not_depend_on_dict_order() -> None:
    packs = _packs()
    reordered = dict(reversed(list(packs.items())))
    assert encode_index(packs) == encode_index(reordered)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.binary(min_size=ID_BYTES, max_size=ID_BYTES).map(lambda b: PackId(b.hex())),
        st.lists(
            st.tuples(
                st.binary(min_size=ID_BYTES, max_size=ID_BYTES).map(lambda b: ObjectId(b.hex())),
                st.sampled_from(sorted(CONTENT_TYPES)),
                st.integers(0, 1 << 40),
                st.integers(HEADER_SIZE, 1 << 32),
                st.integers(0, 1 << 32),
            ),
            max_size=8,
        ),
        max_size=4,
    )
)
def test_index_round_trip_property(raw: dict[PackId, list[tuple[ObjectId, ObjectType, int, int, int]]]) -> None:
    packs = {pid: [PackEntry(i, t, pid, o, n, r) for i, t, o, n, r in rows] for pid, rows in raw.items()}
    index_id, data = encode_index(packs)
    assert decode_index(data, index_id) == packs


def test_index_with_the_wrong_name_is_corrupt() -> None:
    index_id, data = encode_index(_packs())
    other = ("0" if index_id[0] != "0" else "1") + index_id[1:]
    with pytest.raises(CorruptObject, match="does not hash to its name") as info:
        decode_index(data, other)
    assert info.value.object_id == other


def test_every_flipped_byte_of_an_index_is_corrupt() -> None:
    """The index id hashes its content, and the header is checked: no tampering goes unseen
    (except the flags byte, which v1 readers ignore by design, FORMAT.md §3)."""
    index_id, data = encode_index(_packs())
    for position in range(len(data)):
        if position == FLAGS_OFFSET:
            continue
        for mask in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[position] ^= mask
            with pytest.raises(CorruptObject):
                decode_index(bytes(tampered), index_id)


def test_every_truncation_of_an_index_is_corrupt() -> None:
    index_id, data = encode_index(_packs())
    for length in range(len(data)):
        with pytest.raises(CorruptObject):
            decode_index(data[:length], index_id)
    with pytest.raises(CorruptObject):
        decode_index(data + b"\x00", index_id)


def _signed_index(doc: object, object_type: ObjectType = ObjectType.INDEX) -> tuple[str, bytes]:
    """An index file whose name matches its content, so only its structure is wrong."""
    content = pack_msgpack(doc)
    return xxhash.xxh3_128_hexdigest(content, seed=int(ObjectType.INDEX)), seal(object_type, content)


GOOD_ID = id_to_bytes(hash_object(ObjectType.CHUNK, b"x"))


@pytest.mark.parametrize(
    "doc,reason",
    [
        ({"version": INDEX_VERSION + 1, "packs": []}, "unknown version"),
        ({"packs": []}, "unknown version"),
        ({"version": INDEX_VERSION, "packs": {}}, "malformed"),
        ([1, 2], "malformed"),
        ({"version": INDEX_VERSION, "packs": [[b"short", []]]}, "pack record is malformed"),
        ({"version": INDEX_VERSION, "packs": [[GOOD_ID]]}, "pack record is malformed"),
        ({"version": INDEX_VERSION, "packs": [[GOOD_ID, [[GOOD_ID, 1, 0, 20]]]]}, "malformed entry"),
        ({"version": INDEX_VERSION, "packs": [[GOOD_ID, [[GOOD_ID, 1, -5, 20, 4]]]]}, "bad number"),
        ({"version": INDEX_VERSION, "packs": [[GOOD_ID, [[GOOD_ID, 42, 0, 20, 4]]]]}, "unknown type 42"),
        ({"version": INDEX_VERSION, "packs": [[GOOD_ID, [[GOOD_ID, 1, 0, 3, 4]]]]}, "outside the pack"),
    ],
)
def test_malformed_index_is_corrupt(doc: object, reason: str) -> None:
    index_id, data = _signed_index(doc)
    with pytest.raises(CorruptObject, match=reason):
        decode_index(data, index_id)


def test_index_envelope_of_another_type_is_corrupt() -> None:
    index_id, data = _signed_index({"version": INDEX_VERSION, "packs": []}, ObjectType.CHUNK)
    with pytest.raises(CorruptObject, match="wrong type"):
        decode_index(data, index_id)
