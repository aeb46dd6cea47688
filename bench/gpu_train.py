"""Tower speed on a device: training pairs/s, peak memory and the fraction of the device's
measured matmul peak per preset and objective set; embedding images/s and captions/s (torch
towers in half precision, and ONNX Runtime's CUDA provider where it is installed).

    python -m bench.gpu_train --device cuda            # the GPU figures of docs/benchmarks.md
    python -m bench.gpu_train --device cpu --presets tiny --batch 8 --image-size 64 \
        --steps 2 --warmup 1 --embed-batch 8           # a CPU smoke run (tests use it)

Random-init towers (no weight packages needed) and synthetic batches: the towers' speed, not
the loader's (`cots train` logs the loader wait per step, `data_wait_frac`, for that). Each
result is printed as a JSON line and the output file is rewritten after each one, so a run
cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from index_builder.atomic import atomic_write_json
from index_builder.preprocess import default_tokenizer_json
from training.acceleration import accelerate
from training.config import load_config
from training.model import build_model
from training.objectives import build_objectives
from training.run import model_config
from training.trainer import build_optimizer

RESULTS = Path(__file__).parent / "results"
OBJECTIVE_SETS = {  # name -> overrides of the `cots` recipe (MLM only: MVM needs a tokenizer)
    "clip": ["objectives.clip.enabled=true", "objectives.instance.enabled=false"],
    "instance": [],
    "inst+kl+amf": ["objectives.kl.enabled=true", "objectives.amf.enabled=true"],
    "inst+mlm": ["objectives.mvlm.enabled=true", "objectives.mvlm.mvm=false"],
    "inst+mlm+kl+amf": [
        "objectives.mvlm.enabled=true",
        "objectives.mvlm.mvm=false",
        "objectives.kl.enabled=true",
        "objectives.amf.enabled=true",
    ],
}
TEXT_LENGTH = 32


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench/gpu_train.py: no CUDA device (torch {torch.__version__}, "
            f"torch.version.cuda={torch.version.cuda}); for the CPU smoke run pass --device cpu"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of one call of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matmul rate as measured here: the reference 'peak'."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / seconds / 1e12


def conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    """Each requested gradient of a convolution costs one forward. torch's own formula drops
    the groups from the weight gradient: 40x too many FLOPs for EfficientNet's depthwise."""
    transposed, output_mask = args[4], args[7]
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops() -> FlopCounterMode:
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
    )


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process, CPU


def synthetic_batch(batch: int, size: int, vocab: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.randn(batch, 3, size, size, generator=gen).to(device),
        "input_ids": torch.randint(1000, vocab, (batch, TEXT_LENGTH), generator=gen).to(device),
        "attention_mask": torch.ones(batch, TEXT_LENGTH, dtype=torch.long, device=device),
    }


def build_run(preset: str, objectives: str, args: argparse.Namespace, device: torch.device):
    """(objectives, optimizer, model config) as `cots train` builds them, random init."""
    overrides = [f"model.preset={preset}", f"contrast.queue_size={args.queue}"]
    cfg = load_config("cots", [*overrides, *OBJECTIVE_SETS[objectives]])
    cfg.model.options = {
        "image_size": args.image_size,
        "image_weights": None,
        "text_weights": None,
        "tokenizer": str(args.tokenizer),
        "context_length": TEXT_LENGTH,
    }
    mcfg = model_config(cfg)
    units = build_objectives(cfg, build_model(mcfg)).train().to(device)
    modules = [units]
    if units.memory is not None:
        units.memory.to(device)
        modules.append(units.memory.encoder)
    accelerate(modules, args.checkpointing, "inductor" if args.compile else None)
    return units, build_optimizer(units, cfg), mcfg


def train_bench(preset: str, objectives: str, args: argparse.Namespace, device: torch.device):
    units, optimizer, mcfg = build_run(preset, objectives, args, device)
    vocab = units.model.text_tower.embeddings.word_embeddings.num_embeddings
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = units(batch)["loss"]
        loss.backward()
        units.after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        units.after_step()

    small = synthetic_batch(min(args.batch, 8), args.image_size, vocab, device)
    step(small)  # the queues and momentum state a real step sees
    with sdpa_kernel(SDPBackend.MATH), count_flops() as counter:
        step(small)  # the same FLOPs as the fused kernels, counted op by op
    flop_per_pair = counter.get_total_flops() / len(small["pixels"])
    batch = synthetic_batch(args.batch, args.image_size, vocab, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda: step(batch), device, args.warmup, args.steps)
    tflops = flop_per_pair * args.batch / seconds / 1e12
    return {
        "preset": preset,
        "objectives": objectives,
        "image_size": mcfg.image_size,
        "batch": args.batch,
        "median_step_s": round(seconds, 4),
        "pairs_per_s": round(args.batch / seconds, 1),
        "peak_memory_gib": round(peak_memory_gib(device), 2),
        "gflop_per_pair": round(flop_per_pair / 1e9, 2),
        "achieved_tflops": round(tflops, 4),
        "fraction_of_peak": round(tflops / args.peak_tflops, 4),
    }


def embed_bench(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Torch towers in fp16 on CUDA (fp32 on CPU): images/s and captions/s."""
    cfg = load_config("cots", [f"model.preset={preset}"])
    cfg.model.options = {"image_weights": None, "text_weights": None}
    cfg.model.options |= {"tokenizer": str(args.tokenizer), "context_length": TEXT_LENGTH}
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model(model_config(cfg)).eval().to(device, dtype)
    size = model.image_spec.size
    vocab = model.text_tower.embeddings.word_embeddings.num_embeddings
    pixels = torch.randn(args.embed_batch, 3, size, size, device=device, dtype=dtype)
    text = synthetic_batch(args.text_batch, 32, vocab, device)
    with torch.inference_mode():
        image_s = timed(lambda: model.encode_image(pixels), device, 2, args.steps)
        text_s = timed(
            lambda: model.encode_text(text["input_ids"], text["attention_mask"]),
            device,
            2,
            args.steps,
        )
    row = {
        "preset": preset,
        "engine": f"torch {str(dtype).removeprefix('torch.')}",
        "image_size": size,
        "images_per_s": round(args.embed_batch / image_s, 1),
        "captions_per_s": round(args.text_batch / text_s, 1),
        "image_batch": args.embed_batch,
        "caption_batch": args.text_batch,
    }
    return {**row, "onnxruntime": ort_bench(model, args, device)}


def ort_bench(model: Any, args: argparse.Namespace, device: torch.device) -> dict:
    """The exported image tower under ONNX Runtime: the CUDA provider on a GPU host."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    wanted = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if wanted not in providers:
        return {"skipped": f"this onnxruntime has no {wanted} (it has {', '.join(providers)})"}
    from training.export import ImageEncoder
    from training.onnx_graph import export_onnx

    size = model.image_spec.size
    pixels = torch.randn(args.embed_batch, 3, size, size).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image_encoder.onnx"
        export_onnx(ImageEncoder(model.float().cpu()), {"pixels": pixels[:2]}, path)
        session = ort.InferenceSession(str(path), providers=[wanted])
        seconds = timed(lambda: session.run(None, {"pixels": pixels}), torch.device("cpu"), 2, 5)
    return {"provider": wanted, "images_per_s": round(args.embed_batch / seconds, 1)}


def run_stage(report: dict, key: str, fn: Callable[..., dict], *fn_args: Any, out: Path) -> None:
    """Record one result (or its error: one failure must not hide the rest), then save."""
    try:
        row = fn(*fn_args)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the run goes on
        row = {"args": [str(a) for a in fn_args[:2]], "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(row), flush=True)
    report[key].append(row)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    atomic_write_json(out, report)


def environment(device: torch.device, args: argparse.Namespace) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": f"{device.type}: {name or platform.machine()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "precision": "bf16 autocast (train), fp16 (embed)" if device.type == "cuda" else "fp32",
        "peak_tflops": round(args.peak_tflops, 2),
        "peak_source": args.peak_source,
        "compile": args.compile,
        "checkpointing": args.checkpointing,
        "threads": torch.get_num_threads(),
        "command": shlex.join(["python", "-m", "bench.gpu_train", *sys.argv[1:]]),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu", "auto"), help="device")
    p.add_argument("--presets", default="lite,base", help="comma-separated presets")
    p.add_argument("--objectives", default=",".join(OBJECTIVE_SETS), help="objective sets")
    p.add_argument("--batch", type=int, default=256, help="pairs per training step")
    p.add_argument("--image-size", type=int, default=224, help="training input resolution")
    p.add_argument("--steps", type=int, default=10, help="timed steps (or embedding passes)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--queue", type=int, default=16384, help="momentum queue size")
    p.add_argument("--embed-batch", type=int, default=1024, help="images per embedding pass")
    p.add_argument("--text-batch", type=int, default=4096, help="captions per embedding pass")
    p.add_argument("--compile", action="store_true", help="torch.compile the towers")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--peak-tflops", type=float, help="the device's peak (default: a matmul measured here)"
    )
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: all-MiniLM's)")
    p.add_argument("--out", type=Path, help="JSON output (default bench/results/gpu_train-DEV)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.tokenizer = args.tokenizer or default_tokenizer_json()
    args.peak_source = "--peak-tflops" if args.peak_tflops else "measured matmul"
    if not args.peak_tflops:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        args.peak_tflops = matmul_peak_tflops(device, dtype)
    out = args.out or RESULTS / f"gpu_train-{device.type}.json"
    report: dict[str, Any] = {**environment(device, args), "train": [], "embed": []}
    presets = args.presets.split(",")
    for preset in presets:
        for objectives in args.objectives.split(","):
            run_stage(report, "train", train_bench, preset, objectives, args, device, out=out)
    for preset in presets:
        run_stage(report, "embed", embed_bench, preset, args, device, out=out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
