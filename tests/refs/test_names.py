"""Ref name rules (keepsake.refs.names, FORMAT.md §9), close to git's check-ref-format."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keepsake.errors import InvalidRefName, UsageError
from keepsake.refs.names import MAX_LENGTH, check_ref_name


@pytest.mark.parametrize(
    "name",
    [
        "tags/best",
        "experiments/abc",
        "checkpoints/run-1/step_100",
        "main",
        "tags/v1.0",
        "experiments/λ-run",
        "tags/日本語",
        "tags/émoji-🎉",
        "a.b/c-d_e+f=g,h@i",
        "x" * MAX_LENGTH,
    ],
)
def test_accepts(name: str) -> None:
    assert check_ref_name(name) == name


@pytest.mark.parametrize(
    "name,reason",
    [
        ("", "it is empty"),
        ("/a", "starts or ends with '/'"),
        ("a/", "starts or ends with '/'"),
        ("a//b", "empty part"),
        ("..", "'.' or '..' part"),
        ("a/../b", "'.' or '..' part"),
        ("a/./b", "'.' or '..' part"),
        (".", "'.' or '..' part"),
        (".hidden", "starts with '.'"),
        ("tags/.hidden", "starts with '.'"),
        ("x.lock", "ends with '.lock'"),
        ("tags/x.lock/y", "ends with '.lock'"),
        ("a\x01b", "control character"),
        ("a\x7fb", "control character"),
        ("a\nb", "control character"),
        ("a\x00b", "control character"),
        ("a b", "contains ' '"),
        ("a~b", "contains '~'"),
        ("a^b", "contains '^'"),
        ("a:b", "contains ':'"),
        ("a?b", "contains '?'"),
        ("a*b", "contains '*'"),
        ("a[b", "contains '['"),
        ("a\\b", "contains '\\\\'"),
        ("a@{b", "contains '@{'"),
        ("tags/@{-1}", "contains '@{'"),
        ("x" * (MAX_LENGTH + 1), f"longer than {MAX_LENGTH} bytes"),
        ("é" * (MAX_LENGTH // 2 + 1), f"longer than {MAX_LENGTH} bytes"),  # bytes, not chars
    ],
)
def test_rejects_with_the_reason(name: str, reason: str) -> None:
    with pytest.raises(InvalidRefName) as info:
        check_ref_name(name)
    error = info.value
    assert isinstance(error, UsageError)
    assert error.name == name
    assert reason in error.reason
    assert str(error) == f"invalid ref name {name!r}: {error.reason}"


@given(st.text(min_size=1, max_size=40))
def test_accepted_names_are_safe_storage_keys(name: str) -> None:
    """Whatever passes can be a key under refs/: no empty, '.' or '..' parts, no '/' ends."""
    try:
        check_ref_name(name)
    except InvalidRefName:
        return
    parts = name.split("/")
    assert all(part not in ("", ".", "..") and not part.startswith(".") for part in parts)
    assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name)
