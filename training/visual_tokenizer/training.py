"""Training and evaluating the visual tokenizer on a gallery: reconstruction quality, codebook
usage and a picture of originals beside reconstructions."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from index_builder.atomic import atomic_write_json
from index_builder.manifest import image_path, load_records
from index_builder.preprocess import ImageSpec, load_image, preprocess_image
from index_builder.progress import progress
from training.visual_tokenizer.model import TokenizerConfig, VisualTokenizer, save_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerTraining:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    max_images: int = 4000  # images cached in memory (uint8) for training
    seed: int = 0


def load_pixels(dataset: str | Path, split: str, spec: ImageSpec, limit: int) -> torch.Tensor:
    """The split's images preprocessed with `spec`, cached as uint8 (N, 3, S, S) before
    normalisation (the resize gives uint8 pixels, so nothing is lost)."""
    records = load_records(dataset, split)[:limit]
    if not records:
        raise ValueError(f"no images in the {split!r} split of {dataset}")
    mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
    out = np.empty((len(records), 3, spec.size, spec.size), dtype=np.uint8)
    for i, record in enumerate(progress(records, desc=f"load {split}", unit="img", leave=False)):
        pixels = preprocess_image(load_image(image_path(dataset, record)), spec) * std + mean
        out[i] = np.clip(np.rint(pixels * 255.0), 0, 255)
    return torch.from_numpy(out)


def normalise(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float (B, 3, S, S), as `preprocess_image` gives."""
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    return (images.float() / 255.0 - mean) / std


def to_unit(pixels: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Normalised pixels back to [0, 1]."""
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    return (pixels * std + mean).clamp(0.0, 1.0)


def lr_at(step: int, settings: TokenizerTraining) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_tokenizer(
    images: torch.Tensor, config: TokenizerConfig, spec: ImageSpec, settings: TokenizerTraining
) -> VisualTokenizer:
    """Train a tokenizer on uint8 images (N, 3, S, S) with random horizontal flips."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    tokenizer = VisualTokenizer(config).train()
    optimiser = torch.optim.AdamW(tokenizer.parameters(), lr=settings.lr, weight_decay=0.0)
    bar = progress(range(settings.steps), desc="tokenizer", unit="step")
    start = time.perf_counter()
    for step in bar:
        index = torch.randint(images.shape[0], (settings.batch_size,), generator=generator)
        batch = normalise(images[index], spec)
        flip = torch.rand(batch.shape[0], generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, settings)
        out = tokenizer(batch)
        optimiser.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimiser.step()
        if step % 10 == 0:
            rate = (step + 1) * settings.batch_size / (time.perf_counter() - start)
            restarts = tokenizer.quantizer.restarts
            bar.set_postfix(mse=f"{out['mse'].item():.4f}", restarts=restarts, img_s=f"{rate:.1f}")
    log.info("tokenizer: %d dead codes restarted in training", tokenizer.quantizer.restarts)
    return tokenizer.eval().requires_grad_(False)


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: VisualTokenizer, images: torch.Tensor, spec: ImageSpec, batch_size: int = 32
) -> dict[str, float]:
    """Reconstruction MSE and PSNR in [0, 1] pixel space, the same for a continuous baseline
    (each stride x stride cell painted its mean colour), and codebook usage: perplexity of
    the code histogram and the fraction of codes used."""
    tokenizer.eval()
    stride = tokenizer.config.stride
    sq_err, base_err, psnr, base_psnr = [], [], [], []
    counts = torch.zeros(tokenizer.config.codebook_size)
    for start in range(0, images.shape[0], batch_size):
        pixels = normalise(images[start : start + batch_size], spec)
        out = tokenizer(pixels)
        truth = to_unit(pixels, spec)
        recon = to_unit(out["recon"], spec)
        cells = F.avg_pool2d(truth, stride, ceil_mode=True)
        baseline = F.interpolate(cells, scale_factor=stride, mode="nearest")
        baseline = baseline[..., : truth.shape[2], : truth.shape[3]]
        for errors, scores, guess in ((sq_err, psnr, recon), (base_err, base_psnr, baseline)):
            per_image = (guess - truth).pow(2).flatten(1).mean(1)  # (B,)
            errors.append(per_image)
            scores.append(10 * torch.log10(1.0 / per_image.clamp_min(1e-10)))
        counts += torch.bincount(out["codes"].flatten(), minlength=counts.numel()).float()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {
        "images": int(images.shape[0]),
        "mse": float(torch.cat(sq_err).mean()),
        "psnr": float(torch.cat(psnr).mean()),
        "cell_mean_mse": float(torch.cat(base_err).mean()),
        "cell_mean_psnr": float(torch.cat(base_psnr).mean()),
        "perplexity": float(entropy.exp()),
        "codes_used": float((counts > 0).float().mean()),
        "codebook_size": int(counts.numel()),
    }


@torch.no_grad()
def save_reconstructions(
    tokenizer: VisualTokenizer, images: torch.Tensor, spec: ImageSpec, path: str | Path
) -> Path:
    """A PNG with originals on the top row and their reconstructions below."""
    pixels = normalise(images, spec)
    recon = to_unit(tokenizer(pixels)["recon"], spec)
    rows = torch.cat([to_unit(pixels, spec), recon], dim=2)  # (B, 3, 2S, S)
    strip = torch.cat(list(rows), dim=2)  # (3, 2S, B*S)
    array = (strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def run_tokenizer_training(
    dataset: str | Path,
    out_dir: str | Path,
    config: TokenizerConfig,
    spec: ImageSpec,
    settings: TokenizerTraining,
) -> dict:
    """Train on the train split, evaluate on val (test when val is empty), write the
    checkpoint, `metrics.json` and `reconstructions.png` into `out_dir`."""
    out_dir = Path(out_dir)
    train_images = load_pixels(dataset, "train", spec, settings.max_images)
    eval_images = _eval_images(dataset, spec, settings.max_images)
    start = time.perf_counter()
    tokenizer = train_tokenizer(train_images, config, spec, settings)
    seconds = time.perf_counter() - start
    metrics = evaluate_tokenizer(tokenizer, eval_images, spec)
    metrics["train_seconds"] = round(seconds, 1)
    meta = {"image_spec": spec.to_dict(), "training": asdict(settings), "metrics": metrics}
    save_tokenizer(out_dir, tokenizer, meta)
    atomic_write_json(out_dir / "metrics.json", metrics)
    save_reconstructions(tokenizer, eval_images[:8], spec, out_dir / "reconstructions.png")
    log.info("tokenizer: %s", metrics)
    return metrics


def _eval_images(dataset: str | Path, spec: ImageSpec, limit: int) -> torch.Tensor:
    for split in ("val", "test"):
        if load_records(dataset, split):
            return load_pixels(dataset, split, spec, limit)
    raise ValueError(f"{dataset} has neither a val nor a test split to evaluate on")
