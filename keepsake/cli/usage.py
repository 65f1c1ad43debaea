"""Disk usage and retention: ``keepsake du``, and the retention options of ``keepsake gc``.

``du`` shows what each experiment uniquely holds (what removing it lets gc free). The
retention pieces (:func:`retention_options`, :func:`parse_duration`,
:func:`apply_retention_options`, :func:`format_retention`, :func:`retention_json`) are
what ``keepsake gc --keep-best N --keep-last N --older-than DURATION`` is built from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from keepsake.cli.display import echo_json, format_bytes, format_fields, format_table
from keepsake.cli.porcelain import info, open_project, plural
from keepsake.cli.session import Session, pass_session
from keepsake.errors import InvalidArgument
from keepsake.tracking.retention import REASONS, ExperimentRetention, RetentionReport
from keepsake.usage import RepositoryUsage, compute_usage

F = TypeVar("F", bound=Callable[..., Any])

#: duration units: seconds in one of each
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([smhdw])")


# -- retention (called by keepsake gc) ----------------------------------------------------------


def parse_duration(text: str, option: str = "--older-than") -> timedelta:
    """``"30d"`` -> 30 days. Units: s, m, h, d, w; parts may be combined (``"1d12h"``).

    Raises:
        InvalidArgument: anything else, or a zero duration.
    """
    cleaned = text.strip().lower()
    parts = _DURATION.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise InvalidArgument(
            f"{option} {text!r} is not a duration: write a whole number and a unit, "
            "e.g. 30d, 12h, 90m, 2w or 1d12h (units: s, m, h, d, w)"
        )
    duration = timedelta(seconds=sum(int(n) * UNITS[u] for n, u in parts))
    if duration <= timedelta(0):
        raise InvalidArgument(f"{option} {text!r} must be longer than zero")
    return duration


def format_duration(duration: timedelta) -> str:
    """The inverse of :func:`parse_duration` for whole units: 30 days -> ``"30d"``."""
    seconds = int(duration.total_seconds())
    out = ""
    for unit, size in sorted(UNITS.items(), key=lambda kv: -kv[1]):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"


def retention_options(f: F) -> F:
    """Add ``--keep-best``, ``--keep-last``, ``--older-than`` and ``--include-running``.

    The command receives ``keep_best`` and ``keep_last`` (int or None), ``older_than`` (the
    text, or None: pass it to :func:`apply_retention_options`) and ``include_running``.
    """
    decorators = [
        click.option(
            "--keep-best",
            type=click.IntRange(min=0),
            metavar="N",
            help="Per experiment, keep the N checkpoints with the best primary metric.",
        ),
        click.option(
            "--keep-last",
            type=click.IntRange(min=0),
            metavar="N",
            help="Per experiment, keep the N checkpoints with the highest steps.",
        ),
        click.option(
            "--older-than",
            metavar="DURATION",
            help="Remove only checkpoints older than this (30d, 12h, 90m, 2w); newer ones are kept.",
        ),
        click.option(
            "--include-running",
            is_flag=True,
            help="Also thin running experiments (skipped by default: their process rewrites their head).",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def wants_retention(keep_best: int | None, keep_last: int | None, older_than: str | None) -> bool:
    """True when any retention option was given (so gc applies retention before sweeping)."""
    return keep_best is not None or keep_last is not None or older_than is not None


def apply_retention_options(
    session: Session,
    keep_best: int | None,
    keep_last: int | None,
    older_than: str | None,
    dry_run: bool,
    include_running: bool = False,
) -> RetentionReport:
    """Apply (or with ``dry_run``, plan) retention as the options say; see
    :meth:`keepsake.tracking.project.Project.apply_retention`.

    Raises:
        InvalidArgument: no --keep-best/--keep-last of at least 1, or a bad --older-than.
    """
    age = parse_duration(older_than) if older_than is not None else None
    project = open_project(session)
    return project.apply_retention(keep_best, keep_last, age, dry_run=dry_run, include_running=include_running)


def _kept_reasons(plan: ExperimentRetention) -> str:
    counts = {reason: sum(reason in c.reasons for c in plan.kept) for reason in REASONS}
    return ", ".join(f"{reason} {n}" for reason, n in counts.items() if n)


def format_retention(report: RetentionReport, verbose: bool = False) -> list[str]:
    """The retention report for people: one line per experiment that has checkpoints, then
    a total; with ``verbose``, one line per checkpoint too (kept ones with their reasons).
    """
    policy = report.policy
    rules = []
    if policy.keep_best:
        rules.append(f"the best {policy.keep_best} by primary metric")
    if policy.keep_last:
        rules.append(f"the last {policy.keep_last} by step")
    rules.append("tagged checkpoints")
    if policy.older_than is not None:
        rules.append(f"checkpoints newer than {format_duration(policy.older_than)}")
    title = "Retention (dry run: nothing removed)" if report.dry_run else "Retention"
    lines = [f"{title}: per experiment, keep {', '.join(rules)}"]
    rows = []
    for plan in report.experiments:
        if not (plan.kept or plan.removed or plan.skipped):
            continue
        if plan.skipped:
            action = f"skipped: {plan.skipped}"
        else:
            verb = "would remove" if report.dry_run else "removed"
            reasons = _kept_reasons(plan)
            action = f"kept {len(plan.kept)}" + (f" ({reasons})" if reasons else "") + f", {verb} {len(plan.removed)}"
        rows.append([plan.experiment[:7], plan.status, action])
        if verbose:
            for c in plan.kept:
                why = ", ".join(c.reasons) or "experiment skipped"
                rows.append([f"  {c.id[:7]}", "keep", f"step {c.step} ({why})"])
            for c in plan.removed:
                rows.append([f"  {c.id[:7]}", "remove" if report.dry_run else "removed", f"step {c.step}"])
    if rows:
        lines.extend(format_table(["EXPERIMENT", "STATUS", "CHECKPOINTS"], rows))
    touched = sum(1 for e in report.experiments if e.removed)
    verb = "Would remove" if report.dry_run else "Removed"
    summary = f"{verb} {plural(report.removed, 'checkpoint')} from {plural(touched, 'experiment')}, kept {report.kept}"
    if report.skipped:
        summary += f", skipped {plural(len(report.skipped), 'experiment')}"
    lines.append(summary + ".")
    return lines


def retention_json(report: RetentionReport) -> dict[str, Any]:
    """The retention report as a JSON document (schema in docs/CLI.md, "Retention")."""
    return report.to_dict()


# -- du -----------------------------------------------------------------------------------------


def du_lines(usage: RepositoryUsage, limit: int | None = None) -> list[str]:
    """``du`` for people: a table of experiments by unique bytes, then the totals."""
    rows = []
    shown = usage.experiments if limit is None else usage.experiments[:limit]
    for e in shown:
        rows.append(
            [
                e.name[:7],
                str(e.checkpoints),
                format_bytes(e.unique_bytes),
                format_bytes(e.shared_bytes),
                format_bytes(e.stored_bytes),
                format_bytes(e.logical_bytes),
            ]
        )
    hidden = usage.experiments[len(shown) :]
    if hidden:
        rows.append(
            [
                f"({len(hidden)} more)",
                str(sum(e.checkpoints for e in hidden)),
                format_bytes(sum(e.unique_bytes for e in hidden)),
                "",
                "",
                format_bytes(sum(e.logical_bytes for e in hidden)),
            ]
        )
    if usage.other is not None:
        o = usage.other
        rows.append(["(other refs)", "", format_bytes(o.unique_bytes), format_bytes(o.shared_bytes), format_bytes(o.stored_bytes), ""])
    lines = format_table(["EXPERIMENT", "CHECKPOINTS", "UNIQUE", "SHARED", "STORED", "LOGICAL"], rows) if rows else []
    other_keys = usage.total_bytes - usage.pack_bytes - usage.index_bytes
    ratio = f", {usage.logical_bytes / usage.reachable_bytes:.1f}x the reachable bytes" if usage.reachable_bytes else ""
    fields = [
        (
            "Repository",
            f"{format_bytes(usage.total_bytes)} (packs {format_bytes(usage.pack_bytes)}, "
            f"indexes {format_bytes(usage.index_bytes)}, refs and summaries {format_bytes(other_keys)})",
        ),
        ("Logical", f"{format_bytes(usage.logical_bytes)} (every checkpoint's files and code, no dedup{ratio})"),
        (
            "Reachable",
            f"{format_bytes(usage.reachable_bytes)} (unique to one experiment or ref "
            f"{format_bytes(usage.unique_bytes)}, shared {format_bytes(usage.shared_bytes)})",
        ),
        ("Unreachable", f"{format_bytes(usage.unreachable_bytes)} (keepsake gc reclaims it)"),
    ]
    if lines:
        lines.append("")
    return lines + format_fields(fields)


@click.command("du")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document (bytes as integers).")
@click.option("-n", "--limit", type=click.IntRange(min=1), metavar="N", help="Show only the N experiments holding the most.")
@pass_session
def du_command(session: Session, as_json: bool, limit: int | None) -> None:
    """Show what the repository stores and what each experiment alone holds.

    UNIQUE is what removing the experiment (keepsake rm, then gc) frees: the stored bytes
    only it reaches. SHARED is what it shares with other experiments or tags, STORED the
    two together, LOGICAL the size of its code and of every checkpoint's files without any
    dedup. Sizes are stored (compressed) bytes; experiments with the most unique bytes
    come first. Chunks are not read, so this is fast even on large repositories.

    \b
    Example:
      keepsake du
      keepsake du -n 10
      keepsake du --json | jq '.experiments[0]'
    """
    usage = compute_usage(session.repo)
    if usage.missing:
        info(f"warning: {plural(usage.missing, 'reachable object')} missing from the repository (run keepsake fsck)")
    if as_json:
        doc = usage.to_dict()
        if limit is not None:
            doc["experiments"] = doc["experiments"][:limit]
        echo_json(doc)
        return
    for line in du_lines(usage, limit):
        click.echo(line)


COMMANDS: list[click.Command] = [du_command]
