"""What experiments cost in storage: unchanged code is stored once, and a checkpoint of a
partly changed file adds about the changed bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keepsake.maintenance import count_objects
from keepsake.tracking.project import Project
from tests.tracking.conftest import assert_fsck_clean, reader


def test_re_recording_unchanged_code_adds_no_content(project: Project) -> None:
    (Path(project.directory) / "weights.bin").write_bytes(np.random.default_rng(0).bytes(600_000))  # chunked
    first = project.start_experiment(path=".", params={"run": 1})
    first.stop()
    before = count_objects(project.repo)
    second = project.start_experiment(path=".", params={"run": 2})
    second.stop()
    after = count_objects(project.repo)

    assert before.objects["chunk"] > 1
    assert first.code == second.code
    for kind in ("chunk", "blob", "tree"):
        assert after.objects[kind] == before.objects[kind], kind
    assert after.unique_bytes == before.unique_bytes
    assert after.objects["experiment"] == before.objects["experiment"] + 1
    assert_fsck_clean(project.repo)


def test_checkpoints_of_a_partly_changed_file_add_about_the_changed_bytes(project: Project) -> None:
    mib = 1 << 20
    rng = np.random.default_rng(42)
    tensors = [rng.standard_normal(mib // 4).astype(np.float32) for _ in range(32)]  # 32 x 1 MiB
    path = Path(project.directory) / "model.bin"
    e = project.start_experiment(path=None)
    path.write_bytes(b"".join(t.tobytes() for t in tensors))
    e.checkpoint(path="model.bin", metrics={"round": 0})
    assert e.sync()
    growth = []
    for round_ in (1, 2):
        before = count_objects(project.repo).unique_bytes
        changed = rng.choice(32, size=3, replace=False)  # ~10% of the tensors
        for i in changed:
            tensors[i] = tensors[i] + rng.standard_normal(mib // 4).astype(np.float32) * 1e-3
        path.write_bytes(b"".join(t.tobytes() for t in tensors))
        e.checkpoint(path="model.bin", metrics={"round": round_})
        assert e.sync()
        growth.append(count_objects(project.repo).unique_bytes - before)
    e.stop()

    changed_bytes = 3 * mib
    for added in growth:
        assert changed_bytes * 0.9 <= added <= changed_bytes * 1.3, (added / changed_bytes, growth)
    got = reader(project).get(e.id)
    with got.checkpoints[2].open("model.bin") as f:
        assert f.read() == path.read_bytes()
    with got.checkpoints[0].open("model.bin") as f:
        first = f.read()
    assert len(first) == 32 * mib and first != path.read_bytes()
    assert_fsck_clean(project.repo)
