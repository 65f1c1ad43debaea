"""keepsake.transfer: copying what one repository lacks from another (FORMAT.md §16)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keepsake import transfer as transfer_module
from keepsake.errors import CorruptObject, RepositoryExists, StorageError
from keepsake.maintenance import fsck
from keepsake.objects.database import ObjectDB, ObjectWriter
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.pack import pack_id_of_key, pack_key
from keepsake.objects.records import referenced_ids
from keepsake.objects.sessions import DOOMED, SESSIONS, encode_doomed
from keepsake.repository import Repository
from keepsake.tracking.experiment import Experiment
from keepsake.tracking.project import Project
from keepsake.transfer import TransferResult, init_like, transfer

from tests.conftest import BackendURL
from tests.servers import start_s3


@pytest.fixture(autouse=True)
def _clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    (d / "train.py").write_text("print('train')\n")
    return d


def record(
    url: str, options: dict[str, Any], workdir: Path, experiments: int = 2, checkpoints: int = 2, size: int = 300_000
) -> Project:
    """A project at ``url`` with stopped experiments; each checkpoint saves a model file
    that half changes every time (so checkpoints share chunks).

    Its writers close packs at 100 KB, so a checkpoint spans several packs and only its
    last one holds its blob, tree and records: packs of chunks only, as a big checkpoint
    makes (the ones a transfer may copy verbatim).
    """
    with contextlib.suppress(RepositoryExists):
        Repository.init(url, options).close()
    project = Project(repository=url, directory=str(workdir), storage_options=options)
    project.repo.objects.writer = lambda pack_size=100_000: ObjectWriter(project.repo.objects, pack_size)  # type: ignore[method-assign]
    model = workdir / "model.bin"
    base = os.urandom(size)
    for _ in range(experiments):
        experiment = project.start_experiment(path=None, params={"lr": 0.01})
        for step in range(checkpoints):
            model.write_bytes(base[: size // 2] + os.urandom(size - size // 2))
            experiment.checkpoint(path="model.bin", step=step, metrics={"loss": 1.0 / (step + 1)})
        experiment.stop()
    return project


def checkpoint_files(project: Project) -> dict[str, bytes]:
    """Every checkpoint's saved model, read back through the object database."""
    out = {}
    for experiment in project.list():
        for checkpoint in experiment.checkpoints:
            with checkpoint.open("model.bin") as f:
                out[checkpoint.id] = f.read()
    return out


def assert_complete(destination: Repository, source: Repository) -> None:
    """fsck at the destination finds nothing damaged and no leftover packs, it has every
    ref of the source, and every checkpoint reads back as at the source."""
    report = fsck(destination)
    assert not report.damaged, [p.line() for p in report.problems]
    assert not report.of_kind("unindexed-pack"), [p.line() for p in report.problems]
    assert destination.refs.list() == source.refs.list()
    src = Project(repository=source.url, storage_options=_options(source))
    dst = Project(repository=destination.url, storage_options=_options(destination))
    try:
        assert checkpoint_files(dst) == checkpoint_files(src)
        assert len(checkpoint_files(dst)) > 0
    finally:
        src.close()
        dst.close()


_OPTIONS: dict[str, dict[str, Any]] = {}


def _options(repo: Repository) -> dict[str, Any]:
    return _OPTIONS.get(repo.url, {})


def open_repo(url: str, options: dict[str, Any]) -> Repository:
    repo = Repository.open(url, options)
    _OPTIONS[repo.url] = options
    return repo


def new_repo(url: str, options: dict[str, Any]) -> Repository:
    repo = Repository.init(url, options)
    _OPTIONS[repo.url] = options
    return repo


def memory_url() -> str:
    # fsspec's memory filesystem is one dict per process: every test needs its own root
    return f"memory://transfer-{uuid.uuid4().hex}"


def listing(repo: Repository) -> dict[str, int]:
    """Every key (but operation markers) and its size."""
    return {i.key: i.size for i in repo.storage.list() if not i.key.startswith(SESSIONS)}


@pytest.fixture
def local_source(tmp_path: Path, workdir: Path) -> Iterator[Repository]:
    record(str(tmp_path / "source"), {}, workdir).close()
    repo = open_repo(str(tmp_path / "source"), {})
    yield repo
    repo.close()


# -- every backend, both ways -------------------------------------------------------------


def test_push_from_local_to_every_backend(local_source: Repository, backend_url: BackendURL) -> None:
    url, options = backend_url
    destination = new_repo(url, options)
    result = transfer(local_source, destination)
    assert {r.action for r in result.refs} == {"create"}
    assert result.stats.objects_sent == result.stats.objects_needed > 0
    assert result.stats.summaries_written == 2
    assert_complete(destination, local_source)
    destination.close()


def test_pull_from_every_backend_to_local(backend_url: BackendURL, tmp_path: Path, workdir: Path) -> None:
    url, options = backend_url
    record(url, options, workdir, experiments=1).close()
    source = open_repo(url, options)
    destination = new_repo(str(tmp_path / "laptop"), {})
    transfer(source, destination)
    assert_complete(destination, source)
    # ls there reads the copied summaries: nothing to rebuild
    listed = Project(repository=destination.url).list()
    assert [e.id for e in listed] == [e.id for e in Project(repository=url, storage_options=options).list()]
    source.close()
    destination.close()


# -- idempotence and dedup ----------------------------------------------------------------


def test_a_second_push_sends_nothing(local_source: Repository) -> None:
    destination = new_repo(memory_url(), {})
    first = transfer(local_source, destination)
    before = listing(destination)
    second = transfer(local_source, destination)
    assert second.stats.bytes_sent == 0 and second.stats.objects_sent == 0
    assert second.stats.objects_needed == 0
    assert {r.action for r in second.refs} == {"up-to-date"}
    assert listing(destination) == before
    assert first.stats.bytes_sent > 0


def test_only_what_the_destination_lacks_is_sent(tmp_path: Path, workdir: Path) -> None:
    project = record(str(tmp_path / "source"), {}, workdir, experiments=1, checkpoints=1, size=1_000_000)
    source = open_repo(str(tmp_path / "source"), {})
    destination = new_repo(memory_url(), {})
    transfer(source, destination)
    # a new experiment whose model shares its first half with the first one's
    experiment = project.start_experiment(path=None)
    (workdir / "model.bin").write_bytes((workdir / "model.bin").read_bytes()[:500_000] + os.urandom(500_000))
    experiment.checkpoint(path="model.bin", step=0)
    experiment.stop()
    result = transfer(source, destination)
    assert [r.action for r in result.refs].count("create") == 1
    # content-defined chunks: all but the chunk at the seam are shared (random data: stored
    # bytes are about the raw bytes)
    assert result.stats.bytes_skipped > 500_000 - (256 << 10)  # the chunk at the seam (max 256 KiB) is new
    assert result.stats.bytes_needed < 500_000 + (256 << 10) + 20_000
    assert_complete(destination, source)
    project.close()


def test_dry_run_writes_nothing(local_source: Repository) -> None:
    destination = new_repo(memory_url(), {})
    before = listing(destination)
    result = transfer(local_source, destination, dry_run=True)
    assert result.dry_run and result.stats.bytes_needed > 0 and result.stats.bytes_sent == 0
    assert {r.action for r in result.refs} == {"create"}
    assert listing(destination) == before
    assert destination.storage.list(SESSIONS) == []


def test_big_packs_are_copied_verbatim(local_source: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer_module, "VERBATIM_MIN_BYTES", 1)
    destination = new_repo(memory_url(), {})
    result = transfer(local_source, destination)
    assert result.stats.packs_copied > 0
    source_packs = {pack_id_of_key(i.key) for i in local_source.storage.list("packs/")}
    copied = {pack_id_of_key(i.key) for i in destination.storage.list("packs/")}
    assert copied & source_packs  # same bytes, same name
    assert_complete(destination, local_source)


# -- interruption -------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def fail_after(repo: Repository, monkeypatch: pytest.MonkeyPatch, packs: int, error: type[BaseException]) -> list[str]:
    """Make the destination's storage raise ``error`` on its ``packs + 1``-th pack write."""
    real_write = repo.storage.write
    written: list[str] = []

    def write(key: str, data: Any, durable: bool = True) -> None:
        if key.startswith("packs/"):
            if len(written) >= packs:
                raise error("injected failure")
            written.append(key)
        real_write(key, data, durable)

    monkeypatch.setattr(repo.storage, "write", write)
    return written


def assert_names_only_indexed_objects(repo: Repository) -> None:
    """Every indexed manifest or record names only indexed objects: a transfer stopped at
    any point never published an object before what it names (FORMAT.md §8)."""
    entries = repo.objects.entries()
    for oid, entry in entries.items():
        if entry.type != ObjectType.CHUNK:
            for child, _ in referenced_ids(entry.type, repo.objects.get(oid), oid):
                assert child in entries, f"{entry.type.label} {oid} is indexed before {child}"


@pytest.mark.parametrize("verbatim", [False, True], ids=["repacked", "verbatim"])
@pytest.mark.parametrize("error", [Interrupt, KeyboardInterrupt], ids=["exception", "ctrl-c"])
def test_an_interrupted_push_is_finished_by_running_it_again(
    tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch, verbatim: bool, error: type[BaseException]
) -> None:
    record(str(tmp_path / "source"), {}, workdir, experiments=3, checkpoints=2).close()
    source = open_repo(str(tmp_path / "source"), {})
    # small packs and frequent index files, so the failure hits in the middle
    monkeypatch.setattr(transfer_module, "CHECKPOINT_BYTES", 200_000)
    monkeypatch.setattr(transfer_module, "VERBATIM_MIN_BYTES", 1 if verbatim else 1 << 40)
    monkeypatch.setattr(transfer_module, "PACKS_IN_FLIGHT", 1)  # deterministic order
    destination = new_repo(str(tmp_path / "destination"), {})
    total = transfer(source, new_repo(memory_url(), {}), dry_run=True).stats.bytes_needed
    with monkeypatch.context() as m:
        m.setattr(destination.objects, "writer", lambda: ObjectDB.writer(destination.objects, 150_000))
        fail_after(destination, m, 2, error)
        with pytest.raises(error):
            transfer(source, destination)
    # readable, nothing published yet, no marker left behind
    assert destination.refs.list() == {}
    assert destination.storage.list(SESSIONS) == []
    assert not fsck(destination).damaged
    destination.objects.refresh()
    kept = len(destination.objects.entries())
    assert kept > 0  # what was indexed before the failure stays
    assert_names_only_indexed_objects(destination)

    again = open_repo(str(tmp_path / "destination"), {})
    result = transfer(source, again)
    assert result.stats.objects_skipped >= kept
    assert result.stats.bytes_needed < total
    if verbatim:
        assert result.stats.packs_copied > 0
    assert_complete(again, source)
    assert transfer(source, again).stats.bytes_sent == 0


# -- refs ---------------------------------------------------------------------------------


def _head_checkpoints(repo: Repository, experiment: Experiment) -> int:
    project = Project(repository=repo.url, storage_options=_options(repo))
    try:
        return len(project.get(experiment.id).checkpoints)
    finally:
        project.close()


def test_an_experiment_that_grew_is_fast_forwarded(tmp_path: Path, workdir: Path) -> None:
    project = Project(repository=str(tmp_path / "source"), directory=str(workdir))
    experiment = project.start_experiment(path=None)
    (workdir / "model.bin").write_bytes(os.urandom(10_000))
    experiment.checkpoint(path="model.bin", step=0)
    assert experiment.sync()  # stored from its journal (FORMAT.md §19)
    source = open_repo(str(tmp_path / "source"), {})
    destination = new_repo(memory_url(), {})
    transfer(source, destination)  # pushed while running
    experiment.checkpoint(path="model.bin", step=1)
    assert experiment.sync()
    result = transfer(source, destination)
    assert [r.action for r in result.refs] == ["fast-forward"]
    assert _head_checkpoints(destination, experiment) == 2
    experiment.stop()  # same checkpoints, newer head: still a fast-forward
    result = transfer(source, destination)
    assert [r.action for r in result.refs] == ["fast-forward"]
    assert Project(repository=destination.url).get(experiment.id).status == "stopped"
    assert_complete(destination, source)
    project.close()


def test_a_destination_that_is_ahead_is_left_alone(tmp_path: Path, workdir: Path) -> None:
    project = Project(repository=str(tmp_path / "source"), directory=str(workdir))
    experiment = project.start_experiment(path=None)
    experiment.checkpoint(step=0)
    source = open_repo(str(tmp_path / "source"), {})
    behind = new_repo(memory_url(), {})
    transfer(source, behind)
    experiment.checkpoint(step=1)
    ahead = new_repo(memory_url(), {})
    transfer(source, ahead)
    result = transfer(behind, ahead)
    assert [r.action for r in result.refs] == ["behind"]
    assert not result.refused
    assert ahead.refs.list() == source.refs.list()
    experiment.stop()
    project.close()


def test_diverged_refs_are_refused_unless_forced(tmp_path: Path, workdir: Path) -> None:
    project = record(str(tmp_path / "source"), {}, workdir, experiments=2, checkpoints=2, size=20_000)
    source = open_repo(str(tmp_path / "source"), {})
    destination = new_repo(memory_url(), {})
    first, second = project.list()
    project.tag("best", first)
    transfer(source, destination)
    # the source removes a checkpoint (the destination still has it), moves the tag, and
    # records something new that must still go through
    project.remove_checkpoint(first.checkpoints[0])
    project.tag("best", second)
    third = project.start_experiment(path=None)
    third.stop()
    result = transfer(source, destination)
    actions = {r.name: r.action for r in result.refs}
    assert actions[f"experiments/{first.id}"] == "diverged"
    assert actions["tags/best"] == "diverged"
    assert actions[f"experiments/{third.id}"] == "create"
    assert actions[f"experiments/{second.id}"] == "up-to-date"
    assert {r.name for r in result.refused} == {f"experiments/{first.id}", "tags/best"}
    refs = destination.refs.list()
    assert refs["tags/best"] == first.id and f"experiments/{third.id}" in refs
    assert _head_checkpoints(destination, first) == 2

    forced = transfer(source, destination, force=True)
    assert {r.action for r in forced.refs if r.name in ("tags/best", f"experiments/{first.id}")} == {"force"}
    assert not forced.refused
    assert_complete(destination, source)
    project.close()


def test_a_ref_changed_during_the_transfer_is_a_conflict(local_source: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    destination = new_repo(memory_url(), {})
    real_update = transfer_module._update_refs

    def racing(dst: Repository, result: TransferResult) -> None:
        name = result.refs[0].name
        dst.refs.set(name, ObjectId("0" * 32), None)  # another process got there first
        real_update(dst, result)

    monkeypatch.setattr(transfer_module, "_update_refs", racing)
    result = transfer(local_source, destination)
    assert result.refs[0].action == "conflict" and result.refs[0].refused
    assert all(r.action == "create" for r in result.refs[1:])


# -- gc's doomed lists --------------------------------------------------------------------


def test_objects_on_a_doomed_list_are_sent_again(local_source: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer_module, "VERBATIM_MIN_BYTES", 1)  # would copy packs verbatim
    destination = new_repo(memory_url(), {})
    transfer(local_source, destination)
    # The experiments are deleted at the destination and gc dooms their objects ...
    destination.objects.refresh()
    doomed = list(destination.objects.entries())
    for name in list(destination.refs.list()):
        destination.refs.delete(name)
    destination.storage.write(DOOMED + "list1", encode_doomed(doomed))
    old_packs = {i.key for i in destination.storage.list("packs/")}
    old_indexes = {i.key for i in destination.storage.list("index/")}
    # ... then the same experiments are pushed again: every doomed object is stored again,
    # in new packs (a doomed pack is never written again under its old name)
    result = transfer(local_source, destination)
    assert result.stats.objects_sent == len(doomed) and result.stats.objects_skipped == 0
    assert result.stats.packs_copied == 0
    new_packs = {i.key for i in destination.storage.list("packs/")} - old_packs
    assert new_packs
    # gc sweeps the doomed objects: what was pushed must not need them
    for key in old_indexes | old_packs:
        destination.storage.delete(key)
    destination.storage.delete(DOOMED + "list1")
    fresh = open_repo(destination.url, {})
    assert_complete(fresh, local_source)


# -- damage at the source -----------------------------------------------------------------


def _corrupt_a_chunk(repo: Repository) -> ObjectId:
    repo.objects.refresh()
    entry = next(e for e in repo.objects.entries().values() if e.type == ObjectType.CHUNK)
    path = os.path.join(repo.storage.url, pack_key(entry.pack))
    data = bytearray(Path(path).read_bytes())
    data[entry.end - 1] ^= 0xFF
    os.chmod(path, 0o644)
    Path(path).write_bytes(bytes(data))
    return entry.id


@pytest.mark.parametrize("verbatim", [False, True], ids=["repacked", "verbatim"])
def test_a_corrupt_source_object_is_an_error_naming_it(
    local_source: Repository, monkeypatch: pytest.MonkeyPatch, verbatim: bool
) -> None:
    monkeypatch.setattr(transfer_module, "VERBATIM_MIN_BYTES", 1 if verbatim else 1 << 40)
    bad = _corrupt_a_chunk(local_source)
    destination = new_repo(memory_url(), {})
    with pytest.raises(CorruptObject) as info:
        transfer(local_source, destination)
    assert info.value.object_id == bad
    assert destination.refs.list() == {}
    assert not fsck(destination).damaged


def test_a_missing_source_object_is_an_error_naming_it(tmp_path: Path, workdir: Path) -> None:
    project = Project(repository=str(tmp_path / "source"), directory=str(workdir))
    experiment = project.start_experiment(path=None)
    experiment.stop()
    source = open_repo(str(tmp_path / "source"), {})
    missing = ObjectId("f" * 32)
    source.refs.set("tags/dangling", missing, None)
    with pytest.raises(CorruptObject, match="missing from") as info:
        transfer(source, new_repo(memory_url(), {}))
    assert info.value.object_id == missing
    project.close()


@pytest.mark.remote
def test_an_unreachable_destination_is_a_storage_error(local_source: Repository) -> None:
    server = start_s3()  # a private server: stopping the shared one would disturb others
    options = dict(server.storage_options, config_kwargs={"retries": {"max_attempts": 1}}, skip_instance_cache=True)
    destination = new_repo(server.new_url("unreachable"), options)
    server.stop()
    with pytest.raises(StorageError):
        transfer(local_source, destination)


def test_init_like_copies_the_chunker_and_not_the_id(local_source: Repository, tmp_path: Path) -> None:
    clone = init_like(str(tmp_path / "clone"), {}, local_source)
    assert clone.config.chunker == local_source.config.chunker
    assert clone.config.id != local_source.config.id
    again = init_like(str(tmp_path / "clone"), {}, local_source)  # resuming: opens it
    assert again.config == clone.config
