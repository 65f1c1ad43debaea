"""The packed summary index (FORMAT.md §17): listing through it stays exactly what the refs say.

Refs are the truth: a listing must never show a deleted experiment, miss a new one, or show
a head other than the ref's. The index only saves reads, and the tests count them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from keepsake.errors import CorruptObject, StorageError
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.records import HeadRecord
from keepsake.storage import KeyInfo, Storage
from keepsake.tracking import summary as summary_module
from keepsake.tracking.experiment import Experiment, experiment_ref, utc_now
from keepsake.tracking.project import Project
from keepsake.tracking.summary import (
    PACKED_PREFIX,
    IndexEntry,
    Stamp,
    Summary,
    SummaryIndex,
    load_summaries,
    summary_key,
)
from tests.servers import S3Server


@pytest.fixture(autouse=True)
def _environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))
    # small repositories: pack as soon as anything is stale
    monkeypatch.setattr(summary_module, "PACK_THRESHOLD", 0)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    (tmp_path / "project").mkdir()
    p = Project(repository=str(tmp_path / "repo"), directory=str(tmp_path / "project"))
    yield p
    p.close()


def new_project(project: Project) -> Project:
    """Another process's view of the same repository."""
    return Project(repository=project.repository, directory=project.directory, storage_options=project.storage_options)


def record(
    project: Project, n: int, checkpoints: int = 2, stop: bool = True, detached: bool = True
) -> list[Experiment]:
    out = []
    for i in range(n):
        e = project.start_experiment(path=None, params={"i": i}, detached=detached)
        for step in range(checkpoints):
            e.checkpoint(step=step, metrics={"loss": 1.0 / (step + 1 + i)}, primary_metric=("loss", "minimize"))
        if stop:
            e.stop()
        out.append(e)
    return out


def age_refs(project: Project, seconds: float = 100.0) -> None:
    """Make every experiment ref (local disk) look written ``seconds`` ago, so that a later
    write settles it (FORMAT.md §17): tests cannot wait for real seconds to pass."""
    folder = os.path.join(project.repository, "refs", "experiments")
    past = time.time() - seconds
    for name in os.listdir(folder):
        os.utime(os.path.join(folder, name), (past, past))


class ReadCounter:
    """Counts Storage.read calls by key prefix (refs, loose summaries, packed indexes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        original, original_many = Storage.read, Storage.read_many

        def read(storage: Storage, key: str) -> bytes:
            self.keys.append(key)
            return original(storage, key)

        def read_many(storage: Storage, keys: Sequence[str]) -> list[bytes]:
            if storage.backend == "local":
                return original_many(storage, keys)  # goes through read
            self.keys.extend(keys)
            return original_many(storage, keys)

        monkeypatch.setattr(Storage, "read", read)
        monkeypatch.setattr(Storage, "read_many", read_many)

    def count(self, prefix: str) -> int:
        return sum(1 for k in self.keys if k.startswith(prefix))

    @property
    def loose(self) -> int:
        return sum(1 for k in self.keys if k.startswith("summaries/") and not k.startswith(PACKED_PREFIX))


def listed(project: Project) -> dict[ObjectId, Summary]:
    return {e.id: e._summary for e in new_project(project).list()}


def test_a_fresh_index_answers_without_reading_refs_or_summaries(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiments = record(project, 4)
    age_refs(project)
    record(project, 1)  # a later write: the aged refs are settled from now on
    first = new_project(project)
    assert len(first.list()) == 5
    assert first.last_listing is not None and first.last_listing.written  # it packed
    counter = ReadCounter(monkeypatch)
    second = new_project(project)
    result = {e.id: e for e in second.list()}
    assert set(result) == {e.id for e in experiments} | set(result) and len(result) == 5
    # only the newest ref (not yet settled) is read; no loose summary, one packed index
    assert counter.count("refs/") == 1
    assert counter.loose == 0
    assert counter.count(PACKED_PREFIX) == 1
    for e in experiments:
        assert result[e.id]._summary == e._summary


def test_new_and_deleted_experiments_are_seen_at_once(project: Project) -> None:
    experiments = record(project, 3)
    age_refs(project)
    new_project(project).list()  # packs all three
    deleted = experiments[0]
    project.delete_experiment(deleted.id)
    [added] = record(project, 1)
    after = listed(project)
    assert set(after) == {experiments[1].id, experiments[2].id, added.id}


def test_a_moved_ref_wins_over_the_packed_entry(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    [e] = record(project, 1, stop=False)
    age_refs(project)
    record(project, 1)
    before = listed(project)[e.id]
    e.checkpoint(step=9, metrics={"loss": 0.01})  # writes the ref now: a new stamp
    counter = ReadCounter(monkeypatch)
    after = listed(project)[e.id]
    assert len(after.checkpoints) == len(before.checkpoints) + 1 and after.head != before.head
    assert counter.count(experiment_ref_key(e.id)) == 1


def experiment_ref_key(eid: ObjectId) -> str:
    return "refs/" + experiment_ref(eid)


def test_a_ref_moved_without_its_summary_is_rebuilt(project: Project) -> None:
    """A writer that crashed between ref and summary, or a process that moved the ref and
    never wrote a summary: the listing shows the ref's head, rebuilt from the objects."""
    [e, _] = record(project, 2, checkpoints=3)
    age_refs(project)
    record(project, 1)
    listed(project)  # packed
    repo = project.repo
    head_id = repo.refs.get(experiment_ref(e.id))
    head = HeadRecord.decode(repo.objects.get(head_id, ObjectType.HEAD), head_id)
    shorter = HeadRecord(head.experiment, head.checkpoints[:1], head.status, utc_now())
    with repo.objects.operation(), repo.objects.writer() as writer:
        new_id = writer.put(ObjectType.HEAD, shorter.encode())
        writer.flush()
    repo.refs.set(experiment_ref(e.id), new_id, head_id)
    reader = new_project(project)
    summary = {x.id: x._summary for x in reader.list()}[e.id]
    assert summary.head == new_id and [c.id for c in summary.checkpoints] == [head.checkpoints[0]]
    assert reader.last_listing is not None and reader.last_listing.rebuilt == 1


def test_a_ref_rewritten_in_the_second_it_was_read_is_not_trusted(project: Project) -> None:
    """Object stores list modification times in whole seconds: a ref packed right after it
    was written could change again within that second, unseen. Such entries are packed
    without a stamp, so the ref is read again."""
    [e] = record(project, 1)
    reader = new_project(project)
    reader.list()
    assert reader.last_listing is not None and reader.last_listing.written
    index = SummaryIndex.decode(
        project.repo.storage.read(reader.last_listing.written), reader.last_listing.written
    )
    assert index.entries[e.id].stamp is None  # written less than SETTLE_SECONDS before the newest write
    again = new_project(project)
    again.list()
    assert again.last_listing is not None and again.last_listing.ref_reads == 1


def test_running_experiments_take_their_heartbeat_from_the_loose_summary(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    [running] = record(project, 1, stop=False, detached=False)  # sends heartbeats
    record(project, 2)
    age_refs(project)
    record(project, 1)
    listed(project)  # packed, with the heartbeat of that moment
    beat = time.time() + 1000.0
    repo = project.repo
    repo.storage.write(summary_key(running.id), replace(running._summary, heartbeat=beat).encode())
    counter = ReadCounter(monkeypatch)
    after = listed(project)
    assert after[running.id].heartbeat == beat
    # one loose summary read: the running experiment's; stopped ones come from the index
    assert counter.loose == 1 and counter.count(summary_key(running.id)) == 1
    running.stop()


def test_a_corrupt_index_is_ignored_and_replaced(project: Project, caplog: pytest.LogCaptureFixture) -> None:
    experiments = record(project, 2)
    age_refs(project)
    record(project, 1)
    bad = PACKED_PREFIX + "0" * 32
    project.repo.storage.write(bad, b"not an index")
    os.utime(os.path.join(project.repository, *bad.split("/")), (time.time() + 60, time.time() + 60))  # the newest
    reader = new_project(project)
    assert {e.id for e in experiments} <= {e.id for e in reader.list()}
    assert "ignoring summary index" in caplog.text
    assert reader.last_listing is not None and reader.last_listing.written
    # the new index replaced every older one, the corrupt one included
    assert [i.key for i in project.repo.storage.list(PACKED_PREFIX)] == [reader.last_listing.written]


def test_two_packed_indexes_the_newest_is_read_and_the_next_pack_removes_both(project: Project) -> None:
    record(project, 2)
    age_refs(project)
    record(project, 1)
    storage = project.repo.storage
    summaries, _ = load_summaries(project.repo)
    old = SummaryIndex({eid: IndexEntry(s, None) for eid, s in list(summaries.items())[:1]})
    key, data = old.encode()
    storage.write(key, data)  # a second packer's file, written meanwhile
    assert len(storage.list(PACKED_PREFIX)) == 2
    _, stats = load_summaries(project.repo)
    assert stats.packed == key  # newest by time
    assert stats.written and [i.key for i in storage.list(PACKED_PREFIX)] == [stats.written]


def test_an_index_deleted_between_listing_and_reading_is_looked_up_again(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiments = record(project, 2)
    age_refs(project)
    record(project, 1)
    listed(project)
    original = Storage.list
    calls: list[str] = []

    def list_with_a_phantom(storage: Storage, prefix: str = "") -> list[KeyInfo]:
        found = original(storage, prefix)
        calls.append(prefix)
        if prefix == PACKED_PREFIX and calls.count(PACKED_PREFIX) == 1:
            return [*found, KeyInfo(PACKED_PREFIX + "f" * 32, 10, time.time() + 100)]  # gone when read
        return found

    monkeypatch.setattr(Storage, "list", list_with_a_phantom)
    reader = new_project(project)
    assert {e.id for e in experiments} <= {e.id for e in reader.list()}
    assert reader.last_listing is not None and reader.last_listing.packed is not None
    assert calls.count(PACKED_PREFIX) == 2


def test_the_index_encoding_round_trips_and_checks_its_name(project: Project) -> None:
    [e] = record(project, 1, checkpoints=3)
    index = SummaryIndex({e.id: IndexEntry(e._summary, Stamp(33, 1764140088.0))})
    key, data = index.encode()
    assert SummaryIndex.decode(data, key) == index
    with pytest.raises(CorruptObject):
        SummaryIndex.decode(data, PACKED_PREFIX + "1" * 32)
    assert Stamp.from_wire(["e", "etag"]) is None  # a kind this version cannot compare never matches


def test_a_reader_without_write_access_still_lists(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    experiments = record(project, 2)
    def refuse(storage: Storage, key: str, data: object, durable: bool = True) -> None:
        raise StorageError(storage.url, f"write {key}", "AccessDenied")

    monkeypatch.setattr(Storage, "write", refuse)
    reader = new_project(project)
    assert {e.id for e in reader.list()} == {e.id for e in experiments}
    assert reader.last_listing is not None and reader.last_listing.written is None


def test_resolve_and_get_use_the_index(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    experiments = record(project, 3, checkpoints=2)
    age_refs(project)
    record(project, 1)
    listed(project)
    counter = ReadCounter(monkeypatch)
    target = experiments[1]
    found = new_project(project).resolve(target.checkpoints[1].id[:10])
    assert found.id == target.checkpoints[1].id
    assert counter.loose == 0 and counter.count("refs/experiments/") == 1  # the unsettled newest


@pytest.mark.remote
def test_on_s3_a_warm_listing_reads_nothing_but_two_listings(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "p").mkdir()
    url = s3_server.new_url("index")

    def make() -> Project:
        return Project(repository=url, directory=str(tmp_path / "p"), storage_options=s3_server.storage_options)

    experiments = record(make(), 3)
    time.sleep(2.2)  # S3 lists whole seconds: let these refs settle (SETTLE_SECONDS)
    record(make(), 1)
    first = make()
    assert len(first.list()) == 4 and first.last_listing is not None and first.last_listing.written
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cold-cache"))
    counter = ReadCounter(monkeypatch)
    cold = make()
    assert {e.id for e in experiments} <= {e.id for e in cold.list()}
    cold_reads = list(counter.keys)
    counter.keys.clear()
    warm = make()
    assert len(warm.list()) == 4
    # cold: config, the packed index (now cached), the newest (unsettled) ref; warm: no index
    assert sum(k.startswith(PACKED_PREFIX) for k in cold_reads) == 1
    assert sum(k.startswith("refs/") for k in cold_reads) == 1
    assert not any(k.startswith(PACKED_PREFIX) for k in counter.keys)
    assert sum(k.startswith("refs/") for k in counter.keys) == 1
    assert not any(k.startswith("summaries/") and not k.startswith(PACKED_PREFIX) for k in counter.keys)


@pytest.mark.remote
def test_on_s3_a_checkpoint_after_packing_is_seen(s3_server: S3Server, tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    url = s3_server.new_url("index")

    def make() -> Project:
        return Project(repository=url, directory=str(tmp_path / "p"), storage_options=s3_server.storage_options)

    [e] = record(make(), 1, stop=False)
    time.sleep(2.2)
    record(make(), 1)
    assert len(make().list()) == 2
    time.sleep(1.1)  # the next write of e's ref lands in a later second
    e.checkpoint(step=5, metrics={"loss": 0.001})
    e.stop()
    after = {x.id: x for x in make().list()}
    assert after[e.id].latest() is not None and after[e.id].latest().step == 5
    assert after[e.id].status == "stopped"
