"""Loss and recall curves from metrics.jsonl, drawn to PNG with matplotlib (Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def plot_curves(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write loss.png (training losses per step) and recall.png (validation R@K per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    loss_keys = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss/")})
    for key in loss_keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        ax.plot(*zip(*points, strict=True), label=key)
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    if loss_keys:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        points = [(r["step"], r[key]) for r in val if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
    ax.set(xlabel="step", ylabel="recall (%)", title="validation recall")
    if val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "recall.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "recall.png")
    return written
