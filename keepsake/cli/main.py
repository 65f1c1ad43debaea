"""The ``keepsake`` command: root group, repository selection, and error handling.

Errors become "error: ..." on stderr and the error's exit code here, in one place;
commands never call sys.exit (docs/CLI.md lists the codes).
"""

from __future__ import annotations

from typing import Any

import click

from keepsake.version import __version__
from keepsake.cli import maintenance, plumbing, porcelain, sync, tracking, usage
from keepsake.cli.session import Session
from keepsake.errors import KeepsakeError


class KeepsakeGroup(click.Group):
    """Turns KeepsakeError into a one-line message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeepsakeError as exc:
            # FIX: errors are one line (docs/CLI.md) even when a cause's text is not
            message = " ".join(str(exc).splitlines())
            click.echo(f"error: {message}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            ctx.exit(141)


@click.group(cls=KeepsakeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-R",
    "--repository",
    metavar="URL",
    help="Repository URL or path. Default: $KEEPSAKE_REPOSITORY, then 'repository:' in "
    "keepsake.yaml (searched upward), then ./.keepsake.",
)
@click.version_option(__version__, prog_name="keepsake")
@click.pass_context
def cli(ctx: click.Context, repository: str | None) -> None:
    """Keepsake: version control for machine learning.

    Track experiments from Python with keepsake.init() and experiment.checkpoint(), then
    list, compare and restore them here (ls, show, diff, checkout). Plumbing commands
    (hash-object, cat-file, ls-tree, ...) work on the object store directly, like git's.
    """
    session = Session(repository)
    ctx.obj = session
    ctx.call_on_close(session.close)


for command in [*plumbing.COMMANDS, *porcelain.COMMANDS, *tracking.COMMANDS, *usage.COMMANDS, *sync.COMMANDS, *maintenance.COMMANDS]:
    cli.add_command(command)


def main() -> None:
    cli(prog_name="keepsake")
