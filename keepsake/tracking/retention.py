"""Retention: which checkpoints of each experiment to keep, and a report of what was removed.

A policy keeps, per experiment, the best N checkpoints by the experiment's primary metric,
the last N by step, every tagged checkpoint and (optionally) every checkpoint younger than
an age; everything else is removed from the experiment's head. Removing only changes refs:
the bytes come back when gc sweeps what no ref reaches any more. Planning is pure (this
module); :meth:`keepsake.tracking.project.Project.apply_retention` applies the plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from keepsake.errors import InvalidArgument
from keepsake.objects.ids import ObjectId
from keepsake.objects.values import is_number
from keepsake.tracking.experiment import Checkpoint, Experiment

#: why a checkpoint was kept, in the order the report lists them
REASONS = ("best", "last", "tagged", "recent")


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep of each experiment.

    Args:
        keep_best: keep this many checkpoints with the best primary metric (experiments
            without a primary metric are ranked by nothing: only keep_last thins them).
        keep_last: keep this many checkpoints with the highest steps (then newest).
        older_than: when given, checkpoints created less than this long ago are kept too.
        include_running: also thin experiments that are running. Off by default: their
            own process rewrites the head and keeps adding checkpoints.

    Raises:
        InvalidArgument: no keep option of at least 1 (that would remove every checkpoint),
            a negative count, or a non-positive age.
    """

    keep_best: int | None = None
    keep_last: int | None = None
    older_than: timedelta | None = None
    include_running: bool = False

    def __post_init__(self) -> None:
        for name, value in (("keep_best", self.keep_best), ("keep_last", self.keep_last)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidArgument(f"{name} must be a whole number >= 0, not {value!r}")
        if not (self.keep_best or self.keep_last):
            raise InvalidArgument(
                "retention needs keep_best (--keep-best N) or keep_last (--keep-last N) of at least 1: "
                "without one every checkpoint would be removed (to remove whole experiments, use keepsake rm)"
            )
        if self.older_than is not None and self.older_than <= timedelta(0):
            raise InvalidArgument(f"older_than must be a positive duration, not {self.older_than}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep_best": self.keep_best,
            "keep_last": self.keep_last,
            "older_than_seconds": self.older_than.total_seconds() if self.older_than is not None else None,
            "include_running": self.include_running,
        }


@dataclass(frozen=True)
class RetainedCheckpoint:
    """A checkpoint in the report: kept (with ``reasons``) or removed (no reasons)."""

    id: ObjectId
    step: int | None
    created: str
    reasons: tuple[str, ...] = ()

    def to_dict(self, with_reasons: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "step": self.step, "created": self.created}
        if with_reasons:
            out["reasons"] = list(self.reasons)
        return out


@dataclass
class ExperimentRetention:
    """The plan, then the outcome, for one experiment."""

    experiment: ObjectId
    status: str
    #: why the experiment was left alone (running, no primary metric, ...), else None
    skipped: str | None = None
    kept: list[RetainedCheckpoint] = field(default_factory=list)
    removed: list[RetainedCheckpoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "status": self.status,
            "skipped": self.skipped,
            "kept": [c.to_dict() for c in self.kept],
            "removed": [c.to_dict(with_reasons=False) for c in self.removed],
        }


@dataclass
class RetentionReport:
    """What retention kept and removed (or, with ``dry_run``, would remove), per experiment."""

    policy: RetentionPolicy
    dry_run: bool
    experiments: list[ExperimentRetention] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(len(e.removed) for e in self.experiments)

    @property
    def kept(self) -> int:
        return sum(len(e.kept) for e in self.experiments)

    @property
    def skipped(self) -> list[ExperimentRetention]:
        return [e for e in self.experiments if e.skipped]

    def removals(self) -> dict[ObjectId, set[ObjectId]]:
        """experiment id -> checkpoint ids to remove (experiments with nothing to remove left out)."""
        return {e.experiment: {c.id for c in e.removed} for e in self.experiments if e.removed}

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "policy": self.policy.to_dict(),
            "checkpoints_kept": self.kept,
            "checkpoints_removed": self.removed,
            "experiments_skipped": len(self.skipped),
            "experiments": [e.to_dict() for e in self.experiments],
        }


def _retained(checkpoint: Checkpoint, reasons: Iterable[str] = ()) -> RetainedCheckpoint:
    return RetainedCheckpoint(checkpoint.id, checkpoint.step, checkpoint._summary.created, tuple(reasons))


def best_checkpoints(experiment: Experiment, n: int) -> list[Checkpoint]:
    """The ``n`` checkpoints with the best values of the experiment's primary metric.

    Ranked as :meth:`Experiment.best` ranks: checkpoints without a number for the metric
    (or with NaN) are not ranked, and ties go to the older checkpoint, so the checkpoint
    ``best()`` returns is always the first one kept.
    """
    primary = experiment.primary_metric()
    if primary is None or n <= 0:
        return []
    name, goal = primary
    scored = [c for c in experiment.checkpoints if is_number(c.metrics.get(name)) and not math.isnan(c.metrics[name])]
    # sorted() is stable in both directions, so equal values keep their (oldest first) order
    return sorted(scored, key=lambda c: c.metrics[name], reverse=goal == "maximize")[:n]


def last_checkpoints(experiment: Experiment, n: int) -> list[Checkpoint]:
    """The ``n`` checkpoints with the highest steps; equal steps (or none) by creation time.

    Steps come first because they say how far training got: a run resumed from an earlier
    checkpoint writes steps again, and its newest file is not always its furthest.
    """
    if n <= 0:
        return []
    ordered = sorted(
        enumerate(experiment.checkpoints),
        key=lambda ic: (ic[1].step is not None, ic[1].step or 0, ic[1]._summary.created, ic[0]),
    )
    return [c for _, c in ordered[-n:]]


def plan_experiment(
    experiment: Experiment, policy: RetentionPolicy, tagged: set[ObjectId], now: datetime
) -> ExperimentRetention:
    """Decide, for one experiment, which checkpoints stay and which go.

    Args:
        tagged: ids that tags point at; a tag on the experiment keeps all its checkpoints.
        now: the time ``older_than`` counts back from (timezone-aware).
    """
    plan = ExperimentRetention(experiment.id, experiment.status)
    checkpoints = experiment.checkpoints
    if not checkpoints:
        return plan
    if experiment.status == "running" and not policy.include_running:
        plan.skipped = "running: its own process rewrites its head"
    elif not policy.keep_last and experiment.primary_metric() is None:
        plan.skipped = "no primary metric to rank by (add keep_last / --keep-last to thin it)"
    if plan.skipped:
        plan.kept = [_retained(c) for c in checkpoints]
        return plan
    reasons: dict[ObjectId, list[str]] = {c.id: [] for c in checkpoints}
    for c in best_checkpoints(experiment, policy.keep_best or 0):
        reasons[c.id].append("best")
    for c in last_checkpoints(experiment, policy.keep_last or 0):
        reasons[c.id].append("last")
    whole = experiment.id in tagged
    cutoff = now - policy.older_than if policy.older_than is not None else None
    for c in checkpoints:
        if whole or c.id in tagged:
            reasons[c.id].append("tagged")
        if cutoff is not None and c.created > cutoff:
            reasons[c.id].append("recent")
    for c in checkpoints:
        if reasons[c.id]:
            plan.kept.append(_retained(c, sorted(reasons[c.id], key=REASONS.index)))
        else:
            plan.removed.append(_retained(c))
    return plan


def plan_retention(
    experiments: Iterable[Experiment], tags: Mapping[str, ObjectId], policy: RetentionPolicy, now: datetime
) -> RetentionReport:
    """The retention plan for every experiment, as a dry-run report (nothing is changed)."""
    tagged = set(tags.values())
    report = RetentionReport(policy, dry_run=True)
    report.experiments = [plan_experiment(e, policy, tagged, now) for e in experiments]
    return report
