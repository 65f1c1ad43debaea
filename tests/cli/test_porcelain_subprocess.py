"""The porcelain commands through the installed ``keepsake`` console script: real processes,
pipes, exit statuses and a stdin that is not a terminal (``rm`` must not prompt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keepsake.tracking.project import Project

KEEPSAKE = Path(sys.executable).parent / "keepsake"


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KEEPSAKE_REPOSITORY"}
    env["KEEPSAKE_CACHE_DIR"] = str(tmp_path / "cache")
    return env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "train.py").write_text("print('train')\n")
    (root / "keepsake.yaml").write_text("repository: .keepsake\n")
    return root


def keepsake(*args: str, env: dict[str, str], cwd: Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(KEEPSAKE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def strict_json(text: str) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"invalid JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_record_list_show_checkout_and_remove(project: Path, environ: dict[str, str], tmp_path: Path) -> None:
    def run(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        return keepsake(*args, env=environ, cwd=project, code=code)

    experiment = run("experiment", "start", "--path", "src", "--param", "lr=0.01").stdout.strip()
    assert len(experiment) == 32
    (project / "model.pth").write_bytes(b"weights")
    first = run("commit", experiment, "--path", "model.pth", "--metric", "loss=NaN").stdout.strip()
    second = run(
        "commit", experiment, "--path", "model.pth", "--metric", "loss=0.25", "--primary-metric", "loss:minimize"
    ).stdout.strip()

    assert run("ps", "-q").stdout == f"{experiment}\n"
    header, row = run("ls").stdout.splitlines()
    assert header.split()[:3] == ["EXPERIMENT", "STARTED", "STATUS"] and "LOSS" in header
    assert row.startswith(experiment[:7]) and " running " in row and f"{second[:7]} (step 1)" in row

    doc = strict_json(run("show", "--json", experiment).stdout)
    assert [c["metrics"]["loss"] for c in doc["checkpoints"]] == ["NaN", 0.25]
    assert doc["command"][1:4] == ["experiment", "start", "--path"]
    assert doc["python_packages"]  # captured from the real environment
    shown = run("show", first[:8]).stdout
    assert shown.startswith(f"Checkpoint: {first}\n") and "7 B  model.pth" in shown

    run("experiment", "stop", experiment)
    assert [e["status"] for e in strict_json(run("ls", "--json").stdout)] == ["stopped"]

    out = tmp_path / "restored"
    checkout = run("checkout", experiment, "-o", str(out))
    assert checkout.stdout == "" and "best checkpoint" in checkout.stderr
    assert (out / "src" / "train.py").read_text() == "print('train')\n" and (out / "model.pth").read_bytes() == b"weights"

    # stdin is not a terminal: rm proceeds without asking
    removed = run("rm", first)
    assert removed.stdout == "" and f"Removed checkpoint {first[:7]}" in removed.stderr
    removed = run("rm", *run("ls", "-q").stdout.split())
    assert f"Removed experiment {experiment[:7]} (1 checkpoint)" in removed.stderr
    assert run("ls", "-q").stdout == ""


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["show", "abcdef1"], 4, "not found"),
        (["rm"], 4, "nothing to remove"),
        (["ls", "-f", "lr ~ 1"], 2, "malformed filter"),
        (["ls", "-s", "nope"], 2, "unknown sort key"),
        (["-R", "nosuch://b/r", "ls"], 3, "unknown storage scheme"),
        (["checkout", "{e}", "-o", "."], 2, "is not empty"),
    ],
)
def test_errors_exit_with_their_code(
    project: Path, environ: dict[str, str], args: list[str], code: int, fragment: str
) -> None:
    # recorded in-process: only the command under test pays for a process start
    recorder = Project(repository=str(project / ".keepsake"), directory=str(project))
    experiment = recorder.start_experiment("src", detached=True).id
    recorder.close()
    proc = keepsake(*[a.format(e=experiment) for a in args], env=environ, cwd=project, code=code)
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr and proc.stderr.count("\n") == 1
