"""keepsake push, pull and clone (keepsake/cli/sync.py) through CliRunner, and clone + ls
through the real console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from keepsake.cli.main import cli
from keepsake.repository import Repository
from keepsake.tracking.project import Project
from tests.servers import S3Server, start_s3

KEEPSAKE = Path(sys.executable).parent / "keepsake"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project (the working directory) with two stopped experiments in ./.keepsake and
    ``remote: ../bucket`` in its keepsake.yaml; the remote repository exists, empty."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "keepsake.yaml").write_text("remote: ../bucket\n")
    record(root, 2)
    Repository.init(str(tmp_path / "bucket")).close()
    monkeypatch.chdir(root)
    return root


def record(root: Path, experiments: int, url: str | None = None, options: dict[str, Any] | None = None) -> list[str]:
    p = Project(repository=url or str(root / ".keepsake"), directory=str(root), storage_options=options)
    ids = []
    for i in range(experiments):
        e = p.start_experiment(path=None, params={"i": i})
        (root / "model.bin").write_bytes(os.urandom(50_000))
        e.checkpoint(path="model.bin", step=0, metrics={"loss": 0.5})
        e.stop()
        ids.append(e.id)
    p.close()
    return ids


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ls_ids(directory: Path | None = None, repository: Path | None = None) -> list[str]:
    """The experiment ids ``keepsake ls`` lists in a project directory, or in a repository."""
    p = Project(directory=str(directory) if directory else None, repository=str(repository) if repository else None)
    try:
        return sorted(e.id for e in p.list())
    finally:
        p.close()


def test_push_to_the_configured_remote_then_again_sends_nothing(project: Path, tmp_path: Path) -> None:
    first = run("push")
    assert first.exit_code == 0, first.output
    assert first.stdout == ""
    assert "pushed" in first.stderr and "2 refs updated" in first.stderr
    assert ls_ids(repository=tmp_path / "bucket") == ls_ids(project)
    second = run("push", "--json")
    assert second.exit_code == 0
    doc = json.loads(second.stdout)
    assert doc["stats"]["bytes_sent"] == 0 and doc["stats"]["objects_sent"] == 0
    assert {r["action"] for r in doc["refs"]} == {"up-to-date"}
    assert doc["destination"] == str(tmp_path / "bucket")


def test_quiet_prints_nothing_and_dry_run_writes_nothing(project: Path, tmp_path: Path) -> None:
    dry = run("push", "--dry-run")
    assert dry.exit_code == 0
    assert dry.stdout.count("create") == 2 and "would send" in dry.stdout
    assert Repository.open(str(tmp_path / "bucket")).refs.list() == {}
    quiet = run("push", "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert len(Repository.open(str(tmp_path / "bucket")).refs.list()) == 2


def test_push_needs_a_url_or_a_configured_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "bare"
    root.mkdir()
    monkeypatch.chdir(root)
    result = run("push")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no remote given") and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("url", "code", "message"),
    [
        ("nosuch://x/y", 3, "unknown storage scheme 'nosuch'"),
        ("{tmp}/nothing-here", 3, 'run "keepsake init'),
    ],
    ids=["unknown-scheme", "no-repository"],
)
def test_push_errors_are_one_line_with_their_exit_code(project: Path, tmp_path: Path, url: str, code: int, message: str) -> None:
    result = run("push", url.format(tmp=tmp_path))
    assert result.exit_code == code
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_pull_from_a_missing_repository_is_exit_3(project: Path, tmp_path: Path) -> None:
    result = run("pull", str(tmp_path / "nothing-here"))
    assert result.exit_code == 3 and "no keepsake repository" in result.stderr


def test_diverged_refs_exit_12_after_the_rest_is_pushed(project: Path, tmp_path: Path) -> None:
    assert run("push", "-q").exit_code == 0
    p = Project(directory=str(project))
    first = p.list()[0]
    p.remove_checkpoint(first.checkpoints[0])
    p.close()
    new = record(project, 1)[0]
    result = run("push")
    assert result.exit_code == 12
    assert f"experiments/{first.id}" in result.stderr and "--force" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: 1 ref(s) not updated")
    assert new in ls_ids(repository=tmp_path / "bucket")  # the rest went through
    forced = run("push", "--force")
    assert forced.exit_code == 0
    assert Repository.open(str(tmp_path / "bucket")).refs.list() == Repository.open(str(project / ".keepsake")).refs.list()


def test_clone_then_ls_there_lists_the_same_experiments(project: Path, tmp_path: Path) -> None:
    assert run("push", "-q").exit_code == 0
    target = tmp_path / "laptop"
    result = run("clone", str(tmp_path / "bucket"), str(target))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((target / "keepsake.yaml").read_text()) == {"remote": str(tmp_path / "bucket")}
    assert ls_ids(target) == ls_ids(project)
    # cloning again resumes (here: nothing left to do); another non-empty directory is refused
    again = run("clone", "--json", str(tmp_path / "bucket"), str(target))
    assert again.exit_code == 0 and json.loads(again.stdout)["stats"]["bytes_sent"] == 0
    refused = run("clone", str(tmp_path / "bucket"), str(project))
    assert refused.exit_code == 2 and "not empty" in refused.stderr


def test_pull_from_the_configured_remote_fast_forwards(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("push", "-q").exit_code == 0
    assert run("clone", "-q", str(tmp_path / "bucket"), str(tmp_path / "laptop")).exit_code == 0
    extra = record(project, 1)
    assert run("push", "-q").exit_code == 0
    monkeypatch.chdir(tmp_path / "laptop")
    result = run("pull", "--json")  # no URL: the remote clone wrote into keepsake.yaml
    assert result.exit_code == 0
    actions = {r["name"]: r["action"] for r in json.loads(result.stdout)["refs"]}
    assert actions[f"experiments/{extra[0]}"] == "create"
    assert ls_ids(tmp_path / "laptop") == ls_ids(project)


@pytest.mark.remote
def test_pull_from_s3_with_remote_storage_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> None:
    url = s3_server.new_url("cli")
    options = s3_server.storage_options
    source = tmp_path / "cluster"
    source.mkdir()
    ids = record(source, 2, url, options)
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    (laptop / "keepsake.yaml").write_text(yaml.safe_dump({"remote": url, "remote_storage_options": options}))
    monkeypatch.chdir(laptop)
    result = run("pull")  # creates ./.keepsake
    assert result.exit_code == 0, result.output
    assert ls_ids(laptop) == sorted(ids)
    assert run("push", "--json").exit_code == 0  # and back: nothing to send
    assert json.loads(run("push", "--json").stdout)["stats"]["bytes_sent"] == 0


@pytest.mark.remote
def test_an_unreachable_server_is_exit_8(project: Path) -> None:
    server = start_s3()  # private: stopping the shared one would disturb other tests
    options = server.storage_options
    url = server.new_url("gone")
    Repository.init(url, options).close()
    server.stop()
    args = [f"-o{k}={json.dumps(v)}" for k, v in options.items()]
    result = run("push", url, *args, '-oconfig_kwargs={"retries": {"max_attempts": 1}}', "-oskip_instance_cache=true")
    assert result.exit_code == 8
    assert result.stderr.startswith("error: storage error") and result.stderr.count("\n") == 1


def test_malformed_storage_option_is_exit_2(project: Path) -> None:
    result = run("push", "-o", "novalue")
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr


def test_clone_and_ls_through_the_console_script(project: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEEPSAKE_REPOSITORY"}
    env["KEEPSAKE_CACHE_DIR"] = str(tmp_path / "cache")

    def keepsake(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(KEEPSAKE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        return proc

    push = keepsake("push", cwd=project)
    assert "\r" not in push.stderr  # stderr is not a terminal: no progress line
    keepsake("clone", str(tmp_path / "bucket"), "laptop", cwd=tmp_path)
    listed = keepsake("ls", "-q", cwd=tmp_path / "laptop")
    assert sorted(listed.stdout.split()) == ls_ids(project)
