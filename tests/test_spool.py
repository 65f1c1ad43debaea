"""Checkpoints to a remote repository go through a local spool (keepsake/tracking/spool.py,
docs/FORMAT.md §18): checkpoint() returns without the network, an uploader sends the data,
and a crashed run's spool is finished by `keepsake push` or by the next run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import keepsake
from keepsake.cli.main import cli
from keepsake.maintenance import fsck
from keepsake.repository import Repository
from keepsake.storage import Storage
from keepsake.tracking.project import Project
from keepsake.tracking.spool import spool_root
from tests.servers import GCSServer, S3Server, start_s3

pytestmark = pytest.mark.remote

ROOT = Path(__file__).resolve().parent.parent
KEEPSAKE = str(Path(sys.executable).parent / "keepsake")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(cache))
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.delenv("KEEPSAKE_SPOOL", raising=False)
    return cache


@pytest.fixture
def private_s3() -> Iterator[S3Server]:
    """A server of this test's own: it is stopped and restarted (the network cut)."""
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "train.py").write_text("print('training')\n")
    return root


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def assert_fsck_clean(repo: Repository) -> None:
    report = fsck(repo)
    assert not report.damaged, [p.line() for p in report.problems]
    assert report.refs_checked > 0


def spools_of(repo: Repository) -> list[str]:
    try:
        return sorted(os.listdir(spool_root(repo.config.id)))
    except FileNotFoundError:
        return []


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read_file(checkpoint: keepsake.Checkpoint, path: str) -> bytes:
    with checkpoint.open(path) as f:
        return f.read()


# -- the network cut ----------------------------------------------------------------------


def test_checkpoints_return_while_the_server_is_down_and_arrive_after(private_s3: S3Server, project_dir: Path) -> None:
    url = private_s3.new_url("cut")
    # one attempt per request: failures show within a second instead of botocore's retries
    options = {**private_s3.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    model = project_dir / "model.bin"
    first = payload(1, 2_000_000)
    model.write_bytes(first)
    e = keepsake.init(path=".", params={"lr": 0.1}, repository=url, directory=str(project_dir), storage_options=options)
    c0 = e.checkpoint(path="model.bin", metrics={"loss": 0.5}, primary_metric=("loss", "minimize"))
    assert e._spool is not None
    assert e.sync()
    spool_repo = e._spool.repo
    # pruned once the remote had it: what stays (the newest files, for local dedup) is there too
    remote = Repository.open(url, options)
    assert all(remote.objects.has(oid) for oid in spool_repo.objects.entries())
    assert read_file(c0, "model.bin") == first  # from the remote now, in the writing process

    private_s3.stop()
    second = first[:1_000_000] + payload(2, 1_000_000)
    model.write_bytes(second)
    c1 = e.checkpoint(path="model.bin", metrics={"loss": 0.2})  # returns with the server down
    model.write_bytes(b"overwritten at once")
    c2 = e.checkpoint(metrics={"loss": 0.1})
    # stored into the spool by the storing thread (FORMAT.md §19), then queued for upload
    wait_for(lambda: e._spool is not None and e._spool.pending, "uploads queued in the spool")
    assert read_file(c1, "model.bin") == second  # readable at once, from the spool
    assert [c.id for c in e.checkpoints] == [c0.id, c1.id, c2.id]
    wait_for(lambda: e._spool is not None and e._spool.state.attempts_failed >= 1, "a failed upload")
    assert not e.sync(timeout=0.5)  # the storage is failing: a bounded wait says so

    private_s3.start()
    e.stop()  # waits for the uploads
    assert e._spool is None

    other = Project(repository=url, directory=str(project_dir), storage_options=options)
    [got] = other.list()
    assert [c.id for c in got.checkpoints] == [c0.id, c1.id, c2.id]
    assert got.status == "stopped"
    assert read_file(got.checkpoints[1], "model.bin") == second
    assert read_file(got.checkpoints[0], "model.bin") == first
    assert_fsck_clean(other.repo)
    assert spools_of(other.repo) == []


def test_the_upload_sends_only_what_the_remote_lacks(s3_server: S3Server, project_dir: Path) -> None:
    url = s3_server.new_url("dedup")
    model = project_dir / "model.bin"
    model.write_bytes(payload(3, 1_500_000))
    e = keepsake.init(path=None, repository=url, directory=str(project_dir), storage_options=s3_server.storage_options)
    e.checkpoint(path="model.bin")
    assert e.sync() and e._spool is not None
    first = e._spool.state.stats
    assert first.bytes_sent > 1_400_000
    e.checkpoint(path="model.bin", step=5)  # the same file again
    assert e.sync()
    again = e._spool.state.stats
    # only the checkpoint record and the head are new
    assert again.objects_needed == 2 and again.bytes_skipped > 1_400_000
    assert again.bytes_sent < 20_000
    e.stop()


def test_a_checkpoint_removed_at_the_remote_while_running_stays_removed(s3_server: S3Server, project_dir: Path) -> None:
    url = s3_server.new_url("rebase")
    options = s3_server.storage_options
    e = keepsake.init(path=None, repository=url, directory=str(project_dir), storage_options=options)
    c0 = e.checkpoint(metrics={"loss": 0.5})
    c1 = e.checkpoint(metrics={"loss": 0.4})
    assert e.sync()
    other = Project(repository=url, directory=str(project_dir), storage_options=options)
    [listed] = other.list()
    other.remove_checkpoint(listed.checkpoints[1])
    c2 = e.checkpoint(metrics={"loss": 0.3})  # spooled on [c0, c1]; the upload rebases it
    e.stop()
    [got] = Project(repository=url, directory=str(project_dir), storage_options=options).list()
    assert [c.id for c in got.checkpoints] == [c0.id, c2.id]
    assert c1.id not in [c.id for c in e.checkpoints]
    assert got.status == "stopped"
    assert_fsck_clean(other.repo)


def test_the_next_run_uploads_a_spool_left_by_a_dead_one(s3_server: S3Server, project_dir: Path, _cache_dir: Path) -> None:
    url = s3_server.new_url("orphan")
    options = s3_server.storage_options
    (project_dir / "model.bin").write_bytes(payload(4, 300_000))
    code = f"""
        import os, keepsake
        e = keepsake.init(path=None, repository={url!r}, storage_options={options!r})
        c = e.checkpoint(path="model.bin", metrics={{"loss": 1.0}})
        print(e.id, c.id, flush=True)
        os._exit(0)  # no exit hooks: the upload may not have happened
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=project_dir, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    dead_experiment, dead_checkpoint = done.stdout.split()
    repo = Repository.open(url, options)
    assert spools_of(repo) == [dead_experiment]

    e = keepsake.init(path=None, repository=url, directory=str(project_dir), storage_options=options)
    e.checkpoint(metrics={"loss": 0.5})
    e.stop()
    project = Project(repository=url, directory=str(project_dir), storage_options=options)
    found = project.resolve(dead_checkpoint)
    assert isinstance(found, keepsake.Checkpoint) and found.experiment.id == dead_experiment
    assert read_file(found, "model.bin") == payload(4, 300_000)
    assert spools_of(repo) == []
    assert_fsck_clean(repo)


def test_process_exit_waits_for_the_upload(s3_server: S3Server, project_dir: Path) -> None:
    url = s3_server.new_url("exit")
    options = s3_server.storage_options
    (project_dir / "model.bin").write_bytes(payload(8, 400_000))
    code = f"""
        import keepsake
        e = keepsake.init(path=None, repository={url!r}, storage_options={options!r})
        print(e.checkpoint(path="model.bin").id, flush=True)
    """  # no stop(): the exit hook records the end and waits for the upload
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=project_dir, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    project = Project(repository=url, directory=str(project_dir), storage_options=options)
    [experiment] = project.list()
    assert experiment.status == "stopped" and [c.id for c in experiment.checkpoints] == [done.stdout.strip()]
    assert read_file(experiment.checkpoints[0], "model.bin") == payload(8, 400_000)
    assert spools_of(project.repo) == []
    assert "not fully uploaded" not in done.stderr


# -- a crash halfway through an upload ----------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def write_project_config(directory: Path, url: str, options: dict[str, Any], **more: Any) -> None:
    (directory / "keepsake.yaml").write_text(yaml.safe_dump({"repository": url, "storage_options": options, **more}))


def test_sigkill_halfway_through_an_upload_then_keepsake_push(private_s3: S3Server, project_dir: Path) -> None:
    url = private_s3.new_url("sigkill")
    options = private_s3.storage_options
    write_project_config(project_dir, url, options)
    size = 48 << 20  # incompressible: two packs, sent as verbatim pack copies
    code = f"""
        import random, time, keepsake
        data = bytearray(random.Random(7).randbytes({size}))
        e = keepsake.init(path=None)
        for i in range(3):
            data[i << 20 : (i + 4) << 20] = random.Random(100 + i).randbytes(4 << 20)
            with open("model.bin", "wb") as f:
                f.write(data)
            c = e.checkpoint(path="model.bin", step=i)
            print(c.id, flush=True)
        time.sleep(120)
    """
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=project_dir, env=child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        returned = [child.stdout.readline().strip()]
        storage = Storage.open(url, options)
        # kill as soon as the first pack is at the remote: the upload is under way
        wait_for(lambda: storage.list("packs/") != [], "the first uploaded pack")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        returned += [line.strip() for line in child.stdout.read().splitlines() if line.strip()]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    remote = Repository.open(url, options)
    assert len(spools_of(remote)) == 1  # left on disk
    pushed = subprocess.run(
        [KEEPSAKE, "push", "--json"],
        cwd=project_dir, env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert pushed.returncode == 0, pushed.stderr
    [flushed] = json.loads(pushed.stdout)["spools"]
    assert flushed["removed"] and flushed["error"] is None
    # the kill came mid-upload: push had something left to send
    assert flushed["stats"]["bytes_sent"] > 0
    assert spools_of(remote) == []

    remote = Repository.open(url, options)
    assert_fsck_clean(remote)
    project = Project(repository=url, directory=str(project_dir), storage_options=options)
    data = bytearray(payload(7, size))
    expected = {}
    for i in range(3):
        data[i << 20 : (i + 4) << 20] = payload(100 + i, 4 << 20)
        expected[i] = bytes(data)
    [experiment] = project.list()
    assert [c.id for c in experiment.checkpoints][: len(returned)] == returned
    for checkpoint in experiment.checkpoints:
        assert read_file(checkpoint, "model.bin") == expected[checkpoint.step]
    again = subprocess.run(
        [KEEPSAKE, "push"], cwd=project_dir, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "nothing to upload" in again.stderr


# -- the whole flow on S3 and GCS ---------------------------------------------------------


@pytest.fixture(params=["s3", "gcs"])
def remote(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    server: S3Server | GCSServer = request.getfixturevalue(f"{request.param}_server")
    return server.new_url("flow"), server.storage_options


def test_the_tracking_flow_on_object_stores(
    remote: tuple[str, dict[str, Any]], project_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = remote
    write_project_config(project_dir, url, options)
    monkeypatch.chdir(project_dir)
    model = project_dir / "model.bin"
    first = payload(5, 200_000)
    model.write_bytes(first)
    e = keepsake.init(path=".", params={"lr": 0.1})
    c0 = e.checkpoint(path="model.bin", metrics={"loss": 0.5}, primary_metric=("loss", "minimize"))
    model.write_bytes(first[:100_000] + payload(6, 100_000))
    c1 = e.checkpoint(path="model.bin", metrics={"loss": 0.25})
    e.stop()

    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    assert e.short_id in run("ls")
    assert "0.1" in run("show", e.short_id)
    assert "0.25" in run("diff", c0.short_id, c1.short_id)
    run("checkout", c0.short_id, "-o", str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.bin").read_bytes() == first
    assert (tmp_path / "out" / "train.py").exists()

    backup = str(tmp_path / "backup")
    run("init", backup)
    run("push", backup)  # object store -> local disk
    assert_fsck_clean(Repository.open(backup))

    laptop = tmp_path / "laptop"
    laptop.mkdir()
    (laptop / "keepsake.yaml").write_text(yaml.safe_dump({"remote": url, "remote_storage_options": options}))
    monkeypatch.chdir(laptop)
    run("pull")  # object store -> a new local repository
    listed = run("ls")
    assert e.short_id in listed
    run("checkout", c1.short_id, "-o", str(tmp_path / "out1"))
    assert (tmp_path / "out1" / "model.bin").read_bytes() == model.read_bytes()
    assert "1 up to date" in runner.invoke(cli, ["push"], catch_exceptions=False).output  # local -> object store
    assert_fsck_clean(Repository.open(url, options))


def test_checkpoints_a_dead_run_only_captured_are_uploaded_by_push(s3_server: S3Server, project_dir: Path) -> None:
    """checkpoint() returned, but the storing thread never put them into the spool (FORMAT.md
    §19): `keepsake push` stores them from the spool's journal, then uploads them."""
    url = s3_server.new_url("journaled")
    options = s3_server.storage_options
    write_project_config(project_dir, url, options)
    code = """
        import os, threading, keepsake
        from keepsake.tracking import experiment as experiment_module
        from tests.test_spool import payload
        e = keepsake.init(path=None)
        open("model.bin", "wb").write(payload(20, 600_000))
        print(e.checkpoint(path="model.bin", step=0).id, flush=True)
        assert e.sync()
        experiment_module.Experiment._store_journaled = lambda self, *args: threading.Event().wait()
        for step in (1, 2):
            open("model.bin", "wb").write(payload(20, 300_000) + payload(20 + step, 300_000))
            print(e.checkpoint(path="model.bin", step=step).id, flush=True)
        os._exit(0)  # dies with two checkpoints captured and not stored
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=project_dir, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    returned = done.stdout.split()
    remote = Repository.open(url, options)
    [experiment_id] = spools_of(remote)
    project = Project(repository=url, directory=str(project_dir), storage_options=options)
    assert [c.id for c in project.get(experiment_id).checkpoints] == returned[:1]

    pushed = subprocess.run([KEEPSAKE, "push"], cwd=project_dir, env=child_env(), capture_output=True, text=True, timeout=300)
    assert pushed.returncode == 0, pushed.stderr
    assert spools_of(remote) == []
    project = Project(repository=url, directory=str(project_dir), storage_options=options)
    got = project.get(experiment_id)
    assert [c.id for c in got.checkpoints] == returned
    assert read_file(got.checkpoints[2], "model.bin") == payload(20, 300_000) + payload(22, 300_000)
    assert read_file(got.checkpoints[0], "model.bin") == payload(20, 600_000)
    assert_fsck_clean(Repository.open(url, options))


def test_a_checkpoint_that_failed_to_reach_the_spool_is_stored_by_the_next(
    s3_server: S3Server, project_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storing thread fails to write a journaled checkpoint into the spool (FORMAT.md
    §19); the next checkpoint() stores it first, and the uploader sends both, in order."""
    import threading

    from keepsake.errors import StorageError
    from keepsake.objects.database import ObjectWriter

    url = s3_server.new_url("leftover")
    options = s3_server.storage_options
    e = keepsake.init(path=None, repository=url, directory=str(project_dir), storage_options=options)
    (project_dir / "model.bin").write_bytes(payload(30, 400_000))
    c0 = e.checkpoint(path="model.bin", step=0)
    assert e.sync()
    real_flush = ObjectWriter.flush
    failures = [1]

    def flush(self: ObjectWriter) -> None:
        if failures[0] and threading.current_thread().name.startswith("keepsake-store"):
            failures[0] -= 1
            raise StorageError(str(project_dir), "write", OSError(28, "No space left on device"))
        real_flush(self)

    monkeypatch.setattr(ObjectWriter, "flush", flush)
    (project_dir / "model.bin").write_bytes(payload(30, 200_000) + payload(31, 200_000))
    c1 = e.checkpoint(path="model.bin", step=1)
    e._settle()
    assert e._ingest_error is not None and not failures[0]
    c2 = e.checkpoint(metrics={"loss": 0.1}, step=2)  # stores c1 from its journal first
    e.stop()
    got = Project(repository=url, directory=str(project_dir), storage_options=options).get(e.id)
    assert [c.id for c in got.checkpoints] == [c0.id, c1.id, c2.id]
    assert read_file(got.checkpoints[1], "model.bin") == payload(30, 200_000) + payload(31, 200_000)
    assert_fsck_clean(Repository.open(url, options))
