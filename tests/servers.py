"""Real S3 (moto) and GCS (gcp-storage-emulator) servers on 127.0.0.1 for tests."""

from __future__ import annotations

import os

# gcsfs >= 2026 imports an "experimental" filesystem by default that probes every
# bucket over gRPC+TLS; against the emulator each probe hangs ~60 s. The switch is
# read once, when gcsfs is first imported, so it must be set before that import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import atexit
import logging
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"

# moto serves through werkzeug, which logs one line per request to stderr: far too
# noisy for test output. Only the request log is silenced; errors still show.
logging.getLogger("werkzeug").setLevel(logging.WARNING)

# Listing caches off: s3fs and gcsfs otherwise keep directory listings forever per
# filesystem instance, and fsspec hands the *same* cached instance to every caller
# with equal options, so a write made through another instance (or another process,
# e.g. a second "client" in a concurrency test) would stay invisible to ls/find/info.
# We deliberately do NOT put skip_instance_cache here: sharing one instance (one
# connection pool, one event loop) is fine once listings are not cached, and it keeps
# the tests fast. Pass skip_instance_cache=True yourself when you need a truly
# separate client.
_FRESH_LISTINGS: dict[str, Any] = {"use_listings_cache": False}


def _free_port() -> int:
    """Return a TCP port that was free a moment ago (small race with other processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    """A moto S3 server running in a daemon thread of this process.

    Moto keeps its state in process-global backends, not in the server object, so
    stop()/restart() on the same port keeps every bucket and object: this is what
    lets a test "cut the network" (stop: connections are refused) and then heal it.
    The flip side: all S3Servers of one process share that state, which is why every
    server gets its own uuid-named bucket.
    """

    port: int
    bucket: str
    _moto: Any = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        # Fresh dict on every call so a caller mutating it cannot affect others.
        return {
            "endpoint_url": self.endpoint_url,
            "key": "testing",
            "secret": "testing",
            # moto accepts any region; pinning it stops botocore from looking one up
            # in ~/.aws or the environment.
            "client_kwargs": {"region_name": "us-east-1"},
            **_FRESH_LISTINGS,
        }

    def new_url(self, prefix: str = "test") -> str:
        """A fresh, empty location: s3://<bucket>/<prefix>-<uuid>."""
        return f"s3://{self.bucket}/{_unique(prefix)}"

    @property
    def running(self) -> bool:
        return self._moto is not None

    def _start(self) -> None:
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
        moto.start()
        # port=0 works: werkzeug binds an ephemeral port and moto reports it.
        self.port = int(moto.get_host_and_port()[1])
        self._moto = moto

    def stop(self) -> None:
        """Stop serving and close the listening socket (clients get ECONNREFUSED)."""
        moto, self._moto = self._moto, None
        if moto is None:
            return
        moto.stop()
        # ThreadedMotoServer.stop() only ends serve_forever(); the socket stays bound
        # and the kernel keeps accepting connections that nobody answers (clients
        # hang instead of failing fast), and the port cannot be reused.
        if moto._server is not None:
            moto._server.server_close()

    def start(self) -> None:
        """(Re)start on the same port; werkzeug sets SO_REUSEADDR so this is immediate."""
        if self._moto is None:
            self._start()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_s3() -> S3Server:
    """Start a moto S3 server on a free port and create a fresh bucket in it."""
    server = S3Server(port=0, bucket=_unique("keepsake-test").lower())
    server._start()
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options)
    # Not fs.mkdir(): s3fs sends LocationConstraint=us-east-1, which S3 (and moto)
    # reject because us-east-1 is the default region and must be left implicit.
    fs.call_s3("create_bucket", Bucket=server.bucket)
    atexit.register(server.stop)
    return server


# -------------------------------------------------------------------------- GCS


@dataclass
class GCSServer:
    """gcp-storage-emulator running as a child process.

    A subprocess rather than a thread: the emulator is a single-threaded
    http.server (one request at a time) and its logging setup is global; keeping it
    out of the test process also lets stop() really kill it.

    With data_dir=None the emulator keeps objects in memory and restart() loses them
    (the bucket is recreated by --default-bucket). Pass a data_dir to keep objects
    on disk across restart().
    """

    port: int
    bucket: str
    data_dir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: Any = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            # endpoint_url instead of STORAGE_EMULATOR_HOST: env vars are process
            # wide, and these options also reach code that builds its own fs.
            "endpoint_url": self.endpoint_url,
            # anon: no OAuth token lookup (would try the metadata server and hang).
            "token": "anon",
            "project": "test",
            **_FRESH_LISTINGS,
        }

    def new_url(self, prefix: str = "test") -> str:
        """A fresh, empty location: gs://<bucket>/<prefix>-<uuid>."""
        return f"gs://{self.bucket}/{_unique(prefix)}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        # the emulator with its multipart parsing fixed (tests/gcs_emulator.py)
        cmd = [sys.executable, "-m", "tests.gcs_emulator"]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(Path(self.data_dir).resolve())]  # must be absolute
        cmd += ["start", "--host", HOST, "--port", str(self.port), "--quiet"]
        cmd += ["--default-bucket", self.bucket]  # no-op if it already exists on disk
        if self.data_dir is None:
            cmd.append("--in-memory")
        return cmd

    def _spawn(self, timeout: float = 30.0) -> None:
        # The emulator's own stdout/stderr go to a temp file: a PIPE nobody reads
        # could fill up and block it; the file is shown if start-up fails.
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self._command(),
            cwd=str(Path(__file__).resolve().parent.parent),  # so "-m tests.gcs_emulator" imports
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                # "/" is the emulator's health check; it answers "OK".
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=1) as r:
                    if r.read() == b"OK":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self._log.seek(0)
        output = self._log.read().decode(errors="replace")
        self.stop()
        raise RuntimeError(f"gcp-storage-emulator did not start on {self.port}:\n{output}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def start(self) -> None:
        """(Re)start on the same port."""
        if not self.running:
            self._spawn()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_gcs(data_dir: Path | None = None) -> GCSServer:
    """Start gcp-storage-emulator on a free port with a fresh bucket."""
    bucket = _unique("keepsake-test").lower()
    last: Exception | None = None
    # The port is picked here and bound by the child, so another process may grab
    # it in between (e.g. a parallel xdist worker): retry with a new port.
    for _ in range(3):
        server = GCSServer(port=_free_port(), bucket=bucket, data_dir=data_dir)
        try:
            server._spawn()
        except RuntimeError as exc:
            last = exc
            continue
        atexit.register(server.stop)  # never leave an orphan emulator behind
        return server
    raise RuntimeError("could not start gcp-storage-emulator") from last
