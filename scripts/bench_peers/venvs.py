"""One virtualenv per peer, cached under ~/.cache/keepsake-bench/ (reused when it still works).

A venv that is missing, or whose check fails, is created again with ``python -m venv`` and
``pip install`` from PyPI; the pip output goes to ``venv-<name>-setup.log`` beside it. The
keepsake 0.4.2 venv is the one scripts/bench-tracking makes (same name, same pins).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "keepsake-bench")


@dataclass(frozen=True)
class VenvSpec:
    name: str  # the folder is venv-<name>
    requirements: tuple[str, ...]
    #: Python code that prints the version of the tool and fails when the venv is not usable.
    check: str


SPECS = {
    # keepsake 0.4.2 needs these pins (newer protobuf breaks its generated code); as in bench-tracking
    "keepsake042": VenvSpec("keepsake042", ("keepsake==0.4.2", "protobuf==3.20.3",
                                            "googleapis-common-protos[grpc]==1.56.4", "numpy"),
                            "import keepsake, keepsake.daemon as d, os; assert keepsake.__version__ == '0.4.2'; "
                            "assert os.access(d.DAEMON_BINARY, os.X_OK), 'no daemon binary'; print(keepsake.__version__)"),
    "dvc": VenvSpec("dvc", ("dvc",), "import dvc.version as v; print(v.__version__)"),
    "mlflow": VenvSpec("mlflow", ("mlflow",), "import mlflow; print(mlflow.__version__)"),
    "hfxet": VenvSpec("hfxet", ("hf_xet",), "import hf_xet, importlib.metadata as m; print(m.version('hf_xet'))"),
}


@dataclass
class Venv:
    name: str
    python: str | None  # None: not usable, see problem
    version: str = ""
    problem: str = ""

    @property
    def bin(self) -> str:
        return os.path.dirname(self.python or "")


def _check(python: str, spec: VenvSpec, env: dict[str, str]) -> tuple[str, str]:
    """(version, '') when the venv works, else ('', what is wrong)."""
    if not os.path.exists(python):
        return "", "no virtualenv"
    # not from the checkout: `python -c` would import this checkout's keepsake/ first
    proc = subprocess.run([python, "-c", spec.check], capture_output=True, text=True, cwd=CACHE, env=env)
    if proc.returncode != 0:
        return "", (proc.stderr.strip().splitlines() or ["check failed"])[-1]
    return proc.stdout.strip(), ""


def ensure(name: str, env: dict[str, str], log: Callable[[str], None]) -> Venv:
    """The venv of peer ``name``: reused when its check (run with ``env``) passes, else (re)created."""
    spec = SPECS[name]
    path = os.path.join(CACHE, f"venv-{spec.name}")
    python = os.path.join(path, "bin", "python")
    os.makedirs(CACHE, exist_ok=True)
    version, problem = _check(python, spec, env)
    if not problem:
        return Venv(name, python, version)
    log(f"setting up {path} ({problem}): pip install {' '.join(spec.requirements)}")
    shutil.rmtree(path, ignore_errors=True)
    setup_log = os.path.join(CACHE, f"venv-{spec.name}-setup.log")
    # pip with the user's own environment: its index settings live in ~/.config/pip and PIP_*,
    # which the measured processes' environment (``env``) moves or drops
    install_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    with open(setup_log, "w") as out:
        for argv in ([shutil.which("python3") or sys.executable, "-m", "venv", path],
                     [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", *spec.requirements]):
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=CACHE,
                              env=install_env).returncode != 0:
                return Venv(name, None, problem=f"{' '.join(argv[:4])} failed (log: {setup_log})")
    version, problem = _check(python, spec, env)
    if problem:
        return Venv(name, None, problem=f"installed but not usable: {problem}")
    return Venv(name, python, version)
