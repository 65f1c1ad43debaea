"""Transfer commands: push, pull and clone between any two repositories (docs/CLI.md,
"Transfers"; docs/FORMAT.md §16)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from keepsake.cli.display import echo_json, format_bytes
from keepsake.cli.session import Session, pass_session
from keepsake.errors import DivergedRefs, InvalidArgument, RepositoryNotFound
from keepsake.project import CONFIG_FILE, DEFAULT_REPOSITORY, ProjectSettings, load_config, write_config
from keepsake.repository import Repository
from keepsake.tracking.journal import Recovered, recover_journals
from keepsake.tracking.spool import FlushResult, flush_spools
from keepsake.transfer import UP_TO_DATE, TransferResult, TransferStats, init_like, transfer


class ProgressLine:
    """One self-overwriting progress line on stderr, only when stderr is a terminal."""

    #: redraw at most this often (seconds): a redraw per object would slow small copies
    EVERY = 0.1

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled and sys.stderr.isatty()
        self._last = 0.0
        self._drawn = False

    def __call__(self, stats: TransferStats) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._last < self.EVERY:
            return
        self._last = now
        line = (
            f"sent {format_bytes(stats.bytes_sent)} of ~{format_bytes(stats.bytes_needed)} "
            f"({stats.objects_sent}/{stats.objects_needed} objects), "
            f"skipped {format_bytes(stats.bytes_skipped)} already there"
        )
        click.echo(f"\r\x1b[K{line}", err=True, nl=False)
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            click.echo("\r\x1b[K", err=True, nl=False)


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"malformed storage option {pair!r}: write KEY=VALUE (e.g. endpoint_url=http://host:9000)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _remote(project: ProjectSettings, url: str | None, pairs: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The remote URL and its storage options: the URL given, else ``remote:`` from
    keepsake.yaml; the yaml's ``remote_storage_options`` apply to that remote, and -o
    options go over them."""
    if url is None:
        if project.remote is None:
            raise InvalidArgument(
                'no remote given: pass a URL, or set "remote: URL" in keepsake.yaml '
                f"({project.config_path or os.path.join(project.directory, CONFIG_FILE)})"
            )
        url = project.remote
    options = dict(project.remote_storage_options) if url == project.remote else {}
    options.update(_parse_options(pairs))
    return url, options


def _report(result: TransferResult, verb: str, quiet: bool, as_json: bool) -> None:
    """JSON on stdout with --json; otherwise a human report (on stdout for a dry run: it is
    what was asked for; on stderr otherwise), then DivergedRefs for refused refs."""
    if as_json:
        echo_json(result.to_dict())
    elif not quiet or result.dry_run:
        err = not result.dry_run
        changed = [r for r in result.refs if r.action != UP_TO_DATE]
        for r in changed:
            old = f"{r.destination[:7]}.." if r.destination else ""
            line = f"  {r.action:<13} {r.name}  {old}{r.source[:7]}"
            click.echo(line + (f"  ({r.reason})" if r.reason else ""), err=err)
        s = result.stats
        up_to_date = len(result.refs) - len(changed)
        if result.dry_run:
            click.echo(
                f"would send {s.objects_needed} objects ({format_bytes(s.bytes_needed)}); "
                f"{s.objects_skipped} objects ({format_bytes(s.bytes_skipped)}) already there; "
                f"{up_to_date} refs up to date",
                err=err,
            )
        else:
            click.echo(
                f"{verb} {s.objects_sent} objects, {format_bytes(s.bytes_sent)} sent; "
                f"{s.objects_skipped} objects ({format_bytes(s.bytes_skipped)}) already there; "
                f"{s.refs_updated} refs updated, {up_to_date} up to date",
                err=err,
            )
    refused = result.refused
    if refused:
        raise DivergedRefs(result.destination, [(r.name, r.reason) for r in refused])


def _run(
    source: Repository, destination: Repository, verb: str, force: bool, dry_run: bool, quiet: bool, as_json: bool
) -> None:
    progress = ProgressLine(enabled=not quiet and not as_json)
    try:
        result = transfer(source, destination, force=force, dry_run=dry_run, progress=progress)
    finally:
        progress.close()
    _report(result, verb, quiet, as_json)


def _transfer_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed(
        [
            click.option("-f", "--force", is_flag=True, help="Overwrite refs that diverged (and ones the target is ahead on)."),
            click.option("-n", "--dry-run", is_flag=True, help="Show what would be sent; write nothing."),
            click.option("-o", "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                          help="fsspec option for the remote (repeatable), over remote_storage_options."),
            click.option("-q", "--quiet", is_flag=True, help="No progress and no report (errors still print)."),
            click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
        ]
    ):
        fn = decorator(fn)
    return fn


def store_journals_left(repo: Repository, quiet: bool) -> list[Recovered]:
    """Store the checkpoints that processes which are gone left in journals next to a
    local repository (FORMAT.md §19); one line each on stderr unless ``quiet``."""
    done = recover_journals(repo)
    for r in done if not quiet else ():
        what = f"checkpoint {r.checkpoint[:7]} of experiment {r.experiment[:7]}" if r.checkpoint and r.experiment else r.path
        if r.stored:
            click.echo(f"  stored        {what} from the journal of a run that ended before storing it", err=True)
        else:
            click.echo(f"  dropped       {what}: {r.why}", err=True)
    return done


def _flush(repo: Repository, dry_run: bool, quiet: bool, as_json: bool) -> list[FlushResult]:
    """Upload the spools that processes which are gone left for ``repo`` (FORMAT.md §18)."""
    progress = ProgressLine(enabled=not quiet and not as_json)
    try:
        done = flush_spools(repo, progress=progress, dry_run=dry_run)
    finally:
        progress.close()
    if not as_json and (not quiet or dry_run):
        for flushed in done:
            name = os.path.basename(flushed.path)[:7]
            if flushed.error is not None:
                click.echo(f"  failed        spool of experiment {name}: {flushed.error}", err=True)
            elif flushed.result is not None:
                s = flushed.result.stats
                verb = "would send" if dry_run else "uploaded"
                sent = s.bytes_needed if dry_run else s.bytes_sent
                kept = "" if flushed.removed or dry_run else f" (kept in {flushed.path})"
                click.echo(
                    f"  {verb:<13} spool of experiment {name}: {format_bytes(sent)}, "
                    f"{format_bytes(s.bytes_skipped)} already there{kept}",
                    err=not dry_run,
                )
    return done


def _raise_flush_errors(done: list[FlushResult], destination: str) -> None:
    for flushed in done:
        if flushed.error is not None:
            raise flushed.error
    refused = [(r.name, r.reason) for f in done if f.result is not None for r in f.result.refused]
    if refused:
        raise DivergedRefs(destination, refused)


@click.command("push")
@click.argument("url", required=False)
@_transfer_options
@pass_session
def push_command(
    session: Session, url: str | None, force: bool, dry_run: bool, storage_options: tuple[str, ...], quiet: bool, as_json: bool
) -> None:
    """Copy this project's experiments, tags and their data to another repository.

    URL defaults to "remote:" in keepsake.yaml. Only what the remote lacks is sent; running
    it again after an interruption finishes the job. Experiments that grew here are
    fast-forwarded there; refs changed on both sides are refused (exit 12) unless --force.
    The remote repository must exist (keepsake init URL).

    Checkpoints recorded into a repository on an object store wait in a local spool until
    they are uploaded; a training process that died leaves its spool behind. Without a URL
    and without "remote:", push uploads those spools to the project's repository (when it
    is on an object store); with one, it uploads them first, then pushes.

    \b
    Example:
      keepsake push s3://bucket/team-models
      keepsake push --dry-run
      keepsake push                # finish the uploads of crashed runs
    """
    project = session.project
    journaled: list[Recovered] = []
    if not dry_run:
        with contextlib.suppress(RepositoryNotFound):
            journaled = store_journals_left(session.repo, quiet or as_json)
    if url is None and project.remote is None:
        try:
            spooled = session.repo.storage.backend not in ("local", "memory")
        except RepositoryNotFound:
            spooled = False
        if not spooled and journaled:
            return  # what was left to finish here is done; there is nowhere to push to
        if not spooled:  # nothing is ever spooled for it: a remote is what is missing
            _remote(project, url, storage_options)
        if storage_options:
            raise InvalidArgument("-o applies to a remote URL; the project's repository takes storage_options from keepsake.yaml")
        done = _flush(session.repo, dry_run, quiet, as_json)
        if as_json:
            echo_json(
                {
                    "destination": session.repo.url,
                    "dry_run": dry_run,
                    "spools": [
                        {
                            "path": f.path,
                            "removed": f.removed,
                            "error": str(f.error) if f.error is not None else None,
                            **(f.result.to_dict() if f.result is not None else {}),
                        }
                        for f in done
                    ],
                }
            )
        elif not done and not quiet:
            click.echo(f"nothing to upload: no spool left by an earlier run for {session.repo.url}", err=True)
        _raise_flush_errors(done, session.repo.url)
        return
    remote, options = _remote(project, url, storage_options)
    destination = Repository.open(remote, options)
    try:
        if not dry_run:
            # the project's repository complete first: what crashed runs spooled goes too
            _raise_flush_errors(_flush(session.repo, False, quiet, as_json), session.repo.url)
        _run(session.repo, destination, "pushed", force, dry_run, quiet, as_json)
    finally:
        destination.close()


@click.command("pull")
@click.argument("url", required=False)
@_transfer_options
@pass_session
def pull_command(
    session: Session, url: str | None, force: bool, dry_run: bool, storage_options: tuple[str, ...], quiet: bool, as_json: bool
) -> None:
    """Copy another repository's experiments, tags and their data into this project's.

    URL defaults to "remote:" in keepsake.yaml. Only what is missing here is fetched; the
    project's repository is created if it does not exist. Refs changed on both sides are
    refused (exit 12) unless --force.

    \b
    Example:
      keepsake pull s3://bucket/team-models
    """
    remote, options = _remote(session.project, url, storage_options)
    source = Repository.open(remote, options)
    try:
        project = session.project
        if dry_run:
            local = Repository.open(project.repository, project.storage_options)
        else:
            try:
                local = Repository.open(project.repository, project.storage_options)
            except RepositoryNotFound:
                local = init_like(project.repository, project.storage_options, source)
        try:
            _run(source, local, "pulled", force, dry_run, quiet, as_json)
        finally:
            local.close()
    finally:
        source.close()


@click.command("clone")
@click.argument("url")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-o", "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for URL (repeatable); saved as remote_storage_options.")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no report (errors still print).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def clone_command(url: str, directory: str, storage_options: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Copy a repository into a new project directory.

    DIRECTORY gets a keepsake.yaml naming URL as its remote (so push and pull there need
    no URL) and the repository DIRECTORY/.keepsake. Running the same clone again resumes
    an interrupted one.

    \b
    Example:
      keepsake clone s3://bucket/team-models models
      cd models && keepsake ls
    """
    options = _parse_options(storage_options)
    if "://" not in url:
        url = os.path.abspath(url)
    directory = os.path.abspath(directory)
    source = Repository.open(url, options)
    try:
        config = os.path.join(directory, CONFIG_FILE)
        if os.path.isdir(directory) and os.listdir(directory):
            # resuming: only a directory this clone made (its keepsake.yaml names URL)
            if not (os.path.isfile(config) and load_config(config).get("remote") == url):
                raise InvalidArgument(f"{directory} exists and is not empty (clone into a new directory)")
        else:
            os.makedirs(directory, exist_ok=True)
            doc: dict[str, Any] = {"remote": url}
            if options:
                doc["remote_storage_options"] = options
            write_config(directory, doc)
        local = init_like(os.path.join(directory, DEFAULT_REPOSITORY), {}, source)
        try:
            _run(source, local, "cloned", False, False, quiet, as_json)
        finally:
            local.close()
    finally:
        source.close()


COMMANDS = [push_command, pull_command, clone_command]
