"""The two-line API: ``keepsake.init()`` and ``keepsake.experiments``."""

from __future__ import annotations

from typing import Any

from keepsake.tracking.experiment import Checkpoint, Experiment
from keepsake.tracking.listing import ExperimentList
from keepsake.tracking.project import Project


def init(
    path: str | None = ".",
    params: dict[str, Any] | None = None,
    *,
    repository: str | None = None,
    directory: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Experiment:
    """Start recording an experiment: its code, params and environment.

    Args:
        path: the code to snapshot, a directory relative to the project directory
            (honours .keepsakeignore; skips .keepsake, .git, virtualenvs, __pycache__).
            None records no code.
        params: hyperparameters (numbers, strings, lists, dicts, numpy/torch values).
        repository: repository URL; default from $KEEPSAKE_REPOSITORY or keepsake.yaml
            (searched upward), else ``.keepsake`` in the project directory. Created when
            missing.
        directory: the project directory (default: keepsake.yaml's folder, else the
            current directory).
        storage_options: fsspec options for the repository URL.

    Returns:
        The running experiment: call ``.checkpoint(...)`` on it, and ``.stop()`` at the
        end (it is also stopped at exit, or marked failed on an uncaught exception).

    Example:
        >>> experiment = keepsake.init(path=".", params={"lr": 0.01})
        >>> experiment.checkpoint(path="model.pth", step=1, metrics={"val_loss": 0.3},
        ...                       primary_metric=("val_loss", "minimize"))
    """
    project = Project(repository=repository, directory=directory, storage_options=storage_options)
    return project.start_experiment(path=path, params=params)


class _DefaultExperiments:
    """``keepsake.experiments``: the experiments of the project in the current directory."""

    def list(self, filter: str | list[str] | None = None, sort: str | None = None) -> ExperimentList:
        return Project().list(filter, sort)

    def get(self, id_or_prefix: str) -> Experiment:
        return Project().get(id_or_prefix)


experiments = _DefaultExperiments()

__all__ = ["Checkpoint", "Experiment", "ExperimentList", "Project", "experiments", "init"]
