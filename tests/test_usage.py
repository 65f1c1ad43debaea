"""keepsake.usage (compute_usage) and ``keepsake du``: totals, and what each experiment alone
holds, checked against what deleting it actually makes unreachable."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from keepsake.cli.main import cli
from keepsake.maintenance import fsck
from keepsake.objects.database import ObjectDB, ObjectWriter
from keepsake.objects.ids import ObjectType
from keepsake.objects.manifests import MODE_FILE, Tree, TreeEntry
from keepsake.objects.pack import PackEntry
from keepsake.tracking.experiment import Experiment
from keepsake.tracking.project import Project
from keepsake.usage import RepositoryUsage, compute_usage
from tests.conftest import BackendURL


@pytest.fixture(autouse=True)
def _small_packs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Speed only: every writer preallocates a whole pack's buffer (tens of MiB).
    monkeypatch.setattr(ObjectDB, "writer", lambda self, pack_size=1 << 20: ObjectWriter(self, pack_size))
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def project(tmp_path: Path, backend_url: BackendURL) -> Iterator[Project]:
    url, options = backend_url
    directory = tmp_path / "project"
    (directory / "src").mkdir(parents=True)
    (directory / "src" / "train.py").write_text("print('train')\n" * 50)
    p = Project(repository=url, directory=str(directory), storage_options=options)
    yield p
    p.close()


def fresh(project: Project) -> Project:
    return Project(repository=project.repository, directory=project.directory, storage_options=project.storage_options)


def record(project: Project, files: list[bytes], code: bool = True) -> Experiment:
    """A stopped experiment with one checkpoint per file content (saved as model.bin)."""
    e = project.start_experiment(path="src" if code else None)
    for i, data in enumerate(files):
        (Path(project.directory) / "model.bin").write_bytes(data)
        e.checkpoint(path="model.bin", metrics={"loss": float(i)}, primary_metric=("loss", "minimize"))
    e.stop()
    return e


def check_invariants(usage: RepositoryUsage) -> None:
    assert usage.unique_bytes + usage.shared_bytes == usage.reachable_bytes
    assert usage.reachable_bytes + usage.unreachable_bytes == usage.object_bytes
    assert usage.object_bytes <= usage.pack_bytes
    assert usage.pack_bytes + usage.index_bytes <= usage.total_bytes
    unique = [e.unique_bytes for e in usage.experiments]
    assert unique == sorted(unique, reverse=True)
    for owner in usage.owners:
        assert 0 <= owner.unique_bytes <= owner.stored_bytes <= usage.reachable_bytes


def shared_setup(project: Project) -> tuple[Experiment, Experiment, Experiment, bytes]:
    base = os.urandom(400_000)
    a = record(project, [os.urandom(300_000), base, os.urandom(200_000)])
    b = record(project, [base, os.urandom(100_000)])  # shares base (and the code) with a
    c = record(project, [os.urandom(50_000)], code=False)
    return a, b, c, base


@pytest.mark.parametrize(
    "backend_url", ["memory", "local", pytest.param("s3", marks=pytest.mark.remote)], indirect=True
)
def test_unique_bytes_are_what_deleting_the_experiment_makes_unreachable(project: Project) -> None:
    a, b, c, _ = shared_setup(project)
    before = compute_usage(project.repo)
    check_invariants(before)
    assert before.missing == 0 and before.other is None
    by_id = {e.name: e for e in before.experiments}
    assert set(by_id) == {a.id, b.id, c.id}
    assert [by_id[x.id].checkpoints for x in (a, b, c)] == [3, 2, 1]
    # random data does not compress: unique bytes are at least the bytes only each one saved
    assert by_id[a.id].unique_bytes >= 500_000 and by_id[b.id].unique_bytes >= 100_000
    assert before.shared_bytes >= 400_000  # the file a and b both saved
    assert by_id[c.id].shared_bytes == 0  # no code, no common file

    for victim in (a, c):
        old = compute_usage(fresh(project).repo)
        fresh(project).delete_experiment(victim.id)
        new = compute_usage(fresh(project).repo)
        check_invariants(new)
        unique = {e.name: e.unique_bytes for e in old.experiments}[victim.id]
        assert new.unreachable_bytes - old.unreachable_bytes == unique
        assert victim.id not in {e.name for e in new.experiments}
    # with a gone, what it shared with b is b's alone now
    (only,) = compute_usage(fresh(project).repo).experiments
    assert only.name == b.id and only.shared_bytes == 0 and only.unique_bytes == only.stored_bytes


@pytest.mark.parametrize("backend_url", ["memory", "local"], indirect=True)
def test_logical_bytes_count_every_checkpoint_and_the_code(project: Project) -> None:
    e = record(project, [b"x" * 100_000, b"x" * 100_000, b"y" * 5_000])  # identical files count twice
    usage = compute_usage(project.repo)
    (owner,) = usage.experiments
    code = len("print('train')\n" * 50)
    assert owner.logical_bytes == code + 205_000
    assert usage.logical_bytes == owner.logical_bytes
    assert owner.stored_bytes < 100_000  # dedup and compression: far below the logical size
    assert owner.name == e.id


@pytest.mark.parametrize("backend_url", ["memory", "local"], indirect=True)
def test_tags_belong_to_their_experiment_unless_what_they_name_left_it(project: Project) -> None:
    a, b, _, _ = shared_setup(project)
    project.tag("a-first", a.checkpoints[0])
    project.tag("b", b)
    usage = compute_usage(project.repo)
    refs = {e.name: e.refs for e in usage.experiments}
    assert sorted(refs[a.id]) == [f"experiments/{a.id}", "tags/a-first"]
    assert sorted(refs[b.id]) == [f"experiments/{b.id}", "tags/b"]
    assert usage.other is None
    a_unique = {e.name: e.unique_bytes for e in usage.experiments}[a.id]

    # the tagged checkpoint leaves the head (the API does not remove its tag): the tag now
    # keeps it, and the experiment record it names, alive on its own
    project.remove_checkpoint(fresh(project).get(a.id).checkpoints[0])
    usage = compute_usage(fresh(project).repo)
    check_invariants(usage)
    assert usage.other is not None and usage.other.refs == ["tags/a-first"]
    assert usage.other.unique_bytes >= 300_000  # the file only that checkpoint saved
    new_a = {e.name: e for e in usage.experiments}[a.id]
    assert new_a.unique_bytes < a_unique - 300_000
    assert new_a.checkpoints == 2


@pytest.mark.parametrize("backend_url", ["memory", "local"], indirect=True)
def test_manifests_are_read_in_batches_and_chunks_never(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_setup(project)
    record(project, [os.urandom(70_000) for _ in range(6)])
    calls: list[list[PackEntry]] = []
    real = ObjectDB.read_envelopes

    def spy(self: ObjectDB, entries: list[PackEntry]) -> list[bytes]:
        calls.append(entries)
        return real(self, entries)

    monkeypatch.setattr(ObjectDB, "read_envelopes", spy)
    monkeypatch.setattr(ObjectDB, "get", lambda *a, **k: pytest.fail("objects must be read in batches"))
    usage = compute_usage(fresh(project).repo)
    assert usage.experiments
    assert all(e.type != ObjectType.CHUNK for batch in calls for e in batch)
    # one batch per level of the graph under the refs: heads, then experiment and checkpoint
    # records, then their trees (code, saved files), then the blobs in those trees
    assert len(calls) == 4
    assert [len(batch) for batch in calls][0] == len(usage.experiments)  # one head each
    read = {e.id for batch in calls for e in batch}
    assert sum(len(batch) for batch in calls) == len(read)  # nothing read twice


@pytest.mark.parametrize("backend_url", ["memory", "local"], indirect=True)
def test_missing_objects_are_counted_not_fatal(project: Project) -> None:
    record(project, [os.urandom(10_000)])
    repo = project.repo
    with repo.objects.writer() as writer:
        tree = Tree((TreeEntry("ghost.bin", MODE_FILE, 5, "0" * 32),))  # a blob that was never stored
        tree_id = writer.put(ObjectType.TREE, tree.encode())
        writer.flush()
    repo.refs.set("tags/broken", tree_id)
    usage = compute_usage(fresh(project).repo)
    check_invariants(usage)
    assert usage.missing == 1
    assert usage.other is not None and usage.other.refs == ["tags/broken"]
    assert fsck(repo).damaged  # fsck agrees something reachable is missing


@pytest.mark.parametrize("backend_url", ["memory"], indirect=True)
def test_an_empty_repository(project: Project) -> None:
    project._repo_for_writing()
    usage = compute_usage(project.repo)
    assert usage.experiments == [] and usage.other is None
    assert usage.reachable_bytes == usage.object_bytes == usage.unreachable_bytes == 0
    assert usage.total_bytes > 0  # the config file


# -- keepsake du --------------------------------------------------------------------------------


def du(project: Project, *args: str) -> Any:
    return CliRunner().invoke(cli, ["-R", project.repository, "du", *args], catch_exceptions=False)


@pytest.mark.parametrize("backend_url", ["local"], indirect=True)
def test_du_table_and_json(project: Project) -> None:
    a, b, c, _ = shared_setup(project)
    result = du(project)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["EXPERIMENT", "CHECKPOINTS", "UNIQUE", "SHARED", "STORED", "LOGICAL"]
    assert [line.split()[0] for line in lines[1:4]] == [a.short_id, b.short_id, c.short_id]  # by unique bytes
    assert lines[1].split()[1] == "3" and "KiB" in lines[1]
    assert lines[4] == ""
    assert [line.split(":")[0] for line in lines[5:]] == ["Repository", "Logical", "Reachable", "Unreachable"]

    doc = json.loads(du(project, "--json").output)
    usage = compute_usage(project.repo)
    assert doc == json.loads(json.dumps(usage.to_dict()))
    assert [e["id"] for e in doc["experiments"]] == [a.id, b.id, c.id]
    first = doc["experiments"][0]
    assert first["stored_bytes"] == first["unique_bytes"] + first["shared_bytes"]
    assert doc["shared_bytes"] == usage.shared_bytes > 0

    limited = du(project, "-n", "1").output.splitlines()
    assert limited[1].split()[0] == a.short_id
    assert limited[2].startswith("(2 more)")
    assert len(json.loads(du(project, "--json", "-n", "2").output)["experiments"]) == 2


@pytest.mark.parametrize("backend_url", ["local"], indirect=True)
def test_du_warns_about_missing_objects_and_fails_without_a_repository(project: Project, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["-R", str(tmp_path / "nothing"), "du"])
    assert result.exit_code == 3 and "no keepsake repository" in result.output
    record(project, [os.urandom(1000)])
    with project.repo.objects.writer() as writer:
        tree_id = writer.put(ObjectType.TREE, Tree((TreeEntry("x", MODE_FILE, 1, "1" * 32),)).encode())
        writer.flush()
    project.repo.refs.set("tags/broken", tree_id)
    result = CliRunner().invoke(cli, ["-R", project.repository, "du"])
    assert result.exit_code == 0
    assert "warning: 1 reachable object missing from the repository (run keepsake fsck)" in result.stderr
    assert "(other refs)" in result.stdout
