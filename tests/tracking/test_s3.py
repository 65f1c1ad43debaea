"""The tracking API on S3 (a local moto server): the same flows as on local disk, small."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import keepsake
from keepsake.errors import ObjectNotFound
from keepsake.tracking.project import Project
from keepsake.tracking.summary import summary_key
from tests.servers import S3Server
from tests.tracking.conftest import assert_fsck_clean, reader, run_python

pytestmark = pytest.mark.remote


@pytest.fixture
def s3_project(s3_server: S3Server, project_dir: Path) -> Project:
    return Project(repository=s3_server.new_url("tracking"), directory=str(project_dir), storage_options=s3_server.storage_options)


def test_record_read_and_change_experiments_on_s3(s3_server: S3Server, project_dir: Path, tmp_path: Path) -> None:
    url = s3_server.new_url("tracking")
    options = s3_server.storage_options
    model = project_dir / "model.pt"
    payload = os.urandom(700_000)
    model.write_bytes(payload)

    e = keepsake.init(path=".", params={"lr": 0.1}, repository=url, directory=str(project_dir), storage_options=options)
    c0 = e.checkpoint(path="model.pt", metrics={"loss": 0.5}, primary_metric=("loss", "minimize"))
    model.write_bytes(b"second")
    c1 = e.checkpoint(path="model.pt", metrics={"loss": 0.2})
    e.sync()  # checkpoints upload in the background (FORMAT §18): wait before looking from elsewhere

    other = Project(repository=url, directory=str(project_dir), storage_options=options)
    [listed] = other.list()
    assert listed.id == e.id and listed.status == "running" and listed.params == {"lr": 0.1}
    other.remove_checkpoint(listed.checkpoints[1])  # while it runs
    c2 = e.checkpoint(path="model.pt", metrics={"loss": 0.3})  # merged over the removal
    e.stop()

    got = reader(other).get(e.id[:8])
    assert [c.id for c in got.checkpoints] == [c0.id, c2.id]
    assert c1.id not in [c.id for c in got.checkpoints]
    assert got.status == "stopped"
    assert got.best().id == c2.id  # type: ignore[union-attr]
    with got.checkpoints[0].open("model.pt") as f:
        assert f.read(1000) == payload[:1000]
        f.seek(650_000)
        assert f.read() == payload[650_000:]
        assert f.read(1) == b""
    out = tmp_path / "checkout"
    got.checkout(str(out))
    assert (out / "model.pt").read_bytes() == b"second"  # the best (latest primary) checkpoint over the code
    assert (out / "pkg" / "model.py").read_text() == "LAYERS = 3\n"

    other.repo.storage.delete(summary_key(e.id))  # derived data: rebuilt
    assert [c.id for c in reader(other).get(e.id).checkpoints] == [c0.id, c2.id]
    assert_fsck_clean(other.repo)

    second = keepsake.init(path=None, repository=url, directory=str(project_dir), storage_options=options)
    second.stop()
    reader(other).get(e.id).delete()
    assert [x.id for x in reader(other).list()] == [second.id]
    with pytest.raises(ObjectNotFound):
        reader(other).get(e.id)
    assert_fsck_clean(reader(other).repo)


def test_exit_hook_on_s3(s3_server: S3Server, project_dir: Path) -> None:
    url = s3_server.new_url("tracking")
    script = f"""
import json, keepsake
options = json.loads({json.dumps(json.dumps(s3_server.storage_options))})
e = keepsake.init(path=None, repository={url!r}, directory={str(project_dir)!r}, storage_options=options)
e.checkpoint(path="train.py", metrics={{"loss": 1.0}})
print(e.id)
raise SystemExit(0)
"""
    proc = run_python(script, cwd=project_dir)
    assert proc.returncode == 0, proc.stderr
    assert "could not record" not in proc.stderr
    project = Project(repository=url, directory=str(project_dir), storage_options=s3_server.storage_options)
    got = project.get(proc.stdout.strip())
    assert got.status == "stopped"
    with got.checkpoints[0].open("train.py") as f:
        assert f.read() == b"print('training')\n"
    assert_fsck_clean(project.repo)


def test_values_and_listing_on_s3(s3_project: Project) -> None:
    import numpy as np

    e = s3_project.start_experiment(path=None, params={"w": np.arange(4, dtype=np.int16), "nan": float("nan")})
    e.checkpoint(metrics={"loss": float("inf")})
    e.stop()
    [got] = reader(s3_project).list(filter="status = stopped")
    assert got.params["w"].dtype == np.int16 and got.params["w"].tolist() == [0, 1, 2, 3]
    assert got.params["nan"] != got.params["nan"]
    assert got.checkpoints[0].metrics == {"loss": float("inf")}
