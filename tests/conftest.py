"""Shared pytest fixtures: local S3/GCS servers and the `backend_url` matrix."""

import os

# Must run before anything imports gcsfs (see tests/servers.py): otherwise gcsfs
# probes each bucket over gRPC+TLS and every GCS test hangs ~60 s.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Bare `pytest` (unlike `python -m pytest`) does not put the repo root on sys.path,
# so `tests.servers` would not import; add it once, here, for every test module.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.servers import GCSServer, S3Server, start_gcs, start_s3  # noqa: E402

BackendURL = tuple[str, dict[str, Any]]


def pytest_configure(config: pytest.Config) -> None:
    # Registered here rather than in setup.cfg so the harness is self-contained.
    config.addinivalue_line(
        "markers", "remote: needs a local S3/GCS server (deselect with -m 'not remote')"
    )


# Session scope: one server per test process (each xdist worker starts its own).
# Tests get isolation from fresh URLs (server.new_url), not from fresh servers.
# A test that stops/restarts a server should start a private one with
# start_s3()/start_gcs() instead of disturbing these shared ones.


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    server = start_gcs()
    yield server
    server.stop()


@pytest.fixture(
    params=[
        "memory",
        "local",
        pytest.param("s3", marks=pytest.mark.remote),
        pytest.param("gcs", marks=pytest.mark.remote),
    ]
)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> BackendURL:
    """(url, storage_options) of a fresh, not yet existing store location."""
    kind: str = request.param
    if kind == "memory":
        # fsspec's memory filesystem is one global dict per process: a unique root
        # keeps tests apart.
        return f"memory://test-{uuid.uuid4().hex}", {}
    if kind == "local":
        return str(tmp_path / "store"), {}
    # getfixturevalue: servers start only when a remote case actually runs, so
    # `-m "not remote"` never pays for them.
    server: S3Server | GCSServer = request.getfixturevalue(f"{kind}_server")
    return server.new_url("store"), server.storage_options
