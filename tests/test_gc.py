"""keepsake gc (FORMAT.md §11): what it deletes, what it must never delete, and its races."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from keepsake import gc as gc_module
from keepsake.errors import RepositoryBusy, RepositoryDamaged
from keepsake.gc import LOCK_KEY, collect_garbage
from keepsake.maintenance import fsck
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.pack import PackBuilder, pack_key
from keepsake.objects.sessions import DOOMED, SESSIONS
from keepsake.objects.worktree import checkout_tree, write_tree
from keepsake.repository import Repository
from tests.conftest import BackendURL
from tests.test_storage import xfail_on_gcs_emulator


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))


_OPTIONS: dict[str, dict[str, Any]] = {}


@pytest.fixture
def repo(backend_url: BackendURL) -> Repository:
    url, options = backend_url
    repo = Repository.init(url, options)
    _OPTIONS[repo.url] = options
    return repo


def reopen(repo: Repository) -> Repository:
    """The repository as a new process would see it (no loaded indexes)."""
    return Repository.open(repo.url, _OPTIONS[repo.url])


def store_dir(repo: Repository, root: Path, seed: int, size: int = 300_000) -> ObjectId:
    """Write a directory of random files and return its tree id (no ref)."""
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    (root / "weights.bin").write_bytes(rnd.randbytes(size))
    (root / "note.txt").write_text(f"run {seed}\n")
    with repo.objects.writer() as writer:
        tree_id, _ = write_tree(writer, repo.chunker, str(root))
    return tree_id


def stored(repo: Repository) -> int:
    return sum(i.size for i in repo.storage.list("packs/")) + sum(i.size for i in repo.storage.list("index/"))


def test_unreachable_data_is_deleted_and_reachable_data_kept(repo: Repository, tmp_path: Path) -> None:
    keep = store_dir(repo, tmp_path / "a", 1)
    drop = store_dir(repo, tmp_path / "b", 2)
    repo.refs.set("tags/keep", keep, None)
    before = stored(repo)

    report = collect_garbage(repo, grace=0)

    assert report.dead_objects > 0 and report.packs_deleted >= 1
    assert report.freed > 300_000 * 0.9  # random bytes do not compress: the whole file went
    assert stored(repo) == before - report.freed
    assert not repo.objects.has(drop)
    result = fsck(reopen(repo))
    assert not result.damaged and not result.of_kind("unreachable")
    checkout_tree(reopen(repo).objects, keep, str(tmp_path / "out"))
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (tmp_path / "a" / "weights.bin").read_bytes()


def test_a_second_run_finds_nothing_to_do(repo: Repository, tmp_path: Path) -> None:
    repo.refs.set("tags/keep", store_dir(repo, tmp_path / "a", 1), None)
    store_dir(repo, tmp_path / "b", 2)
    collect_garbage(repo, grace=0)
    again = collect_garbage(repo, grace=0)
    assert again.dead_objects == 0 and again.freed == 0
    assert repo.storage.list(DOOMED) == []  # the first run's list was tidied away


def test_grace_period_protects_young_unreachable_objects(repo: Repository, tmp_path: Path) -> None:
    store_dir(repo, tmp_path / "b", 2)
    before = stored(repo)
    report = collect_garbage(repo, grace=3600)
    assert report.young_objects > 0 and report.dead_objects == 0
    assert stored(repo) == before


def test_dry_run_changes_nothing_and_predicts_the_real_run(repo: Repository, tmp_path: Path) -> None:
    repo.refs.set("tags/keep", store_dir(repo, tmp_path / "a", 1), None)
    store_dir(repo, tmp_path / "b", 2)
    keys = sorted(i.key for i in repo.storage.list())
    plan = collect_garbage(repo, grace=0, dry_run=True)
    assert sorted(i.key for i in repo.storage.list()) == keys
    real = collect_garbage(repo, grace=0)
    assert plan.dead_objects == real.dead_objects
    assert plan.freed == pytest.approx(real.freed, rel=0.05)


def live_next_to_dead(repo: Repository, root: Path, live_size: int, dead_size: int) -> ObjectId:
    """One writer, one pack: a file kept by a tag next to one nothing reaches; returns the
    kept file's blob id."""
    root.mkdir()
    (root / "live.bin").write_bytes(random.Random(5).randbytes(live_size))
    (root / "dead.bin").write_bytes(random.Random(6).randbytes(dead_size))
    with repo.objects.writer() as writer:
        _, tree = write_tree(writer, repo.chunker, str(root))
    live = next(e.id for e in tree.entries if e.name == "live.bin")
    assert live is not None
    repo.refs.set("tags/live", live, None)
    return live


def test_mostly_dead_pack_is_repacked_and_its_live_objects_survive(repo: Repository, tmp_path: Path) -> None:
    live = live_next_to_dead(repo, tmp_path / "src", 20_000, 400_000)
    assert len(repo.storage.list("packs/")) == 1
    old_pack = repo.storage.list("packs/")[0].key

    report = collect_garbage(repo, grace=0)

    assert report.packs_repacked == 1 and report.objects_copied >= 1
    assert [i.key for i in repo.storage.list("packs/")] != [old_pack]
    fresh = reopen(repo)
    data = b"".join(fresh.objects.iter_blob(fresh.objects.get_blob(live)))
    assert data == (tmp_path / "src" / "live.bin").read_bytes()
    assert not fsck(fresh).damaged


def test_mostly_live_pack_is_kept_as_is(repo: Repository, tmp_path: Path) -> None:
    live = live_next_to_dead(repo, tmp_path / "src", 400_000, 20_000)
    packs = [i.key for i in repo.storage.list("packs/")]
    report = collect_garbage(repo, grace=0)
    assert report.packs_partly_dead == 1 and report.packs_deleted == 0
    assert [i.key for i in repo.storage.list("packs/")] == packs


def test_a_reader_with_an_old_index_finds_repacked_objects(repo: Repository, tmp_path: Path) -> None:
    live = live_next_to_dead(repo, tmp_path / "src", 20_000, 400_000)
    reader = reopen(repo)
    blob = reader.objects.get_blob(live)  # loads the index before gc moves things
    collect_garbage(repo, grace=0)
    data = b"".join(reader.objects.iter_blob(blob))
    assert data == (tmp_path / "src" / "live.bin").read_bytes()


def test_gc_refuses_to_run_on_a_damaged_graph(repo: Repository, tmp_path: Path) -> None:
    tree_id = store_dir(repo, tmp_path / "a", 1)
    repo.refs.set("tags/keep", tree_id, None)
    store_dir(repo, tmp_path / "b", 2)
    # the pack holding the tree disappears: everything below it would look unreachable
    pack = repo.objects.locate(tree_id).pack
    repo.storage.delete(pack_key(pack))
    keys = sorted(i.key for i in repo.storage.list() if not i.key.startswith("gc/"))
    with pytest.raises(RepositoryDamaged, match="fsck"):
        collect_garbage(repo, grace=0)
    assert sorted(i.key for i in repo.storage.list() if not i.key.startswith("gc/")) == keys
    assert repo.storage.list(LOCK_KEY) == []  # the lock is released on error


def test_a_held_lock_makes_gc_refuse_and_a_stale_one_is_taken_over(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    xfail_on_gcs_emulator(request)  # the lock is a create-only write
    doc = {"version": 1, "host": "elsewhere", "pid": 7, "started": time.time(), "updated": time.time()}
    repo.storage.write(LOCK_KEY, msgpack.packb(doc))
    with pytest.raises(RepositoryBusy, match="pid 7 on elsewhere"):
        collect_garbage(repo, grace=0)
    assert repo.storage.read(LOCK_KEY) == msgpack.packb(doc)
    # a gc that died: once its lock shows no sign of life for LOCK_TIMEOUT, it is taken over
    monkeypatch.setattr(gc_module, "LOCK_TIMEOUT", 0.0)
    collect_garbage(repo, grace=0)
    assert repo.storage.list(LOCK_KEY) == []


def test_an_index_naming_a_vanished_pack_is_tidied(repo: Repository, tmp_path: Path) -> None:
    store_dir(repo, tmp_path / "b", 2)
    pack = repo.storage.list("packs/")[0].key
    repo.storage.delete(pack)  # e.g. a sweep interrupted between index rewrite and delete
    collect_garbage(repo, grace=0)
    fresh = reopen(repo)
    assert fresh.objects.entries() == {}
    assert not fsck(fresh).problems


def test_unindexed_old_pack_is_deleted_unless_a_live_writer_may_own_it(repo: Repository) -> None:
    builder = PackBuilder(1 << 20)
    builder.add(ObjectId("ab" * 16), ObjectType.CHUNK, 3, b"x" * 20)  # no index names it
    pack_id, data, _, _ = builder.finish()
    repo.storage.write(pack_key(pack_id), bytes(data))
    with repo.objects.operation():  # a live writer that started before the pack
        report = collect_garbage(repo, grace=0, wait=0)
        assert report.unindexed_packs_deleted == 0
        assert repo.storage.list("packs/")
    report = collect_garbage(repo, grace=0)
    assert report.unindexed_packs_deleted == 1
    assert repo.storage.list("packs/") == []


def test_a_running_writer_that_has_not_seen_the_doomed_list_defers_deletion(repo: Repository, tmp_path: Path) -> None:
    store_dir(repo, tmp_path / "b", 2)
    before = stored(repo)
    with repo.objects.operation():
        report = collect_garbage(repo, grace=0, wait=0.2)
    assert report.deferred_objects > 0 and report.dead_objects == 0
    assert report.waiting_for
    assert len(repo.storage.list(DOOMED)) == 1  # left for writers to honour
    assert stored(repo) == before
    # the writer is gone: the next run deletes
    report = collect_garbage(repo, grace=0)
    assert report.dead_objects > 0 and stored(repo) < before


def test_writer_that_relied_on_an_object_before_gc_keeps_it(repo: Repository, tmp_path: Path) -> None:
    """Race 2 of FORMAT.md §11: a writer sees "X exists, skip", gc dooms X, the writer publishes."""
    old = store_dir(repo, tmp_path / "a", 1)  # unreachable: no ref yet
    results: dict[str, Any] = {}
    in_op = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with repo.objects.operation():
            with repo.objects.writer() as w:
                _, _ = write_tree(w, repo.chunker, str(tmp_path / "a"))  # every object deduplicated
                results["skipped"] = w.stats.objects_skipped
            in_op.set()
            release.wait(10)
            repo.refs.set("tags/late", old, None)  # publishes a ref to the objects it relied on

    t = threading.Thread(target=writer)
    t.start()
    in_op.wait(10)
    threading.Timer(0.5, release.set).start()
    report = collect_garbage(repo, grace=0, wait=10)  # waits for the writer, then marks again
    t.join()
    assert results["skipped"] > 0
    assert report.revived_objects > 0 and report.dead_objects == 0
    fresh = reopen(repo)
    assert not fsck(fresh).damaged
    checkout_tree(fresh.objects, old, str(tmp_path / "out"))
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (tmp_path / "a" / "weights.bin").read_bytes()


def test_writer_starting_after_the_doomed_list_stores_objects_again(repo: Repository, tmp_path: Path) -> None:
    """A writer that starts while gc waits never relies on a doomed object."""
    store_dir(repo, tmp_path / "a", 1)
    with repo.objects.operation():  # keeps gc waiting (and deferring) after it publishes
        collect_garbage(repo, grace=0, wait=0)
    assert repo.storage.list(DOOMED)
    with repo.objects.writer() as w:
        tree_id, _ = write_tree(w, repo.chunker, str(tmp_path / "a"))
    assert w.stats.objects_skipped == 0 and w.stats.objects_written > 0
    repo.refs.set("tags/again", tree_id, None)
    collect_garbage(repo, grace=0)
    fresh = reopen(repo)
    assert not fsck(fresh).damaged
    checkout_tree(fresh.objects, tree_id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (tmp_path / "a" / "weights.bin").read_bytes()


def test_markers_stay_fresh_while_an_operation_runs(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    from keepsake.objects import sessions

    monkeypatch.setattr(sessions, "REFRESH_EVERY", 0.2)
    with repo.objects.operation() as op:
        first = msgpack.unpackb(repo.storage.read(op.key))["updated"]
        deadline = time.time() + 5
        while time.time() < deadline:
            time.sleep(0.1)
            if msgpack.unpackb(repo.storage.read(op.key))["updated"] > first:
                break
        else:
            pytest.fail("the marker was never refreshed")
    time.sleep(0.3)
    assert repo.storage.list(SESSIONS) == []  # the keeper never recreates an ended marker


def test_describe_says_what_was_freed(repo: Repository, tmp_path: Path) -> None:
    store_dir(repo, tmp_path / "b", 2)
    lines = list(gc_module.describe(collect_garbage(repo, grace=0)))
    assert any(line.startswith("freed ") and "KiB" in line for line in lines)
    assert os.environ.get("KEEPSAKE_CACHE_DIR")


# -- fsck --repair ------------------------------------------------------------------------------


def test_repair_reindexes_packs_of_an_undecodable_index_and_never_loses_data(repo: Repository, tmp_path: Path) -> None:
    from keepsake.gc import repair

    keep = store_dir(repo, tmp_path / "a", 1)
    repo.refs.set("tags/keep", keep, None)
    index = repo.storage.list("index/")[0].key
    repo.storage.write(index, b"garbage, not an index")
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # remote backends cache index files
    damaged = fsck(reopen(repo))
    assert damaged.damaged and damaged.of_kind("corrupt-index")

    report = repair(reopen(repo))

    assert report.packs_reindexed >= 1 and report.corrupt_indexes_removed == 1
    fresh = reopen(repo)
    assert not fsck(fresh).damaged
    checkout_tree(fresh.objects, keep, str(tmp_path / "out"))
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (tmp_path / "a" / "weights.bin").read_bytes()


def test_repair_drops_entries_of_vanished_packs_so_writers_store_them_again(repo: Repository, tmp_path: Path) -> None:
    from keepsake.gc import repair

    store_dir(repo, tmp_path / "a", 1)
    for info in repo.storage.list("packs/"):
        repo.storage.delete(info.key)
    assert repair(reopen(repo)).index_files_rewritten >= 1
    fresh = reopen(repo)
    with fresh.objects.writer() as w:
        write_tree(w, fresh.chunker, str(tmp_path / "a"))
    assert w.stats.objects_skipped == 0  # nothing is trusted to a pack that is gone
    assert {p.kind for p in fsck(reopen(repo)).problems} == {"unreachable"}


def test_repair_removes_undecodable_doomed_lists_and_markers(repo: Repository) -> None:
    from keepsake.gc import repair

    repo.storage.write(DOOMED + "broken", b"\xc1")
    repo.storage.write(SESSIONS + "broken", b"\xc1")
    report = repair(repo)
    assert report.doomed_lists_removed == 1 and report.markers_removed == 1
    assert repo.storage.list(DOOMED) == [] and repo.storage.list(SESSIONS) == []


def test_a_marker_of_a_killed_local_writer_does_not_hold_gc_back(repo: Repository, tmp_path: Path) -> None:
    import subprocess
    import sys

    from keepsake.objects.sessions import process_namespace

    store_dir(repo, tmp_path / "b", 2)
    # a writer process that died without removing its marker (SIGKILL): its pid is gone
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    doc = {"version": 1, "host": "here", "pid": child.pid, "ns": process_namespace(), "started": time.time(),
           "updated": time.time(), "seen": []}
    repo.storage.write(SESSIONS + "dead", msgpack.packb(doc))
    report = collect_garbage(repo, grace=0, wait=0)
    assert report.dead_objects > 0 and not report.deferred_objects
    assert repo.storage.list(SESSIONS) == []  # and the marker is cleaned up
    # the same marker from another machine (or PID namespace) is judged by its age only
    repo.storage.write(SESSIONS + "elsewhere", msgpack.packb({**doc, "ns": "other-boot:1"}))
    store_dir(repo, tmp_path / "c", 3)
    report = collect_garbage(repo, grace=0, wait=0)
    assert report.deferred_objects > 0


def test_a_lock_left_by_a_killed_gc_on_this_machine_is_taken_over(repo: Repository) -> None:
    import subprocess
    import sys

    from keepsake.objects.sessions import process_namespace

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    doc = {"version": 1, "host": "here", "pid": child.pid, "ns": process_namespace(), "started": time.time(),
           "updated": time.time()}
    repo.storage.write(LOCK_KEY, msgpack.packb(doc))
    collect_garbage(repo, grace=0)  # no RepositoryBusy: its holder is gone
    assert repo.storage.list(LOCK_KEY) == []


def test_stale_temporary_files_of_killed_local_writes_are_removed(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "repo"))
    old = tmp_path / "repo" / "packs" / ".tmp-dead"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(b"half a pack")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    fresh = tmp_path / "repo" / ".tmp-writing"
    fresh.write_bytes(b"being written")
    collect_garbage(repo, grace=0)
    assert not old.exists() and fresh.exists()


def test_the_error_that_stopped_gc_is_reported_not_the_failed_cleanup(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    from keepsake.errors import StorageError

    def broken(self: object, *args: object) -> Any:
        raise StorageError(repo.url, "list refs/", "connection reset")

    def no_release(self: object) -> None:
        raise StorageError(repo.url, "delete gc/lock", "connection reset")

    monkeypatch.setattr(gc_module._Run, "stored_bytes", broken)
    monkeypatch.setattr(gc_module.GcLock, "release", no_release)
    with pytest.raises(StorageError, match="list refs/"):
        collect_garbage(repo, grace=0)
