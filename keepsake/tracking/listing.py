"""Lists of experiments: filtering, sorting, tables, DataFrames and plots."""

from __future__ import annotations

import html
import json
import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from keepsake.errors import InvalidArgument
from keepsake.objects.values import is_number

if TYPE_CHECKING:
    from keepsake.tracking.experiment import Experiment

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_FILTER = re.compile(r"^\s*(?P<key>[^<>=!]+?)\s*(?P<op><=|>=|!=|=|<|>)\s*(?P<value>.*?)\s*$")
BUILTIN_KEYS = ("created", "started", "step", "user", "host", "status", "id")
#: keys whose filter values are dates (``started`` is the original Keepsake's name)
DATE_KEYS = ("created", "started")
_MISSING = object()


@dataclass(frozen=True)
class Filter:
    key: str
    op: str
    value: Any

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.value!r}"


def parse_value(text: str) -> Any:
    """A filter value: JSON when it parses (numbers, true, "quoted"), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_filter(text: str) -> Filter:
    """Parse ``"NAME OP VALUE"`` (operators ``= != < <= > >=``). Raises InvalidArgument."""
    match = _FILTER.match(text)
    if not match or not match["value"]:
        raise InvalidArgument(
            f'malformed filter {text!r}: write "NAME OP VALUE" with OP one of = != < <= > >= '
            '(e.g. "val_loss < 0.2" or "status = running")'
        )
    key, op, raw = match["key"], match["op"], match["value"]
    value: Any = parse_value(raw)
    if key in DATE_KEYS:
        value = _parse_date(raw)
    return Filter(key, op, value)


def _parse_date(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip("\"'"))
    except ValueError as exc:
        raise InvalidArgument(f"cannot compare created with {text!r}: use a date like 2026-11-26 or 2026-11-26T10:00") from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def value_of(experiment: Experiment, key: str) -> Any:
    """The value ``key`` names for an experiment (used by filter, sort and ls columns).

    Keys: created (or started), step, user, host, status, id; ``params.NAME`` or
    ``metrics.NAME``; or a bare NAME, looked up in params, then in the metrics of the best
    checkpoint (the latest when there is no primary metric). Missing values are ``_MISSING``.
    """
    if key in DATE_KEYS:
        return experiment.created
    if key in ("user", "host", "status", "id"):
        return getattr(experiment, key)
    checkpoint = experiment.best() or experiment.latest()
    if key == "step":
        return checkpoint.step if checkpoint and checkpoint.step is not None else _MISSING
    if key.startswith("params."):
        return experiment.params.get(key[7:], _MISSING)
    if key.startswith("metrics."):
        return checkpoint.metrics.get(key[8:], _MISSING) if checkpoint else _MISSING
    if key in experiment.params:
        return experiment.params[key]
    if checkpoint is not None and key in checkpoint.metrics:
        return checkpoint.metrics[key]
    return _MISSING


def _comparable(a: Any, b: Any) -> bool:
    if is_number(a) and is_number(b):
        return True
    return type(a) is type(b) or (isinstance(a, datetime) and isinstance(b, datetime))


def _kind(value: Any) -> str:
    return "number" if is_number(value) else type(value).__name__


def _matches(experiment: Experiment, f: Filter) -> bool:
    value = value_of(experiment, f.key)
    if value is _MISSING:
        return False
    if not _comparable(value, f.value):
        raise InvalidArgument(
            f"filter {f.key} {f.op} {json.dumps(f.value, default=str)} compares different types: "
            f"{f.key} is a {_kind(value)} in experiment {experiment.short_id}, the value is a {_kind(f.value)}"
        )
    try:
        return bool(OPERATORS[f.op](value, f.value))
    except TypeError as exc:
        raise InvalidArgument(f"filter {f} cannot compare {_kind(value)} values with {f.op}") from exc


def parse_sort(text: str) -> tuple[str, bool]:
    """``KEY`` or ``KEY-desc`` -> (key, descending)."""
    if text.endswith("-desc"):
        return text[: -len("-desc")], True
    if text.endswith("-asc"):
        return text[: -len("-asc")], False
    return text, False


def is_known_key(key: str, names: Iterable[str]) -> bool:
    """Whether ``key`` names a builtin key or one of ``names`` (params and metrics), bare or
    as ``params.NAME`` / ``metrics.NAME``."""
    names = set(names)
    if key in BUILTIN_KEYS or key in names:
        return True
    for prefix in ("params.", "metrics."):
        if key.startswith(prefix) and key[len(prefix) :] in names:
            return True
    return False


def describe_keys(names: Iterable[str], limit: int = 20) -> str:
    """The builtin keys, then up to ``limit`` param and metric names, for an error message."""
    extra = sorted(set(names) - set(BUILTIN_KEYS))
    shown = [*BUILTIN_KEYS, *extra[:limit]]
    more = f" and {len(extra) - limit} more" if len(extra) > limit else ""
    return ", ".join(shown) + more


def _sort_value(value: Any) -> Any:
    # NaN is unordered: sorting it among numbers would scramble the result, so it counts as missing
    if value is _MISSING or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return value


class ExperimentList(list):  # type: ignore[type-arg]
    """A list of experiments with table, DataFrame and plotting helpers."""

    def filter(self, f: Filter) -> ExperimentList:
        return ExperimentList(e for e in self if _matches(e, f))

    def sorted_by(self, text: str, known_keys: Iterable[str] | None = None) -> ExperimentList:
        """Sort by a key (see :func:`value_of`); experiments without it (or with NaN) go last,
        in their previous order.

        Args:
            known_keys: keys that exist even if no experiment of this list has them (e.g.
                every key of the unfiltered list); default: :meth:`keys`.

        Raises:
            InvalidArgument: the key is unknown, or its values are of mixed types.
        """
        key, descending = parse_sort(text)
        values = [(_sort_value(value_of(e, key)), e) for e in self]
        present = [(v, e) for v, e in values if v is not _MISSING]
        missing = [e for v, e in values if v is _MISSING]
        known = set(known_keys) if known_keys is not None else self.keys()
        if self and not present and not is_known_key(key, known):
            raise InvalidArgument(f"unknown sort key {key!r} (known keys: {describe_keys(known)})")
        kinds = {_kind(v) for v, _ in present}
        if len(kinds) > 1:
            raise InvalidArgument(f"cannot sort by {key!r}: its values have different types ({', '.join(sorted(kinds))})")
        try:
            present.sort(key=lambda ve: ve[0], reverse=descending)
        except TypeError as exc:  # e.g. dicts: one type, but no order
            raise InvalidArgument(f"cannot sort by {key!r}: its values ({', '.join(sorted(kinds))}) have no order") from exc
        return ExperimentList([e for _, e in present] + missing)

    def keys(self) -> set[str]:
        """Every param and metric name used by these experiments."""
        out: set[str] = set()
        for e in self:
            out.update(e.params)
            for c in e._summary.checkpoints:
                out.update(c.metrics)
        return out

    def param_columns(self, all: bool = False) -> list[str]:
        """The params ``keepsake ls`` shows: those that differ between experiments (every
        param with ``all``), sorted; dict-valued params are left to ``show``."""
        names = sorted({k for e in self for k in e.params}) if all else self.differing_params()
        return [n for n in names if not any(isinstance(e.params.get(n), dict) for e in self)]

    def metric_columns(self, all: bool = False) -> list[str]:
        """The metrics ``keepsake ls`` shows next to checkpoints: the primary metrics of the
        best checkpoints, or with ``all`` every metric of the best (else latest) checkpoints."""
        names: set[str] = set()
        for e in self:
            if all:
                checkpoint = e.best() or e.latest()
                names.update(checkpoint.metrics if checkpoint else ())
            else:
                best = e.best()
                if best is not None and best.primary_metric:
                    names.add(best.primary_metric[0])
        return sorted(names)

    def differing_params(self) -> list[str]:
        """Params whose values differ between experiments (or that only some have)."""
        names = sorted({k for e in self for k in e.params})
        out = []
        for name in names:
            seen = {json.dumps(e.params.get(name, "<missing>"), sort_keys=True, default=str) for e in self}
            if len(seen) > 1:
                out.append(name)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per experiment: id, created, status, params, best and latest metrics."""
        rows = []
        for e in self:
            row: dict[str, Any] = {"id": e.id, "created": e.created, "status": e.status, "user": e.user, "host": e.host}
            for k, v in e.params.items():
                row[f"params.{k}"] = v
            best, latest = e.best(), e.latest()
            if best is not None:
                row["best.step"] = best.step
                for k, v in best.metrics.items():
                    row[f"best.{k}"] = v
            if latest is not None:
                row["latest.step"] = latest.step
                for k, v in latest.metrics.items():
                    row[f"latest.{k}"] = v
            rows.append(row)
        return rows

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per experiment (``pip install pandas``)."""
        import pandas as pd  # optional dependency, imported on use

        return pd.DataFrame(self.rows()).set_index("id") if self else pd.DataFrame()

    def plot(self, metric: str | None = None, logy: bool = False) -> Any:
        """Plot a metric against step for every experiment, on one set of axes."""
        import matplotlib.pyplot as plt

        ax = None
        for e in self:
            name = metric or (e.primary_metric() or (None, None))[0]
            if name is None:
                continue
            ax = e.plot(name, logy=logy)
        if ax is None:
            raise InvalidArgument("nothing to plot: give a metric name (no experiment has a primary metric)")
        ax.legend()
        return plt.gca()

    def scatter(self, param: str, metric: str, logx: bool = False, logy: bool = False) -> Any:
        """Scatter a param against the best value of a metric, one point per experiment."""
        import matplotlib.pyplot as plt

        xs, ys = [], []
        for e in self:
            checkpoint = e.best() or e.latest()
            if param in e.params and checkpoint is not None and is_number(checkpoint.metrics.get(metric)):
                xs.append(e.params[param])
                ys.append(checkpoint.metrics[metric])
        ax = plt.gca()
        ax.scatter(xs, ys)
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        return ax

    def _repr_html_(self) -> str:
        params = self.differing_params()
        head = ["id", "created", "status", *params, "best checkpoint", "metrics"]
        lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
        for e in self:
            best = e.best() or e.latest()
            cells = [
                e.short_id,
                e.created.strftime("%Y-%m-%d %H:%M:%S"),
                e.status,
                *[json.dumps(e.params.get(p), default=str) for p in params],
                f"{best.short_id} (step {best.step})" if best else "",
                ", ".join(f"{k}={v}" for k, v in best.metrics.items()) if best else "",
            ]
            lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        lines.append("</table>")
        return "\n".join(lines)
