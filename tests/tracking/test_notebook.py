"""ExperimentList in a notebook: DataFrame, plots (matplotlib, Agg) and the HTML table."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib
import numpy as np
import pytest

from keepsake.errors import InvalidArgument
from keepsake.tracking.experiment import Experiment
from keepsake.tracking.project import Project
from tests.tracking.conftest import reader

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_figure() -> Iterator[None]:
    plt.figure()
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, list[Experiment]]:
    """Three finished experiments, recorded once for this module's read-only tests."""
    root = tmp_path_factory.mktemp("notebook")
    project = Project(repository=str(root / "repo"), directory=str(root))
    return project, _record(project)


def _record(project: Project) -> list[Experiment]:
    runs = []
    for lr, losses in [(0.1, [0.9, 0.6, 0.7]), (0.01, [0.8, 0.4]), (0.001, [0.95, 0.9, 0.85, 0.5])]:
        e = project.start_experiment(path=None, params={"lr": lr, "batch": 32})
        for step, loss in enumerate(losses):
            e.checkpoint(step=step * 10, metrics={"loss": loss, "acc": 1 - loss}, primary_metric=("loss", "minimize"))
        e.stop()
        runs.append(e)
    return runs


def test_to_dataframe(recorded: tuple[Project, list[Experiment]]) -> None:
    project, runs = recorded
    a, b, c = runs
    df = reader(project).list().to_dataframe()
    assert list(df.index) == [a.id, b.id, c.id]
    assert list(df["params.lr"]) == [0.1, 0.01, 0.001]
    assert list(df["params.batch"]) == [32, 32, 32]
    assert list(df["best.loss"]) == [0.6, 0.4, 0.5]
    assert list(df["best.step"]) == [10, 10, 30]
    assert list(df["latest.loss"]) == [0.7, 0.4, 0.5]
    assert list(df["status"]) == ["stopped"] * 3
    assert str(df["created"].dt.tz) == "UTC"
    assert reader(project).list(filter="lr > 1").to_dataframe().empty


def test_plot_draws_one_line_per_experiment(recorded: tuple[Project, list[Experiment]]) -> None:
    project, runs = recorded
    a, b, c = runs
    ax = reader(project).list().plot("loss")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [a.short_id, b.short_id, c.short_id]
    assert list(lines[0].get_xdata()) == [0, 10, 20]
    assert list(lines[0].get_ydata()) == [0.9, 0.6, 0.7]
    assert list(lines[2].get_ydata()) == [0.95, 0.9, 0.85, 0.5]
    assert ax.get_ylabel() == "loss" and ax.get_xlabel() == "step"
    assert ax.get_legend() is not None

    plt.figure()
    ax = reader(project).list().plot()  # default: the primary metric
    assert [list(line.get_ydata()) for line in ax.get_lines()][1] == [0.8, 0.4]
    plt.figure()
    ax = reader(project).get(b.id).plot("acc", logy=True)
    assert np.allclose(ax.get_lines()[0].get_ydata(), [0.2, 0.6])
    assert ax.get_yscale() == "log"


def test_plot_without_a_metric_to_plot(project: Project) -> None:
    e = project.start_experiment(path=None)
    e.checkpoint(metrics={"loss": 1.0})
    e.stop()
    with pytest.raises(InvalidArgument, match="nothing to plot"):
        reader(project).list().plot()
    with pytest.raises(InvalidArgument, match="no primary metric"):
        reader(project).get(e.id).plot()


def test_scatter_plots_a_param_against_the_best_metric(recorded: tuple[Project, list[Experiment]]) -> None:
    project, runs = recorded
    ax = reader(project).list().scatter("lr", "loss", logx=True)
    [collection] = ax.collections
    assert collection.get_offsets().tolist() == [[0.1, 0.6], [0.01, 0.4], [0.001, 0.5]]
    assert ax.get_xlabel() == "lr" and ax.get_ylabel() == "loss" and ax.get_xscale() == "log"


def test_repr_html_lists_the_experiments(recorded: tuple[Project, list[Experiment]]) -> None:
    project, runs = recorded
    a, b, c = runs
    html = reader(project).list()._repr_html_()
    assert html.startswith("<table>") and html.endswith("</table>")
    for e in (a, b, c):
        assert f"<td>{e.short_id}</td>" in html
    assert "<th>lr</th>" in html  # a param that differs
    assert "<th>batch</th>" not in html  # the same everywhere
    assert html.count("<tr>") == 4
