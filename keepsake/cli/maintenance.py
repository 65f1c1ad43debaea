"""``keepsake gc``: apply a retention policy, then reclaim the space no ref reaches."""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from keepsake.cli.display import echo_json
from keepsake.cli.porcelain import info
from keepsake.cli.session import Session, pass_session
from keepsake.cli.usage import (
    apply_retention_options,
    format_retention,
    parse_duration,
    retention_json,
    retention_options,
    wants_retention,
)
from keepsake.gc import DEFAULT_GRACE, DEFAULT_WAIT, GcReport, collect_garbage, describe
from keepsake.objects.graph import Root
from keepsake.objects.ids import ObjectId, ObjectType


def parse_grace(text: str) -> float:
    """``--grace``: a duration (``24h``, ``30m``, ``2d``) or a number of hours; ``0`` allowed."""
    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned) * 3600
    return parse_duration(cleaned, "--grace").total_seconds()


def gc_json(report: GcReport) -> dict[str, Any]:
    return {
        "dry_run": report.dry_run,
        "grace_seconds": report.grace,
        "reachable_objects": report.reachable_objects,
        "unreachable_objects": report.unreachable_objects,
        "young_objects": report.young_objects,
        "dead_objects": report.dead_objects,
        "deferred_objects": report.deferred_objects,
        "revived_objects": report.revived_objects,
        "packs_deleted": report.packs_deleted,
        "packs_repacked": report.packs_repacked,
        "packs_partly_dead": report.packs_partly_dead,
        "unindexed_packs_deleted": report.unindexed_packs_deleted,
        "objects_copied": report.objects_copied,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "freed_bytes": report.freed,
        "waiting_for": report.waiting_for,
    }


@click.command("gc")
@click.option(
    "--grace",
    default=f"{int(DEFAULT_GRACE // 3600)}h",
    show_default=True,
    metavar="DURATION",
    help="Keep unreachable data younger than this (24h, 30m, 2d, or hours as a number; 0 for none). "
    "Running writers are protected whatever the grace period.",
)
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be removed and freed; change nothing.")
@click.option(
    "--wait",
    default=DEFAULT_WAIT,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="How long to wait for writers that started before this run before deferring their share to the next run.",
)
@retention_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@pass_session
def gc_command(
    session: Session,
    grace: str,
    dry_run: bool,
    wait: float,
    keep_best: int | None,
    keep_last: int | None,
    older_than: str | None,
    include_running: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Delete stored data that no experiment, checkpoint or tag uses any more.

    With retention options, first thin out each experiment's checkpoints (keeping the best
    by primary metric, the last by step, tagged ones, and recent ones), like keepsake rm
    would. Then mark everything reachable from refs and delete the rest that is older than
    the grace period. Safe while other processes train into the same repository: objects a
    running writer may still publish are kept (see docs/FORMAT.md §11).

    \b
    Example:
      keepsake gc --dry-run
      keepsake gc --keep-best 3 --keep-last 2 --older-than 7d
      keepsake gc --grace 0
    """
    grace_seconds = parse_grace(grace)
    retention = None
    if wants_retention(keep_best, keep_last, older_than):
        retention = apply_retention_options(session, keep_best, keep_last, older_than, dry_run, include_running)
    planned: dict[str, list[Root]] = {}
    if retention is not None and dry_run:
        # what the heads would hold after retention: the record and the kept checkpoints
        for plan in retention.experiments:
            if plan.removed:
                label = f"experiment {plan.experiment} after retention"
                planned[f"experiments/{plan.experiment}"] = [
                    (ObjectId(plan.experiment), ObjectType.EXPERIMENT, label),
                    *((ObjectId(c.id), ObjectType.CHECKPOINT, label) for c in plan.kept),
                ]
    if not dry_run:
        # a checkpoint a killed run left in its journal relies on stored objects: stored first
        from keepsake.cli.sync import store_journals_left

        store_journals_left(session.repo, quiet or as_json)
    show_progress = not quiet and not as_json and sys.stderr.isatty()
    report = collect_garbage(
        session.repo,
        grace=grace_seconds,
        dry_run=dry_run,
        wait=wait,
        progress=info if show_progress else None,
        planned_refs=planned,
    )
    if as_json:
        echo_json({"retention": retention_json(retention) if retention else None, "gc": gc_json(report)})
        return
    if retention is not None:
        for line in format_retention(retention):
            click.echo(line)
    for line in describe(report):
        click.echo(line)


COMMANDS: list[click.Command] = [gc_command]
