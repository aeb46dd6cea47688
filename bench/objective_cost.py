"""Training cost of each COTS objective: pairs per second with and without it.

    python -m bench.objective_cost --preset tiny                 # seconds
    python -m bench.objective_cost --base training/recipes/ablation/cpu.yaml --preset "" \
        --queue 1024                                             # the CPU ablation ladder's steps

Each configuration is the real training step (Objectives forward, backward, AdamW step,
queue write and momentum update) on a fixed synthetic batch, with the queue pre-filled so
the queued logits and the KL term have their steady-state size. The visual tokenizer of the
MVM rows is untrained (a trained one costs the same). Reports pairs/s, the slowdown
against `instance` and peak RSS; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from index_builder.preprocess import TextTokenizer  # noqa: E402
from training.config import load_config  # noqa: E402
from training.model import build_model  # noqa: E402
from training.objectives import build_objectives  # noqa: E402
from training.pipelines.ablate import switches  # noqa: E402
from training.run import model_config  # noqa: E402
from training.trainer import build_optimizer  # noqa: E402
from training.visual_tokenizer.model import TokenizerConfig, VisualTokenizer, save_tokenizer  # noqa: E402

CONFIGS = {
    "clip": switches("clip"),
    "instance": switches("instance"),
    "+mlm": [*switches("instance", "mvlm"), "objectives.mvlm.mvm=false"],
    "+mvm": [*switches("instance", "mvlm"), "objectives.mvlm.mlm=false"],
    "+mvlm": switches("instance", "mvlm"),
    "+kl": switches("instance", "kl"),
    "+amf": switches("instance", "amf"),
    "cots": switches("instance", "mvlm", "kl", "amf"),
}
WORDS = [
    "red",
    "green",
    "blue",
    "big",
    "small",
    "square",
    "circle",
    "star",
    "arrow",
    "cat",
    "house",
    "tree",
    "flag",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", default="cots", help="recipe or run file every configuration starts from"
    )
    parser.add_argument(
        "--preset", default="tiny", help="model preset (tiny, lite, base; '': the base's)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--image-size", type=int, default=0, help="input size (0: the preset's)")
    parser.add_argument("--queue", type=int, default=4096, help="queue size K")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument(
        "--rounds", type=int, default=3, help="sweeps over the configurations (interleaved)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--only", default="", help="comma-separated subset of configurations")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    return parser.parse_args()


def synthetic_batch(model, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = model.image_spec.size
    words = torch.randint(len(WORDS), (batch_size, 6), generator=gen).tolist()
    captions = [" ".join(WORDS[w] for w in row) for row in words]
    ids, mask = TextTokenizer(model.tokenizer_json, model.text_spec.context_length)(captions)
    return {
        "pixels": torch.randn(batch_size, 3, size, size, generator=gen),
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "index": torch.arange(batch_size),
    }


def measure(overrides: list[str], args: argparse.Namespace, tokenizer_dir: Path) -> tuple:
    """Step times (s) of one configuration, the loss names and the trainable parameters."""
    cfg = load_config(args.base, [*overrides, *common_overrides(args, tokenizer_dir)])
    torch.manual_seed(0)
    model = build_model(model_config(cfg), load_weights=False)
    objectives = build_objectives(cfg, model).train()
    optimizer = build_optimizer(objectives, cfg)
    if objectives.memory is not None:  # steady state: a full queue
        keys = F.normalize(torch.randn(args.queue, model.config.embed_dim), dim=-1)
        objectives.memory.queue.enqueue(keys, keys.roll(1, 0))
    batch = synthetic_batch(model, args.batch_size)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses = objectives(batch)
        losses["loss"].backward()
        objectives.after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objectives.after_step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    names = sorted(k for k in losses if k.startswith("loss/"))
    return times, names, sum(p.numel() for p in objectives.parameters() if p.requires_grad)


def common_overrides(args: argparse.Namespace, tokenizer_dir: Path) -> list[str]:
    model = [f"model.preset={args.preset}"] if args.preset else []
    if args.image_size:
        model.append(f"model.options.image_size={args.image_size}")
    return [
        *model,
        f"contrast.queue_size={args.queue}",
        f"objectives.mvlm.tokenizer={tokenizer_dir}",
        "objectives.amf.warmup=0",
        "objectives.amf.min_history=2",
    ]


def cfg_preset(args: argparse.Namespace) -> str:
    return args.preset or load_config(args.base).model.preset


def write_tokenizer(args: argparse.Namespace, directory: Path) -> Path:
    cfg = load_config(args.base, common_overrides(args, directory))
    model = model_config(cfg)
    tokenizer = VisualTokenizer(TokenizerConfig(stride=model.image_stride))
    save_tokenizer(directory, tokenizer, {"image_spec": model.image_spec().to_dict()})
    return directory


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    times: dict[str, list[float]] = {name: [] for name in names}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = write_tokenizer(args, Path(tmp))
        # Interleaved rounds: on a shared machine, load changes slowly; every configuration
        # sees each phase of it, and the median drops the outliers.
        for _ in range(args.rounds):
            for name in names:
                steps, losses, params = measure(CONFIGS[name], args, tokenizer_dir)
                times[name] += steps
                rows[name] = {"losses": losses, "trainable_params": params}
    for name in names:
        seconds = statistics.median(times[name])
        rows[name]["step_ms"] = round(1000 * seconds, 1)
        rows[name]["pairs_per_s"] = round(args.batch_size / seconds, 2)
    base = rows.get("instance", {}).get("pairs_per_s")
    for name, row in rows.items():
        row["cost_vs_instance"] = round(base / row["pairs_per_s"], 2) if base else None
        print(
            f"{name:>9}: {row['pairs_per_s']:8.2f} pairs/s  {row['step_ms']:8.1f} ms/step  "
            f"x{row['cost_vs_instance']} the time of instance"
        )
    results = {
        "base": args.base,
        "preset": cfg_preset(args),
        "batch_size": args.batch_size,
        "image_size": args.image_size or "preset",
        "queue": args.queue,
        "threads": args.threads,
        "steps": args.steps * args.rounds,
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "configs": rows,
        "command": shlex.join(["python", "-m", "bench.objective_cost", *sys.argv[1:]]),
    }
    label = args.preset or "-".join(Path(args.base).with_suffix("").parts[-2:])  # ablation-cpu
    out = args.out or ROOT / f"bench/results/objective_cost-{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
