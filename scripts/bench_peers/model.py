"""The model every tool checkpoints: float32 arrays in a numpy .npz, and a small code folder.

The arrays have seeded lognormal sizes (like a state dict: a few big matrices, many small
ones) and ``standard_normal * 0.02`` values (almost incompressible, as trained weights are).
Version 0 is the initial model; each later version gives new values to:

* scenario F ("fine-tuning"): randomly chosen arrays adding up to ~``fraction`` of the bytes
  (a different set each time);
* scenario T ("training"): every array.

Each version is written once with ``np.savez`` (uncompressed zip of .npy members, names
and shapes unchanged, so the file length is the same every time) into a versions folder; the
drivers copy it into their workspace before each checkpoint, so every tool sees the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The recorded code: a few small files, as a training project has them.
CODE_FILES = {
    "train.py": '"""Training loop (stand-in)."""\nimport model, data\n\n\ndef main():\n'
                '    for batch in data.batches(100):\n        model.step(batch)\n\n\nif __name__ == "__main__":\n'
                '    main()\n',
    "model.py": '"""Model definition (stand-in)."""\n\nLAYERS = [768, 3072, 768]\n\n\ndef step(batch):\n'
                '    return sum(LAYERS) * batch\n',
    "data.py": '"""Data loading (stand-in)."""\n\n\ndef batches(n):\n    for i in range(n):\n        yield i\n',
    "config.py": '"""Hyperparameters (stand-in)."""\n\nLR = 0.001\nBATCH_SIZE = 64\nEPOCHS = 5\n',
    "README.md": "# bench project\n\nA stand-in training project for scripts/bench-peers.\n",
}


def write_code(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, text in CODE_FILES.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)


def code_bytes() -> int:
    return sum(len(t.encode()) for t in CODE_FILES.values())


def array_sizes(total_bytes: int, n_arrays: int, seed: int) -> list[int]:
    """Element counts: seeded lognormal sizes adding up to ``total_bytes / 4``."""
    total = total_bytes // 4
    n_arrays = max(1, min(n_arrays, total))
    rng = np.random.default_rng([seed, 0])
    weights = rng.lognormal(mean=0.0, sigma=1.0, size=n_arrays)
    unit = 128 if total >= 256 * n_arrays else 1
    counts = np.maximum(np.floor(weights / weights.sum() * (total // unit)).astype(np.int64) * unit, unit)
    counts[-1] = 0
    counts[-1] = total - int(counts.sum())
    if counts[-1] <= 0:
        raise SystemExit("bench-peers: model too small for that many arrays")
    return [int(c) for c in counts]


def new_values(count: int, seed: int, index: int, version: int) -> np.ndarray:
    values = np.random.default_rng([seed, 1 + index, version]).standard_normal(count, dtype=np.float32)
    values *= np.float32(0.02)
    return values


def choose_changed(sizes: list[int], fraction: float, seed: int, version: int) -> list[int]:
    """Random arrays adding up to about ``fraction`` of the bytes (a different set each version)."""
    total = sum(sizes)
    target = fraction * total
    rng = np.random.default_rng([seed, 2, version])
    chosen: list[int] = []
    size = 0
    for i in rng.permutation(len(sizes)):
        if size + sizes[int(i)] <= target * 1.02:
            chosen.append(int(i))
            size += sizes[int(i)]
        if size >= target * 0.98:
            break
    return sorted(chosen) or [min(range(len(sizes)), key=lambda k: sizes[k])]


@dataclass
class Versions:
    """The model versions of one scenario, as written to ``directory``."""

    directory: str
    sha256: list[str] = field(default_factory=list)
    file_bytes: int = 0
    changed_bytes: list[int] = field(default_factory=list)  # per version; version 0: all of it
    changed_arrays: list[int] = field(default_factory=list)
    arrays: int = 0


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_versions(directory: str, scenario: str, model_bytes: int, n_arrays: int, n_versions: int,
                   fraction: float, seed: int) -> Versions:
    """Write ``model-<i>.npz`` for i < n_versions into ``directory``; scenario "F" or "T"."""
    os.makedirs(directory, exist_ok=True)
    sizes = array_sizes(model_bytes, n_arrays, seed)
    arrays = [new_values(c, seed, i, 0) for i, c in enumerate(sizes)]
    names = [f"layers.{i // 4}.w{i % 4}" for i in range(len(arrays))]
    out = Versions(directory, arrays=len(arrays))
    for v in range(n_versions):
        if v == 0:
            changed = list(range(len(arrays)))
        elif scenario == "T":
            changed = list(range(len(arrays)))
            arrays = [new_values(c, seed, i, v) for i, c in enumerate(sizes)]
        else:
            changed = choose_changed(sizes, fraction, seed, v)
            for i in changed:
                arrays[i] = new_values(sizes[i], seed, i, v)
        path = os.path.join(directory, f"model-{v}.npz")
        savez: Any = np.savez  # its stubs type **arrays as its own keyword arguments
        savez(path, **dict(zip(names, arrays)))
        out.sha256.append(sha256_file(path))
        out.file_bytes = os.path.getsize(path)
        out.changed_bytes.append(sum(arrays[i].nbytes for i in changed))
        out.changed_arrays.append(len(changed))
    return out
