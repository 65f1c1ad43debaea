"""The process tests/test_crash.py kills: a training loop, an index-merging loop, gc or push.

Run as ``python tests/crash_child.py '<json config>'``. It appends JSON lines to the config's
``log`` file, one ``write()`` each (line buffered), so every line written before a SIGKILL is
there for the parent to read:

- ``{"event": "ready"}`` once imports are done (the parent starts its kill timer then);
- ``{"event": "checkpoint", ...}`` after ``experiment.checkpoint()`` returned, with the ids
  and the sha256 of the file it saved: the parent reads these back after the kill;
- ``{"event": "phase", "phase": ...}`` where a step of interest starts or ends (an index
  merge, a gc progress message), so the parent can tell what a timed kill interrupted;
- ``{"event": "kill", ...}`` just before the child kills itself at a planned storage call
  (``kill_op``: the Nth write/create/swap/delete, before or after it runs);
- ``{"event": "done", "ops": N}`` when it finished without being killed.

Killing at the Nth storage mutation enumerates the states a crash can leave (nothing else
changes the repository between two mutations); the parent's timed kills add the moments
inside a call (a temporary file half written, an fsync cut short).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import threading
from typing import Any, Callable

from keepsake.objects import database
from keepsake.storage import Storage

_log_file: Any = None
_log_lock = threading.Lock()


def log(event: str, **fields: Any) -> None:
    with _log_lock:
        _log_file.write(json.dumps({"event": event, **fields}) + "\n")


class KillSwitch:
    """Counts storage mutations (all of them, or only those inside an index merge) and
    SIGKILLs this process at the planned one."""

    def __init__(self, at: int | None, when: str, scope: str) -> None:
        self.at = at
        self.when = when
        self.scope = scope
        self.ops = 0
        self.in_merge = False
        self._lock = threading.Lock()

    def around(self, name: str, key: str, call: Callable[[], Any]) -> Any:
        counted = self.scope == "all" or (self.scope == "merge" and self.in_merge)
        fire = False
        if counted:
            with self._lock:
                self.ops += 1
                fire = self.ops == self.at
        if fire and self.when == "before":
            self.kill(name, key)
        result = call()
        if fire:
            self.kill(name, key)
        return result

    def kill(self, name: str, key: str) -> None:
        log("kill", op=name, key=key, when=self.when, n=self.ops, in_merge=self.in_merge)
        os.kill(os.getpid(), signal.SIGKILL)


def install(switch: KillSwitch, pack_size: int) -> None:
    """Route Storage's mutations through ``switch``; make packs ``pack_size`` bytes."""
    for name in ("write", "create", "swap", "delete"):
        original = getattr(Storage, name)

        def wrapped(self: Storage, key: str, *args: Any, _o: Any = original, _n: str = name, **kw: Any) -> Any:
            return switch.around(_n, key, lambda: _o(self, key, *args, **kw))

        setattr(Storage, name, wrapped)
    # ObjectDB.writer binds PACK_SIZE as a default argument when the class is defined, so
    # setting database.PACK_SIZE alone would change nothing: wrap writer() too.
    database.PACK_SIZE = pack_size
    writer = database.ObjectDB.writer
    database.ObjectDB.writer = lambda self, pack_size=pack_size: writer(self, pack_size)  # type: ignore[method-assign]
    merge = database.ObjectDB.merge_indexes

    def merge_indexes(self: database.ObjectDB) -> int:
        switch.in_merge = True
        log("phase", phase="merge-start")
        try:
            return merge(self)
        finally:
            switch.in_merge = False
            log("phase", phase="merge-end")

    database.ObjectDB.merge_indexes = merge_indexes  # type: ignore[method-assign]


class Model:
    """A model file of ``blocks`` blocks of ``block`` bytes, drawn from a pool that runs
    with nearby ``offset``s share, a fifth of them changing at each step. Blocks of 128 KiB hold
    whole chunks (chunking finds its cut points again inside a block), so experiments share
    chunks: deleting one leaves packs partly live, which gc repacks."""

    def __init__(self, pool_seed: int, seed: int, blocks: int, block: int, offset: int) -> None:
        self.block = block
        # a window onto an endless sequence of blocks: runs with nearby offsets share blocks,
        # so every run both reuses its predecessors' data and brings some of its own
        self.pool = [random.Random(f"{pool_seed}-{i}").randbytes(block) for i in range(offset, offset + 2 * blocks)]
        self.rnd = random.Random(seed)
        self.layout: list[bytes] = [self.rnd.choice(self.pool) for _ in range(blocks)]

    def step(self) -> bytes:
        for i in self.rnd.sample(range(len(self.layout)), max(1, len(self.layout) // 5)):
            # mostly pool blocks (seen before somewhere), sometimes new bytes
            self.layout[i] = self.rnd.randbytes(self.block) if self.rnd.random() < 0.15 else self.rnd.choice(self.pool)
        return b"".join(self.layout)


def train(config: dict[str, Any]) -> None:
    """A training loop through the public API; file checkpoints, or with ``metrics_only``
    mostly metrics-only ones (each is one flush: one more small index file to merge)."""
    import keepsake

    project = config["project"]
    os.makedirs(os.path.join(project, "code"), exist_ok=True)
    with open(os.path.join(project, "code", "train.py"), "w") as f:
        f.write(f"# trial {config['trial']}\n")
    model = Model(config["pool_seed"], config["seed"], config["blocks"], config["block"], config["trial"] * 2)
    log("ready")
    experiment = keepsake.init(
        path="code", params={"trial": config["trial"], "lr": 0.01}, repository=config["repo"], directory=project
    )
    log("phase", phase="started", experiment=experiment.id)
    for step in range(config["steps"]):
        with_file = not config["metrics_only"] or step % 10 == 9
        digest = None
        if with_file:
            data = model.step()
            with open(os.path.join(project, "model.bin"), "wb") as f:
                f.write(data)
            digest = hashlib.sha256(data).hexdigest()
        metrics = {"loss": 1.0 / (step + 1), "step_seen": step}
        log("phase", phase="checkpoint-start", step=step)
        checkpoint = experiment.checkpoint(
            path="model.bin" if with_file else None, step=step, metrics=metrics, primary_metric=("loss", "minimize")
        )
        log(
            "checkpoint",
            experiment=experiment.id,
            checkpoint=checkpoint.id,
            step=step,
            path="model.bin" if with_file else None,
            sha256=digest,
            metrics=metrics,
        )
    experiment.stop()


def gc(config: dict[str, Any]) -> None:
    from keepsake import gc as gc_module
    from keepsake.repository import Repository

    # repack any pack with a dead object and under 90% live: many more repacks to kill
    gc_module.REPACK_BELOW = config["repack_below"]

    repo = Repository.open(config["repo"])
    log("ready")
    report = gc_module.collect_garbage(repo, grace=0, wait=config.get("wait", 2.0), progress=lambda m: log("phase", phase=m))
    log(
        "phase",
        phase="gc-report",
        dead=report.dead_objects,
        packs_deleted=report.packs_deleted,
        packs_repacked=report.packs_repacked,
        copied=report.objects_copied,
    )


def push(config: dict[str, Any]) -> None:
    from keepsake.repository import Repository
    from keepsake.transfer import init_like, transfer

    source = Repository.open(config["repo"])
    log("ready")
    destination = init_like(config["destination"], None, source)
    result = transfer(source, destination)
    log("phase", phase="push-report", sent=result.stats.objects_sent, refs=result.stats.refs_updated)


def main() -> None:
    global _log_file
    config = json.loads(sys.argv[1])
    _log_file = open(config["log"], "a", buffering=1)  # noqa: SIM115 - open for the whole run
    switch = KillSwitch(config.get("kill_op"), config.get("kill_when", "before"), config.get("kill_scope", "all"))
    install(switch, config["pack_size"])
    if "merge_at" in config:
        database.MERGE_AT = config["merge_at"]  # read at each flush: merge more often
    {"train": train, "gc": gc, "push": push}[config["mode"]](config)
    log("done", ops=switch.ops)


if __name__ == "__main__":
    main()
