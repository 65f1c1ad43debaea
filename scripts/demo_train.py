"""A small real training run for scripts/demo, tracked with Keepsake.

A two-layer network on synthetic data, in numpy. The model file holds a frozen 32 MiB
"pretrained" embedding (it never changes, so Keepsake stores it once for all checkpoints
and both experiments) and the trained layers (which change every epoch).

    python train.py --lr 0.1 --epochs 5
"""

from __future__ import annotations

import argparse

import numpy as np

import keepsake

FEATURES, HIDDEN, CLASSES = 64, 256, 4
EMBEDDING = (8192, 1024)  # 32 MiB of float32, frozen


def make_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    w = np.random.default_rng(7).standard_normal((FEATURES, CLASSES)).astype(np.float32)
    return x, (x @ w).argmax(axis=1)


def save(path: str, layers: dict[str, np.ndarray]) -> None:
    # a stable file name and a fixed layout: the same bytes land in the same place each time
    with open(path, "wb") as f:
        for name in sorted(layers):
            f.write(layers[name].astype(np.float32).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    experiment = keepsake.init(path=".", params={"lr": args.lr, "epochs": args.epochs, "hidden": HIDDEN})
    rng = np.random.default_rng(args.seed)
    x, y = make_data(rng, 4096)
    xv, yv = make_data(rng, 1024)
    layers = {
        "embedding": np.random.default_rng(1234).standard_normal(EMBEDDING).astype(np.float32) * 0.02,
        "w1": rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32) * 0.1,
    }
    for epoch in range(args.epochs):
        for start in range(0, len(x), 128):
            xb, yb = x[start : start + 128], y[start : start + 128]
            h = np.maximum(xb @ layers["w1"], 0)
            logits = h @ layers["w2"]
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1
            grad_w2 = h.T @ p / len(yb)
            grad_h = (p @ layers["w2"].T) * (h > 0)
            layers["w2"] -= args.lr * grad_w2
            layers["w1"] -= args.lr * (xb.T @ grad_h / len(yb))
        hv = np.maximum(xv @ layers["w1"], 0) @ layers["w2"]
        pv = np.exp(hv - hv.max(axis=1, keepdims=True))
        pv /= pv.sum(axis=1, keepdims=True)
        val_loss = float(-np.log(pv[np.arange(len(yv)), yv] + 1e-9).mean())
        accuracy = float((hv.argmax(axis=1) == yv).mean())
        save("model.bin", layers)
        experiment.checkpoint(
            path="model.bin",
            step=epoch,
            metrics={"val_loss": val_loss, "accuracy": accuracy},
            primary_metric=("val_loss", "minimize"),
        )
        print(f"epoch {epoch}: val_loss {val_loss:.4f} accuracy {accuracy:.3f}")
    experiment.stop()


if __name__ == "__main__":
    main()
