"""The COTS visual tokenizer: a vector-quantised VAE that turns an image into a grid of
discrete codes, one per image-tower patch (ViT) or last-stage feature-map cell (CNN).

VQ-VAE (van den Oord et al. 2017) with an exponential-moving-average codebook (Razavi et al.
2019), a k-means start, restarts of unused codes (Dhariwal et al. 2020, Jukebox) and optional
cosine lookup (Yu et al. 2022, ViT-VQGAN) against codebook collapse. Trained once on the
gallery images (`cots tokenizer train`), then frozen: MVM predicts its codes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from index_builder.atomic import atomic_open

WEIGHTS = "tokenizer.safetensors"
META_KEY = "cots_tokenizer"
CODEBOOKS = ("ema", "loss")
INITS = ("kmeans", "batch", "random")
KMEANS_ITERS = 10
EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes
# How checkpoints written before these fields existed were trained and look codes up.
LEGACY = {"codebook": "ema", "init": "batch", "restart_after": 0, "cosine": False}
# Training-only fields of older checkpoints: "restart_below" restarted codes whose EMA count
# fell below that fraction of a fair share, which at decay 0.99 takes an unused code ~230 steps.
RETIRED = {"restart_below"}


@dataclass(frozen=True)
class TokenizerConfig:
    """Architecture and codebook training of the VQ-VAE. `stride` must equal the image tower's
    patch size (ViT) or total stride (CNN: 32 for EfficientNet), so that code (i, j) covers
    tower cell (i, j)."""

    stride: int = 32
    codebook_size: int = 512
    code_dim: int = 64
    width: int = 32  # channels after the first downsampling; doubles per stage
    max_width: int = 128
    res_blocks: int = 2
    beta: float = 0.25  # commitment weight
    codebook: str = "ema"  # "ema": moving averages (Razavi et al. 2019); "loss": codebook loss
    decay: float = 0.99  # EMA decay of the codebook
    init: str = "kmeans"  # first batch's encoder outputs: "kmeans", "batch" (random rows), "random"
    restart_after: int = 20  # restart codes unused for this many steps (Jukebox); 0: never
    cosine: bool = False  # L2-normalised codes and encoder outputs (ViT-VQGAN)

    def __post_init__(self) -> None:
        if self.stride < 2:
            raise ValueError(f"tokenizer stride must be at least 2, got {self.stride}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook size must be at least 2, got {self.codebook_size}")
        if self.codebook not in CODEBOOKS:
            raise ValueError(
                f"tokenizer codebook must be one of {CODEBOOKS}, got {self.codebook!r}"
            )
        if self.init not in INITS:
            raise ValueError(f"tokenizer init must be one of {INITS}, got {self.init!r}")
        if self.restart_after < 0:
            raise ValueError(f"restart_after must be >= 0, got {self.restart_after}")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> TokenizerConfig:
        """A saved config; keys it lacks take their LEGACY values, so a checkpoint written
        before they existed loads as it was trained."""
        obj = {k: v for k, v in obj.items() if k not in RETIRED}
        unknown = set(obj) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown tokenizer config keys {sorted(unknown)}")
        return cls(**{**LEGACY, **obj})


def stride_factors(stride: int) -> list[int]:
    """Per-stage downsampling factors: a 2 for every factor of two, then the odd rest
    (ViT-H/14 -> [2, 7]); each stage rounds up like a padded stride-2 conv, so the grid is
    ceil(S / stride), the grid of both a ViT (S divisible by its patch) and EfficientNet."""
    factors = []
    while stride % 2 == 0:
        factors.append(2)
        stride //= 2
    return factors + ([stride] if stride > 1 else [])


def _down(channels_in: int, channels_out: int, factor: int) -> nn.Module:
    if factor == 2:  # output ceil(S / 2), as a padded stride-2 conv in the towers
        return nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1)
    return PatchDown(channels_in, channels_out, factor)


class PatchDown(nn.Module):
    """A factor x factor patchify conv for odd factors; pads bottom/right so the grid rounds up."""

    def __init__(self, channels_in: int, channels_out: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(channels_in, channels_out, factor, stride=factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (-x.shape[2]) % self.factor, (-x.shape[3]) % self.factor
        return self.conv(F.pad(x, (0, pad_w, 0, pad_h)))


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with straight-through gradients. The codebook learns by
    EMA (`ema=True`) or by the codebook loss; optional k-means start, restarts of codes
    unused for `restart_after` steps and cosine (L2-normalised) lookup."""

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        beta: float = 0.25,
        decay: float = 0.99,
        ema: bool = True,
        init: str = "kmeans",
        restart_after: int = 0,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        self.beta, self.decay, self.ema, self.init = beta, decay, ema, init
        self.restart_after, self.cosine = restart_after, cosine
        embed = torch.randn(size, dim) * 0.1
        if ema:
            self.register_buffer("embed", embed)
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("unused", torch.zeros(size, dtype=torch.long), persistent=False)
        self.restarts = 0  # codes restarted since construction, for logging

    def codebook(self) -> torch.Tensor:
        """The code vectors lookups compare against (K, D): unit length under `cosine`."""
        return F.normalize(self.embed, dim=1) if self.cosine else self.embed

    def codes(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (M, D) -> index of the nearest code (M,)."""
        return nearest(flat, self.codebook())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (quantised z (B, D, h, w), codes (B, h, w), VQ loss): the
        commitment term beta * |z - sg[e]|^2, plus |sg[z] - e|^2 without EMA."""
        batch, dim, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (M, D)
        if self.cosine:
            flat = F.normalize(flat, dim=1)
        if self.training:
            self._update(flat.detach())
        codes = self.codes(flat.detach())  # (M,)
        quantised = self.codebook()[codes]  # (M, D)
        loss = self.beta * F.mse_loss(flat, quantised.detach())
        if not self.ema:
            loss = loss + F.mse_loss(quantised, flat.detach())
        quantised = flat + (quantised - flat).detach()  # straight-through estimator
        out = quantised.view(batch, height, width, dim).permute(0, 3, 1, 2)
        return out, codes.view(batch, height, width), loss

    @torch.no_grad()
    def _update(self, flat: torch.Tensor) -> None:
        """One training step: first-batch initialisation, EMA statistics, restarts."""
        size = self.embed.shape[0]
        fair_share = flat.shape[0] / size  # vectors per code per step if usage were uniform
        if not bool(self.initialised):
            if self.init != "random":
                self._set(torch.arange(size), initial_codes(flat, size, self.init), fair_share)
            self.initialised.fill_(True)
        codes = self.codes(flat)  # (M,)
        counts = torch.bincount(codes, minlength=size).to(flat.dtype)  # (K,)
        if self.ema:  # van den Oord et al. 2017 appendix; Sonnet's VectorQuantizerEMA
            sums = torch.zeros_like(self.embed).index_add_(0, codes, flat)  # (K, D)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.cluster_size.sum()  # Laplace smoothing keeps every count positive
            smoothed = (self.cluster_size + EPS) / (total + size * EPS) * total  # (K,)
            self.embed.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_after > 0:
            self.unused.add_(1).masked_fill_(counts > 0, 0)
            dead = (self.unused >= self.restart_after).nonzero().flatten()
            if dead.numel():
                picks = torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)
                self._set(dead, flat[picks], fair_share)
                self.restarts += dead.numel()

    def _set(self, index: torch.Tensor, vectors: torch.Tensor, count: float) -> None:
        """Move codes `index` onto `vectors`, as if each had been used `count` times."""
        self.embed[index] = vectors
        self.cluster_size[index] = count
        self.embed_sum[index] = vectors * count
        self.unused[index] = 0


def nearest(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """flat (M, D), codebook (K, D) -> index of the nearest code by Euclidean distance (M,)."""
    dist = (
        flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)[None]
    )  # (M, K)
    return dist.argmin(1)


def initial_codes(flat: torch.Tensor, size: int, init: str) -> torch.Tensor:
    """`size` starting codes from one batch of encoder outputs flat (M, D): distinct random
    rows ("batch"; with repeats when M < size), then Lloyd iterations ("kmeans")."""
    if flat.shape[0] >= size:
        picks = torch.randperm(flat.shape[0], device=flat.device)[:size]
    else:
        picks = torch.randint(flat.shape[0], (size,), device=flat.device)
    centres = flat[picks]  # (K, D)
    for _ in range(KMEANS_ITERS if init == "kmeans" else 0):
        assign = nearest(flat, centres)  # (M,)
        counts = torch.bincount(assign, minlength=size).to(flat.dtype)[:, None]  # (K, 1)
        sums = torch.zeros_like(centres).index_add_(0, assign, flat)  # (K, D)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres)
    return centres


class VisualTokenizer(nn.Module):
    """Encoder -> vector quantiser -> decoder; `encode` gives one code per stride x stride cell."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        factors = stride_factors(config.stride)
        widths = [min(config.width * 2**i, config.max_width) for i in range(len(factors))]
        down: list[nn.Module] = []
        for i, factor in enumerate(factors):
            down += [_down(3 if i == 0 else widths[i - 1], widths[i], factor), nn.ReLU()]
        top = widths[-1]
        self.encoder = nn.Sequential(
            *down,
            *(ResBlock(top) for _ in range(config.res_blocks)),
            nn.ReLU(),
            nn.Conv2d(top, config.code_dim, 1),
        )
        self.quantizer = VectorQuantizer(
            config.codebook_size,
            config.code_dim,
            beta=config.beta,
            decay=config.decay,
            ema=config.codebook == "ema",
            init=config.init,
            restart_after=config.restart_after,
            cosine=config.cosine,
        )
        up: list[nn.Module] = []
        for i in reversed(range(len(factors))):
            out = widths[i - 1] if i > 0 else 3
            up += [nn.Upsample(scale_factor=factors[i], mode="nearest")]
            up += [nn.Conv2d(widths[i], out, 3, padding=1)] + ([nn.ReLU()] if i > 0 else [])
        self.decoder = nn.Sequential(
            nn.Conv2d(config.code_dim, top, 3, padding=1),
            *(ResBlock(top) for _ in range(config.res_blocks)),
            nn.ReLU(),
            *up,
        )

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The code grid of an input of height x width pixels."""
        for factor in stride_factors(self.config.stride):
            height, width = math.ceil(height / factor), math.ceil(width / factor)
        return height, width

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels (B, 3, H, W) normalised -> reconstruction, codes (B, h, w) and the losses."""
        quantised, codes, vq_loss = self.quantizer(self.encoder(pixels))
        recon = self.decoder(quantised)[..., : pixels.shape[2], : pixels.shape[3]]
        mse = F.mse_loss(recon, pixels)
        return {"recon": recon, "codes": codes, "mse": mse, "loss": mse + vq_loss}

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """pixels (B, 3, H, W) -> codes (B, h * w) in the tower's row-major patch order.

        With `grid` (the tower's patch grid) the codes are forced onto that grid: the image
        is resampled to grid x stride pixels first if its own grid differs.
        """
        if grid is not None and self.grid(*pixels.shape[2:]) != tuple(grid):
            size = (grid[0] * self.config.stride, grid[1] * self.config.stride)
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        _, codes, _ = self.quantizer(self.encoder(pixels))
        return codes.flatten(1)  # (B, h * w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> pixels (B, 3, h * stride, w * stride) in normalised space."""
        return self.decoder(self.quantizer.codebook()[codes].permute(0, 3, 1, 2))


def save_tokenizer(directory: str | Path, tokenizer: VisualTokenizer, meta: dict) -> Path:
    """Write `tokenizer.safetensors` whose metadata holds the config and `meta` (image spec,
    step, metrics): everything `load_tokenizer` needs. Written atomically."""
    from safetensors.torch import save

    record = {"config": asdict(tokenizer.config), **meta}
    state = {k: v.detach().contiguous().cpu() for k, v in tokenizer.state_dict().items()}
    path = Path(directory) / WEIGHTS
    with atomic_open(path, "wb") as handle:
        handle.write(save(state, metadata={META_KEY: json.dumps(record)}))
    return path


def load_tokenizer(directory: str | Path) -> tuple[VisualTokenizer, dict]:
    """A frozen tokenizer (eval mode, no gradients) and its metadata from `save_tokenizer`."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no visual tokenizer checkpoint ({WEIGHTS}) in {directory}")
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(META_KEY)
        if raw is None:
            raise ValueError(f"{path} is not a cots visual tokenizer (no {META_KEY!r} metadata)")
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    meta = json.loads(raw)
    tokenizer = VisualTokenizer(TokenizerConfig.from_dict(meta["config"]))
    tokenizer.load_state_dict(state)
    tokenizer.eval().requires_grad_(False)
    return tokenizer, meta
