"""The ``keepsake`` command: root group, repository selection, and error handling.

Errors become "error: ..." on stderr and the error's exit code here, in one place;
commands never call sys.exit (docs/CLI.md lists the codes).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from keepsake.version import __version__
from keepsake.cli.session import Session
from keepsake.errors import KeepsakeError

#: command -> the module (keepsake.cli.<name>) whose COMMANDS define it. A command's module
#: is imported when it runs (or for --help), so `keepsake ls` does not pay for importing
#: gc, transfers and the rest.
COMMAND_MODULES = {
    **dict.fromkeys(
        ["init", "hash-object", "write-tree", "ls-tree", "cat-file", "checkout-tree", "update-ref",
         "delete-ref", "show-ref", "rev-parse", "count-objects", "fsck"],
        "plumbing",
    ),
    **dict.fromkeys(["ls", "ps", "show", "diff", "checkout", "rm", "tag"], "porcelain"),
    **dict.fromkeys(["experiment", "commit"], "tracking"),
    "du": "usage",
    **dict.fromkeys(["push", "pull", "clone"], "sync"),
    "gc": "maintenance",
}


class KeepsakeGroup(click.Group):
    """Turns KeepsakeError into a one-line message and its exit code; loads commands lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            module = importlib.import_module(f"keepsake.cli.{COMMAND_MODULES[cmd_name]}")
            for command in module.COMMANDS:
                self.add_command(command)
        return super().get_command(ctx, cmd_name)

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


def main() -> None:
    cli(prog_name="keepsake")
