"""Tracking records: experiment, checkpoint and head objects (FORMAT.md §14).

Like manifests they are immutable values keyed by the hash of their canonical msgpack.
An experiment's id is the id of its experiment record (unique: it holds a creation time and
a random nonce). A head lists an experiment's live checkpoints and its status; the ref
``experiments/<id>`` points at the newest head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from keepsake.errors import CorruptObject
from keepsake.objects.ids import ID_BYTES, ObjectId, ObjectType, hash_object, id_from_bytes, id_to_bytes
from keepsake.objects.manifests import Blob, Tree
from keepsake.objects.values import pack_values, unpack_values

GOALS = ("minimize", "maximize")
STATUSES = ("running", "stopped", "failed")


def _opt_id(value: ObjectId | None) -> bytes | None:
    return id_to_bytes(value) if value else None


def _read_id(doc: dict[str, Any], key: str, object_id: str, optional: bool = True) -> ObjectId | None:
    raw = doc.get(key)
    if raw is None and optional:
        return None
    if not (isinstance(raw, bytes) and len(raw) == ID_BYTES):
        raise CorruptObject(object_id, f"field {key!r} is not an object id")
    return id_from_bytes(raw)


def _map(data: bytes, object_id: str, kind: str) -> dict[str, Any]:
    doc = unpack_values(data, object_id)
    if not isinstance(doc, dict):
        raise CorruptObject(object_id, f"{kind} record is not a map")
    return doc


def _str(doc: dict[str, Any], key: str, object_id: str, optional: bool = False) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise CorruptObject(object_id, f"field {key!r} is not a string")
    return value


def _dict(doc: dict[str, Any], key: str, object_id: str) -> dict[str, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise CorruptObject(object_id, f"field {key!r} is not a map")
    return value


@dataclass(frozen=True)
class ExperimentRecord:
    """What was run: parameters, code and environment. Never changes once written."""

    TYPE: ClassVar[ObjectType] = ObjectType.EXPERIMENT

    created: str
    nonce: str
    params: dict[str, Any] = field(default_factory=dict)
    user: str = ""
    host: str = ""
    command: tuple[str, ...] = ()
    python_version: str = ""
    python_packages: dict[str, str] = field(default_factory=dict)
    git: dict[str, Any] | None = None
    keepsake_version: str = ""
    path: str | None = None
    code: ObjectId | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return pack_values(
            {
                "created": self.created,
                "nonce": self.nonce,
                "params": self.params,
                "user": self.user,
                "host": self.host,
                "command": list(self.command),
                "python_version": self.python_version,
                "python_packages": self.python_packages,
                "git": self.git,
                "keepsake_version": self.keepsake_version,
                "path": self.path,
                "code": _opt_id(self.code),
                "config": self.config,
            }
        )

    @property
    def id(self) -> ObjectId:
        return hash_object(self.TYPE, self.encode())

    @classmethod
    def decode(cls, data: bytes, object_id: str = "?") -> ExperimentRecord:
        doc = _map(data, object_id, "experiment")
        command = doc.get("command") or []
        git = doc.get("git")
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise CorruptObject(object_id, "field 'command' is not a list of strings")
        if git is not None and not isinstance(git, dict):
            raise CorruptObject(object_id, "field 'git' is not a map")
        return cls(
            created=_str(doc, "created", object_id),
            nonce=_str(doc, "nonce", object_id),
            params=_dict(doc, "params", object_id),
            user=_str(doc, "user", object_id),
            host=_str(doc, "host", object_id),
            command=tuple(command),
            python_version=_str(doc, "python_version", object_id),
            python_packages=_dict(doc, "python_packages", object_id),
            git=git,
            keepsake_version=_str(doc, "keepsake_version", object_id),
            path=_str(doc, "path", object_id, optional=True),
            code=_read_id(doc, "code", object_id),
            config=_dict(doc, "config", object_id),
        )


@dataclass(frozen=True)
class CheckpointRecord:
    """One saved state of an experiment: step, metrics, and a tree of the saved files."""

    TYPE: ClassVar[ObjectType] = ObjectType.CHECKPOINT

    experiment: ObjectId
    created: str
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    primary_metric: tuple[str, str] | None = None
    path: str | None = None
    files: ObjectId | None = None
    parent: ObjectId | None = None

    def encode(self) -> bytes:
        primary = {"name": self.primary_metric[0], "goal": self.primary_metric[1]} if self.primary_metric else None
        return pack_values(
            {
                "experiment": id_to_bytes(self.experiment),
                "created": self.created,
                "step": self.step,
                "metrics": self.metrics,
                "primary_metric": primary,
                "path": self.path,
                "files": _opt_id(self.files),
                "parent": _opt_id(self.parent),
            }
        )

    @property
    def id(self) -> ObjectId:
        return hash_object(self.TYPE, self.encode())

    @classmethod
    def decode(cls, data: bytes, object_id: str = "?") -> CheckpointRecord:
        doc = _map(data, object_id, "checkpoint")
        step = doc.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise CorruptObject(object_id, "field 'step' is not an integer")
        primary = doc.get("primary_metric")
        pm: tuple[str, str] | None = None
        if primary is not None:
            if not (isinstance(primary, dict) and isinstance(primary.get("name"), str) and primary.get("goal") in GOALS):
                raise CorruptObject(object_id, "field 'primary_metric' is malformed")
            pm = (primary["name"], primary["goal"])
        experiment = _read_id(doc, "experiment", object_id, optional=False)
        assert experiment is not None
        return cls(
            experiment=experiment,
            created=_str(doc, "created", object_id),
            step=step,
            metrics=_dict(doc, "metrics", object_id),
            primary_metric=pm,
            path=_str(doc, "path", object_id, optional=True),
            files=_read_id(doc, "files", object_id),
            parent=_read_id(doc, "parent", object_id),
        )


@dataclass(frozen=True)
class HeadRecord:
    """An experiment's current state: its live checkpoints (oldest first) and status."""

    TYPE: ClassVar[ObjectType] = ObjectType.HEAD

    experiment: ObjectId
    checkpoints: tuple[ObjectId, ...]
    status: str
    updated: str

    def encode(self) -> bytes:
        return pack_values(
            {
                "experiment": id_to_bytes(self.experiment),
                "checkpoints": b"".join(id_to_bytes(c) for c in self.checkpoints),
                "status": self.status,
                "updated": self.updated,
            }
        )

    @property
    def id(self) -> ObjectId:
        return hash_object(self.TYPE, self.encode())

    @classmethod
    def decode(cls, data: bytes, object_id: str = "?") -> HeadRecord:
        doc = _map(data, object_id, "head")
        raw = doc.get("checkpoints")
        if not isinstance(raw, bytes) or len(raw) % ID_BYTES:
            raise CorruptObject(object_id, "field 'checkpoints' is malformed")
        status = doc.get("status")
        if status not in STATUSES:
            raise CorruptObject(object_id, f"unknown status {status!r}")
        experiment = _read_id(doc, "experiment", object_id, optional=False)
        assert experiment is not None
        ids = tuple(id_from_bytes(raw[i : i + ID_BYTES]) for i in range(0, len(raw), ID_BYTES))
        return cls(experiment, ids, status, _str(doc, "updated", object_id))


def referenced_ids(object_type: ObjectType, content: bytes, object_id: str) -> list[tuple[ObjectId, ObjectType]]:
    """The objects that an object points at, with their expected types (for fsck and gc).

    A checkpoint's ``parent`` is history, not ownership: it is not followed, so removing a
    checkpoint from its head lets gc reclaim it.
    """
    out: list[tuple[ObjectId, ObjectType]] = []
    if object_type == ObjectType.BLOB:
        out = [(cid, ObjectType.CHUNK) for cid, _ in Blob.decode(content, object_id).chunks]
    elif object_type == ObjectType.TREE:
        for e in Tree.decode(content, object_id).entries:
            if e.id is not None:
                out.append((e.id, ObjectType.TREE if e.is_tree else ObjectType.BLOB))
    elif object_type == ObjectType.EXPERIMENT:
        exp = ExperimentRecord.decode(content, object_id)
        if exp.code:
            out.append((exp.code, ObjectType.TREE))
    elif object_type == ObjectType.CHECKPOINT:
        ckpt = CheckpointRecord.decode(content, object_id)
        out.append((ckpt.experiment, ObjectType.EXPERIMENT))
        if ckpt.files:
            out.append((ckpt.files, ObjectType.TREE))
    elif object_type == ObjectType.HEAD:
        head = HeadRecord.decode(content, object_id)
        out.append((head.experiment, ObjectType.EXPERIMENT))
        out.extend((c, ObjectType.CHECKPOINT) for c in head.checkpoints)
    return out
