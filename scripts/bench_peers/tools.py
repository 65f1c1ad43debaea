"""Each tool of the comparison: how its workspace is set up, how its bytes are counted, and
which whole processes list its runs and restore a checkpoint.

Every tool runs the same driver (drive.py) under its own interpreter; this module runs it,
then measures from outside:

* stored bytes: the durable store after the run (file sizes under the repository, remote or
  store folder, like ``du -sb``; on S3 the sizes of the objects under the prefix);
* list: the tool's own listing command as a whole process, stdout to /dev/null: one untimed
  warm-up, then the median of ``runs``;
* restore: the tool's own command(s) that bring checkpoint 3 back from the durable store
  into a new folder, as whole processes with an empty $XDG_CACHE_HOME (as on another
  machine), then a SHA-256 comparison with the model version that was checkpointed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench_peers.model import Versions, sha256_file, write_code

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drive.py")
MODEL = "model.npz"
RESTORE_STEP = 2  # "checkpoint 3"

#: 0.4.2's daemon snapshots checkpoints into temp folders under this fixed path (not $TMPDIR).
ORIGINAL_TEMP_ROOT = "/tmp/keepsake"


def tree_bytes(path: str) -> int:
    """Sum of the sizes of the files under ``path`` (``du -sb``'s apparent size, less directories)."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.rstrip() for line in f.readlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Context:
    """What every tool run shares: folders, environment, the scenario's model versions."""

    run_dir: str
    base_env: dict[str, str]
    versions: Versions
    checkpoints: int
    step_seconds: float
    list_runs: int
    log: Callable[[str], None]
    keep: bool = False


@dataclass
class Result:
    """One tool's row of one scenario."""

    name: str
    version: str = ""
    na: str = ""  # why the tool could not run here ("n/a" in the table)
    problem: str = ""  # the error, when it ran and failed
    blocked: list[float] = field(default_factory=list)
    start_seconds: float = 0.0
    finish_seconds: float = 0.0
    durable_wait: float = 0.0  # from just before the finish call until the process had exited
    stored: int | None = None
    list_times: list[float] = field(default_factory=list)
    list_na: str = ""
    restore_seconds: float | None = None
    identical: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.na and not self.problem and bool(self.blocked)

    @property
    def durable(self) -> float:
        """Time training waited on the tool, plus the wait after the last checkpoint until
        everything was durable (finish call and process exit)."""
        return sum(self.blocked) + self.durable_wait


class Tool:
    """A peer. Subclasses fill in the blanks; ``run`` does the same steps for all."""

    name = ""
    kind = ""  # drive.py's tool argument
    python: str = sys.executable
    version = ""

    def __init__(self, ctx: Context, tag: str) -> None:
        self.ctx = ctx
        self.tag = tag
        self.base = os.path.join(ctx.run_dir, tag)
        self.ws = os.path.join(self.base, "ws")

    # -- to fill in --
    def prepare(self) -> None:
        write_code(os.path.join(self.ws, "src"))

    def env(self) -> dict[str, str]:
        return dict(self.ctx.base_env)

    def driver_args(self) -> list[str]:
        return []

    def warm_up(self) -> str:
        """Modules to import once, untimed, before the run (a first import reads from disk)."""
        return ""

    def stored_bytes(self) -> int:
        raise NotImplementedError

    def list_argv(self, result: dict[str, Any]) -> list[str] | None:
        return None

    list_na = ""

    def restore_steps(self, result: dict[str, Any], out: str) -> list[tuple[list[str], str]]:
        """(argv, cwd) of the processes that restore checkpoint RESTORE_STEP into ``out``."""
        raise NotImplementedError

    def restored_file(self, out: str) -> str:
        return os.path.join(out, MODEL)

    def cleanup(self) -> None:
        if not self.ctx.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- the same for every tool --
    def run(self) -> Result:
        r = Result(self.name, self.version)
        logfile = os.path.join(self.ctx.run_dir, f"{self.tag}.log")
        try:
            os.makedirs(self.ws)
            self.prepare()
            env = self.env()
            if self.warm_up():
                subprocess.run([self.python, "-c", f"import {self.warm_up()}"], cwd=self.base, env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            result_path = os.path.join(self.base, "result.json")
            argv = [self.python, DRIVER, self.kind, "--versions", self.ctx.versions.directory, "--checkpoints",
                    str(self.ctx.checkpoints), "--step-seconds", str(self.ctx.step_seconds), "--result", result_path,
                    *self.driver_args()]
            self.ctx.log(f"{self.name}: {self.ctx.checkpoints} checkpoints")
            os.sync()
            with open(logfile, "w") as log_out:
                proc = subprocess.run(argv, cwd=self.ws, env=env, stdout=log_out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
            exited = time.time()
            if proc.returncode != 0 or not os.path.exists(result_path):
                raise RuntimeError(f"the training run exited with {proc.returncode}: {tail(logfile)}")
            with open(result_path) as f:
                result = json.load(f)
            r.version = r.version or result.get("version", "")
            r.blocked = [c["blocked_seconds"] for c in result["checkpoints"]]
            r.start_seconds = result["start_seconds"]
            r.finish_seconds = result["finish_seconds"]
            r.durable_wait = exited - result["finish_wall"]
            r.stored = self.stored_bytes()

            argv_list = self.list_argv(result)
            if argv_list is None:
                r.list_na = self.list_na
                r.notes.append(f"list: {self.list_na}")
            else:
                self.ctx.log(f"{self.name}: list")
                r.list_times = self.time_list(argv_list, env)

            self.ctx.log(f"{self.name}: restore checkpoint {RESTORE_STEP + 1}")
            out = os.path.join(self.base, "restored")
            # as on another machine: an empty cache, so everything comes from the durable store
            restore_env = {**env, "XDG_CACHE_HOME": os.path.join(self.base, "restore-cache")}
            os.makedirs(restore_env["XDG_CACHE_HOME"])
            t0 = time.perf_counter()
            for step_argv, cwd in self.restore_steps(result, out):
                done = subprocess.run(step_argv, cwd=cwd, env=restore_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"restore: {' '.join(step_argv)} exited with {done.returncode}: "
                                       f"{done.stdout.strip()[-1500:]}")
            r.restore_seconds = time.perf_counter() - t0
            path = self.restored_file(out)
            r.identical = os.path.exists(path) and sha256_file(path) == self.ctx.versions.sha256[RESTORE_STEP]
            self.extra_notes(r, result)
        except Exception as exc:  # noqa: BLE001 - reported in the table; the other tools still run
            r.problem = str(exc).replace("\n", " | ")
            self.ctx.log(f"{self.name}: failed: {r.problem}")
        finally:
            self.cleanup()
        return r

    def extra_notes(self, r: Result, result: dict[str, Any]) -> None:
        pass

    def time_list(self, argv: list[str], env: dict[str, str]) -> list[float]:
        times = []
        for i in range(self.ctx.list_runs + 1):  # the first is an untimed warm-up
            t0 = time.perf_counter()
            done = subprocess.run(argv, cwd=self.ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True)
            elapsed = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"list: {' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[-1500:]}")
            if i:
                times.append(elapsed)
        return times


# -- Keepsake (this repository) ------------------------------------------------------------------


class Keepsake(Tool):
    """This repository's Keepsake (.venv), into a local repository."""

    kind = "keepsake"

    def __init__(self, ctx: Context, tag: str, pycache: str) -> None:
        super().__init__(ctx, tag)
        from keepsake.version import __version__

        self.version = __version__
        self.name = "keepsake (local)"
        self.pycache = pycache
        self.cli = os.path.join(os.path.dirname(sys.executable), "keepsake")

    @property
    def url(self) -> str:
        return os.path.join(self.ws, ".keepsake")

    def prepare(self) -> None:
        super().prepare()
        with open(os.path.join(self.ws, "keepsake.yaml"), "w") as f:
            f.write(f'repository: "{self.url}"\n')

    def env(self) -> dict[str, str]:
        # bytecode cached outside the checkout (filled by the warm-up), as an installed package has it
        return {**super().env(), "PYTHONPYCACHEPREFIX": self.pycache}

    def warm_up(self) -> str:
        return "numpy, keepsake.api, keepsake.cli.main"

    def stored_bytes(self) -> int:
        return tree_bytes(self.url)

    def list_argv(self, result: dict[str, Any]) -> list[str]:
        return [self.cli, "-R", self.url, "ls"]

    def restore_steps(self, result: dict[str, Any], out: str) -> list[tuple[list[str], str]]:
        ckpt = result["checkpoints"][RESTORE_STEP]["id"]
        return [([self.cli, "-R", self.url, "checkout", ckpt, "-o", out, "--path", MODEL], self.ws)]


class MotoS3:
    """moto's S3 server on 127.0.0.1 in this process (as tests/servers.py runs it), one bucket."""

    BUCKET = "keepsake-bench"

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{int(self.server.get_host_and_port()[1])}"
        self.fs = self.filesystem()
        # not fs.mkdir(): s3fs sends LocationConstraint=us-east-1, which S3 (and moto) reject
        self.fs.call_s3("create_bucket", Bucket=self.BUCKET)

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing",
                                 client_kwargs={"region_name": "us-east-1"}, use_listings_cache=False,
                                 skip_instance_cache=True)

    @property
    def env(self) -> dict[str, str]:
        """Credentials and endpoint the standard way (AWS_ENDPOINT_URL_S3), fake keys."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def du(self, prefix: str) -> int:
        return sum(int(v) for v in self.fs.du(f"{self.BUCKET}/{prefix}", total=False).values())

    def rm(self, prefix: str) -> None:
        try:
            self.fs.rm(f"{self.BUCKET}/{prefix}", recursive=True)
        except FileNotFoundError:
            pass

    def stop(self) -> None:
        self.server.stop()


class KeepsakeS3(Keepsake):
    """This repository's Keepsake into moto's S3 server (a real HTTP S3 API on loopback)."""

    def __init__(self, ctx: Context, tag: str, pycache: str, s3: MotoS3) -> None:
        super().__init__(ctx, tag, pycache)
        self.name = "keepsake (S3, moto)"
        self.s3 = s3
        self.prefix = f"{tag}-{os.getpid()}"

    @property
    def url(self) -> str:
        return f"s3://{MotoS3.BUCKET}/{self.prefix}"

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.s3.env}

    def stored_bytes(self) -> int:
        return self.s3.du(self.prefix)

    def cleanup(self) -> None:
        super().cleanup()
        self.s3.rm(self.prefix)  # moto keeps objects in memory


# -- the original Keepsake 0.4.2 -----------------------------------------------------------------


class Keepsake042(Tool):
    """The original Keepsake: checkpoint() copies the file to a temp folder, and its Go daemon
    writes a tar.gz per checkpoint to the repository in the background (waited for at exit)."""

    kind = "keepsake"
    name = "keepsake 0.4.2 (local)"

    def __init__(self, ctx: Context, tag: str, python: str, version: str) -> None:
        super().__init__(ctx, tag)
        self.python = python
        self.version = version
        self.cli = os.path.join(os.path.dirname(python), "keepsake")
        self.had_temp_root = os.path.exists(ORIGINAL_TEMP_ROOT)

    def prepare(self) -> None:
        super().prepare()
        with open(os.path.join(self.ws, "keepsake.yaml"), "w") as f:
            f.write('repository: "file://.keepsake"\n')

    def warm_up(self) -> str:
        return "keepsake, keepsake.daemon"

    def stored_bytes(self) -> int:
        return tree_bytes(os.path.join(self.ws, ".keepsake"))

    def list_argv(self, result: dict[str, Any]) -> list[str]:
        return [self.cli, "ls"]

    def restore_steps(self, result: dict[str, Any], out: str) -> list[tuple[list[str], str]]:
        ckpt = result["checkpoints"][RESTORE_STEP]["id"]
        return [([self.cli, "checkout", ckpt, "-o", out, "--path", MODEL, "-f"], self.ws)]

    def cleanup(self) -> None:
        super().cleanup()
        if not self.had_temp_root:  # it leaves the folder behind (empty): remove it, if empty
            try:
                os.rmdir(ORIGINAL_TEMP_ROOT)
            except OSError:
                pass


# -- DVC -----------------------------------------------------------------------------------------


class Dvc(Tool):
    """DVC: ``dvc add`` + git commit per checkpoint, ``dvc push`` to a local remote at the end."""

    kind = "dvc"
    name = "DVC (local remote)"

    def __init__(self, ctx: Context, tag: str, python: str, version: str) -> None:
        super().__init__(ctx, tag)
        self.python = python
        self.version = version
        self.dvc = os.path.join(os.path.dirname(python), "dvc")
        self.remote = os.path.join(self.base, "remote")

    def env(self) -> dict[str, str]:
        return {**super().env(), "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": os.path.join(self.base, "site-cache"),
                "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}

    def driver_args(self) -> list[str]:
        return ["--dvc", self.dvc, "--remote", self.remote]

    def warm_up(self) -> str:
        return "dvc.cli, dvc.repo"

    def stored_bytes(self) -> int:
        return tree_bytes(self.remote)

    def list_argv(self, result: dict[str, Any]) -> list[str]:
        return [self.dvc, "exp", "show", "--no-pager", "-n", str(len(result["checkpoints"]))]

    def restore_steps(self, result: dict[str, Any], out: str) -> list[tuple[list[str], str]]:
        commit = result["checkpoints"][RESTORE_STEP]["id"]
        return [(["git", "clone", "-q", self.ws, out], self.base),
                (["git", "checkout", "-q", commit], out),
                ([self.dvc, "pull", "-q", MODEL], out)]

    def extra_notes(self, r: Result, result: dict[str, Any]) -> None:
        cache = tree_bytes(os.path.join(self.ws, ".dvc", "cache"))
        r.notes.append(f"DVC also keeps {cache / 1e6:,.1f} MB in the workspace cache (.dvc/cache), not counted")


# -- MLflow --------------------------------------------------------------------------------------


class Mlflow(Tool):
    """MLflow: one run, ``log_artifact`` per checkpoint, into a local file store."""

    kind = "mlflow"
    name = "MLflow (file store)"

    def __init__(self, ctx: Context, tag: str, python: str, version: str) -> None:
        super().__init__(ctx, tag)
        self.python = python
        self.version = version
        self.cli = os.path.join(os.path.dirname(python), "mlflow")
        self.store = os.path.join(self.ws, "mlruns")

    def env(self) -> dict[str, str]:
        # MLflow 3 refuses its file store unless told
        return {**super().env(), "MLFLOW_TRACKING_URI": "file://" + self.store, "MLFLOW_ALLOW_FILE_STORE": "true"}

    def warm_up(self) -> str:
        return "mlflow"

    def stored_bytes(self) -> int:
        return tree_bytes(self.store)

    def list_argv(self, result: dict[str, Any]) -> list[str]:
        return [self.cli, "runs", "list", "--experiment-id", str(result["experiment_id"])]

    def restore_steps(self, result: dict[str, Any], out: str) -> list[tuple[list[str], str]]:
        os.makedirs(out)
        path = result["checkpoints"][RESTORE_STEP]["id"]
        return [([self.cli, "artifacts", "download", "--run-id", result["run_id"], "--artifact-path", path,
                  "--dst-path", out], self.ws)]

    def restored_file(self, out: str) -> str:
        for root, _, names in os.walk(out):
            if MODEL in names:
                return os.path.join(root, MODEL)
        return os.path.join(out, MODEL)


# -- hf_xet --------------------------------------------------------------------------------------


class HfXet(Tool):
    """hf_xet's deduplicating chunk store, offline through its ``local://DIR`` endpoint."""

    kind = "hfxet"
    name = "hf_xet (local store)"
    list_na = "n/a (a chunk store: no runs to list)"

    def __init__(self, ctx: Context, tag: str, python: str, version: str) -> None:
        super().__init__(ctx, tag)
        self.python = python
        self.version = version
        self.store = os.path.join(self.base, "store")

    def prepare(self) -> None:
        super().prepare()
        os.makedirs(self.store)

    def driver_args(self) -> list[str]:
        return ["--store", self.store]

    def warm_up(self) -> str:
        return "hf_xet"

    def stored_bytes(self) -> int:
        return tree_bytes(self.store)

    def run(self) -> Result:
        r = super().run()
        if r.problem:  # its offline local:// endpoint is undocumented: a failure means it needs the Hub
            r.na, r.problem = f"n/a (needs the Hub): its offline local:// store failed here: {r.problem}", ""
        return r

    def restore_steps(self, result: dict[str, Any], out: str) -> list[tuple[list[str], str]]:
        os.makedirs(out)
        return [([self.python, DRIVER, "restore-hfxet", "--store", self.store, "--step", str(RESTORE_STEP),
                  "--out", os.path.join(out, MODEL)], self.base)]


def median(values: list[float]) -> float:
    return statistics.median(values)
