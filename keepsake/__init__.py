"""Keepsake: version control for machine learning.

Two lines in a training script::

    experiment = keepsake.init(path=".", params={"lr": 0.01})
    experiment.checkpoint(path="model.pth", step=1, metrics={"val_loss": 0.3},
                          primary_metric=("val_loss", "minimize"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keepsake.version import __version__

__all__ = [
    "Checkpoint",
    "Experiment",
    "ExperimentList",
    "KeepsakeError",
    "Project",
    "Repository",
    "__version__",
    "experiments",
    "init",
]

if TYPE_CHECKING:
    from keepsake.api import Checkpoint, Experiment, ExperimentList, Project, experiments, init
    from keepsake.errors import KeepsakeError
    from keepsake.repository import Repository

_LAZY = {
    "Checkpoint": "keepsake.api",
    "Experiment": "keepsake.api",
    "ExperimentList": "keepsake.api",
    "Project": "keepsake.api",
    "experiments": "keepsake.api",
    "init": "keepsake.api",
    "KeepsakeError": "keepsake.errors",
    "Repository": "keepsake.repository",
}


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import keepsake` stays fast (numpy, fsspec load later).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keepsake' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
