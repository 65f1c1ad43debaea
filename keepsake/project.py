"""ProjectSettings: where a working directory keeps its repository (``keepsake.yaml``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from keepsake.errors import ConfigError

CONFIG_FILE = "keepsake.yaml"
DEFAULT_REPOSITORY = ".keepsake"
ENV_REPOSITORY = "KEEPSAKE_REPOSITORY"
KNOWN_KEYS = frozenset({"repository", "storage_options", "remote", "remote_storage_options"})


@dataclass(frozen=True)
class ProjectSettings:
    """A project directory and the repository URL (and storage options) it uses."""

    directory: str
    repository: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    config_path: str | None = None
    #: where ``keepsake push`` and ``pull`` go by default (``remote:`` in keepsake.yaml)
    remote: str | None = None
    remote_storage_options: dict[str, Any] = field(default_factory=dict)


def find_config(start: str) -> str | None:
    """Return the nearest ``keepsake.yaml`` at or above ``start``, or None."""
    current = os.path.abspath(start)
    while True:
        candidate = os.path.join(current, CONFIG_FILE)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def load_config(path: str) -> dict[str, Any]:
    """Parse a keepsake.yaml. Raises ConfigError on bad YAML or unknown keys."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        # FIX: str(exc) of a YAML error spans several lines; errors are one line
        raise ConfigError(path, f"it is not valid YAML ({_yaml_problem(exc)})") from exc
    except UnicodeDecodeError as exc:  # FIX: was an uncaught traceback
        raise ConfigError(path, f"it is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:  # FIX: unreadable file was an uncaught traceback
        raise ConfigError(path, exc.strerror or str(exc)) from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(path, "it must be a mapping of keys to values")
    unknown = sorted(set(map(str, doc)) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(path, f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})")
    if "repository" in doc and not isinstance(doc["repository"], str):
        raise ConfigError(path, "'repository' must be a string URL or path")
    if "storage_options" in doc and not isinstance(doc["storage_options"], dict):
        raise ConfigError(path, "'storage_options' must be a mapping")
    if "remote" in doc and not isinstance(doc["remote"], str):
        raise ConfigError(path, "'remote' must be a string URL or path")
    if "remote_storage_options" in doc and not isinstance(doc["remote_storage_options"], dict):
        raise ConfigError(path, "'remote_storage_options' must be a mapping")
    return doc


def write_config(directory: str, doc: dict[str, Any]) -> str:
    """Write ``doc`` as ``directory/keepsake.yaml`` (used by ``keepsake clone``); returns
    its path. The keys are checked as :func:`load_config` would read them back."""
    path = os.path.join(directory, CONFIG_FILE)
    unknown = sorted(set(doc) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(path, f"unknown keys {', '.join(unknown)}")
    try:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(doc, f, default_flow_style=False, sort_keys=True)
    except OSError as exc:
        raise ConfigError(path, exc.strerror or str(exc)) from exc
    return path


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML error: the problem and where it is."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _absolute(url: str, base: str) -> str:
    if "://" in url or os.path.isabs(url):
        return url
    return os.path.normpath(os.path.join(base, os.path.expanduser(url)))


def find_project(repository: str | None = None, cwd: str | None = None) -> ProjectSettings:
    """Work out the repository to use, in order: ``repository`` (a -R flag), the
    KEEPSAKE_REPOSITORY variable, ``repository:`` in the nearest keepsake.yaml, else
    ``.keepsake`` in the current directory.
    """
    cwd = os.path.abspath(cwd or os.getcwd())
    config_path = find_config(cwd)
    doc = load_config(config_path) if config_path else {}
    directory = os.path.dirname(config_path) if config_path else cwd
    options = dict(doc.get("storage_options") or {})
    # a relative remote is a path relative to keepsake.yaml, like ``repository``
    remote = _absolute(doc["remote"], directory) if "remote" in doc else None
    remote_options = dict(doc.get("remote_storage_options") or {})
    if repository:
        url = _absolute(repository, cwd)
    elif os.environ.get(ENV_REPOSITORY):
        url = _absolute(os.environ[ENV_REPOSITORY], cwd)
    elif "repository" in doc:
        url = _absolute(doc["repository"], directory)
    else:
        url = os.path.join(directory, DEFAULT_REPOSITORY)
    return ProjectSettings(directory, url, options, config_path, remote, remote_options)
