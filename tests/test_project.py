"""find_project: which repository a command uses, and keepsake.yaml validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from keepsake.errors import ConfigError
from keepsake.project import CONFIG_FILE, ProjectSettings, find_config, find_project, load_config


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEPSAKE_REPOSITORY", raising=False)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/proj/keepsake.yaml and a working directory two levels below it."""
    (tmp_path / "proj" / "a" / "b").mkdir(parents=True)
    return tmp_path / "proj"


def write_yaml(folder: Path, text: str) -> Path:
    path = folder / CONFIG_FILE
    path.write_text(text)
    return path


def test_precedence_flag_env_yaml_default(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = str(tree / "a" / "b")
    yaml_path = write_yaml(tree, "repository: from-yaml\nstorage_options:\n  anon: true\n")
    monkeypatch.setenv("KEEPSAKE_REPOSITORY", str(tmp_path / "from-env"))

    flag = find_project("s3://bucket/from-flag", cwd=cwd)
    assert flag == ProjectSettings(str(tree), "s3://bucket/from-flag", {"anon": True}, str(yaml_path))

    env = find_project(None, cwd=cwd)
    assert env.repository == str(tmp_path / "from-env")

    monkeypatch.delenv("KEEPSAKE_REPOSITORY")
    from_yaml = find_project(None, cwd=cwd)
    assert from_yaml.repository == str(tree / "from-yaml")
    assert from_yaml.directory == str(tree)

    yaml_path.unlink()
    default = find_project(None, cwd=cwd)
    assert default == ProjectSettings(cwd, str(Path(cwd) / ".keepsake"), {}, None)


def test_empty_environment_variable_is_ignored(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSAKE_REPOSITORY", "")
    assert find_project(None, cwd=str(tree)).repository == str(tree / ".keepsake")


def test_relative_paths(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tree / "a" / "b"
    # a flag and the variable are relative to the working directory ...
    assert find_project("../store", cwd=str(cwd)).repository == str(tree / "a" / "store")
    monkeypatch.setenv("KEEPSAKE_REPOSITORY", "env-store")
    assert find_project(None, cwd=str(cwd)).repository == str(cwd / "env-store")
    monkeypatch.delenv("KEEPSAKE_REPOSITORY")
    # ... keepsake.yaml's is relative to the folder holding it, wherever we stand
    write_yaml(tree, "repository: ../shared/store\n")
    for where in (tree, tree / "a", cwd):
        assert find_project(None, cwd=str(where)).repository == str(tree.parent / "shared" / "store")


def test_urls_and_absolute_paths_are_kept(tree: Path, tmp_path: Path) -> None:
    write_yaml(tree, "repository: gs://bucket/prefix\n")
    assert find_project(None, cwd=str(tree / "a")).repository == "gs://bucket/prefix"
    write_yaml(tree, f"repository: {tmp_path / 'abs'}\n")
    assert find_project(None, cwd=str(tree / "a")).repository == str(tmp_path / "abs")
    assert find_project("memory://x", cwd=str(tree)).repository == "memory://x"


def test_home_is_expanded(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_yaml(tree, "repository: ~/store\n")
    assert find_project(None, cwd=str(tree)).repository == str(tmp_path / "home" / "store")


def test_nearest_yaml_wins_and_empty_yaml_means_defaults(tree: Path) -> None:
    write_yaml(tree, "repository: outer\n")
    inner = write_yaml(tree / "a", "")
    project = find_project(None, cwd=str(tree / "a" / "b"))
    assert project.config_path == str(inner)
    assert project.repository == str(tree / "a" / ".keepsake")  # next to the yaml, not the cwd
    assert project.directory == str(tree / "a")
    assert find_project(None, cwd=str(tree)).repository == str(tree / "outer")


def test_find_config(tree: Path) -> None:
    assert find_config(str(tree / "a" / "b")) is None
    (tree / "a" / CONFIG_FILE).mkdir()  # a directory named keepsake.yaml is not a config
    assert find_config(str(tree / "a" / "b")) is None
    path = write_yaml(tree, "")
    assert find_config(str(tree / "a" / "b")) == str(path)
    assert find_config(str(tree)) == str(path)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b"repository: [unclosed\n", "it is not valid YAML (expected ',' or ']'"),
        (b"a: b: c\n", "it is not valid YAML (mapping values are not allowed here at line 1, column 5)"),
        (b"repository: x\nrepsitory: y\nextra: 1\n", "unknown keys extra, repsitory (known: remote, remote_storage_options, repository, storage_options)"),
        (b"1: x\n", "unknown keys 1"),
        (b"- a\n- b\n", "it must be a mapping"),
        (b"just text\n", "it must be a mapping"),
        (b"repository: 5\n", "'repository' must be a string"),
        (b"repository: [a]\n", "'repository' must be a string"),
        (b"storage_options: [a]\n", "'storage_options' must be a mapping"),
        (b"\xff\xfe: x\n", "it is not UTF-8 text"),
    ],
    ids=["unclosed", "colon", "unknown-keys", "int-key", "list", "scalar", "repo-int", "repo-list", "options-list", "not-utf8"],
)
def test_bad_yaml_is_a_config_error(tree: Path, text: bytes, fragment: str) -> None:
    path = tree / CONFIG_FILE
    path.write_bytes(text)
    for call in (lambda: load_config(str(path)), lambda: find_project(None, cwd=str(tree / "a")), lambda: find_project("x", cwd=str(tree))):
        with pytest.raises(ConfigError) as info:
            call()
        exc = info.value
        assert exc.path == str(path)
        assert exc.exit_code == 3
        message = str(exc)
        assert message.startswith(f"cannot use {path}: ")
        assert fragment in message
        assert "\n" not in message  # errors are one line


def test_load_config_accepts_known_keys(tree: Path) -> None:
    path = write_yaml(tree, "# comment only\n")
    assert load_config(str(path)) == {}
    write_yaml(tree, "repository: s3://b/p\nstorage_options: {endpoint_url: 'http://h:1'}\n")
    assert load_config(str(path)) == {"repository": "s3://b/p", "storage_options": {"endpoint_url": "http://h:1"}}
