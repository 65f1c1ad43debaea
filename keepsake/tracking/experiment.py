"""Experiments and checkpoints: recording them (checkpoint, stop, heartbeats) and reading them.

Write ordering for every change (FORMAT.md §8, §14): objects (packs, then their index), then
the ref ``experiments/<id>`` (compare-and-swap from the head this process last wrote), then
the summary. A crash at any point leaves the previous checkpoint intact and readable.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

from keepsake.errors import CheckoutConflict, InvalidArgument, KeepsakeError, ObjectNotFound, RefConflict
from keepsake.objects.chunking import Chunker
from keepsake.objects.database import ObjectDB, ObjectWriter
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.manifests import Blob, check_entry_name
from keepsake.objects.records import GOALS, CheckpointRecord, ExperimentRecord, HeadRecord
from keepsake.objects.values import is_number, normalize
from keepsake.objects.worktree import EarlierVersions, ObjectSink, checkout_tree, find_entry, write_subpath
from keepsake.repository import Repository
from keepsake.objects.sessions import Operation
from keepsake.tracking.journal import (
    Journal,
    OWNER,
    JournalWriter,
    journal_folder,
    next_sequence,
    remove_if_empty,
    store_journals,
    take_owner,
)
from keepsake.tracking.metadata import experiment_ref, utc_now
from keepsake.tracking.spool import Spool, UploadState
from keepsake.tracking.summary import CheckpointSummary, Summary, summary_key

if TYPE_CHECKING:
    from keepsake.tracking.project import Project

log = logging.getLogger("keepsake")

#: seconds between heartbeats of a running experiment
HEARTBEAT_INTERVAL = 10.0
#: an experiment whose last heartbeat is older than this is not running
HEARTBEAT_TIMEOUT = 60.0
#: niceness of the thread that stores journaled checkpoints (and of its compression threads)
STORE_NICENESS = 10
#: checkpoint() waits while the journals not yet stored hold more than this many bytes: disk
#: and page cache stay bounded when checkpoints come faster than they can be stored
JOURNAL_BACKLOG = 1 << 30
#: stop() prints one line about a wait for uploads longer than this when stderr is not a TTY
QUIET_WAIT = 3.0


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


class Checkpoint:
    """One saved state of an experiment: step, metrics, and the files saved with it."""

    def __init__(self, experiment: Experiment, summary: CheckpointSummary) -> None:
        self.experiment = experiment
        self._summary = summary
        self._record: CheckpointRecord | None = None

    id = property(lambda self: self._summary.id)
    step = property(lambda self: self._summary.step)
    metrics = property(lambda self: self._summary.metrics)
    primary_metric = property(lambda self: self._summary.primary_metric)
    path = property(lambda self: self._summary.path)

    @property
    def short_id(self) -> str:
        return str(self.id)[:7]

    @property
    def created(self) -> datetime:
        return parse_time(self._summary.created)

    @property
    def record(self) -> CheckpointRecord:
        if self._record is None:
            db = self.experiment._objects
            self._record = CheckpointRecord.decode(db.get(self.id, ObjectType.CHECKPOINT), self.id)
        return self._record

    @property
    def files(self) -> ObjectId | None:
        """The tree of the files saved with this checkpoint (relative to the project)."""
        return self.record.files

    def open(self, path: str) -> io.BufferedReader:
        """Open a saved file for reading, streamed from the repository (seekable).

        Args:
            path: the file's path relative to the project directory, as saved.

        Raises:
            ObjectNotFound: the checkpoint saved no file at ``path``.
        """
        files = self.files
        db = self.experiment._objects
        entry = find_entry(db, files, path) if files else None
        if entry is None or not entry.is_file or entry.id is None:
            raise ObjectNotFound(f"{self.short_id}:{path}", what="file")
        return db.open_blob(db.get_blob(entry.id))

    def checkout(self, output_directory: str, force: bool = False) -> int:
        """Write this checkpoint's files into ``output_directory``; returns files written."""
        if self.files is None:
            os.makedirs(output_directory, exist_ok=True)
            return 0
        return checkout_tree(self.experiment._objects, self.files, output_directory, force=force)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "step": self.step,
            "created": self._summary.created,
            "metrics": self.metrics,
            "primary_metric": {"name": self.primary_metric[0], "goal": self.primary_metric[1]}
            if self.primary_metric
            else None,
            "path": self.path,
        }

    def __repr__(self) -> str:
        return f"Checkpoint(id={self.short_id!r}, step={self.step!r}, metrics={self.metrics!r})"


class Experiment:
    """A training run: its parameters, environment, code and checkpoints.

    Returned by :func:`keepsake.init` (then it also records: :meth:`checkpoint`,
    :meth:`stop`) and by ``keepsake.experiments.list()/get()`` (read-only).
    """

    def __init__(self, project: Project, summary: Summary, live: bool = False) -> None:
        self.project = project
        self._summary = summary
        self._record: ExperimentRecord | None = None
        self._views_cache: tuple[Summary, tuple[Checkpoint, ...], Checkpoint | None] | None = None
        self._live = live
        self._lock = threading.RLock()
        self._stopped = not live
        self._heartbeat: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._failed = False
        self._pid = os.getpid()
        #: set once the exit hook is registered: only then may checkpoints be spooled
        #: (stop() or the hook waits for the upload; `keepsake commit` writes directly)
        self._may_spool = False
        self._spool: Spool | None = None
        #: reads of this process's own objects (the spool, then the remote) while spooling
        self._reader: ObjectDB | None = None
        #: spooled heads not yet known to be at the remote -> their summaries; the summary
        #: of the newest head the remote's ref names (what heartbeats write there)
        self._spooled_heads: dict[ObjectId, Summary] = {}
        #: the files the last checkpoint stored, by path: the next one cuts them against these
        self._file_versions: dict[str, Blob] = {}
        #: journaled checkpoints (FORMAT.md §19) not yet stored, oldest first, and the
        #: background thread that stores them; the owner lock of the journal folder
        self._pending: list[CheckpointSummary] = []
        #: the objects the pending checkpoints' journals hold: later journals rely on them
        self._queued: frozenset[ObjectId] = frozenset()
        #: cleared while checkpoint() captures: the storing thread pauses, so the capture
        #: (what training waits for) has the CPU and the GIL to itself
        self._may_store = threading.Event()
        self._may_store.set()
        #: bytes of each pending checkpoint's journal; notified as they are stored
        self._backlog: dict[ObjectId, int] = {}
        self._stored = threading.Condition()
        self._ingest: queue.Queue[tuple[Operation, str, CheckpointSummary, Spool | None] | None] = queue.Queue()
        self._ingester: threading.Thread | None = None
        self._ingest_error: BaseException | None = None
        self._journal_owner: int | None = None
        self._journal_repo: Repository | None = None
        self._journal_sequence = 0
        self._may_journal = False
        self._uploaded_summary: Summary | None = None
        self._remote_lock = threading.Lock()

    # -- what it is --------------------------------------------------------------------------

    id = property(lambda self: self._summary.experiment)
    params = property(lambda self: self._summary.params)
    user = property(lambda self: self._summary.user)
    host = property(lambda self: self._summary.host)
    command = property(lambda self: list(self._summary.command))
    path = property(lambda self: self._summary.path)
    git = property(lambda self: self._summary.git)

    @property
    def short_id(self) -> str:
        return str(self.id)[:7]

    @property
    def created(self) -> datetime:
        return parse_time(self._summary.created)

    @property
    def heartbeat(self) -> datetime | None:
        hb = self._summary.heartbeat
        return datetime.fromtimestamp(hb, timezone.utc) if hb is not None else None

    @property
    def status(self) -> str:
        """``running`` (with a fresh heartbeat), ``stopped``, ``failed``, or ``lost`` when it
        says running but its heartbeat is stale (the process died without stopping)."""
        status = self._summary.status
        if status == "running" and not self._live and not self._summary.detached:
            hb = self._summary.heartbeat
            if hb is None or time.time() - hb > HEARTBEAT_TIMEOUT:
                return "lost"
        return status

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def record(self) -> ExperimentRecord:
        if self._record is None:
            repo = self.project.repo
            self._record = ExperimentRecord.decode(repo.objects.get(self.id, ObjectType.EXPERIMENT), self.id)
        return self._record

    @property
    def _objects(self) -> ObjectDB:
        """Where this experiment's objects are read: its spool first while it has one.
        Checkpoints still being stored from their journals are waited for."""
        self._settle()
        reader = self._reader
        return reader if reader is not None else self.project.repo.objects

    python_version = property(lambda self: self.record.python_version)
    python_packages = property(lambda self: self.record.python_packages)
    keepsake_version = property(lambda self: self.record.keepsake_version)
    code = property(lambda self: self.record.code)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """Checkpoints, oldest first."""
        return list(self._views()[0])

    def _views(self) -> tuple[tuple[Checkpoint, ...], Checkpoint | None]:
        # (checkpoints, best), computed once per summary: listing calls best() and latest()
        # several times for each of thousands of experiments
        self._settle()
        cached = self._views_cache
        if cached is not None and cached[0] is self._summary:
            return cached[1], cached[2]
        views = tuple(Checkpoint(self, c) for c in self._summary.checkpoints)
        best = self._find_best(views)
        self._views_cache = (self._summary, views, best)
        return views, best

    def primary_metric(self) -> tuple[str, str] | None:
        """The primary metric most recently declared by a checkpoint."""
        for c in reversed(self._summary.checkpoints):
            if c.primary_metric:
                return c.primary_metric
        return None

    def best(self) -> Checkpoint | None:
        """The checkpoint with the best primary metric, or None without one."""
        return self._views()[1]

    def _find_best(self, checkpoints: tuple[Checkpoint, ...]) -> Checkpoint | None:
        primary = self.primary_metric()
        if primary is None:
            return None
        name, goal = primary
        scored = [c for c in checkpoints if is_number(c.metrics.get(name)) and not math.isnan(c.metrics[name])]
        if not scored:
            return None
        pick = min if goal == "minimize" else max
        return pick(scored, key=lambda c: c.metrics[name])

    def latest(self) -> Checkpoint | None:
        checkpoints = self._views()[0]
        return checkpoints[-1] if checkpoints else None

    def metric_values(self, metric: str) -> tuple[list[Any], list[Any]]:
        """(steps, values) of ``metric`` over the checkpoints that recorded it."""
        xs, ys = [], []
        for i, c in enumerate(self.checkpoints):
            if metric in c.metrics and is_number(c.metrics[metric]):
                xs.append(c.step if c.step is not None else i)
                ys.append(c.metrics[metric])
        return xs, ys

    def plot(self, metric: str | None = None, logy: bool = False) -> Any:
        """Plot a metric (default: the primary metric) against step, with matplotlib."""
        import matplotlib.pyplot as plt  # optional dependency, imported on use

        metric = metric or (self.primary_metric() or (None, None))[0]
        if metric is None:
            raise InvalidArgument("no metric given and the experiment has no primary metric")
        xs, ys = self.metric_values(metric)
        ax = plt.gca()
        ax.plot(xs, ys, label=self.short_id)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if logy:
            ax.set_yscale("log")
        return ax

    def checkout(self, output_directory: str, force: bool = False, checkpoint: Checkpoint | None = None) -> int:
        """Write the experiment's code, then a checkpoint's files over it (default: the
        best checkpoint, else the latest). Returns the number of files written."""
        from keepsake.objects.worktree import checkout_tree as _checkout

        written = 0
        db = self._objects
        if self.code:
            # FIX (tests/tracking/test_api.py): code recorded from a subdirectory (path="src")
            # was written at the top of output_directory while checkpoint files (saved
            # relative to the project directory) went under their project paths, so the
            # two did not line up. The code now goes to its own place in the project.
            parts = (self.path or ".").split("/")
            if parts == ["."] or any(check_entry_name(p) is not None for p in parts):
                code_dir = output_directory  # the project itself (or outside it: as before)
            else:
                if not force and os.path.isdir(output_directory) and os.listdir(output_directory):
                    raise CheckoutConflict(output_directory)
                code_dir = os.path.join(output_directory, *parts)
            written += _checkout(db, self.code, code_dir, force=force)
            force = True
        checkpoint = checkpoint or self.best() or self.latest()
        if checkpoint is not None:
            written += checkpoint.checkout(output_directory, force=force)
        os.makedirs(output_directory, exist_ok=True)
        return written

    def delete(self) -> None:
        """Remove the experiment from the repository's refs; its space comes back with gc."""
        self.project.delete_experiment(self.id)

    def refresh(self) -> Experiment:
        """Re-read this experiment's summary from the repository (a live experiment that
        spools its checkpoints knows better than the remote: it is left as it is)."""
        if self._reader is not None:
            return self
        self._summary = self.project.load_summary(self.id)
        return self

    def to_dict(self, with_packages: bool = False) -> dict[str, Any]:
        best, latest, primary = self.best(), self.latest(), self.primary_metric()
        out: dict[str, Any] = {
            "id": self.id,
            "created": self._summary.created,
            "status": self.status,
            "user": self.user,
            "host": self.host,
            "command": self.command,
            "params": self.params,
            "path": self.path,
            "git": self.git,
            "primary_metric": list(primary) if primary else None,
            "best_checkpoint": best.to_dict() if best else None,
            "latest_checkpoint": latest.to_dict() if latest else None,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
        }
        if with_packages:
            out["python_version"] = self.python_version
            out["python_packages"] = self.python_packages
            out["keepsake_version"] = self.keepsake_version
        return out

    def __repr__(self) -> str:
        return f"Experiment(id={self.short_id!r}, params={self.params!r}, checkpoints={len(self._summary.checkpoints)})"

    # -- recording ---------------------------------------------------------------------------

    def checkpoint(
        self,
        path: str | None = None,
        step: int | None = None,
        metrics: dict[str, Any] | None = None,
        primary_metric: tuple[str, str] | None = None,
    ) -> Checkpoint:
        """Record a checkpoint: metrics and a snapshot of ``path`` taken before returning.

        Args:
            path: a file or directory, relative to the project directory (or absolute inside
                it). The file may be overwritten as soon as this returns.
            step: the training step; omitted, it is the previous step + 1 (0 at first).
            metrics: name -> value (numbers, strings, numpy/torch values...).
            primary_metric: ``(name, "minimize" | "maximize")``; ``name`` must be in metrics.

        Raises:
            InvalidArgument: bad step, unknown goal, primary metric not in metrics.
            UnsupportedValue: a metric of a type that cannot be stored.
            PathNotFound: ``path`` does not exist or is outside the project directory.
        """
        self._require_live("checkpoint")
        if metrics is not None and not isinstance(metrics, dict):
            raise InvalidArgument(f"metrics must be a dict of name -> value, not {type(metrics).__name__}")
        metrics_n = normalize(dict(metrics or {}), "metrics")
        primary = _check_primary(primary_metric, metrics_n)
        if step is not None and (isinstance(step, bool) or not isinstance(normalize(step, "step"), int)):
            raise InvalidArgument(f"step must be an integer, not {type(step).__name__}")
        relpath = self.project.relative_path(path) if path is not None else None
        self._raise_ingest_error()
        self._wait_for_backlog()
        with self._lock:
            previous = self._recorded()
            if step is None:
                last = next((c.step for c in reversed(previous) if c.step is not None), None)
                step = 0 if last is None else last + 1
            step = int(step)
            spool = self._spool_for_writing()
            # files are captured into a journal and stored in the background (into the
            # repository, or the spool); a checkpoint without files has nothing to capture,
            # and is stored at once unless earlier ones are still being stored (they are
            # published in order)
            target = spool.repo if spool is not None else self.project.repo
            journal = self._journal_for_writing(target) if relpath is not None or self._pending else None
            if journal is not None:
                return Checkpoint(self, self._checkpoint_journaled(target, spool, journal, relpath, step, metrics_n, primary))
            if spool is not None:
                entry = self._checkpoint_spooled(spool, relpath, step, metrics_n, primary)
                return Checkpoint(self, entry)
            repo = self.project.repo
            # one operation from dedup snapshot to ref update: gc protects what it relies on
            with repo.objects.operation(), repo.objects.writer() as writer:
                entry = self._write_checkpoint(writer, repo.chunker, relpath, step, metrics_n, primary)
                self._publish(lambda ids: ids + (entry.id,), "running", added=entry, writer=writer)
            return Checkpoint(self, entry)

    def _write_checkpoint(
        self,
        writer: ObjectSink,
        chunker: Chunker,
        relpath: str | None,
        step: int,
        metrics: dict[str, Any],
        primary: tuple[str, str] | None,
    ) -> CheckpointSummary:
        """Store the saved files and the checkpoint record with ``writer`` (the repository's
        own, the spool's, or a journal); returns the new checkpoint's summary. Caller holds
        self._lock."""
        files = None
        if relpath is not None:
            versions = EarlierVersions(self._file_versions)
            files, _ = write_subpath(writer, chunker, self.project.directory, relpath, versions=versions)
            # only a hint (cutting gives the same chunks without it): kept even if this
            # checkpoint is never published
            self._file_versions = versions.stored
        previous = self._recorded()
        record = CheckpointRecord(
            experiment=self.id,
            created=utc_now(),
            step=step,
            metrics=metrics,
            primary_metric=primary,
            path=relpath,
            files=files,
            parent=previous[-1].id if previous else None,
        )
        return CheckpointSummary.of(writer.put(ObjectType.CHECKPOINT, record.encode()), record)

    def stop(self, status: str = "stopped") -> None:
        """Mark the experiment stopped (or failed) and stop its heartbeat. Idempotent."""
        if status not in ("stopped", "failed"):
            raise InvalidArgument(f"status must be 'stopped' or 'failed', not {status!r}")
        if not self._live or self._stopped:
            return
        self._settle()  # outside the lock: the storing thread publishes under it
        with self._lock:
            self._store_leftover_journals(report=True)
            self._stopped = True
            self._stop_event.set()
            spool = self._spool
            if spool is not None:
                with spool.write_lock:
                    self._record_spooled(spool, None, self._summary.checkpoints, status)
            else:
                self._publish(lambda ids: ids, status)
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        if spool is not None:
            self._finish_uploads(spool)
        self._close_journal()

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until the repository has every checkpoint recorded so far.

        On a remote repository checkpoints are stored in a local spool and uploaded in the
        background (docs/FORMAT.md §18); this waits for that upload, e.g. before another
        process is told to read them. On local disk, checkpoints are stored from their
        journals by a background thread (§19), usually within a second: this waits for it.

        Args:
            timeout: give up after this many seconds of failing uploads (default
                $KEEPSAKE_UPLOAD_PATIENCE, 120).

        Returns:
            True when everything recorded is in the repository.
        """
        self._settle()
        spool = self._spool
        return (spool is None or spool.wait(patience=timeout)) and not self._pending

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop("failed" if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt) else "stopped")

    def _require_live(self, what: str) -> None:
        if not self._live:
            raise InvalidArgument(f"cannot {what}: experiment {self.short_id} was read from the repository, not started here")
        if self._stopped:
            raise InvalidArgument(f"cannot {what}: experiment {self.short_id} is stopped")

    def _publish(
        self,
        change: Callable[[tuple[ObjectId, ...]], tuple[ObjectId, ...]],
        status: str,
        added: CheckpointSummary | None = None,
        writer: ObjectWriter | None = None,
    ) -> None:
        """Write a new head (objects, then ref by compare-and-swap), then the summary.

        If another process changed the head (e.g. ``keepsake rm`` of a checkpoint), the
        change is re-applied on top of theirs.
        """
        repo = self.project.repo
        with repo.objects.operation():  # until the ref is set: gc must not take the new head
            self._publish_head(change, status, added, writer)

    def _publish_head(
        self,
        change: Callable[[tuple[ObjectId, ...]], tuple[ObjectId, ...]],
        status: str,
        added: CheckpointSummary | None,
        writer: ObjectWriter | None,
    ) -> None:
        repo = self.project.repo
        ref = experiment_ref(self.id)
        expected: ObjectId | None = self._summary.head
        checkpoints = tuple(c.id for c in self._summary.checkpoints)
        known = {c.id: c for c in self._summary.checkpoints}
        for attempt in range(10):
            head = HeadRecord(self.id, change(checkpoints), status, utc_now())
            if attempt == 0 and writer is not None:
                # first try: the head goes into the checkpoint's own pack and index
                head_id = writer.put(ObjectType.HEAD, head.encode())
                writer.flush()
            else:
                with repo.objects.operation(), repo.objects.writer() as head_writer:
                    head_id = head_writer.put(ObjectType.HEAD, head.encode())
            try:
                repo.refs.set(ref, head_id, expected)
                break
            except RefConflict as conflict:
                if conflict.actual is None:
                    raise InvalidArgument(f"experiment {self.short_id} was deleted while it was running") from conflict
                expected = ObjectId(conflict.actual)
                theirs = HeadRecord.decode(repo.objects.get(expected, ObjectType.HEAD), expected)
                checkpoints = theirs.checkpoints
        else:
            raise RefConflict(ref, expected, None)
        if added is not None:
            known[added.id] = added
        summaries = tuple(known[c] if c in known else self.project.checkpoint_summary(c) for c in head.checkpoints)
        self._summary = replace(
            self._summary, head=head_id, status=status, checkpoints=summaries, heartbeat=time.time()
        )
        self._write_summary()

    def _write_summary(self) -> None:
        # derived data (rebuilt from objects when stale): no fsync on the training loop's path
        self.project.repo.storage.write(summary_key(self.id), self._summary.encode(), durable=False)

    # -- journaling (FORMAT.md §19) -----------------------------------------------------------

    def _recorded(self) -> tuple[CheckpointSummary, ...]:
        """Every checkpoint recorded so far: stored ones, then those still being stored."""
        return self._summary.checkpoints + tuple(self._pending)

    def _journal_for_writing(self, repo: Repository) -> str | None:
        """This experiment's journal folder, or None to store checkpoints before returning.

        Journaled: live experiments (whose exit hook waits for the storing thread) writing
        into a repository on local disk: the project's, or the spool. KEEPSAKE_JOURNAL=off
        stores before returning.
        """
        if self._journal_repo is not None:
            return journal_folder(self._journal_repo, self.id) if self._journal_repo is repo else None
        if not self._may_journal:
            return None
        self._may_journal = False  # decided once
        if os.environ.get("KEEPSAKE_JOURNAL", "").lower() in ("0", "off", "no"):
            return None
        folder = journal_folder(repo, self.id)
        if folder is None:
            return None
        fd = take_owner(os.path.join(folder, OWNER), wait=True, create=True)
        if fd is None:  # another live process records this experiment
            return None
        self._journal_owner = fd
        self._journal_repo = repo
        self._journal_sequence = next_sequence(folder)
        return folder

    def _checkpoint_journaled(
        self,
        repo: Repository,
        spool: Spool | None,
        folder: str,
        relpath: str | None,
        step: int,
        metrics: dict[str, Any],
        primary: tuple[str, str] | None,
    ) -> CheckpointSummary:
        """Capture a checkpoint into a journal and queue it for the storing thread (caller
        holds self._lock). One write operation spans both: begun here, before the first
        dedup decision, and ended by the storing thread once the ref names the checkpoint."""
        db = repo.objects
        op = db.operation.begin()
        self._may_store.clear()
        try:
            with contextlib.ExitStack() as holding, db.operation.adopt(op):
                if spool is not None:
                    holding.enter_context(spool.write_lock)  # a prune waits for the dedup decisions
                sink = JournalWriter(db, folder, self._journal_sequence, self._queued)
                try:
                    entry = self._write_checkpoint(sink, repo.chunker, relpath, step, metrics, primary)
                    path = sink.commit(self.id, entry.id)
                except BaseException:
                    sink.discard()
                    raise
        except BaseException:
            db.operation.end(op, quiet=True)
            raise
        finally:
            self._may_store.set()
        self._journal_sequence += 1
        self._pending.append(entry)
        self._queued |= sink.ids
        with self._stored:
            self._backlog[entry.id] = sink.bytes_written
        if self._ingester is None:
            self._ingester = threading.Thread(
                target=self._store_loop, name=f"keepsake-store-{self.short_id}", daemon=True
            )
            self._ingester.start()
        self._ingest.put((op, path, entry, spool))
        return entry

    def _store_loop(self) -> None:
        # Storing yields the CPU to training: a lower priority for this thread and the
        # compression threads it starts (Linux threads inherit it). Where that is not
        # possible it runs at the process's priority.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), STORE_NICENESS)
        while True:
            job = self._ingest.get()
            try:
                if job is None:
                    return
                self._store_journaled(*job)
            finally:
                self._ingest.task_done()

    def _store_journaled(self, op: Operation, path: str, entry: CheckpointSummary, spool: Spool | None) -> None:
        """Store one journal and publish its checkpoint (the storing thread): into the
        repository, or into the spool and on to the uploader. After a failure the later
        journals wait on disk: checkpoints are published in order."""
        db = (spool.repo if spool is not None else self.project.repo).objects
        if spool is not None:
            with spool.write_lock:
                spool.storing += 1  # its packs are not named by the spool's ref yet: no prune
        try:
            if self._ingest_error is not None:
                return
            with db.operation.adopt(op):
                journal = Journal.read(path)
                with db.writer() as writer:
                    for object_type, oid, view in journal.views():
                        self._may_store.wait()
                        writer.put(object_type, view, oid)
                    self._may_store.wait()
                    writer.flush()  # outside the lock: checkpoint() may take the next one meanwhile
                    with self._lock:
                        if spool is not None:
                            with spool.write_lock:
                                self._record_spooled(spool, writer, self._summary.checkpoints + (entry,), "running")
                        else:
                            self._publish(lambda ids: ids + (entry.id,), "running", added=entry, writer=writer)
                        self._pending.remove(entry)
                        if not self._pending:
                            self._queued = frozenset()
            os.unlink(path)
        except Exception as exc:  # noqa: BLE001 - reported by the next checkpoint() or stop()
            self._ingest_error = exc
            log.error("keepsake: checkpoint %s of experiment %s could not be stored yet: %s", entry.id[:7], self.short_id, exc)
        finally:
            if spool is not None:
                with spool.write_lock:
                    spool.storing -= 1
            db.operation.end(op, quiet=True)
            with self._stored:
                if self._ingest_error is None:
                    self._backlog.pop(entry.id, None)
                self._stored.notify_all()

    def _wait_for_backlog(self) -> None:
        """Wait while the journals not yet stored hold more than JOURNAL_BACKLOG bytes (not
        after a failure: the next checkpoint deals with that)."""
        with self._stored:
            while (
                sum(self._backlog.values()) > JOURNAL_BACKLOG
                and self._ingest_error is None
                and self._ingester is not None
                and self._ingester is not threading.current_thread()
            ):
                self._stored.wait(1.0)

    def _settle(self) -> None:
        """Wait until the storing thread has handled every journaled checkpoint."""
        ingester = self._ingester
        if ingester is not None and ingester is not threading.current_thread() and self._pending:
            self._ingest.join()

    def _raise_ingest_error(self) -> None:
        """If the storing thread failed, store what it left (in order) now, or raise why not."""
        if self._ingest_error is None:
            return
        self._settle()
        with self._lock:
            self._store_leftover_journals(report=False)

    def _store_leftover_journals(self, report: bool) -> None:
        """Store the journals the storing thread could not (caller holds self._lock), as
        recovery would. If they still cannot be stored, raise why (or, with ``report``,
        print it and say where they are kept); if one had to be dropped (its experiment was
        deleted meanwhile), raise the storing thread's error."""
        error = self._ingest_error
        repo = self._journal_repo
        if error is None or repo is None:
            return
        folder = journal_folder(repo, self.id)
        assert folder is not None
        spool = self._spool
        try:
            results = store_journals(repo, folder, spool.remote if spool is not None else None)
        except Exception as exc:  # noqa: BLE001 - still failing: they stay in the journal
            if not report:
                raise
            print(
                f"keepsake: checkpoints of experiment {self.short_id} could not be stored ({exc}); "
                f"they are kept in {folder}: run \"keepsake push\" in the project to store them",
                file=sys.stderr,
            )
            return
        stored = {r.checkpoint for r in results if r.stored}
        recovered = tuple(c for c in self._pending if c.id in stored)
        self._ingest_error = None
        self._pending.clear()
        with self._stored:
            self._backlog.clear()
        self._queued = frozenset()
        if spool is not None:
            # appended to the spool's ref by recovery: recorded as ours, for the uploader
            with spool.write_lock:
                self._record_spooled(spool, None, self._summary.checkpoints + recovered, self._summary.status)
        else:
            with contextlib.suppress(KeepsakeError):
                self._summary = self.project.load_summary(self.id)
        if any(not r.stored for r in results) and not report:
            raise error

    def _close_journal(self) -> None:
        """Stop the storing thread and let go of the journal folder (stop)."""
        if self._ingester is not None:
            self._ingest.put(None)
            if self._ingester is not threading.current_thread():
                self._ingester.join(timeout=5)
            self._ingester = None
        fd = self._journal_owner
        if fd is None or self._journal_repo is None:
            return
        folder = journal_folder(self._journal_repo, self.id)
        if folder is not None:
            remove_if_empty(folder)
        os.close(fd)
        self._journal_owner = None

    # -- spooling (FORMAT.md §18) ------------------------------------------------------------

    def _spool_for_writing(self) -> Spool | None:
        """This experiment's spool, opened at its first checkpoint, or None to write directly.

        Spooled: repositories on a network (everything but local disk and memory://, which
        are as fast as a spool), for experiments whose exit hook waits for the upload.
        KEEPSAKE_SPOOL=off writes directly (each checkpoint waits for its upload).
        """
        if self._spool is not None or not self._may_spool:
            return self._spool
        repo = self.project.repo
        if repo.storage.backend in ("local", "memory") or os.environ.get("KEEPSAKE_SPOOL", "").lower() in ("0", "off", "no"):
            self._may_spool = False
            return None
        self._uploaded_summary = self._summary
        spool = Spool.open(repo, self.id, self._summary.head, self._on_uploaded, self._rebase)
        if spool is None:  # another live process records this experiment and owns its spool
            self._may_spool = False
            return None
        self._spool, self._reader = spool, spool.reader
        return spool

    def _checkpoint_spooled(
        self, spool: Spool, relpath: str | None, step: int, metrics: dict[str, Any], primary: tuple[str, str] | None
    ) -> CheckpointSummary:
        """checkpoint() into the spool: the same objects and head as a direct checkpoint,
        stored locally; the uploader sends them (caller holds self._lock)."""
        repo = spool.repo
        with spool.write_lock, repo.objects.operation(), repo.objects.writer() as writer:
            entry = self._write_checkpoint(writer, repo.chunker, relpath, step, metrics, primary)
            self._record_spooled(spool, writer, self._summary.checkpoints + (entry,), "running")
        return entry

    def _record_spooled(
        self, spool: Spool, writer: ObjectWriter | None, checkpoints: tuple[CheckpointSummary, ...], status: str
    ) -> None:
        """Write a new head into the spool (objects, index, then the spool's ref, then its
        summary) and hand it to the uploader. Caller holds self._lock and spool.write_lock.

        Only this process writes the spool, so its ref is set without compare-and-swap;
        the compare-and-swap at the remote is the upload's (a fast-forward, FORMAT.md §16).
        """
        repo = spool.repo
        head = HeadRecord(self.id, tuple(c.id for c in checkpoints), status, utc_now())
        if writer is not None:
            head_id = writer.put(ObjectType.HEAD, head.encode())
            writer.flush()
        else:
            with repo.objects.operation(), repo.objects.writer() as head_writer:
                head_id = head_writer.put(ObjectType.HEAD, head.encode())
        repo.refs.set(spool.ref, head_id, check=False)
        self._summary = replace(self._summary, head=head_id, status=status, checkpoints=checkpoints, heartbeat=time.time())
        with self._remote_lock:
            self._spooled_heads[head_id] = self._summary
        # the spool's summary is what `keepsake push` copies if this process dies
        repo.storage.write(summary_key(self.id), self._summary.encode(), durable=False)
        spool.reader.refresh()
        spool.submit(head_id)

    def _rebase(self, theirs_id: ObjectId) -> bool:
        """Re-apply what this process spooled on top of the remote's head ``theirs_id``,
        which moved there meanwhile (``keepsake rm`` of a checkpoint while we run), as
        :meth:`_publish` does for a direct write. Runs on the uploader thread; returns
        False when the remote's head is not this experiment's.
        """
        remote = self.project.repo
        theirs = HeadRecord.decode(remote.objects.get(theirs_id, ObjectType.HEAD), theirs_id)
        if theirs.experiment != self.id:
            return False
        with self._lock:
            spool = self._spool
            if spool is None:
                return False
            with self._remote_lock:
                base = self._uploaded_summary
            uploaded = {c.id for c in base.checkpoints} if base is not None else set()
            known = {c.id: c for c in self._summary.checkpoints}
            ours = [c.id for c in self._summary.checkpoints if c.id not in uploaded and c.id not in theirs.checkpoints]
            checkpoints = tuple(known[c] if c in known else self.project.checkpoint_summary(c) for c in theirs.checkpoints)
            checkpoints += tuple(known[c] for c in ours)
            with spool.write_lock:
                self._record_spooled(spool, None, checkpoints, self._summary.status)
        return True

    def _on_uploaded(self, head_id: ObjectId) -> None:
        """The remote's ref names ``head_id`` now: write its summary there (uploader thread)."""
        with self._remote_lock:
            summary = self._spooled_heads.get(head_id)
            if summary is None:
                return
            for older in list(self._spooled_heads):
                del self._spooled_heads[older]
                if older == head_id:
                    break
            self._uploaded_summary = summary
        self._write_uploaded_summary()

    def _write_uploaded_summary(self) -> None:
        """Write the summary of the newest uploaded head, with a fresh heartbeat (a summary
        naming a head the remote lacks would make every reader rebuild it from objects)."""
        with self._remote_lock:
            summary = self._uploaded_summary
            if summary is None:
                return
            if summary.heartbeat is not None and not self._stopped:
                summary = summary.with_heartbeat(time.time())
            self.project.repo.storage.write(summary_key(self.id), summary.encode(), durable=False)

    def _finish_uploads(self, spool: Spool) -> None:
        """Wait for the uploader (stop, exit), with a progress line on stderr; remove the
        spool when everything arrived, else say where it is and how to finish."""
        tty = sys.stderr.isatty()
        began = time.monotonic()
        drawn = [False]

        def progress(state: UploadState) -> None:
            stats = state.stats
            if tty:
                line = (
                    f"keepsake: uploading experiment {self.short_id}: {_format_bytes(stats.bytes_sent)} "
                    f"of ~{_format_bytes(stats.bytes_needed)} sent, {_format_bytes(stats.bytes_skipped)} already there"
                )
                if state.last_error is not None:
                    line += f" (retrying: {state.last_error})"
                print(f"\r\x1b[K{line[:200]}", end="", file=sys.stderr, flush=True)
                drawn[0] = True
            elif not drawn[0] and time.monotonic() - began > QUIET_WAIT:
                print(f"keepsake: waiting for the upload of experiment {self.short_id} to {spool.remote.url}", file=sys.stderr)
                drawn[0] = True

        try:
            done = spool.wait(progress)
        finally:
            if tty and drawn[0]:
                print("\r\x1b[K", end="", file=sys.stderr, flush=True)
        spool.close(remove=done)
        if done:
            self._spool = self._reader = None
            return
        state = spool.state
        why = state.fatal or state.last_error
        print(
            f"keepsake: experiment {self.short_id} is not fully uploaded to {spool.remote.url} ({why}); "
            f"it is kept in {spool.path}: run \"keepsake push\" in the project to finish the upload",
            file=sys.stderr,
        )

    # -- liveness ----------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._summary.detached:
            return
        self._may_spool = True  # the exit hook registered below waits for uploads
        self._may_journal = True  # ... and for the storing thread
        self._heartbeat = threading.Thread(target=self._beat, name=f"keepsake-heartbeat-{self.short_id}", daemon=True)
        self._heartbeat.start()
        # FIX (tests/tracking/test_lifecycle.py): with atexit.register the hook ran after
        # concurrent.futures had shut down its executors (threading's exit hooks run
        # first), so writing the final head failed with "cannot schedule new futures after
        # interpreter shutdown" and every experiment that ended without stop() stayed
        # "running" (then "lost"). threading's exit hooks run in reverse order of
        # registration, so ours runs before the executors are shut down (and after
        # sys.excepthook, so _UNCAUGHT is already known).
        # Forked children (multiprocessing, DataLoader workers) inherit these hooks and run
        # them when they end: _at_exit acts only in the process that started the experiment.
        register = getattr(threading, "_register_atexit", None)
        try:
            if register is None:
                raise RuntimeError("no threading._register_atexit")
            register(self._at_exit)
        except RuntimeError:  # already shutting down, or another Python: plain atexit
            atexit.register(self._at_exit)
        _watch_uncaught_exceptions()
        _LIVE.append(self)

    def _beat(self) -> None:
        while not self._stop_event.wait(HEARTBEAT_INTERVAL):
            try:
                with self._lock:
                    if self._stopped:
                        return
                    self._summary = self._summary.with_heartbeat(time.time())
                    spooling = self._spool is not None
                    if not spooling:
                        self._write_summary()
                if spooling:  # outside the lock: checkpoint() must not wait for the network
                    self._write_uploaded_summary()
            except Exception as exc:  # noqa: BLE001 - a failed heartbeat must not kill training
                log.warning("keepsake: heartbeat for experiment %s failed: %s", self.short_id, exc)

    def _at_exit(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child ending: the experiment goes on in its parent
        try:
            self.stop("failed" if _UNCAUGHT.is_set() else "stopped")
        except Exception as exc:  # noqa: BLE001 - interpreter is exiting; report, do not raise
            print(f"keepsake: could not record the end of experiment {self.short_id}: {exc}", file=sys.stderr)


def _format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _check_primary(primary: Any, metrics: dict[str, Any]) -> tuple[str, str] | None:
    if primary is None:
        return None
    if not (isinstance(primary, (tuple, list)) and len(primary) == 2 and all(isinstance(p, str) for p in primary)):
        raise InvalidArgument('primary_metric must be a (name, goal) pair, e.g. ("val_loss", "minimize")')
    name, goal = primary
    if goal not in GOALS:
        raise InvalidArgument(f'primary_metric goal {goal!r} is not "minimize" or "maximize"')
    if name not in metrics:
        raise InvalidArgument(f"primary metric {name!r} is not among the metrics ({', '.join(sorted(metrics)) or 'none given'})")
    return (name, goal)


_LIVE: list[Experiment] = []
_UNCAUGHT = threading.Event()
_HOOKED = False


def _watch_uncaught_exceptions() -> None:
    # An exception that ends the program marks running experiments as failed (at exit).
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if not issubclass(exc_type, KeyboardInterrupt):
            _UNCAUGHT.set()
        previous(exc_type, exc, tb)

    sys.excepthook = hook

