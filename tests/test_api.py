"""The public API surface and the error tree (keepsake.errors)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import keepsake
import keepsake.errors as errors
from keepsake.errors import (
    NothingToRemove,
    InvalidArgument,
    UnsupportedValue,
    AmbiguousObjectId,
    CheckoutConflict,
    ConfigError,
    CorruptObject,
    InvalidObjectId,
    InvalidRefName,
    KeepsakeError,
    KeyNotFound,
    ObjectNotFound,
    PathNotFound,
    DivergedRefs,
    RefConflict,
    RefNotFound,
    RepositoryBusy,
    RepositoryDamaged,
    RepositoryError,
    RepositoryExists,
    RepositoryNotFound,
    StorageError,
    UnknownScheme,
    UnsafePath,
    UnsupportedFormat,
    UsageError,
    WrongObjectType,
)

#: The curated public names: adding one is an API decision, so this test must change with it.
PUBLIC = [
    "Checkpoint",
    "Experiment",
    "ExperimentList",
    "KeepsakeError",
    "Project",
    "Repository",
    "__version__",
    "experiments",
    "init",
]

#: The error tree of keepsake.errors (class -> parent) and the CLI exit code of each class.
#: Families (direct children of KeepsakeError) have distinct codes; members inherit their
#: family's code, except AmbiguousObjectId (a UsageError with its own code 5).
#:
#:   code  family                      members
#:   1     KeepsakeError (root; also fsck damage / show-ref no match, which are not errors)
#:   2     UsageError                  InvalidRefName, InvalidObjectId, PathNotFound, CheckoutConflict
#:   5       AmbiguousObjectId         (UsageError subclass, own code)
#:   3     RepositoryError             RepositoryNotFound, RepositoryExists, UnsupportedFormat,
#:                                     UnknownScheme, ConfigError
#:   4     ObjectNotFound              RefNotFound
#:   6     WrongObjectType
#:   7     RefConflict
#:   8     StorageError                KeyNotFound
#:   9     CorruptObject               UnsafePath
#:   10    RepositoryBusy              (another gc holds the lock)
#:   11    RepositoryDamaged           (gc refused: reachable objects damaged)
#:   12    DivergedRefs                (push/pull refused diverged refs)
TREE: dict[type[KeepsakeError], tuple[type[Exception], int]] = {
    KeepsakeError: (Exception, 1),
    UsageError: (KeepsakeError, 2),
    InvalidRefName: (UsageError, 2),
    InvalidObjectId: (UsageError, 2),
    AmbiguousObjectId: (UsageError, 5),
    PathNotFound: (UsageError, 2),
    UnsupportedValue: (UsageError, 2),
    NothingToRemove: (ObjectNotFound, 4),
    InvalidArgument: (UsageError, 2),
    CheckoutConflict: (UsageError, 2),
    RepositoryError: (KeepsakeError, 3),
    RepositoryNotFound: (RepositoryError, 3),
    RepositoryExists: (RepositoryError, 3),
    UnsupportedFormat: (RepositoryError, 3),
    UnknownScheme: (RepositoryError, 3),
    ConfigError: (RepositoryError, 3),
    ObjectNotFound: (KeepsakeError, 4),
    RefNotFound: (ObjectNotFound, 4),
    WrongObjectType: (KeepsakeError, 6),
    RefConflict: (KeepsakeError, 7),
    StorageError: (KeepsakeError, 8),
    KeyNotFound: (StorageError, 8),
    CorruptObject: (KeepsakeError, 9),
    UnsafePath: (CorruptObject, 9),
    RepositoryBusy: (KeepsakeError, 10),
    RepositoryDamaged: (KeepsakeError, 11),
    DivergedRefs: (KeepsakeError, 12),
}

#: One instance of every error, built as the library builds them.
SAMPLES: list[KeepsakeError] = [
    UsageError("bad usage"),
    InvalidRefName("a//b", "it has an empty part ('//')"),
    InvalidObjectId("xyz"),
    AmbiguousObjectId("abcdef0", ["abcdef01" + "0" * 24, "abcdef02" + "0" * 24]),
    PathNotFound("/no/such"),
    UnsupportedValue("params['x']", object()),
    NothingToRemove(),
    InvalidArgument('primary_metric goal "lowest" is not "minimize" or "maximize"'),
    CheckoutConflict("/dir"),
    RepositoryError("repo"),
    RepositoryNotFound("/r"),
    RepositoryExists("/r"),
    UnsupportedFormat("/r", 99, 1),
    UnknownScheme("foo://x", "foo"),
    ConfigError("/p/keepsake.yaml", "unknown keys x"),
    ObjectNotFound("abc1234"),
    RefNotFound("tags/x"),
    WrongObjectType("abc1234", "tree", "blob"),
    RefConflict("tags/x", None, "abc1234"),
    StorageError("s3://b", "read k", OSError("connection reset")),
    KeyNotFound("s3://b", "k"),
    CorruptObject("abc1234", "content does not hash to its id"),
    UnsafePath("abc1234", "../x"),
    RepositoryBusy("s3://b", "pid 7 on box"),
    RepositoryDamaged("s3://b", 2, "abc1234: referenced by ref tags/x"),
    DivergedRefs("s3://b", [("experiments/abc", "both sides changed")]),
]


def error_classes() -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    ]


def test_all_is_the_curated_list() -> None:
    assert keepsake.__all__ == PUBLIC


def test_every_public_name_imports() -> None:
    fresh = importlib.import_module("keepsake")
    for name in PUBLIC:
        assert hasattr(fresh, name), name
    namespace: dict[str, object] = {}
    exec(f"from keepsake import {', '.join(PUBLIC)}", namespace)  # noqa: S102 - the import users write
    assert namespace["KeepsakeError"] is KeepsakeError
    assert namespace["Repository"] is importlib.import_module("keepsake.repository").Repository
    assert isinstance(namespace["__version__"], str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", keepsake.__version__)


def test_every_error_is_a_keepsake_error() -> None:
    classes = error_classes()
    assert len(classes) == len(TREE)
    for cls in classes:
        assert issubclass(cls, KeepsakeError), cls


def test_error_tree_and_exit_codes() -> None:
    assert set(error_classes()) == set(TREE)
    for cls, (parent, code) in TREE.items():
        assert cls.__bases__ == (parent,), cls
        assert cls.exit_code == code, cls


def test_families_have_distinct_exit_codes() -> None:
    families = [cls for cls in TREE if cls.__bases__ == (KeepsakeError,)]
    codes = [cls.exit_code for cls in families] + [AmbiguousObjectId.exit_code]
    assert len(codes) == len(set(codes))
    # 0 is success and 1 is fsck/show-ref's "found nothing good": no error family uses them
    assert not {0, 1} & set(codes)
    assert sorted(codes) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_corruption_is_not_a_missing_object() -> None:
    assert not issubclass(CorruptObject, ObjectNotFound)
    assert not issubclass(ObjectNotFound, CorruptObject)
    assert not issubclass(UnsafePath, ObjectNotFound)
    # and a missing storage key is a storage signal, not "object not found"
    assert not issubclass(KeyNotFound, ObjectNotFound)


def test_every_error_message_is_one_actionable_line() -> None:
    assert {type(e) for e in SAMPLES} == set(TREE) - {KeepsakeError}
    for exc in SAMPLES:
        message = str(exc)
        assert message and "\n" not in message, type(exc)
    assert "keepsake init /r" in str(RepositoryNotFound("/r"))
    assert "99" in str(UnsupportedFormat("/r", 99, 1)) and "version 1" in str(UnsupportedFormat("/r", 99, 1))
    assert "keepsake fsck" in str(CorruptObject("abc1234", "x"))
    assert "-f" in str(CheckoutConflict("/dir"))


def test_exit_codes_match_docs_cli_md() -> None:
    """docs/CLI.md's exit code table names the class of each code."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    documented = {
        name: int(code) for code, name in re.findall(r"^\|\s*(\d+)\s*\|[^\n]*\|\s*`(\w+)`\s*\|\s*$", doc, re.M)
    }
    assert documented == {cls.__name__: cls.exit_code for cls in TREE if cls.__bases__ == (KeepsakeError,)
                          or cls is AmbiguousObjectId}
