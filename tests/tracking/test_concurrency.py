"""Several writers and readers on one repository: checkpoint removal while an experiment
runs, stale or missing summaries, processes starting experiments at the same time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from keepsake.errors import InvalidArgument, RefConflict, RepositoryNotFound
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.records import HeadRecord
from keepsake.refs.store import RefStore
from keepsake.repository import Repository
from keepsake.tracking.metadata import experiment_ref
from keepsake.tracking.project import Project
from keepsake.tracking.summary import SummaryCache, summary_key
from tests.tracking.conftest import assert_fsck_clean, child_env, reader, spawn_python


def _head(project: Project, experiment_id: str) -> HeadRecord:
    repo = reader(project).repo
    head_id = repo.refs.get(experiment_ref(experiment_id))
    return HeadRecord.decode(repo.objects.get(head_id, ObjectType.HEAD), head_id)


def test_removing_a_checkpoint_while_the_experiment_runs(project: Project) -> None:
    model = Path(project.directory) / "model.pt"
    live = project.start_experiment(path=None)
    model.write_bytes(b"one")
    c0 = live.checkpoint(path="model.pt", metrics={"loss": 0.3})
    model.write_bytes(b"two")
    c1 = live.checkpoint(path="model.pt", metrics={"loss": 0.2})
    assert live.sync()

    other = reader(project)
    other.remove_checkpoint(other.get(live.id).checkpoints[0])  # like `keepsake rm` elsewhere
    assert [c.id for c in reader(project).get(live.id).checkpoints] == [c1.id]

    model.write_bytes(b"three")
    c2 = live.checkpoint(path="model.pt", metrics={"loss": 0.1})  # compare-and-swap lost, merged
    assert live.sync()
    assert _head(project, live.id).checkpoints == (c1.id, c2.id)
    assert [c.id for c in live.checkpoints] == [c1.id, c2.id]
    assert c2.step == 2  # steps keep counting from what this process recorded
    live.stop()
    got = reader(project).get(live.id)
    assert [c.id for c in got.checkpoints] == [c1.id, c2.id]
    assert got.status == "stopped"
    assert _head(project, live.id).status == "stopped"
    with got.checkpoints[1].open("model.pt") as f:
        assert f.read() == b"three"
    assert c0.id not in {c.id for e in reader(project).list() for c in e.checkpoints}
    assert_fsck_clean(reader(project).repo)


def test_removing_a_checkpoint_twice_or_of_a_stopped_experiment(project: Project) -> None:
    e = project.start_experiment(path=None)
    first = e.checkpoint(metrics={"loss": 1.0})
    e.checkpoint(metrics={"loss": 0.5})
    e.stop()
    other = reader(project)
    checkpoint = other.get(e.id).checkpoints[0]
    other.remove_checkpoint(checkpoint)
    other.remove_checkpoint(checkpoint)  # already gone: nothing to do
    got = reader(project).get(e.id)
    assert first.id not in [c.id for c in got.checkpoints]
    assert len(got.checkpoints) == 1 and got.status == "stopped"


def test_a_deleted_or_stale_summary_is_rebuilt(project: Project) -> None:
    e = project.start_experiment(path=None, params={"lr": 0.1})
    e.checkpoint(metrics={"loss": 1.0}, primary_metric=("loss", "minimize"))
    storage = project.repo.storage
    old_summary = storage.read(summary_key(e.id))
    e.checkpoint(metrics={"loss": 0.5})
    e.stop()

    def check() -> list[ObjectId]:
        cache = SummaryCache(reader(project).repo)
        got = reader(project)
        [listed] = got.list()
        assert listed.params == {"lr": 0.1}
        assert [c.metrics["loss"] for c in listed.checkpoints] == [1.0, 0.5]
        assert listed.status == "stopped"
        assert listed.best() is not None and listed.best().metrics == {"loss": 0.5}
        head = got.repo.refs.get(experiment_ref(e.id))
        cache.load(e.id, head)
        return cache.rebuilt

    assert check() == []  # up to date: read as is
    storage.write(summary_key(e.id), old_summary)  # stale: names an older head
    assert check() == [e.id]
    storage.delete(summary_key(e.id))  # missing
    assert check() == [e.id]
    storage.write(summary_key(e.id), b"\x93garbage")  # damaged
    assert check() == [e.id]
    assert_fsck_clean(project.repo)


def test_deleting_a_running_experiment_stops_its_checkpoints(project: Project) -> None:
    e = project.start_experiment(path=None)
    e.checkpoint(metrics={"loss": 1.0})  # stored from its journal, or not yet: either way
    reader(project).get(e.id).delete()
    with pytest.raises(InvalidArgument, match="deleted while it was running"):
        e.checkpoint(metrics={"loss": 0.5})
    with pytest.raises(InvalidArgument, match="deleted while it was running"):
        e.stop()
    e.stop()  # it is over: nothing more to record (nor at exit)
    assert reader(project).list() == []
    assert_fsck_clean(project.repo, refs=False)


TWO_WRITERS = """
import sys, time
import keepsake
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
e = keepsake.init(path=".", params={{"worker": sys.argv[2]}}, repository={repo!r}, directory={directory!r})
for i in range(3):
    e.checkpoint(path="train.py", metrics={{"loss": 1.0 / (i + 1)}}, primary_metric=("loss", "minimize"))
e.stop()
print(e.id)
"""


def test_two_processes_start_experiments_at_once(project_dir: Path, tmp_path: Path) -> None:
    repo_url = str(tmp_path / "fresh-repo")  # neither may find it yet: both create it
    script = TWO_WRITERS.format(repo=repo_url, directory=str(project_dir))
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(start), name], cwd=project_dir, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    ids = {out.strip() for out, _ in outputs}
    project = Project(repository=repo_url, directory=str(project_dir))
    listed = project.list()
    assert {e.id for e in listed} == ids and len(ids) == 2
    assert sorted(e.params["worker"] for e in listed) == ["a", "b"]
    for e in listed:
        assert [c.step for c in e.checkpoints] == [0, 1, 2]
        assert e.status == "stopped"
    assert listed[0].code == listed[1].code  # same code, stored once
    assert_fsck_clean(project.repo)


def test_a_repository_created_by_someone_else_meanwhile_is_used(
    project_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deterministic version of the race above: another process creates the repository
    # between our failed open and our init.
    url = str(tmp_path / "raced")
    real_open = Repository.open
    calls = []

    def open_after_someone_else_created_it(cls: type[Repository], u: str, options: object = None) -> Repository:
        calls.append(u)
        if len(calls) == 1:
            Repository.init(u).close()  # the other process wins the race
            raise RepositoryNotFound(u)
        return real_open(u, options)  # type: ignore[arg-type]

    monkeypatch.setattr(Repository, "open", classmethod(open_after_someone_else_created_it))
    e = Project(repository=url, directory=str(project_dir)).start_experiment(path=None)
    e.stop()
    monkeypatch.undo()
    assert [x.id for x in Project(repository=url, directory=str(project_dir)).list()] == [e.id]


RUNNING_WRITER = """
import sys, time
import keepsake
e = keepsake.init(path=None, repository={repo!r}, directory={directory!r})
print(e.id, flush=True)
for i in range(8):
    e.checkpoint(metrics={{"i": i}})
e.stop()
print("done", flush=True)
"""


def test_readers_see_consistent_experiments_while_a_writer_checkpoints(project: Project) -> None:
    proc = spawn_python(RUNNING_WRITER.format(repo=project.repository, directory=project.directory), cwd=Path(project.directory))
    assert proc.stdout is not None
    experiment_id = proc.stdout.readline().strip()
    seen = []
    while proc.poll() is None:
        got = reader(project).get(experiment_id)
        values = [c.metrics["i"] for c in got.checkpoints]
        assert values == list(range(len(values)))  # a prefix, never a torn list
        seen.append(len(values))
        time.sleep(0.05)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "done" in out, err
    final = reader(project).get(experiment_id)
    assert len(final.checkpoints) == 8 and final.status == "stopped"
    assert seen == sorted(seen)
    assert_fsck_clean(reader(project).repo)


def test_two_writers_of_one_experiment_keep_each_others_checkpoints(project: Project) -> None:
    first = project.start_experiment(path=None, detached=True)
    second = reader(project).attach(first.id)
    ids = []
    for i in range(3):
        ids.append(first.checkpoint(step=2 * i, metrics={"by": "first"}).id)
        ids.append(second.checkpoint(step=2 * i + 1, metrics={"by": "second"}).id)
    assert _head(project, first.id).checkpoints == tuple(ids)
    assert [c.id for c in second.checkpoints] == ids  # merged, with the other's summaries
    assert [c.metrics["by"] for c in second.checkpoints] == ["first", "second"] * 3
    first.stop()
    second.stop()
    got = reader(project).get(first.id)
    assert [c.step for c in got.checkpoints] == list(range(6)) and got.status == "stopped"
    assert_fsck_clean(reader(project).repo)


def test_remove_checkpoint_reports_a_race_it_keeps_losing(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    e = project.start_experiment(path=None)
    e.checkpoint(metrics={"loss": 1.0})
    e.stop()
    other = reader(project)
    checkpoint = other.get(e.id).checkpoints[0]

    def always_moved_on(self: RefStore, name: str, new: ObjectId, expected: ObjectId | None = None, *, check: bool = True) -> None:
        raise RefConflict(name, expected, "0" * 32)

    monkeypatch.setattr(RefStore, "set", always_moved_on)
    with pytest.raises(RefConflict):
        other.remove_checkpoint(checkpoint)
    monkeypatch.undo()
    assert len(reader(project).get(e.id).checkpoints) == 1  # and it was not removed
