"""The installed ``keepsake`` console script, run as a real process: real stdin/stdout
pipes, real exit statuses, the environment and the working directory."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

KEEPSAKE = Path(sys.executable).parent / "keepsake"


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KEEPSAKE_REPOSITORY"}
    env["KEEPSAKE_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def keepsake(
    *args: str, env: dict[str, str], cwd: Path, code: int = 0, stdout: int | IO[bytes] = subprocess.PIPE
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [str(KEEPSAKE), *args], env=env, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, timeout=60, check=False
    )
    assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
    assert b"Traceback" not in proc.stderr
    return proc


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "notes.txt").write_bytes(b"notes\n")
    (root / "data" / "sub" / "weights.bin").write_bytes(random.Random(11).randbytes(250_000))
    return root


def test_console_script_is_installed() -> None:
    assert KEEPSAKE.is_file() and os.access(KEEPSAKE, os.X_OK)


def test_init_write_tree_ls_tree_and_cat_file_into_a_file(project: Path, environ: dict[str, str], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    init = keepsake("-R", repo, "init", env=environ, cwd=project)
    assert init.stdout == b""
    assert init.stderr.decode() == f"Initialized empty Keepsake repository at {repo}\n"

    tree_id = keepsake("-R", repo, "write-tree", "data", env=environ, cwd=project).stdout.decode().strip()
    assert len(tree_id) == 32
    listing = keepsake("-R", repo, "ls-tree", "-r", tree_id, env=environ, cwd=project).stdout.decode()
    rows = [line.split("\t") for line in listing.splitlines()]
    assert [path for _, path in rows] == ["notes.txt", "sub/weights.bin"]
    blob_id = rows[1][0].split()[2]

    # stdout redirected to a file, as `keepsake cat-file blob ID > file`
    restored = tmp_path / "restored.bin"
    with open(restored, "wb") as out:
        keepsake("-R", repo, "cat-file", "blob", blob_id, env=environ, cwd=project, stdout=out)
    assert restored.read_bytes() == (project / "data" / "sub" / "weights.bin").read_bytes()

    # and piped through stdin: hash-object --stdin gives the same id
    piped = subprocess.run(
        [str(KEEPSAKE), "-R", repo, "hash-object", "--stdin"],
        input=restored.read_bytes(), env=environ, cwd=project, capture_output=True, timeout=60, check=False,
    )
    assert piped.returncode == 0 and piped.stdout.decode().strip() == blob_id


def test_errors_exit_with_their_code_and_one_stderr_line(project: Path, environ: dict[str, str], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    missing = keepsake("-R", repo, "count-objects", env=environ, cwd=project, code=3)
    assert missing.stdout == b""
    assert missing.stderr.decode() == f'error: no keepsake repository at {repo} (run "keepsake init {repo}")\n'

    keepsake("-R", repo, "init", env=environ, cwd=project)
    blob_id = keepsake("-R", repo, "hash-object", "-w", "data/notes.txt", env=environ, cwd=project).stdout.decode().strip()
    wrong = keepsake("-R", repo, "ls-tree", blob_id, env=environ, cwd=project, code=6)
    assert wrong.stderr.decode() == f"error: object {blob_id} is a blob, not a tree\n"
    bad_ref = keepsake("-R", repo, "update-ref", "a//b", blob_id, env=environ, cwd=project, code=2)
    assert bad_ref.stderr.decode().startswith("error: invalid ref name 'a//b'")
    assert len(bad_ref.stderr.splitlines()) == 1


def test_closed_stdout_exits_141_quietly(project: Path, environ: dict[str, str], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    big = tmp_path / "big.bin"
    big.write_bytes(random.Random(12).randbytes(3_000_000))
    keepsake("-R", repo, "init", env=environ, cwd=project)
    blob_id = keepsake("-R", repo, "hash-object", "-w", str(big), env=environ, cwd=project).stdout.decode().strip()
    proc = subprocess.Popen(
        [str(KEEPSAKE), "-R", repo, "cat-file", "blob", blob_id],
        env=environ, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == b""


def test_repository_from_environment_variable(project: Path, environ: dict[str, str], tmp_path: Path) -> None:
    environ["KEEPSAKE_REPOSITORY"] = str(tmp_path / "from-env")
    keepsake("init", env=environ, cwd=project)
    assert (tmp_path / "from-env" / "config").is_file()
    tree_id = keepsake("write-tree", "data", env=environ, cwd=project).stdout.decode().strip()
    keepsake("update-ref", "tags/v1", tree_id, env=environ, cwd=project)
    assert keepsake("rev-parse", "v1", env=environ, cwd=project).stdout.decode() == f"{tree_id}\n"
    # -R wins over the variable
    keepsake("-R", str(tmp_path / "other"), "rev-parse", "v1", env=environ, cwd=project, code=3)


def test_keepsake_yaml_is_found_from_a_subdirectory(project: Path, environ: dict[str, str]) -> None:
    (project / "keepsake.yaml").write_text("repository: store  # relative to this file\n")
    below = project / "data" / "sub"
    init = keepsake("init", env=environ, cwd=below)
    assert init.stderr.decode() == f"Initialized empty Keepsake repository at {project / 'store'}\n"
    assert (project / "store" / "config").is_file()
    assert not (below / "store").exists() and not (below / ".keepsake").exists()

    blob_id = keepsake("hash-object", "-w", "weights.bin", env=environ, cwd=below).stdout.decode().strip()
    # the same repository from another directory of the project
    out = keepsake("cat-file", "-s", blob_id, env=environ, cwd=project / "data").stdout
    assert out == b"250000\n"

    (project / "keepsake.yaml").write_text("repository: store\nbogus: 1\n")
    bad = keepsake("count-objects", env=environ, cwd=below, code=3)
    assert bad.stderr.decode() == (
        f"error: cannot use {project / 'keepsake.yaml'}: unknown keys bogus (known: remote, remote_storage_options, repository, storage_options)\n"
    )
