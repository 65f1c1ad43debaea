#!/usr/bin/env python3
"""The stand-in training run of scripts/bench-peers, one tool at a time, in that tool's venv.

Standard library only at the top: this file runs under every tool's interpreter (this
repository's .venv, keepsake 0.4.2's, DVC's, MLflow's, hf_xet's), and each tool imports
only its own package.

A run: the tool's "init" (recording the code in ``src/``), then for every model version
``VERSIONS/model-<i>.npz``: replace ``model.npz`` in the workspace by that version (unlink,
then copy: a new file, as ``torch.save``/``np.savez`` to a stable name makes), ``os.sync()``
so the write-back of the file just written is not charged to the tool, optionally sleep
``--step-seconds`` (stand-in training time, during which a background uploader can work),
then the timed checkpoint call. After the last one the wall clock is noted and the tool's
"finish" call is made (``experiment.stop()``, ``dvc push``, ``mlflow.end_run()``); the
parent notes when the process has exited: ``exit - finish_wall`` is the wait until durable.

The result (JSON, to ``--result``; stdout belongs to the tools) holds each checkpoint's
blocked seconds and the id the tool gave it, so the parent can list and restore.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

MODEL = "model.npz"
METRICS = "metrics.json"


def val_loss(step: int) -> float:
    return round(1.0 / (step + 1), 6)


def place_model(versions: str, step: int) -> None:
    """Write version ``step`` as ./model.npz (a new file, as a training script would), synced."""
    try:
        os.unlink(MODEL)
    except FileNotFoundError:
        pass
    shutil.copyfile(os.path.join(versions, f"model-{step}.npz"), MODEL)
    os.sync()


class Tool:
    """What every tool does: start (record code), checkpoint (timed), finish (timed)."""

    def start(self, a: argparse.Namespace) -> dict[str, Any]:
        return {}

    def checkpoint(self, step: int) -> str:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class Keepsake(Tool):
    """This repository's Keepsake and the original 0.4.2: the same two calls."""

    def start(self, a: argparse.Namespace) -> dict[str, Any]:
        import keepsake

        self.experiment = keepsake.init(path="src", params={"lr": 0.001, "batch_size": 64})
        return {"experiment": str(self.experiment.id), "version": getattr(keepsake, "__version__", "?")}

    def checkpoint(self, step: int) -> str:
        loss = val_loss(step)
        c = self.experiment.checkpoint(path=MODEL, step=step, metrics={"val_loss": loss, "accuracy": 1 - loss / 2},
                                       primary_metric=("val_loss", "minimize"))
        if c is None:  # 0.4.2 prints errors and returns None instead of raising
            raise SystemExit("drive.py: checkpoint() returned None (it failed; see the messages above)")
        return str(c.id)

    def finish(self) -> None:
        self.experiment.stop()


def run(argv: list[str], **kw: Any) -> str:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"drive.py: {' '.join(argv)} exited with {proc.returncode}: {proc.stdout.strip()[-1500:]}")
    return str(proc.stdout)


class Dvc(Tool):
    """DVC as its docs show it: the code and small files in git, the model by ``dvc add``;
    each checkpoint is ``dvc add model.npz`` + a git commit of model.npz.dvc and metrics.json
    (training waits on both: dvc add must have cached the file before it is overwritten);
    ``dvc push --all-commits`` to the default remote at the end makes them all durable."""

    def start(self, a: argparse.Namespace) -> dict[str, Any]:
        self.dvc = a.dvc
        run(["git", "init", "-q"])
        run(["git", "config", "user.email", "bench@example.invalid"])
        run(["git", "config", "user.name", "bench"])
        run([self.dvc, "init", "-q"])
        run([self.dvc, "remote", "add", "-q", "-d", "store", a.remote])
        with open("params.yaml", "w") as f:
            f.write("lr: 0.001\nbatch_size: 64\n")
        with open("dvc.yaml", "w") as f:  # so `dvc exp show` shows the metrics and params
            f.write(f"metrics:\n- {METRICS}\nparams:\n- params.yaml\n")
        run(["git", "add", "-A"])
        run(["git", "commit", "-q", "-m", "code"])
        return {}

    def checkpoint(self, step: int) -> str:
        loss = val_loss(step)
        with open(METRICS, "w") as f:
            json.dump({"val_loss": loss, "accuracy": 1 - loss / 2, "step": step}, f)
        run([self.dvc, "add", "-q", MODEL])
        run(["git", "add", f"{MODEL}.dvc", METRICS, ".gitignore"])
        run(["git", "commit", "-q", "-m", f"checkpoint {step}"])
        return run(["git", "rev-parse", "HEAD"]).strip()

    def finish(self) -> None:
        # --all-commits: every checkpoint's data, not only the workspace's (HEAD's) model
        run([self.dvc, "push", "-q", "--all-commits"])


class Mlflow(Tool):
    """MLflow's file store: one run; each checkpoint logs its metrics and
    ``log_artifact(model.npz, artifact_path="checkpoint-<step>")``; the code as artifacts."""

    def start(self, a: argparse.Namespace) -> dict[str, Any]:
        import mlflow

        self.mlflow = mlflow
        run_ = mlflow.start_run()
        mlflow.log_params({"lr": 0.001, "batch_size": 64})
        mlflow.log_artifacts("src", artifact_path="code")
        return {"run_id": run_.info.run_id, "experiment_id": run_.info.experiment_id, "version": mlflow.__version__}

    def checkpoint(self, step: int) -> str:
        loss = val_loss(step)
        self.mlflow.log_metrics({"val_loss": loss, "accuracy": 1 - loss / 2}, step=step)
        self.mlflow.log_artifact(MODEL, artifact_path=f"checkpoint-{step}")
        return f"checkpoint-{step}/{MODEL}"

    def finish(self) -> None:
        self.mlflow.end_run()


class HfXet(Tool):
    """hf_xet's chunk store, offline: ``upload_files`` to its ``local://DIR`` endpoint (the
    content-addressed, deduplicating store that the Hub's Xet backend runs on). It keeps no
    catalogue of runs: the (hash, size) of each upload goes to catalogue.json in the store."""

    def start(self, a: argparse.Namespace) -> dict[str, Any]:
        import hf_xet

        self.hf_xet = hf_xet
        self.store = a.store
        self.endpoint = "local://" + os.path.abspath(a.store)
        self.catalogue: dict[str, Any] = {"code": {}, "checkpoints": []}
        code = sorted(os.path.join("src", n) for n in os.listdir("src"))
        for path, info in zip(code, self.upload(code)):
            self.catalogue["code"][path] = info
        self.save_catalogue()
        return {}

    def upload(self, paths: list[str]) -> list[dict[str, Any]]:
        infos = self.hf_xet.upload_files(paths, self.endpoint, None, None, None, "model")
        return [{"hash": i.hash, "size": i.file_size} for i in infos]

    def save_catalogue(self) -> None:
        with open(os.path.join(self.store, "catalogue.json"), "w") as f:
            json.dump(self.catalogue, f)

    def checkpoint(self, step: int) -> str:
        [info] = self.upload([MODEL])
        self.catalogue["checkpoints"].append({"step": step, "metrics": {"val_loss": val_loss(step)}, **info})
        self.save_catalogue()
        return str(info["hash"])


TOOLS: dict[str, Callable[[], Tool]] = {"keepsake": Keepsake, "dvc": Dvc, "mlflow": Mlflow, "hfxet": HfXet}


def restore_hfxet(store: str, step: int, out: str) -> None:
    """Download checkpoint ``step`` from the hf_xet store to ``out`` (timed by the parent)."""
    import hf_xet

    with open(os.path.join(store, "catalogue.json")) as f:
        entry = json.load(f)["checkpoints"][step]
    info = hf_xet.PyXetDownloadInfo(os.path.abspath(out), entry["hash"], entry["size"])
    hf_xet.download_files([info], "local://" + os.path.abspath(store), None, None, None)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("tool", choices=[*TOOLS, "restore-hfxet"])
    p.add_argument("--versions", help="folder of model-<i>.npz")
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--result")
    p.add_argument("--dvc", help="the dvc executable")
    p.add_argument("--remote", help="DVC's remote folder")
    p.add_argument("--store", help="hf_xet's local store folder")
    p.add_argument("--step", type=int, help="restore-hfxet: the checkpoint")
    p.add_argument("--out", help="restore-hfxet: the file to write")
    a = p.parse_args()
    if a.tool == "restore-hfxet":
        restore_hfxet(a.store, a.step, a.out)
        return 0

    tool = TOOLS[a.tool]()
    out: dict[str, Any] = {}
    t = time.perf_counter()
    out.update(tool.start(a))
    out["start_seconds"] = time.perf_counter() - t
    steps = []
    for step in range(a.checkpoints):
        place_model(a.versions, step)
        if a.step_seconds:
            time.sleep(a.step_seconds)
        t = time.perf_counter()
        ident = tool.checkpoint(step)
        steps.append({"id": ident, "blocked_seconds": time.perf_counter() - t})
    out["checkpoints"] = steps
    out["finish_wall"] = time.time()
    t = time.perf_counter()
    tool.finish()
    out["finish_seconds"] = time.perf_counter() - t
    with open(a.result, "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
