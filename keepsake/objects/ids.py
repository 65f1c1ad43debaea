"""Object ids: xxh3-128 of an object's canonical content, seeded by its type (FORMAT.md §2)."""

from __future__ import annotations

import re
from enum import IntEnum
from typing import NewType

import xxhash

from keepsake.errors import InvalidObjectId

#: 32 lowercase hex characters.
ObjectId = NewType("ObjectId", str)

ID_BYTES = 16
ID_HEX = 32
MIN_PREFIX = 7

_FULL_ID = re.compile(r"^[0-9a-f]{32}$")
_PREFIX = re.compile(r"^[0-9a-f]{7,32}$")


class ObjectType(IntEnum):
    """Type codes stored in every envelope; content objects also seed their id hash with it."""

    CHUNK = 1
    BLOB = 2
    TREE = 3
    EXPERIMENT = 4
    CHECKPOINT = 5
    HEAD = 6
    PACK_FOOTER = 16
    INDEX = 17
    SUMMARY_INDEX = 18  # a packed summary index (FORMAT.md §17): an envelope, not an object

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


#: Types that have object ids and live in packs.
CONTENT_TYPES = frozenset(
    {
        ObjectType.CHUNK,
        ObjectType.BLOB,
        ObjectType.TREE,
        ObjectType.EXPERIMENT,
        ObjectType.CHECKPOINT,
        ObjectType.HEAD,
    }
)


def hash_object(object_type: ObjectType, data: bytes | bytearray | memoryview) -> ObjectId:
    """Return the id of an object of ``object_type`` whose canonical content is ``data``."""
    return ObjectId(xxhash.xxh3_128_hexdigest(data, seed=int(object_type)))


def id_to_bytes(object_id: ObjectId) -> bytes:
    return bytes.fromhex(object_id)


def id_from_bytes(raw: bytes) -> ObjectId:
    if len(raw) != ID_BYTES:
        raise ValueError(f"object id must be {ID_BYTES} bytes, got {len(raw)}")
    return ObjectId(raw.hex())


def parse_object_id(text: str) -> ObjectId:
    """Return ``text`` as a full ObjectId, or raise InvalidObjectId."""
    if not _FULL_ID.match(text):
        raise InvalidObjectId(text)
    return ObjectId(text)


def is_id_prefix(text: str) -> bool:
    """True when ``text`` could be an abbreviated id (7 to 32 lowercase hex characters)."""
    return bool(_PREFIX.match(text))
