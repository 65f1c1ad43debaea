"""The checkpoint journal (FORMAT.md §19): checkpoint() on a local repository returns once
the checkpoint is captured in a journal; a background thread stores it. A process killed in
between loses nothing: the next run, `keepsake push` or `keepsake gc` stores it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from keepsake.cli.main import cli
from keepsake.errors import StorageError
from keepsake.objects.database import ObjectWriter
from keepsake.tracking import experiment as experiment_module
from keepsake.tracking.journal import FOLDER, SUFFIX, Journal, recover_journals, remove_if_empty, take_owner
from keepsake.tracking.project import Project
from tests.tracking.conftest import assert_fsck_clean, child_env, reader, spawn_python

MIB = 1 << 20


def journals(project: Project) -> list[Path]:
    return sorted(Path(project.repository, FOLDER).glob(f"*/*{SUFFIX}"))


def model_bytes(version: int) -> bytes:
    """4 MiB of float32 weights; each version changes one of its 8 tensors."""
    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal(MIB // 8, dtype=np.float32) for _ in range(8)]
    for v in range(1, version + 1):
        tensors[v % 8] = np.random.default_rng(v).standard_normal(MIB // 8, dtype=np.float32)
    return b"".join(t.tobytes() for t in tensors)


def steps_and_files(project: Project, experiment_id: str) -> list[tuple[int | None, bytes]]:
    got = reader(project).get(experiment_id)
    out = []
    for c in got.checkpoints:
        with c.open("model.bin") as f:
            out.append((c.step, f.read()))
    return out


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The storing thread waits for this event before storing each journal."""
    release = threading.Event()
    original = experiment_module.Experiment._store_journaled

    def store(self: Any, *args: Any) -> None:
        release.wait(30)
        original(self, *args)

    monkeypatch.setattr(experiment_module.Experiment, "_store_journaled", store)
    return release


def test_checkpoint_returns_before_it_is_stored(project: Project, held: threading.Event) -> None:
    model = Path(project.directory) / "model.bin"
    e = project.start_experiment(path=None)
    model.write_bytes(model_bytes(0))
    c0 = e.checkpoint(path="model.bin", step=0)
    model.write_bytes(model_bytes(1))  # training goes on and overwrites the file at once
    e.checkpoint(path="model.bin", step=1)
    pending = journals(project)
    assert len(pending) == 2
    # the second journal holds only the changed tensor (plus its neighbours' chunks)
    first, second = (Journal.read(str(p)) for p in pending)
    assert sum(n for *_, n in first.objects) >= 4 * MIB
    assert sum(n for *_, n in second.objects) < 1.5 * MIB
    assert reader(project).get(e.id).checkpoints == []  # not stored yet: others do not see it
    assert recover_journals(project.repo) == []  # a live process's journal is left alone

    held.set()
    assert e.sync()
    assert journals(project) == []
    assert steps_and_files(project, e.id) == [(0, model_bytes(0)), (1, model_bytes(1))]
    with c0.open("model.bin") as f:  # reads through the live experiment
        assert f.read() == model_bytes(0)
    e.stop()
    assert not Path(project.repository, FOLDER, e.id).exists()
    assert_fsck_clean(project.repo)


def test_checkpoints_without_files_are_stored_at_once(project: Project) -> None:
    e = project.start_experiment(path=None)
    c = e.checkpoint(metrics={"loss": 0.5})
    assert [x.id for x in reader(project).get(e.id).checkpoints] == [c.id]
    assert journals(project) == []
    e.stop()


KILLED_CHILD = """
import os, sys, threading, time
import numpy as np
sys.path.insert(0, {tests!r})
import keepsake
from keepsake.tracking import experiment as experiment_module
from tracking.test_journal import model_bytes

e = keepsake.init(path=None, repository={repo!r}, directory={directory!r})
open("model.bin", "wb").write(model_bytes(0))
e.checkpoint(path="model.bin", step=0)
assert e.sync()
# from here on the storing thread never gets to store: the process dies first
experiment_module.Experiment._store_journaled = lambda self, *args: threading.Event().wait()
for step in (1, 2):
    open("model.bin", "wb").write(model_bytes(step))
    e.checkpoint(path="model.bin", step=step)
print(e.id, flush=True)
time.sleep(60)
"""


def killed_with_journals(project: Project) -> str:
    """Run a child that records checkpoint 0, then 1 and 2 whose storing never happens, and
    SIGKILL it once checkpoint() has returned for all three; returns the experiment id."""
    code = KILLED_CHILD.format(
        tests=str(Path(__file__).parents[1]), repo=project.repository, directory=project.directory
    )
    proc = spawn_python(code, cwd=Path(project.directory))
    try:
        assert proc.stdout is not None
        experiment_id = proc.stdout.readline().strip()
        assert experiment_id, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert len(journals(project)) == 2
    assert [c.step for c in reader(project).get(experiment_id).checkpoints] == [0]
    return experiment_id


ALL_THREE = [(0, model_bytes(0)), (1, model_bytes(1)), (2, model_bytes(2))]


def test_the_next_run_stores_what_a_killed_run_left(project: Project) -> None:
    experiment_id = killed_with_journals(project)
    nxt = reader(project).start_experiment(path=None)  # keepsake.init in the next run
    assert journals(project) == []
    assert steps_and_files(project, experiment_id) == ALL_THREE
    nxt.stop()
    assert_fsck_clean(project.repo)


@pytest.mark.parametrize("command", [["push"], ["gc", "--grace", "0"]])
def test_push_and_gc_store_what_a_killed_run_left(project: Project, command: list[str]) -> None:
    experiment_id = killed_with_journals(project)
    result = CliRunner().invoke(cli, ["-R", project.repository, *command], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stored" in result.output and experiment_id[:7] in result.output
    assert journals(project) == []
    assert steps_and_files(project, experiment_id) == ALL_THREE
    assert_fsck_clean(project.repo)


def test_a_torn_journal_is_dropped_and_nothing_else_is_lost(project: Project, caplog: pytest.LogCaptureFixture) -> None:
    experiment_id = killed_with_journals(project)
    last = journals(project)[-1]
    data = bytearray(last.read_bytes())
    data[100] ^= 0xFF  # inside the changed tensor's bytes: as a power loss could leave it
    last.write_bytes(bytes(data))
    done = recover_journals(project.repo)
    assert [r.stored for r in done] == [True, False]
    assert "torn" in done[1].why and "torn" in caplog.text
    assert steps_and_files(project, experiment_id) == ALL_THREE[:2]
    assert journals(project) == []
    assert_fsck_clean(project.repo)


def test_an_unfinished_journal_is_dropped(project: Project) -> None:
    experiment_id = killed_with_journals(project)
    last = journals(project)[-1]
    last.write_bytes(last.read_bytes()[:-5])  # no trailer: the capture never finished
    done = recover_journals(project.repo)
    assert [r.stored for r in done] == [True, False] and "trailer" in done[1].why
    assert steps_and_files(project, experiment_id) == ALL_THREE[:2]


def test_a_storage_failure_is_retried_then_raised(project: Project, held: threading.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Path(project.directory) / "model.bin"
    e = project.start_experiment(path=None)
    model.write_bytes(model_bytes(0))
    e.checkpoint(path="model.bin", step=0)
    failures = [2]  # the storing thread's flush fails, then the retry's
    original = ObjectWriter.flush

    def flaky(self: ObjectWriter) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise StorageError(project.repository, "write", OSError(28, "No space left on device"))
        original(self)

    monkeypatch.setattr(ObjectWriter, "flush", flaky)
    held.set()
    e._settle()
    assert e._ingest_error is not None and len(journals(project)) == 1  # kept on disk
    model.write_bytes(model_bytes(1))
    with pytest.raises(StorageError, match="No space left"):
        e.checkpoint(path="model.bin", step=1)  # the retry fails too: said where it hurts
    # the next checkpoint stores the leftover first, then itself, in order
    e.checkpoint(path="model.bin", step=1)
    e.stop()
    assert steps_and_files(project, e.id) == [(0, model_bytes(0)), (1, model_bytes(1))]
    assert journals(project) == []
    assert_fsck_clean(project.repo)


def test_journal_off_stores_before_returning(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSAKE_JOURNAL", "off")
    model = Path(project.directory) / "model.bin"
    model.write_bytes(model_bytes(0))
    e = project.start_experiment(path=None)
    c = e.checkpoint(path="model.bin")
    assert [x.id for x in reader(project).get(e.id).checkpoints] == [c.id]
    assert not Path(project.repository, FOLDER).exists()
    e.stop()


def test_a_script_that_ends_without_stop_stores_everything(project: Project) -> None:
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
import keepsake
from tracking.test_journal import model_bytes
e = keepsake.init(path=None, repository={project.repository!r}, directory={project.directory!r})
for step in range(3):
    open("model.bin", "wb").write(model_bytes(step))
    e.checkpoint(path="model.bin", step=step)
print(e.id)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=project.directory, env=child_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    experiment_id = done.stdout.strip()
    assert steps_and_files(project, experiment_id) == ALL_THREE
    assert reader(project).get(experiment_id).status == "stopped"
    assert journals(project) == [] and not os.listdir(Path(project.repository, FOLDER))


def test_ls_says_when_a_killed_run_left_checkpoints_in_journals(project: Project) -> None:
    experiment_id = killed_with_journals(project)
    listed = CliRunner().invoke(cli, ["-R", project.repository, "ls"], catch_exceptions=False)
    assert listed.exit_code == 0
    assert "2 checkpoint(s) of runs that ended before storing them" in listed.output
    assert journals(project) != []  # listing only reads: nothing stored, no lock files made
    CliRunner().invoke(cli, ["-R", project.repository, "push"], catch_exceptions=False)
    listed = CliRunner().invoke(cli, ["-R", project.repository, "ls"], catch_exceptions=False)
    assert "journals" not in listed.output and experiment_id[:7] in listed.output


def test_checkpoint_waits_while_the_backlog_is_too_big(
    project: Project, held: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(experiment_module, "JOURNAL_BACKLOG", 2 * MIB)
    model = Path(project.directory) / "model.bin"
    e = project.start_experiment(path=None)
    model.write_bytes(model_bytes(0))
    e.checkpoint(path="model.bin", step=0)  # 4 MiB journaled: over the backlog now
    model.write_bytes(model_bytes(1))
    second = threading.Thread(target=e.checkpoint, kwargs={"path": "model.bin", "step": 1})
    second.start()
    second.join(0.5)
    assert second.is_alive() and len(journals(project)) == 1  # waits, captured nothing yet
    held.set()
    second.join(10)
    assert not second.is_alive()
    e.stop()
    assert steps_and_files(project, e.id) == [(0, model_bytes(0)), (1, model_bytes(1))]


def test_a_recoverer_removing_a_new_folder_does_not_steal_its_owner(tmp_path: Path) -> None:
    """The recording process locks its new journal folder while a recoverer (another run's
    start, push, gc) holds it and removes it as empty: the recording process must end up
    holding the owner file that is there now, so the next recoverer keeps out."""
    folder = tmp_path / "journal" / ("ab" * 16)
    folder.mkdir(parents=True)
    owner = str(folder / "owner")
    (folder / "owner").touch()
    recoverer = take_owner(owner)
    assert recoverer is not None
    got: list[int | None] = []
    live = threading.Thread(target=lambda: got.append(take_owner(owner, wait=True, create=True)))
    live.start()
    live.join(0.3)
    assert live.is_alive()  # waits for the recoverer
    remove_if_empty(str(folder))  # the recoverer found no journal: removes the folder
    os.close(recoverer)
    live.join(5)
    [fd] = got
    assert fd is not None and os.fstat(fd).st_ino == os.stat(owner).st_ino
    assert take_owner(owner) is None  # held by the live process
    os.close(fd)
    again = take_owner(owner)
    assert again is not None
    os.close(again)
