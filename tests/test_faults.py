"""Fault tests: Keepsake over an S3 connection that fails a share of its requests.

tests/faultproxy.py sits between s3fs and the moto server and answers a seeded share of the
requests with 500/503, or resets the connection before or after forwarding them. Through it
we record experiments with checkpoints, list them, read them back, delete and thin them and
run gc. Every operation either succeeds or raises a StorageError (botocore retries 5xx and
connection errors up to 5 attempts, s3fs a few more kinds); whatever happened, afterwards,
straight against moto: fsck finds no damage, and every checkpoint whose ``checkpoint()``
returned is in its experiment, once, and reads back exactly. A follow-up gc changes none of
that.

Seeded (KEEPSAKE_FAULT_SEED); the seed fixes the fault mix, and the failure messages name
it. Which request draws which fate also depends on thread timing, so the conditional-write
faults get their own test where they are frequent enough to be hit on every run.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from keepsake import gc as gc_module
from keepsake.errors import KeepsakeError, StorageError
from keepsake.gc import collect_garbage
from keepsake.maintenance import fsck
from keepsake.repository import Repository
from keepsake.tracking.experiment import Experiment
from keepsake.tracking.project import Project
from keepsake.transfer import init_like, transfer
from tests.faultproxy import FaultProxy
from tests.servers import S3Server

SEED = int(os.environ.get("KEEPSAKE_FAULT_SEED", "20261126"))

pytestmark = [pytest.mark.slow, pytest.mark.remote]

_T = TypeVar("_T")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)


@dataclass
class Session:
    """One client working through the proxy, and what it saw succeed and fail."""

    server: S3Server
    proxy: FaultProxy
    url: str
    directory: Path
    rnd: random.Random
    #: checkpoint id -> (experiment id, step, sha256 of its file)
    completed: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    unclear: list[str] = field(default_factory=list)  # failures that were not a StorageError

    def options(self) -> dict[str, Any]:
        # its own s3fs instance: fsspec would otherwise share one client between proxy and
        # direct use only if the options matched, but be explicit
        return {**self.server.storage_options, "endpoint_url": self.proxy.endpoint_url, "skip_instance_cache": True}

    def project(self, direct: bool = False) -> Project:
        options = self.server.storage_options if direct else self.options()
        return Project(repository=self.url, directory=str(self.directory), storage_options=options)

    def attempt(self, what: str, call: Callable[[], _T]) -> _T | None:
        """Run ``call``; a StorageError is an acceptable outcome, anything else is not."""
        try:
            return call()
        except StorageError as exc:
            self.failures.append(f"{what}: {exc}")
        except KeepsakeError as exc:
            self.unclear.append(f"{what}: {type(exc).__name__}: {exc}")
        return None

    def context(self) -> str:
        return f"seed {SEED}, proxy {dict(sorted(self.proxy.counts.items()))}"

    def summary(self) -> str:
        return f"{self.context()}\n{len(self.failures)} StorageErrors:\n" + "\n".join(f"  {f[:200]}" for f in self.failures)


@pytest.fixture
def session(s3_server: S3Server, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Session]:
    proxy = FaultProxy(("127.0.0.1", s3_server.port), seed=SEED)
    directory = tmp_path / "project"
    directory.mkdir()
    s = Session(s3_server, proxy, s3_server.new_url("faults"), directory, random.Random(f"{SEED}-{request.node.name}"))
    yield s
    proxy.stop()
    print(f"\n{request.node.name}: {s.summary()}")  # shown with -s


def record(s: Session, experiments: int, checkpoints: int, project: Project | None = None) -> list[Experiment]:
    """Run ``experiments`` training loops (through the proxy unless ``project`` is given);
    files share most of their chunks from one checkpoint to the next."""
    pool = [s.rnd.randbytes(32 << 10) for _ in range(12)]
    started = []
    project = project or s.project()
    for n in range(experiments):
        experiment = s.attempt(f"start experiment {n}", lambda: project.start_experiment(path=None, params={"n": n}))
        if experiment is None:
            continue
        started.append(experiment)
        layout = [s.rnd.choice(pool) for _ in range(8)]
        for step in range(checkpoints):
            layout[s.rnd.randrange(len(layout))] = s.rnd.randbytes(32 << 10)
            data = b"".join(layout)
            (s.directory / "model.bin").write_bytes(data)
            exp = experiment
            c = s.attempt(
                f"checkpoint {step} of experiment {n}",
                lambda: exp.checkpoint(path="model.bin", step=step, metrics={"loss": 1 / (step + 1)}),
            )
            if c is not None:
                s.completed[c.id] = (experiment.id, step, hashlib.sha256(data).hexdigest())
        s.attempt(f"stop experiment {n}", experiment.stop)
    return started


def read_back(s: Session, project: Project, where: str) -> None:
    """Every completed checkpoint is in its experiment exactly once and reads back exactly.

    Through the proxy a read may fail with a StorageError, but never return wrong bytes."""
    through_proxy = where == "through the proxy"
    expected: dict[str, list[str]] = {}
    for checkpoint_id, (experiment_id, _, _) in s.completed.items():
        expected.setdefault(experiment_id, []).append(checkpoint_id)
    for experiment_id, ids in sorted(expected.items()):
        experiment = s.attempt("get", lambda: project.get(experiment_id)) if through_proxy else project.get(experiment_id)
        if experiment is None:
            continue
        listed = [c.id for c in experiment.checkpoints]
        assert len(listed) == len(set(listed)), f"{where}: experiment {experiment_id} lists a checkpoint twice: {listed} ({s.context()})"
        missing = set(ids) - set(listed)
        assert not missing, f"{where}: completed checkpoints {missing} were lost ({s.context()})"
        for c in experiment.checkpoints:
            if c.id not in s.completed:
                continue  # its checkpoint() failed, but the checkpoint landed: fine
            _, step, digest = s.completed[c.id]

            def read(c: Any = c) -> bytes:
                with c.open("model.bin") as f:
                    data: bytes = f.read()
                return data

            data = s.attempt(f"read {c.id}", read) if through_proxy else read()
            if data is not None:
                assert c.step == step and hashlib.sha256(data).hexdigest() == digest, f"{where}: checkpoint {c.id} reads back different bytes ({s.context()})"


def push(s: Session, source: Repository, options: dict[str, Any], what: str) -> bool:
    """Push ``source`` to the bucket through the proxy; False when a StorageError stopped it."""
    destination = s.attempt(f"open the bucket for {what}", lambda: init_like(s.url, options, source))
    if destination is None:
        return False
    with destination:
        return s.attempt(what, lambda: transfer(source, destination)) is not None


def check_directly(s: Session) -> None:
    """Straight against moto: no damage, nothing lost; then a gc, and the same again."""
    with Repository.open(s.url, s.server.storage_options) as repo:
        report = fsck(repo)
    damage = [p.line() for p in report.problems if p.kind in ("missing", "corrupt", "broken-ref")]
    assert not report.damaged, f"fsck found damage: {damage[:10]} ({s.context()})"
    project = s.project(direct=True)
    read_back(s, project, "directly")
    with pytest.MonkeyPatch.context() as mp:
        # markers and a gc lock left by calls that failed half way belong to no live
        # process now; do not wait out their real timeouts
        mp.setattr(gc_module, "MARKER_TIMEOUT", 0.0)
        mp.setattr(gc_module, "LOCK_TIMEOUT", 0.0)
        with Repository.open(s.url, s.server.storage_options) as repo:
            collect_garbage(repo, grace=0, wait=0)
    with Repository.open(s.url, s.server.storage_options) as repo:
        after = fsck(repo)
    assert not after.damaged, f"fsck after gc: {[p.line() for p in after.problems][:10]} ({s.context()})"
    read_back(s, s.project(direct=True), "directly, after gc")


def test_record_list_read_and_gc_through_failing_requests(session: Session) -> None:
    """12% of requests fail (500, 503, reset before or after forwarding), conditional
    writes excepted (see the next test): nothing is lost or damaged, and every failure that
    gets through the retries is a StorageError."""
    s = session
    s.proxy.rate = 0.12
    s.proxy.conditional_rate = 0.0
    experiments = record(s, experiments=3, checkpoints=3)
    project = s.project()
    s.attempt("list", lambda: project.list())
    read_back(s, project, "through the proxy")
    # garbage for gc: one experiment deleted, one thinned
    if experiments:
        s.attempt("delete", lambda: project.delete_experiment(experiments[0].id))
        s.completed = {k: v for k, v in s.completed.items() if v[0] != experiments[0].id}
    if len(experiments) > 1:
        thinned = s.attempt("get", lambda: project.get(experiments[1].id))
        if thinned is not None and thinned.checkpoints:
            first = thinned.checkpoints[0]
            # removed or not (the call may fail), it is no longer required to read back
            s.completed.pop(first.id, None)
            s.attempt("remove checkpoint", lambda: project.remove_checkpoint(first))
    with Repository.open(s.url, s.options()) as repo:
        s.attempt("gc", lambda: collect_garbage(repo, grace=0, wait=1.0))
    s.proxy.enabled = False
    assert sum(v for k, v in s.proxy.counts.items() if " " not in k and k != "pass") >= 10, s.context()
    check_directly(s)
    assert not s.unclear, f"failures that were not StorageErrors: {s.unclear} ({s.context()})"


def test_lost_answers_to_conditional_writes(session: Session) -> None:
    """Every conditional write (ref creation and swaps, the gc lock) is carried out by S3,
    but the answer to its first attempt is lost (reset after forwarding): botocore's retry
    then meets its own write. Keepsake must recognise its own write, not report a conflict."""
    s = session
    s.proxy.rate = 0.0
    s.proxy.lose_first_conditional_answer = True
    record(s, experiments=2, checkpoints=2)
    with Repository.open(s.url, s.options()) as repo:
        s.attempt("gc", lambda: collect_garbage(repo, grace=0, wait=1.0))
    s.proxy.enabled = False
    assert s.proxy.counts["reset-after"] >= 4, s.context()
    check_directly(s)
    assert not s.unclear, f"failures that were not StorageErrors: {s.unclear} ({s.context()})"


def test_push_through_failing_requests(session: Session, tmp_path: Path) -> None:
    """Push a local repository to the bucket while 12% of requests fail: each attempt
    succeeds or raises a StorageError, and a push with the network healed finishes the job."""
    s = session
    local = Project(repository=str(tmp_path / "local"), directory=str(s.directory))
    record(s, experiments=2, checkpoints=3, project=local)
    local.close()
    s.proxy.rate = 0.12
    s.proxy.conditional_rate = 0.0
    with Repository.open(str(tmp_path / "local")) as source:
        for n in range(3):
            if push(s, source, s.options(), f"push {n}"):
                break
        s.proxy.enabled = False
        with Repository.open(s.url, s.options()) as destination:
            assert not transfer(source, destination).refused
    assert not s.unclear, f"failures that were not StorageErrors: {s.unclear} ({s.context()})"
    check_directly(s)


def test_network_cut_in_the_middle_of_gc_and_push(session: Session, tmp_path: Path) -> None:
    """The connection dies for good at a seeded request of a gc run, or of a push: the call
    raises a StorageError, and once the network is back nothing is lost or damaged and the
    next run finishes the job (a gc lock left behind is taken over as if it had expired)."""
    s = session
    s.proxy.rate = 0.0
    local_url = str(tmp_path / "local")
    local = Project(repository=local_url, directory=str(s.directory))
    experiments = record(s, experiments=3, checkpoints=3, project=local)
    local.close()
    # no botocore retries (s3fs still retries connection errors 5 times): against an outage
    # they only wait
    options = {**s.options(), "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}}}
    with Repository.open(local_url) as source:
        cuts = 0
        for n in range(2):
            s.proxy.cut_after = s.rnd.randint(0, 40)
            if not push(s, source, options, f"push cut {n}"):
                cuts += 1
            s.proxy.heal()
            if n:
                with Repository.open(s.url, s.server.storage_options) as repo:
                    assert not fsck(repo).damaged, s.context()
        with Repository.open(s.url, s.server.storage_options) as destination:
            assert not transfer(source, destination).refused
    assert cuts, f"no push was cut ({s.context()})"
    # garbage at the bucket: an experiment deleted, another thinned (directly)
    direct = s.project(direct=True)
    direct.delete_experiment(experiments[0].id)
    s.completed = {k: v for k, v in s.completed.items() if v[0] != experiments[0].id}
    first = direct.get(experiments[1].id).checkpoints[0]
    direct.remove_checkpoint(first)
    s.completed.pop(first.id)
    cuts = 0
    for n in range(2):
        s.proxy.cut_after = s.rnd.randint(0, 60)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gc_module, "LOCK_TIMEOUT", 0.0)  # a cut gc cannot release its lock
            with Repository.open(s.url, options) as repo:
                if s.attempt(f"gc cut {n}", lambda: collect_garbage(repo, grace=0, wait=1.0)) is None:
                    cuts += 1
        s.proxy.heal()
        with Repository.open(s.url, s.server.storage_options) as repo:
            report = fsck(repo)
        assert not report.damaged, f"after gc cut {n}: {[p.line() for p in report.problems][:10]} ({s.context()})"
        read_back(s, s.project(direct=True), f"directly, after gc cut {n}")
    assert cuts, f"no gc was cut ({s.context()})"
    assert not s.unclear, f"failures that were not StorageErrors: {s.unclear} ({s.context()})"
    check_directly(s)
