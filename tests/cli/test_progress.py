"""Progress lines on stderr: only on a terminal, and fed with the bytes actually written."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from keepsake.cli import display
from keepsake.cli.display import ByteProgress
from keepsake.objects.worktree import checkout_tree, write_tree
from keepsake.repository import Repository


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nothing_is_drawn_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = ByteProgress("checkout")
    progress.AFTER = progress.EVERY = 0.0
    progress(10 << 20)
    progress.close()
    assert capsys.readouterr().err == ""


def test_a_line_is_drawn_and_cleared_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(display.sys, "stderr", terminal)
    monkeypatch.setattr(ByteProgress, "AFTER", 0.0)
    monkeypatch.setattr(ByteProgress, "EVERY", 0.0)
    progress = ByteProgress("checkout")
    progress(3 << 20)
    progress.close()
    out = terminal.getvalue()
    assert "checkout: wrote 3.0 MiB" in out and out.endswith("\r\x1b[K")


def test_checkout_reports_every_byte_it_writes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    sizes = {"a.bin": 300_000, "sub/b.bin": 5_000, "empty": 0}
    for name, size in sizes.items():
        (src / name).write_bytes(random.Random(size).randbytes(size))
    repo = Repository.init(str(tmp_path / "repo"))
    with repo.objects.writer() as writer:
        tree_id, _ = write_tree(writer, repo.chunker, str(src))
    seen: list[int] = []
    repo.objects.progress = seen.append
    checkout_tree(repo.objects, tree_id, str(tmp_path / "out"))
    assert sum(seen) == sum(sizes.values())
