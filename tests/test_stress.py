"""Stress: 4 writer processes checkpoint into one repository while gc --grace 0 runs in a
loop (issue 5). Short runs here; scripts/stress-gc runs the same harness for longer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import S3Server
from tests.stress_gc import run_stress


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))


def check(url: str, seconds: float) -> None:
    from keepsake.repository import Repository

    Repository.init(url)
    result = run_stress(url, {}, writers=4, seconds=seconds)
    print(result.line())
    assert not result.writer_errors, result.writer_errors[0]
    assert not result.problems, result.problems[:10]
    assert result.gc_rounds >= 2 and result.dead_objects > 0, result.line()  # gc really deleted
    assert result.checkpoints_checked > 0, result.line()


@pytest.mark.slow
def test_writers_and_gc_on_a_local_repository(tmp_path: Path) -> None:
    check(str(tmp_path / "repo"), seconds=12)


@pytest.mark.slow
@pytest.mark.remote
def test_writers_and_gc_on_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    check(s3_server.new_url("stress"), seconds=15)
