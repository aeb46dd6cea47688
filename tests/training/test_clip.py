"""CLIP checkpoints as towers: the tokenizer against open_clip's ids, strict loading of OpenAI
and open_clip files (state dict, TorchScript, safetensors) against a reference CLIP, and the
untrained export of the clip-b32 recipe with its ONNX parity."""

from __future__ import annotations

import gzip
import json
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from index_builder.bundle import Bundle
from index_builder.cli import main
from index_builder.encoders import TextEncoder
from index_builder.preprocess import TextTokenizer, load_image, preprocess_images
from index_builder.search import Searcher
from training.model import ModelConfig, build_model, load_preset
from training.towers.clip_tokenizer import (
    MERGES,
    VOCAB_SIZE,
    bytes_to_unicode,
    clip_tokenizer_json,
    write_clip_tokenizer,
)

# Written down from open_clip 3.3.0's `SimpleTokenizer` (open_clip/tokenizer.py with the
# merges file of its wheel), context_length=12: start 49406, end 49407, zero padding, and
# truncation that keeps the end token (the third and sixth texts).
REFERENCE_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A Dog on the BEACH!": [49406, 320, 1929, 525, 518, 2117, 256, 49407],
    "it's 2024, isn't it?  o'clock": [
        49406, 585, 568, 273, 271, 273, 275, 267, 2923, 713, 585, 49407,
    ],
    "naïve café résumé": [49406, 1097, 35689, 563, 15304, 29106, 7054, 4166, 49407],
    "hello    world\n\tnew line": [49406, 3306, 1002, 686, 1148, 49407],
    "emoji 🐶 and <b>html</b>": [
        49406, 16327, 10631, 537, 283, 321, 285, 18231, 34308, 321, 285, 49407,
    ],
    "zebras' 123 steps": [49406, 2254, 22611, 262, 272, 273, 274, 5408, 49407],
    "": [49406, 49407],
}  # fmt: skip
SMALL = {  # clip-b32 at a test size: same architecture, width 32, two layers
    "image_size": 32,
    "vit_patch_size": 8,
    "vit_width": 32,
    "vit_layers": 2,
    "vit_heads": 2,
    "text_width": 32,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate": 128,
    "embed_dim": 16,
}


def test_tokenizer_gives_open_clip_ids() -> None:
    tokenizer = TextTokenizer(clip_tokenizer_json(), context_length=12)
    assert tokenizer.vocab_size == VOCAB_SIZE
    ids, mask = tokenizer(list(REFERENCE_IDS))
    for row, (text, expected) in enumerate(REFERENCE_IDS.items()):
        n = len(expected)
        assert ids[row, :n].tolist() == expected, text
        assert (ids[row, n:] == 0).all() and mask[row].sum() == n, text


def test_shipped_tokenizer_regenerates_from_the_merges_file(tmp_path: Path) -> None:
    shipped = json.loads(clip_tokenizer_json().read_text(encoding="utf-8"))
    merges = shipped["model"]["merges"]
    assert len(merges) == MERGES
    lines = ["#version: 0.2", *merges, "tail lines past the first 48,894 merges are ignored"]
    (tmp_path / "bpe.txt.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    out = write_clip_tokenizer(tmp_path / "tokenizer.json", tmp_path / "bpe.txt.gz")
    assert out.read_bytes() == clip_tokenizer_json().read_bytes()
    assert list(shipped["model"]["vocab"])[:256] == list(bytes_to_unicode().values())


# A reference CLIP as openai/CLIP `clip/model.py` writes it (nn.MultiheadAttention on
# (L, B, W), an additive causal mask, argmax pooling, x @ projection): its state dict has the
# key names of OpenAI's files, which open_clip's CLIP keeps.
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, width * 4),
                gelu=QuickGELU(),
                c_proj=nn.Linear(width * 4, width),
            )
        )
        self.ln_2 = nn.LayerNorm(width)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.causal:
            mask = torch.full((x.shape[0], x.shape[0]), float("-inf")).triu(1)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class RefVisual(nn.Module):
    def __init__(self, size: int, patch: int, width: int, layers: int, heads: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, dim) * width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class RefCLIP(nn.Module):
    def __init__(self, size=32, patch=8, width=32, layers=2, heads=2, dim=16, context=77):
        super().__init__()
        self.visual = RefVisual(size, patch, width, layers, heads, dim)
        self.transformer = RefTransformer(width, layers, heads, causal=True)
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, dim) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        for module in self.modules():  # non-trivial norms, so a swapped one shows
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, 0.2)
                nn.init.normal_(module.bias, 0.0, 0.2)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.visual(image), self.encode_text(text)


def openai_tokens(texts: list[str]) -> torch.Tensor:
    """OpenAI's `clip.tokenize`: every text padded with zeros to 77."""
    ids, _ = TextTokenizer(clip_tokenizer_json(), 77)(texts)
    return torch.from_numpy(np.pad(ids, ((0, 0), (0, 77 - ids.shape[1]))))


TEXTS = ["a photo of a cat", "two dogs playing in the snow", "a red apple", ""]


@pytest.fixture(scope="module")
def reference() -> RefCLIP:
    torch.manual_seed(0)
    return RefCLIP().eval()


def _save(reference: RefCLIP, path: Path, kind: str) -> Path:
    state = reference.state_dict()
    if kind == "openai-state-dict":
        torch.save(state, path)
    elif kind == "openai-torchscript":  # as OpenAI's released .pt files: traced, + 3 scalars
        for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 0)):
            reference.register_buffer(key, torch.tensor(value))
        pixels, tokens = torch.zeros(1, 3, 32, 32), openai_tokens(["x"])
        with warnings.catch_warnings():  # nn.MultiheadAttention's shape checks, traced
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.jit.save(torch.jit.trace(reference, (pixels, tokens)), str(path))
        for key in ("input_resolution", "context_length", "vocab_size"):
            delattr(reference, key)
    elif kind == "open_clip-custom-text":  # CustomTextCLIP: the text side under `text.`
        top = ("visual.", "logit_scale")
        torch.save({k if k.startswith(top) else f"text.{k}": v for k, v in state.items()}, path)
    elif kind == "open_clip-checkpoint":  # an open_clip training checkpoint (DDP prefix)
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _config(weights: Path | None, **options) -> ModelConfig:
    spec = {**load_preset("clip-b32").to_dict(), **SMALL, **options}
    if weights is not None:
        spec |= {"image_weights": str(weights), "text_weights": str(weights)}
    return ModelConfig.from_dict(spec)


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("openai-state-dict", "ViT-B-32.pt"),
        ("openai-torchscript", "ViT-B-32-jit.pt"),
        ("open_clip-checkpoint", "epoch_3.pt"),
        ("open_clip-custom-text", "open_clip_pytorch_model.bin"),
        ("open_clip-safetensors", "open_clip_model.safetensors"),
    ],
)
def test_clip_file_loads_strictly_and_matches_the_reference(
    reference: RefCLIP, tmp_path: Path, kind: str, name: str
) -> None:
    model = build_model(_config(_save(reference, tmp_path / name, kind))).eval()
    pixels = torch.randn(3, 3, 32, 32)
    ids, mask = TextTokenizer(model.tokenizer_json, 77)(TEXTS)  # padded to the longest only
    with torch.no_grad():
        want_image, want_text = reference(pixels, openai_tokens(TEXTS))
        image = model.encode_image(pixels)
        text = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    torch.testing.assert_close(image, nn.functional.normalize(want_image, dim=-1))
    torch.testing.assert_close(text, nn.functional.normalize(want_text, dim=-1))


def test_clip_file_that_does_not_fit_is_refused(reference: RefCLIP, tmp_path: Path) -> None:
    path = _save(reference, tmp_path / "clip.pt", "openai-state-dict")
    with pytest.raises(ValueError, match=r"set embed_dim=16"):
        build_model(_config(path, embed_dim=24))
    with pytest.raises(
        ValueError,
        match=r"ClipTextTower: shape \(6\): transformer.resblocks.0.mlp.c_fc.bias \(128,\) vs",
    ):
        build_model(_config(path, text_intermediate=64))
    state = reference.state_dict()
    del state["visual.ln_post.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"missing \(1\): ln_post.bias"):
        build_model(_config(tmp_path / "partial.pt"))
    with pytest.raises(ValueError, match="text_pooling eot goes with text_tower clip"):
        _config(None, text_pooling="mean")


def test_users_clip_exports_untrained_indexes_and_searches(
    reference: RefCLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The README's three commands on a CLIP file: `cots export --recipe clip-b32` (no
    training), `cots index build --images`, then search, against the reference CLIP."""
    monkeypatch.setenv("COTS_HOME", str(tmp_path / "home"))
    path = _save(reference, tmp_path / "ViT-B-32.pt", "openai-state-dict")
    sets = [f"model.options.{k}={v}" for k, v in SMALL.items()]
    sets += [f"model.options.image_weights={path}", f"model.options.text_weights={path}"]
    export = ["export", "--recipe", "clip-b32", "--out", str(tmp_path / "bundle")]
    assert main([*export, *[a for item in sets for a in ("--set", item)]]) == 0
    assert "ONNX vs torch max abs error" in capsys.readouterr().out
    bundle = Bundle.load(tmp_path / "bundle")
    assert max(bundle.info["parity"]["max_abs_error"].values()) <= 1e-4
    assert bundle.info["source"]["recipe"] == "clip-b32" and bundle.text_spec.context_length == 77
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (30 + 5 * i, 40, 3), np.uint8)).save(
            photos / f"{i}.png"
        )
    build = ["index", "build", str(tmp_path / "idx"), "--bundle", str(bundle.path), "--cpu"]
    assert main([*build, "--threads", "1", "--images", str(photos)]) == 0

    # The torch-free side: the bundle's tokenizer.json and text graph give the reference's
    # embeddings at any batch and sequence length; search scores are the reference's.
    encoder = TextEncoder(bundle, threads=1)
    images = [load_image(photos / f"{i}.png") for i in range(6)]
    with torch.no_grad():
        pixels = torch.from_numpy(preprocess_images(images, bundle.image_spec))
        want_image, want_text = reference(pixels, openai_tokens(TEXTS))
    want_image = nn.functional.normalize(want_image, dim=-1).numpy()
    want_text = nn.functional.normalize(want_text, dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode(TEXTS), want_text, atol=1e-5)
    np.testing.assert_allclose(encoder.encode(TEXTS[:1]), want_text[:1], atol=1e-5)
    hits = Searcher.open(tmp_path / "idx").text_to_image(TEXTS[1], k=6)
    assert sorted(hit["id"] for hit in hits) == [str(i) for i in range(6)]
    for hit in hits:
        assert hit["score"] == pytest.approx(want_image[int(hit["id"])] @ want_text[1], abs=1e-5)


def test_train_starts_from_the_users_clip(reference: RefCLIP, gallery: Path, tmp_path: Path):
    """`cots train --recipe clip-b32` fine-tunes the file's towers (here: the last block of
    each, and the projections that came from the file)."""
    path = _save(reference, tmp_path / "ViT-B-32.pt", "openai-state-dict")
    options = {**SMALL, "image_weights": path, "text_weights": path}
    options |= {"image_trainable_blocks": 1, "text_trainable_blocks": 1}
    sets = [f"model.options.{k}={v}" for k, v in options.items()]
    sets += ["train.max_steps=2", "data.batch_size=8", "data.workers=0", "train.log_every=1"]
    out = tmp_path / "run"
    args = ["train", "clip-b32", "--data", str(gallery), "--out", str(out)]
    assert main([*args, *[f"--set={item}" for item in sets]]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/clip"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_video_model_takes_the_files_projections(reference: RefCLIP, tmp_path: Path) -> None:
    path = _save(reference, tmp_path / "clip.pt", "openai-state-dict")
    model = build_model(_config(path, video_frames=2))
    state = reference.state_dict()
    torch.testing.assert_close(model.image_proj.weight, state["visual.proj"].T)
    torch.testing.assert_close(model.text_proj.weight, state["text_projection"].T)
    assert model.image_tower.projection is None and model.text_tower.projection is None
