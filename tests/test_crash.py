"""Crash tests: SIGKILL a training loop, gc, index merges and push at random moments, then
check that nothing that was stored is lost or damaged (FORMAT.md §8, §11).

Each trial starts tests/crash_child.py and kills it with SIGKILL, either after a seeded
random delay or at a seeded storage mutation (the Nth write/create/swap/delete, just before
or just after it runs: every state a crash can leave lies between two mutations). After
each kill:

1. fsck finds nothing reachable missing or corrupt (unreachable garbage is fine);
2. every checkpoint the child saw complete (``checkpoint()`` returned) is still in its
   experiment and reads back byte for byte, with its step and metrics;
3. a follow-up ``gc --grace 0`` succeeds without waiting for the killed writers (their
   markers name a pid that is gone on this machine), leaves no unindexed pack and no
   marker, and 1. and 2. hold again. A killed gc's lock has no such check (it stays for
   LOCK_TIMEOUT): the follow-up gc takes it over as if it had expired.

One repository is shared by the trials of a test, so each trial starts from the state (and
the garbage) the earlier kills left. Seeded: KEEPSAKE_CRASH_SEED (default below) picks the
kill plans, sizes and removals; the seed is in every failure message. A kill at a planned
mutation replays exactly; a timed kill depends on the machine's speed, and so may every
later choice that depends on what earlier trials left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keepsake import gc as gc_module
from keepsake.errors import RepositoryNotFound
from keepsake.gc import collect_garbage
from keepsake.maintenance import fsck
from keepsake.repository import Repository
from keepsake.tracking.project import Project
from keepsake.tracking.journal import recover_journals
from keepsake.transfer import init_like, transfer

SEED = int(os.environ.get("KEEPSAKE_CRASH_SEED", "20261126"))
CHILD = Path(__file__).with_name("crash_child.py")
#: small packs: a checkpoint writes several, and gc has packs to repack and delete
PACK_SIZE = 256 << 10
#: the model file: 12 blocks of 128 KiB (1.5 MiB) from a shared pool, a fifth changing per step
BLOCKS = 12
BLOCK = 128 << 10
#: gc repacks packs under this live share (0.5 in Keepsake): more repacking to interrupt
REPACK_BELOW = 0.9

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)


@dataclass(frozen=True)
class Saved:
    """A checkpoint whose ``checkpoint()`` call returned in a child."""

    experiment: str
    checkpoint: str
    step: int
    path: str | None
    sha256: str | None
    metrics: dict[str, Any]


@dataclass
class Outcome:
    killed: bool
    hit: str  # what the kill interrupted, for the summary and failure messages
    saved: list[Saved]
    started: list[str]  # experiments the child created
    events: list[dict[str, Any]]


@dataclass
class Harness:
    """Runs children against one repository, kills them, and checks the repository."""

    root: Path
    name: str
    rnd: random.Random
    repo_url: str = ""
    trial: int = 0
    #: checkpoints that must read back: saved by a child, not removed by the test since
    live: dict[str, Saved] = field(default_factory=dict)
    experiments: set[str] = field(default_factory=set)
    #: per kind (and start event): the longest run, and the most storage mutations seen in
    #: a run not killed
    longest: dict[str, float] = field(default_factory=dict)
    most_ops: dict[str, int] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    #: what the follow-up gcs and finished gc children did, summed
    gc_totals: Counter[str] = field(default_factory=Counter)
    #: checkpoints stored from the journals of killed runs (recovery after a kill)
    journals_stored: int = 0
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.repo_url = str(self.root / "repo")

    def context(self, what: str) -> str:
        return f"seed {SEED} ({self.name}), trial {self.trial}, {what}"

    # -- running and killing ------------------------------------------------------------------

    def run(self, kind: str, config: dict[str, Any], ops_guess: int, time_guess: float) -> Outcome:
        """Start a child, kill it at a seeded moment, and return what it recorded."""
        self.trial += 1
        log_path = self.root / f"trial-{self.trial}.log"
        config = {**config, "log": str(log_path), "pack_size": PACK_SIZE, "trial": self.trial}
        by_op = self.rnd.random() < 0.5
        delay = 0.0
        start_at = "ready"
        if by_op:
            config["kill_op"] = self.rnd.randint(1, self.most_ops.get(kind, ops_guess))
            config["kill_when"] = self.rnd.choice(["before", "after"])
            plan = f"at mutation {config['kill_op']} ({config['kill_when']})"
        else:
            # mostly from the moment the experiment exists: its start (metadata capture, a
            # git subprocess) would otherwise take most of the kills
            if kind in ("checkpoint", "merge") and self.rnd.random() < 0.75:
                start_at = "started"
            delay = self.rnd.uniform(0, self.longest.get(f"{kind} from {start_at}", time_guess))
            plan = f"{delay:.3f} s after {start_at}"
        with open(self.root / f"trial-{self.trial}.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), json.dumps(config)], stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
            try:
                start = self._wait_for(proc, log_path, start_at)
                if not by_op:
                    try:
                        proc.wait(timeout=delay)
                    except subprocess.TimeoutExpired:
                        proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        elapsed = time.monotonic() - start
        events = _read_events(log_path)
        killed = proc.returncode == -signal.SIGKILL
        context = self.context(f"{kind} child killed {plan}")
        if not killed and proc.returncode != 0:
            stderr = (self.root / f"trial-{self.trial}.err").read_text(errors="replace")
            pytest.fail(f"{context}: the child failed with exit status {proc.returncode}:\n{stderr[-3000:]}")
        # the longest run seen (a killed one ran at least this long): timed kills fall
        # anywhere in it
        key = f"{kind} from {start_at}"
        self.longest[key] = max(self.longest.get(key, 0.0), elapsed)
        hit = _describe_hit(kind, killed, events)
        self.hits[hit] += 1
        if not killed:
            done = next(e for e in events if e["event"] == "done")
            self.most_ops[kind] = max(self.most_ops.get(kind, ops_guess), done["ops"])
            hit += f" ({done['ops']} mutations)"
        self.log.append(f"trial {self.trial}: {kind} killed {plan}: {hit}")
        for e in events:
            if e.get("phase") == "gc-report":
                self.gc_totals.update({f"killed-run {k}": v for k, v in e.items() if isinstance(v, int)})
        saved = [_saved(e) for e in events if e["event"] == "checkpoint"]
        started = [e["experiment"] for e in events if e.get("phase") == "started"]
        return Outcome(killed, hit, saved, started, events)

    def train(self, kind: str, ops_guess: int, time_guess: float, **config: Any) -> Outcome:
        """A training child (tests/crash_child.py, mode train) in a new project folder:
        ``config`` on top of the settings every training trial shares."""
        project = self.root / f"project-{self.trial + 1}"
        common = {"mode": "train", "repo": self.repo_url, "project": str(project), "seed": self.rnd.randrange(1 << 30), "pool_seed": SEED}
        return self.run(kind, {**common, **config}, ops_guess=ops_guess, time_guess=time_guess)

    def _wait_for(self, proc: subprocess.Popen[bytes], log_path: Path, event: str) -> float:
        """Wait until the child logs ``event`` ("ready" or "started"); returns the time."""
        needle = f'"{event}"'.encode()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log_path.exists() and needle in log_path.read_bytes():
                return time.monotonic()
            if proc.poll() is not None:
                return time.monotonic()  # ended (or killed itself) before saying ready
            time.sleep(0.005)
        pytest.fail(self.context("the child did not start within 60 s"))

    def record(self, outcome: Outcome) -> None:
        self.experiments.update(outcome.started)
        for s in outcome.saved:
            self.live[s.checkpoint] = s

    # -- checking ---------------------------------------------------------------------------

    def check(self, what: str, url: str | None = None, only: set[str] | None = None) -> None:
        """fsck finds no damage, and every live checkpoint (of experiments in ``only``, when
        given) is still in its experiment and reads back exactly."""
        url = url or self.repo_url
        context = self.context(what)
        with Repository.open(url) as repo:
            report = fsck(repo)
        damage = [p.line() for p in report.problems if p.kind in ("missing", "corrupt", "broken-ref")]
        assert not report.damaged, f"{context}: fsck found damage: {damage[:10]}\n" + "\n".join(self.log[-5:])
        project = Project(repository=url, directory=str(self.root))
        try:
            by_experiment: dict[str, list[Saved]] = {}
            for s in self.live.values():
                if only is None or s.experiment in only:
                    by_experiment.setdefault(s.experiment, []).append(s)
            listed = {e.id for e in project.list()}
            assert set(by_experiment) <= listed, f"{context}: experiments missing from the listing"
            for experiment_id, saves in sorted(by_experiment.items()):
                checkpoints = {c.id: c for c in project.get(experiment_id).checkpoints}
                for s in saves:
                    c = checkpoints.get(s.checkpoint)
                    assert c is not None, f"{context}: completed checkpoint {s.checkpoint} (step {s.step}) was lost"
                    assert (c.step, c.metrics) == (s.step, s.metrics), f"{context}: checkpoint {s.checkpoint} changed"
                    if s.path is not None:
                        with c.open(s.path) as f:
                            digest = hashlib.sha256(f.read()).hexdigest()
                        assert digest == s.sha256, f"{context}: {s.path} of checkpoint {s.checkpoint} reads back different bytes"
        finally:
            project.close()

    def follow_up_gc(self, url: str | None = None) -> gc_module.GcReport:
        """gc --grace 0 after a kill. Markers of killed writers must count as dead at once
        (same machine, pid gone); a killed gc's lock is taken over as if it had expired."""
        url = url or self.repo_url
        with pytest.MonkeyPatch.context() as mp:
            # the lock has no such check: it stays for LOCK_TIMEOUT (10 min) after a kill
            mp.setattr(gc_module, "LOCK_TIMEOUT", 0.0)
            mp.setattr(gc_module, "REPACK_BELOW", REPACK_BELOW)
            with Repository.open(url) as repo:
                report = collect_garbage(repo, grace=0, wait=5.0)
        assert not report.waiting_for, self.context(f"follow-up gc waited for dead writers: {report.waiting_for}")
        for name in ("packs_deleted", "packs_repacked", "packs_partly_dead", "objects_copied", "dead_objects", "unindexed_packs_deleted"):
            self.gc_totals[name] += getattr(report, name)
        with Repository.open(url) as repo:
            unindexed = fsck(repo).of_kind("unindexed-pack")
            markers = repo.storage.list("sessions/")
        assert not unindexed, self.context(f"follow-up gc left unindexed packs: {unindexed}")
        assert not markers, self.context(f"follow-up gc left markers of killed writers: {markers}")
        return report

    def after_kill(self, what: str) -> None:
        # The kill leaves the repository readable. Checkpoints whose checkpoint() returned
        # but that the storing thread had not stored yet are in the killed run's journal:
        # the next run (or push, or gc) stores them first (FORMAT.md §19).
        with Repository.open(self.repo_url) as repo:
            report = fsck(repo)
            assert not report.damaged, self.context(f"fsck found damage right after a kill {what}")
            recovered = recover_journals(repo)
            self.journals_stored += sum(r.stored for r in recovered)
        self.check(f"after a kill {what}")
        self.follow_up_gc()
        self.check(f"after the follow-up gc of a kill {what}")

    # -- making garbage -----------------------------------------------------------------------

    def remove_some(self) -> None:
        """Delete an experiment and thin another, so gc has whole packs to delete and
        packs whose live share falls under half to repack."""
        project = Project(repository=self.repo_url, directory=str(self.root))
        try:
            with_saves = sorted({s.experiment for s in self.live.values()})
            doomed = sorted(self.experiments - set(with_saves))  # died before their first checkpoint
            if len(with_saves) > 1:
                doomed.append(self.rnd.choice(with_saves))
            for experiment_id in doomed:
                project.delete_experiment(experiment_id)  # type: ignore[arg-type]
                self.experiments.discard(experiment_id)
                self.live = {k: s for k, s in self.live.items() if s.experiment != experiment_id}
            thin = [e for e in sorted({s.experiment for s in self.live.values()})]
            if thin:
                experiment = project.get(self.rnd.choice(thin))
                checkpoints = experiment.checkpoints
                for c in self.rnd.sample(checkpoints, min(len(checkpoints) - 1, self.rnd.randint(1, 3))):
                    project.remove_checkpoint(c)
                    self.live.pop(c.id, None)
        finally:
            project.close()

    def summary(self) -> str:
        return (
            f"{self.name}, seed {SEED}: {self.trial} trials\n"
            + "\n".join(f"  {n:3d}  {hit}" for hit, n in sorted(self.hits.items()))
            + f"\n  gc: {dict(sorted(self.gc_totals.items()))}"
            + f"\n  checkpoints stored from killed runs' journals: {self.journals_stored}"
            + f"\n  temporary files left by killed writes: {sum(1 for _ in self.root.rglob('.tmp-*'))}"
        )


def _read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            break  # a line cut by the kill can only be the last one
    return events


def _saved(event: dict[str, Any]) -> Saved:
    return Saved(event["experiment"], event["checkpoint"], event["step"], event["path"], event["sha256"], event["metrics"])


def _describe_hit(kind: str, killed: bool, events: list[dict[str, Any]]) -> str:
    if not killed:
        return f"{kind}: finished before the kill"
    kill = next((e for e in events if e["event"] == "kill"), None)
    phases = [e for e in events if e["event"] in ("phase", "checkpoint", "ready")]
    last = phases[-1] if phases else {"event": "start-up"}
    where = last.get("phase") or last["event"]
    if where == "checkpoint-start":
        where = "checkpoint"
    elif where == "checkpoint":
        where = "between checkpoints"
    elif where == "ready":
        where = "experiment start" if kind in ("checkpoint", "merge") else "start-up"
    if where in ("gc-report", "push-report"):
        return f"{kind}: finished, killed while exiting"
    if where.startswith("repacking"):
        where = "repacking"
    if where.startswith("waiting for"):
        where = "waiting for writers"
    if kill is not None:
        area = kill["key"].split("/", 1)[0]
        if kind == "gc" and area in ("packs", "index") and kill["op"] == "delete":
            where = "sweep"
        merge = " in an index merge" if kill["in_merge"] else ""
        return f"{kind}: {where}: {kill['when']} {kill['op']} {area}/{merge}"
    merging = where == "merge-start"
    return f"{kind}: {where}: timed{' (in an index merge)' if merging else ''}"


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    name = request.node.name
    h = Harness(tmp_path, name, random.Random(f"{SEED}-{name}"))
    yield h
    # shown with -s, and kept in the report of a failing test
    print("\n" + h.summary())
    print("\n".join(h.log))


def test_sigkill_during_checkpoints_and_gc(harness: Harness) -> None:
    """Training loops and gc runs, killed at random, on one repository; before each gc run
    an experiment is deleted and another thinned, so gc deletes packs and repacks others."""
    h = harness
    for _ in range(7):
        for n in range(3):
            # more than a kill plan ever lets it finish: every kill lands
            outcome = h.train("checkpoint", 45, 1.5, blocks=BLOCKS, block=BLOCK, steps=12, metrics_only=False)
            h.record(outcome)
            h.after_kill("during checkpoints")
            if n == 0:
                continue
            h.remove_some()
            h.run("gc", {"mode": "gc", "repo": h.repo_url, "repack_below": REPACK_BELOW}, ops_guess=15, time_guess=0.6)
            h.after_kill("during gc")
    assert sum(n for hit, n in h.hits.items() if "finished" not in hit) >= 20, h.summary()
    # the trials did make gc delete whole packs and repack partly live ones
    assert h.gc_totals["packs_deleted"] and h.gc_totals["packs_repacked"], h.summary()


def test_sigkill_during_index_merges_and_push(harness: Harness) -> None:
    """Many metrics-only checkpoints (one small index file each; merged every 9 here),
    killed at random or inside a merge; and push to a second repository, killed at random."""
    h = harness
    mirror = str(h.root / "mirror")
    for _ in range(7):
        for _ in range(2):
            outcome = h.train(
                "merge", 12, 1.0, blocks=4, block=32 << 10, steps=12, metrics_only=True, merge_at=8, kill_scope="merge"
            )
            h.record(outcome)
            h.after_kill("during index merges")
        h.run("push", {"mode": "push", "repo": h.repo_url, "destination": mirror}, ops_guess=20, time_guess=0.2)
        try:
            with Repository.open(mirror) as repo:
                present = {name.split("/", 1)[1] for name in repo.refs.list("experiments/")}
        except RepositoryNotFound:
            pass  # killed before it created the mirror's config
        else:
            # each experiment's writer was dead before the push began: a ref that made it
            # to the mirror names the experiment's final head, every saved checkpoint in it
            h.check("at the mirror after a kill during push", mirror, only=present)
        # pushing again finishes the job; then the mirror has everything
        with Repository.open(h.repo_url) as source, init_like(mirror, None, source) as destination:
            result = transfer(source, destination)
            assert not result.refused, h.context(f"push refused {result.refused}")
        h.follow_up_gc(mirror)
        h.check("at the mirror after a push that followed a killed push", mirror)
    assert sum(n for hit, n in h.hits.items() if "finished" not in hit) >= 12, h.summary()
