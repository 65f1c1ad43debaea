"""Every error Keepsake raises, as one tree.

::

    KeepsakeError
    ├── UsageError                      the caller asked for something invalid
    │   ├── InvalidRefName
    │   ├── InvalidObjectId
    │   ├── AmbiguousObjectId
    │   ├── PathNotFound                a local input path does not exist or is unreadable
    │   ├── UnsupportedValue            a param or metric of a type that cannot be stored
    │   ├── InvalidArgument             a bad argument (unknown goal, malformed filter, ...)
    │   └── CheckoutConflict            target directory is not empty (use force)
    ├── RepositoryError                 the repository cannot be used as asked
    │   ├── RepositoryNotFound
    │   ├── RepositoryExists
    │   ├── UnsupportedFormat           written by a newer Keepsake
    │   ├── UnknownScheme
    │   └── ConfigError                 keepsake.yaml is malformed
    ├── ObjectNotFound                  no object (or ref) with that id/name
    │   ├── RefNotFound
    │   └── NothingToRemove             rm was given no ids
    ├── WrongObjectType                 the id names an object of another type
    ├── RefConflict                     compare-and-swap lost: the ref changed meanwhile
    ├── DivergedRefs                    a transfer refused refs changed on both sides
    ├── RepositoryBusy                  another gc holds the repository's gc lock
    ├── RepositoryDamaged               gc refuses to run: reachable objects are missing or corrupt
    ├── StorageError                    the storage backend failed (network, auth, ...)
    │   └── KeyNotFound                 the one "missing" signal of keepsake.storage
    └── CorruptObject                   stored bytes do not decode or hash to their id
        └── UnsafePath                  a tree entry would escape the checkout directory

``CorruptObject`` is deliberately not a subclass of ``ObjectNotFound``: code that handles
a missing object must never swallow corruption by accident.
Each class keeps its data as attributes; ``str()`` is a sentence a user can act on.
"""

from __future__ import annotations

from collections.abc import Sequence


class KeepsakeError(Exception):
    """Root of every error raised by Keepsake."""

    #: process exit status the CLI uses for this class of error
    exit_code = 1


class UsageError(KeepsakeError):
    """The caller asked for something that cannot be done as asked."""

    exit_code = 2


class InvalidRefName(UsageError):
    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"invalid ref name {name!r}: {reason}")


class InvalidObjectId(UsageError):
    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(
            f"{text!r} is not an object id or ref (ids are 7 to 32 lowercase hex characters)"
        )


class AmbiguousObjectId(UsageError):
    exit_code = 5

    def __init__(self, prefix: str, candidates: Sequence[str]) -> None:
        self.prefix = prefix
        # FIX (typing): Sequence, so Repository.resolve can pass its list[ObjectId] (mypy)
        self.candidates = list(candidates)
        shown = ", ".join(sorted(candidates)[:5])
        super().__init__(
            f"id prefix {prefix!r} is ambiguous: it matches {len(candidates)} objects "
            f"({shown}); give more characters"
        )


class PathNotFound(UsageError):
    def __init__(self, path: str, reason: str = "no such file or directory") -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot read {path}: {reason}")


class UnsupportedValue(UsageError):
    def __init__(self, where: str, value: object, reason: str | None = None) -> None:
        self.where = where
        self.value_type = type(value).__name__
        detail = reason or (
            f"values of type {self.value_type} cannot be stored (use numbers, strings, booleans, "
            "None, lists, dicts, numpy arrays or torch tensors)"
        )
        super().__init__(f"{where}: {detail}")


class InvalidArgument(UsageError):
    def __init__(self, message: str) -> None:
        super().__init__(message)


class CheckoutConflict(UsageError):
    def __init__(self, directory: str) -> None:
        self.directory = directory
        super().__init__(
            f"{directory} is not empty (pass -f/force=True to overwrite files in it)"
        )


class RepositoryError(KeepsakeError):
    exit_code = 3


class RepositoryNotFound(RepositoryError):
    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(f'no keepsake repository at {url} (run "keepsake init {url}")')


class RepositoryExists(RepositoryError):
    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(f"a keepsake repository already exists at {url}")


class UnsupportedFormat(RepositoryError):
    def __init__(self, url: str, found: int, supported: int) -> None:
        self.url = url
        self.found = found
        self.supported = supported
        super().__init__(
            f"the repository at {url} has format version {found}, but this Keepsake "
            f"supports up to version {supported} (upgrade with \"pip install -U keepsake\")"
        )


class UnknownScheme(RepositoryError):
    def __init__(self, url: str, scheme: str) -> None:
        self.url = url
        self.scheme = scheme
        super().__init__(
            f"cannot open {url}: unknown storage scheme {scheme!r} "
            "(use a local path, memory://, s3://, gs:// or az://, and install the "
            "matching extra, e.g. pip install 'keepsake[s3]')"
        )


class ConfigError(RepositoryError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot use {path}: {reason}")


class ObjectNotFound(KeepsakeError):
    exit_code = 4

    def __init__(self, object_id: str, what: str = "object") -> None:
        self.object_id = object_id
        self.what = what
        super().__init__(f"{what} {object_id} not found in the repository")


class RefNotFound(ObjectNotFound):
    def __init__(self, name: str) -> None:
        super().__init__(name, what="ref")
        self.name = name


class NothingToRemove(ObjectNotFound):
    """``keepsake rm`` got no ids, e.g. from an empty ``$(keepsake ls -q --filter ...)``."""

    def __init__(self) -> None:
        KeepsakeError.__init__(
            self, 'nothing to remove: no experiment or checkpoint ids were given (see "keepsake ls -q")'
        )
        self.object_id = ""
        self.what = "experiment or checkpoint"


class WrongObjectType(KeepsakeError):
    exit_code = 6

    def __init__(self, object_id: str, expected: str, actual: str) -> None:
        self.object_id = object_id
        self.expected = expected
        self.actual = actual
        super().__init__(f"object {object_id} is a {actual}, not a {expected}")


class RefConflict(KeepsakeError):
    exit_code = 7

    def __init__(self, name: str, expected: str | None, actual: str | None) -> None:
        self.name = name
        self.expected = expected
        self.actual = actual
        want = expected or "nothing"
        have = actual or "nothing"
        super().__init__(
            f"ref {name} was not updated: expected it to point at {want}, "
            f"but it points at {have} (re-read it and retry)"
        )


class RepositoryBusy(KeepsakeError):
    exit_code = 10

    def __init__(self, url: str, holder: str) -> None:
        self.url = url
        self.holder = holder
        super().__init__(
            f"another gc is running on {url} ({holder}); wait for it to finish, or, if it died, "
            f"retry after its lock expires"
        )


class RepositoryDamaged(KeepsakeError):
    exit_code = 11

    def __init__(self, url: str, damaged: int, example: str) -> None:
        self.url = url
        self.damaged = damaged
        self.example = example
        super().__init__(
            f"gc deleted nothing: {damaged} reachable objects in {url} are missing or corrupt "
            f"(e.g. {example}); run \"keepsake fsck\" to see what is affected"
        )


class StorageError(KeepsakeError):
    exit_code = 8

    def __init__(self, url: str, operation: str, cause: BaseException | str) -> None:
        self.url = url
        self.operation = operation
        self.cause = cause
        super().__init__(f"storage error during {operation} on {url}: {cause}")


class KeyNotFound(StorageError):
    def __init__(self, url: str, key: str) -> None:
        self.key = key
        super().__init__(url, "read", f"no such key {key!r}")


class CorruptObject(KeepsakeError):
    exit_code = 9

    def __init__(self, object_id: str, reason: str) -> None:
        self.object_id = object_id
        self.reason = reason
        super().__init__(
            f"object {object_id} is corrupt: {reason} (run \"keepsake fsck\" to see what is affected)"
        )


class UnsafePath(CorruptObject):
    def __init__(self, object_id: str, name: str) -> None:
        self.name = name
        super().__init__(object_id, f"entry name {name!r} would write outside the checkout directory")


class DivergedRefs(KeepsakeError):
    """A push or pull refused to move refs that changed on both sides (docs/FORMAT.md §16).

    Raised after everything else was transferred; ``refs`` holds (name, reason) pairs.
    """

    exit_code = 12  # 10 and 11 are gc's (RepositoryBusy, RepositoryDamaged)

    def __init__(self, destination: str, refs: Sequence[tuple[str, str]]) -> None:
        self.destination = destination
        self.refs = list(refs)
        name, reason = self.refs[0]
        more = f" and {len(self.refs) - 1} more" if len(self.refs) > 1 else ""
        super().__init__(
            f"{len(self.refs)} ref(s) not updated at {destination}: {name} ({reason}){more}; "
            "the other refs were transferred (compare with \"keepsake ls\" on both sides, or "
            "rerun with --force to overwrite them)"
        )
