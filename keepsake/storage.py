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
import errno
import fcntl
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, NewType, TypeVar
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

    def _key(self, path: str) -> str:
        path = path.replace(os.sep, "/") if self.backend == "local" else path
        root = self._root.replace(os.sep, "/") if self.backend == "local" else self._root
        # memory:// paths come back with a leading slash; compare without it
        return posixpath.relpath("/" + path.lstrip("/"), "/" + root.lstrip("/"))

    def _call(self, operation: str, key: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except FileNotFoundError as exc:
            raise KeyNotFound(self.url, key) from exc
        except OSError as exc:
            if exc.errno == errno.ENOENT:
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
        """Return bytes ``[start, end)`` of ``key``."""
        data = self._call("read", key, lambda: self._fs.cat_file(self._path(key), start, end))
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
        if self.backend == "local":
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
                self._call("read", key, lambda res=res: _raise(res))
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

    def write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``key``, replacing any value; readers see all or nothing.

        On local disk the bytes are written to a temporary file, fsynced, and renamed into
        place, so a crash never leaves a half-written key.
        """
        if self.backend == "local":
            self._call("write", key, lambda: self._local_write(key, data, replace=True))
        else:
            self._call("write", key, lambda: self._fs.pipe_file(self._path(key), bytes(data)))

    def create(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` at ``key`` only if the key does not exist.

        Returns True when this call created the key, False when it already existed.
        Exclusive on local disk, memory and S3; on GCS exclusive against the real service
        (generation precondition 0); see docs/FORMAT.md for the generic fsspec fallback.
        """
        if self.backend == "local":
            return self._call("create", key, lambda: self._local_write(key, data, replace=False))
        if self.backend == "memory":
            with _MEMORY_LOCK:
                return self._memory_swap(key, bytes(data), None)
        if self.backend in ("s3", "gcs"):
            try:
                self._fs.pipe_file(self._path(key), bytes(data), mode="create")
                return True
            except FileExistsError:
                return False
            except Exception as exc:
                if _is_precondition_failure(exc):
                    return False
                return self._call("create", key, lambda: _raise(exc))
        # generic fsspec: not atomic; documented as such
        try:
            self._fs.info(self._path(key))
            return False
        except FileNotFoundError:
            self.write(key, data)
            return True

    def swap(self, key: str, data: bytes | None, expected: Version | None) -> bool:
        """Compare-and-swap ``key``: set it to ``data`` (or delete it when ``data`` is None)
        only if its current version is ``expected`` (None: only if it does not exist).

        Returns True when the swap happened, False when the current value did not match.
        """
        if self.backend == "local":
            return self._call("swap", key, lambda: self._local_swap(key, data, expected))
        if self.backend == "memory":
            with _MEMORY_LOCK:
                return self._memory_swap(key, data, expected)
        if expected is None:
            if data is None:
                return not self._exists(key)
            return self.create(key, data)
        if self.backend == "s3":
            return self._call("swap", key, lambda: self._s3_swap(key, data, expected))
        if self.backend == "gcs":
            return self._call("swap", key, lambda: self._gcs_swap(key, data, expected))
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
            self._call("stat", key, lambda: self._fs.info(self._path(key)))
        except KeyNotFound:
            return False
        return True

    # -- local disk --------------------------------------------------------------------------

    def _local_write(self, key: str, data: bytes | bytearray | memoryview, replace: bool) -> bool:
        path = self._path(key)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
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
            except FileNotFoundError:
                current = None
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

    def _s3_swap(self, key: str, data: bytes | None, expected: Version) -> bool:
        bucket, path = self._s3_split(key)
        try:
            if data is None:
                self._fs.call_s3("delete_object", Bucket=bucket, Key=path, IfMatch=f'"{expected}"')
            else:
                self._fs.call_s3(
                    "put_object", Bucket=bucket, Key=path, Body=data, IfMatch=f'"{expected}"'
                )
        except FileNotFoundError:
            return False
        except Exception as exc:
            if _is_precondition_failure(exc):
                return False
            raise
        finally:
            self._fs.invalidate_cache(self._path(key))
        return True

    # -- GCS: generation preconditions -------------------------------------------------------

    def _gcs_get_versioned(self, key: str) -> tuple[bytes, Version]:
        bucket, path, _ = self._fs.split_path(self._path(key))
        headers, data = self._fs.call("GET", "b/{}/o/{}", bucket, path, alt="media")
        generation = headers.get("x-goog-generation") or headers.get("X-Goog-Generation")
        if generation is None:
            # Some emulators omit the header: read the generation, then check it did not move.
            generation = self._fs.info(self._path(key)).get("generation")
        return bytes(data), Version(str(generation))

    def _gcs_swap(self, key: str, data: bytes | None, expected: Version) -> bool:
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
        except FileNotFoundError:
            return False
        except Exception as exc:
            if _is_precondition_failure(exc):
                return False
            raise
        finally:
            self._fs.invalidate_cache(self._path(key))
        return True


def _raise(exc: BaseException) -> Any:
    raise exc


def _content_version(data: bytes) -> Version:
    return Version(xxhash.xxh3_128_hexdigest(data))


def _is_precondition_failure(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    if code == 412:
        return True
    text = f"{type(exc).__name__} {exc}"
    return "PreconditionFailed" in text or "412" in text or "conditional request" in text.lower()


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
