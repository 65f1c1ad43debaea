"""msgpack as stored objects use it: canonical packing, and unpacking with hard size limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from keepsake.errors import CorruptObject

#: caps on decoded metadata, whatever a stored object claims
MAX_ENTRIES = 1 << 22


def pack_msgpack(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True, default=default)
    return packed


def unpack_msgpack(data: bytes, object_id: str, ext_hook: Callable[[int, bytes], Any] | None = None) -> Any:
    """Decode msgpack with size limits; any failure is corruption, never a crash."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=ext_hook or msgpack.ExtType,
            max_array_len=MAX_ENTRIES,
            max_map_len=1 << 20,
            max_str_len=1 << 24,
            max_bin_len=1 << 28,
            max_ext_len=1 << 28,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptObject(object_id, f"bad msgpack: {exc}") from exc
