"""A stand-in training step for scripts/demo: writes a float32 model of 64 tensors.

``--step 1`` writes the initial weights; later steps change a fraction of the tensors
(``--change``), as fine-tuning a few layers would. Deterministic for a given seed and step.
"""

from __future__ import annotations

import argparse

import numpy as np

TENSORS = 64
TENSOR_FLOATS = 256 * 1024  # 1 MiB each: 64 MiB in all


def weights(seed: int, step: int, change: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    layers = [rng.standard_normal(TENSOR_FLOATS, dtype=np.float32) * 0.02 for _ in range(TENSORS)]
    for s in range(2, step + 1):
        step_rng = np.random.default_rng([seed, s])
        changed = step_rng.choice(TENSORS, size=max(1, int(TENSORS * change)), replace=False)
        for i in changed:
            layers[i] = layers[i] + step_rng.standard_normal(TENSOR_FLOATS, dtype=np.float32) * 0.001
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--change", type=float, default=0.10)
    args = parser.parse_args()
    with open(args.out, "wb") as f:
        for layer in weights(args.seed, args.step, args.change):
            f.write(layer.tobytes())


if __name__ == "__main__":
    main()
