"""Blob and Tree manifests: canonical round trips, stable ids, and hostile decodes."""

from __future__ import annotations

import random
import stat
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keepsake.errors import CorruptObject
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.records import referenced_ids
from keepsake.objects.wire import MAX_ENTRIES
from keepsake.objects.manifests import (
    INLINE_LIMIT,
    MODE_EXECUTABLE,
    MODE_FILE,
    MODE_SYMLINK,
    MODE_TREE,
    MODES,
    Blob,
    Tree,
    TreeEntry,
    check_entry_name,
    mode_of,
)

ID_A = ObjectId("a" * 32)
ID_B = ObjectId("b" * 32)
RAW_A = bytes.fromhex(ID_A)


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


# -- strategies --------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=40).filter(lambda s: check_entry_name(s) is None)
object_ids = st.binary(min_size=16, max_size=16).map(lambda b: ObjectId(b.hex()))
targets = st.text(min_size=1, max_size=200).filter(lambda t: "\0" not in t)


@st.composite
def tree_entries(draw: st.DrawFn) -> TreeEntry:
    name = draw(names)
    mode = draw(st.sampled_from(sorted(MODES)))
    if mode == MODE_SYMLINK:
        target = draw(targets)
        return TreeEntry(name, mode, len(target.encode()), None, target)
    return TreeEntry(name, mode, draw(st.integers(0, 2**63)), draw(object_ids))


trees = st.lists(tree_entries(), max_size=30, unique_by=lambda e: e.name).map(lambda es: Tree(tuple(es)))
inline_blobs = st.binary(max_size=INLINE_LIMIT - 1).map(lambda d: Blob(len(d), (), d))
chunked_blobs = st.lists(st.tuples(object_ids, st.integers(1, 2**40)), max_size=40).map(
    lambda cs: Blob(sum(n for _, n in cs), tuple(cs))
)


# -- round trips and ids -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(tree=trees)
def test_tree_round_trip(tree: Tree) -> None:
    data = tree.encode()
    decoded = Tree.decode(data, "t")
    assert decoded == tree
    assert decoded.encode() == data
    assert tree.id == hash_object(ObjectType.TREE, data)
    keys = [e.name.encode() for e in decoded.entries]
    assert keys == sorted(keys)


@settings(max_examples=100, deadline=None)
@given(tree=trees, seed=st.integers(0, 2**32))
def test_tree_id_does_not_depend_on_entry_order(tree: Tree, seed: int) -> None:
    shuffled = list(tree.entries)
    random.Random(seed).shuffle(shuffled)
    other = Tree(tuple(shuffled))
    assert other.encode() == tree.encode()
    assert other.id == tree.id


@settings(max_examples=200, deadline=None)
@given(blob=inline_blobs | chunked_blobs)
def test_blob_round_trip(blob: Blob) -> None:
    data = blob.encode()
    decoded = Blob.decode(data, "b")
    assert decoded == blob
    assert decoded.encode() == data
    assert blob.id == hash_object(ObjectType.BLOB, data)


def test_ids_are_stable_values() -> None:
    # equal values, equal ids; any difference, a different id
    blob = Blob(3, (), b"abc")
    assert blob.id == Blob(3, (), b"abc").id
    assert blob.id != Blob(3, (), b"abd").id
    chunked = Blob(10, ((ID_A, 4), (ID_B, 6)))
    assert chunked.id == Blob(10, ((ID_A, 4), (ID_B, 6))).id
    assert chunked.id != Blob(10, ((ID_B, 6), (ID_A, 4))).id  # chunk order is content
    e = TreeEntry("f", MODE_FILE, 3, blob.id)
    assert Tree((e,)).id == Tree((e,)).id
    assert Tree((e,)).id != Tree((TreeEntry("f", MODE_EXECUTABLE, 3, blob.id),)).id
    assert Tree().id == hash_object(ObjectType.TREE, pack({"entries": []}))


def test_tree_sorts_by_utf8_bytes() -> None:
    given_order = ["é", "b", "B", "a", "_", "Z", "10", "9", "a b", "~", "\U0001f600", "\uff61", "A"]
    tree = Tree(tuple(TreeEntry(n, MODE_FILE, 0, ID_A) for n in given_order))
    got = [e.name for e in tree.entries]
    assert got == ["10", "9", "A", "B", "Z", "_", "a", "a b", "b", "~", "é", "\uff61", "\U0001f600"]
    assert [n.encode() for n in got] == sorted(n.encode() for n in given_order)
    assert Tree.decode(tree.encode()).entries == tree.entries
    assert tree.get("a b") == TreeEntry("a b", MODE_FILE, 0, ID_A)
    assert tree.get("missing") is None


def test_entry_kinds_and_tree_size() -> None:
    f = TreeEntry("f", MODE_FILE, 10, ID_A)
    x = TreeEntry("x", MODE_EXECUTABLE, 5, ID_A)
    link = TreeEntry("l", MODE_SYMLINK, 3, None, "a/b")
    sub = TreeEntry("d", MODE_TREE, 7, ID_B)
    assert [e.kind for e in (f, x, link, sub)] == ["blob", "blob", "link", "tree"]
    assert f.is_file and x.is_file and link.is_symlink and sub.is_tree
    assert Tree((f, x, link, sub)).size == 25
    assert link.to_wire() == ["l", MODE_SYMLINK, 3, "a/b"]
    assert f.to_wire() == ["f", MODE_FILE, 10, RAW_A]


def test_canonical_encodings() -> None:
    # FORMAT.md §5: fixed field order, bin for bytes
    assert Blob(2, (), b"hi").encode() == pack({"size": 2, "data": b"hi"})
    assert Blob(3, ((ID_A, 3),)).encode() == pack({"size": 3, "ids": RAW_A, "lengths": [3]})
    link = TreeEntry("l", MODE_SYMLINK, 1, None, "t")
    assert Tree((link,)).encode() == pack({"entries": [["l", MODE_SYMLINK, 1, "t"]]})


def test_check_entry_name() -> None:
    for good in ("a", "...", ".hidden", "a b", " ", "é", "a:b", "con", "x" * 300):
        assert check_entry_name(good) is None
    for bad in ("", ".", "..", "a/b", "/", "/abs", "a\0b", "a\\b", "..\\x", b"a", 1, None):
        assert check_entry_name(bad) is not None


def test_mode_of() -> None:
    assert mode_of(stat.S_IFDIR | 0o755) == MODE_TREE
    assert mode_of(stat.S_IFLNK | 0o777) == MODE_SYMLINK
    assert mode_of(stat.S_IFREG | 0o644) == MODE_FILE
    assert mode_of(stat.S_IFREG | 0o600) == MODE_FILE
    assert mode_of(stat.S_IFREG | 0o755) == MODE_EXECUTABLE
    assert mode_of(stat.S_IFREG | 0o744) == MODE_EXECUTABLE
    assert mode_of(stat.S_IFREG | 0o701) == MODE_EXECUTABLE


def test_referenced_ids() -> None:
    blob = Blob(10, ((ID_A, 4), (ID_B, 6)))
    assert referenced_ids(ObjectType.BLOB, blob.encode(), "b") == [(ID_A, ObjectType.CHUNK), (ID_B, ObjectType.CHUNK)]
    assert referenced_ids(ObjectType.BLOB, Blob(1, (), b"x").encode(), "b") == []
    tree = Tree(
        (
            TreeEntry("d", MODE_TREE, 0, ID_A),
            TreeEntry("f", MODE_FILE, 0, ID_B),
            TreeEntry("l", MODE_SYMLINK, 1, None, "x"),
        )
    )
    assert referenced_ids(ObjectType.TREE, tree.encode(), "t") == [(ID_A, ObjectType.TREE), (ID_B, ObjectType.BLOB)]
    assert referenced_ids(ObjectType.CHUNK, b"anything", "c") == []
    with pytest.raises(CorruptObject):
        referenced_ids(ObjectType.TREE, b"\xc1", "t")


# -- hostile trees -----------------------------------------------------------------------------


def tree_doc(*entries: list[Any]) -> bytes:
    return pack({"entries": list(entries)})


BAD_TREES: dict[str, bytes] = {
    "empty name": tree_doc(["", MODE_FILE, 0, RAW_A]),
    "dot": tree_doc([".", MODE_TREE, 0, RAW_A]),
    "dotdot": tree_doc(["..", MODE_TREE, 0, RAW_A]),
    "slash": tree_doc(["a/b", MODE_FILE, 0, RAW_A]),
    "dotdot slash": tree_doc(["../escape", MODE_FILE, 0, RAW_A]),
    "absolute": tree_doc(["/abs", MODE_FILE, 0, RAW_A]),
    "nul": tree_doc(["a\0b", MODE_FILE, 0, RAW_A]),
    "backslash": tree_doc(["..\\x", MODE_FILE, 0, RAW_A]),
    "name bytes": tree_doc([b"a", MODE_FILE, 0, RAW_A]),
    "name int": tree_doc([1, MODE_FILE, 0, RAW_A]),
    "name nil": tree_doc([None, MODE_FILE, 0, RAW_A]),
    "unsorted": tree_doc(["b", MODE_FILE, 0, RAW_A], ["a", MODE_FILE, 0, RAW_A]),
    "duplicate": tree_doc(["a", MODE_FILE, 0, RAW_A], ["a", MODE_FILE, 0, RAW_A]),
    "duplicate kinds": tree_doc(["a", MODE_SYMLINK, 1, "x"], ["a", MODE_TREE, 0, RAW_A]),
    "unsorted by bytes": tree_doc(["é", MODE_FILE, 0, RAW_A], ["z", MODE_FILE, 0, RAW_A]),
    "mode 0": tree_doc(["a", 0, 0, RAW_A]),
    "mode 600": tree_doc(["a", 0o100600, 0, RAW_A]),
    "mode gitlink": tree_doc(["a", 0o160000, 0, RAW_A]),
    "mode negative": tree_doc(["a", -1, 0, RAW_A]),
    "mode str": tree_doc(["a", "100644", 0, RAW_A]),
    "mode list": tree_doc(["a", [MODE_FILE], 0, RAW_A]),
    "mode map": tree_doc(["a", {"m": 1}, 0, RAW_A]),
    "mode float": tree_doc(["a", float(MODE_FILE), 0, RAW_A]),
    "size negative": tree_doc(["a", MODE_FILE, -1, RAW_A]),
    "size str": tree_doc(["a", MODE_FILE, "0", RAW_A]),
    "size float": tree_doc(["a", MODE_FILE, 1.0, RAW_A]),
    "id 15 bytes": tree_doc(["a", MODE_FILE, 0, RAW_A[:15]]),
    "id 17 bytes": tree_doc(["a", MODE_FILE, 0, RAW_A + b"\0"]),
    "id empty": tree_doc(["a", MODE_TREE, 0, b""]),
    "id hex str": tree_doc(["a", MODE_FILE, 0, ID_A]),
    "id nil": tree_doc(["a", MODE_FILE, 0, None]),
    "symlink target nil": tree_doc(["a", MODE_SYMLINK, 0, None]),
    "symlink target bytes": tree_doc(["a", MODE_SYMLINK, 1, b"x"]),
    "symlink target nul": tree_doc(["a", MODE_SYMLINK, 3, "x\0y"]),
    "symlink target empty": tree_doc(["a", MODE_SYMLINK, 0, ""]),
    "entry short": pack({"entries": [["a", MODE_FILE, 0]]}),
    "entry long": pack({"entries": [["a", MODE_FILE, 0, RAW_A, 0]]}),
    "entry map": pack({"entries": [{"name": "a"}]}),
    "entry str": pack({"entries": ["a"]}),
    "entries map": pack({"entries": {"a": 1}}),
    "entries missing": pack({"entry": []}),
    "top list": pack([["a", MODE_FILE, 0, RAW_A]]),
    "top int": pack(3),
    "top nil": pack(None),
    "blob doc": pack({"size": 1, "data": b"x"}),
    "non-str map key": b"\x81\x01\x90",
    "unhashable map key": b"\x81\x90\x90",
    "not msgpack": b"\xc1",
    "empty bytes": b"",
    "truncated": tree_doc(["a", MODE_FILE, 0, RAW_A])[:-3],
    "trailing data": tree_doc(["a", MODE_FILE, 0, RAW_A]) + b"\x00",
    "huge array": b"\x81\xa7entries\xdd\xff\xff\xff\xff",
    "array over MAX_ENTRIES": b"\x81\xa7entries\xdd" + struct.pack(">I", MAX_ENTRIES + 1),
    "huge map": b"\xdf\xff\xff\xff\xff",
    "huge str": b"\x81\xa7entries\x91\x94\xdb\xff\xff\xff\xff",
    "huge bin": b"\x81\xa7entries\x91\x94\xa1a\xce\x00\x01\x81\xa4\x00\xc6\xff\xff\xff\xff",
    "deep nesting": b"\x91" * 100_000 + b"\xc0",
    "invalid utf-8 name": b"\x81\xa7entries\x91\x94\xa2\xc3\x28\xce\x00\x01\x81\xa4\x00\xc4\x10" + RAW_A,
}


@pytest.mark.parametrize("name", sorted(BAD_TREES))
def test_hostile_tree_is_corrupt(name: str) -> None:
    with pytest.raises(CorruptObject) as info:
        Tree.decode(BAD_TREES[name], "hostile")
    assert info.value.object_id == "hostile"


def test_valid_references_decode() -> None:
    # the control group of the hostile cases: the same shapes, valid
    ok = tree_doc(
        ["...", MODE_FILE, 0, RAW_A], ["a", MODE_SYMLINK, 5, "../.."], ["b", MODE_TREE, 0, RAW_A], ["é", MODE_EXECUTABLE, 1, RAW_A]
    )
    tree = Tree.decode(ok)
    assert [e.name for e in tree.entries] == ["...", "a", "b", "é"]
    assert tree.get("a") == TreeEntry("a", MODE_SYMLINK, 5, None, "../..")


# -- hostile blobs -----------------------------------------------------------------------------

BAD_BLOBS: dict[str, bytes] = {
    "no size": pack({"data": b"x"}),
    "size negative": pack({"size": -1, "data": b""}),
    "size str": pack({"size": "1", "data": b"x"}),
    "size nil": pack({"size": None, "ids": b"", "lengths": []}),
    "inline str": pack({"size": 1, "data": "x"}),
    "inline too long": pack({"size": 1, "data": b"xy"}),
    "inline too short": pack({"size": 3, "data": b"xy"}),
    "inline nil": pack({"size": 0, "data": None}),
    "no chunk list": pack({"size": 0}),
    "ids str": pack({"size": 1, "ids": ID_A, "lengths": [1]}),
    "ids list": pack({"size": 1, "ids": [RAW_A], "lengths": [1]}),
    "lengths bin": pack({"size": 1, "ids": RAW_A, "lengths": b"\x01"}),
    "count mismatch": pack({"size": 2, "ids": RAW_A * 2, "lengths": [2]}),
    "ids partial": pack({"size": 1, "ids": RAW_A[:15], "lengths": [1]}),
    "zero length": pack({"size": 1, "ids": RAW_A * 2, "lengths": [1, 0]}),
    "negative length": pack({"size": 1, "ids": RAW_A * 2, "lengths": [2, -1]}),
    "float length": pack({"size": 1, "ids": RAW_A, "lengths": [1.0]}),
    "str length": pack({"size": 1, "ids": RAW_A, "lengths": ["1"]}),
    "sum too small": pack({"size": 10, "ids": RAW_A * 2, "lengths": [4, 5]}),
    "sum too large": pack({"size": 10, "ids": RAW_A * 2, "lengths": [4, 7]}),
    "top list": pack([1, b"x"]),
    "not msgpack": b"\xc1\xc1",
    "empty bytes": b"",
    "truncated": pack({"size": 3, "data": b"abc"})[:-1],
    "trailing data": pack({"size": 3, "data": b"abc"}) + b"\xc0",
    "huge lengths array": b"\x83\xa4size\x00\xa3ids\xc4\x00\xa7lengths\xdd\xff\xff\xff\xff",
    "huge data": b"\x82\xa4size\x00\xa4data\xc6\xff\xff\xff\xff",
}


@pytest.mark.parametrize("name", sorted(BAD_BLOBS))
def test_hostile_blob_is_corrupt(name: str) -> None:
    with pytest.raises(CorruptObject) as info:
        Blob.decode(BAD_BLOBS[name], "hostile")
    assert info.value.object_id == "hostile"


def test_valid_blob_shapes_decode() -> None:
    assert Blob.decode(pack({"size": 0, "data": b""})) == Blob(0, (), b"")
    assert Blob.decode(pack({"size": 0, "ids": b"", "lengths": []})) == Blob(0, (), None)
    assert Blob.decode(pack({"size": 9, "ids": RAW_A + bytes.fromhex(ID_B), "lengths": [4, 5]})) == Blob(
        9, ((ID_A, 4), (ID_B, 5))
    )


# -- fuzzing -----------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40) | st.sampled_from([MODE_FILE, MODE_SYMLINK, MODE_TREE, RAW_A, "a", ".."]),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.sampled_from(["entries", "size", "data", "ids", "lengths", "x"]), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(doc=msgpack_values | st.lists(st.lists(msgpack_values, min_size=4, max_size=4), max_size=4).map(lambda e: {"entries": e}))
def test_property_decoding_structured_garbage_only_raises_corrupt(doc: Any) -> None:
    data = pack(doc)
    for cls in (Tree, Blob):
        try:
            value = cls.decode(data, "fuzz")
        except CorruptObject:
            continue
        if isinstance(value, Tree):
            keys = [e.name.encode() for e in value.entries]
            assert keys == sorted(set(keys))
            assert all(check_entry_name(e.name) is None and e.mode in MODES for e in value.entries)
        else:
            assert isinstance(value, Blob)
            assert value.size == (len(value.inline) if value.inline is not None else sum(n for _, n in value.chunks))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | st.integers(0, 2**32).map(lambda s: random.Random(s).randbytes(s % 64)))
def test_property_decoding_random_bytes_only_raises_corrupt(data: bytes) -> None:
    for cls in (Tree, Blob):
        try:
            cls.decode(data, "fuzz")
        except CorruptObject:
            pass
