"""Content-defined chunking with FastCDC (pyfastcdc), file by file (FORMAT.md §4).

Files are cut in windows (mmap for regular files, reads for streams) so memory stays bounded
for any file size. The last chunk of a window may only be cut because the window ended, so it
is dropped and cutting resumes at its start with the next window: the cut points are exactly
those of cutting the whole file at once.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pyfastcdc.cy import FastCDC

WINDOW = 16 << 20


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC parameters; stored in the repository config so dedup never silently changes."""

    avg_size: int = 64 << 10
    min_size: int = 16 << 10
    max_size: int = 256 << 10

    def to_dict(self) -> dict[str, int]:
        return {"avg_size": self.avg_size, "min_size": self.min_size, "max_size": self.max_size}


class Chunker:
    """Cuts bytes, files and streams into content-defined chunks (memoryviews)."""

    def __init__(self, params: ChunkerParams = ChunkerParams(), window: int = WINDOW) -> None:
        self.params = params
        self._cdc = FastCDC(
            avg_size=params.avg_size, min_size=params.min_size, max_size=params.max_size
        )
        self._window = max(window, params.max_size * 2)

    def cut_bytes(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Cut an in-memory buffer into chunks."""
        view = memoryview(data).cast("B")
        if not len(view):
            return
        for chunk in self._cdc.cut_buf(view):
            yield view[chunk.offset : chunk.offset + chunk.length]

    def cut_file(self, path: str | os.PathLike[str]) -> Iterator[memoryview]:
        """Cut a regular file, mapping it a window at a time.

        Each chunk is a view into a read-only mapping that stays alive while the view does.
        The next window is mapped and cut on a helper thread while the caller works on the
        chunks of this one (FastCDC runs without the GIL): cutting and the caller's hashing
        and compressing overlap, on two cores.
        """
        results: queue.Queue[tuple[memoryview, list[Any]] | BaseException | None] = queue.Queue(maxsize=1)
        stop = threading.Event()
        cutter = threading.Thread(
            target=self._cut_windows, args=(path, results, stop), name="keepsake-cdc", daemon=True
        )
        cutter.start()
        try:
            while True:
                item = results.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                view, chunks = item
                for chunk in chunks:
                    start = chunk.offset
                    yield view[start : start + chunk.length]
        finally:
            stop.set()
            while cutter.is_alive():  # unblock a helper waiting to hand over a window
                with contextlib.suppress(queue.Empty):
                    results.get_nowait()
                cutter.join(timeout=0.01)

    def _cut_windows(
        self,
        path: str | os.PathLike[str],
        results: queue.Queue[tuple[memoryview, list[Any]] | BaseException | None],
        stop: threading.Event,
    ) -> None:
        """The helper thread of :meth:`cut_file`: windows and their cut points, in order."""

        def put(item: tuple[memoryview, list[Any]] | BaseException | None) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    results.put(item, timeout=0.1)
                    return True
            return False

        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                offset = 0
                gran = mmap.ALLOCATIONGRANULARITY
                while offset < size:
                    base = offset - offset % gran
                    # FIX (tests/objects/test_chunking.py): the window is measured from
                    # ``offset``, not from the aligned ``base``. Measured from ``base``, the
                    # view could hold a single chunk when max_size < ALLOCATIONGRANULARITY
                    # (small chunker params, or 64 KiB granularity on Windows); that chunk
                    # was dropped as "cut by the window end" and cutting never advanced.
                    length = min(self._window + (offset - base), size - base)
                    # No MAP_POPULATE: mmap() holds the GIL, and populating 16 MiB took
                    # 3-10 ms with it held while the writer's threads waited. Unpopulated,
                    # the pages fault in while FastCDC scans them with the GIL released.
                    window = mmap.mmap(f.fileno(), length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base)
                    view = memoryview(window)[offset - base :]
                    at_end = base + length >= size
                    # the whole window's cut points at once: list() drives the C iterator
                    chunks = list(self._cdc.cut_buf(view))
                    if not at_end:
                        chunks.pop()  # cut only because the window ended: cut again next window
                    offset += sum(chunk.length for chunk in chunks)
                    if not put((view, chunks)):
                        return
            put(None)
        except BaseException as exc:  # handed to the caller's thread, raised there
            put(exc)

    def cut_stream(self, stream: BinaryIO) -> Iterator[memoryview]:
        """Cut a stream (stdin, a pipe); each chunk is a fresh view that the caller may keep."""
        carry = b""
        while True:
            block = stream.read(self._window)
            data = carry + block if carry else block
            at_end = not block
            if not data:
                return
            view = memoryview(data)
            consumed = 0
            for chunk, following in _with_next(self._cdc.cut_buf(view)):
                if following is None and not at_end:
                    break
                yield view[chunk.offset : chunk.offset + chunk.length]
                consumed = chunk.offset + chunk.length
            carry = bytes(view[consumed:])
            if at_end:
                return


def _with_next(chunks: Iterator[Any]) -> Iterator[tuple[Any, Any | None]]:
    it = iter(chunks)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        yield current, following
        current = following
