"""Storage: the one module that talks to fsspec. Keys in, bytes out.

A :class:`Storage` is a flat key space under one URL. Keys are POSIX-style relative paths
built with :mod:`posixpath` (``packs/ab/ab12....pack``). Every backend goes through the same
class; where backends differ (how a write is made atomic, how compare-and-swap is done) the
difference is a capability chosen once in :meth:`Storage.open`, never a second object store.
What each backend guarantees is written down in docs/FORMAT.md, "Storage backends".

``FileNotFoundError`` from fsspec is the one "missing" signal and becomes
:class:`~keepsake.errors.KeyNotFound`; every other backend failure becomes
:class:`~keepsake.errors.StorageError`. We never call ``exists()`` before reading, because
fsspec's ``exists()`` returns False on any error, auth and network included.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, NewType, NoReturn, TypeVar
from urllib.parse import quote

import fsspec
import fsspec.asyn
import xxhash

from keepsake.errors import KeyNotFound, StorageError, UnknownScheme

#: An opaque token naming one version of a key: an S3 ETag, a GCS generation, or a content
#: hash for local and memory storage. Only ever compared for equality.
Version = NewType("Version", str)

#: Prefix of temporary files on local disk; never listed, safe to delete when old.
TEMP_PREFIX = ".tmp-"

_T = TypeVar("_T")

#: S3 values of at least two parts this big are uploaded as multipart uploads (parallel parts)
MULTIPART_PART = 8 << 20

# memory:// is one process-wide store in fsspec; its compare-and-swap needs one lock.
_MEMORY_LOCK = threading.Lock()


@dataclass(frozen=True)
class KeyInfo:
    """One listed key: its name, size in bytes and modification time (seconds, UTC)."""

    key: str
    size: int
    mtime: float | None


def _scheme_of(url: str) -> str:
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


#: durable local writes of at least this size bypass the page cache (O_DIRECT), see _write_direct
DIRECT_FROM = 4 << 20
_DIRECT_ALIGN = 4096


def _page_aligned(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is a writable buffer starting on a page boundary (pack buffers are:
    they are anonymous mappings); only those can be written with O_DIRECT without a copy."""
    if not hasattr(os, "O_DIRECT") or not isinstance(data, memoryview) or not data.contiguous:
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):  # read-only or not a plain byte buffer
        return False
    return address % _DIRECT_ALIGN == 0


def _write_direct(fd: int, data: memoryview) -> None:
    """Write ``data`` to the new file ``fd``: the page-aligned bulk with O_DIRECT, the tail
    through the page cache.

    A pack is written once, fsynced, and read back rarely. Through the page cache the kernel
    first copies it there (measured here: 0.8-2.1 s of system time per GiB, on the two cores
    that compress) and then writes it out at the fsync; with O_DIRECT the device reads the
    pack buffer itself (0.3-0.4 s/GiB). Where the file system refuses O_DIRECT (tmpfs,
    some network file systems), everything goes through the page cache as before.
    """
    bulk = len(data) - len(data) % _DIRECT_ALIGN
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    done = 0
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        while done < bulk:
            done += os.write(fd, data[done:bulk])
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # no O_DIRECT here (or a stricter alignment): the rest goes through the page cache
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    while done < len(data):
        done += os.write(fd, data[done:])


class Storage:
    """A key space under one URL. Create with :meth:`Storage.open`."""

    def __init__(self, url: str, fs: Any, root: str, backend: str) -> None:
        self.url = url
        self._fs = fs
        self._root = root.rstrip("/")
        #: "local", "memory", "s3", "gcs" or "generic"
        self.backend = backend

    @classmethod
    def open(cls, url: str, options: dict[str, Any] | None = None) -> Storage:
        """Open the storage at ``url``; nothing is read or written yet.

        Args:
            url: a local path, ``file://``, ``memory://``, ``s3://``, ``gs://`` or any other
                fsspec URL.
            options: storage options passed to the fsspec filesystem (``endpoint_url``, ...).

        Raises:
            UnknownScheme: no fsspec implementation is known or importable for the scheme.
        """
        options = dict(options or {})
        scheme = _scheme_of(url)
        if scheme == "file":
            path = url[len("file://"):] if url.startswith("file://") else url
            root = os.path.abspath(os.path.expanduser(path))
            fs = fsspec.filesystem("file", auto_mkdir=True)
            return cls(root, fs, root, "local")
        backend = {"memory": "memory", "s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(
            scheme, "generic"
        )
        if backend == "s3":
            # AWS_ENDPOINT_URL_S3 is the standard variable; botocore honours it, but s3fs
            # passes its own endpoint_url=None first, so we forward it explicitly.
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint and "endpoint_url" not in options:
                options["endpoint_url"] = endpoint
        # Listings must be fresh: other machines write the same bucket.
        if backend in ("s3", "gcs"):
            options.setdefault("use_listings_cache", False)
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except (ValueError, ImportError) as exc:
            raise UnknownScheme(url, scheme) from exc
        return cls(url.rstrip("/"), fs, root, backend)

    # -- paths -------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid storage key {key!r}")
        return posixpath.join(self._root, key)

    def local_path(self, key: str) -> str | None:
        """The file that holds ``key`` on a local-disk storage (None on any other backend):
        for data that only ever lives next to the repository on the same machine, written
        with plain file I/O (the checkpoint journal, FORMAT.md §19)."""
        return self._path(key) if self.backend == "local" else None

    def _key(self, path: str) -> str:
        path = path.replace(os.sep, "/") if self.backend == "local" else path
        root = self._root.replace(os.sep, "/") if self.backend == "local" else self._root
        # memory:// paths come back with a leading slash; compare without it
        return posixpath.relpath("/" + path.lstrip("/"), "/" + root.lstrip("/"))

    def _call(self, operation: str, key: str, fn: Callable[[], _T]) -> _T:
        # Validate the key here, outside the try: an invalid key is the caller's bug
        # (ValueError), not a backend failure that the handlers below would wrap.
        self._path(key)
        try:
            return fn()
        except FileNotFoundError as exc:
            raise KeyNotFound(self.url, key) from exc
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise KeyNotFound(self.url, key) from exc
            # On a file system a folder can stand where a key is asked for ("a" while "a/b"
            # exists), or a key where a folder is needed ("a/b" while "a" exists). Neither
            # holds a value: to a read that is a missing key, as on object stores.
            if exc.errno in (errno.EISDIR, errno.ENOTDIR) and operation in ("read", "stat", "delete"):
                raise KeyNotFound(self.url, key) from exc
            raise StorageError(self.url, f"{operation} {key}", exc) from exc
        except (KeyNotFound, StorageError):
            raise
        except Exception as exc:  # any backend failure: network, auth, throttling
            if type(exc).__name__ in ("NoSuchKey", "NoSuchBucket"):
                raise KeyNotFound(self.url, key) from exc
            raise StorageError(self.url, f"{operation} {key}", exc) from exc

    # -- reads -------------------------------------------------------------------------------

    def read(self, key: str) -> bytes:
        """Return the whole value of ``key``. Raises KeyNotFound or StorageError."""
        return self._call("read", key, lambda: bytes(self._fs.cat_file(self._path(key))))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of ``key``. A range past the end is a StorageError."""
        if start < 0 or end < start:
            raise ValueError(f"invalid byte range [{start}, {end}) of {key!r}")
        if start == end:
            # HTTP cannot express an empty range: S3 ignores "bytes=4-3" and sends the whole
            # object. Only check that the key exists, as the other backends do.
            self._call("stat", key, lambda: self._fs.info(self._path(key)))
            return b""
        # Keywords, not positions: s3fs's cat_file(path, version_id, start, end) would take
        # ``start`` as a version id.
        try:
            data = self._call(
                "read", key, lambda: self._fs.cat_file(self._path(key), start=start, end=end)
            )
        except StorageError as exc:
            if isinstance(exc, KeyNotFound) or not _is_invalid_range(exc):
                raise
            # S3 answers 416 for a range that starts past the end; other backends return
            # fewer bytes. Report both the same way.
            data = b""
        if len(data) != end - start:
            raise StorageError(
                self.url, f"read {key}", f"short read: wanted {end - start} bytes, got {len(data)}"
            )
        return bytes(data)

    def read_ranges(self, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """Read many ``(key, start, end)`` ranges at once (concurrently on remote backends).

        Returns the byte strings in the order asked. A short read is an error.
        """
        if not ranges:
            return []
        if self.backend == "local" or any(s < 0 or e <= s for _, s, e in ranges):
            # empty (or invalid) ranges cannot be sent as HTTP ranges: see read_range
            return [self.read_range(k, s, e) for k, s, e in ranges]
        paths = [self._path(k) for k, _, _ in ranges]
        results = self._call(
            "read",
            ranges[0][0],
            lambda: self._fs.cat_ranges(
                paths, [s for _, s, _ in ranges], [e for _, _, e in ranges], on_error="return"
            ),
        )
        out = []
        for (key, start, end), res in zip(ranges, results):
            if isinstance(res, BaseException):
                if _is_invalid_range(res):  # S3 416: a range past the end, see read_range
                    res = b""
                else:
                    error: BaseException = res  # typed name for the closure (mypy)
                    self._call("read", key, lambda: _raise(error))
            if len(res) != end - start:
                raise StorageError(self.url, f"read {key}", "short read")
            out.append(bytes(res))
        return out

    def read_versioned(self, key: str) -> tuple[bytes, Version]:
        """Return the value of ``key`` and a token for :meth:`swap`."""
        if self.backend == "s3":
            return self._call("read", key, lambda: self._s3_get_versioned(key))
        if self.backend == "gcs":
            return self._call("read", key, lambda: self._gcs_get_versioned(key))
        data = self.read(key)
        return data, _content_version(data)

    # -- writes ------------------------------------------------------------------------------

    def write(self, key: str, data: bytes | bytearray | memoryview, durable: bool = True) -> None:
        """Store ``data`` at ``key``, replacing any value; readers see all or nothing.

        On local disk the bytes are written to a temporary file, fsynced, and renamed into
        place, so a crash never leaves a half-written key.

        Args:
            durable: False skips the fsync, for data that is rebuilt or discarded after a
                power loss (summaries, operation markers); the rename stays atomic.
        """
        if self.backend == "local":
            self._call("write", key, lambda: self._local_write(key, data, replace=True, durable=durable))
        else:
            self._call("write", key, lambda: self._fs.pipe_file(self._path(key), bytes(data), **self._put_options(len(data))))

    def _put_options(self, size: int) -> dict[str, Any]:
        # s3fs uploads values of at least two parts as a multipart upload with its parts in
        # flight concurrently (max_concurrency): a 32 MiB pack goes up as 4 parallel parts
        if self.backend == "s3" and size >= 2 * MULTIPART_PART:
            return {"chunksize": MULTIPART_PART}
        return {}

    def write_many(self, items: Sequence[tuple[str, bytes | bytearray | memoryview]], durable: bool = True) -> None:
        """Store several keys, concurrently on remote backends; as :meth:`write` for each.

        Either every key is written or a StorageError is raised (some keys may then have
        been written: each key is still all-or-nothing).
        """
        if not items:
            return
        for key, _ in items:
            self._path(key)  # validate every key before writing any
        if not getattr(self._fs, "async_impl", False):
            for key, data in items:
                self.write(key, data, durable=durable)
            return
        big = [(k, d) for k, d in items if self._put_options(len(d))]
        small = {self._path(k): bytes(d) for k, d in items if not self._put_options(len(d))}
        if small:
            self._call("write", items[0][0], lambda: self._fs.pipe(small))
        for key, data in big:
            self.write(key, data)

    def read_many(self, keys: Sequence[str]) -> list[bytes]:
        """Read several whole keys, concurrently on remote backends, in the order asked.

        Raises KeyNotFound for the first missing key (in the order asked), or StorageError.
        """
        if not keys:
            return []
        paths = [self._path(k) for k in keys]
        if not getattr(self._fs, "async_impl", False):
            return [self.read(k) for k in keys]
        found = self._call("read", keys[0], lambda: self._fs.cat(paths, on_error="return"))
        out = []
        for key, path in zip(keys, paths):
            value = found.get(path) if isinstance(found, dict) else None
            if value is None:
                value = FileNotFoundError(path)
            if isinstance(value, BaseException):
                error: BaseException = value  # typed name for the closure (mypy)
                self._call("read", key, lambda: _raise(error))
            out.append(bytes(value))
        return out

    def create(self, key: str, data: bytes | bytearray | memoryview, unique: bool = False) -> bool:
        """Store ``data`` at ``key`` only if the key does not exist.

        Returns True when this call created the key, False when it already existed.
        ``unique``: the caller's bytes are its own (they name an id, a pid, a time), so a
        key found holding exactly them after a failed precondition means our write landed
        and the client's retry met it (see :meth:`_wrote_this`).
        Exclusive on local disk, memory and S3; on GCS exclusive against the real service
        (generation precondition 0); see docs/FORMAT.md for the generic fsspec fallback.
        """
        if self.backend == "local":
            return self._call("create", key, lambda: self._local_write(key, data, replace=False))
        if self.backend == "memory":
            with _MEMORY_LOCK:
                # through _call: fsspec errors must not escape as bare OSErrors
                return self._call("create", key, lambda: self._memory_swap(key, bytes(data), None))
        if self.backend in ("s3", "gcs"):
            try:
                self._fs.pipe_file(self._path(key), bytes(data), mode="create")
                return True
            except FileExistsError:
                return unique and self._wrote_this(key, bytes(data))
            except Exception as exc:
                if _is_precondition_failure(exc):
                    return unique and self._wrote_this(key, bytes(data))
                return self._call("create", key, lambda: _raise(exc))
        # generic fsspec: not atomic; documented as such
        try:
            self._fs.info(self._path(key))
            return False
        except FileNotFoundError:
            self.write(key, data)
            return True

    def swap(self, key: str, data: bytes | None, expected: Version | None, unique: bool = False) -> bool:
        """Compare-and-swap ``key``: set it to ``data`` (or delete it when ``data`` is None)
        only if its current version is ``expected`` (None: only if it does not exist).

        Returns True when the swap happened, False when the current value did not match.
        ``unique``: as for :meth:`create` (a lost answer followed by a retry that meets our
        own write is recognised as success).
        """
        if self.backend == "local":
            return self._call("swap", key, lambda: self._local_swap(key, data, expected))
        if self.backend == "memory":
            with _MEMORY_LOCK:
                return self._call("swap", key, lambda: self._memory_swap(key, data, expected))
        if expected is None:
            if data is None:
                return not self._exists(key)
            return self.create(key, data, unique)
        if self.backend == "s3":
            return self._call("swap", key, lambda: self._s3_swap(key, data, expected, unique))
        if self.backend == "gcs":
            return self._call("swap", key, lambda: self._gcs_swap(key, data, expected, unique))
        # generic fsspec: best effort, not atomic (documented)
        try:
            current = _content_version(self.read(key))
        except KeyNotFound:
            return False
        if current != expected:
            return False
        if data is None:
            self.delete(key)
        else:
            self.write(key, data)
        return True

    def delete(self, key: str) -> bool:
        """Delete ``key``. Returns False when it did not exist."""
        if self.backend == "s3" and not self._exists(key):
            # S3's DeleteObject succeeds whether or not the key exists; only a HEAD tells.
            # (Racy against a concurrent delete, which only affects the return value.)
            return False
        try:
            self._call("delete", key, lambda: self._fs.rm_file(self._path(key)))
        except KeyNotFound:
            return False
        return True

    # -- listing -----------------------------------------------------------------------------

    def list(self, prefix: str = "") -> list[KeyInfo]:
        """List every key under ``prefix`` (a folder such as ``"refs/"``), sorted by key."""
        base = self._root if not prefix else posixpath.join(self._root, prefix.rstrip("/"))
        try:
            found = self._fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise StorageError(self.url, f"list {prefix or '/'}", exc) from exc
        out = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            key = self._key(path)
            name = posixpath.basename(key)
            if name.startswith(TEMP_PREFIX) or key.startswith("locks/"):
                continue
            out.append(KeyInfo(key, int(info.get("size") or 0), _mtime_of(info)))
        out.sort(key=lambda i: i.key)
        return out

    def _exists(self, key: str) -> bool:
        try:
            info = self._call("stat", key, lambda: self._fs.info(self._path(key)))
        except KeyNotFound:
            return False
        # object stores report a "directory" for a mere prefix ("d" while "d/x" exists)
        return bool(info.get("type") != "directory")

    def remove_stale_temporaries(self, older_than: float) -> int:
        """Delete local temporary files (left by a process killed mid-write) whose last
        change is more than ``older_than`` seconds ago; returns how many. Other backends
        have none: their writes are all or nothing on the server."""
        if self.backend != "local" or not os.path.isdir(self._root):
            return 0
        removed = 0
        cutoff = time.time() - older_than
        for folder, _, files in os.walk(self._root):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    path = os.path.join(folder, name)
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(path).st_mtime < cutoff:
                            os.unlink(path)
                            removed += 1
        return removed

    # -- local disk --------------------------------------------------------------------------

    def _local_write(
        self, key: str, data: bytes | bytearray | memoryview, replace: bool, durable: bool = True
    ) -> bool:
        path = self._path(key)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                if durable and len(data) >= DIRECT_FROM and _page_aligned(data):
                    _write_direct(f.fileno(), memoryview(data))
                else:
                    f.write(data)
                    f.flush()
                if durable:
                    os.fsync(f.fileno())
            if replace:
                os.replace(tmp, path)
                return True
            try:
                # link() fails if the target exists: an atomic, content-complete create.
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _local_lock(self, key: str) -> Iterator[None]:
        # flock is released by the kernel when the process dies: no stale locks after a crash.
        lock_dir = os.path.join(self._root, "locks")
        os.makedirs(lock_dir, exist_ok=True)
        lock_path = os.path.join(lock_dir, xxhash.xxh3_64_hexdigest(key.encode()))
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _local_swap(self, key: str, data: bytes | None, expected: Version | None) -> bool:
        with self._local_lock(key):
            try:
                with open(self._path(key), "rb") as f:
                    current: Version | None = _content_version(f.read())
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                current = None  # a folder is not a key (see _call)
            if current != expected:
                return False
            if data is None:
                if current is not None:
                    os.unlink(self._path(key))
            else:
                self._local_write(key, data, replace=True)
            return True

    # -- memory ------------------------------------------------------------------------------

    def _memory_swap(self, key: str, data: bytes | None, expected: Version | None) -> bool:
        path = self._path(key)
        try:
            current: Version | None = _content_version(bytes(self._fs.cat_file(path)))
        except FileNotFoundError:
            current = None
        if current != expected:
            return False
        if data is None:
            if current is not None:
                self._fs.rm_file(path)
        else:
            self._fs.pipe_file(path, data)
        return True

    # -- S3: conditional requests (If-Match / If-None-Match) --------------------------------

    def _s3_split(self, key: str) -> tuple[str, str]:
        bucket, path, _ = self._fs.split_path(self._path(key))
        return bucket, path

    def _s3_get_versioned(self, key: str) -> tuple[bytes, Version]:
        bucket, path = self._s3_split(key)

        async def get() -> tuple[bytes, Version]:
            resp = await self._fs._call_s3("get_object", Bucket=bucket, Key=path)
            async with resp["Body"] as body:
                data = await body.read()
            return data, Version(resp["ETag"].strip('"'))

        result: tuple[bytes, Version] = fsspec.asyn.sync(self._fs.loop, get)
        return result

    def _s3_swap(self, key: str, data: bytes | None, expected: Version, unique: bool) -> bool:
        bucket, path = self._s3_split(key)
        try:
            if data is None:
                self._fs.call_s3("delete_object", Bucket=bucket, Key=path, IfMatch=f'"{expected}"')
            else:
                self._fs.call_s3(
                    "put_object", Bucket=bucket, Key=path, Body=data, IfMatch=f'"{expected}"'
                )
        except FileNotFoundError:
            return unique and self._wrote_this(key, data)
        except Exception as exc:
            if _is_precondition_failure(exc):
                return unique and self._wrote_this(key, data)
            raise
        finally:
            self._fs.invalidate_cache(self._path(key))
        return True

    def _wrote_this(self, key: str, data: bytes | None) -> bool:
        """After a conditional write failed its precondition: did our own write land?

        The client library retries a request whose answer was lost (a timeout, a reset
        connection), and the retry then fails its precondition against our own first
        write. The key holding exactly our bytes (or, for a delete, being gone) means it
        did. Everything written conditionally names ids, pids or times, so equal bytes are
        ours (or an identical write, which is the same outcome).
        """
        try:
            return data is not None and self.read(key) == data
        except KeyNotFound:
            return data is None

    # -- GCS: generation preconditions -------------------------------------------------------

    def _gcs_get_versioned(self, key: str) -> tuple[bytes, Version]:
        bucket, path, _ = self._fs.split_path(self._path(key))
        while True:
            headers, data = self._fs.call("GET", "b/{}/o/{}", bucket, path, alt="media")
            generation = headers.get("x-goog-generation") or headers.get("X-Goog-Generation")
            if generation is not None:
                return bytes(data), Version(str(generation))
            # Some emulators omit the header. A generation read after the bytes may belong
            # to a newer write (a swap would then overwrite it unseen): read the generation
            # before and after the bytes, and retry until it did not move.
            before = self._fs.info(self._path(key)).get("generation")
            headers, data = self._fs.call("GET", "b/{}/o/{}", bucket, path, alt="media")
            after = self._fs.info(self._path(key)).get("generation")
            if before == after:
                return bytes(data), Version(str(after))

    def _gcs_swap(self, key: str, data: bytes | None, expected: Version, unique: bool) -> bool:
        bucket, path, _ = self._fs.split_path(self._path(key))
        try:
            if data is None:
                self._fs.call("DELETE", "b/{}/o/{}", bucket, path, ifGenerationMatch=expected)
            else:
                self._fs.call(
                    "POST",
                    f"{self._fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                    uploadType="media",
                    name=path,
                    ifGenerationMatch=expected,
                    data=data,
                )
        except (FileNotFoundError, FileExistsError):
            # gcsfs raises FileExistsError for HTTP 412 (the generation did not match)
            return unique and self._wrote_this(key, data)
        except Exception as exc:
            if _is_precondition_failure(exc):
                return unique and self._wrote_this(key, data)
            raise
        finally:
            self._fs.invalidate_cache(self._path(key))
        return True


def _raise(exc: BaseException) -> NoReturn:
    raise exc


def _content_version(data: bytes) -> Version:
    return Version(xxhash.xxh3_128_hexdigest(data))


def _error_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _s3_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _is_precondition_failure(exc: BaseException) -> bool:
    # s3fs re-raises botocore's ClientError as a bare OSError(EINVAL, message) with the
    # ClientError as __cause__, so the S3 error code is only found down the chain.
    # ConditionalRequestConflict (409) is S3's answer to a concurrent conditional write:
    # the swap lost the race, exactly like a failed precondition.
    for e in _error_chain(exc):
        if getattr(e, "code", None) == 412:
            return True
        if _s3_error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return True
        # No bare "412" text match: messages carry keys, and a key may contain "412".
        text = f"{type(e).__name__} {e}"
        if "PreconditionFailed" in text or "conditional request" in text.lower():
            return True
    return False


def _is_invalid_range(exc: BaseException) -> bool:
    """True for S3's 416 InvalidRange (a range that starts at or past the end)."""
    return any(_s3_error_code(e) in ("InvalidRange", "416") for e in _error_chain(exc))


def _mtime_of(info: dict[str, Any]) -> float | None:
    for field in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None
