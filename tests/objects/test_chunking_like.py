"""cut_file_like: cutting a new version of a file against the earlier version's chunks gives
exactly cut_file's chunks, whatever changed, and skips FastCDC where nothing changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keepsake.objects.chunking import Chunker, ChunkerParams
from keepsake.objects.ids import ObjectType, hash_object

#: pyfastcdc's smallest sizes: many chunks and (window = 2 x max_size) many windows per file
TINY = ChunkerParams(avg_size=256, min_size=64, max_size=1024)


def digest(view: memoryview) -> str:
    return hash_object(ObjectType.CHUNK, view)


def plain(chunker: Chunker, path: str) -> list[tuple[bytes, str]]:
    return [(bytes(c), digest(c)) for c in chunker.cut_file(path)]


def like(chunker: Chunker, path: str, earlier: list[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
    return [(bytes(c), d) for c, d in chunker.cut_file_like(path, [(d, len(b)) for b, d in earlier], digest)]


def check(tmp_path: Path, old: bytes, new: bytes, params: ChunkerParams = TINY, window: int = 0) -> None:
    chunker = Chunker(params, window=window)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    earlier = plain(chunker, str(tmp_path / "old"))
    expected = plain(chunker, str(tmp_path / "new"))
    assert like(chunker, str(tmp_path / "new"), earlier) == expected
    assert b"".join(b for b, _ in expected) == new


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def patterned(n: int, seed: int) -> bytes:
    """Low-entropy data: runs of zeros and a repeated block, so chunks repeat (same digest
    at many places) and many cuts are forced at max_size."""
    rng = np.random.default_rng(seed)
    block = rng.bytes(int(rng.integers(1, 3000)))
    parts = []
    while sum(map(len, parts)) < n:
        kind = rng.integers(3)
        parts.append(bytes(int(rng.integers(1, 4000))) if kind == 0 else block if kind == 1 else rng.bytes(500))
    return b"".join(parts)[:n]


Edit = tuple[str, float, float, int]
edits = st.lists(
    st.tuples(
        st.sampled_from(["overwrite", "insert", "delete", "duplicate"]),
        st.floats(0, 1),
        st.floats(0, 1),
        st.integers(0, 2**32 - 1),
    ),
    max_size=4,
)


def apply(data: bytes, changes: list[Edit]) -> bytes:
    for kind, where, how_much, seed in changes:
        at = int(where * len(data))
        n = int(how_much * 3000)
        if kind == "overwrite":
            data = data[:at] + random_bytes(n, seed) + data[at + n :]
        elif kind == "insert":
            data = data[:at] + random_bytes(n, seed) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + n :]
        else:  # a span copied to another place
            data = data[:at] + data[at // 2 : at // 2 + n] + data[at:]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(0, 40_000),
    seed=st.integers(0, 2**32 - 1),
    low_entropy=st.booleans(),
    changes=edits,
    tail=st.integers(-2000, 2000),
)
def test_same_chunks_as_cut_file(tmp_path: Path, size: int, seed: int, low_entropy: bool, changes: list[Edit], tail: int) -> None:
    old = (patterned if low_entropy else random_bytes)(size, seed)
    new = apply(old, changes)
    new = new[: len(new) + tail] if tail < 0 else new + random_bytes(tail, seed + 1)
    check(tmp_path, old, new)


def test_every_single_byte_change_at_a_cut_point(tmp_path: Path) -> None:
    """FastCDC decides a cut from one byte past the chunk: change exactly that byte (the first
    byte of each next chunk) and the byte before it, one at a time."""
    old = random_bytes(12_000, 7)
    chunker = Chunker(TINY)
    (tmp_path / "old").write_bytes(old)
    cuts = np.cumsum([len(b) for b, _ in plain(chunker, str(tmp_path / "old"))])[:-1]
    assert len(cuts) > 10
    for cut in cuts:
        for at in (int(cut) - 1, int(cut), int(cut) + 1):
            new = bytearray(old)
            new[at] ^= 0xFF
            check(tmp_path, old, bytes(new))


@pytest.mark.parametrize(
    "old_size,new_size",
    [(0, 5000), (5000, 0), (5000, 10), (10, 5000), (63, 64), (64, 63), (1024, 1025), (1025, 1024), (3000, 3000)],
)
def test_short_and_empty_files(tmp_path: Path, old_size: int, new_size: int) -> None:
    data = random_bytes(max(old_size, new_size), 3)
    check(tmp_path, data[:old_size], data[:new_size])


def test_default_parameters_and_windows(tmp_path: Path) -> None:
    """Default sizes with a small window: confirmations that straddle window ends."""
    old = random_bytes(3 << 20, 11)
    new = bytearray(old)
    new[1_000_000:1_100_000] = random_bytes(100_000, 12)
    new[2_000_000:2_000_000] = b"inserted"
    check(tmp_path, old, bytes(new), ChunkerParams(), window=600_000)


class CountingCDC:
    """Wraps the chunker's FastCDC to count the bytes it is asked to cut."""

    def __init__(self, cdc: Any) -> None:
        self.cdc = cdc
        self.bytes_cut = 0

    def cut_buf(self, view: memoryview) -> Any:
        for chunk in self.cdc.cut_buf(view):
            self.bytes_cut += chunk.length
            yield chunk


def test_unchanged_regions_are_hashed_not_cut(tmp_path: Path) -> None:
    old = random_bytes(200_000, 5)
    new = bytearray(old)
    new[100_000:101_000] = random_bytes(1000, 6)  # 0.5% of the file
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(bytes(new))
    chunker = Chunker(TINY)
    earlier = plain(chunker, str(tmp_path / "old"))
    counting = CountingCDC(chunker._cdc)
    chunker._cdc = counting
    got = like(chunker, str(tmp_path / "new"), earlier)
    assert b"".join(b for b, _ in got) == bytes(new)
    # the changed kilobyte, the chunks around it, and no more
    assert 0 < counting.bytes_cut < 10 * TINY.max_size

    counting.bytes_cut = 0
    same = like(chunker, str(tmp_path / "old"), earlier)
    assert same == earlier and counting.bytes_cut == 0
