"""Experiment status: stop(), the context manager, the exit hook in a real process,
heartbeats and 'lost' experiments."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

import keepsake.tracking.experiment as experiment_module
from keepsake.errors import InvalidArgument
from keepsake.tracking.journal import recover_journals
from keepsake.tracking.project import Project
from tests.tracking.conftest import assert_fsck_clean, reader, run_python, spawn_python


def test_stop_marks_the_experiment_stopped_and_ends_its_heartbeat(project: Project) -> None:
    e = project.start_experiment(path=None)
    assert e.status == "running" and e.running
    assert reader(project).get(e.id).status == "running"
    heartbeat = e._heartbeat
    assert heartbeat is not None and heartbeat.is_alive()
    e.checkpoint(metrics={"loss": 1.0})
    e.stop()
    assert not heartbeat.is_alive()
    e.stop()  # idempotent
    e.stop("failed")  # and final: an ended experiment is not changed
    got = reader(project).get(e.id)
    assert got.status == "stopped" and not got.running
    assert len(got.checkpoints) == 1
    with pytest.raises(InvalidArgument, match="'stopped' or 'failed'"):
        project.start_experiment(path=None).stop("done")


def test_stop_failed(project: Project) -> None:
    e = project.start_experiment(path=None)
    e.stop("failed")
    assert reader(project).get(e.id).status == "failed"


def test_context_manager(project: Project) -> None:
    with project.start_experiment(path=None) as ok:
        ok.checkpoint(metrics={"loss": 1.0})
    with pytest.raises(ZeroDivisionError):
        with project.start_experiment(path=None) as bad:
            bad.checkpoint(metrics={"loss": 1.0})
            1 / 0  # noqa: B018
    with pytest.raises(KeyboardInterrupt):
        with project.start_experiment(path=None) as interrupted:
            raise KeyboardInterrupt
    other = reader(project)
    assert other.get(ok.id).status == "stopped"
    assert other.get(bad.id).status == "failed"
    assert other.get(interrupted.id).status == "stopped"  # Ctrl-C is a user's stop, not a failure
    assert_fsck_clean(other.repo)


CHILD = """
import os, sys, time
import keepsake
import keepsake.tracking.experiment as ex
ex.HEARTBEAT_INTERVAL = float(os.environ.get("HB", "10"))
e = keepsake.init(path=".", params={{"lr": 0.1}}, repository={repo!r}, directory={directory!r})
open({model!r}, "wb").write(b"weights")
{body}
"""


def _child(project: Project, body: str) -> str:
    model = str(Path(project.directory) / "model.pt")
    return CHILD.format(repo=project.repository, directory=project.directory, model=model, body=body)


@pytest.mark.parametrize(
    ("ending", "status"),
    [
        ("pass", "stopped"),
        ("raise RuntimeError('boom')", "failed"),
        ("sys.exit(3)", "stopped"),
    ],
)
def test_exit_hook_records_how_the_process_ended(project: Project, ending: str, status: str) -> None:
    body = f"""
e.checkpoint(path="model.pt", metrics={{"loss": 0.5}}, primary_metric=("loss", "minimize"))
print(e.id, flush=True)
{ending}
"""
    proc = run_python(_child(project, body), cwd=Path(project.directory))
    assert "could not record" not in proc.stderr, proc.stderr
    experiment_id = proc.stdout.split()[0]
    got = reader(project).get(experiment_id)
    assert got.status == status, proc.stderr
    assert len(got.checkpoints) == 1
    with got.checkpoints[0].open("model.pt") as f:
        assert f.read() == b"weights"
    assert_fsck_clean(reader(project).repo)


def test_a_forked_child_ending_does_not_end_the_experiment(project: Project) -> None:
    # e.g. DataLoader workers: forked children run the inherited exit hooks when they end
    body = """
import multiprocessing
from keepsake.tracking.project import Project

def work(n):
    return n * 2

ctx = multiprocessing.get_context("fork")
child = ctx.Process(target=work, args=(1,))
child.start()
child.join()
with ctx.Pool(2) as pool:
    assert pool.map(work, range(4)) == [0, 2, 4, 6]
seen = Project(repository=e.project.repository, directory=e.project.directory).get(e.id)
print(e.id, seen._summary.status, flush=True)
e.checkpoint(path="model.pt", metrics={"loss": 0.5})
"""
    proc = run_python(_child(project, body), cwd=Path(project.directory))
    assert proc.returncode == 0, proc.stderr
    experiment_id, status_after_children = proc.stdout.split()
    assert status_after_children == "running"
    got = reader(project).get(experiment_id)
    assert got.status == "stopped" and len(got.checkpoints) == 1


def test_a_killed_process_leaves_a_lost_experiment(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    body = """
e.checkpoint(path="model.pt", metrics={"loss": 0.5})
print(e.id, flush=True)
time.sleep(60)
"""
    proc = spawn_python(_child(project, body), cwd=Path(project.directory))
    try:
        assert proc.stdout is not None
        experiment_id = proc.stdout.readline().strip()
        assert experiment_id, proc.stderr.read() if proc.stderr else ""
        assert reader(project).get(experiment_id).status == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    monkeypatch.setattr(experiment_module, "HEARTBEAT_TIMEOUT", 0.5)
    time.sleep(0.6)
    # what the next run (or `keepsake push`) does first: store what the killed one
    # left in its journal, if its storing thread had not yet (FORMAT.md §19)
    recover_journals(project.repo)
    got = reader(project).get(experiment_id)
    assert got.status == "lost"
    assert got._summary.status == "running"  # what it said before it died
    assert len(got.checkpoints) == 1  # the checkpoint it made is intact
    assert reader(project).list(filter="status = lost")[0].id == experiment_id
    assert_fsck_clean(reader(project).repo)


def test_a_running_experiment_in_another_process_is_running_and_its_heartbeat_advances(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = """
print(e.id, flush=True)
time.sleep(60)
"""
    # first with the default heartbeat interval: running from the start, before any beat
    slow = spawn_python(_child(project, body), cwd=Path(project.directory))
    fast_code = "import os; os.environ['HB'] = '0.1'\n" + _child(project, body)
    fast = spawn_python(fast_code, cwd=Path(project.directory))
    try:
        assert slow.stdout is not None and fast.stdout is not None
        slow_id = slow.stdout.readline().strip()
        fast_id = fast.stdout.readline().strip()
        assert slow_id and fast_id
        assert reader(project).get(slow_id).status == "running"
        first = reader(project).get(fast_id)
        assert first.status == "running"
        time.sleep(0.5)
        second = reader(project).get(fast_id)
        assert second.status == "running"
        assert first.heartbeat is not None and second.heartbeat is not None
        assert second.heartbeat > first.heartbeat
        # a short timeout still sees the fast beater as running
        monkeypatch.setattr(experiment_module, "HEARTBEAT_TIMEOUT", 1.0)
        assert reader(project).get(fast_id).status == "running"
    finally:
        for proc in (slow, fast):
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
    time.sleep(1.1)
    statuses = {e.id: e.status for e in reader(project).list()}
    assert statuses == {slow_id: "lost", fast_id: "lost"}


def test_heartbeats_in_this_process(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experiment_module, "HEARTBEAT_INTERVAL", 0.05)
    e = project.start_experiment(path=None)
    first = reader(project).get(e.id).heartbeat
    time.sleep(0.3)
    second = reader(project).get(e.id).heartbeat
    assert first is not None and second is not None and second > first
    e.stop()
    after_stop = reader(project).get(e.id).heartbeat
    time.sleep(0.2)
    assert reader(project).get(e.id).heartbeat == after_stop  # no beats once stopped
    assert not any(t.name.startswith(f"keepsake-heartbeat-{e.short_id}") for t in threading.enumerate())


def test_a_detached_experiment_is_never_lost(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    e = project.start_experiment(path=None, detached=True)
    assert e._heartbeat is None
    e.checkpoint(metrics={"loss": 1.0})
    e.checkpoint(metrics={"loss": 0.5})
    monkeypatch.setattr(experiment_module, "HEARTBEAT_TIMEOUT", 0.01)
    time.sleep(0.05)
    assert reader(project).get(e.id).status == "running"
    # removing a checkpoint from elsewhere keeps it detached
    other = reader(project)
    other.remove_checkpoint(other.get(e.id).checkpoints[0])
    got = reader(project).get(e.id)
    assert [c.metrics["loss"] for c in got.checkpoints] == [0.5]
    assert got.status == "running"
    e.stop()
    assert reader(project).get(e.id).status == "stopped"
