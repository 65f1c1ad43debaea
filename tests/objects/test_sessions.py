"""Write-operation markers and gc doomed lists (FORMAT.md §11), on every backend."""

from __future__ import annotations

import msgpack
import pytest

from keepsake.errors import CorruptObject
from keepsake.objects import sessions
from keepsake.objects.ids import ObjectType, hash_object
from keepsake.objects.sessions import DOOMED, SESSIONS, decode_doomed, encode_doomed, read_operation
from keepsake.repository import Repository
from tests.conftest import BackendURL


@pytest.fixture
def repo(backend_url: BackendURL) -> Repository:
    url, options = backend_url
    return Repository.init(url, options)


def markers(repo: Repository) -> list[str]:
    return [info.key for info in repo.storage.list(SESSIONS)]


def test_a_writer_holds_a_marker_until_it_closes(repo: Repository) -> None:
    assert markers(repo) == []
    with repo.objects.writer() as w:
        w.put(ObjectType.CHUNK, b"x" * 100)
        held = markers(repo)
        assert len(held) == 1
        assert read_operation(repo.storage.read(held[0]), held[0]) == frozenset()
    assert markers(repo) == []


def test_an_aborted_writer_removes_its_marker(repo: Repository) -> None:
    with pytest.raises(RuntimeError):
        with repo.objects.writer() as w:
            w.put(ObjectType.CHUNK, b"y" * 100)
            raise RuntimeError("training crashed")
    assert markers(repo) == []


def test_writers_inside_one_operation_share_its_marker(repo: Repository) -> None:
    with repo.objects.operation() as op:
        with repo.objects.writer() as w1:
            w1.put(ObjectType.CHUNK, b"a" * 100)
        with repo.objects.writer() as w2:
            w2.put(ObjectType.CHUNK, b"b" * 100)
            assert markers(repo) == [op.key]
        assert markers(repo) == [op.key]  # still held: the ref is not published yet
    assert markers(repo) == []


def test_doomed_objects_are_stored_again_not_relied_on(repo: Repository) -> None:
    data = b"weights" * 1000
    with repo.objects.writer() as w:
        oid = w.put(ObjectType.CHUNK, data)
    packs_before = len(repo.storage.list("packs/"))
    repo.storage.write(DOOMED + "list1", encode_doomed([oid]))

    with repo.objects.writer() as w:
        again = w.put(ObjectType.CHUNK, data)
        seen = read_operation(repo.storage.read(markers(repo)[0]), "marker")
    assert again == oid
    assert w.stats.objects_written == 1 and w.stats.objects_skipped == 0
    assert seen == frozenset({"list1"})
    # written again (a pack with the same content has the same content-addressed name)
    assert w.stats.packs_written == 1
    assert len(repo.storage.list("packs/")) >= packs_before


def test_objects_not_doomed_are_still_deduplicated(repo: Repository) -> None:
    with repo.objects.writer() as w:
        w.put(ObjectType.CHUNK, b"keep" * 100)
    repo.storage.write(DOOMED + "other", encode_doomed([hash_object(ObjectType.CHUNK, b"something else")]))
    with repo.objects.writer() as w:
        w.put(ObjectType.CHUNK, b"keep" * 100)
    assert w.stats.objects_written == 0 and w.stats.objects_skipped == 1


def test_a_long_operation_refreshes_its_marker(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "REFRESH_EVERY", 0.0)
    with repo.objects.operation() as op:
        first = msgpack.unpackb(repo.storage.read(op.key))["updated"]
        op.touch()
        assert msgpack.unpackb(repo.storage.read(op.key))["updated"] >= first


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb({"version": 2, "ids": b""}), msgpack.packb({"version": 1, "ids": b"abc"})])
def test_malformed_doomed_lists_are_corruption(data: bytes) -> None:
    with pytest.raises(CorruptObject):
        decode_doomed(data, "gc/doomed/x")


def test_doomed_list_round_trip() -> None:
    ids = [hash_object(ObjectType.CHUNK, bytes([i])) for i in range(5)]
    assert decode_doomed(encode_doomed(ids), "k") == frozenset(ids)
