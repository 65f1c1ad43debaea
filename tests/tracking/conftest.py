"""Fixtures for the experiment-tracking API tests: a project directory, a local repository
URL, a clean environment, subprocess helpers and an fsck check."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepsake.maintenance import fsck
from keepsake.repository import Repository
from keepsake.tracking.project import Project

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No repository from the environment, and remote index caches in the test's tmp dir.
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """A small project: code, a nested package and a data file."""
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "train.py").write_text("print('training')\n")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "model.py").write_text("LAYERS = 3\n")
    (root / "data.bin").write_bytes(os.urandom(20_000))
    return root


@pytest.fixture
def repo_url(tmp_path: Path) -> str:
    return str(tmp_path / "repo")


@pytest.fixture
def project(project_dir: Path, repo_url: str) -> Iterator[Project]:
    p = Project(repository=repo_url, directory=str(project_dir))
    yield p
    p.close()


def reader(project: Project) -> Project:
    """A second, independent Project on the same repository (as another process would be)."""
    return Project(repository=project.repository, directory=project.directory, storage_options=project.storage_options)


def assert_fsck_clean(repo: Repository, refs: bool = True) -> None:
    """fsck finds nothing damaged and no packs left by interrupted writes (with ``refs``,
    it also walked at least one ref)."""
    report = fsck(repo)
    assert not report.damaged, [p.line() for p in report.problems]
    assert not report.of_kind("unindexed-pack"), [p.line() for p in report.problems]
    assert report.refs_checked > 0 or not refs


def run_python(code: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Python script in a fresh interpreter (the dev venv's), from ``cwd``."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_python(code: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env
