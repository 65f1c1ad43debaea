"""Experiment, checkpoint and head records and summaries: encoding, ids, validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from keepsake.errors import CorruptObject
from keepsake.objects.ids import ObjectId, ObjectType, hash_object
from keepsake.objects.records import CheckpointRecord, ExperimentRecord, HeadRecord, referenced_ids
from keepsake.objects.values import pack_values, unpack_values
from keepsake.tracking.summary import CheckpointSummary, Summary

A = ObjectId("a" * 32)
B = ObjectId("b" * 32)
C = ObjectId("c" * 32)


def _experiment(**changes: Any) -> ExperimentRecord:
    fields: dict[str, Any] = dict(
        created="2026-01-02T03:04:05.000006+00:00",
        nonce="00112233",
        params={"lr": 0.1, "w": np.arange(3, dtype=np.float32)},
        user="ana",
        host="box",
        command=("train.py", "--fast"),
        python_version="3.11.7",
        python_packages={"numpy": "2.0"},
        git={"commit": "abc", "branch": "main", "dirty": False},
        keepsake_version="0.1",
        path=".",
        code=A,
        config={"repository": "/r"},
    )
    fields.update(changes)
    return ExperimentRecord(**fields)


def test_experiment_record_round_trips_and_its_id_is_its_hash() -> None:
    record = _experiment()
    data = record.encode()
    assert record.id == hash_object(ObjectType.EXPERIMENT, data)
    back = ExperimentRecord.decode(data, record.id)
    assert back.encode() == data
    assert back.command == ("train.py", "--fast") and back.code == A and back.git == record.git
    assert np.array_equal(back.params["w"], record.params["w"])
    assert _experiment(nonce="other").id != record.id  # the nonce makes every run unique
    minimal = ExperimentRecord(created="t", nonce="n")
    assert ExperimentRecord.decode(minimal.encode()) == minimal


def test_checkpoint_and_head_records_round_trip() -> None:
    checkpoint = CheckpointRecord(A, "t", 3, {"loss": 0.5}, ("loss", "minimize"), "model.pt", B, C)
    back = CheckpointRecord.decode(checkpoint.encode())
    assert back == checkpoint
    assert checkpoint.id == hash_object(ObjectType.CHECKPOINT, checkpoint.encode())
    bare = CheckpointRecord(A, "t")
    assert CheckpointRecord.decode(bare.encode()) == bare
    head = HeadRecord(A, (B, C), "running", "t")
    assert HeadRecord.decode(head.encode()) == head
    assert HeadRecord.decode(HeadRecord(A, (), "failed", "t").encode()).checkpoints == ()
    assert head.id != HeadRecord(A, (C, B), "running", "t").id  # order matters


def test_referenced_ids_follow_ownership_not_history() -> None:
    assert referenced_ids(ObjectType.EXPERIMENT, _experiment().encode(), "x") == [(A, ObjectType.TREE)]
    assert referenced_ids(ObjectType.EXPERIMENT, _experiment(code=None).encode(), "x") == []
    checkpoint = CheckpointRecord(A, "t", files=B, parent=C)
    assert referenced_ids(ObjectType.CHECKPOINT, checkpoint.encode(), "x") == [(A, ObjectType.EXPERIMENT), (B, ObjectType.TREE)]
    head = HeadRecord(A, (B, C), "stopped", "t")
    assert referenced_ids(ObjectType.HEAD, head.encode(), "x") == [
        (A, ObjectType.EXPERIMENT),
        (B, ObjectType.CHECKPOINT),
        (C, ObjectType.CHECKPOINT),
    ]


def _repack(record: Any, **changes: Any) -> bytes:
    doc = unpack_values(record.encode(), "x")
    doc.update(changes)
    return pack_values(doc)


@pytest.mark.parametrize(
    ("decode", "data"),
    [
        (ExperimentRecord.decode, pack_values([1, 2])),
        (ExperimentRecord.decode, b"\xc1"),
        (ExperimentRecord.decode, _repack(_experiment(), created=5)),
        (ExperimentRecord.decode, _repack(_experiment(), command="train.py")),
        (ExperimentRecord.decode, _repack(_experiment(), git=["x"])),
        (ExperimentRecord.decode, _repack(_experiment(), params=[1])),
        (ExperimentRecord.decode, _repack(_experiment(), code=b"short")),
        (CheckpointRecord.decode, _repack(CheckpointRecord(A, "t"), step=1.5)),
        (CheckpointRecord.decode, _repack(CheckpointRecord(A, "t"), step=True)),
        (CheckpointRecord.decode, _repack(CheckpointRecord(A, "t"), primary_metric={"name": "l", "goal": "lowest"})),
        (CheckpointRecord.decode, _repack(CheckpointRecord(A, "t"), experiment=None)),
        (CheckpointRecord.decode, _repack(CheckpointRecord(A, "t"), metrics="x")),
        (HeadRecord.decode, _repack(HeadRecord(A, (B,), "running", "t"), status="done")),
        (HeadRecord.decode, _repack(HeadRecord(A, (B,), "running", "t"), checkpoints=b"\0" * 17)),
        (HeadRecord.decode, _repack(HeadRecord(A, (B,), "running", "t"), updated=None)),
    ],
)
def test_malformed_records_are_corrupt(decode: Any, data: bytes) -> None:
    with pytest.raises(CorruptObject):
        decode(data, "deadbeef")


def test_summary_round_trips_and_rejects_garbage() -> None:
    checkpoints = (
        CheckpointSummary(B, 0, "t0", {"loss": float("inf")}, ("loss", "minimize"), "m.pt"),
        CheckpointSummary(C, None, "t1", {}, None, None),
    )
    summary = Summary(A, B, "running", "t", "u", "h", ("a", "b"), {"x": [1, 2]}, ".", None, checkpoints, 12.5, True)
    assert Summary.decode(summary.encode(), "k") == summary
    with pytest.raises(CorruptObject):
        Summary.decode(pack_values({"version": 1}), "k")
    with pytest.raises(CorruptObject):
        Summary.decode(pack_values({**unpack_values(summary.encode(), "k"), "version": 99}), "k")
    with pytest.raises(CorruptObject):
        Summary.decode(b"\xc1garbage", "k")
