"""How the CLI shows things: byte sizes, ratios, JSON."""

from __future__ import annotations

import json
from typing import Any

import click


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))
