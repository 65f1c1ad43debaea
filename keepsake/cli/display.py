"""How the CLI shows things: byte sizes, values, times, tables, JSON."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import date, datetime, timezone
from typing import Any

import click

from keepsake.objects.values import loaded_numpy

#: how the JSON output spells the floats JSON has no token for (docs/CLI.md, "JSON output")
NAN, INFINITY, NEG_INFINITY = "NaN", "Infinity", "-Infinity"


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def to_json_value(value: Any) -> Any:
    """``value`` as plain JSON data: NaN and +/-inf become the strings "NaN", "Infinity"
    and "-Infinity", numpy arrays and scalars become lists and numbers, datetimes become
    ISO 8601 strings, tuples become lists.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return NAN
        if math.isinf(value):
            return INFINITY if value > 0 else NEG_INFINITY
        return value
    np = loaded_numpy()
    if np is not None and isinstance(value, np.ndarray):
        return to_json_value(value.tolist())
    if np is not None and isinstance(value, np.generic):
        return to_json_value(value.item())
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return str(value)


def dump_json(value: Any) -> str:
    """Canonical JSON text of ``value`` (always valid JSON: no NaN tokens)."""
    return json.dumps(to_json_value(value), indent=2, sort_keys=True, allow_nan=False)


def echo_json(value: Any) -> None:
    click.echo(dump_json(value))


def format_value(value: Any, max_length: int | None = None) -> str:
    """A param or metric for people: JSON-like (``true``, ``null``, ``[1, 2]``), strings
    bare, NaN/inf spelled as in the JSON output.

    With ``max_length`` (tables): floats get 5 significant digits and long text is cut
    with ``...``.
    """
    np = loaded_numpy()
    if np is not None and isinstance(value, np.ndarray):
        if value.size > 8:
            text = f"array(shape={list(value.shape)}, dtype={value.dtype})"
        else:
            text = json.dumps(to_json_value(value))
    elif isinstance(value, float) and not math.isfinite(value):
        text = to_json_value(value)
    elif isinstance(value, float):
        text = f"{value:.5g}" if max_length is not None else repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(to_json_value(value), sort_keys=True)
    if max_length is not None and len(text) > max_length:
        text = text[: max(max_length - 3, 1)] + "..."
    return text


def format_ago(when: datetime, now: datetime | None = None) -> str:
    """``"3 minutes ago"``: seconds, minutes, hours, days, months; a date after a year."""
    now = now or datetime.now(timezone.utc)
    seconds = (now - when).total_seconds()
    if seconds < -60 or seconds >= 365 * 86400:
        return when.astimezone().strftime("%Y-%m-%d")
    for unit, size in (("month", 30 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"


def format_time(when: datetime) -> str:
    """An absolute time in the local time zone, e.g. ``2026-11-26 10:04:31 CET``."""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def format_table(headings: Sequence[str], rows: Sequence[Sequence[str]], gap: int = 2) -> list[str]:
    """Left-aligned columns ``gap`` spaces apart (like Go's tabwriter); no trailing blanks."""
    widths = [len(h) for h in headings]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headings), *rows]:
        cells = [cell.ljust(widths[i] + gap) for i, cell in enumerate(row)]
        lines.append("".join(cells).rstrip())
    return lines


def format_fields(pairs: Sequence[tuple[str, str]], indent: str = "") -> list[str]:
    """``Name:  value`` lines with the values aligned."""
    if not pairs:
        return []
    width = max(len(name) for name, _ in pairs) + 1
    return [f"{indent}{(name + ':').ljust(width)}  {value}".rstrip() for name, value in pairs]


class ByteProgress:
    """``checkout: wrote 1.2 GiB (850 MB/s)`` on one self-overwriting stderr line, only when
    stderr is a terminal and the work lasts more than a moment; cleared by :meth:`close`."""

    #: redraw at most this often, and start drawing only after this long (seconds)
    EVERY = 0.1
    AFTER = 1.0

    def __init__(self, verb: str, enabled: bool = True) -> None:
        self._verb = verb
        self._enabled = enabled and sys.stderr.isatty()
        self._start = time.monotonic()
        self._last = 0.0
        self._done = 0
        self._drawn = False

    def __call__(self, n: int) -> None:
        self._done += n
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._start < self.AFTER or now - self._last < self.EVERY:
            return
        self._last = now
        rate = self._done / max(now - self._start, 1e-9)
        click.echo(f"\r\x1b[K{self._verb}: wrote {format_bytes(self._done)} ({format_bytes(rate)}/s)", err=True, nl=False)
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            click.echo("\r\x1b[K", err=True, nl=False)

