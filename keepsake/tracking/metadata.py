"""What an experiment records about where it ran: user, host, command, Python, packages, git."""

from __future__ import annotations

import getpass
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def experiment_ref(experiment_id: str) -> str:
    """The ref that names an experiment's head."""
    return f"experiments/{experiment_id}"


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return os.environ.get("USER", "")


def current_host() -> str:
    return socket.gethostname()


def current_command() -> tuple[str, ...]:
    return tuple(sys.argv)


def python_version() -> str:
    return platform.python_version()


def python_packages() -> dict[str, str]:
    """Installed distributions and their versions (sorted by lowercase name)."""
    packages: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            # FIX (tests/tracking/test_api.py): distributions come in sys.path order and the
            # first is the one Python imports; later copies (e.g. an older one in the user
            # site) used to overwrite it, recording a version that was not in use.
            packages.setdefault(name, dist.version)
    return dict(sorted(packages.items(), key=lambda kv: kv[0].lower()))


def _git(directory: str, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state(directory: str) -> dict[str, Any] | None:
    """Commit, branch and dirty state of the git work tree at ``directory``, or None."""
    commit = _git(directory, "rev-parse", "HEAD")
    if not commit:
        return None
    branch = _git(directory, "rev-parse", "--abbrev-ref", "HEAD")
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "branch": branch if branch and branch != "HEAD" else None, "dirty": bool(status)}
