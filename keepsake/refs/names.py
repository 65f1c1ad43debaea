"""Ref name rules (FORMAT.md §9), close to git's check-ref-format."""

from __future__ import annotations

from keepsake.errors import InvalidRefName

MAX_LENGTH = 1024


def check_ref_name(name: str) -> str:
    """Return ``name`` when it is a valid ref name, else raise InvalidRefName.

    A ref name is one or more ``/``-separated parts. Refused: empty names and parts, a
    leading or trailing ``/``, ``.`` and ``..`` parts, parts starting with ``.`` or ending in
    ``.lock``, control characters, space, and any of ``~^:?*[\\``.
    """
    if not name:
        raise InvalidRefName(name, "it is empty")
    if len(name.encode()) > MAX_LENGTH:
        raise InvalidRefName(name, f"it is longer than {MAX_LENGTH} bytes")
    if name.startswith("/") or name.endswith("/"):
        raise InvalidRefName(name, "it starts or ends with '/'")
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise InvalidRefName(name, "it contains a control character")
        if ch in " ~^:?*[\\":
            raise InvalidRefName(name, f"it contains {ch!r}")
    for part in name.split("/"):
        if not part:
            raise InvalidRefName(name, "it has an empty part ('//')")
        if part in (".", ".."):
            raise InvalidRefName(name, "it has a '.' or '..' part")
        if part.startswith("."):
            raise InvalidRefName(name, "a part starts with '.'")
        if part.endswith(".lock"):
            raise InvalidRefName(name, "a part ends with '.lock'")
    if "@{" in name:
        raise InvalidRefName(name, "it contains '@{'")
    return name
