"""Retention (keepsake.tracking.retention, Project.apply_retention/remove_checkpoints) and the
pieces keepsake gc builds its --keep-* options from (keepsake.cli.usage)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import keepsake.tracking.experiment as experiment_module
from keepsake.cli.session import Session, pass_session
from keepsake.cli.usage import (
    apply_retention_options,
    format_duration,
    format_retention,
    parse_duration,
    retention_json,
    retention_options,
)
from keepsake.errors import InvalidArgument
from keepsake.maintenance import fsck
from keepsake.refs.store import RefStore
from keepsake.tracking.experiment import Experiment
from keepsake.tracking.project import Project
from keepsake.tracking.retention import RetentionPolicy, plan_retention
from keepsake.tracking.summary import SummaryCache, build_summary
from tests.conftest import BackendURL

from tests.test_usage import _small_packs  # noqa: E402,F401 (autouse fixture, shared)

LOCAL_AND_MEMORY = pytest.mark.parametrize("backend_url", ["memory", "local"], indirect=True)


@pytest.fixture
def project(tmp_path: Path, backend_url: BackendURL) -> Iterator[Project]:
    url, options = backend_url
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "train.py").write_text("print('train')\n")
    p = Project(repository=url, directory=str(directory), storage_options=options)
    yield p
    p.close()


def other(project: Project) -> Project:
    """A second Project on the same repository, as another process would open it."""
    return Project(repository=project.repository, directory=project.directory, storage_options=project.storage_options)


def record(project: Project, losses: list[float | None], goal: str = "minimize", steps: list[int] | None = None) -> Experiment:
    """A stopped experiment with one checkpoint per loss (None: no metric), each saving a
    different model file."""
    e = project.start_experiment(path=None)
    for i, loss in enumerate(losses):
        (Path(project.directory) / "model.bin").write_bytes(os.urandom(3000) + bytes([i]) * 5000)
        metrics: dict[str, Any] = {"loss": loss} if loss is not None else {"other": i}
        primary = ("loss", goal) if loss is not None else None
        e.checkpoint(path="model.bin", step=steps[i] if steps else None, metrics=metrics, primary_metric=primary)
    e.stop()
    return e


def steps_of(project: Project, experiment: Experiment) -> list[int | None]:
    return [c.step for c in other(project).get(experiment.id).checkpoints]


def reasons_by_step(report_experiment: Any) -> dict[int | None, tuple[str, ...]]:
    return {c.step: c.reasons for c in report_experiment.kept}


@LOCAL_AND_MEMORY
def test_keeps_the_union_of_best_and_last_and_removes_the_rest(project: Project) -> None:
    e = record(project, [5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0])  # steps 0..6
    report = project.apply_retention(keep_best=2, keep_last=2)
    assert not report.dry_run
    (plan,) = report.experiments
    assert reasons_by_step(plan) == {1: ("best",), 3: ("best",), 5: ("last",), 6: ("last",)}
    assert sorted(c.step for c in plan.removed) == [0, 2, 4]
    assert report.removed == 3 and report.kept == 4
    assert steps_of(project, e) == [1, 3, 5, 6]  # order of the head is kept
    best = other(project).get(e.id).best()
    assert best is not None and best.step == 1
    with other(project).get(e.id).checkpoints[0].open("model.bin") as f:
        assert f.read()[3000:] == bytes([1]) * 5000
    report2 = fsck(project.repo)
    assert not report2.damaged
    # removed checkpoints are now unreachable: what gc will sweep
    assert {p.id for p in report2.of_kind("unreachable")} >= {c.id for c in plan.removed}


@LOCAL_AND_MEMORY
def test_a_checkpoint_kept_by_both_rules_is_listed_once_with_both_reasons(project: Project) -> None:
    record(project, [3.0, 2.0, 1.0])
    (plan,) = project.apply_retention(keep_best=1, keep_last=1).experiments
    assert reasons_by_step(plan) == {2: ("best", "last")}
    assert [c.step for c in plan.removed] == [0, 1]


@LOCAL_AND_MEMORY
def test_maximize_ties_and_checkpoints_without_the_metric(project: Project) -> None:
    e = record(project, [0.5, 0.9, None, 0.9, float("nan"), 0.1], goal="maximize")
    (plan,) = project.apply_retention(keep_best=2, dry_run=True).experiments
    # ties keep the older one first (as best() does); no value or NaN is never "best"
    assert reasons_by_step(plan) == {1: ("best",), 3: ("best",)}
    best = other(project).get(e.id).best()
    assert best is not None and best.step == 1
    (plan,) = project.apply_retention(keep_best=1, dry_run=True).experiments
    assert reasons_by_step(plan) == {1: ("best",)}


@LOCAL_AND_MEMORY
def test_last_is_by_step_then_creation(project: Project) -> None:
    e = record(project, [1.0, 1.0, 1.0, 1.0], steps=[10, 30, 20, 20])
    (plan,) = project.apply_retention(keep_last=2).experiments
    # step 30 is furthest; of the two step-20 checkpoints the newer (the 4th) is kept
    assert [c.step for c in plan.kept] == [30, 20]
    assert [c.id for c in plan.kept][1] == e.checkpoints[3].id
    assert steps_of(project, e) == [30, 20]


@LOCAL_AND_MEMORY
def test_experiments_without_a_primary_metric(project: Project) -> None:
    e = record(project, [None, None, None])
    report = project.apply_retention(keep_best=1)
    (plan,) = report.experiments
    assert plan.skipped is not None and "no primary metric" in plan.skipped and "--keep-last" in plan.skipped
    assert plan.removed == [] and len(plan.kept) == 3
    assert steps_of(project, e) == [0, 1, 2]
    (plan,) = project.apply_retention(keep_best=1, keep_last=1).experiments
    assert plan.skipped is None and reasons_by_step(plan) == {2: ("last",)}
    assert steps_of(project, e) == [2]


@LOCAL_AND_MEMORY
def test_tagged_checkpoints_and_tagged_experiments_are_kept(project: Project) -> None:
    a = record(project, [1.0, 2.0, 3.0, 4.0])
    b = record(project, [1.0, 2.0, 3.0])
    project.tag("keep-me", a.checkpoints[2])
    project.tag("whole", b)
    report = project.apply_retention(keep_best=1)
    plans = {p.experiment: p for p in report.experiments}
    assert reasons_by_step(plans[a.id]) == {0: ("best",), 2: ("tagged",)}
    assert reasons_by_step(plans[b.id]) == {0: ("best", "tagged"), 1: ("tagged",), 2: ("tagged",)}
    assert steps_of(project, a) == [0, 2] and steps_of(project, b) == [0, 1, 2]
    assert other(project).resolve("keep-me").id == a.checkpoints[2].id


@LOCAL_AND_MEMORY
def test_older_than_keeps_recent_checkpoints(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(timezone.utc)
    clock = [now]
    real_utc_now = experiment_module.utc_now
    monkeypatch.setattr(experiment_module, "utc_now", lambda: clock[0].isoformat(timespec="microseconds"))
    e = project.start_experiment(path=None)
    for days_ago, loss in zip([40, 35, 20, 3, 1], [5.0, 1.0, 4.0, 3.0, 2.0]):
        clock[0] = now - timedelta(days=days_ago)
        e.checkpoint(metrics={"loss": loss}, primary_metric=("loss", "minimize"))
    e.stop()
    monkeypatch.setattr(experiment_module, "utc_now", real_utc_now)
    (plan,) = project.apply_retention(keep_best=1, older_than=timedelta(days=30)).experiments
    assert reasons_by_step(plan) == {1: ("best",), 2: ("recent",), 3: ("recent",), 4: ("recent",)}
    assert steps_of(project, e) == [1, 2, 3, 4]


@LOCAL_AND_MEMORY
def test_running_experiments_are_skipped_unless_asked(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    live = project.start_experiment(path=None)
    try:
        for loss in (3.0, 2.0, 1.0):
            live.checkpoint(metrics={"loss": loss}, primary_metric=("loss", "minimize"))
        (plan,) = other(project).apply_retention(keep_last=1).experiments
        assert plan.status == "running" and plan.skipped is not None and "running" in plan.skipped
        assert len(live.refresh().checkpoints) == 3
        (plan,) = other(project).apply_retention(keep_last=1, include_running=True).experiments
        assert plan.skipped is None and [c.step for c in plan.removed] == [0, 1]
        # the live process goes on recording on top of the thinned head
        live.checkpoint(metrics={"loss": 0.5})
        assert steps_of(project, live) == [2, 3]
    finally:
        live.stop()


@LOCAL_AND_MEMORY
def test_lost_experiments_are_thinned(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    live = project.start_experiment(path=None)
    try:
        for loss in (3.0, 2.0, 1.0):
            live.checkpoint(metrics={"loss": loss}, primary_metric=("loss", "minimize"))
        monkeypatch.setattr(experiment_module, "HEARTBEAT_TIMEOUT", -1.0)  # every heartbeat is stale
        (plan,) = other(project).apply_retention(keep_best=1).experiments
        assert plan.status == "lost" and plan.skipped is None
        assert steps_of(project, live) == [2]
    finally:
        live.stop()


@LOCAL_AND_MEMORY
def test_dry_run_changes_nothing(project: Project) -> None:
    e = record(project, [3.0, 2.0, 1.0, 4.0])
    before = project.repo.refs.list()
    summaries = {info.key: info.size for info in project.repo.storage.list("summaries/")}
    report = project.apply_retention(keep_best=1, dry_run=True)
    assert report.dry_run and report.removed == 3
    assert project.repo.refs.list() == before
    assert {info.key: info.size for info in project.repo.storage.list("summaries/")} == summaries
    assert steps_of(project, e) == [0, 1, 2, 3]


@LOCAL_AND_MEMORY
def test_summaries_written_by_retention_match_a_rebuild(project: Project) -> None:
    a = record(project, [3.0, 2.0, 1.0, 4.0])
    b = record(project, [1.0, 2.0])
    project.apply_retention(keep_best=1)
    reader = other(project)
    cache = SummaryCache(reader.repo)
    for e in (a, b):
        head = reader.repo.refs.get(f"experiments/{e.id}")
        summary = cache.load(e.id, head)
        rebuilt = build_summary(reader.repo, head, summary.heartbeat)
        assert summary == rebuilt
    assert cache.rebuilt == []  # the summaries were current: listing does not rebuild them
    # one new head per experiment, all in one pack: retention adds one index file, not one per checkpoint
    assert [len(e.checkpoints) for e in reader.list()] == [1, 1]


@LOCAL_AND_MEMORY
def test_a_head_that_moves_during_removal_is_reread_and_retried(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = project.start_experiment(path=None)
    try:
        for loss in (3.0, 2.0, 1.0):
            live.checkpoint(metrics={"loss": loss}, primary_metric=("loss", "minimize"))
        cleaner = other(project)
        original = RefStore.set
        interfered: list[str] = []

        def racing_set(self: RefStore, name: str, new: Any, expected: Any = None, *, check: bool = True) -> None:
            if name.startswith("experiments/") and not interfered:
                interfered.append(name)
                live.checkpoint(metrics={"loss": 9.0})  # the training process publishes first
            original(self, name, new, expected, check=check)

        monkeypatch.setattr(RefStore, "set", racing_set)
        report = cleaner.apply_retention(keep_best=1, include_running=True)
        monkeypatch.setattr(RefStore, "set", original)
        assert interfered
        (plan,) = report.experiments
        assert [c.step for c in plan.removed] == [0, 1]
        # the checkpoint published meanwhile survives; the ones planned away are gone
        assert steps_of(project, live) == [2, 3]
        live.checkpoint(metrics={"loss": 0.1})
        assert steps_of(project, live) == [2, 3, 4]
    finally:
        live.stop()
    assert not fsck(project.repo).damaged


@LOCAL_AND_MEMORY
def test_an_experiment_deleted_meanwhile_is_reported(project: Project) -> None:
    e = record(project, [3.0, 2.0, 1.0])
    report = plan_retention(project.list(), project.tags(), RetentionPolicy(keep_best=1), datetime.now(timezone.utc))
    project.delete_experiment(e.id)
    removed, failed = project.remove_checkpoints(report.removals())
    assert removed == {} and "deleted meanwhile" in failed[e.id]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({}, "without one every checkpoint would be removed"),
        ({"keep_best": 0, "keep_last": 0}, "keep_best (--keep-best N) or keep_last (--keep-last N)"),
        ({"older_than": timedelta(days=3)}, "use keepsake rm"),
        ({"keep_best": -1, "keep_last": 2}, "keep_best must be a whole number >= 0"),
        ({"keep_last": 1.5}, "keep_last must be a whole number"),
        ({"keep_last": True}, "keep_last must be a whole number"),
        ({"keep_last": 1, "older_than": timedelta(0)}, "older_than must be a positive duration"),
    ],
)
def test_bad_policies_are_refused_before_anything_is_read(kwargs: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    p = Project(repository=str(tmp_path / "no-repo"), directory=str(tmp_path))
    with pytest.raises(InvalidArgument) as exc:
        p.apply_retention(**kwargs)
    assert fragment in str(exc.value)
    assert not (tmp_path / "no-repo").exists()


# -- the CLI pieces keepsake gc uses ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("2w", timedelta(weeks=2)),
        ("45s", timedelta(seconds=45)),
        ("1d12h", timedelta(days=1, hours=12)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "30 d", "-3d", "1.5d", "3y", "30days", "d30", "0d", "0h0m"])
def test_parse_duration_refuses_bad_input(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_duration(text)
    assert f"--older-than {text!r}" in str(exc.value)
    assert "30d" in str(exc.value) or "longer than zero" in str(exc.value)


def test_format_duration() -> None:
    assert [format_duration(parse_duration(t)) for t in ("30d", "2w", "90m", "1d12h", "45s")] == [
        "4w2d",
        "2w",
        "1h30m",
        "1d12h",
        "45s",
    ]


@click.command("retain")
@retention_options
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-v", "verbose", is_flag=True)
@pass_session
def retain_command(
    session: Session,
    keep_best: int | None,
    keep_last: int | None,
    older_than: str | None,
    include_running: bool,
    dry_run: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """A stand-in for keepsake gc's retention step, built as gc builds it."""
    report = apply_retention_options(session, keep_best, keep_last, older_than, dry_run, include_running)
    if as_json:
        click.echo(json.dumps(retention_json(report)))
    else:
        click.echo("\n".join(format_retention(report, verbose)))


def run_retain(project: Project, *args: str) -> Any:
    from keepsake.cli.main import KeepsakeGroup

    @click.group(cls=KeepsakeGroup)
    @click.pass_context
    def root(ctx: click.Context) -> None:
        ctx.obj = Session(project.repository)

    root.add_command(retain_command)
    return CliRunner().invoke(root, ["retain", *args])


@pytest.mark.parametrize("backend_url", ["local"], indirect=True)
def test_retention_through_the_cli_pieces(project: Project) -> None:
    a = record(project, [3.0, 1.0, 2.0, 4.0])
    record(project, [None, None])
    project.tag("first", a.checkpoints[0])

    result = run_retain(project, "--keep-best", "1", "--dry-run", "-v")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("Retention (dry run: nothing removed): per experiment, keep the best 1 by primary metric")
    assert any(a.short_id in line and "kept 2 (best 1, tagged 1), would remove 2" in line for line in lines)
    assert any("skipped: no primary metric" in line for line in lines)
    assert any(a.checkpoints[1].short_id in line and "keep" in line and "(best)" in line for line in lines)
    assert lines[-1] == "Would remove 2 checkpoints from 1 experiment, kept 4, skipped 1 experiment."
    assert steps_of(project, a) == [0, 1, 2, 3]

    result = run_retain(project, "--keep-best", "1", "--keep-last", "1", "--older-than", "2w", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["dry_run"] is False
    assert doc["policy"] == {"keep_best": 1, "keep_last": 1, "older_than_seconds": 14 * 86400.0, "include_running": False}
    by_id = {e["experiment"]: e for e in doc["experiments"]}
    # everything is younger than two weeks: nothing goes
    assert doc["checkpoints_removed"] == 0
    assert all("recent" in c["reasons"] for c in by_id[a.id]["kept"])

    result = run_retain(project, "--keep-last", "1", "--json")
    doc = json.loads(result.output)
    assert doc["checkpoints_removed"] == 3 and doc["experiments_skipped"] == 0
    assert {c["step"] for c in doc["experiments"][0]["removed"]} == {1, 2}
    assert all(set(c) == {"id", "step", "created"} for e in doc["experiments"] for c in e["removed"])
    assert all(c["reasons"] for e in doc["experiments"] for c in e["kept"])

    doc = json.loads(run_retain(project, "--keep-best", "1", "--dry-run", "--json").output)
    skipped = [e for e in doc["experiments"] if e["skipped"]]
    assert len(skipped) == 1 and doc["experiments_skipped"] == 1
    assert [c["reasons"] for c in skipped[0]["kept"]] == [[]] and skipped[0]["removed"] == []
    assert steps_of(project, a) == [0, 3]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "retention needs keep_best (--keep-best N) or keep_last (--keep-last N)"),
        (["--keep-best", "0"], "without one every checkpoint would be removed"),
        (["--keep-last", "2", "--older-than", "soon"], "--older-than 'soon' is not a duration"),
    ],
)
@pytest.mark.parametrize("backend_url", ["local"], indirect=True)
def test_cli_pieces_refuse_bad_options(project: Project, args: list[str], fragment: str) -> None:
    record(project, [1.0, 2.0])
    before = project.repo.refs.list()
    result = run_retain(project, *args)
    assert result.exit_code == 2
    assert fragment in result.output
    assert project.repo.refs.list() == before
