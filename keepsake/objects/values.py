"""Encoding of user values (params, metrics) inside records (FORMAT.md §14).

Accepted: None, bool, int (64-bit), float (NaN and +/-inf included), str, lists/tuples and
dicts with str keys, numpy scalars and arrays, torch tensors (as numpy arrays). Arrays are a
msgpack ext value (type 1) holding [dtype, shape, bytes]; they read back as numpy arrays.
Anything else is refused with an error naming the key and the type.
"""

from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import Any

import msgpack

from keepsake.errors import UnsupportedValue
from keepsake.objects.wire import pack_msgpack, unpack_msgpack

EXT_NDARRAY = 1
_INT64 = (-(2**63), 2**64 - 1)


def loaded_numpy() -> ModuleType | None:
    """numpy if something already imported it (else no value can be a numpy value).

    Checking types this way keeps numpy, ~80 ms, off the import path of `keepsake ls`.
    """
    return sys.modules.get("numpy")


def normalize(value: Any, where: str) -> Any:
    """Return ``value`` as plain msgpack-able data (arrays as np.ndarray), or raise
    UnsupportedValue naming ``where`` (e.g. ``metrics['loss']``)."""
    np = loaded_numpy()
    if np is not None and isinstance(value, np.generic):
        # FIX (tests/tracking/test_values.py): checked first, because np.float64 and np.str_
        # subclass float and str and were kept as numpy scalars, so a live experiment's
        # metrics held numpy values while the same values read back as Python ones.
        return normalize(value.item(), where)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise UnsupportedValue(where, value, "integers must fit in 64 bits")
        return value
    if isinstance(value, float):
        return value
    if np is not None and isinstance(value, np.ndarray):
        if value.dtype.hasobject or value.dtype.kind not in "biufc":
            raise UnsupportedValue(where, value, f"arrays of dtype {value.dtype} cannot be stored")
        return value
    if _is_torch_tensor(value):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()  # numpy has no bfloat16
        array = tensor.numpy()
        return array.item() if array.ndim == 0 else normalize(array, where)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                # FIX (tests/tracking/test_values.py): the message now names the key's type,
                # as every other refusal names the value's type.
                reason = f"dictionary keys must be strings, not {type(key).__name__}"
                raise UnsupportedValue(f"{where}[{key!r}]", key, reason)
            out[key] = normalize(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [normalize(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise UnsupportedValue(where, value)


def _is_torch_tensor(value: Any) -> bool:
    # never import torch: a tensor is recognised by its class's module
    return type(value).__module__.startswith("torch") and hasattr(value, "detach") and hasattr(value, "numpy")


def _default(value: Any) -> Any:
    np = loaded_numpy()
    if np is not None and isinstance(value, np.ndarray):
        # FIX (tests/tracking/test_values.py): np.ascontiguousarray returns at least 1-d, so
        # a 0-d array was stored with shape [1]; keep the array's own shape.
        array = np.ascontiguousarray(value).reshape(value.shape)
        payload = [array.dtype.str, list(array.shape), array.tobytes()]
        return msgpack.ExtType(EXT_NDARRAY, msgpack.packb(payload, use_bin_type=True))
    raise TypeError(f"cannot encode {type(value).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != EXT_NDARRAY:
        raise ValueError(f"unknown ext type {code}")
    import numpy as np  # only now: a stored array is being read back

    dtype, shape, raw = msgpack.unpackb(data, raw=False)
    array = np.frombuffer(raw, dtype=np.dtype(dtype))
    return array.reshape(shape).copy()


def pack_values(doc: Any) -> bytes:
    """Canonical msgpack of a normalized document (records use this)."""
    return pack_msgpack(doc, default=_default)


def unpack_values(data: bytes, object_id: str) -> Any:
    """Decode a record; corruption of any kind becomes CorruptObject."""
    return unpack_msgpack(data, object_id, ext_hook=_ext_hook)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)
