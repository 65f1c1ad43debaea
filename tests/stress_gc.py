"""Writers checkpointing into one repository while gc --grace 0 runs in a loop.

Used by tests/test_stress.py (a short run) and scripts/stress-gc (a long one). Each writer
is a separate process that records experiments of a few checkpoints through the public API,
built from a shared pool of random blocks so that checkpoints of different writers share
chunks, and deletes about half of its experiments once they are stopped: gc always has
garbage to doom, and writers keep needing objects gc has just doomed. Every checkpoint that
returned is logged with the sha256 of its file; at the end fsck must be clean and every
logged checkpoint of a kept experiment must read back exactly.

Run one writer: ``python -m tests.stress_gc writer URL LOG SEED SECONDS``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: blocks shared by every writer: 24 x 96 KiB of random bytes
POOL = [random.Random(1000 + i).randbytes(96 << 10) for i in range(24)]


def run_writer(url: str, log_path: str, seed: int, seconds: float) -> None:
    import keepsake
    from keepsake.objects import database

    database.PACK_SIZE = 1 << 20  # many small packs: more for gc to sweep and repack
    rnd = random.Random(seed)
    deadline = time.monotonic() + seconds
    work = Path(tempfile.mkdtemp(prefix=f"stress-writer-{seed}-"))
    (work / "train.py").write_text(f"# writer {seed}\n")
    os.chdir(work)
    with open(log_path, "a") as log:

        def note(**doc: Any) -> None:
            log.write(json.dumps(doc) + "\n")
            log.flush()

        n = 0
        while time.monotonic() < deadline:
            experiment = keepsake.init(path=".", params={"writer": seed, "n": n}, repository=url)
            for step in range(3):
                content = b"".join(rnd.choice(POOL) for _ in range(6)) + rnd.randbytes(2000)
                (work / "model.bin").write_bytes(content)
                checkpoint = experiment.checkpoint(path="model.bin", step=step, metrics={"loss": rnd.random()})
                note(experiment=experiment.id, checkpoint=checkpoint.id, sha256=hashlib.sha256(content).hexdigest())
            experiment.stop()
            if rnd.random() < 0.5:
                note(deleting=experiment.id)
                experiment.delete()
            n += 1


@dataclass
class StressResult:
    seconds: float
    gc_rounds: int = 0
    dead_objects: int = 0
    deferred_rounds: int = 0
    checkpoints_written: int = 0
    checkpoints_checked: int = 0
    experiments_deleted: int = 0
    objects_checked: int = 0
    writer_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.seconds:.0f} s: {self.gc_rounds} gc rounds ({self.deferred_rounds} deferred), "
            f"{self.dead_objects} objects deleted, {self.checkpoints_written} checkpoints written, "
            f"{self.experiments_deleted} experiments deleted, {self.checkpoints_checked} checkpoints "
            f"read back, fsck checked {self.objects_checked} objects, problems: {len(self.problems)}"
        )


def run_stress(url: str, env: dict[str, str], writers: int = 4, seconds: float = 10.0) -> StressResult:
    """Run ``writers`` writer processes and a gc loop for ``seconds``, then verify."""
    from keepsake.gc import collect_garbage
    from keepsake.maintenance import fsck
    from keepsake.repository import Repository
    from keepsake.tracking.project import Project

    started = time.monotonic()
    result = StressResult(seconds)
    logs = Path(tempfile.mkdtemp(prefix="stress-logs-"))
    child_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    procs = []
    for seed in range(writers):
        cmd = [sys.executable, "-m", "tests.stress_gc", "writer", url, str(logs / f"{seed}.log"), str(seed), str(seconds)]
        procs.append(subprocess.Popen(cmd, cwd=str(ROOT), env=child_env, stderr=subprocess.PIPE, text=True))
    repo = Repository.open(url)
    while any(p.poll() is None for p in procs):
        report = collect_garbage(repo, grace=0, wait=20)
        result.gc_rounds += 1
        result.dead_objects += report.dead_objects
        result.deferred_rounds += bool(report.deferred_objects)
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            result.writer_errors.append(err[-2000:])
    # a last round after every writer stopped
    result.dead_objects += collect_garbage(repo, grace=0, wait=20).dead_objects
    result.gc_rounds += 1

    written: list[dict[str, str]] = []
    deleted: set[str] = set()
    for log in logs.glob("*.log"):
        for line in log.read_text().splitlines():
            doc = json.loads(line)
            if "deleting" in doc:
                deleted.add(doc["deleting"])
            else:
                written.append(doc)
    result.checkpoints_written = len(written)
    result.experiments_deleted = len(deleted)

    fresh = Repository.open(url)
    report = fsck(fresh)
    result.objects_checked = report.objects_checked
    result.problems += [p.line() for p in report.problems if p.kind != "unreachable"]
    project = Project(repository=url, directory=str(logs))
    for doc in written:
        if doc["experiment"] in deleted:
            continue
        experiment = project.get(doc["experiment"])
        checkpoint = next((c for c in experiment.checkpoints if c.id == doc["checkpoint"]), None)
        if checkpoint is None:
            result.problems.append(f"checkpoint {doc['checkpoint']} of {doc['experiment']} is gone")
            continue
        with checkpoint.open("model.bin") as f:
            if hashlib.sha256(f.read()).hexdigest() != doc["sha256"]:
                result.problems.append(f"checkpoint {doc['checkpoint']} reads back different bytes")
        result.checkpoints_checked += 1
    project.close()
    result.seconds = time.monotonic() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("writer")
    w.add_argument("url")
    w.add_argument("log")
    w.add_argument("seed", type=int)
    w.add_argument("seconds", type=float)
    args = parser.parse_args()
    run_writer(args.url, args.log, args.seed, args.seconds)


if __name__ == "__main__":
    main()
