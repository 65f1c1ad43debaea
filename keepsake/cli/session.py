"""What CLI commands share: the selected project, and the repository once opened."""

from __future__ import annotations

import click

from keepsake.project import ProjectSettings, find_project
from keepsake.repository import Repository


class Session:
    """Built by the root group into ``ctx.obj``; the repository is opened on first use."""

    def __init__(self, repository: str | None) -> None:
        self._flag = repository
        self._project: ProjectSettings | None = None
        self._repo: Repository | None = None

    @property
    def project(self) -> ProjectSettings:
        if self._project is None:
            self._project = find_project(self._flag)
        return self._project

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = Repository.open(self.project.repository, self.project.storage_options)
        return self._repo

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()


pass_session = click.make_pass_decorator(Session)
