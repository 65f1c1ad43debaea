"""Experiment summaries: what listing needs, one small file per experiment (FORMAT.md §14).

``summaries/<experiment id>`` is derived data: it is rebuilt from the head, experiment and
checkpoint objects whenever it is missing or names a different head than the ref does.
Only the experiment's own process writes it (at start, at each checkpoint, on every
heartbeat, at stop), so it needs no locking.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from keepsake.errors import CorruptObject, KeyNotFound
from keepsake.objects.ids import ObjectId, ObjectType, id_from_bytes, id_to_bytes
from keepsake.objects.records import CheckpointRecord, ExperimentRecord, HeadRecord
from keepsake.objects.values import pack_values, unpack_values
from keepsake.repository import Repository

SUMMARY_VERSION = 1
PREFIX = "summaries/"


def summary_key(experiment_id: str) -> str:
    return PREFIX + experiment_id


@dataclass(frozen=True)
class CheckpointSummary:
    id: ObjectId
    step: int | None
    created: str
    metrics: dict[str, Any]
    primary_metric: tuple[str, str] | None
    path: str | None

    @classmethod
    def of(cls, object_id: ObjectId, record: CheckpointRecord) -> CheckpointSummary:
        return cls(object_id, record.step, record.created, record.metrics, record.primary_metric, record.path)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": id_to_bytes(self.id),
            "step": self.step,
            "created": self.created,
            "metrics": self.metrics,
            "primary_metric": list(self.primary_metric) if self.primary_metric else None,
            "path": self.path,
        }

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> CheckpointSummary:
        pm = doc.get("primary_metric")
        return cls(
            id_from_bytes(doc["id"]),
            doc.get("step"),
            doc["created"],
            doc.get("metrics") or {},
            (pm[0], pm[1]) if pm else None,
            doc.get("path"),
        )


@dataclass(frozen=True)
class Summary:
    """Everything ``ls`` shows about one experiment."""

    experiment: ObjectId
    head: ObjectId
    status: str
    created: str
    user: str
    host: str
    command: tuple[str, ...]
    params: dict[str, Any]
    path: str | None
    git: dict[str, Any] | None
    checkpoints: tuple[CheckpointSummary, ...] = ()
    heartbeat: float | None = None
    #: recorded from the command line (keepsake experiment start): no heartbeats expected
    detached: bool = False

    def encode(self) -> bytes:
        return pack_values(
            {
                "version": SUMMARY_VERSION,
                "experiment": id_to_bytes(self.experiment),
                "head": id_to_bytes(self.head),
                "status": self.status,
                "created": self.created,
                "user": self.user,
                "host": self.host,
                "command": list(self.command),
                "params": self.params,
                "path": self.path,
                "git": self.git,
                "checkpoints": [c.to_wire() for c in self.checkpoints],
                "heartbeat": self.heartbeat,
                "detached": self.detached,
            }
        )

    @classmethod
    def decode(cls, data: bytes, key: str) -> Summary:
        doc = unpack_values(data, key)
        try:
            if doc["version"] != SUMMARY_VERSION:
                raise ValueError(f"summary version {doc['version']}")
            return cls(
                experiment=id_from_bytes(doc["experiment"]),
                head=id_from_bytes(doc["head"]),
                status=doc["status"],
                created=doc["created"],
                user=doc["user"],
                host=doc["host"],
                command=tuple(doc["command"]),
                params=doc["params"],
                path=doc["path"],
                git=doc["git"],
                checkpoints=tuple(CheckpointSummary.from_wire(c) for c in doc["checkpoints"]),
                heartbeat=doc.get("heartbeat"),
                detached=bool(doc.get("detached", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptObject(key, f"summary is malformed: {exc}") from exc

    @classmethod
    def of(
        cls,
        experiment_id: ObjectId,
        experiment: ExperimentRecord,
        head_id: ObjectId,
        head: HeadRecord,
        checkpoints: tuple[CheckpointSummary, ...],
        heartbeat: float | None = None,
    ) -> Summary:
        return cls(
            experiment=experiment_id,
            head=head_id,
            status=head.status,
            created=experiment.created,
            user=experiment.user,
            host=experiment.host,
            command=experiment.command,
            params=experiment.params,
            path=experiment.path,
            git=experiment.git,
            checkpoints=checkpoints,
            heartbeat=heartbeat,
        )

    def with_heartbeat(self, when: float) -> Summary:
        return replace(self, heartbeat=when)


@dataclass
class SummaryCache:
    """Reads summaries, rebuilding any that are missing or stale from the objects."""

    repo: Repository
    rebuilt: list[ObjectId] = field(default_factory=list)

    def load(self, experiment_id: ObjectId, head_id: ObjectId) -> Summary:
        key = summary_key(experiment_id)
        old: Summary | None = None
        try:
            old = Summary.decode(self.repo.storage.read(key), key)
            if old.head == head_id:
                return old
        except (KeyNotFound, CorruptObject):
            pass  # missing or damaged derived data: rebuilt below
        self.rebuilt.append(experiment_id)
        summary = build_summary(self.repo, head_id, old.heartbeat if old else None)
        return replace(summary, detached=old.detached) if old else summary


def build_summary(repo: Repository, head_id: ObjectId, heartbeat: float | None = None) -> Summary:
    """Build a summary from the objects a head names."""
    head = HeadRecord.decode(repo.objects.get(head_id, ObjectType.HEAD), head_id)
    experiment = ExperimentRecord.decode(repo.objects.get(head.experiment, ObjectType.EXPERIMENT), head.experiment)
    checkpoints = tuple(
        CheckpointSummary.of(cid, CheckpointRecord.decode(repo.objects.get(cid, ObjectType.CHECKPOINT), cid))
        for cid in head.checkpoints
    )
    return Summary.of(head.experiment, experiment, head_id, head, checkpoints, heartbeat)
