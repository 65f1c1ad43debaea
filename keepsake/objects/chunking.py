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
from collections.abc import Callable, Iterator, Sequence
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
        for view, chunks in self._on_helper(self._cut_windows, path):
            for chunk in chunks:
                start = chunk.offset
                yield view[start : start + chunk.length]

    def cut_file_like(
        self, path: str | os.PathLike[str], earlier: Sequence[tuple[str, int]], digest: Callable[[memoryview], str]
    ) -> Iterator[tuple[memoryview, str]]:
        """Cut a file that is probably a new version of one cut before; yields ``(chunk,
        digest(chunk))``, with exactly the chunks of :meth:`cut_file`.

        ``earlier`` is the earlier version's chunks as ``(digest, length)``. Where the file
        still holds them, their cut points are confirmed by hashing instead of found by
        cutting (hashing runs at several times FastCDC's speed); cutting starts where they
        stop matching and hands back to them once a freshly cut chunk equals an earlier
        one. Why that gives the same cut points as cutting the whole file:

        * FastCDC decides a cut from the chunk's own bytes and the one byte after it, given
          the bytes left (up to max_size) from the chunk start. An earlier chunk is taken
          only when the chunk after it matches too (so that byte matches, and at least
          min_size bytes follow, which leaves the decision unchanged), or when it was the
          earlier last chunk and the file ends with it again (identical input);
        * everything is decided from a point that cutting the whole file also cuts at: the
          start, the end of a cut chunk, or the end of a confirmed one.

        Digests are compared, so a collision could only matter where dedup already trusts
        the same hash. Cutting and hashing run on a helper thread, as in :meth:`cut_file`.
        """
        if not earlier:
            for view in self.cut_file(path):
                yield view, digest(view)
            return
        for view, chunks in self._on_helper(self._cut_windows_like, path, earlier, digest):
            for start, length, chunk_digest in chunks:
                yield view[start : start + length], chunk_digest

    def _on_helper(self, produce: Callable[..., None], *args: Any) -> Iterator[tuple[memoryview, list[Any]]]:
        """Run ``produce(*args, put)`` on a helper thread; yield the windows it puts, in order."""
        results: queue.Queue[tuple[memoryview, list[Any]] | BaseException | None] = queue.Queue(maxsize=1)
        stop = threading.Event()

        def put(item: tuple[memoryview, list[Any]] | BaseException | None) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    results.put(item, timeout=0.1)
                    return True
            return False

        def run() -> None:
            try:
                produce(*args, put)
                put(None)
            except BaseException as exc:  # handed to the caller's thread, raised there
                put(exc)

        helper = threading.Thread(target=run, name="keepsake-cdc", daemon=True)
        helper.start()
        try:
            while True:
                item = results.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while helper.is_alive():  # unblock a helper waiting to hand over a window
                with contextlib.suppress(queue.Empty):
                    results.get_nowait()
                helper.join(timeout=0.01)

    def _map_window(self, f: BinaryIO, offset: int, size: int) -> tuple[memoryview, bool]:
        """A read-only view of the file from ``offset``, one window long (or to the end);
        and whether it reaches the end of the file."""
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        # FIX (tests/objects/test_chunking.py): the window is measured from ``offset``, not
        # from the aligned ``base``. Measured from ``base``, the view could hold a single
        # chunk when max_size < ALLOCATIONGRANULARITY (small chunker params, or 64 KiB
        # granularity on Windows); that chunk was dropped as "cut by the window end" and
        # cutting never advanced.
        length = min(self._window + (offset - base), size - base)
        # No MAP_POPULATE: mmap() holds the GIL, and populating 16 MiB took 3-10 ms with it
        # held while the writer's threads waited. Unpopulated, the pages fault in while
        # FastCDC scans them with the GIL released.
        window = mmap.mmap(f.fileno(), length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base)
        return memoryview(window)[offset - base :], base + length >= size

    def _cut_windows(self, path: str | os.PathLike[str], put: Callable[[tuple[memoryview, list[Any]]], bool]) -> None:
        """The helper thread of :meth:`cut_file`: windows and their cut points, in order."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < size:
                view, at_end = self._map_window(f, offset, size)
                # the whole window's cut points at once: list() drives the C iterator
                chunks = list(self._cdc.cut_buf(view))
                if not at_end:
                    chunks.pop()  # cut only because the window ended: cut again next window
                offset += sum(chunk.length for chunk in chunks)
                if not put((view, chunks)):
                    return

    def _cut_windows_like(
        self,
        path: str | os.PathLike[str],
        earlier: Sequence[tuple[str, int]],
        digest: Callable[[memoryview], str],
        put: Callable[[tuple[memoryview, list[tuple[int, int, str]]]], bool],
    ) -> None:
        """The helper thread of :meth:`cut_file_like`: windows and their ``(start, length,
        digest)`` chunks, in order."""
        last = len(earlier) - 1
        following: dict[str, int] = {}  # digest -> the earlier chunk after its first copy
        for k, (earlier_digest, _) in enumerate(earlier):
            following.setdefault(earlier_digest, k + 1)
        k = 0  # the earlier chunk to try next at ``pos``; len(earlier): cutting
        matched = -1  # where earlier chunk k is already known to be (window offset)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < size:
                view, at_end = self._map_window(f, offset, size)
                end = len(view)
                out: list[tuple[int, int, str]] = []
                pos = 0
                while pos < end:
                    if k <= last:
                        k_digest, k_length = earlier[k]
                        if k == last:
                            if pos + k_length > end and not at_end:
                                break  # map the next window from pos
                            if at_end and pos + k_length == end and (
                                matched == pos or digest(view[pos:end]) == k_digest
                            ):
                                out.append((pos, k_length, k_digest))
                                pos, k = end, k + 1
                                continue
                        else:
                            next_digest, next_length = earlier[k + 1]
                            next_start = pos + k_length
                            next_end = next_start + next_length
                            if next_end > end and not at_end:
                                break  # map the next window from pos
                            if (
                                (k + 1 < last and next_end <= end or at_end and next_end == end)
                                and (matched == pos or digest(view[pos:next_start]) == k_digest)
                                and digest(view[next_start:next_end]) == next_digest
                            ):
                                out.append((pos, k_length, k_digest))
                                pos, k, matched = next_start, k + 1, next_start
                                continue
                        k = len(earlier)  # no match here: cut
                    # cutting from pos, until a cut chunk equals an earlier one
                    cut_from = pos
                    for chunk in self._cdc.cut_buf(view[cut_from:]):
                        start, length = cut_from + chunk.offset, chunk.length
                        if start + length == end and not at_end:
                            break  # cut only because the window ended: cut again next window
                        chunk_digest = digest(view[start : start + length])
                        out.append((start, length, chunk_digest))
                        pos = start + length
                        k = following.get(chunk_digest, len(earlier))
                        if k <= last:
                            break
                    if pos == cut_from:
                        break  # not even one whole chunk: map the next window from pos
                matched = 0 if matched == pos else -1
                offset += pos
                if not put((view, out)):
                    return

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
