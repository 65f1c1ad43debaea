"""Project: the API entry point tying a project directory to its repository."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from keepsake.version import __version__
from keepsake.errors import (
    AmbiguousObjectId,
    InvalidArgument,
    InvalidRefName,
    KeepsakeError,
    ObjectNotFound,
    PathNotFound,
    RefConflict,
    RefNotFound,
    RepositoryExists,
    RepositoryNotFound,
    WrongObjectType,
)
from keepsake.objects.ids import ObjectId, ObjectType, is_id_prefix
from keepsake.objects.records import CheckpointRecord, ExperimentRecord, HeadRecord
from keepsake.objects.values import normalize
from keepsake.objects.worktree import write_tree
from keepsake.project import find_project
from keepsake.repository import Repository
from keepsake.tracking import metadata
from keepsake.tracking.experiment import Checkpoint, Experiment
from keepsake.tracking.journal import recover_journals
from keepsake.tracking.metadata import experiment_ref, utc_now
from keepsake.tracking.listing import ExperimentList, parse_filter
from keepsake.tracking.summary import (
    CheckpointSummary,
    ListingStats,
    Summary,
    SummaryCache,
    build_summary,
    load_summaries,
    summary_key,
)
from keepsake.tracking.retention import RetentionPolicy, RetentionReport, plan_retention

#: never part of a code snapshot, wherever they appear
SKIP_IN_CODE = frozenset(
    {"__pycache__", ".venv", "venv", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ipynb_checkpoints"}
)
EXPERIMENTS = "experiments/"
TAGS = "tags/"

log = logging.getLogger("keepsake")


class Project:
    """A project directory and the repository it records into.

    Args:
        repository: repository URL; default from $KEEPSAKE_REPOSITORY, keepsake.yaml
            (searched upward from ``directory``), else ``<directory>/.keepsake``.
        directory: the project directory; default: the folder of keepsake.yaml, else the
            current directory.
        storage_options: fsspec options (endpoint_url, ...) merged over keepsake.yaml's.
    """

    def __init__(
        self, repository: str | None = None, directory: str | None = None, storage_options: dict[str, Any] | None = None
    ) -> None:
        settings = find_project(repository, cwd=directory)
        self.directory = os.path.abspath(directory) if directory else settings.directory
        self.repository = settings.repository
        self.storage_options = {**settings.storage_options, **(storage_options or {})}
        self._repo: Repository | None = None
        #: what the last listing (list, resolve) read and wrote: for tests and benchmarks
        self.last_listing: ListingStats | None = None

    @property
    def repo(self) -> Repository:
        """The repository, opened on first use. Raises RepositoryNotFound."""
        if self._repo is None:
            self._repo = Repository.open(self.repository, self.storage_options)
        return self._repo

    def _repo_for_writing(self) -> Repository:
        if self._repo is None:
            try:
                self._repo = Repository.open(self.repository, self.storage_options)
            except RepositoryNotFound:
                try:
                    self._repo = Repository.init(self.repository, self.storage_options)
                except RepositoryExists:
                    # FIX (tests/tracking/test_concurrency.py): another process created it
                    # between our open and our init (two runs started at once on a new
                    # repository); that one is as good as ours.
                    self._repo = Repository.open(self.repository, self.storage_options)
        return self._repo

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()

    def relative_path(self, path: str) -> str:
        """``path`` relative to the project directory, with ``/`` separators.

        Raises:
            PathNotFound: it does not exist or is outside the project directory.
        """
        full = os.path.abspath(os.path.join(self.directory, path))
        if not os.path.lexists(full):
            raise PathNotFound(full)
        rel = os.path.relpath(full, self.directory)
        # FIX (tests/tracking/test_checkpoint.py): was rel.startswith(os.pardir), which also
        # refused files inside the project whose name starts with "..", e.g. "..weights".
        if rel in (os.curdir, os.pardir) or rel.startswith(os.pardir + os.sep):
            raise PathNotFound(path, f"must be a file or directory inside the project directory {self.directory}")
        return rel.replace(os.sep, "/")

    # -- recording ---------------------------------------------------------------------------

    def start_experiment(
        self, path: str | None = ".", params: dict[str, Any] | None = None, detached: bool = False
    ) -> Experiment:
        """Record a new experiment and return it, running (see :func:`keepsake.init`).

        Args:
            detached: for recording from the command line: no heartbeat thread and no exit
                hook; the experiment stays running until stopped explicitly.
        """
        if params is not None and not isinstance(params, dict):
            raise InvalidArgument(f"params must be a dict, not {type(params).__name__}")
        params_n = normalize(dict(params or {}), "params")
        code_dir = None
        if path is not None:
            code_dir = os.path.abspath(os.path.join(self.directory, path))
            if not os.path.isdir(code_dir):
                raise PathNotFound(code_dir, "the code path must be a directory")
        repo = self._repo_for_writing()
        # the next run finishes what a killed one left in its journals (FORMAT.md §19)
        try:
            recover_journals(repo)
        except (KeepsakeError, OSError) as exc:
            log.warning("keepsake: could not store the checkpoints left in journals: %s", exc)
        record_path = None
        with repo.objects.operation(), repo.objects.writer() as writer:
            code = None
            if code_dir is not None:
                skip = SKIP_IN_CODE | self._repository_folder_in(code_dir)
                code, _ = write_tree(writer, repo.chunker, code_dir, skip, skip_virtualenvs=True)
                record_path = os.path.relpath(code_dir, self.directory).replace(os.sep, "/")
            record = ExperimentRecord(
                created=utc_now(),
                nonce=secrets.token_hex(8),
                params=params_n,
                user=metadata.current_user(),
                host=metadata.current_host(),
                command=metadata.current_command(),
                python_version=metadata.python_version(),
                python_packages=metadata.python_packages(),
                git=metadata.git_state(self.directory),
                keepsake_version=__version__,
                path=record_path,
                code=code,
                config={"repository": repo.url},
            )
            experiment_id = writer.put(ObjectType.EXPERIMENT, record.encode())
            head = HeadRecord(experiment_id, (), "running", utc_now())
            head_id = writer.put(ObjectType.HEAD, head.encode())
            writer.flush()  # objects, then index, then the ref, inside one operation
            repo.refs.set(experiment_ref(experiment_id), head_id, None)
        # FIX (tests/tracking/test_lifecycle.py): the first summary had no heartbeat, so
        # other processes saw a just-started experiment as "lost" until its first beat
        # (HEARTBEAT_INTERVAL later) or first checkpoint.
        summary = replace(
            Summary.of(experiment_id, record, head_id, head, (), None if detached else time.time()), detached=detached
        )
        experiment = Experiment(self, summary, live=True)
        experiment._record = record
        experiment._write_summary()
        experiment._start_heartbeat()
        return experiment

    def _repository_folder_in(self, code_dir: str) -> frozenset[str]:
        """The name of the local repository folder when it lies inside ``code_dir``.

        FIX (tests/tracking/test_api.py): keepsake.yaml may name a repository inside the
        project under any name (only ``.keepsake`` was skipped), and the code snapshot then
        copied the repository into itself, growing with every run (and failing when a
        concurrent writer's temporary file vanished mid-walk). write_tree only skips by
        name, so every folder with the repository's name is skipped, wherever it is; a
        path-based skip in keepsake.objects.worktree would make this exact.
        """
        if "://" in self.repository and not self.repository.startswith("file://"):
            return frozenset()
        repository = os.path.realpath(self.repository.removeprefix("file://"))
        code = os.path.realpath(code_dir)
        if os.path.commonpath([repository, code]) != code or repository == code:
            return frozenset()
        return frozenset({os.path.basename(repository)})

    def attach(self, id_or_prefix: str) -> Experiment:
        """Continue recording an experiment started elsewhere (``keepsake commit``).

        No heartbeat is started. Raises InvalidArgument when it is already stopped.
        """
        found = self.get(id_or_prefix)
        if found._summary.status != "running":
            raise InvalidArgument(f"experiment {found.short_id} is {found._summary.status}; start a new one")
        return Experiment(self, found._summary, live=True)

    # -- reading -----------------------------------------------------------------------------

    def experiment_heads(self) -> dict[ObjectId, ObjectId]:
        """experiment id -> head id, for every experiment in the repository."""
        refs = self.repo.refs.list(EXPERIMENTS)
        return {ObjectId(name[len(EXPERIMENTS) :]): head for name, head in refs.items()}

    def summaries(self) -> dict[ObjectId, Summary]:
        """Every experiment's summary, through the summary index (FORMAT.md §17): on an object
        store a few LISTs and the cached packed index, not one read per experiment."""
        summaries, self.last_listing = load_summaries(self.repo)
        return summaries

    def list(self, filter: str | list[str] | None = None, sort: str | None = None) -> ExperimentList:
        """Every experiment (optionally filtered, e.g. ``"val_loss < 0.2"``), oldest first."""
        experiments = [Experiment(self, summary) for summary in self.summaries().values()]
        result = ExperimentList(sorted(experiments, key=lambda e: e._summary.created))
        if filter:
            for f in [filter] if isinstance(filter, str) else filter:
                result = result.filter(parse_filter(f))
        if sort:
            result = result.sorted_by(sort)
        return result

    def load_summary(self, experiment_id: ObjectId) -> Summary:
        try:
            head = self.repo.refs.get(experiment_ref(experiment_id))
        except RefNotFound:
            raise ObjectNotFound(experiment_id, what="experiment") from None
        return SummaryCache(self.repo).load(experiment_id, head)

    def checkpoint_summary(self, checkpoint_id: ObjectId) -> CheckpointSummary:
        record = CheckpointRecord.decode(self.repo.objects.get(checkpoint_id, ObjectType.CHECKPOINT), checkpoint_id)
        return CheckpointSummary.of(checkpoint_id, record)

    def get(self, id_or_prefix: str) -> Experiment:
        """The experiment with this id, unique id prefix or tag; a checkpoint id gives its
        experiment. Raises ObjectNotFound or AmbiguousObjectId."""
        found = self.resolve(id_or_prefix)
        return found if isinstance(found, Experiment) else found.experiment

    def resolve(self, id_or_prefix: str) -> Experiment | Checkpoint:
        """An experiment or a checkpoint, by id, unique prefix (7+ characters) or tag."""
        try:
            target: ObjectId | None = self.repo.refs.get(TAGS + id_or_prefix)
        except (RefNotFound, InvalidRefName):  # not a tag: try it as an id prefix
            target = None
        if target is not None:
            return self._by_full_id(target)
        if not is_id_prefix(id_or_prefix):
            raise ObjectNotFound(id_or_prefix, what="experiment or checkpoint")
        matches: list[Experiment | Checkpoint] = []
        for eid, summary in self.summaries().items():
            if eid.startswith(id_or_prefix):
                matches.append(Experiment(self, summary))
            for c in summary.checkpoints:
                if c.id.startswith(id_or_prefix):
                    matches.append(Checkpoint(Experiment(self, summary), c))
        if not matches:
            raise ObjectNotFound(id_or_prefix, what="experiment or checkpoint")
        if len(matches) > 1:
            raise AmbiguousObjectId(id_or_prefix, [m.id for m in matches])
        return matches[0]

    def _by_full_id(self, object_id: ObjectId) -> Experiment | Checkpoint:
        # one ref read, not a listing of every experiment: a tag names one object
        try:
            return Experiment(self, self.load_summary(object_id))
        except ObjectNotFound:
            pass  # no experiment ref by that id: maybe a checkpoint
        try:
            data = self.repo.objects.get(object_id, ObjectType.CHECKPOINT)
        except WrongObjectType:
            # FIX (tests/tracking/test_api.py): a tag naming a deleted experiment (or any
            # object that is not a checkpoint) raised WrongObjectType from get(); it names
            # no experiment or checkpoint there is.
            raise ObjectNotFound(object_id, what="experiment or checkpoint") from None
        record = CheckpointRecord.decode(data, object_id)
        try:
            experiment = Experiment(self, self.load_summary(record.experiment))
        except ObjectNotFound:
            raise ObjectNotFound(object_id, what="experiment of checkpoint") from None
        for c in experiment.checkpoints:
            if c.id == object_id:
                return c
        raise ObjectNotFound(object_id, what="checkpoint (it was removed)")

    # -- changing ----------------------------------------------------------------------------

    def delete_experiment(self, experiment_id: ObjectId) -> None:
        """Remove an experiment's ref and summary; gc reclaims its space later."""
        self.repo.refs.delete(experiment_ref(experiment_id))
        self.repo.storage.delete(summary_key(experiment_id))

    def remove_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Remove one checkpoint from its experiment's head (compare-and-swap)."""
        repo = self.repo
        ref = experiment_ref(checkpoint.experiment.id)
        for _ in range(10):
            head_id = repo.refs.get(ref)
            head = HeadRecord.decode(repo.objects.get(head_id, ObjectType.HEAD), head_id)
            if checkpoint.id not in head.checkpoints:
                return
            new = HeadRecord(head.experiment, tuple(c for c in head.checkpoints if c != checkpoint.id), head.status, utc_now())
            try:
                with repo.objects.operation(), repo.objects.writer() as writer:
                    new_id = writer.put(ObjectType.HEAD, new.encode())
                    writer.flush()
                    repo.refs.set(ref, new_id, head_id)
            except RefConflict:
                continue  # the experiment moved on meanwhile: re-read and retry
            old = checkpoint.experiment._summary
            # FIX (tests/tracking/test_lifecycle.py): the rebuilt summary dropped the
            # detached flag, so an experiment recorded from the command line showed as
            # "lost" after one of its checkpoints was removed.
            summary = replace(build_summary(repo, new_id, old.heartbeat), detached=old.detached)
            repo.storage.write(summary_key(checkpoint.experiment.id), summary.encode(), durable=False)
            return
        # FIX (tests/tracking/test_concurrency.py): losing the race ten times used to return
        # as if the checkpoint had been removed.
        raise RefConflict(ref, None, None)

    def tag(self, name: str, target: Experiment | Checkpoint) -> None:
        """Point tag ``name`` at an experiment or checkpoint (replacing an older tag)."""
        # an operation from the existence check to the ref: a gc sweeping the target (an
        # experiment removed meanwhile) waits, then sees it reachable through the tag
        with self.repo.objects.operation():
            self.repo.objects.locate(target.id)
            self.repo.refs.set(TAGS + name, target.id, check=False)

    def tags(self) -> dict[str, ObjectId]:
        # Lists refs/tags/ only: RefStore.list lists every ref (1,000 experiment refs: one
        # more LIST page on S3, a quarter second on moto) before filtering by pattern.
        out: dict[str, ObjectId] = {}
        for info in self.repo.storage.list(f"refs/{TAGS}"):
            name = info.key[len("refs/") :]
            try:
                out[name[len(TAGS) :]] = self.repo.refs.get(name)
            except (RefNotFound, InvalidRefName):
                continue  # deleted since the listing, or not a ref name at all
        return out

    @property
    def experiments(self) -> ExperimentCollection:
        return ExperimentCollection(self)

    # -- retention ---------------------------------------------------------------------------

    def remove_checkpoints(
        self, removals: Mapping[ObjectId, Collection[ObjectId]]
    ) -> tuple[dict[ObjectId, set[ObjectId]], dict[ObjectId, str]]:
        """Remove many checkpoints from their experiments' heads: one new head per experiment.

        The same compare-and-swap on ``experiments/<id>`` as :meth:`remove_checkpoint`, but
        the new heads of all experiments go into one pack and one index (one operation), not
        one pack per checkpoint, and each summary is derived from the previous one instead of
        re-reading every checkpoint. An experiment whose head moved meanwhile is re-read and
        retried: only the checkpoints asked for are removed, whatever it gained meanwhile.

        Args:
            removals: experiment id -> ids of checkpoints to remove from its head.

        Returns:
            (removed, failed): experiment id -> the checkpoint ids this call removed (ids
            already gone are left out); and experiment id -> why nothing was removed (it was
            deleted meanwhile, or its head kept changing).
        """
        repo = self.repo
        cache = SummaryCache(repo)
        removed: dict[ObjectId, set[ObjectId]] = {}
        failed: dict[ObjectId, str] = {}
        pending = {eid: set(ids) for eid, ids in removals.items() if ids}
        for _ in range(10):
            if not pending:
                break
            plans: list[tuple[ObjectId, ObjectId, HeadRecord, set[ObjectId]]] = []
            for eid, ids in pending.items():
                try:
                    head_id = repo.refs.get(experiment_ref(eid))
                except RefNotFound:
                    failed[eid] = "it was deleted meanwhile"
                    continue
                head = HeadRecord.decode(repo.objects.get(head_id, ObjectType.HEAD), head_id)
                gone = ids & set(head.checkpoints)
                if not gone:
                    removed[eid] = set()
                    continue
                new = HeadRecord(eid, tuple(c for c in head.checkpoints if c not in gone), head.status, utc_now())
                plans.append((eid, head_id, new, gone))
            retry: dict[ObjectId, set[ObjectId]] = {}
            if plans:
                # objects, then index, then each ref, inside one operation (FORMAT.md §8, §11)
                with repo.objects.operation(), repo.objects.writer() as writer:
                    new_ids = [writer.put(ObjectType.HEAD, new.encode()) for _, _, new, _ in plans]
                    writer.flush()
                    for (eid, head_id, _, gone), new_id in zip(plans, new_ids):
                        old = cache.load(eid, head_id)
                        try:
                            repo.refs.set(experiment_ref(eid), new_id, head_id)
                        except RefConflict:
                            retry[eid] = pending[eid]  # it moved on meanwhile: re-read and retry
                            continue
                        removed[eid] = gone
                        summary = replace(old, head=new_id, checkpoints=tuple(c for c in old.checkpoints if c.id not in gone))
                        repo.storage.write(summary_key(eid), summary.encode(), durable=False)
            pending = retry
        for eid in pending:
            failed[eid] = "its head changed 10 times while checkpoints were being removed; run it again"
        return removed, failed

    def apply_retention(
        self,
        keep_best: int | None = None,
        keep_last: int | None = None,
        older_than: timedelta | None = None,
        dry_run: bool = False,
        include_running: bool = False,
    ) -> RetentionReport:
        """Thin every experiment to the checkpoints worth keeping (``keepsake gc --keep-*``).

        Per experiment, keeps the best ``keep_best`` checkpoints by its primary metric, the
        last ``keep_last`` by step, every tagged checkpoint (a tag on the experiment keeps
        all of them) and, with ``older_than``, every checkpoint younger than that; removes
        the rest from the experiment's head. Running experiments are skipped unless
        ``include_running``. The data stays until gc sweeps it.

        Raises:
            InvalidArgument: neither keep_best nor keep_last is at least 1 (that would remove
                every checkpoint), a negative count, or a non-positive ``older_than``.
        """
        policy = RetentionPolicy(keep_best, keep_last, older_than, include_running)
        report = plan_retention(self.list(), self.tags(), policy, datetime.now(timezone.utc))
        if dry_run:
            return report
        report.dry_run = False
        removed, failed = self.remove_checkpoints(report.removals())
        for plan in report.experiments:
            if plan.experiment in failed:
                plan.skipped = failed[plan.experiment]
                plan.removed = []
            elif plan.removed:
                done = removed.get(plan.experiment, set())
                plan.removed = [c for c in plan.removed if c.id in done]
        return report


class ExperimentCollection:
    """``project.experiments``: list() and get(), as in the original Keepsake."""

    def __init__(self, project: Project) -> None:
        self._project = project

    def list(self, filter: str | list[str] | None = None, sort: str | None = None) -> ExperimentList:
        return self._project.list(filter, sort)

    def get(self, id_or_prefix: str) -> Experiment:
        return self._project.get(id_or_prefix)
