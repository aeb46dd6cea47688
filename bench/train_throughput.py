"""Training throughput (pairs/s) and peak memory of a preset on this machine, clip vs cots,
with frozen and with partly unfrozen towers. Each setting runs in its own process so that
its peak RSS (resource.getrusage) is its own.

    python -m bench.train_throughput [--preset lite] [--steps 6] [--batch 32] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from training.config import load_config
from training.objectives import build_objectives
from training.run import model_config
from training.trainer import build_optimizer

SETTINGS = {  # name -> model options
    "frozen": {"image_trainable_blocks": 0, "text_trainable_blocks": 0},
    "last_blocks": {"image_trainable_blocks": 2, "text_trainable_blocks": 2},
}
RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


def measure(recipe: str, setting: str, preset: str, steps: int, batch: int, size: int) -> dict:
    options = {**SETTINGS[setting], "image_size": size}
    overrides = [f"model.preset={preset}", "contrast.queue_size=4096"]
    cfg = load_config(recipe, overrides)
    cfg.model.options = options
    from training.model import build_model

    model = build_model(model_config(cfg))
    objectives = build_objectives(cfg, model).train()
    optimizer = build_optimizer(objectives, cfg)
    trainable = sum(p.numel() for p in objectives.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    batch_data = {
        "pixels": torch.randn(batch, 3, size, size, generator=gen),
        "input_ids": torch.randint(1000, 20000, (batch, 16), generator=gen),
        "attention_mask": torch.ones(batch, 16, dtype=torch.long),
    }
    times = []
    for step in range(steps + 1):  # the first step warms up and is not timed
        start = time.perf_counter()
        loss = objectives(batch_data)["loss"]
        loss.backward()
        objectives.after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objectives.after_step()
        if step:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {
        "recipe": recipe,
        "setting": setting,
        "preset": preset,
        "image_size": size,
        "batch": batch,
        "trainable_params": trainable,
        "median_step_s": round(seconds, 3),
        "pairs_per_s": round(batch / seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lite", help="architecture preset")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step")
    parser.add_argument("--image-size", type=int, default=224, help="input resolution")
    parser.add_argument("--one", nargs=2, metavar=("RECIPE", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = measure(*args.one, args.preset, args.steps, args.batch, args.image_size)
        print(json.dumps(result))
        return
    rows = []
    for recipe in ("clip", "cots"):
        for setting in SETTINGS:
            cmd = [sys.executable, "-m", "bench.train_throughput", "--one", recipe, setting]
            cmd += ["--preset", args.preset]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch)]
            cmd += ["--image-size", str(args.image_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "device": "cpu",
        "note": "one optimiser step = online (+ momentum for cots) forward, backward, AdamW, "
        "queue/EMA update; synthetic batch, no data loading; shared machine, so indicative",
        "results": rows,
        "command": shlex.join(["python", "-m", "bench.train_throughput", *sys.argv[1:]]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
