"""Durable local writes of large page-aligned buffers (packs) bypass the page cache with
O_DIRECT for their bulk; the result is byte-identical either way, and file systems that
refuse O_DIRECT (tmpfs) get the same bytes through the page cache."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from keepsake import storage as storage_module
from keepsake.objects.codec import new_buffer
from keepsake.storage import DIRECT_FROM, Storage

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def aligned_buffer(size: int) -> memoryview:
    buf = new_buffer(size)  # an anonymous mapping: page-aligned, as pack buffers are
    buf[:] = os.urandom(size)
    return buf


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(length, O_DIRECT set) of every os.write the storage module makes."""
    seen: list[tuple[int, bool]] = []
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        seen.append((len(data), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        return real_write(fd, data)

    monkeypatch.setattr(storage_module.os, "write", write)
    return seen


def supports_direct(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(folder / "probe")
    return True


@pytest.mark.parametrize("tail", [0, 1, 4095, 4097])
def test_a_large_aligned_buffer_is_written_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail: int) -> None:
    data = aligned_buffer(DIRECT_FROM + tail)
    seen = record_writes(monkeypatch)
    storage = Storage.open(str(tmp_path))
    storage.write("packs/ab/x.pack", data)
    assert storage.read("packs/ab/x.pack") == bytes(data)
    assert not [p for p in (tmp_path / "packs" / "ab").iterdir() if p.name.startswith(".tmp-")]
    if supports_direct(tmp_path):
        bulk = len(data) - len(data) % 4096
        assert sum(n for n, direct in seen if direct) == bulk  # the bulk went around the cache
        assert all(not direct for n, direct in seen if n < 4096)  # the tail did not


def test_small_unaligned_and_not_durable_writes_use_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage.open(str(tmp_path))
    big = aligned_buffer(DIRECT_FROM + 10)
    unaligned = memoryview(bytearray(DIRECT_FROM + 10))[1:]
    writes: list[bool] = []
    real_write_direct = storage_module._write_direct

    def spy(fd: int, data: memoryview) -> None:
        writes.append(True)
        real_write_direct(fd, data)

    monkeypatch.setattr(storage_module, "_write_direct", spy)
    storage.write("a", b"x" * 100)
    storage.write("b", unaligned)
    storage.write("c", big, durable=False)
    storage.write("d", bytes(big))  # bytes: read-only, not page-aligned by contract
    assert writes == []
    storage.write("e", big)
    assert writes == [True]
    assert storage.read("b") == bytes(unaligned) and storage.read("e") == bytes(big)


@pytest.mark.parametrize("refuse_at", ["fcntl", "write"])
def test_a_file_system_without_o_direct_gets_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse_at: str
) -> None:
    """Some file systems refuse O_DIRECT when it is set, others at the first write (or
    want a larger alignment): either way the bytes go through the page cache instead."""
    real_fcntl, real_write = fcntl.fcntl, os.write

    def refusing_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if refuse_at == "fcntl" and cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    def refusing_write(fd: int, data: bytes | memoryview) -> int:
        if refuse_at == "write" and real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(storage_module.fcntl, "fcntl", refusing_fcntl)
    monkeypatch.setattr(storage_module.os, "write", refusing_write)
    data = aligned_buffer(DIRECT_FROM + 123)
    storage = Storage.open(str(tmp_path))
    storage.write("packs/x.pack", data)
    assert storage.read("packs/x.pack") == bytes(data)
