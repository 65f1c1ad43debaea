"""Bad input to the CLI and the Python API: the right error, the right exit code, and an
unchanged repository.

One table (CASES) drives one parametrized test. Each case runs in a fresh copy of a
template workspace::

    ws/
      repo/        a repository: tree of data/ tagged tags/base, two blobs sharing a 7-char prefix
      data/        a.txt (inline blob), sub/big.bin (chunked blob)
      nonempty/    a non-empty directory (checkout target)
      sentinel/    a sibling directory hostile trees try to write into

Proof of "nothing changed": every path under ws (files, directories, links, with mode and
sha256 of the bytes; nothing excluded) is snapshotted before the failing command and
compared after it. Cases that corrupt the repository on purpose do so in ``prepare``,
before the snapshot, so the proof covers the failing command itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from click.testing import CliRunner, Result

from keepsake.cli.main import cli
from keepsake.cli.usage import parse_duration
from keepsake.gc import collect_garbage
from keepsake.errors import (
    AmbiguousObjectId,
    CheckoutConflict,
    ConfigError,
    CorruptObject,
    InvalidArgument,
    InvalidObjectId,
    InvalidRefName,
    KeepsakeError,
    ObjectNotFound,
    PathNotFound,
    RefConflict,
    RefNotFound,
    RepositoryBusy,
    RepositoryDamaged,
    RepositoryExists,
    RepositoryNotFound,
    UnknownScheme,
    UnsupportedFormat,
    WrongObjectType,
)
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.manifests import MODE_FILE, MODE_TREE, Blob
from keepsake.objects.wire import pack_msgpack
from keepsake.objects.pack import pack_key
from keepsake.objects.worktree import HashOnly, checkout_tree, write_blob_from_file, write_tree
from keepsake.project import find_project
from keepsake.repository import Repository

# --------------------------------------------------------------------- workspace


@dataclass
class Env:
    """One test's workspace and the ids in it; ``ids`` also gets ids made by ``prepare``."""

    ws: Path
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def repo(self) -> Path:
        return self.ws / "repo"

    def fmt(self, text: str) -> str:
        return text.format(ws=self.ws, repo=self.repo, **self.ids)

    def open(self) -> Repository:
        return Repository.open(str(self.repo))


def _ambiguous_pair() -> list[bytes]:
    """Two small files whose blob ids share their first 7 hex characters (birthday bound:
    ~16k candidates for 28 bits, hashed in well under a second)."""
    seen: dict[str, bytes] = {}
    n = 0
    while True:
        data = f"candidate {n}\n".encode()
        oid = hash_object(ObjectType.BLOB, Blob(len(data), (), data).encode())
        if oid[:7] in seen:
            return [seen[oid[:7]], data]
        seen[oid[:7]] = data
        n += 1


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    ws = tmp_path_factory.mktemp("template") / "ws"
    data = ws / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_bytes(b"hello\n")
    (data / "sub" / "big.bin").write_bytes(random.Random(7).randbytes(200_000))
    (ws / "nonempty").mkdir()
    (ws / "nonempty" / "keep.txt").write_bytes(b"keep me\n")
    (ws / "sentinel").mkdir()
    (ws / "sentinel" / "canary.txt").write_bytes(b"canary\n")

    ids: dict[str, str] = {}
    with Repository.init(str(ws / "repo")) as repo:
        with repo.objects.writer() as writer:
            ids["tree"] = write_tree(writer, repo.chunker, str(data))[0]
        repo.refs.set("tags/base", ObjectId(ids["tree"]), None)
        big_id, big = write_blob_from_file(HashOnly(), repo.chunker, str(data / "sub" / "big.bin"))
        ids["big"] = big_id
        ids["chunk"] = big.chunks[0][0]
        assert len(big.chunks) >= 2
        ids["small"] = write_blob_from_file(HashOnly(), repo.chunker, str(data / "a.txt"))[0]
        with repo.objects.writer() as writer:
            pair = [writer.put(ObjectType.BLOB, Blob(len(d), (), d).encode()) for d in _ambiguous_pair()]
        ids["amb"] = pair[0][:7]
        assert pair[0] != pair[1] and pair[1].startswith(ids["amb"])
        known = repo.objects.entries()
        ids["absent"] = next(p for p in (f"{n:07x}" for n in range(1 << 28)) if not any(k.startswith(p) for k in known))
    return ws, ids


@pytest.fixture
def env(template: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    src, ids = template
    ws = tmp_path / "ws"
    shutil.copytree(src, ws, symlinks=True)
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(ws)
    return Env(ws, dict(ids))


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every path under ``root``: (kind, permission bits, sha256 of bytes or link target)."""
    out: dict[str, tuple[str, int, str]] = {".": ("dir", stat.S_IMODE(root.lstat().st_mode), "")}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return out


# ---------------------------------------------------------- corruption steps (prepare)


def _entry_pack(env: Env, name: str) -> tuple[Path, int, int]:
    with env.open() as repo:
        e = repo.objects.locate(ObjectId(env.ids[name]))
    return env.repo / pack_key(e.pack), e.offset, e.length


def flip_bit(env: Env) -> None:
    """Flip one bit in the middle of the first chunk of big.bin."""
    pack, offset, length = _entry_pack(env, "chunk")
    data = bytearray(pack.read_bytes())
    data[offset + length // 2] ^= 0x10
    pack.write_bytes(data)


def truncate_pack(env: Env) -> None:
    """Cut the pack inside big.bin's blob manifest."""
    pack, offset, _ = _entry_pack(env, "big")
    os.truncate(pack, offset + 3)


def delete_pack(env: Env) -> None:
    pack, _, _ = _entry_pack(env, "big")
    pack.unlink()


def set_config(**changes: Any) -> Callable[[Env], None]:
    def prepare(env: Env) -> None:
        doc = json.loads((env.repo / "config").read_bytes())
        doc.update(changes)
        (env.repo / "config").write_text(json.dumps(doc))

    return prepare


def write_file(relpath: str, data: bytes) -> Callable[[Env], None]:
    def prepare(env: Env) -> None:
        (env.ws / relpath).write_bytes(data)

    return prepare


def hostile_tree(name: str | Callable[[Env], str], mode: int = MODE_FILE) -> Callable[[Env], None]:
    """Store a tree whose one entry has an unsafe name, bypassing Tree's validation."""

    def prepare(env: Env) -> None:
        entry_name = name(env) if callable(name) else name
        target = env.ids["tree"] if mode == MODE_TREE else env.ids["small"]
        raw = pack_msgpack({"entries": [[entry_name, mode, 6, bytes.fromhex(target)]]})
        with env.open() as repo, repo.objects.writer() as writer:
            env.ids["hostile"] = writer.put(ObjectType.TREE, raw)

    return prepare


# ------------------------------------------------------------------------- API calls


def api_open(url: str) -> Callable[[Env], object]:
    return lambda env: Repository.open(env.fmt(url))


def api_init_existing(env: Env) -> object:
    return Repository.init(str(env.repo))


def with_repo(fn: Callable[[Repository, Env], object]) -> Callable[[Env], object]:
    def call(env: Env) -> object:
        with env.open() as repo:
            return fn(repo, env)

    return call


def api_write_tree_on_file(repo: Repository, env: Env) -> object:
    with repo.objects.writer() as writer:
        return write_tree(writer, repo.chunker, str(env.ws / "data" / "a.txt"))


def api_read_blob(repo: Repository, env: Env) -> object:
    return b"".join(repo.objects.iter_blob(repo.objects.get_blob(ObjectId(env.ids["big"]))))


# ----------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Case:
    name: str
    code: int  # CLI exit status, or the raised error's exit_code for API cases
    fragments: tuple[str, ...]  # all must appear in the message ({placeholders} allowed)
    argv: tuple[str, ...] = ()
    api: Callable[[Env], object] | None = None
    error: type[KeepsakeError] | None = None  # API cases: the exact class raised
    prepare: Callable[[Env], None] | None = None
    keepsake: bool = True  # a KeepsakeError: one "error: " line on stderr
    stream: str = "stderr"  # where the fragments are (fsck reports on stdout)


R = ("-R", "{repo}")


def C(name: str, code: int, argv: tuple[str, ...], *fragments: str, **kw: Any) -> Case:
    return Case(name, code, fragments, argv=argv, **kw)


def A(name: str, error: type[KeepsakeError], fn: Callable[[Env], object], *fragments: str, **kw: Any) -> Case:
    return Case(name, error.exit_code, fragments, api=fn, error=error, **kw)


def _gc_lock(env: Env) -> None:
    doc = {"version": 1, "host": "box", "pid": 7, "started": time.time(), "updated": time.time()}
    (env.repo / "gc").mkdir(exist_ok=True)
    (env.repo / "gc" / "lock").write_bytes(msgpack.packb(doc))


GC_LOCK = _gc_lock
YAML_BAD = write_file("keepsake.yaml", b"repository: [unclosed\n")
YAML_UNKNOWN = write_file("keepsake.yaml", b"repository: repo\nrepsitory: typo\n")

#: Unsafe tree entry names (label, name or name(env), mode): each would write outside DIR.
HOSTILE_NAMES: list[tuple[str, str | Callable[[Env], str], int]] = [
    ("slash", "../sentinel/pwned", MODE_FILE),
    ("dotdot", "..", MODE_TREE),
    ("nul", "pwn\0ed", MODE_FILE),
    ("absolute", lambda env: f"{env.ws}/sentinel/pwned", MODE_FILE),
    ("backslash", "..\\sentinel", MODE_FILE),
    ("dot", ".", MODE_TREE),
    ("empty", "", MODE_FILE),
]

CASES: list[Case] = [
    # -- no usable repository (3)
    C("no-repo-at-url", 3, ("-R", "{ws}/nothing", "count-objects"), "no keepsake repository at {ws}/nothing", "keepsake init {ws}/nothing"),
    C("no-repo-default-location", 3, ("ls-tree", "{tree}"), "no keepsake repository at {ws}/.keepsake", "keepsake init"),
    C("dir-not-a-repo", 3, ("-R", "{ws}/data", "ls-tree", "{tree}"), "no keepsake repository at {ws}/data"),
    C("newer-format", 3, (*R, "count-objects"), "format version 99", "supports up to version 1", prepare=set_config(format=99)),
    C("unknown-scheme", 3, ("-R", "foo://x", "count-objects"), "unknown storage scheme 'foo'"),
    C("yaml-bad-syntax", 3, ("count-objects",), "{ws}/keepsake.yaml", "not valid YAML", "line 2", prepare=YAML_BAD),
    C("yaml-unknown-keys", 3, ("count-objects",), "unknown keys repsitory", prepare=YAML_UNKNOWN),
    C("yaml-unknown-keys-with-flag", 3, (*R, "count-objects"), "unknown keys repsitory", prepare=YAML_UNKNOWN),
    C("yaml-not-a-mapping", 3, ("count-objects",), "must be a mapping", prepare=write_file("keepsake.yaml", b"- repo\n")),
    C("yaml-not-utf8", 3, ("count-objects",), "not UTF-8", prepare=write_file("keepsake.yaml", b"\xff\xfe: x\n")),
    C("yaml-repository-not-string", 3, ("count-objects",), "'repository' must be a string", prepare=write_file("keepsake.yaml", b"repository: 5\n")),
    C("yaml-bad-hash-object", 3, ("hash-object", "{ws}/data/a.txt"), "not valid YAML", prepare=YAML_BAD),
    C("init-existing", 3, (*R, "init"), "a keepsake repository already exists at {repo}"),
    C("config-not-json", 9, (*R, "count-objects"), "config is not valid", prepare=write_file("repo/config", b"{bad")),
    C("config-bad-chunker", 9, (*R, "count-objects"), "config is not valid", "min_size",
      prepare=set_config(chunker={"avg_size": 1, "min_size": 1, "max_size": 1})),
    # -- ids (2: invalid, 4: unknown, 5: ambiguous)
    C("unknown-prefix", 4, (*R, "rev-parse", "{absent}"), "object {absent} not found"),
    C("unknown-prefix-cat-file", 4, (*R, "cat-file", "-p", "{absent}"), "object {absent} not found"),
    C("unknown-ref", 4, (*R, "rev-parse", "tags/nope"), "ref or object tags/nope not found"),
    C("unknown-path-in-tree", 4, (*R, "ls-tree", "{tree}", "sub/nope"), "path {tree}:sub/nope not found"),
    C("ambiguous-prefix", 5, (*R, "rev-parse", "{amb}"), "id prefix '{amb}' is ambiguous: it matches 2 objects"),
    C("ambiguous-prefix-ls-tree", 5, (*R, "ls-tree", "{amb}"), "is ambiguous"),
    C("oldid-too-short", 2, (*R, "update-ref", "tags/x", "{tree}", "abc"), "'abc' is not an object id"),
    C("oldid-non-hex", 2, (*R, "update-ref", "tags/x", "{tree}", "ghijklm"), "'ghijklm' is not an object id"),
    C("oldid-uppercase", 2, (*R, "update-ref", "tags/x", "{tree}", "ABCDEF0"), "'ABCDEF0' is not an object id"),
    C("oldid-too-long", 2, (*R, "delete-ref", "tags/base", "0" * 31 + "12"), "is not an object id"),
    C("id-bad-characters", 2, (*R, "rev-parse", "ab:cd"), "'ab:cd' is not an object id"),
    C("id-empty", 2, (*R, "cat-file", "-t", ""), "'' is not an object id"),
    # -- wrong type (6)
    C("ls-tree-of-blob", 6, (*R, "ls-tree", "{big}"), "object {big} is a blob, not a tree"),
    C("cat-file-tree-of-blob", 6, (*R, "cat-file", "tree", "{big}"), "is a blob, not a tree"),
    C("cat-file-blob-of-tree", 6, (*R, "cat-file", "blob", "{tree}"), "is a tree, not a blob"),
    C("checkout-of-blob", 6, (*R, "checkout-tree", "{big}", "{ws}/out"), "is a blob, not a tree"),
    # -- ref names (2)
    *[
        C(f"ref-name-{label}", 2, (*R, "update-ref", ref, "{tree}"), "invalid ref name", reason)
        for label, ref, reason in [
            ("double-slash", "a//b", "empty part"),
            ("dotdot", "../x", "'.' or '..' part"),
            ("lock", "x.lock", "ends with '.lock'"),
            ("absolute", "/abs", "starts or ends with '/'"),
            ("space", "has space", "contains ' '"),
            ("control-char", "ctl\x01char", "control character"),
            ("at-brace", "a@{{b", "'@{{'"),
            ("glob", "tags/*", "contains '*'"),
        ]
    ],
    C("delete-ref-bad-name", 2, (*R, "delete-ref", "../x"), "invalid ref name"),
    # -- compare-and-swap (7) and missing refs (4)
    C("stale-oldid", 7, (*R, "update-ref", "tags/base", "{big}", "{small}"), "expected it to point at {small}", "points at {tree}"),
    C("zero-oldid-but-exists", 7, (*R, "update-ref", "tags/base", "{big}", "0" * 32), "expected it to point at nothing"),
    C("delete-ref-stale", 7, (*R, "delete-ref", "tags/base", "{big}"), "ref tags/base was not updated"),
    C("delete-ref-missing", 4, (*R, "delete-ref", "tags/nope"), "ref tags/nope not found"),
    # -- input paths (2)
    C("hash-object-missing", 2, (*R, "hash-object", "{ws}/missing"), "cannot read {ws}/missing: no such file"),
    C("hash-object-w-one-missing", 2, (*R, "hash-object", "-w", "{ws}/data/a.txt", "{ws}/missing"), "cannot read {ws}/missing"),
    C("hash-object-directory", 2, (*R, "hash-object", "-w", "{ws}/data"), "is a directory"),
    C("write-tree-missing", 2, (*R, "write-tree", "{ws}/missing"), "no such directory"),
    C("write-tree-on-file", 2, (*R, "write-tree", "{ws}/data/a.txt"), "not a directory"),
    C("checkout-non-empty", 2, (*R, "checkout-tree", "{tree}", "{ws}/nonempty"), "{ws}/nonempty is not empty", "-f"),
    C("checkout-onto-file", 2, (*R, "checkout-tree", "{tree}", "{ws}/data/a.txt"), "is not empty"),
    # -- damaged repository (9; fsck: 1)
    C("bit-flip-cat-file", 9, (*R, "cat-file", "blob", "{big}"), "object {chunk} is corrupt", "keepsake fsck", prepare=flip_bit),
    C("bit-flip-fsck", 1, (*R, "fsck"), "corrupt chunk {chunk}", prepare=flip_bit, keepsake=False, stream="stdout"),
    C("truncated-pack", 9, (*R, "cat-file", "blob", "{big}"), "object {big} is corrupt", "truncated", prepare=truncate_pack),
    C("truncated-pack-fsck", 1, (*R, "fsck"), "corrupt tree {tree}", "truncated", prepare=truncate_pack, keepsake=False, stream="stdout"),
    C("missing-pack", 9, (*R, "cat-file", "blob", "{big}"), "object {big} is corrupt", "missing", prepare=delete_pack),
    C("missing-pack-fsck", 1, (*R, "fsck"), "missing", prepare=delete_pack, keepsake=False, stream="stdout"),
    *[
        C(f"hostile-tree-{label}", 9, (*R, "checkout-tree", "{hostile}", "{ws}/out"), "object {hostile} is corrupt", "tree entry name",
          prepare=hostile_tree(name, mode))
        for label, name, mode in HOSTILE_NAMES
    ],
    C("hostile-tree-ls-tree", 9, (*R, "ls-tree", "{hostile}"), "is corrupt", prepare=hostile_tree("a/b")),
    # -- command line syntax (click, 2)
    C("cat-file-bad-type", 2, (*R, "cat-file", "blobby", "{big}"), "unknown type 'blobby'", keepsake=False),
    C("cat-file-two-modes", 2, (*R, "cat-file", "-t", "-s", "{big}"), "use one of", keepsake=False),
    C("unknown-option", 2, (*R, "ls-tree", "--bogus", "{tree}"), "No such option '--bogus'", keepsake=False),
    C("unknown-command", 2, (*R, "frobnicate"), "No such command 'frobnicate'", keepsake=False),
    C("hash-object-no-input", 2, (*R, "hash-object", "-w"), "give at least one PATH", keepsake=False),
    C("missing-argument", 2, (*R, "update-ref", "tags/x"), "Missing argument 'NEWID'", keepsake=False),
    # -- maintenance: gc, du, fsck --repair (issue 5)
    C("gc-no-repo", 3, ("-R", "{ws}/nothing", "gc"), "no keepsake repository at {ws}/nothing"),
    C("gc-newer-format", 3, (*R, "gc", "--grace", "0"), "format version 99", prepare=set_config(format=99)),
    C("gc-bad-grace", 2, (*R, "gc", "--grace", "soon"), "--grace 'soon' is not a duration"),
    C("gc-negative-grace", 2, (*R, "gc", "--grace", "-1h"), "--grace '-1h' is not a duration"),
    C("gc-bad-older-than", 2, (*R, "gc", "--keep-last", "1", "--older-than", "1.5d"), "--older-than '1.5d' is not a duration"),
    C("gc-older-than-alone", 2, (*R, "gc", "--older-than", "7d"), "--keep-best", "--keep-last"),
    C("gc-keep-zero", 2, (*R, "gc", "--keep-last", "0"), "--keep-best", "--keep-last"),
    C("gc-negative-keep", 2, (*R, "gc", "--keep-best", "-1"), "-1 is not in the range", keepsake=False),
    C("gc-negative-wait", 2, (*R, "gc", "--wait", "-5"), "is not in the range", keepsake=False),
    C("gc-lock-held", 10, (*R, "gc", "--grace", "0"), "another gc is running", "pid 7 on box", prepare=GC_LOCK),
    C("gc-damaged", 11, (*R, "gc", "--grace", "0"), "gc deleted nothing", "keepsake fsck", prepare=delete_pack),
    C("gc-dry-run-damaged", 11, (*R, "gc", "--dry-run"), "missing or corrupt", prepare=delete_pack),
    C("du-no-repo", 3, ("-R", "{ws}/nothing", "du"), "no keepsake repository"),
    C("du-bad-limit", 2, (*R, "du", "-n", "0"), "is not in the range", keepsake=False),
    C("fsck-repair-no-repo", 3, ("-R", "{ws}/nothing", "fsck", "--repair"), "no keepsake repository"),
    C("fsck-repair-lock-held", 10, (*R, "fsck", "--repair"), "another gc is running", prepare=GC_LOCK),
    # -- the same rules through the Python API
    A("api-open-missing", RepositoryNotFound, api_open("{ws}/nothing"), "keepsake init"),
    A("api-open-newer-format", UnsupportedFormat, api_open("{repo}"), "version 99", "version 1", prepare=set_config(format=99)),
    A("api-open-unknown-scheme", UnknownScheme, api_open("foo://x"), "unknown storage scheme"),
    A("api-init-existing", RepositoryExists, api_init_existing, "already exists"),
    A("api-bad-yaml", ConfigError, lambda env: find_project(), "not valid YAML", prepare=YAML_BAD),
    A("api-invalid-ref-name", InvalidRefName, with_repo(lambda r, e: r.refs.set("a//b", ObjectId(e.ids["tree"]))), "empty part"),
    A("api-invalid-id", InvalidObjectId, with_repo(lambda r, e: r.resolve("ab:cd")), "not an object id"),
    A("api-unknown-id", ObjectNotFound, with_repo(lambda r, e: r.resolve(e.ids["absent"])), "not found"),
    A("api-ambiguous", AmbiguousObjectId, with_repo(lambda r, e: r.resolve(e.ids["amb"])), "ambiguous"),
    A("api-wrong-type", WrongObjectType, with_repo(lambda r, e: r.objects.get_tree(ObjectId(e.ids["big"]))), "not a tree"),
    A("api-resolve-expected-type", WrongObjectType, with_repo(lambda r, e: r.resolve(e.ids["tree"], ObjectType.BLOB)), "not a blob"),
    A("api-ref-conflict", RefConflict,
      with_repo(lambda r, e: r.refs.set("tags/base", ObjectId(e.ids["big"]), ObjectId(e.ids["small"]))), "was not updated"),
    A("api-delete-missing-ref", RefNotFound, with_repo(lambda r, e: r.refs.delete("tags/nope")), "not found"),
    A("api-write-tree-on-file", PathNotFound, with_repo(api_write_tree_on_file), "not a directory"),
    A("api-checkout-non-empty", CheckoutConflict,
      with_repo(lambda r, e: checkout_tree(r.objects, ObjectId(e.ids["tree"]), str(e.ws / "nonempty"))), "not empty"),
    A("api-bit-flip", CorruptObject, with_repo(api_read_blob), "{chunk}", prepare=flip_bit),
    A("api-missing-pack", CorruptObject, with_repo(api_read_blob), "missing", prepare=delete_pack),
    A("api-gc-lock-held", RepositoryBusy, with_repo(lambda r, e: collect_garbage(r, grace=0)), "another gc", prepare=GC_LOCK),
    A("api-gc-damaged", RepositoryDamaged, with_repo(lambda r, e: collect_garbage(r, grace=0)), "missing or corrupt",
      prepare=delete_pack),
    A("api-gc-dry-run-damaged", RepositoryDamaged, with_repo(lambda r, e: collect_garbage(r, grace=0, dry_run=True)),
      "keepsake fsck", prepare=delete_pack),
    A("api-bad-duration", InvalidArgument, lambda env: parse_duration("3y"), "is not a duration"),
    A("api-hostile-checkout", CorruptObject,
      with_repo(lambda r, e: checkout_tree(r.objects, ObjectId(e.ids["hostile"]), str(e.ws / "out"))), "{hostile}",
      prepare=hostile_tree("../sentinel/pwned")),
]


def test_the_table_covers_every_error_family() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.code for c in CASES} == {1, 2, 3, 4, 5, 6, 7, 9, 10, 11}


def _check_cli(case: Case, env: Env) -> None:
    result: Result = CliRunner().invoke(cli, [env.fmt(a) for a in case.argv])
    where = (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exit_code == case.code, where
    assert result.exception is None or isinstance(result.exception, SystemExit), where
    assert "Traceback" not in result.stderr + result.stdout
    text = result.stderr if case.stream == "stderr" else result.stdout
    for fragment in case.fragments:
        assert env.fmt(fragment) in text, (fragment, where)
    if case.keepsake:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        assert result.stdout == "", where


def _check_api(case: Case, env: Env) -> None:
    assert case.api is not None and case.error is not None
    with pytest.raises(KeepsakeError) as info:
        case.api(env)
    exc = info.value
    assert type(exc) is case.error
    assert exc.exit_code == case.code
    message = str(exc)
    assert "\n" not in message
    for fragment in case.fragments:
        assert env.fmt(fragment) in message, (fragment, message)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, env: Env) -> None:
    if case.prepare is not None:
        case.prepare(env)
    before = snapshot(env.ws)
    if case.api is not None:
        _check_api(case, env)
    else:
        _check_cli(case, env)
    assert snapshot(env.ws) == before


# ------------------------------------------------------- checkout never escapes DIR


def test_hostile_subtree_writes_nothing_outside_dir(env: Env) -> None:
    """The unsafe name sits one level down: checkout may create DIR/inner, but nothing
    outside DIR changes."""
    hostile_tree("../../sentinel/pwned")(env)
    raw = pack_msgpack({"entries": [["inner", MODE_TREE, 6, bytes.fromhex(env.ids["hostile"])]]})
    with env.open() as repo, repo.objects.writer() as writer:
        root = writer.put(ObjectType.TREE, raw)
    before = snapshot(env.ws)
    result = CliRunner().invoke(cli, ["-R", str(env.repo), "checkout-tree", root, str(env.ws / "out")])
    assert result.exit_code == 9
    assert result.stderr.startswith(f"error: object {env.ids['hostile']} is corrupt")
    after = snapshot(env.ws)
    outside = {k: v for k, v in after.items() if k != "out" and not k.startswith("out/")}
    assert outside == before
    assert sorted(p.name for p in (env.ws / "out").rglob("*")) == ["inner"]


def test_forced_checkout_replaces_symlinks_instead_of_following_them(env: Env) -> None:
    """DIR holds symlinks named like the tree's entries, pointing into the sentinel dir."""
    out = env.ws / "out"
    out.mkdir()
    os.symlink(env.ws / "sentinel", out / "sub")
    os.symlink(env.ws / "sentinel" / "canary.txt", out / "a.txt")
    sentinel = snapshot(env.ws / "sentinel")
    result = CliRunner().invoke(cli, ["-R", str(env.repo), "checkout-tree", "-f", env.ids["tree"], str(out)])
    assert result.exit_code == 0, result.stderr
    assert snapshot(env.ws / "sentinel") == sentinel
    assert not (out / "sub").is_symlink() and (out / "sub" / "big.bin").read_bytes() == (
        env.ws / "data" / "sub" / "big.bin"
    ).read_bytes()
    assert not (out / "a.txt").is_symlink() and (out / "a.txt").read_bytes() == b"hello\n"


# ------------------------------------------------- truncation and checkout targets


def test_truncated_pack_under_a_chunk_is_corruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk of an intact blob lies in a truncated pack: read through
    ObjectDB.read_envelopes (batched chunk reads), not _read_one. This exited 8
    (StorageError "short read") until database.py converted the short read there too."""
    monkeypatch.chdir(tmp_path)
    repo = str(tmp_path / "repo")
    first = tmp_path / "first.bin"
    first.write_bytes(random.Random(8).randbytes(300_000))
    second = tmp_path / "second.bin"
    second.write_bytes(first.read_bytes() + b"tail")  # shares its chunks with first.bin
    CliRunner().invoke(cli, ["-R", repo, "init"])
    CliRunner().invoke(cli, ["-R", repo, "hash-object", "-w", str(first)])
    blob = CliRunner().invoke(cli, ["-R", repo, "hash-object", "-w", str(second)]).stdout.strip()
    with Repository.open(repo) as r:
        chunk = r.objects.get_blob(ObjectId(blob)).chunks[0][0]
        entry = r.objects.locate(chunk)
        assert entry.pack != r.objects.locate(ObjectId(blob)).pack
    os.truncate(Path(repo) / pack_key(entry.pack), entry.offset + 10)
    result = CliRunner().invoke(cli, ["-R", repo, "cat-file", "blob", blob])
    assert result.exit_code == 9, result.stderr
    assert f"object {chunk} is corrupt" in result.stderr


def test_checkout_below_a_file_is_a_usage_error(env: Env) -> None:
    result = CliRunner().invoke(cli, ["-R", str(env.repo), "checkout-tree", env.ids["tree"], str(env.ws / "data" / "a.txt" / "out")])
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert result.stderr.startswith("error: ")
