"""Pack files and pack indexes (FORMAT.md §6, §7).

A pack is the envelopes of many objects back to back, then a footer (an envelope of type
PACK_FOOTER listing every object's id, type, offset, length and raw length), then an 8-byte
trailer: the footer's length (u32) and the magic ``KSKP``. A pack is named by the xxh3-128 of
all its bytes. Index files list the same entries for one or more packs, so a reader learns
where every object is without opening packs; they can always be rebuilt from pack footers.
"""

from __future__ import annotations

import posixpath
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

from keepsake.errors import CorruptObject
from keepsake.objects.codec import copy_into, new_buffer
from keepsake.objects.envelope import HEADER_SIZE, seal, unseal
from keepsake.objects.ids import ID_BYTES, ObjectId, ObjectType, id_from_bytes, id_to_bytes
from keepsake.objects.wire import pack_msgpack, unpack_msgpack

PackId = ObjectId
TRAILER = struct.Struct("<I4s")
PACK_MAGIC = b"KSKP"
INDEX_VERSION = 1


@dataclass(frozen=True)
class PackEntry:
    """Where one object lives: ``length`` bytes of envelope at ``offset`` in ``pack``."""

    id: ObjectId
    type: ObjectType
    pack: PackId
    offset: int
    length: int
    raw_length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def pack_key(pack_id: PackId) -> str:
    return posixpath.join("packs", pack_id[:2], f"{pack_id}.pack")


def index_key(index_id: str) -> str:
    return posixpath.join("index", index_id)


def pack_id_of_key(key: str) -> PackId | None:
    name = posixpath.basename(key)
    if key.startswith("packs/") and name.endswith(".pack") and len(name) == 37:
        return PackId(name[:-5])
    return None


class PackBuilder:
    """Collects envelopes into one buffer and produces a finished pack.

    The buffer is taken when the first envelope comes and handed back through
    :meth:`recycle` once the finished pack is stored, so steady-state packing copies each
    envelope once and allocates nothing: a writer that stores one pack while it fills the
    next needs two buffers. A buffer is allocated uninitialised at full capacity, so
    only the pages written are ever touched (a small write does not zero 32 MiB, and
    there is no growing and copying); it grows only for an object past the capacity.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._spare: list[memoryview] = []
        self._buf: memoryview | None = None
        self._size = 0
        self._entries: list[tuple[ObjectId, ObjectType, int, int, int]] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._size

    def _append(self, part: bytes | bytearray | memoryview) -> None:
        end = self._size + len(part)
        buf = self._buf
        if buf is None:
            buf = self._buf = self._spare.pop() if self._spare else new_buffer(max(end, self._capacity))
        if end > len(buf):
            grown = new_buffer(max(end, 2 * len(buf)))
            copy_into(grown, 0, buf[: self._size])
            buf = self._buf = grown
        copy_into(buf, self._size, part)
        self._size = end

    def add(self, object_id: ObjectId, object_type: ObjectType, raw_length: int, *parts: bytes) -> None:
        start = self._size
        for part in parts:
            self._append(part)
        self._entries.append((object_id, object_type, start, self._size - start, raw_length))

    def add_run(self, data: bytes | bytearray | memoryview, items: Iterable[tuple[ObjectId, ObjectType, int, int]]) -> None:
        """Add envelopes that lie back to back in ``data`` with one copy.

        ``items`` gives (id, type, envelope length, raw length) of each, in order; their
        lengths must add up to ``len(data)``.
        """
        at = self._size
        entries = []
        for object_id, object_type, length, raw_length in items:
            entries.append((object_id, object_type, at, length, raw_length))
            at += length
        if at - self._size != len(data):
            raise ValueError("envelope lengths do not add up to the data added")
        self._append(data)
        self._entries += entries

    def finish(self) -> tuple[PackId, memoryview, list[PackEntry], memoryview]:
        """Append footer and trailer; return the pack id, its bytes, its entries, and the
        buffer to pass to :meth:`recycle` once the bytes are no longer needed."""
        footer = seal(ObjectType.PACK_FOOTER, pack_msgpack(_wire_entries(self._entries)))
        self._append(footer)
        self._append(TRAILER.pack(len(footer), PACK_MAGIC))
        buf = self._buf
        assert buf is not None  # the footer was appended
        data = buf[: self._size]
        pack_id = PackId(xxhash.xxh3_128_hexdigest(data))
        entries = [PackEntry(i, t, pack_id, o, n, r) for i, t, o, n, r in self._entries]
        self._buf = None
        self._size = 0
        self._entries = []
        return pack_id, data, entries, buf

    def recycle(self, buf: memoryview) -> None:
        if len(self._spare) < 2 and len(buf) <= 2 * self._capacity:
            self._spare.append(buf)


def _wire_entries(entries: Iterable[tuple[ObjectId, ObjectType, int, int, int]]) -> list[list[object]]:
    return [[id_to_bytes(i), int(t), o, n, r] for i, t, o, n, r in entries]


def _parse_wire_entries(pack_id: PackId, wire: object, where: str, pack_size: int | None) -> list[PackEntry]:
    if not isinstance(wire, list):
        raise CorruptObject(where, "entry list is not a list")
    out = []
    for item in wire:
        if not (isinstance(item, list) and len(item) == 5):
            raise CorruptObject(where, "malformed entry")
        raw_id, otype, offset, length, raw_length = item
        if not (isinstance(raw_id, bytes) and len(raw_id) == ID_BYTES):
            raise CorruptObject(where, "entry id is malformed")
        if not all(isinstance(v, int) and v >= 0 for v in (otype, offset, length, raw_length)):
            raise CorruptObject(where, "entry has a bad number")
        if length < HEADER_SIZE or (pack_size is not None and offset + length > pack_size):
            raise CorruptObject(where, "entry points outside the pack")
        try:
            object_type = ObjectType(otype)
        except ValueError:
            raise CorruptObject(where, f"entry has unknown type {otype}") from None
        out.append(PackEntry(id_from_bytes(raw_id), object_type, pack_id, offset, length, raw_length))
    return out


def read_pack_footer(pack_id: PackId, tail: bytes, pack_size: int) -> list[PackEntry]:
    """Parse the entries of a pack from its last bytes (footer + trailer).

    ``tail`` must hold at least the trailer; when it is too short to hold the footer the
    error says how many bytes are needed (CorruptObject otherwise).
    """
    if len(tail) < TRAILER.size:
        raise CorruptObject(pack_id, "pack is shorter than its trailer")
    footer_len, magic = TRAILER.unpack_from(tail, len(tail) - TRAILER.size)
    if magic != PACK_MAGIC:
        raise CorruptObject(pack_id, "pack trailer magic is wrong (truncated pack?)")
    if footer_len + TRAILER.size > len(tail):
        raise CorruptObject(pack_id, f"pack footer needs {footer_len + TRAILER.size} bytes")
    footer = tail[len(tail) - TRAILER.size - footer_len : len(tail) - TRAILER.size]
    otype, content = unseal(footer, pack_id)
    if otype != ObjectType.PACK_FOOTER:
        raise CorruptObject(pack_id, "pack footer has the wrong type")
    return _parse_wire_entries(pack_id, unpack_msgpack(content, pack_id), pack_id, pack_size - footer_len - TRAILER.size)


def encode_index(packs: dict[PackId, list[PackEntry]], nonce: bytes | None = None) -> tuple[str, bytes]:
    """Encode an index file for ``packs``; returns (index id, file bytes).

    ``nonce`` (random bytes) gives the file a name no other writer's file can have, so its
    writer may delete it again safely (a merge that lost a race with gc, FORMAT.md §7).
    """
    doc: dict[str, object] = {
        "version": INDEX_VERSION,
        "packs": [
            [id_to_bytes(pid), _wire_entries((e.id, e.type, e.offset, e.length, e.raw_length) for e in entries)]
            for pid, entries in sorted(packs.items())
        ],
    }
    if nonce is not None:
        doc["nonce"] = nonce
    content = pack_msgpack(doc)
    index_id = xxhash.xxh3_128_hexdigest(content, seed=int(ObjectType.INDEX))
    return index_id, seal(ObjectType.INDEX, content)


def decode_index(data: bytes, index_id: str) -> dict[PackId, list[PackEntry]]:
    otype, content = unseal(data, f"index {index_id}")
    if otype != ObjectType.INDEX:
        raise CorruptObject(index_id, "index file has the wrong type")
    if xxhash.xxh3_128_hexdigest(content, seed=int(ObjectType.INDEX)) != index_id:
        raise CorruptObject(index_id, "index file does not hash to its name")
    doc = unpack_msgpack(content, index_id)
    if not (isinstance(doc, dict) and doc.get("version") == INDEX_VERSION and isinstance(doc.get("packs"), list)):
        raise CorruptObject(index_id, "index file is malformed or of an unknown version")
    out: dict[PackId, list[PackEntry]] = {}
    for item in doc["packs"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and len(item[0]) == ID_BYTES):
            raise CorruptObject(index_id, "index pack record is malformed")
        pid = PackId(item[0].hex())
        out[pid] = _parse_wire_entries(pid, item[1], f"index {index_id}", None)
    return out

