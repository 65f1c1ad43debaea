"""``keepsake gc`` through the CLI: output, exit codes, and what it leaves readable."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from keepsake.gc import LOCK_KEY
from keepsake.maintenance import fsck
from keepsake.objects.pack import pack_key
from keepsake.repository import Repository
from tests.cli.test_porcelain import (  # noqa: F401  (fixtures)
    Recorded,
    _isolated,
    assert_error,
    ok,
    record_three,
    root,
    run,
)


@pytest.fixture
def recorded(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorded]:
    r = record_three(root, monkeypatch)
    yield r
    r.project.close()


def stored(root: Path) -> int:
    repo = Repository.open(str(root / ".keepsake"))
    return sum(i.size for i in repo.storage.list("packs/")) + sum(i.size for i in repo.storage.list("index/"))


def test_gc_after_rm_frees_space_and_keeps_the_rest_readable(recorded: Recorded, root: Path, tmp_path: Path) -> None:
    r = recorded
    ok("rm", "-f", r.a)
    before = stored(root)
    result = ok("gc", "--grace", "0")
    assert "freed" in result.stdout.splitlines()[-1]
    assert stored(root) < before
    assert not fsck(Repository.open(str(root / ".keepsake"))).damaged
    ok("checkout", r.b0, "-o", str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.pth").read_bytes() == b"weights b0"
    assert [e["id"] for e in json.loads(ok("ls", "--json").stdout)] == [r.b, r.c]


def test_default_grace_keeps_fresh_garbage(recorded: Recorded, root: Path) -> None:
    ok("rm", "-f", recorded.a)
    before = stored(root)
    doc = json.loads(ok("gc", "--json").stdout)
    assert doc["gc"]["young_objects"] > 0 and doc["gc"]["freed_bytes"] == 0
    assert stored(root) == before


def test_dry_run_changes_nothing(recorded: Recorded, root: Path) -> None:
    ok("rm", "-f", recorded.a)
    repo = Repository.open(str(root / ".keepsake"))
    keys = sorted(i.key for i in repo.storage.list())
    result = ok("gc", "--grace", "0", "--dry-run")
    assert "would free" in result.stdout
    assert sorted(i.key for i in repo.storage.list()) == keys


def test_retention_dry_run_estimates_what_the_real_run_frees(recorded: Recorded, root: Path) -> None:
    r = recorded
    plan = json.loads(ok("gc", "--grace", "0", "--keep-last", "1", "--dry-run", "--json").stdout)
    assert plan["retention"]["checkpoints_removed"] == 1 and plan["gc"]["dead_objects"] > 0
    done = json.loads(ok("gc", "--grace", "0", "--keep-last", "1", "--json").stdout)
    assert done["gc"]["dead_objects"] == plan["gc"]["dead_objects"]
    shown = json.loads(ok("show", "--json", r.a).stdout)
    assert [c["id"] for c in shown["checkpoints"]] == [r.a1]


def test_bad_grace_is_a_usage_error(recorded: Recorded) -> None:
    assert_error(run("gc", "--grace", "soon"), 2, "--grace 'soon' is not a duration")


def test_a_running_gc_makes_another_refuse(recorded: Recorded, root: Path) -> None:
    repo = Repository.open(str(root / ".keepsake"))
    doc = {"version": 1, "host": "box", "pid": 42, "started": time.time(), "updated": time.time()}
    repo.storage.write(LOCK_KEY, msgpack.packb(doc))
    assert_error(run("gc", "--grace", "0"), 10, "another gc is running")


def test_gc_on_a_damaged_repository_deletes_nothing(recorded: Recorded, root: Path) -> None:
    ok("rm", "-f", recorded.a)
    repo = Repository.open(str(root / ".keepsake"))
    b0_files = repo.objects.locate(recorded.b0).pack
    repo.storage.delete(pack_key(b0_files))
    keys = sorted(i.key for i in repo.storage.list())
    assert_error(run("gc", "--grace", "0"), 11, "run \"keepsake fsck\"")
    assert sorted(i.key for i in repo.storage.list()) == keys


def test_fsck_names_the_checkpoints_a_damage_affects_and_repair_keeps_the_rest(recorded: Recorded, root: Path) -> None:
    r = recorded
    repo = Repository.open(str(root / ".keepsake"))
    checkpoint_pack = repo.objects.locate(r.b0).pack
    repo.storage.delete(pack_key(checkpoint_pack))
    result = run("fsck")
    assert result.exit_code == 1
    affected = [line for line in result.stdout.splitlines() if line.startswith("affected: ")]
    assert affected and all(r.b[:7] in line for line in affected), result.stdout
    repaired = run("fsck", "--repair")
    assert "repair: rewrote 1 index files that named missing packs" in repaired.stderr
    assert repaired.exit_code == 1  # the data is gone: repair cannot bring it back, and says so
    assert "missing" in repaired.stdout
