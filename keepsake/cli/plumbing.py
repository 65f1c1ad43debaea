"""Plumbing commands: the object model, git-style (init, hash-object, write-tree, ls-tree,
cat-file, checkout-tree, update-ref, delete-ref, show-ref, rev-parse, count-objects, fsck)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from keepsake.cli.display import ByteProgress, echo_json, format_bytes
from keepsake.cli.session import Session, pass_session
from keepsake.errors import InvalidObjectId, ObjectNotFound, PathNotFound, RepositoryNotFound
from keepsake.gc import repair as repair_repository
from keepsake.maintenance import count_objects, fsck
from keepsake.objects.ids import ObjectId, ObjectType, is_id_prefix
from keepsake.objects.manifests import Blob, Tree, TreeEntry
from keepsake.objects.worktree import (
    HashOnly,
    ObjectSink,
    checkout_tree,
    write_blob_from_file,
    write_blob_from_stream,
    write_tree,
)
from keepsake.repository import Repository


@click.command("init")
@click.argument("url", required=False)
@pass_session
def init_command(session: Session, url: str | None) -> None:
    """Create an empty repository.

    URL is a local path or any fsspec URL; the default is the project's repository.

    \b
    Example:
      keepsake init                      # ./.keepsake
      keepsake init s3://bucket/models
    """
    project = session.project
    repo = Repository.init(url or project.repository, project.storage_options)
    click.echo(f"Initialized empty Keepsake repository at {repo.url}", err=True)
    repo.close()


def _check_inputs(paths: tuple[str, ...]) -> None:
    # Validate every path before storing anything: bad input writes nothing.
    for path in paths:
        if os.path.isdir(path):
            raise PathNotFound(path, "is a directory (use write-tree)")
        if not os.path.isfile(path):
            raise PathNotFound(path)
        if not os.access(path, os.R_OK):
            raise PathNotFound(path, "permission denied")


@click.command("hash-object")
@click.option("-w", "write", is_flag=True, help="Store the file(s) in the repository.")
@click.option("--stdin", "stdin", is_flag=True, help="Read the content from standard input.")
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=True))
@pass_session
def hash_object_command(session: Session, write: bool, stdin: bool, paths: tuple[str, ...]) -> None:
    """Print the blob id of each file; store them only with -w.

    \b
    Example:
      keepsake hash-object model.pth
      cat model.pth | keepsake hash-object -w --stdin
    """
    if not paths and not stdin:
        raise click.UsageError("give at least one PATH, or --stdin")
    _check_inputs(paths)
    if write:
        repo = session.repo
        with repo.objects.writer() as writer:
            ids = _hash_inputs(writer, repo, stdin, paths)
    else:
        # no repository is needed to compute ids; use its chunker settings when there is one
        ids = _hash_inputs(HashOnly(), _chunker_source(session), stdin, paths)
    for object_id in ids:
        click.echo(object_id)


def _chunker_source(session: Session) -> Repository | None:
    try:
        return session.repo
    except RepositoryNotFound:  # without a repository the default chunker is used
        # FIX: was `except Exception`, which also swallowed a bad keepsake.yaml, a newer
        # repository format and storage failures, and then printed ids computed with the
        # default chunker that need not match what `-w` would store.
        return None


def _hash_inputs(sink: ObjectSink, repo: Repository | None, stdin: bool, paths: tuple[str, ...]) -> list[ObjectId]:
    from keepsake.objects.chunking import Chunker

    chunker = repo.chunker if repo else Chunker()
    ids = []
    if stdin:
        ids.append(write_blob_from_stream(sink, chunker, sys.stdin.buffer)[0])
    for path in paths:
        ids.append(write_blob_from_file(sink, chunker, path)[0])
    return ids


@click.command("write-tree")
@click.argument("directory", type=click.Path())
@pass_session
def write_tree_command(session: Session, directory: str) -> None:
    """Store a directory and print its tree id.

    Honours .keepsakeignore (gitignore syntax); .keepsake and .git are always skipped.
    Symlinks are stored as links and never followed.

    \b
    Example:
      keepsake write-tree ./checkpoints
    """
    repo = session.repo
    if not os.path.isdir(directory):
        raise PathNotFound(directory, "not a directory" if os.path.exists(directory) else "no such directory")
    with repo.objects.writer() as writer:
        tree_id, _ = write_tree(writer, repo.chunker, directory)
    click.echo(tree_id)


def _walk(repo: Repository, tree: Tree, prefix: str, recursive: bool) -> list[tuple[str, TreeEntry]]:
    out = []
    for entry in tree.entries:
        path = prefix + entry.name
        if recursive and entry.is_tree and entry.id:
            out.extend(_walk(repo, repo.objects.get_tree(entry.id), path + "/", recursive))
        else:
            out.append((path, entry))
    return out


def _subtree(repo: Repository, tree_id: ObjectId, path: str) -> tuple[Tree, str, TreeEntry | None]:
    """Follow ``path`` inside a tree: the tree to list, the prefix, or a single entry."""
    tree = repo.objects.get_tree(tree_id)
    parts = [p for p in path.strip("/").split("/") if p]
    prefix = ""
    for i, part in enumerate(parts):
        entry = tree.get(part)
        if entry is None:
            raise ObjectNotFound(f"{tree_id}:{path}", what="path")
        if not entry.is_tree:
            if i != len(parts) - 1:
                raise ObjectNotFound(f"{tree_id}:{path}", what="path")
            return tree, prefix, entry
        assert entry.id is not None
        tree = repo.objects.get_tree(entry.id)
        prefix += part + "/"
    return tree, prefix, None


@click.command("ls-tree")
@click.option("-r", "recursive", is_flag=True, help="Recurse into subtrees.")
@click.option("-l", "long", is_flag=True, help="Show sizes.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@click.argument("tree")
@click.argument("path", required=False, default="")
@pass_session
def ls_tree_command(session: Session, recursive: bool, long: bool, as_json: bool, tree: str, path: str) -> None:
    """List the entries of a tree: mode, type, id, [size,] path.

    \b
    Example:
      keepsake ls-tree -r -l 3f2a9c1
    """
    repo = session.repo
    tree_id = repo.resolve(tree, ObjectType.TREE)
    subtree, prefix, single = _subtree(repo, tree_id, path)
    rows = [(prefix + single.name, single)] if single else _walk(repo, subtree, prefix, recursive)
    if as_json:
        echo_json(
            [
                {"path": p, "mode": f"{e.mode:06o}", "type": e.kind, "id": e.id, "size": e.size, "target": e.target}
                for p, e in rows
            ]
        )
        return
    for p, e in rows:
        shown = e.id or "-" * 32
        size = f" {e.size:>12}" if long else ""
        link = f" -> {e.target}" if e.is_symlink and long else ""
        click.echo(f"{e.mode:06o} {e.kind} {shown}{size}\t{p}{link}")


@click.command("cat-file")
@click.option("-t", "show_type", is_flag=True, help="Print the object's type.")
@click.option("-s", "show_size", is_flag=True, help="Print its size (a file's size for blobs).")
@click.option("-p", "pretty", is_flag=True, help="Print it readably (a blob's file content).")
@click.argument("args", nargs=-1, required=True)
@pass_session
def cat_file_command(session: Session, show_type: bool, show_size: bool, pretty: bool, args: tuple[str, ...]) -> None:
    """Show an object: its type, size, or content.

    With TYPE ID (blob, tree or chunk) the raw content is written to stdout, streamed:
    for a blob, the file's bytes.

    \b
    Example:
      keepsake cat-file -t 3f2a9c1
      keepsake cat-file blob 3f2a9c1 > model.pth
    """
    repo = session.repo
    modes = sum((show_type, show_size, pretty))
    if modes > 1 or (modes == 1 and len(args) != 1) or (modes == 0 and len(args) != 2):
        raise click.UsageError("use one of: cat-file -t ID, cat-file -s ID, cat-file -p ID, cat-file TYPE ID")
    if modes == 0:
        type_name, ident = args
        try:
            expected = ObjectType[type_name.upper()]
        except KeyError:
            raise click.BadParameter(f"unknown type {type_name!r} (blob, tree or chunk)", param_hint="TYPE") from None
        object_id = repo.resolve(ident, expected)
        if expected == ObjectType.BLOB:
            _stream_blob(repo, repo.objects.get_blob(object_id))
        else:
            _write_stdout(repo.objects.get(object_id, expected))
        return
    object_id = repo.resolve(args[0])
    entry = repo.objects.locate(object_id)
    if show_type:
        click.echo(entry.type.label)
    elif show_size:
        if entry.type == ObjectType.BLOB:
            click.echo(repo.objects.get_blob(object_id).size)
        elif entry.type == ObjectType.TREE:
            click.echo(repo.objects.get_tree(object_id).size)
        else:
            click.echo(entry.raw_length)
    elif entry.type == ObjectType.BLOB:
        _stream_blob(repo, repo.objects.get_blob(object_id))
    elif entry.type == ObjectType.TREE:
        for e in repo.objects.get_tree(object_id).entries:
            click.echo(f"{e.mode:06o} {e.kind} {e.id or '-' * 32}\t{e.name}")
    else:
        _write_stdout(repo.objects.get(object_id))


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _stream_blob(repo: Repository, blob: Blob) -> None:
    out = sys.stdout.buffer
    for data in repo.objects.iter_blob(blob):
        out.write(data)
    out.flush()


@click.command("checkout-tree")
@click.option("-f", "--force", is_flag=True, help="Write into a non-empty directory, replacing files.")
@click.argument("tree")
@click.argument("directory", type=click.Path())
@pass_session
def checkout_tree_command(session: Session, force: bool, tree: str, directory: str) -> None:
    """Write the files of a tree into DIRECTORY.

    Refuses a non-empty directory unless -f. Never writes outside DIRECTORY.

    \b
    Example:
      keepsake checkout-tree 3f2a9c1 restored/
    """
    repo = session.repo
    tree_id = repo.resolve(tree, ObjectType.TREE)
    progress = ByteProgress("checkout-tree")
    repo.objects.progress = progress
    try:
        count = checkout_tree(repo.objects, tree_id, directory, force=force)
    finally:
        repo.objects.progress = None
        progress.close()
    click.echo(f"Checked out {count} files into {directory}", err=True)


def _expected_id(repo: Repository, text: str | None) -> tuple[bool, ObjectId | None]:
    """(checked, expected) for an OLDID argument; all zeros means "must not exist"."""
    if text is None:
        return False, None
    if text and set(text) == {"0"}:
        return True, None
    if not is_id_prefix(text):
        raise InvalidObjectId(text)
    if len(text) == 32:
        return True, ObjectId(text)
    try:
        return True, repo.resolve(text)
    except ObjectNotFound:
        # nothing has that id, so the ref cannot point at it: a compare that fails
        return True, ObjectId(text)


@click.command("update-ref")
@click.argument("name")
@click.argument("new_id", metavar="NEWID")
@click.argument("old_id", metavar="[OLDID]", required=False)
@pass_session
def update_ref_command(session: Session, name: str, new_id: str, old_id: str | None) -> None:
    """Point ref NAME at NEWID; with OLDID, only if it points at OLDID now.

    An OLDID of zeros means the ref must not exist yet. Fails (exit 7) when OLDID does not
    match, so concurrent updates are never lost.

    \b
    Example:
      keepsake update-ref tags/best 3f2a9c1
      keepsake update-ref tags/best 9b1d04e 3f2a9c1
    """
    repo = session.repo
    with repo.objects.operation():  # from finding NEWID to the ref: gc keeps it (FORMAT.md §11)
        new = repo.resolve(new_id)
        checked, expected = _expected_id(repo, old_id)
        repo.refs.set(name, new, expected, check=checked)


@click.command("delete-ref")
@click.argument("name")
@click.argument("old_id", metavar="[OLDID]", required=False)
@pass_session
def delete_ref_command(session: Session, name: str, old_id: str | None) -> None:
    """Delete ref NAME; with OLDID, only if it still points there.

    \b
    Example:
      keepsake delete-ref tags/old
    """
    repo = session.repo
    _, expected = _expected_id(repo, old_id)
    repo.refs.delete(name, expected)


@click.command("show-ref")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@click.argument("pattern", required=False)
@click.pass_context
def show_ref_command(ctx: click.Context, as_json: bool, pattern: str | None) -> None:
    """List refs (optionally matching a glob or prefix) and the ids they point at.

    Exits 1 when nothing matches.

    \b
    Example:
      keepsake show-ref 'tags/*'
    """
    refs = ctx.find_object(Session).repo.refs.list(pattern)  # type: ignore[union-attr]
    if as_json:
        echo_json(refs)
    else:
        for name, object_id in sorted(refs.items()):
            click.echo(f"{object_id} {name}")
    if not refs:
        ctx.exit(1)


@click.command("rev-parse")
@click.argument("names", nargs=-1, required=True)
@pass_session
def rev_parse_command(session: Session, names: tuple[str, ...]) -> None:
    """Print the full id for each ref name, full id or unique id prefix (7+ characters).

    Unknown names exit 4; ambiguous prefixes exit 5.

    \b
    Example:
      keepsake rev-parse 3f2a9c1 tags/best
    """
    repo = session.repo
    for name in names:
        click.echo(repo.resolve(name))


@click.command("count-objects")
@click.option("-v", "verbose", is_flag=True, help="Show packs, bytes and ratios.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@pass_session
def count_objects_command(session: Session, verbose: bool, as_json: bool) -> None:
    """Count objects and show stored, unique and logical bytes.

    logical: sizes of all distinct files; unique: after dedup (distinct chunks);
    stored: packs and indexes on storage (compressed).

    \b
    Example:
      keepsake count-objects -v
    """
    c = count_objects(session.repo)
    doc: dict[str, Any] = {
        "objects": sum(c.objects.values()),
        "by_type": c.objects,
        "packs": c.packs,
        "pack_bytes": c.pack_bytes,
        "index_files": c.index_files,
        "index_bytes": c.index_bytes,
        "stored_bytes": c.stored_bytes,
        "unique_bytes": c.unique_bytes,
        "logical_bytes": c.logical_bytes,
        "dedup_ratio": round(c.dedup_ratio, 4),
        "compression_ratio": round(c.compression_ratio, 4),
    }
    if as_json:
        echo_json(doc)
        return
    if not verbose:
        click.echo(f"{doc['objects']} objects, {format_bytes(c.stored_bytes)}")
        return
    types = ", ".join(f"{k} {v}" for k, v in sorted(c.objects.items()))
    click.echo(f"objects: {doc['objects']} ({types})")
    click.echo(f"packs: {c.packs} ({format_bytes(c.pack_bytes)})")
    click.echo(f"index files: {c.index_files} ({format_bytes(c.index_bytes)})")
    click.echo(f"logical bytes: {c.logical_bytes} ({format_bytes(c.logical_bytes)})")
    click.echo(f"unique bytes: {c.unique_bytes} ({format_bytes(c.unique_bytes)})")
    click.echo(f"stored bytes: {c.stored_bytes} ({format_bytes(c.stored_bytes)})")
    click.echo(f"dedup ratio: {c.dedup_ratio:.2f}x (logical / unique)")
    click.echo(f"compression ratio: {c.compression_ratio:.3f} (stored / unique)")


@click.command("fsck")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@click.option("--unreachable", "all_unreachable", is_flag=True, help="List unreachable chunks too.")
@click.option(
    "--repair",
    is_flag=True,
    help="Rebuild index files from pack footers and drop index entries of packs that are gone, "
    "then check again. Never deletes reachable data; unreachable garbage is left to keepsake gc.",
)
@click.pass_context
def fsck_command(ctx: click.Context, as_json: bool, all_unreachable: bool, repair: bool) -> None:
    """Verify every object's hash and everything reachable from refs.

    Lists missing, corrupt and unreachable objects (unreachable chunks only as a count,
    unless --unreachable), broken refs, undecodable index files and packs no index names,
    and which experiments and checkpoints reach damaged objects. Exits 1 when anything
    reachable is damaged.

    \b
    Example:
      keepsake fsck
      keepsake fsck --repair
    """
    session = ctx.find_object(Session)
    assert session is not None
    repaired = repair_repository(session.repo) if repair else None
    if repaired is not None and not as_json:
        for line in repaired.lines():
            click.echo(f"repair: {line}", err=True)
    report = fsck(session.repo)
    # FIX: a damaged unreachable chunk (detail set) is listed, never folded into the count
    hidden = [p for p in report.problems if p.kind == "unreachable" and p.type == "chunk" and not p.detail]
    problems = [p for p in report.problems if all_unreachable or as_json or p not in hidden]
    if as_json:
        echo_json(
            {
                "ok": not report.damaged,
                "objects_checked": report.objects_checked,
                "bytes_checked": report.bytes_checked,
                "refs_checked": report.refs_checked,
                "reachable": report.reachable,
                "problems": [p.__dict__ for p in problems],
                "affected": report.affected,
                "repair": repaired.__dict__ if repaired is not None else None,
            }
        )
    else:
        for p in problems:
            click.echo(p.line())
        for line in report.affected:
            click.echo(f"affected: {line}")
        if hidden and not all_unreachable:
            click.echo(f"unreachable chunks: {len(hidden)} (list them with --unreachable)")
        state = "damaged" if report.damaged else "ok"
        click.echo(
            f"fsck: {state}: checked {report.objects_checked} objects ({format_bytes(report.bytes_checked)}), "
            f"{report.refs_checked} refs, {report.reachable} reachable",
            err=True,
        )
    if report.damaged:
        ctx.exit(1)


COMMANDS = [
    init_command,
    hash_object_command,
    write_tree_command,
    ls_tree_command,
    cat_file_command,
    checkout_tree_command,
    update_ref_command,
    delete_ref_command,
    show_ref_command,
    rev_parse_command,
    count_objects_command,
    fsck_command,
]
