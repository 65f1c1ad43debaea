"""Content-defined chunking: cut_bytes, cut_file (mmap windows) and cut_stream agree."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keepsake.objects.chunking import Chunker, ChunkerParams
from keepsake.objects.ids import ObjectType, hash_object

DEFAULT = ChunkerParams()
#: the smallest parameters pyfastcdc accepts; max_size (1 KiB) is below the mmap allocation
#: granularity (4 KiB), which is what used to hang cut_file (fixed in chunking.py)
TINY = ChunkerParams(avg_size=256, min_size=64, max_size=1024)
SMALL = ChunkerParams(avg_size=4096, min_size=1024, max_size=16384)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


class ShortReads(io.RawIOBase):
    """A stream that, like a pipe, returns fewer bytes than asked for."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._sizes = sizes or [1]
        self._i = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        step = self._sizes[self._i % len(self._sizes)]
        self._i += 1
        if n >= 0:
            step = min(step, n)
        out = bytes(self._data[self._pos : self._pos + step])
        self._pos += len(out)
        return out


def cut_file_within(chunker: Chunker, path: str, seconds: float = 10.0) -> list[bytes]:
    """cut_file, failing (instead of hanging the suite) if it stops making progress."""
    out: list[bytes] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.extend(bytes(c) for c in chunker.cut_file(path))
        except BaseException as exc:  # re-raised below, on the test thread
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "cut_file made no progress (window holds a single chunk?)"
    if errors:
        raise errors[0]
    return out


def lengths(chunks: Iterator[memoryview]) -> list[int]:
    return [len(c) for c in chunks]


def check_chunks(params: ChunkerParams, data: bytes, chunks: list[bytes]) -> None:
    assert b"".join(chunks) == data
    assert all(len(c) <= params.max_size for c in chunks)
    assert all(len(c) >= params.min_size for c in chunks[:-1])
    assert all(len(c) > 0 for c in chunks)


CASES = [
    # (params, window, size): windows from the clamp (window=1) to far larger than the input
    (DEFAULT, 1, 8 << 20),  # clamped to 512 KiB: 16+ windows
    (DEFAULT, 700_001, 5 << 20),  # window not a multiple of the page size
    (DEFAULT, 64 << 20, 3 << 20),  # one window
    (DEFAULT, 1, DEFAULT.max_size * 2 + 1),
    (SMALL, 1, 1 << 20),  # window 32 KiB: 32+ windows
    (TINY, 1, 300_000),  # window 2 KiB, smaller than the mmap granularity: ~150 windows
    (TINY, 5_000, 100_001),
]


@pytest.mark.parametrize(("params", "window", "size"), CASES)
def test_file_stream_and_bytes_cut_identically(params: ChunkerParams, window: int, size: int, tmp_path: Path) -> None:
    data = random_bytes(size, seed=size)
    chunker = Chunker(params, window=window)
    expected = [bytes(c) for c in Chunker(params).cut_bytes(data)]
    check_chunks(params, data, expected)
    assert len(expected) > 2

    from_file = cut_file_within(chunker, write(tmp_path / "f", data))
    from_stream = [bytes(c) for c in chunker.cut_stream(io.BytesIO(data))]
    from_pipe_like = [bytes(c) for c in chunker.cut_stream(ShortReads(data, [1, 7, 4096, 100_000, 3]))]  # type: ignore[arg-type]
    assert from_file == expected
    assert from_stream == expected
    assert from_pipe_like == expected


def test_window_is_clamped_to_twice_max_size(tmp_path: Path) -> None:
    # A window smaller than a chunk could never make progress; the clamp must keep the
    # cut points exactly those of cutting the whole buffer.
    data = random_bytes(3 * DEFAULT.max_size + 12345, seed=7)
    path = write(tmp_path / "f", data)
    whole = lengths(Chunker().cut_bytes(data))
    for window in (0, 1, 4096, DEFAULT.max_size, DEFAULT.max_size * 2 - 1):
        assert lengths(Chunker(window=window).cut_file(path)) == whole
        assert lengths(Chunker(window=window).cut_stream(io.BytesIO(data))) == whole


def test_real_pipe_stream_matches_cut_bytes() -> None:
    data = random_bytes(3 << 20, seed=11)
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as w:
            for i in range(0, len(data), 65_000):
                w.write(data[i : i + 65_000])

    t = threading.Thread(target=feed)
    t.start()
    with os.fdopen(read_fd, "rb", buffering=0) as r:
        got = [bytes(c) for c in Chunker(window=1).cut_stream(r)]
    t.join()
    assert got == [bytes(c) for c in Chunker().cut_bytes(data)]


@pytest.mark.parametrize(
    "size",
    [1, 2, DEFAULT.min_size - 1, DEFAULT.min_size, DEFAULT.min_size + 1, DEFAULT.max_size - 1, DEFAULT.max_size,
     DEFAULT.max_size + 1],
)
def test_boundary_sizes(size: int, tmp_path: Path) -> None:
    data = random_bytes(size, seed=size)
    chunker = Chunker()
    chunks = [bytes(c) for c in chunker.cut_file(write(tmp_path / "f", data))]
    check_chunks(DEFAULT, data, chunks)
    if size <= DEFAULT.min_size:
        assert chunks == [data]  # nothing can be cut below the minimum size
    if size > DEFAULT.max_size:
        assert len(chunks) >= 2
    assert chunks == [bytes(c) for c in chunker.cut_stream(io.BytesIO(data))]
    assert chunks == [bytes(c) for c in chunker.cut_bytes(data)]


def test_empty_inputs_give_no_chunks(tmp_path: Path) -> None:
    chunker = Chunker()
    assert list(chunker.cut_file(write(tmp_path / "empty", b""))) == []
    assert list(chunker.cut_stream(io.BytesIO(b""))) == []
    assert list(chunker.cut_bytes(b"")) == []
    assert list(chunker.cut_bytes(bytearray())) == []


def test_zeros_are_cut_at_max_size(tmp_path: Path) -> None:
    # No content boundary in constant data: every chunk is max_size, the last the rest.
    size = 5 * DEFAULT.max_size + 17
    chunks = lengths(Chunker(window=1).cut_file(write(tmp_path / "z", bytes(size))))
    assert chunks == [DEFAULT.max_size] * 5 + [17]


def test_cut_bytes_accepts_any_buffer() -> None:
    arr = np.random.default_rng(3).standard_normal(100_000).astype(np.float32)
    raw = arr.tobytes()
    expected = [bytes(c) for c in Chunker().cut_bytes(raw)]
    assert [bytes(c) for c in Chunker().cut_bytes(arr.data)] == expected
    assert [bytes(c) for c in Chunker().cut_bytes(bytearray(raw))] == expected
    assert [bytes(c) for c in Chunker().cut_bytes(memoryview(raw))] == expected


def test_file_chunk_views_outlive_the_generator_and_the_file(tmp_path: Path) -> None:
    data = random_bytes(2 << 20, seed=5)
    path = write(tmp_path / "f", data)
    views = list(Chunker(window=1).cut_file(path))  # generator exhausted, file closed
    os.unlink(path)
    assert b"".join(bytes(v) for v in views) == data


def test_stream_chunk_views_may_be_kept() -> None:
    data = random_bytes(2 << 20, seed=6)
    views = list(Chunker(window=1).cut_stream(io.BytesIO(data)))
    assert b"".join(bytes(v) for v in views) == data


def test_two_chunkers_agree_and_params_round_trip() -> None:
    data = random_bytes(1 << 20, seed=8)
    assert lengths(Chunker(SMALL).cut_bytes(data)) == lengths(Chunker(ChunkerParams(**SMALL.to_dict())).cut_bytes(data))
    assert SMALL.to_dict() == {"avg_size": 4096, "min_size": 1024, "max_size": 16384}
    # different params really are different cut points (dedup depends on them)
    assert lengths(Chunker(SMALL).cut_bytes(data)) != lengths(Chunker(DEFAULT).cut_bytes(data))


def chunk_ids(data: bytes) -> list[str]:
    return [hash_object(ObjectType.CHUNK, c) for c in Chunker().cut_bytes(data)]


_BUF_4MB = random_bytes(4 << 20, seed=1234)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    position=st.integers(0, 4 << 20),
    inserted=st.binary(min_size=100, max_size=100),
)
def test_insertion_changes_only_nearby_chunks(seed: int, position: int, inserted: bytes) -> None:
    buf = random_bytes(4 << 20, seed=seed)
    before = chunk_ids(buf)
    after = chunk_ids(buf[:position] + inserted + buf[position:])
    survived = len(set(before) & set(after))
    assert survived >= 0.8 * len(before), (survived, len(before))
    # the chunks wholly before the insertion are untouched, in order
    offset, prefix = 0, 0
    for c in Chunker().cut_bytes(buf):
        offset += len(c)
        if offset >= position:
            break
        prefix += 1
    assert after[:prefix] == before[:prefix]


@settings(max_examples=25, deadline=None)
@given(position=st.integers(0, (4 << 20) - 1000), count=st.integers(1, 1000))
def test_deletion_changes_only_nearby_chunks(position: int, count: int) -> None:
    before = chunk_ids(_BUF_4MB)
    after = chunk_ids(_BUF_4MB[:position] + _BUF_4MB[position + count :])
    assert len(set(before) & set(after)) >= 0.8 * len(before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=12_000) | st.integers(0, 60_000).map(lambda n: random_bytes(n, seed=n)),
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5),
    window=st.integers(1, 10_000),
)
def test_property_all_cutters_agree(data: bytes, sizes: list[int], window: int, tmp_path: Path) -> None:
    chunker = Chunker(TINY, window=window)
    expected = [bytes(c) for c in chunker.cut_bytes(data)]
    check_chunks(TINY, data, expected)
    path = tmp_path / "prop"
    path.write_bytes(data)
    assert cut_file_within(chunker, str(path)) == expected
    assert [bytes(c) for c in chunker.cut_stream(ShortReads(data, sizes))] == expected  # type: ignore[arg-type]
