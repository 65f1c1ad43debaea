"""The porcelain CLI (ls, ps, show, diff, checkout, rm, tag, experiment start/stop, commit)
through click's CliRunner.

Experiments are recorded with the Python API into a project in a temporary directory (the
working directory of every command, so the default ``./.keepsake`` is found without -R);
user, host and Python packages are pinned so tables and diffs are predictable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from keepsake.cli import porcelain
from keepsake.cli.display import format_ago, format_value, to_json_value
from keepsake.cli.main import cli
from keepsake.objects.database import ObjectDB, ObjectWriter
from keepsake.tracking import metadata
from keepsake.tracking.project import Project
from tests.servers import S3Server

PACKAGES = {"numpy": "1.26.0", "torch": "2.1.0"}


def pin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Predictable user, host, packages and git state; small pack buffers."""
    monkeypatch.setattr(metadata, "current_user", lambda: "ben")
    monkeypatch.setattr(metadata, "current_host", lambda: "gpu-1")
    monkeypatch.setattr(metadata, "python_packages", lambda: dict(PACKAGES))
    monkeypatch.setattr(metadata, "git_state", lambda directory: None)
    # Speed only: every writer preallocates a buffer of a whole pack (tens of MiB), which
    # dominates the time of recording tiny experiments.
    monkeypatch.setattr(ObjectDB, "writer", lambda self, pack_size=1 << 20: ObjectWriter(self, pack_size))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)
    monkeypatch.setenv("KEEPSAKE_CACHE_DIR", str(tmp_path / "cache"))
    pin_environment(monkeypatch)
    monkeypatch.setattr(porcelain, "stdin_is_interactive", lambda: False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project directory (and working directory): src/train.py, no repository yet."""
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "train.py").write_text("print('train')\n")
    monkeypatch.chdir(folder)
    return folder


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=True)


def ok(*args: str, input: str | None = None) -> Result:
    result = run(*args, input=input)
    assert result.exit_code == 0, (args, result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def assert_error(result: Result, code: int, fragment: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN/Infinity tokens: the output must be valid JSON."""

    def refuse(token: str) -> None:
        raise AssertionError(f"invalid JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def ids(result: Result) -> list[str]:
    return result.stdout.split()


@dataclass
class Recorded:
    """Three experiments: a stopped with 2 checkpoints, b running with 1, c failed with none."""

    project: Project
    a: str
    a0: str  # a's first checkpoint (acc 0.5, loss NaN)
    a1: str  # a's best and latest checkpoint (acc 0.7)
    b: str
    b0: str  # acc 0.9
    c: str


def record_three(root: Path, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    project = Project(repository=str(root / ".keepsake"), directory=str(root))
    model = root / "model.pth"

    a = project.start_experiment("src", {"lr": 0.01, "layers": 3, "opt": "adam", "cfg": {"x": 1}}, detached=True)
    model.write_bytes(b"weights a0")
    a0 = a.checkpoint("model.pth", metrics={"acc": 0.5, "loss": math.nan}, primary_metric=("acc", "maximize"))
    model.write_bytes(b"weights a1!")
    a1 = a.checkpoint("model.pth", metrics={"acc": 0.7, "loss": 0.2}, primary_metric=("acc", "maximize"))
    a.stop()

    monkeypatch.setattr(metadata, "python_packages", lambda: {"numpy": "1.26.4", "pandas": "2.2.0"})
    b = project.start_experiment("src", {"lr": 0.001, "layers": 3, "opt": "sgd", "cfg": {"x": 1}}, detached=True)
    model.write_bytes(b"weights b0")
    b0 = b.checkpoint("model.pth", step=10, metrics={"acc": 0.9, "loss": 0.1}, primary_metric=("acc", "maximize"))

    monkeypatch.setattr(metadata, "python_packages", lambda: dict(PACKAGES))
    c = project.start_experiment(None, {"lr": 0.1, "layers": 3, "opt": "adam"}, detached=True)
    c.stop("failed")
    model.unlink()
    return Recorded(project, a.id, a0.id, a1.id, b.id, b0.id, c.id)


@pytest.fixture
def recorded(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorded]:
    """Three fresh experiments in ``root``, for tests that change them."""
    r = record_three(root, monkeypatch)
    yield r
    r.project.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    """Three experiments recorded once per module, for read-only tests (use -R)."""
    root = tmp_path_factory.mktemp("shared")
    (root / "src").mkdir()
    (root / "src" / "train.py").write_text("print('train')\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEEPSAKE_CACHE_DIR", str(root / "cache"))
        pin_environment(mp)
        r = record_three(root, mp)
    yield r
    r.project.close()


# ------------------------------------------------------------------ ls and ps


def test_ls_shows_differing_params_and_checkpoints(recorded: Recorded) -> None:
    r = recorded
    lines = ok("ls").stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "EXPERIMENT", "STARTED", "STATUS", "LR", "OPT", "LATEST CHECKPOINT", "ACC", "BEST CHECKPOINT", "ACC"
    ]
    assert len(lines) == 4
    a, b, c = lines[1:]
    assert a.startswith(r.a[:7]) and b.startswith(r.b[:7]) and c.startswith(r.c[:7])
    assert re.search(r" (just now|\d+ seconds? ago) ", a) and " stopped " in a and " running " in b and " failed " in c
    # latest and best checkpoint cells with the primary metric
    assert f"{r.a1[:7]} (step 1)" in a and a.count(f"{r.a1[:7]} (step 1)") == 2
    assert a.rstrip().endswith("0.7") and b.rstrip().endswith("0.9")
    assert f"{r.b0[:7]} (step 10)" in b
    # column positions line up with the headings
    header = lines[0]
    for heading, value, row in (("LR", "0.001", b), ("OPT", "sgd", b), ("STATUS", "failed", c)):
        assert row[header.index(heading) :].startswith(value), (heading, row)
    # same everywhere: layers, host and user; dict params never in the table
    for hidden in ("LAYERS", "HOST", "USER", "CFG", "TAGS", "LOSS"):
        assert hidden not in header


def test_ls_all_shows_every_param_metric_host_and_user(recorded: Recorded) -> None:
    header, a, *_ = ok("ls", "--all").stdout.splitlines()
    assert header.split()[:8] == ["EXPERIMENT", "STARTED", "STATUS", "HOST", "USER", "LAYERS", "LR", "OPT"]
    assert "LOSS" in header and "CFG" not in header
    assert " gpu-1 " in a and " ben " in a and " 0.2 " in a + " "


def test_ls_shows_host_and_user_when_they_differ(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = Project(repository=str(root / ".keepsake"), directory=str(root))
    project.start_experiment(None, {"lr": 1}, detached=True)
    monkeypatch.setattr(metadata, "current_host", lambda: "gpu-2")
    project.start_experiment(None, {"lr": 1}, detached=True)
    header, first, second = ok("ls").stdout.splitlines()
    assert header.split() == ["EXPERIMENT", "STARTED", "STATUS", "HOST", "LATEST", "CHECKPOINT"]
    assert "gpu-1" in first and "gpu-2" in second


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (["lr = 0.01"], "a"),
        (["lr != 0.01"], "bc"),
        (["lr < 0.01"], "b"),
        (["lr <= 0.01"], "ab"),
        (["lr > 0.01"], "c"),
        (["lr >= 0.01"], "ac"),
        (["opt = adam"], "ac"),
        (["status = running"], "b"),
        (["status != running"], "ac"),
        (["acc > 0.6"], "ab"),
        (["metrics.acc >= 0.9"], "b"),
        (["params.layers = 3"], "abc"),
        (["step >= 1"], "ab"),
        (["user = ben"], "abc"),
        (["host != gpu-1"], ""),
        (["created > 2000-01-01"], "abc"),
        (["started < 2000-01-01T10:00"], ""),
        (["opt = adam", "acc > 0.6"], "a"),
        (["opt=adam"], "ac"),
    ],
)
def test_ls_filters(shared: Recorded, filters: list[str], expected: str) -> None:
    r = shared
    names = {r.a: "a", r.b: "b", r.c: "c"}
    args = [arg for f in filters for arg in ("--filter", f)]
    assert "".join(names[i] for i in ids(ok("-R", r.project.repository, "ls", "-q", *args))) == expected


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("created", "abc"),
        ("created-desc", "cba"),
        ("lr", "bac"),
        ("lr-desc", "cab"),
        ("lr-asc", "bac"),
        ("acc-desc", "bac"),  # c has no acc: last
        ("step", "abc"),
        ("opt", "acb"),
        ("status", "cba"),  # failed < running < stopped
    ],
)
def test_ls_sort(shared: Recorded, sort: str, expected: str) -> None:
    r = shared
    names = {r.a: "a", r.b: "b", r.c: "c"}
    repo = r.project.repository
    assert "".join(names[i] for i in ids(ok("-R", repo, "ls", "-q", "-s", sort))) == expected
    assert "".join(names[i] for i in ids(ok("-R", repo, "ls", "-q", "--sort", sort))) == expected


def test_ls_quiet_prints_full_ids_oldest_first(recorded: Recorded) -> None:
    result = ok("ls", "-q")
    assert result.stdout == f"{recorded.a}\n{recorded.b}\n{recorded.c}\n"
    assert result.stderr == ""


def test_ls_json_is_a_stable_list_of_experiments(recorded: Recorded) -> None:
    r = recorded
    docs = strict_json(ok("ls", "--json").stdout)
    assert [d["id"] for d in docs] == [r.a, r.b, r.c]
    a = docs[0]
    assert set(a) == {
        "id", "created", "status", "user", "host", "command", "path", "params", "git", "primary_metric",
        "num_checkpoints", "best_checkpoint", "latest_checkpoint", "tags",
    }
    assert a["params"] == {"lr": 0.01, "layers": 3, "opt": "adam", "cfg": {"x": 1}}
    assert (a["status"], a["user"], a["host"], a["path"], a["git"]) == ("stopped", "ben", "gpu-1", "src", None)
    assert a["primary_metric"] == {"name": "acc", "goal": "maximize"}
    assert a["num_checkpoints"] == 2 and a["tags"] == []
    assert datetime.fromisoformat(a["created"]).tzinfo is not None
    assert a["best_checkpoint"] == {
        "id": r.a1, "step": 1, "created": a["best_checkpoint"]["created"], "metrics": {"acc": 0.7, "loss": 0.2},
        "primary_metric": {"name": "acc", "goal": "maximize"}, "path": "model.pth", "tags": [],
    }
    assert a["latest_checkpoint"] == a["best_checkpoint"]
    c = docs[2]
    assert c["status"] == "failed" and c["best_checkpoint"] is None and c["latest_checkpoint"] is None
    assert c["path"] is None and c["primary_metric"] is None
    # filters and sorting apply to --json too
    assert [d["id"] for d in strict_json(ok("ls", "--json", "-s", "lr-desc", "-f", "layers = 3").stdout)] == [r.c, r.a, r.b]


def test_ls_of_an_empty_repository(root: Path) -> None:
    ok("init")
    result = ok("ls")
    assert result.stdout == "" and result.stderr == "No experiments found\n"
    assert ok("ls", "--json").stdout == "[]\n"
    assert ok("ls", "-q", "-s", "anything", "-f", "x = 1").stdout == ""


def test_ls_without_a_repository(root: Path) -> None:
    assert_error(run("ls"), 3, 'run "keepsake init')


def test_ps_lists_only_running_experiments(recorded: Recorded) -> None:
    r = recorded
    assert ids(ok("ps", "-q")) == [r.b]
    lines = ok("ps").stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith(r.b[:7]) and " running " in lines[1]
    assert [d["id"] for d in strict_json(ok("ps", "--json").stdout)] == [r.b]
    assert ids(ok("ps", "-q", "-f", "acc > 0.95")) == []
    result = ok("ps", "-f", "acc > 0.95")
    assert result.stdout == "" and result.stderr == "No running experiments found\n"


def test_ls_shows_tags(recorded: Recorded) -> None:
    r = recorded
    ok("tag", "baseline", r.a)
    ok("tag", "best-model", r.b0[:9])
    header, a, b, c = ok("ls").stdout.splitlines()
    assert header.endswith("TAGS")
    assert a.endswith("baseline") and b.endswith(f"best-model@{r.b0[:7]}") and c.rstrip() == c
    docs = strict_json(ok("ls", "--json").stdout)
    assert docs[0]["tags"] == ["baseline"] and docs[1]["best_checkpoint"]["tags"] == ["best-model"]


# ------------------------------------------------------------------ show


def test_show_experiment(recorded: Recorded) -> None:
    r = recorded
    ok("tag", "baseline", r.a)
    out = ok("show", r.a[:8]).stdout
    lines = out.splitlines()
    assert lines[0] == f"Experiment: {r.a}"
    for expected in (
        "Status:   stopped",
        "Host:     gpu-1",
        "User:     ben",
        "Path:     src",
        "Tags:     baseline",
        "Git:      (not a git repository)",
        "cfg:     {\"x\": 1}",
        "lr:      0.01",
        "opt:     adam",
        "Python packages:   2 (listed by --json; compare with diff)",
        "Primary metric:     acc (maximize)",
        f"Best checkpoint:    {r.a1[:7]} (step 1)",
        f"Latest checkpoint:  {r.a1[:7]} (step 1)",
    ):
        assert expected in lines, (expected, out)
    table = lines[lines.index("Checkpoints") + 1 :]
    assert table[0].split() == ["ID", "STEP", "CREATED", "ACC", "LOSS"]  # primary metric first
    assert table[1].startswith(f"{r.a0[:7]}  0 ") and table[1].endswith("0.5         NaN")
    assert table[2].startswith(f"{r.a1[:7]}  1 ") and "0.7 (best)" in table[2]


def test_show_experiment_with_git_and_no_checkpoints(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadata, "git_state", lambda d: {"commit": "f" * 40, "branch": "main", "dirty": True})
    project = Project(repository=str(root / ".keepsake"), directory=str(root))
    e = project.start_experiment(None, {}, detached=True)
    lines = ok("show", e.id).stdout.splitlines()
    assert f"Git:      {'f' * 40} on main (uncommitted changes)" in lines
    assert "Path:     (no code recorded)" in lines
    assert lines[lines.index("Params") + 1] == "(none)"
    assert lines[-1] == "(none)" and lines[-2] == "Checkpoints"


def test_show_checkpoint(recorded: Recorded) -> None:
    r = recorded
    ok("tag", "first", r.a0)
    lines = ok("show", r.a0).stdout.splitlines()
    assert lines[0] == f"Checkpoint: {r.a0}"
    for expected in (
        "Step:     0",
        "Path:     model.pth",
        "Tags:     first",
        "acc:   0.5 (primary, maximize)",
        "loss:  NaN",
        "10 B  model.pth",
        "1 file, 10 B",
        f"ID:       {r.a}",
        "Status:   stopped",
        "lr:      0.01",
    ):
        assert expected in lines, (expected, lines)
    assert "Best:" not in "\n".join(lines)
    assert "Best:     yes, the best checkpoint of its experiment" in ok("show", r.a1).stdout.splitlines()


def test_show_checkpoint_lists_files_of_a_directory(root: Path) -> None:
    project = Project(repository=str(root / ".keepsake"), directory=str(root))
    e = project.start_experiment(None, {}, detached=True)
    (root / "out" / "sub").mkdir(parents=True)
    (root / "out" / "a.bin").write_bytes(b"a" * 2048)
    (root / "out" / "sub" / "b.txt").write_bytes(b"bb")
    (root / "out" / "empty").mkdir()
    c = e.checkpoint("out", metrics={})
    lines = ok("show", c.id).stdout.splitlines()
    files = lines[lines.index("Files") + 1 : lines.index("Files") + 5]
    assert files == ["2.0 KiB  out/a.bin", "         out/empty/", "    2 B  out/sub/b.txt", "2 files, 2.0 KiB"]
    doc = strict_json(ok("show", "--json", c.id).stdout)
    assert doc["files"] == [
        {"path": "out/a.bin", "type": "blob", "size": 2048, "target": None},
        {"path": "out/empty/", "type": "tree", "size": 0, "target": None},
        {"path": "out/sub/b.txt", "type": "blob", "size": 2, "target": None},
    ]


def test_show_json(recorded: Recorded) -> None:
    r = recorded
    doc = strict_json(ok("show", "--json", r.a).stdout)
    assert doc["type"] == "experiment" and doc["id"] == r.a
    assert [c["id"] for c in doc["checkpoints"]] == [r.a0, r.a1]
    assert doc["checkpoints"][0]["metrics"] == {"acc": 0.5, "loss": "NaN"}
    assert doc["python_packages"] == PACKAGES and doc["python_version"] and doc["keepsake_version"]
    checkpoint = strict_json(ok("show", "--json", r.b0).stdout)
    assert checkpoint["type"] == "checkpoint" and checkpoint["id"] == r.b0 and checkpoint["step"] == 10
    assert checkpoint["files"] == [{"path": "model.pth", "type": "blob", "size": 10, "target": None}]
    assert checkpoint["experiment"]["id"] == r.b and "checkpoints" not in checkpoint["experiment"]


def test_show_by_tag_and_unknown_or_ambiguous_ids(recorded: Recorded) -> None:
    r = recorded
    ok("tag", "best", r.b)
    assert ok("show", "best").stdout.startswith(f"Experiment: {r.b}\n")
    assert_error(run("show", "0000000"), 4, "experiment or checkpoint 0000000 not found")
    assert_error(run("show", "no-such-tag"), 4, "not found")
    # a second experiment ref sharing a's first 7 characters makes the prefix ambiguous
    head = ok("rev-parse", f"experiments/{r.a}").stdout.strip()
    twin = r.a[:7] + ("0" if r.a[7] != "0" else "1") + r.a[8:]
    ok("update-ref", f"experiments/{twin}", head)
    assert_error(run("show", r.a[:7]), 5, "ambiguous")
    assert_error(run("checkout", r.a[:7], "-o", "x"), 5, "ambiguous")
    assert ok("show", r.a[:8]).stdout.startswith(f"Experiment: {r.a}")


# ------------------------------------------------------------------ diff


def test_diff_two_experiments(recorded: Recorded) -> None:
    r = recorded
    result = ok("diff", r.a, r.b[:7])
    assert result.stderr.splitlines() == [
        f"{r.a} is experiment {r.a[:7]}: using its best checkpoint {r.a1[:7]}",
        f"{r.b[:7]} is experiment {r.b[:7]}: using its best checkpoint {r.b0[:7]}",
    ]
    rows = [line.split() for line in result.stdout.splitlines()]
    text = result.stdout
    assert ["ID:", r.a[:7], r.b[:7]] in rows
    assert ["lr:", "0.01", "0.001"] in rows and ["opt:", "adam", "sgd"] in rows
    assert not any(row and row[0] in ("layers:", "cfg:", "Host:", "User:") for row in rows)  # unchanged: hidden
    assert ["numpy:", "1.26.0", "1.26.4"] in rows
    assert ["torch:", "2.1.0", "(not", "installed)"] in rows
    assert ["pandas:", "(not", "installed)", "2.2.0"] in rows
    assert ["ID:", r.a1[:7], "(step", "1)", r.b0[:7], "(step", "10)"] in rows
    assert ["Step:", "1", "10"] in rows
    assert ["acc:", "0.7", "0.9"] in rows and ["loss:", "0.2", "0.1"] in rows
    assert text.count("(no difference)") == 2  # git and python


def test_diff_picks_latest_without_primary_metric_and_handles_no_checkpoint(recorded: Recorded) -> None:
    r = recorded
    project = recorded.project
    e = project.start_experiment(None, {"lr": 0.01, "layers": 3, "opt": "adam", "cfg": {"x": 1}, "new": True}, detached=True)
    e.checkpoint(None, metrics={"acc": 0.1})
    last = e.checkpoint(None, metrics={"acc": 0.2, "f1": 0.3})
    result = ok("diff", r.a0, e.id)
    assert f"using its latest checkpoint {last.short_id}" in result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["new:", "(not", "set)", "true"] in rows
    assert ["f1:", "(not", "set)", "0.3"] in rows
    assert ["loss:", "NaN", "(not", "set)"] in rows
    result = ok("diff", r.c, r.a)
    assert "which has no checkpoints" in result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["ID:", "(none)", r.a1[:7], "(step", "1)"] in rows


def test_diff_json(recorded: Recorded) -> None:
    r = recorded
    doc = strict_json(ok("diff", "--json", r.a0, r.b).stdout)
    assert doc["left"] == {"experiment": r.a, "checkpoint": r.a0}
    assert doc["right"] == {"experiment": r.b, "checkpoint": r.b0}
    assert set(doc["experiment"]) == {"created"}
    assert doc["git"] == {} and doc["python"] == {}
    assert doc["params"] == {"added": {}, "removed": {}, "changed": {"lr": [0.01, 0.001], "opt": ["adam", "sgd"]}}
    assert doc["python_packages"] == {
        "added": {"pandas": "2.2.0"}, "removed": {"torch": "2.1.0"}, "changed": {"numpy": ["1.26.0", "1.26.4"]}
    }
    assert doc["checkpoint"]["step"] == [0, 10] and set(doc["checkpoint"]) == {"step", "created"}
    assert doc["metrics"] == {"added": {}, "removed": {}, "changed": {"acc": [0.5, 0.9], "loss": ["NaN", 0.1]}}
    same = strict_json(ok("diff", "--json", r.a0, r.a1).stdout)
    assert same["experiment"] == {} and same["params"] == {"added": {}, "removed": {}, "changed": {}}


def test_diff_unknown_id(recorded: Recorded) -> None:
    assert_error(run("diff", recorded.a, "1234567"), 4, "1234567 not found")


# ------------------------------------------------------------------ checkout


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkout_experiment_writes_code_then_best_checkpoint(recorded: Recorded, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = ok("checkout", recorded.a[:7], "-o", str(out))
    assert files_under(out) == {"src/train.py": b"print('train')\n", "model.pth": b"weights a1!"}
    assert f"its best checkpoint {recorded.a1[:7]} into {out} (2 files)" in result.stderr
    assert result.stdout == ""


def test_checkout_checkpoint_and_force(recorded: Recorded, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok("checkout", recorded.a1, "-o", str(out))
    (out / "mine.txt").write_bytes(b"keep")
    assert_error(run("checkout", recorded.a0, "-o", str(out)), 2, "is not empty")
    assert files_under(out)["model.pth"] == b"weights a1!"  # untouched
    ok("checkout", recorded.a0, "-o", str(out), "-f")
    assert files_under(out) == {"src/train.py": b"print('train')\n", "model.pth": b"weights a0", "mine.txt": b"keep"}


def test_checkout_defaults_to_the_current_directory(recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    repo = str(recorded.project.repository)
    ok("-R", repo, "checkout", recorded.b)
    assert files_under(work) == {"src/train.py": b"print('train')\n", "model.pth": b"weights b0"}
    assert_error(run("-R", repo, "checkout", recorded.b), 2, "is not empty")


def test_checkout_path(recorded: Recorded, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok("checkout", recorded.a, "--path", "model.pth", "-o", str(out))
    assert files_under(out) == {"model.pth": b"weights a1!"}
    ok("checkout", recorded.a0, "--path", "src/train.py", "-o", str(out))
    assert files_under(out) == {"model.pth": b"weights a1!", "src/train.py": b"print('train')\n"}
    assert_error(run("checkout", recorded.a0, "--path", "model.pth", "-o", str(out)), 2, "model.pth is not empty")
    ok("checkout", recorded.a0, "--path", "./model.pth", "-o", str(out), "-f")
    assert files_under(out)["model.pth"] == b"weights a0"
    ok("checkout", recorded.a0, "--path", "src", "-o", str(tmp_path / "only-src"))
    assert files_under(tmp_path / "only-src") == {"src/train.py": b"print('train')\n"}
    assert_error(run("checkout", recorded.a0, "--path", "nope.txt", "-o", str(out)), 4, f"{recorded.a0[:7]}:nope.txt not found")
    assert_error(run("checkout", recorded.a0, "--path", "../etc/passwd", "-o", str(out)), 2, "inside the project")


def test_checkout_of_nothing(recorded: Recorded, tmp_path: Path) -> None:
    assert_error(run("checkout", recorded.c, "-o", str(tmp_path / "x")), 2, "nothing to check out")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ rm and tag


def test_rm_experiment_and_checkpoint(recorded: Recorded) -> None:
    r = recorded
    ok("tag", "old", r.a0)
    ok("tag", "gone", r.c)
    result = ok("rm", r.a0[:10], r.c)
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"Removed checkpoint {r.a0[:7]} of experiment {r.a[:7]}",
        "Removed tag old",
        f"Removed experiment {r.c[:7]} (0 checkpoints)",
        "Removed tag gone",
        "Their data stays in the repository until \"keepsake gc\" reclaims it.",
    ]
    assert ids(ok("ls", "-q")) == [r.a, r.b]
    assert [c["id"] for c in strict_json(ok("show", "--json", r.a).stdout)["checkpoints"]] == [r.a1]
    assert_error(run("show", r.a0), 4, "not found")
    assert_error(run("show", "gone"), 4, "not found")
    assert run("show-ref", "--json", "tags/").stdout.strip() == "{}"


def test_rm_experiment_with_its_checkpoint(recorded: Recorded) -> None:
    r = recorded
    result = ok("rm", r.a, r.a1, r.a)
    assert result.stderr.splitlines()[0] == f"Removed experiment {r.a[:7]} (2 checkpoints)"
    assert ids(ok("ls", "-q")) == [r.b, r.c]


def test_rm_of_nothing_or_unknown_ids_removes_nothing(recorded: Recorded) -> None:
    r = recorded
    assert_error(run("rm"), 4, "nothing to remove")
    assert_error(run("rm", r.a, "abcdef1"), 4, "abcdef1 not found")
    assert_error(run("rm", r.a, "not an id"), 4, "not found")
    assert ids(ok("ls", "-q")) == [r.a, r.b, r.c]


def test_rm_asks_on_a_terminal_unless_forced(recorded: Recorded, monkeypatch: pytest.MonkeyPatch) -> None:
    r = recorded
    monkeypatch.setattr(porcelain, "stdin_is_interactive", lambda: True)
    declined = run("rm", r.a, r.b0, input="n\n")
    assert declined.exit_code == 1
    assert f"  experiment {r.a[:7]} (2 checkpoints)" in declined.stderr
    assert f"  checkpoint {r.b0[:7]} of experiment {r.b[:7]}" in declined.stderr
    assert ids(ok("ls", "-q")) == [r.a, r.b, r.c]
    ok("rm", r.a, input="y\n")
    assert ids(ok("ls", "-q")) == [r.b, r.c]
    forced = ok("rm", "-f", r.c)
    assert "About to remove" not in forced.stderr
    assert ids(ok("ls", "-q")) == [r.b]


def test_tag(recorded: Recorded) -> None:
    r = recorded
    result = ok("tag", "v1", r.b0[:7])
    assert result.stdout == "" and result.stderr == f"Tagged checkpoint {r.b0[:7]} of experiment {r.b[:7]} as v1\n"
    assert ok("show", "v1").stdout.startswith(f"Checkpoint: {r.b0}\n")
    ok("tag", "v1", r.a)  # moves the tag
    assert ok("show", "v1").stdout.startswith(f"Experiment: {r.a}\n")
    assert ok("rev-parse", "tags/v1").stdout.strip() == r.a
    assert_error(run("tag", "bad//name", r.a), 2, "invalid ref name")
    assert_error(run("tag", "v2", "fedcba9"), 4, "not found")


# ------------------------------------------------------------------ recording from the CLI


def test_experiment_start_commit_stop_round_trip(root: Path) -> None:
    (root / "data").mkdir()
    started = ok(
        "experiment", "start", "--path", "src",
        "--param", "lr=0.01", "--param", "name=resnet", "--param", "layers=[64, 64]",
        "--param", "flag=true", "--param", "quoted=\"3\"", "--param", "expr=a=b",
    )
    experiment = started.stdout.strip()
    assert len(experiment) == 32 and started.stdout == experiment + "\n"
    assert f'keepsake commit {experiment[:7]}' in started.stderr
    doc = strict_json(ok("show", "--json", experiment).stdout)
    assert doc["params"] == {"lr": 0.01, "name": "resnet", "layers": [64, 64], "flag": True, "quoted": "3", "expr": "a=b"}
    assert doc["status"] == "running" and doc["path"] == "src"

    (root / "data" / "model.bin").write_bytes(b"epoch 1")
    first = ok(
        "commit", experiment[:7], "--path", "data/model.bin", "--metric", "loss=0.5", "--metric", "note=warmup",
        "--primary-metric", "loss:minimize",
    ).stdout.strip()
    (root / "data" / "model.bin").write_bytes(b"epoch 2")
    second = ok("commit", experiment, "--path", "data", "--step", "7", "--metric", "loss=0.25").stdout.strip()
    third = ok("commit", experiment, "--metric", "loss=NaN").stdout.strip()
    doc = strict_json(ok("show", "--json", experiment).stdout)
    steps = [(c["id"], c["step"], c["metrics"], c["path"]) for c in doc["checkpoints"]]
    assert steps == [
        (first, 0, {"loss": 0.5, "note": "warmup"}, "data/model.bin"),
        (second, 7, {"loss": 0.25}, "data"),
        (third, 8, {"loss": "NaN"}, None),
    ]
    assert doc["best_checkpoint"]["id"] == second
    assert ids(ok("ps", "-q")) == [experiment]

    assert ok("experiment", "stop", experiment).stderr == f"Experiment {experiment[:7]} stopped\n"
    assert ids(ok("ps", "-q")) == []
    assert strict_json(ok("show", "--json", experiment).stdout)["status"] == "stopped"
    assert ok("experiment", "stop", experiment).stderr == f"Experiment {experiment[:7]} is already stopped\n"
    assert_error(run("commit", experiment, "--metric", "loss=1"), 2, "is stopped")

    out = root.parent / "restored"
    ok("checkout", experiment, "-o", str(out))
    assert files_under(out) == {"src/train.py": b"print('train')\n", "data/model.bin": b"epoch 2"}

    failed = ok("experiment", "start", "--path", "src").stdout.strip()
    ok("experiment", "stop", "--failed", failed)
    assert strict_json(ok("show", "--json", failed).stdout)["status"] == "failed"


def test_experiment_start_path_is_relative_to_the_current_directory(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / "keepsake.yaml").write_text("repository: .keepsake\n")
    monkeypatch.chdir(root / "src")
    experiment = ok("experiment", "start", "--path", ".").stdout.strip()
    assert strict_json(ok("show", "--json", experiment).stdout)["path"] == "src"
    checkpoint = ok("commit", experiment, "--path", "train.py").stdout.strip()
    assert strict_json(ok("show", "--json", checkpoint).stdout)["path"] == "src/train.py"
    assert (root / ".keepsake").is_dir()


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["experiment", "start", "--param", "lr"], 2, "write KEY=VALUE"),
        (["experiment", "start", "--param", "=1"], 2, "write KEY=VALUE"),
        (["experiment", "start", "--path", "missing"], 2, "cannot read"),
        (["experiment", "start", "--path", ".."], 2, "inside the project directory"),
        (["commit", "{e}", "--metric", "loss"], 2, "write KEY=VALUE"),
        (["commit", "{e}", "--metric", "loss=1", "--primary-metric", "loss"], 2, "write NAME:GOAL"),
        (["commit", "{e}", "--metric", "loss=1", "--primary-metric", "loss:up"], 2, "is not \"minimize\" or \"maximize\""),
        (["commit", "{e}", "--metric", "loss=1", "--primary-metric", "acc:maximize"], 2, "not among the metrics"),
        (["commit", "{e}", "--path", "nothing.bin"], 2, "cannot read"),
        (["commit", "{c}"], 6, "is a checkpoint, not a experiment"),
        (["commit", "0123456"], 4, "not found"),
        (["experiment", "stop", "{c}"], 6, "not a experiment"),
        (["experiment", "stop", "0123456"], 4, "not found"),
    ],
)
def test_recording_bad_input(root: Path, args: list[str], code: int, fragment: str) -> None:
    experiment = ok("experiment", "start", "--path", "src").stdout.strip()
    checkpoint = ok("commit", experiment).stdout.strip()
    before = ok("show", "--json", experiment).stdout
    assert_error(run(*[a.format(e=experiment, c=checkpoint) for a in args]), code, fragment)
    after = ok("show", "--json", experiment).stdout
    assert strict_json(after)["checkpoints"] == strict_json(before)["checkpoints"]


# ------------------------------------------------------------------ bad input to ls and the repository


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["ls", "-f", "lr ~ 3"], 2, "malformed filter 'lr ~ 3'"),
        (["ls", "-f", "lr <"], 2, "malformed filter"),
        (["ls", "-f", "= 3"], 2, "malformed filter"),
        (["ls", "-f", "lr = fast"], 2, "compares different types: lr is a number"),
        (["ls", "-f", "opt > 3"], 2, "compares different types: opt is a str"),
        (["ls", "-f", "created > yesterday"], 2, "use a date like"),
        (["ls", "-f", "lrr = 1"], 2, "unknown filter key 'lrr'"),
        (["ps", "-f", "lrr = 1"], 2, "unknown filter key 'lrr'"),
        (["ls", "-s", "lrr"], 2, "unknown sort key 'lrr' (known keys: created, started"),
        (["ls", "-s", "cfg"], 2, "cannot sort by 'cfg'"),
        (["ls", "-q", "--json"], 2, "cannot be combined"),
        (["ls", "-q", "--all"], 2, "cannot be combined"),
        (["show", "xyz"], 4, "xyz not found"),
        (["diff", "0000000", "1111111"], 4, "not found"),
    ],
)
def test_bad_list_input(shared: Recorded, args: list[str], code: int, fragment: str) -> None:
    assert_error(run("-R", shared.project.repository, *args), code, fragment)


def test_unknown_repository_scheme(root: Path) -> None:
    for args in (["ls"], ["show", "abcdef1"], ["experiment", "start"]):
        assert_error(run("-R", "nosuch://bucket/repo", *args), 3, "unknown storage scheme 'nosuch'")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("repository: .keepsake\ncolour: blue\n", "unknown keys colour"), ("repository: [unclosed\n", "not valid YAML")],
)
def test_bad_keepsake_yaml(root: Path, text: str, fragment: str) -> None:
    (root / "keepsake.yaml").write_text(text)
    for args in (["ls"], ["ps"], ["experiment", "start"], ["rm", "abcdef1"]):
        assert_error(run(*args), 3, fragment)
    assert not (root / ".keepsake").exists()


# ------------------------------------------------------------------ display helpers


def test_format_ago() -> None:
    now = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
    cases = [
        (timedelta(seconds=0), "just now"),
        (timedelta(seconds=1), "1 second ago"),
        (timedelta(seconds=20), "20 seconds ago"),
        (timedelta(minutes=1, seconds=5), "1 minute ago"),
        (timedelta(minutes=3), "3 minutes ago"),
        (timedelta(hours=2), "2 hours ago"),
        (timedelta(days=1), "1 day ago"),
        (timedelta(days=29), "29 days ago"),
        (timedelta(days=65), "2 months ago"),
        (timedelta(days=364), "12 months ago"),
    ]
    for delta, expected in cases:
        assert format_ago(now - delta, now) == expected
    old = now - timedelta(days=800)
    assert format_ago(old, now) == old.astimezone().strftime("%Y-%m-%d")


def test_json_values_and_table_values() -> None:
    assert to_json_value({"a": math.nan, "b": [math.inf, -math.inf], "c": (1, 2)}) == {
        "a": "NaN", "b": ["Infinity", "-Infinity"], "c": [1, 2]
    }
    assert to_json_value(np.array([[1.5, math.nan]])) == [[1.5, "NaN"]]
    assert to_json_value(np.float32(0.5)) == 0.5 and to_json_value(np.int64(3)) == 3
    assert format_value(0.123456789) == "0.123456789" and format_value(0.123456789, 20) == "0.12346"
    assert format_value(True) == "true" and format_value(None) == "null" and format_value("x") == "x"
    assert format_value(math.nan) == "NaN" and format_value(-math.inf, 20) == "-Infinity"
    assert format_value("a" * 30, 20) == "a" * 17 + "..."
    assert format_value(np.zeros((3, 4))) == "array(shape=[3, 4], dtype=float64)"
    assert format_value({"b": 1, "a": [1, 2]}) == '{"a": [1, 2], "b": 1}'


def test_array_params_in_ls_show_and_json(root: Path) -> None:
    project = Project(repository=str(root / ".keepsake"), directory=str(root))
    project.start_experiment(None, {"w": np.array([1.0, 2.0])}, detached=True)
    project.start_experiment(None, {"w": np.array([1.0, math.inf])}, detached=True)
    header, first, second = ok("ls").stdout.splitlines()
    assert "W" in header.split() and "[1.0, 2.0]" in first and '[1.0, "Infinity"]' in second
    assert [d["params"]["w"] for d in strict_json(ok("ls", "--json").stdout)] == [[1.0, 2.0], [1.0, "Infinity"]]


# ------------------------------------------------------------------ S3


@pytest.mark.remote
def test_porcelain_against_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, root: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = s3_server.new_url("porcelain")

    experiment = ok("-R", url, "experiment", "start", "--path", "src", "--param", "lr=0.1").stdout.strip()
    (root / "model.pth").write_bytes(b"s3 weights")
    checkpoint = ok(
        "-R", url, "commit", experiment, "--path", "model.pth", "--metric", "acc=0.8", "--primary-metric", "acc:maximize"
    ).stdout.strip()
    ok("-R", url, "experiment", "stop", experiment)
    assert ids(ok("-R", url, "ls", "-q", "-f", "acc > 0.5")) == [experiment]
    header, row = ok("-R", url, "ls").stdout.splitlines()
    assert row.startswith(experiment[:7]) and f"{checkpoint[:7]} (step 0)" in row
    assert ok("-R", url, "show", checkpoint[:7]).stdout.startswith(f"Checkpoint: {checkpoint}\n")
    out = tmp_path / "restored"
    ok("-R", url, "checkout", experiment, "-o", str(out))
    assert files_under(out) == {"src/train.py": b"print('train')\n", "model.pth": b"s3 weights"}
