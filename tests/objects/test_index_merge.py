"""Index files are merged once many small ones pile up; nothing becomes unreadable."""

from __future__ import annotations

from typing import Any

import pytest

from keepsake.objects import database
from keepsake.objects.ids import ObjectType
from keepsake.repository import Repository


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_many_flushes_keep_few_index_files(tmp_path: Any, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "MERGE_AT", 8)
    url = str(tmp_path / "repo") if backend == "local" else f"memory://merge-{tmp_path.name}"
    repo = Repository.init(url)
    ids = []
    for i in range(30):
        with repo.objects.writer() as w:
            ids.append(w.put(ObjectType.CHUNK, f"object {i}".encode() * 100))
    index_files = repo.storage.list("index/")
    assert len(index_files) <= 9
    packs = {info.key for info in repo.storage.list("packs/")}
    assert len(packs) == 30

    fresh = Repository.open(url)
    for i, oid in enumerate(ids):
        assert fresh.objects.get(oid) == f"object {i}".encode() * 100
    # every pack is still named by some index file
    named = {e.pack for e in fresh.objects.entries().values()}
    assert len(named) == 30


def test_reader_survives_a_merge_by_another_process(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "repo")
    repo = Repository.init(url)
    first = []
    for i in range(5):
        with repo.objects.writer() as w:
            first.append(w.put(ObjectType.CHUNK, f"early {i}".encode()))
    reader = Repository.open(url)
    assert reader.objects.get(first[0]) == b"early 0"  # reader has loaded the 5 small indexes

    with repo.objects.writer() as w:
        late = w.put(ObjectType.CHUNK, b"late")
    assert repo.objects.merge_indexes() == 6
    assert len(repo.storage.list("index/")) == 1
    # the reader does not know the merged file yet: a miss makes it re-list and find it
    assert reader.objects.get(late) == b"late"
    assert reader.objects.get(first[4]) == b"early 4"
