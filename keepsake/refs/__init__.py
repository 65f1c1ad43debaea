"""Refs: names that point at objects (FORMAT.md §9)."""

from keepsake.refs.names import check_ref_name
from keepsake.refs.store import RefStore

__all__ = ["RefStore", "check_ref_name"]
