"""Recording from the command line: ``experiment start``, ``commit``, ``experiment stop``.

For training code that is not Python (or not yours): each command is one short process, so
the experiment is started *detached* (no heartbeat) and stays running until stopped.
"""

from __future__ import annotations

import os
from typing import Any

import click

from keepsake.cli.porcelain import info, open_project
from keepsake.cli.session import Session, pass_session
from keepsake.errors import InvalidArgument, PathNotFound, WrongObjectType
from keepsake.tracking.experiment import Checkpoint, Experiment
from keepsake.tracking.listing import parse_value
from keepsake.tracking.project import Project


def parse_assignment(text: str, option: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value); the value is JSON when it parses, else the string.

    Raises:
        InvalidArgument: no ``=``, or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidArgument(f"{option} {text!r}: write KEY=VALUE (e.g. {option} lr=0.01)")
    return key, parse_value(raw)


def parse_assignments(texts: tuple[str, ...], option: str) -> dict[str, Any]:
    return dict(parse_assignment(text, option) for text in texts)


def parse_primary_metric(text: str | None) -> tuple[str, str] | None:
    """``NAME:GOAL`` -> (name, goal); the goal is checked by the API."""
    if text is None:
        return None
    name, sep, goal = text.rpartition(":")
    if not sep or not name:
        raise InvalidArgument(f"--primary-metric {text!r}: write NAME:GOAL, e.g. val_loss:minimize")
    return name, goal


def project_path(project: Project, path: str, option: str) -> str:
    """A path given relative to the current directory, as an absolute path inside the
    project directory."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, project.directory)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise PathNotFound(path, f"{option} must be inside the project directory {project.directory}")
    return full


def find_experiment(project: Project, ident: str) -> Experiment:
    """The experiment ``ident`` names. Raises WrongObjectType for a checkpoint."""
    found = project.resolve(ident)
    if isinstance(found, Checkpoint):
        raise WrongObjectType(found.id, "experiment", "checkpoint")
    return found


@click.group("experiment")
def experiment_group() -> None:
    """Start and stop experiments from the command line (record checkpoints with commit).

    \b
    Example:
      id=$(keepsake experiment start --path src --param lr=0.01)
      ./train --lr 0.01 --out model.bin
      keepsake commit $id --path model.bin --metric loss=0.31 --primary-metric loss:minimize
      keepsake experiment stop $id
    """


@experiment_group.command("start")
@click.option(
    "--path",
    "path",
    metavar="DIR",
    help="The code to record, a directory inside the project. Default: the project directory.",
)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A param; VALUE is JSON or text. Repeatable.")
@pass_session
def start_command(session: Session, path: str | None, params: tuple[str, ...]) -> None:
    """Start an experiment and print its id.

    The experiment records its code, params, user, host, command, Python packages and git
    state. It is detached: it keeps running until "keepsake experiment stop".
    The repository is created if it does not exist.

    \b
    Example:
      keepsake experiment start --path . --param lr=0.01 --param layers='[64, 64]'
    """
    values = parse_assignments(params, "--param")
    project = open_project(session)
    code = project_path(project, path, "--path") if path is not None else "."
    experiment = project.start_experiment(path=code, params=values, detached=True)
    click.echo(experiment.id)
    info(
        f"Started experiment {experiment.short_id}; record checkpoints with "
        f'"keepsake commit {experiment.short_id}", end it with "keepsake experiment stop {experiment.short_id}"'
    )


@experiment_group.command("stop")
@click.option("--failed", is_flag=True, help="Mark it failed rather than stopped.")
@click.argument("ident", metavar="EXPERIMENT")
@pass_session
def stop_command(session: Session, failed: bool, ident: str) -> None:
    """Mark a running experiment stopped (or failed). Stopping a stopped one does nothing.

    \b
    Example:
      keepsake experiment stop 7e94c9d
      keepsake experiment stop --failed 7e94c9d
    """
    project = open_project(session)
    found = find_experiment(project, ident)
    if found.status in ("stopped", "failed"):
        info(f"Experiment {found.short_id} is already {found.status}")
        return
    status = "failed" if failed else "stopped"
    project.attach(found.id).stop(status)
    info(f"Experiment {found.short_id} {status}")


@click.command("commit")
@click.option("--path", "path", metavar="PATH", help="A file or directory to save with the checkpoint.")
@click.option("--step", type=int, help="The training step. Default: the previous step + 1 (0 at first).")
@click.option("--metric", "metrics", multiple=True, metavar="KEY=VALUE", help="A metric; VALUE is JSON or text. Repeatable.")
@click.option("--primary-metric", metavar="NAME:GOAL", help="The metric that ranks checkpoints; GOAL: minimize or maximize.")
@click.argument("ident", metavar="EXPERIMENT")
@pass_session
def commit_command(
    session: Session, path: str | None, step: int | None, metrics: tuple[str, ...], primary_metric: str | None, ident: str
) -> None:
    """Record a checkpoint of a running experiment and print its id.

    \b
    Example:
      keepsake commit 7e94c9d --path model.pth --step 10 \\
          --metric val_loss=0.21 --metric accuracy=0.93 --primary-metric val_loss:minimize
    """
    values = parse_assignments(metrics, "--metric")
    primary = parse_primary_metric(primary_metric)
    project = open_project(session)
    found = find_experiment(project, ident)
    saved = project_path(project, path, "--path") if path is not None else None
    checkpoint = project.attach(found.id).checkpoint(path=saved, step=step, metrics=values, primary_metric=primary)
    click.echo(checkpoint.id)
    info(f"Recorded checkpoint {checkpoint.short_id} (step {checkpoint.step}) of experiment {found.short_id}")


COMMANDS: list[click.Command] = [experiment_group, commit_command]
