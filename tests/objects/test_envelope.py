"""The envelope around every stored object: layout, round trips, and every way it can be bad."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keepsake.errors import CorruptObject
from keepsake.objects.codec import Codec, compress
from keepsake.objects.envelope import (
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    open_object,
    read_header,
    seal,
    seal_many,
    seal_parts,
    seal_payload,
    unseal,
)
from keepsake.objects.ids import CONTENT_TYPES, ObjectId, ObjectType, hash_object

_rng = np.random.default_rng(7)
FLOAT32 = _rng.standard_normal(16384).astype(np.float32).tobytes()
RANDOM = _rng.bytes(5000)
TEXT = b"every training run recoverable, stored once. " * 200

DATA = {"empty": b"", "one": b"\x01", "float32": FLOAT32, "random": RANDOM, "text": TEXT}


def envelope(data: bytes, otype: ObjectType = ObjectType.CHUNK) -> tuple[bytes, ObjectId]:
    return seal(otype, data), hash_object(otype, data)


def test_header_layout() -> None:
    # FORMAT.md §3: 16 bytes, little-endian: magic, version, type, codec, flags, raw len, payload len
    assert HEADER_SIZE == 16
    buf = seal(ObjectType.TREE, TEXT)
    magic, version, otype, codec, flags, raw_length, payload_length = struct.unpack_from("<4sBBBBII", buf)
    assert (magic, version, otype, codec, flags) == (b"KSKO", 1, 3, int(Codec.ZSTD), 0)
    assert MAGIC == b"KSKO" and FORMAT_VERSION == 1
    assert raw_length == len(TEXT)
    assert payload_length == len(buf) - 16
    header = read_header(buf, "x")
    assert (header.object_type, header.codec, header.raw_length, header.payload_length) == (
        3, int(Codec.ZSTD), len(TEXT), len(buf) - 16,
    )


@pytest.mark.parametrize("otype", sorted(CONTENT_TYPES))
@pytest.mark.parametrize("name", sorted(DATA))
def test_seal_open_round_trip(otype: ObjectType, name: str) -> None:
    data = DATA[name]
    buf, oid = envelope(data, otype)
    assert open_object(buf, oid) == (otype, data)
    assert open_object(memoryview(buf), oid) == (otype, data)
    assert unseal(buf, oid) == (int(otype), data)


@pytest.mark.parametrize("name", sorted(DATA))
def test_seal_parts_many_payload_and_raw_agree(name: str) -> None:
    data = DATA[name]
    oid = hash_object(ObjectType.CHUNK, data)
    header, payload = seal_parts(ObjectType.CHUNK, data)
    assert len(header) == HEADER_SIZE
    assert open_object(header + payload, oid) == (ObjectType.CHUNK, data)
    codec, coded = compress(data)
    assert seal_payload(ObjectType.CHUNK, codec, len(data), coded) == header + payload
    raw = seal(ObjectType.CHUNK, data, codec=Codec.RAW)
    assert raw[6] == Codec.RAW and raw[HEADER_SIZE:] == data
    assert open_object(raw, oid) == (ObjectType.CHUNK, data)
    many = seal_many([(ObjectType.CHUNK, data), (ObjectType.BLOB, memoryview(data))])
    assert open_object(b"".join(many[0]), oid) == (ObjectType.CHUNK, data)
    assert open_object(b"".join(many[1]), hash_object(ObjectType.BLOB, data)) == (ObjectType.BLOB, data)


def test_only_raw_may_be_forced() -> None:
    with pytest.raises(ValueError):
        seal(ObjectType.CHUNK, TEXT, codec=Codec.ZSTD)


@pytest.mark.parametrize("name", ["random", "text", "float32"])
def test_flipped_payload_byte_is_corrupt(name: str) -> None:
    buf, oid = envelope(DATA[name])
    payload_len = len(buf) - HEADER_SIZE
    # positions through the second half of the payload (compressed bodies, raw planes, tails)
    for pos in sorted({HEADER_SIZE + payload_len // 2, HEADER_SIZE + payload_len * 3 // 4, len(buf) - 1}):
        bad = bytearray(buf)
        bad[pos] ^= 0x01
        with pytest.raises(CorruptObject):
            open_object(bytes(bad), oid)


def test_every_byte_flip_of_a_raw_envelope_is_corrupt() -> None:
    buf, oid = envelope(RANDOM[:64])
    assert buf[6] == Codec.RAW
    for pos in range(len(buf)):
        if pos == 7:
            continue  # the flags byte: see test_flags_byte_is_not_checked
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(buf)
            bad[pos] ^= mask
            with pytest.raises(CorruptObject):
                open_object(bytes(bad), oid)


def test_flags_byte_is_not_checked() -> None:
    # Documents current behaviour: flags are written as 0 and not checked on read; the
    # content is still verified against its id, so a flipped flag cannot change content.
    buf, oid = envelope(TEXT)
    bad = bytearray(buf)
    bad[7] = 0xFF
    assert open_object(bytes(bad), oid) == (ObjectType.CHUNK, TEXT)


def test_wrong_id_is_corrupt() -> None:
    buf, _ = envelope(TEXT)
    with pytest.raises(CorruptObject, match="does not hash"):
        open_object(buf, hash_object(ObjectType.CHUNK, TEXT + b"!"))
    # same content, other type: ids are seeded by type
    with pytest.raises(CorruptObject, match="does not hash"):
        open_object(buf, hash_object(ObjectType.BLOB, TEXT))


@pytest.mark.parametrize("magic", [b"KSKP", b"ksko", b"\0\0\0\0", b"KSK\0"])
def test_bad_magic(magic: bytes) -> None:
    buf, oid = envelope(TEXT)
    with pytest.raises(CorruptObject, match="magic"):
        open_object(magic + buf[4:], oid)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version(version: int) -> None:
    buf, oid = envelope(TEXT)
    with pytest.raises(CorruptObject, match="version"):
        open_object(buf[:4] + bytes([version]) + buf[5:], oid)


@pytest.mark.parametrize("name", ["random", "text", "float32", "empty"])
def test_truncated_or_extended(name: str) -> None:
    buf, oid = envelope(DATA[name])
    for n in sorted({0, 1, 4, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, len(buf) // 2, len(buf) - 1}):
        if n >= len(buf):
            continue
        with pytest.raises(CorruptObject):
            open_object(buf[:n], oid)
    with pytest.raises(CorruptObject):
        open_object(buf + b"\0", oid)


@pytest.mark.parametrize("otype", [0, 6, 15, 16, 17, 18, 255])
def test_unknown_or_non_content_type(otype: int) -> None:
    data = TEXT
    buf = HEADER.pack(MAGIC, FORMAT_VERSION, otype, Codec.RAW, 0, len(data), len(data)) + data
    with pytest.raises(CorruptObject):
        open_object(buf, hash_object(ObjectType.CHUNK, data))
    assert unseal(buf, "x") == (otype, data)  # unseal does not check types: callers do


def test_unknown_type_message() -> None:
    buf = HEADER.pack(MAGIC, FORMAT_VERSION, 99, Codec.RAW, 0, 3, 3) + b"abc"
    with pytest.raises(CorruptObject, match="unknown object type 99"):
        open_object(buf, ObjectId("0" * 32))


@pytest.mark.parametrize("codec", [3, 9, 255])
def test_unknown_codec(codec: int) -> None:
    buf = HEADER.pack(MAGIC, FORMAT_VERSION, ObjectType.CHUNK, codec, 0, 3, 3) + b"abc"
    with pytest.raises(CorruptObject, match="codec"):
        open_object(buf, hash_object(ObjectType.CHUNK, b"abc"))


def test_declared_raw_length_over_limit() -> None:
    data = TEXT
    buf, oid = envelope(data)
    with pytest.raises(CorruptObject, match="limit"):
        unseal(buf, oid, max_raw=len(data) - 1)
    assert unseal(buf, oid, max_raw=len(data)) == (ObjectType.CHUNK, data)
    # the default limit (2 GiB) is enforced before anything is decompressed
    for raw_length in ((1 << 31) + 1, 0xFFFFFFFF):
        huge = buf[:8] + struct.pack("<I", raw_length) + buf[12:]
        with pytest.raises(CorruptObject, match="limit"):
            open_object(huge, oid)


def test_error_names_the_object() -> None:
    buf, oid = envelope(TEXT)
    with pytest.raises(CorruptObject) as info:
        open_object(buf[:10], oid)
    assert info.value.object_id == oid
    assert oid in str(info.value)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=10_000), otype=st.sampled_from(sorted(CONTENT_TYPES)))
def test_property_round_trip(data: bytes, otype: ObjectType) -> None:
    buf = seal(otype, data)
    assert open_object(buf, hash_object(otype, data)) == (otype, data)


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=200), prefix=st.booleans())
def test_property_garbage_is_corrupt(garbage: bytes, prefix: bool) -> None:
    # with a valid-looking magic and version, the rest of the header is fuzzed too
    buf = (MAGIC + bytes([FORMAT_VERSION]) + garbage) if prefix else garbage
    with pytest.raises(CorruptObject):
        open_object(buf, ObjectId("0" * 32))
