"""The plumbing CLI end to end, through click's CliRunner (in-process).

Every command runs with ``-R <repo>`` from an isolated temporary working directory, so no
keepsake.yaml or $KEEPSAKE_REPOSITORY of the developer can leak in.
"""

from __future__ import annotations

import io
import json
import os
import random
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from keepsake.cli import plumbing
from keepsake.cli.main import cli
from keepsake.errors import StorageError
from keepsake.objects.chunking import Chunker
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.manifests import Blob
from keepsake.objects.pack import pack_key
from keepsake.objects.worktree import HashOnly, write_blob_from_file, write_blob_from_stream, write_tree
from keepsake.repository import Repository
from tests.servers import S3Server

ZERO_ID = "0" * 32


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def run(*args: str, input: bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=True)


def ok(*args: str, input: bytes | None = None) -> Result:
    result = run(*args, input=input)
    assert result.exit_code == 0, (args, result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def assert_error(result: Result, code: int, fragment: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def repo(tmp_path: Path) -> str:
    path = str(tmp_path / "repo")
    ok("-R", path, "init")
    return path


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A small project directory: inline and chunked files, an executable, a symlink."""
    root = tmp_path / "src"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "sub" / "big.bin").write_bytes(random_bytes(150_000, 1))
    (root / "sub" / "deep" / "x.txt").write_bytes(b"x" * 10)
    (root / "empty").write_bytes(b"")
    os.symlink("a.txt", root / "link")
    return root


def snapshot_dir(root: Path) -> dict[str, tuple[str, object]]:
    """relative path -> (kind, content): bytes and exec bit for files, target for links."""
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", (path.read_bytes(), bool(st.st_mode & 0o111)))
    return out


def chunker_of(repo: str) -> Chunker:
    with Repository.open(repo) as r:
        return r.chunker


def count_json(repo: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(ok("-R", repo, "count-objects", "--json").stdout)
    return doc


# --------------------------------------------------------------------------- init


def test_init_prints_to_stderr_and_refuses_a_second_time(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    result = ok("-R", str(path), "init")
    assert result.stdout == ""
    assert result.stderr == f"Initialized empty Keepsake repository at {path}\n"
    config = (path / "config").read_bytes()
    assert json.loads(config)["format"] == 1

    again = run("-R", str(path), "init")
    assert_error(again, 3, f"a keepsake repository already exists at {path}")
    assert (path / "config").read_bytes() == config


def test_init_url_argument_and_default_location(tmp_path: Path) -> None:
    ok("init", str(tmp_path / "explicit"))
    assert (tmp_path / "explicit" / "config").is_file()
    ok("init")  # default: ./.keepsake in the working directory
    assert (tmp_path / "cwd" / ".keepsake" / "config").is_file()


# -------------------------------------------------------------------- hash-object


def test_hash_object_matches_library_and_stores_only_with_w(repo: str, src: Path) -> None:
    files = [str(src / "a.txt"), str(src / "sub" / "big.bin"), str(src / "empty")]
    chunker = chunker_of(repo)
    expected = [write_blob_from_file(HashOnly(), chunker, f)[0] for f in files]

    result = ok("-R", repo, "hash-object", *files)
    assert result.stdout.split() == expected
    counts = count_json(repo)
    assert counts["objects"] == 0 and counts["packs"] == 0

    stored = ok("-R", repo, "hash-object", "-w", *files)
    assert stored.stdout.split() == expected
    counts = count_json(repo)
    by_type = counts["by_type"]
    assert isinstance(by_type, dict)
    assert by_type["blob"] == 3 and by_type["chunk"] >= 2
    assert counts["logical_bytes"] == 6 + 150_000
    for path, oid in zip(files, expected):
        assert ok("-R", repo, "cat-file", "blob", oid).stdout_bytes == Path(path).read_bytes()


def test_hash_object_stdin(repo: str) -> None:
    data = random_bytes(70_000, 2) + b"\x00\r\n\xff"
    expected = write_blob_from_stream(HashOnly(), chunker_of(repo), io.BytesIO(data))[0]
    assert ok("-R", repo, "hash-object", "--stdin", input=data).stdout.strip() == expected
    assert count_json(repo)["objects"] == 0
    assert ok("-R", repo, "hash-object", "-w", "--stdin", input=data).stdout.strip() == expected
    assert ok("-R", repo, "cat-file", "blob", expected).stdout_bytes == data


def test_hash_object_needs_no_repository(tmp_path: Path, src: Path) -> None:
    result = ok("hash-object", str(src / "a.txt"))
    assert result.stdout.strip() == write_blob_from_file(HashOnly(), Chunker(), str(src / "a.txt"))[0]
    assert not (tmp_path / "cwd" / ".keepsake").exists()


def test_hash_object_without_paths_is_a_usage_error(repo: str) -> None:
    result = run("-R", repo, "hash-object")
    assert result.exit_code == 2
    assert "give at least one PATH, or --stdin" in result.stderr


# ------------------------------------------------------------ write-tree / ls-tree


def test_write_tree_id_matches_library(repo: str, src: Path) -> None:
    tree_id = ok("-R", repo, "write-tree", str(src)).stdout.strip()
    assert tree_id == write_tree(HashOnly(), chunker_of(repo), str(src))[0]
    # writing it again stores nothing new
    before = count_json(repo)["objects"]
    assert ok("-R", repo, "write-tree", str(src)).stdout.strip() == tree_id
    assert count_json(repo)["objects"] == before


def test_ls_tree_plain_recursive_long(repo: str, src: Path) -> None:
    tree_id = ok("-R", repo, "write-tree", str(src)).stdout.strip()
    rows = [line.split("\t") for line in ok("-R", repo, "ls-tree", tree_id).stdout.splitlines()]
    assert [p for _, p in rows] == ["a.txt", "empty", "link", "run.sh", "sub"]
    heads = {p: h.split() for h, p in rows}
    assert heads["a.txt"][:2] == ["100644", "blob"]
    assert heads["run.sh"][:2] == ["100755", "blob"]
    assert heads["link"] == ["120000", "link", "-" * 32]
    assert heads["sub"][:2] == ["040000", "tree"]

    recursive = ok("-R", repo, "ls-tree", "-r", tree_id).stdout.splitlines()
    paths = [line.split("\t")[1] for line in recursive]
    assert paths == ["a.txt", "empty", "link", "run.sh", "sub/big.bin", "sub/deep/x.txt"]

    long = ok("-R", repo, "ls-tree", "-r", "-l", tree_id).stdout.splitlines()
    sizes = {line.split("\t")[1]: int(line.split("\t")[0].split()[3]) for line in long}
    assert sizes["sub/big.bin"] == 150_000
    assert sizes["a.txt"] == 6
    assert sizes["empty"] == 0
    assert sizes["link -> a.txt"] == len("a.txt")


def test_ls_tree_json_and_path_argument(repo: str, src: Path) -> None:
    tree_id = ok("-R", repo, "write-tree", str(src)).stdout.strip()
    rows = json.loads(ok("-R", repo, "ls-tree", "-r", "--json", tree_id).stdout)
    by_path = {r["path"]: r for r in rows}
    assert set(by_path) == {"a.txt", "empty", "link", "run.sh", "sub/big.bin", "sub/deep/x.txt"}
    assert by_path["link"] == {"path": "link", "mode": "120000", "type": "link", "id": None, "size": 5, "target": "a.txt"}
    big_id = write_blob_from_file(HashOnly(), chunker_of(repo), str(src / "sub" / "big.bin"))[0]
    assert by_path["sub/big.bin"]["id"] == big_id
    assert by_path["sub/big.bin"]["size"] == 150_000
    assert by_path["run.sh"]["mode"] == "100755"

    # PATH selecting a subdirectory: its entries, with the path prefix
    sub = json.loads(ok("-R", repo, "ls-tree", "--json", tree_id, "sub").stdout)
    assert [r["path"] for r in sub] == ["sub/big.bin", "sub/deep"]
    assert [r["type"] for r in sub] == ["blob", "tree"]
    deep = ok("-R", repo, "ls-tree", tree_id, "sub/deep/").stdout.splitlines()
    assert [line.split("\t")[1] for line in deep] == ["sub/deep/x.txt"]

    # PATH selecting a single file
    single = ok("-R", repo, "ls-tree", "-l", tree_id, "sub/big.bin").stdout.splitlines()
    assert len(single) == 1
    assert single[0].endswith("\tsub/big.bin") and big_id in single[0] and "150000" in single[0]

    # a path that is not in the tree
    assert_error(run("-R", repo, "ls-tree", tree_id, "sub/nope"), 4, "not found")
    assert_error(run("-R", repo, "ls-tree", tree_id, "a.txt/below"), 4, "not found")


# ----------------------------------------------------------------------- cat-file


def test_cat_file_type_size_pretty_and_raw(repo: str, src: Path) -> None:
    tree_id = ok("-R", repo, "write-tree", str(src)).stdout.strip()
    big_path = src / "sub" / "big.bin"
    big_id, big_blob = write_blob_from_file(HashOnly(), chunker_of(repo), str(big_path))
    small_id = write_blob_from_file(HashOnly(), chunker_of(repo), str(src / "a.txt"))[0]
    chunk_id, chunk_len = big_blob.chunks[0]

    assert ok("-R", repo, "cat-file", "-t", tree_id).stdout == "tree\n"
    assert ok("-R", repo, "cat-file", "-t", big_id).stdout == "blob\n"
    assert ok("-R", repo, "cat-file", "-t", chunk_id).stdout == "chunk\n"
    assert ok("-R", repo, "cat-file", "-s", big_id).stdout == "150000\n"
    assert ok("-R", repo, "cat-file", "-s", chunk_id).stdout == f"{chunk_len}\n"
    # a tree's size is the total size of its entries
    assert ok("-R", repo, "cat-file", "-s", tree_id).stdout == f"{6 + 18 + 150_000 + 10 + 0 + 5}\n"

    pretty_tree = ok("-R", repo, "cat-file", "-p", tree_id).stdout.splitlines()
    assert [line.split("\t")[1] for line in pretty_tree] == ["a.txt", "empty", "link", "run.sh", "sub"]
    assert f"100644 blob {small_id}\ta.txt" in pretty_tree
    assert ok("-R", repo, "cat-file", "-p", small_id).stdout_bytes == b"hello\n"

    # TYPE ID: raw content; a blob gives the file's exact bytes
    assert ok("-R", repo, "cat-file", "blob", big_id).stdout_bytes == big_path.read_bytes()
    assert ok("-R", repo, "cat-file", "blob", big_id[:9]).stdout_bytes == big_path.read_bytes()
    assert ok("-R", repo, "cat-file", "chunk", chunk_id).stdout_bytes == big_path.read_bytes()[:chunk_len]
    raw_tree = ok("-R", repo, "cat-file", "tree", tree_id).stdout_bytes
    assert hash_object(ObjectType.TREE, raw_tree) == tree_id


def test_cat_file_blob_binary_exact(repo: str, tmp_path: Path) -> None:
    # bytes that are not UTF-8, CR/LF, NUL, no trailing newline; inline and chunked
    for n, data in enumerate([bytes(range(256)) * 3 + b"\r\n\x00", random_bytes(300_001, 3)]):
        path = tmp_path / f"bin{n}"
        path.write_bytes(data)
        oid = ok("-R", repo, "hash-object", "-w", str(path)).stdout.strip()
        assert ok("-R", repo, "cat-file", "blob", oid).stdout_bytes == data


# ------------------------------------------------------------------ checkout-tree


def test_checkout_tree_round_trip_refusal_and_force(repo: str, src: Path, tmp_path: Path) -> None:
    tree_id = ok("-R", repo, "write-tree", str(src)).stdout.strip()
    out = tmp_path / "out"
    result = ok("-R", repo, "checkout-tree", tree_id, str(out))
    assert result.stderr == f"Checked out 5 files into {out}\n"
    assert snapshot_dir(out) == snapshot_dir(src)

    # non-empty: refused without -f, nothing touched
    (out / "a.txt").write_bytes(b"changed")
    (out / "extra").write_bytes(b"mine")
    before = snapshot_dir(out)
    assert_error(run("-R", repo, "checkout-tree", tree_id, str(out)), 2, "is not empty")
    assert snapshot_dir(out) == before

    # -f: every file of the tree is restored; files the tree does not have are left alone
    ok("-R", repo, "checkout-tree", "-f", tree_id, str(out))
    restored = snapshot_dir(out)
    assert restored.pop("extra") == ("file", (b"mine", False))
    assert restored == snapshot_dir(src)


def test_checkout_tree_of_subtree_by_prefix(repo: str, src: Path, tmp_path: Path) -> None:
    ok("-R", repo, "write-tree", str(src))
    sub_id = write_tree(HashOnly(), chunker_of(repo), str(src / "sub"))[0]
    ok("-R", repo, "checkout-tree", sub_id[:8], str(tmp_path / "subout"))
    assert snapshot_dir(tmp_path / "subout") == snapshot_dir(src / "sub")


# ------------------------------------------------------------------- refs


def show_refs(repo: str, *pattern: str) -> dict[str, str]:
    doc: dict[str, str] = json.loads(ok("-R", repo, "show-ref", "--json", *pattern).stdout)
    return doc


def two_objects(repo: str, src: Path) -> tuple[str, str]:
    a = ok("-R", repo, "hash-object", "-w", str(src / "a.txt")).stdout.strip()
    b = ok("-R", repo, "hash-object", "-w", str(src / "run.sh")).stdout.strip()
    return a, b


def test_update_ref_create_and_compare_and_swap(repo: str, src: Path) -> None:
    a, b = two_objects(repo, src)
    ok("-R", repo, "update-ref", "tags/best", a)
    assert show_refs(repo) == {"tags/best": a}
    assert (Path(repo) / "refs" / "tags" / "best").read_text() == f"{a}\n"

    # CAS with the right OLDID (full id, then a prefix)
    ok("-R", repo, "update-ref", "tags/best", b, a)
    ok("-R", repo, "update-ref", "tags/best", a, b[:7])
    assert show_refs(repo) == {"tags/best": a}

    # stale OLDID: exit 7, ref unchanged
    assert_error(run("-R", repo, "update-ref", "tags/best", b, b), 7, "ref tags/best was not updated")
    assert show_refs(repo) == {"tags/best": a}
    # an OLDID that names no object at all cannot match either
    assert_error(run("-R", repo, "update-ref", "tags/best", b, "1234567"), 7, "was not updated")
    assert show_refs(repo) == {"tags/best": a}

    # zeros: the ref must not exist yet
    assert_error(run("-R", repo, "update-ref", "tags/best", b, ZERO_ID), 7, "expected it to point at nothing")
    assert show_refs(repo) == {"tags/best": a}
    ok("-R", repo, "update-ref", "tags/new", b, "0000000")
    assert show_refs(repo) == {"tags/best": a, "tags/new": b}

    # without OLDID the update is unconditional
    ok("-R", repo, "update-ref", "tags/new", a)
    assert show_refs(repo)["tags/new"] == a


def test_delete_ref(repo: str, src: Path) -> None:
    a, b = two_objects(repo, src)
    ok("-R", repo, "update-ref", "tags/one", a)
    ok("-R", repo, "update-ref", "tags/two", b)
    assert_error(run("-R", repo, "delete-ref", "tags/one", b), 7, "was not updated")
    assert show_refs(repo) == {"tags/one": a, "tags/two": b}
    ok("-R", repo, "delete-ref", "tags/one", a)
    ok("-R", repo, "delete-ref", "tags/two")
    assert run("-R", repo, "show-ref").exit_code == 1
    assert_error(run("-R", repo, "delete-ref", "tags/two"), 4, "ref tags/two not found")


def test_show_ref_patterns_and_no_match(repo: str, src: Path) -> None:
    a, b = two_objects(repo, src)
    ok("-R", repo, "update-ref", "tags/v1", a)
    ok("-R", repo, "update-ref", "tags/v2", b)
    ok("-R", repo, "update-ref", "experiments/run1", a)
    assert ok("-R", repo, "show-ref").stdout.splitlines() == [
        f"{a} experiments/run1",
        f"{a} tags/v1",
        f"{b} tags/v2",
    ]
    assert show_refs(repo, "tags/*") == {"tags/v1": a, "tags/v2": b}
    assert show_refs(repo, "tags") == {"tags/v1": a, "tags/v2": b}  # a prefix
    assert show_refs(repo, "tags/v2") == {"tags/v2": b}
    assert show_refs(repo, "*/run?") == {"experiments/run1": a}
    none = run("-R", repo, "show-ref", "nothing/*")
    assert none.exit_code == 1 and none.stdout == "" and none.stderr == ""
    assert run("-R", repo, "show-ref", "--json", "nothing").stdout.strip() == "{}"


# ---------------------------------------------------------------------- rev-parse


def _ambiguous_prefix(ids: Sequence[str]) -> str:
    seen: dict[str, str] = {}
    for oid in ids:
        if oid[:7] in seen:
            return oid[:7]
        seen[oid[:7]] = oid
    raise AssertionError("no shared prefix")


@pytest.fixture(scope="module")
def crowded_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list[ObjectId]]]:
    """A repository of small blobs, stored until two ids share a 7-character prefix
    (birthday bound: ~16k objects for 28 bits). Returns (path, shared prefix, all ids)."""
    path = str(tmp_path_factory.mktemp("crowded") / "repo")
    prefixes: set[str] = set()
    ids: list[ObjectId] = []
    with Repository.init(path) as repo, repo.objects.writer() as writer:
        n = 0
        while True:
            data = f"object number {n}".encode()
            oid = writer.put(ObjectType.BLOB, Blob(len(data), (), data).encode())
            ids.append(oid)
            n += 1
            if oid[:7] in prefixes:
                break
            prefixes.add(oid[:7])
    yield path, oid[:7], ids


def test_rev_parse_ids_prefixes_refs(crowded_repo: tuple[str, str, list[ObjectId]]) -> None:
    path, shared, ids = crowded_repo
    unique = next(oid for oid in ids if oid[:7] != shared and sum(i.startswith(oid[:7]) for i in ids) == 1)
    assert ok("-R", path, "rev-parse", unique).stdout == f"{unique}\n"
    assert ok("-R", path, "rev-parse", unique[:7]).stdout == f"{unique}\n"
    assert ok("-R", path, "rev-parse", unique[:7], ids[0]).stdout == f"{unique}\n{ids[0]}\n"

    matches = sorted(i for i in ids if i.startswith(shared))
    assert len(matches) >= 2
    result = run("-R", path, "rev-parse", shared)
    assert_error(result, 5, f"id prefix {shared!r} is ambiguous: it matches {len(matches)} objects")
    assert matches[0] in result.stderr and matches[1] in result.stderr
    # one more character disambiguates (unless the ids share 8)
    longer = matches[0][: len(os.path.commonprefix(matches)) + 1]
    assert ok("-R", path, "rev-parse", longer).stdout == f"{matches[0]}\n"

    missing = next(p for p in (f"{n:07x}" for n in range(1 << 28)) if not any(i.startswith(p) for i in ids))
    assert_error(run("-R", path, "rev-parse", missing), 4, f"object {missing} not found")


def test_rev_parse_ref_names(repo: str, src: Path) -> None:
    a, b = two_objects(repo, src)
    ok("-R", repo, "update-ref", "tags/v1", a)
    ok("-R", repo, "update-ref", "experiments/exp", b)
    assert ok("-R", repo, "rev-parse", "v1").stdout == f"{a}\n"  # searched under tags/
    assert ok("-R", repo, "rev-parse", "tags/v1").stdout == f"{a}\n"
    assert ok("-R", repo, "rev-parse", "exp").stdout == f"{b}\n"  # searched under experiments/
    assert_error(run("-R", repo, "rev-parse", "nosuchtag"), 4, "ref or object nosuchtag not found")


# ------------------------------------------------------------------ count-objects


def test_count_objects_dedup_of_a_ten_percent_change(repo: str, tmp_path: Path) -> None:
    size = 4 << 20
    data = bytearray(random_bytes(size, 4))
    first, second = tmp_path / "ckpt1", tmp_path / "ckpt2"
    first.mkdir()
    second.mkdir()
    (first / "model.bin").write_bytes(data)
    start = size * 45 // 100
    data[start : start + size // 10] = random_bytes(size // 10, 5)
    (second / "model.bin").write_bytes(data)
    ok("-R", repo, "write-tree", str(first))
    ok("-R", repo, "write-tree", str(second))

    doc = count_json(repo)
    assert doc["logical_bytes"] == 2 * size
    unique = doc["unique_bytes"]
    assert isinstance(unique, int) and size < unique < size * 13 // 10
    assert doc["dedup_ratio"] == round(2 * size / unique, 4)
    assert isinstance(doc["dedup_ratio"], float) and doc["dedup_ratio"] > 1.5
    by_type = doc["by_type"]
    assert isinstance(by_type, dict) and by_type["tree"] == 2 and by_type["blob"] == 2
    assert doc["objects"] == sum(by_type.values())
    stored = sum(f.stat().st_size for f in Path(repo).rglob("*") if f.is_file() and f.parts[-2] != "locks"
                 and f.name != "config")
    assert doc["stored_bytes"] == doc["pack_bytes"] + doc["index_bytes"] == stored  # type: ignore[operator]
    assert doc["packs"] == 2 and doc["index_files"] == 2

    verbose = ok("-R", repo, "count-objects", "-v").stdout
    assert f"logical bytes: {2 * size} (8.0 MiB)" in verbose
    assert f"unique bytes: {unique} " in verbose
    assert f"dedup ratio: {2 * size / unique:.2f}x (logical / unique)" in verbose
    assert ok("-R", repo, "count-objects").stdout.startswith(f"{doc['objects']} objects, ")


def test_count_objects_empty_repository(repo: str) -> None:
    assert ok("-R", repo, "count-objects").stdout == "0 objects, 0 B\n"
    doc = count_json(repo)
    assert doc["objects"] == 0 and doc["dedup_ratio"] == 1.0 and doc["by_type"] == {}


# --------------------------------------------------------------------------- fsck


def tagged_tree(repo: str, src: Path) -> tuple[str, Blob]:
    tree_id = ok("-R", repo, "write-tree", str(src)).stdout.strip()
    ok("-R", repo, "update-ref", "tags/base", tree_id)
    big = write_blob_from_file(HashOnly(), chunker_of(repo), str(src / "sub" / "big.bin"))[1]
    return tree_id, big


def test_fsck_clean(repo: str, src: Path) -> None:
    tree_id, _ = tagged_tree(repo, src)
    result = ok("-R", repo, "fsck")
    assert result.stdout == ""
    assert result.stderr.startswith("fsck: ok: checked ")
    assert ", 1 refs, " in result.stderr
    doc = json.loads(ok("-R", repo, "fsck", "--json").stdout)
    assert doc["ok"] is True and doc["problems"] == [] and doc["refs_checked"] == 1
    assert doc["reachable"] == doc["objects_checked"]


def test_fsck_names_a_corrupt_object_after_a_bit_flip(repo: str, src: Path) -> None:
    _, big = tagged_tree(repo, src)
    chunk_id = big.chunks[1][0]
    with Repository.open(repo) as r:
        entry = r.objects.locate(chunk_id)
    pack = Path(repo) / pack_key(entry.pack)
    data = bytearray(pack.read_bytes())
    data[entry.offset + entry.length // 2] ^= 0x01
    pack.write_bytes(data)

    result = run("-R", repo, "fsck")
    assert result.exit_code == 1
    assert f"corrupt chunk {chunk_id}" in result.stdout
    assert f"corrupt-pack pack {entry.pack}" in result.stdout
    assert "fsck: damaged" in result.stderr
    doc = json.loads(run("-R", repo, "fsck", "--json").stdout)
    assert doc["ok"] is False
    assert {"corrupt", "corrupt-pack"} <= {p["kind"] for p in doc["problems"]}
    assert [p["id"] for p in doc["problems"] if p["kind"] == "corrupt"] == [chunk_id]


def test_fsck_after_a_pack_is_deleted(repo: str, src: Path) -> None:
    tagged_tree(repo, src)
    for pack in (Path(repo) / "packs").rglob("*.pack"):
        pack.unlink()
    result = run("-R", repo, "fsck")
    assert result.exit_code == 1
    assert "missing" in result.stdout
    assert result.stdout.splitlines()[0].startswith("corrupt tree ")
    doc = json.loads(run("-R", repo, "fsck", "--json").stdout)
    assert doc["ok"] is False and doc["objects_checked"] == 0


def test_fsck_lists_unreachable_objects(repo: str, src: Path, tmp_path: Path) -> None:
    tagged_tree(repo, src)
    other = tmp_path / "other.bin"
    other.write_bytes(random_bytes(50_000, 6))
    loose = ok("-R", repo, "hash-object", "-w", str(other)).stdout.strip()
    result = ok("-R", repo, "fsck")
    assert result.stdout.splitlines()[0] == f"unreachable blob {loose}"
    assert "unreachable chunks: " in result.stdout
    full = ok("-R", repo, "fsck", "--unreachable").stdout
    assert "unreachable chunk " in full and "unreachable chunks:" not in full
    doc = json.loads(ok("-R", repo, "fsck", "--json").stdout)
    assert doc["ok"] is True
    unreachable = [p for p in doc["problems"] if p["kind"] == "unreachable"]
    assert {p["type"] for p in unreachable} == {"blob", "chunk"}
    assert loose in {p["id"] for p in unreachable}


def test_fsck_shows_damage_of_unreachable_objects(repo: str, src: Path) -> None:
    """Fixed in maintenance.py: a corrupt or lost object nothing references was reported
    as plainly "unreachable", so fsck printed "ok" over a repository whose every pack was
    gone. Exit status still follows the documented rule (damage *reachable* from a ref)."""
    oid = ok("-R", repo, "hash-object", "-w", str(src / "sub" / "big.bin")).stdout.strip()
    for pack in (Path(repo) / "packs").rglob("*.pack"):
        pack.unlink()
    result = ok("-R", repo, "fsck")
    assert f"unreachable blob {oid}: its pack " in result.stdout
    assert "is missing" in result.stdout
    # damaged chunks are listed one by one even without --unreachable
    assert "unreachable chunk " in result.stdout


# ------------------------------------------------------------------ S3 end to end


@pytest.mark.remote
def test_main_flow_against_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, src: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = s3_server.new_url("cli")

    assert ok("-R", url, "init").stderr == f"Initialized empty Keepsake repository at {url}\n"
    assert_error(run("-R", url, "init"), 3, "already exists")
    tree_id = ok("-R", url, "write-tree", str(src)).stdout.strip()
    assert tree_id == write_tree(HashOnly(), Chunker(), str(src))[0]
    paths = [line.split("\t")[1] for line in ok("-R", url, "ls-tree", "-r", tree_id).stdout.splitlines()]
    assert paths == ["a.txt", "empty", "link", "run.sh", "sub/big.bin", "sub/deep/x.txt"]
    big_id = json.loads(ok("-R", url, "ls-tree", "--json", tree_id, "sub/big.bin").stdout)[0]["id"]
    assert ok("-R", url, "cat-file", "blob", big_id).stdout_bytes == (src / "sub" / "big.bin").read_bytes()

    ok("-R", url, "update-ref", "tags/base", tree_id[:10], ZERO_ID)
    assert_error(run("-R", url, "update-ref", "tags/base", big_id, big_id), 7, "was not updated")
    assert ok("-R", url, "show-ref", "tags/*").stdout == f"{tree_id} tags/base\n"
    assert ok("-R", url, "rev-parse", "base").stdout == f"{tree_id}\n"

    ok("-R", url, "checkout-tree", "base", str(tmp_path / "restored"))
    assert snapshot_dir(tmp_path / "restored") == snapshot_dir(src)
    doc = count_json(url)
    assert doc["logical_bytes"] == 6 + 18 + 150_000 + 10 and doc["packs"] == 1
    assert json.loads(ok("-R", url, "fsck", "--json").stdout)["ok"] is True
    ok("-R", url, "delete-ref", "tags/base", tree_id)
    assert run("-R", url, "show-ref").exit_code == 1


# ------------------------------------------------------------------ error display


def test_error_with_a_multi_line_cause_prints_one_line(repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed in main.py: errors are one line (docs/CLI.md) even when a backend's
    exception text spans several lines."""

    def failing(_: object) -> None:
        raise StorageError("s3://bucket/repo", "list packs/", "An error occurred\nSlowDown:\r\nplease retry")

    monkeypatch.setattr(plumbing, "count_objects", failing)
    result = run("-R", repo, "count-objects")
    assert_error(result, 8, "storage error during list packs/ on s3://bucket/repo: An error occurred SlowDown: please retry")


def test_every_command_is_registered_under_its_module() -> None:
    import importlib

    from keepsake.cli.main import COMMAND_MODULES

    defined = {}
    for module_name in set(COMMAND_MODULES.values()):
        module = importlib.import_module(f"keepsake.cli.{module_name}")
        defined.update({command.name: module_name for command in module.COMMANDS})
    assert defined == COMMAND_MODULES
    help_text = CliRunner().invoke(cli, ["--help"]).output
    assert all(name in help_text for name in COMMAND_MODULES)
