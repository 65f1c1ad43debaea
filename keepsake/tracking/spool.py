"""The spool: checkpoints for a remote repository land on local disk first (FORMAT.md §18).

``checkpoint()`` must not wait on the network. For a repository on an object store, a live
experiment records into its *spool*, a local repository at
``<cache root>/spool/<remote repository id>/<experiment id>/``, and returns once the
checkpoint's packs, index, head and ref are stored there. An uploader thread then pushes the
spool's experiment ref to the remote with :func:`keepsake.transfer.transfer` (packs, then
index files, then the ref: the remote ref never names data that is not stored), retrying
with exponential backoff while the storage fails, and prunes the spool once the remote has
everything it holds.

One spool per experiment, written by one process (it holds ``locks/owner`` with flock for
its lifetime, released by the kernel if the process dies): pruning never races another
writer, and a spool whose lock is free belongs to a process that is gone. Those are
finished by ``keepsake push`` (no URL) or by the next run on the same repository
(:func:`flush_spools`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from keepsake.errors import CorruptObject, DivergedRefs, KeepsakeError, ObjectNotFound, RefNotFound, StorageError
from keepsake.objects.database import ObjectDB
from keepsake.objects.ids import ObjectId, ObjectType
from keepsake.objects.pack import PackEntry, PackId, encode_index, index_key, pack_id_of_key
from keepsake.objects.records import CheckpointRecord, HeadRecord, referenced_ids
from keepsake.repository import Repository, cache_root
from keepsake.tracking.journal import owner_lock, recover_journals, take_owner
from keepsake.storage import Storage
from keepsake.transfer import BEHIND, CONFLICT, TransferResult, TransferStats, init_like, transfer

log = logging.getLogger("keepsake")

#: requests in flight per upload (ranged reads, pack writes); each verbatim pack copy holds
#: one pack (up to ~33 MiB) in memory, so this also bounds the uploader's memory
UPLOAD_WORKERS = 4
#: first and longest wait between attempts while the storage keeps failing
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
#: at stop (and exit), give up waiting once uploads have failed for this long without one
#: succeeding; the spool stays on disk for ``keepsake push``. $KEEPSAKE_UPLOAD_PATIENCE.
PATIENCE = 120.0
OWNER_LOCK = "locks/owner"
#: the packs holding the newest uploaded checkpoint's files stay in the spool (for local
#: dedup) while their bytes are at most KEEP_RATIO x those files' stored bytes + KEEP_SLACK
KEEP_RATIO = 2
KEEP_SLACK = 64 << 20
#: rebases in a row (the remote's head moving under us each time) before giving up
MAX_REBASES = 10


def spool_root(remote_id: str) -> str:
    """The folder holding every spool of the remote repository with config id ``remote_id``."""
    return os.path.join(cache_root(), "spool", remote_id)


def _patience() -> float:
    try:
        return float(os.environ.get("KEEPSAKE_UPLOAD_PATIENCE", PATIENCE))
    except ValueError:
        return PATIENCE


class SpoolReader(ObjectDB):
    """Reads for the experiment's own process: the spool first, then the remote.

    A spooled checkpoint is readable at once, before its upload; once uploaded, the spool
    drops it and the remote has it. A read that began in the spool and lost its pack to a
    prune (a file being streamed while the upload finished) continues from the remote:
    the same ids, the same verified bytes.
    """

    def __init__(self, spool: Storage, remote: ObjectDB) -> None:
        super().__init__(spool)
        self._remote = remote

    def _spooled(self, object_id: ObjectId) -> PackEntry | None:
        # no listing on a miss: the experiment refreshes this reader after each checkpoint,
        # and most misses are objects at the remote (a file of an uploaded checkpoint)
        self._ensure_loaded()
        with self._lock:
            return self._entries.get(object_id)

    def locate(self, object_id: ObjectId) -> PackEntry:
        entry = self._spooled(object_id)
        return entry if entry is not None else self._remote.locate(object_id)

    def has(self, object_id: ObjectId) -> bool:
        return super().has(object_id) or self._remote.has(object_id)

    def get_typed(self, object_id: ObjectId, expected: ObjectType | None = None) -> tuple[ObjectType, bytes]:
        if self._spooled(object_id) is None:
            return self._remote.get_typed(object_id, expected)
        try:
            return super().get_typed(object_id, expected)
        except CorruptObject as damage:  # pruned since we located it: uploaded, so remote
            try:
                return self._remote.get_typed(object_id, expected)
            except ObjectNotFound:
                raise damage from None  # not uploaded: the spool's copy really is damaged

    def read_envelopes(self, entries: list[PackEntry]) -> list[bytes]:
        ours = [i for i, e in enumerate(entries) if self._spooled(e.id) == e]
        mine = set(ours)
        theirs = [i for i in range(len(entries)) if i not in mine]
        out: list[bytes] = [b""] * len(entries)
        if ours:
            try:
                for i, env in zip(ours, super().read_envelopes([entries[i] for i in ours])):
                    out[i] = env
            except CorruptObject as damage:  # pruned meanwhile: all of it from the remote
                try:
                    return self._remote.read_envelopes([self._remote.locate(e.id) for e in entries])
                except ObjectNotFound:
                    raise damage from None
        if theirs:
            located = [self._remote.locate(entries[i].id) for i in theirs]
            for i, env in zip(theirs, self._remote.read_envelopes(located)):
                out[i] = env
        return out


@dataclass
class FlushResult:
    """What :func:`flush_spools` did with one spool left by a process that is gone."""

    path: str
    result: TransferResult | None = None
    error: KeepsakeError | None = None
    removed: bool = False


def flush_spools(
    remote: Repository,
    progress: Callable[[TransferStats], None] | None = None,
    exclude: frozenset[str] = frozenset(),
    dry_run: bool = False,
) -> list[FlushResult]:
    """Upload every spool of ``remote`` whose process is gone, and remove the ones done.

    Spools of live processes are skipped (their uploader is on it). A spool is removed only
    when its transfer moved or confirmed every ref; refused refs (the experiment changed at
    the remote meanwhile) and errors leave it on disk and are reported. ``dry_run`` works
    out what would be sent, and changes nothing.
    """
    root = spool_root(remote.config.id)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(root, name)
        if path in exclude or not os.path.isdir(path):
            continue
        with owner_lock(os.path.join(path, OWNER_LOCK)) as gone:
            if not gone:
                continue  # its process is alive and uploading
            if not os.path.exists(os.path.join(path, "config")):
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True)  # died before its first checkpoint was stored
                continue
            done = FlushResult(path)
            out.append(done)
            try:
                spool = Repository.open(path)
                try:
                    if not dry_run:
                        # checkpoints the process captured but had not stored yet (§19)
                        recover_journals(spool, remote)
                    done.result = transfer(
                        spool, remote, partial=True, progress=progress, workers=UPLOAD_WORKERS, dry_run=dry_run
                    )
                finally:
                    spool.close()
            except KeepsakeError as exc:
                done.error = exc
                continue
            if not done.result.refused and not dry_run:
                shutil.rmtree(path, ignore_errors=True)
                done.removed = True
    return out


@dataclass
class UploadState:
    """The uploader's progress, for the progress line and for tests."""

    #: the newest head recorded in the spool, and the newest one the remote's ref names
    target: ObjectId | None = None
    uploaded: ObjectId | None = None
    #: the transfer running now (or the last one)
    stats: TransferStats = field(default_factory=TransferStats)
    uploads: int = 0
    attempts_failed: int = 0
    #: time.monotonic() of the first failure since the last success, or None
    failing_since: float | None = None
    last_error: KeepsakeError | None = None
    #: an error retrying cannot fix (corruption, a refused ref): the uploader has stopped
    fatal: KeepsakeError | None = None


class Spool:
    """One live experiment's spool and its uploader thread. Create with :meth:`open`.

    The experiment writes into :attr:`repo` (under :attr:`write_lock`), sets the spool's
    ref, then calls :meth:`submit`. :attr:`reader` reads the experiment's objects wherever
    they are now.
    """

    def __init__(
        self,
        remote: Repository,
        experiment_id: ObjectId,
        path: str,
        repo: Repository,
        owner: int,
        uploaded: ObjectId | None,
        on_uploaded: Callable[[ObjectId], None],
        rebase: Callable[[ObjectId], bool],
    ) -> None:
        self.remote = remote
        self.experiment_id = experiment_id
        self.path = path
        self.repo = repo
        self.ref = f"experiments/{experiment_id}"
        self.reader = SpoolReader(repo.storage, remote.objects)
        #: held while a checkpoint writes into the spool; a prune takes it too
        self.write_lock = threading.Lock()
        #: checkpoints being stored into the spool from their journals (FORMAT.md §19), whose
        #: packs no ref names yet: a prune waits for the next upload while there are any
        #: (changed under write_lock)
        self.storing = 0
        self.state = UploadState(uploaded=uploaded)
        try:
            # a spool left by an earlier process recording this experiment (attach)
            self.state.target = repo.refs.get(self.ref)
        except RefNotFound:
            self.state.target = uploaded
        self._owner: int | None = owner
        self._on_uploaded = on_uploaded
        self._rebase = rebase
        self._rebases = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"keepsake-upload-{experiment_id[:7]}", daemon=True)
        self._thread.start()

    @classmethod
    def open(
        cls,
        remote: Repository,
        experiment_id: ObjectId,
        uploaded: ObjectId | None,
        on_uploaded: Callable[[ObjectId], None],
        rebase: Callable[[ObjectId], bool],
    ) -> Spool | None:
        """The spool of ``experiment_id``, created if needed, with its uploader started.

        Args:
            uploaded: the experiment's head at the remote now.
            on_uploaded: called on the uploader thread with each head once the remote's
                ref names it (before the spool is pruned).
            rebase: called on the uploader thread with the remote's head when it moved
                there (not a fast-forward of the spool's): re-apply the spooled changes on
                top of it in the spool (and submit the new head); False when impossible.

        Returns:
            None when another live process owns this experiment's spool.
        """
        path = os.path.join(spool_root(remote.config.id), experiment_id)
        os.makedirs(path, exist_ok=True)
        owner = take_owner(os.path.join(path, OWNER_LOCK), create=True)
        if owner is None:
            return None
        try:
            repo = init_like(path, None, remote)
            return cls(remote, experiment_id, path, repo, owner, uploaded, on_uploaded, rebase)
        except BaseException:
            os.close(owner)
            raise

    # -- the experiment's side ---------------------------------------------------------------

    def submit(self, head: ObjectId) -> None:
        """The spool's ref now names ``head``: upload it (and everything before it)."""
        with self._cond:
            self.state.target = head
            self._cond.notify_all()

    @property
    def pending(self) -> bool:
        return self.state.target != self.state.uploaded

    def wait(self, progress: Callable[[UploadState], None] | None = None, patience: float | None = None) -> bool:
        """Block until the remote has every submitted head; True when it does.

        Returns False early when the uploader stopped on an error retrying cannot fix, or
        when uploads kept failing for ``patience`` seconds (default $KEEPSAKE_UPLOAD_PATIENCE
        or 120) since the wait began: the spool stays on disk for ``keepsake push``.
        """
        limit = _patience() if patience is None else patience
        began = time.monotonic()
        with self._cond:
            while self.pending and self.state.fatal is None and self._thread.is_alive():
                failing = self.state.failing_since
                if failing is not None and time.monotonic() - max(failing, began) > limit:
                    return False
                self._cond.wait(0.2)
                if progress is not None:
                    progress(self.state)
            return not self.pending

    def close(self, remove: bool) -> None:
        """Stop the uploader; with ``remove``, delete the spool (only if nothing is pending)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.repo.close()
        self.reader.close()
        if remove and not self.pending and not self._thread.is_alive():
            shutil.rmtree(self.path, ignore_errors=True)
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None

    # -- the uploader thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._flush_orphans()
        except Exception as exc:  # noqa: BLE001 - orphans are a bonus; `keepsake push` finishes them
            log.warning("keepsake: could not upload spools left by earlier runs: %s", exc)
        backoff = BACKOFF_MIN
        while True:
            with self._cond:
                while not self.pending and not self._closing:
                    self._cond.wait()
                if not self.pending or (self._closing and self.state.failing_since is not None):
                    return  # nothing left, or closing while the storage fails: the spool stays
            try:
                self._upload_once()
            except StorageError as exc:
                with self._cond:
                    state = self.state
                    if state.failing_since is None:
                        state.failing_since = time.monotonic()
                        log.warning("keepsake: upload of experiment %s failed, retrying: %s", self.experiment_id[:7], exc)
                    state.attempts_failed += 1
                    state.last_error = exc
                    self._cond.notify_all()
                    self._cond.wait(backoff)  # close() wakes it: a last attempt, then out
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            except KeepsakeError as exc:  # corruption, refused ref: retrying cannot help
                log.warning("keepsake: upload of experiment %s stopped: %s (the spool %s is kept)", self.experiment_id[:7], exc, self.path)
                with self._cond:
                    self.state.fatal = exc
                    self._cond.notify_all()
                return
            backoff = BACKOFF_MIN

    def _flush_orphans(self) -> None:
        for done in flush_spools(self.remote, exclude=frozenset({self.path})):
            if done.error is not None:
                log.warning("keepsake: spool %s left by an earlier run not uploaded: %s", done.path, done.error)
            elif done.result is not None and done.result.refused:
                refused = done.result.refused[0]
                log.warning("keepsake: spool %s left by an earlier run not uploaded: %s (%s)", done.path, refused.name, refused.reason)

    def _upload_once(self) -> None:
        """One transfer of the spool's ref; then the callback, then the prune."""

        def progress(stats: TransferStats) -> None:
            self.state.stats = stats

        uploaded = self.state.uploaded
        result = transfer(
            self.repo,
            self.remote,
            refs=[self.ref],
            partial=True,
            summaries=False,
            progress=progress,
            workers=UPLOAD_WORKERS,
            expect={self.ref: uploaded} if uploaded is not None else None,
        )
        if not result.refs:
            raise CorruptObject(self.ref, f"the spool at {self.path} has no ref for its experiment")
        update = result.refs[0]
        if update.action in (BEHIND, CONFLICT) or update.refused:
            # the remote's head moved (a checkpoint removed there): rebase and go again
            self._rebases += 1
            if update.destination is None or self._rebases > MAX_REBASES:
                raise DivergedRefs(self.remote.url, [(update.name, update.reason)])
            if update.action == CONFLICT:
                return  # it moved during the transfer: the next one sees where to
            if not self._rebase(update.destination):
                raise DivergedRefs(self.remote.url, [(update.name, update.reason)])
            with self._cond:
                self.state.uploaded = update.destination  # what the next upload must find there
            return
        self._rebases = 0
        published = update.source
        self._on_uploaded(published)
        self._prune(published)
        with self._cond:
            self.state.uploaded = published
            self.state.uploads += 1
            self.state.failing_since = None
            self.state.last_error = None
            self._cond.notify_all()

    def _prune(self, published: ObjectId) -> None:
        """Drop the spool's packs once the remote has everything they hold, except those
        holding the newest uploaded checkpoint's files.

        Those few are kept so that the next checkpoint of the same model deduplicates
        against them locally (10% of a model changed: 10% written to the spool, not all of
        it again); they go too when they hold more than KEEP_RATIO times those files' bytes
        (dead weight piling up). Only when the spool's ref still names ``published``: a
        checkpoint spooled during the upload may reuse chunks of any pack and is not at the
        remote yet. The new index file goes first, then the old ones, then the packs, so
        the spool never indexes a pack that is gone; its ref stays (the transfer stops at
        what the remote holds).
        """
        with self.write_lock:
            if self.storing or self.repo.refs.get(self.ref) != published:
                return
            db = self.repo.objects
            db.refresh()
            keep = self._packs_to_keep(published)
            storage = self.repo.storage
            indexes = db.index_files()
            kept: dict[PackId, list[PackEntry]] = {}
            for packs in indexes.values():
                for pack_id, entries in packs.items():
                    if pack_id in keep:
                        kept.setdefault(pack_id, entries)
            new_index = None
            if kept and not (len(indexes) == 1 and set(next(iter(indexes.values()))) == set(kept)):
                new_index, data = encode_index(kept)
                storage.write(index_key(new_index), data)
            for index_id in indexes:
                if index_id != new_index and not (new_index is None and kept):
                    storage.delete(index_key(index_id))
            for info in storage.list("packs/"):
                if pack_id_of_key(info.key) not in keep:
                    storage.delete(info.key)
            db.refresh(full=True)

    def _packs_to_keep(self, published: ObjectId) -> set[PackId]:
        """The spool packs holding the files of the newest checkpoint under ``published``."""
        db = self.repo.objects
        entries = db.entries()
        try:
            head = HeadRecord.decode(db.get(published, ObjectType.HEAD), published)
        except ObjectNotFound:
            return set()
        for checkpoint_id in reversed(head.checkpoints):
            if checkpoint_id not in entries:
                return set()  # pruned earlier: its files are at the remote only
            record = CheckpointRecord.decode(db.get(checkpoint_id, ObjectType.CHECKPOINT), checkpoint_id)
            if record.files is not None:
                break
        else:
            return set()
        packs: set[PackId] = set()
        needed = 0
        stack: list[ObjectId] = [record.files]
        while stack:
            oid = stack.pop()
            entry = entries.get(oid)
            if entry is None:
                continue  # at the remote only
            packs.add(entry.pack)
            needed += entry.length
            if entry.type != ObjectType.CHUNK:
                stack.extend(child for child, _ in referenced_ids(entry.type, db.get(oid, entry.type), oid))
        sizes = {pid: info.size for info in self.repo.storage.list("packs/") if (pid := pack_id_of_key(info.key))}
        if sum(sizes.get(p, 0) for p in packs) > KEEP_RATIO * needed + KEEP_SLACK:
            return set()
        return packs


def head_at_remote(remote: Repository, experiment_id: ObjectId) -> ObjectId | None:
    try:
        return remote.refs.get(f"experiments/{experiment_id}")
    except RefNotFound:
        return None
