"""The ref store: one small key per ref under ``refs/``, updated by compare-and-swap (FORMAT.md §9).

A ref's value is the 32-character object id and a newline. Every update names the value it
expects (or None: the ref must not exist), so two writers racing on a shared ref never lose
an update silently: the loser gets RefConflict and can re-read and retry.
"""

from __future__ import annotations

import fnmatch
import posixpath

from keepsake.errors import CorruptObject, InvalidObjectId, InvalidRefName, KeyNotFound, RefConflict, RefNotFound
from keepsake.objects.ids import ObjectId, parse_object_id
from keepsake.refs.names import check_ref_name
from keepsake.storage import Storage, Version

PREFIX = "refs"


def _key(name: str) -> str:
    return posixpath.join(PREFIX, check_ref_name(name))


def _parse(name: str, data: bytes) -> ObjectId:
    try:
        return parse_object_id(data.decode("ascii").strip())
    except (UnicodeDecodeError, InvalidObjectId) as exc:
        raise CorruptObject(f"ref {name}", "its value is not an object id") from exc


class RefStore:
    """Refs in one :class:`~keepsake.storage.Storage`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def get(self, name: str) -> ObjectId:
        """Return the id ``name`` points at. Raises RefNotFound."""
        try:
            return _parse(name, self.storage.read(_key(name)))
        except KeyNotFound:
            raise RefNotFound(name) from None

    def get_versioned(self, name: str) -> tuple[ObjectId | None, Version | None]:
        try:
            data, version = self.storage.read_versioned(_key(name))
        except KeyNotFound:
            return None, None
        return _parse(name, data), version

    def set(self, name: str, new: ObjectId, expected: ObjectId | None = None, *, check: bool = True) -> None:
        """Point ``name`` at ``new``.

        Args:
            expected: when ``check`` is True, the id the ref must point at now (None: the ref
                must not exist). When ``check`` is False the ref is overwritten; use that only
                for refs a single process owns.

        Raises:
            RefConflict: the ref's current value is not ``expected``.
        """
        key = _key(name)
        value = f"{new}\n".encode()
        if not check:
            self.storage.write(key, value)
            return
        current, version = self.get_versioned(name)
        if current != expected:
            raise RefConflict(name, expected, current)
        if current is None:
            self._check_no_nesting(name)
        if not self.storage.swap(key, value, version, unique=True):
            raise RefConflict(name, expected, self.get_versioned(name)[0])

    def _check_no_nesting(self, name: str) -> None:
        # As in git, a name cannot be both a ref and a folder of refs (tags/a and tags/a/b):
        # local disk could not store both, object stores could, so refuse it everywhere.
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            try:
                self.storage.read(posixpath.join(PREFIX, parent))
            except KeyNotFound:
                continue
            raise InvalidRefName(name, f"ref {parent!r} exists, and a ref cannot also be a folder of refs")
        below = self.storage.list(posixpath.join(PREFIX, name) + "/")
        if below:
            child = below[0].key[len(PREFIX) + 1 :]
            raise InvalidRefName(name, f"ref {child!r} exists below it, and a ref cannot also be a folder of refs")

    def delete(self, name: str, expected: ObjectId | None = None) -> None:
        """Delete ``name``; with ``expected``, only while it still points there.

        Raises:
            RefNotFound: there is no such ref.
            RefConflict: it points somewhere other than ``expected``.
        """
        current, version = self.get_versioned(name)
        if current is None:
            raise RefNotFound(name)
        if expected is not None and current != expected:
            raise RefConflict(name, expected, current)
        if not self.storage.swap(_key(name), None, version, unique=True):
            raise RefConflict(name, expected or current, self.get_versioned(name)[0])

    def list(self, pattern: str | None = None) -> dict[str, ObjectId]:
        """Every ref (optionally matching a glob or a prefix) and the id it points at."""
        keys: list[str] = []
        # a plain prefix ("tags/") lists only its folder: one LIST page, not every ref
        folder = ""
        if pattern and not any(c in pattern for c in "*?[") and "/" in pattern:
            folder = pattern.rstrip("/").rsplit("/", 1)[0] + "/" if not pattern.endswith("/") else pattern
        for info in self.storage.list(PREFIX + "/" + folder):
            name = info.key[len(PREFIX) + 1 :]
            if pattern and not (fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern.rstrip("/") + "/") or name == pattern):
                continue
            keys.append(info.key)
        out: dict[str, ObjectId] = {}
        # many refs at once (concurrent on object stores); one that vanished since the
        # listing was deleted meanwhile: read the rest one by one
        for start in range(0, len(keys), 256):
            batch = keys[start : start + 256]
            try:
                values: list[bytes | None] = list(self.storage.read_many(batch))
            except KeyNotFound:
                values = []
                for key in batch:
                    try:
                        values.append(self.storage.read(key))
                    except KeyNotFound:
                        values.append(None)
            for key, data in zip(batch, values):
                if data is not None:
                    name = key[len(PREFIX) + 1 :]
                    out[name] = _parse(name, data)
        return out
