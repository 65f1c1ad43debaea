"""The local S3/GCS test servers behave like object stores through plain fsspec."""

from typing import Any

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

from tests.servers import GCSServer, S3Server, start_s3

Server = S3Server | GCSServer
remote = pytest.mark.remote


@pytest.fixture(params=[pytest.param("s3", marks=remote), pytest.param("gcs", marks=remote)])
def server(request: pytest.FixtureRequest) -> Server:
    return request.getfixturevalue(f"{request.param}_server")  # type: ignore[no-any-return]


def _fs_and_root(server: Server) -> tuple[AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(server.new_url("harness"), **server.storage_options)
    return fs, root


def test_write_read_ranged_list_delete(server: Server) -> None:
    fs, root = _fs_and_root(server)
    data = bytes(range(256)) * 4
    fs.pipe_file(f"{root}/a/one", data)
    fs.pipe_file(f"{root}/a/two", b"second")
    fs.pipe_file(f"{root}/b", b"")

    assert fs.cat_file(f"{root}/a/one") == data
    assert fs.cat_file(f"{root}/a/one", start=10, end=20) == data[10:20]
    assert fs.cat_file(f"{root}/a/one", start=1000) == data[1000:]
    assert fs.cat_ranges([f"{root}/a/one", f"{root}/a/two"], [3, 1], [7, 4]) == [
        data[3:7],
        b"eco",
    ]
    assert fs.cat_file(f"{root}/b") == b""
    assert fs.info(f"{root}/a/two")["size"] == 6

    assert sorted(fs.find(root)) == [f"{root}/a/one", f"{root}/a/two", f"{root}/b"]
    assert sorted(fs.ls(f"{root}/a", detail=False)) == [f"{root}/a/one", f"{root}/a/two"]

    fs.rm_file(f"{root}/a/one")
    assert not fs.exists(f"{root}/a/one")
    assert sorted(fs.find(root)) == [f"{root}/a/two", f"{root}/b"]


def test_missing_key_is_file_not_found(server: Server) -> None:
    fs, root = _fs_and_root(server)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/missing")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/missing", start=0, end=4)
    with pytest.raises(FileNotFoundError):
        fs.info(f"{root}/missing")
    assert fs.find(root) == []


def test_listing_is_fresh_across_instances(server: Server) -> None:
    # storage_options turn listing caches off: a second, independent client must
    # see objects written by the first after it has already listed the prefix.
    opts: dict[str, Any] = server.storage_options
    fs1, root = _fs_and_root(server)
    fs2 = fsspec.filesystem(fs1.protocol[0], skip_instance_cache=True, **opts)
    fs1.pipe_file(f"{root}/x", b"1")
    assert fs2.ls(root, detail=False) == [f"{root}/x"]
    fs1.pipe_file(f"{root}/y", b"2")
    assert sorted(fs2.ls(root, detail=False)) == [f"{root}/x", f"{root}/y"]
    assert fs2.info(f"{root}/y")["size"] == 1


@remote
def test_s3_conditional_writes(s3_server: S3Server) -> None:
    fs, root = _fs_and_root(s3_server)
    bucket, key = root.split("/", 1)
    out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"v1")
    etag = out["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert fs.info(root)["ETag"] == etag

    with pytest.raises(FileExistsError):
        fs.pipe_file(root, b"v2", mode="create")
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"v2", IfMatch=etag)
    with pytest.raises(OSError) as stale:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"v3", IfMatch=etag)
    assert not isinstance(stale.value, FileExistsError)
    assert fs.cat_file(root) == b"v2"


@remote
def test_gcs_reports_generation(gcs_server: GCSServer) -> None:
    fs, root = _fs_and_root(gcs_server)
    fs.pipe_file(root, b"v1")
    first = fs.info(root)["generation"]
    fs.pipe_file(root, b"v2")
    assert fs.info(root)["generation"] != first


@remote
def test_private_s3_server_restart_keeps_port_and_data() -> None:
    server = start_s3()
    try:
        fs, root = _fs_and_root(server)
        fs.pipe_file(f"{root}/k", b"kept")
        port = server.port
        server.stop()
        server.start()
        assert server.port == port
        assert fs.cat_file(f"{root}/k") == b"kept"
    finally:
        server.stop()


def test_backend_url_is_fresh_and_usable(backend_url: tuple[str, dict[str, Any]]) -> None:
    url, options = backend_url
    fs, root = fsspec.core.url_to_fs(url, **options)
    assert not fs.exists(root)
    fs.makedirs(root, exist_ok=True)  # needed for "local"; a no-op on object stores
    fs.pipe_file(f"{root}/obj", b"payload")
    assert fs.cat_file(f"{root}/obj", start=1, end=4) == b"ayl"
    assert [p.rsplit("/", 1)[-1] for p in fs.find(root)] == ["obj"]


def test_gcsfs_experimental_filesystem_is_off() -> None:
    # The experimental class probes buckets over gRPC and hangs against the
    # emulator; conftest/servers.py switch it off before gcsfs is imported.
    import gcsfs
    import gcsfs.core

    assert gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem
    assert type(fsspec.filesystem("gcs", token="anon")) is gcsfs.core.GCSFileSystem
