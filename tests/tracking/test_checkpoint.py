"""Experiment.checkpoint(): paths, steps, snapshots, metrics, and errors raised at once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from keepsake.errors import InvalidArgument, ObjectNotFound, PathNotFound, UnsupportedValue
from keepsake.tracking.project import Project
from tests.tracking.conftest import assert_fsck_clean, reader


def test_checkpoint_paths_are_relative_to_the_project_directory(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = Path(project.directory)
    (directory / "runs" / "a").mkdir(parents=True)
    (directory / "runs" / "a" / "w.bin").write_bytes(b"weights")
    (directory / "runs" / "a" / "opt.bin").write_bytes(b"optimizer")
    monkeypatch.chdir(tmp_path)  # the cwd does not matter
    e = project.start_experiment(path=None)
    as_file = e.checkpoint(path="runs/a/w.bin")
    as_dir = e.checkpoint(path="runs/a")
    absolute = e.checkpoint(path=str(directory / "data.bin"))
    dotted = e.checkpoint(path="./pkg/../train.py")
    none = e.checkpoint(metrics={"x": 1})
    e.stop()

    assert [c.path for c in (as_file, as_dir, absolute, dotted, none)] == ["runs/a/w.bin", "runs/a", "data.bin", "train.py", None]
    got = reader(project).get(e.id).checkpoints
    with got[0].open("runs/a/w.bin") as f:
        assert f.read() == b"weights"
    with pytest.raises(ObjectNotFound):
        got[0].open("runs/a/opt.bin")  # only the path given is saved
    with got[1].open("runs/a/opt.bin") as f:
        assert f.read() == b"optimizer"
    with got[2].open("data.bin") as f:
        assert f.read() == (directory / "data.bin").read_bytes()
    with got[3].open("train.py") as f:
        assert f.read() == b"print('training')\n"
    assert got[4].files is None
    with pytest.raises(ObjectNotFound):
        got[4].open("train.py")


def test_a_file_whose_name_starts_with_two_dots_is_inside_the_project(project: Project) -> None:
    (Path(project.directory) / "..weights").write_bytes(b"w")
    e = project.start_experiment(path=None)
    checkpoint = e.checkpoint(path="..weights")
    e.stop()
    assert checkpoint.path == "..weights"
    with reader(project).get(e.id).checkpoints[0].open("..weights") as f:
        assert f.read() == b"w"


def test_steps_count_up_and_follow_an_explicit_step(project: Project) -> None:
    e = project.start_experiment(path=None)
    steps = [e.checkpoint().step, e.checkpoint().step, e.checkpoint(step=10).step, e.checkpoint().step]
    steps.append(e.checkpoint(step=np.int64(20)).step)  # type: ignore[arg-type]
    steps.append(e.checkpoint().step)
    e.stop()
    assert steps == [0, 1, 10, 11, 20, 21]
    got = reader(project).get(e.id)
    assert [c.step for c in got.checkpoints] == steps
    assert all(type(c.step) is int for c in got.checkpoints)


def test_the_snapshot_is_taken_before_checkpoint_returns(project: Project) -> None:
    path = Path(project.directory) / "model.pt"
    old = os.urandom(300_000)
    path.write_bytes(old)
    e = project.start_experiment(path=None)
    first = e.checkpoint(path="model.pt", metrics={"loss": 1.0})
    # overwritten in place (same inode) right away, then replaced by a new file
    with open(path, "r+b") as f:
        f.write(b"\0" * 300_000)
    with first.open("model.pt") as f:
        assert f.read() == old
    path.write_bytes(b"new")
    second = e.checkpoint(path="model.pt")
    path.unlink()
    e.stop()
    got = reader(project).get(e.id).checkpoints
    with got[0].open("model.pt") as f:
        assert f.read() == old
    with got[1].open("model.pt") as f:
        assert f.read() == b"new"
    assert second.files != first.files
    assert_fsck_clean(reader(project).repo)


def test_primary_metric_is_validated(project: Project) -> None:
    e = project.start_experiment(path=None)
    with pytest.raises(InvalidArgument, match="'lowest'"):
        e.checkpoint(metrics={"loss": 1.0}, primary_metric=("loss", "lowest"))
    with pytest.raises(InvalidArgument, match="'val_loss' is not among the metrics"):
        e.checkpoint(metrics={"loss": 1.0}, primary_metric=("val_loss", "minimize"))
    with pytest.raises(InvalidArgument, match="none given"):
        e.checkpoint(primary_metric=("loss", "minimize"))
    with pytest.raises(InvalidArgument, match=r"\(name, goal\) pair"):
        e.checkpoint(metrics={"loss": 1.0}, primary_metric="loss")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"\(name, goal\) pair"):
        e.checkpoint(metrics={"loss": 1.0}, primary_metric=("loss",))  # type: ignore[arg-type]
    ok = e.checkpoint(metrics={"loss": 1.0}, primary_metric=["loss", "maximize"])  # type: ignore[arg-type]
    assert ok.primary_metric == ("loss", "maximize")
    e.stop()
    got = reader(project).get(e.id)
    assert len(got.checkpoints) == 1  # the refused calls recorded nothing
    assert got.checkpoints[0].step == 0


def test_programming_errors_raise_at_once(project: Project, tmp_path: Path) -> None:
    (tmp_path / "outside.bin").write_bytes(b"x")
    e = project.start_experiment(path=None)
    with pytest.raises(PathNotFound, match="missing.pt"):
        e.checkpoint(path="missing.pt")
    with pytest.raises(PathNotFound, match="inside the project directory"):
        e.checkpoint(path="../outside.bin")
    with pytest.raises(PathNotFound, match="inside the project directory"):
        e.checkpoint(path=str(tmp_path / "outside.bin"))
    with pytest.raises(PathNotFound, match="inside the project directory"):
        e.checkpoint(path=".")
    with pytest.raises(InvalidArgument, match="metrics must be a dict"):
        e.checkpoint(metrics=[("loss", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="metrics must be a dict"):
        e.checkpoint(metrics=0.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="step must be an integer"):
        e.checkpoint(step=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="step must be an integer"):
        e.checkpoint(step=True)
    with pytest.raises(UnsupportedValue, match=r"metrics\['bad'\]"):
        e.checkpoint(metrics={"bad": object()})
    e.stop()
    assert reader(project).get(e.id).checkpoints == []

    with pytest.raises(InvalidArgument, match="is stopped"):
        e.checkpoint(metrics={"loss": 1.0})
    read_only = reader(project).get(e.id)
    with pytest.raises(InvalidArgument, match="read from the repository"):
        read_only.checkpoint(metrics={"loss": 1.0})
    read_only.stop()  # stopping a read-only experiment changes nothing
    assert reader(project).get(e.id).status == "stopped"
    with pytest.raises(InvalidArgument, match="params must be a dict"):
        project.start_experiment(path=None, params="lr=0.1")  # type: ignore[arg-type]
    assert len(reader(project).list()) == 1


def test_checkpoint_of_a_directory_skips_nothing_but_the_always_skipped(project: Project) -> None:
    d = Path(project.directory) / "ckpt"
    (d / "__pycache__").mkdir(parents=True)
    (d / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (d / "weights.bin").write_bytes(b"w" * 10_000)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("x")
    e = project.start_experiment(path=None)
    c = e.checkpoint(path="ckpt")
    e.stop()
    out = Path(project.directory).parent / "restored"
    assert c.checkout(str(out)) == 2
    assert (out / "ckpt" / "weights.bin").read_bytes() == b"w" * 10_000
    assert (out / "ckpt" / "__pycache__" / "x.pyc").read_bytes() == b"\0"
    assert not (out / "ckpt" / ".git").exists()
