"""COOKIE: the weight-sharing transformer and the knowledge-sharing losses against naive
references, both readings of the loss pairs, the frozen teachers, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES
from safetensors.torch import save_file

from training.config import COOKIE_PAIRS, load_config
from training.model import ModelConfig, build_model, load_preset
from training.objectives.base import StepContext
from training.objectives.cookie import FEATURES
from training.run import prepare
from training.shared_transformer import SharedTransformer

SHARED = [
    "model.options.shared_layers=2",
    "model.options.shared_width=16",
    "model.options.shared_heads=2",
    "model.options.embed_dim=24",  # not the towers' width (32): the teachers get projections
    "objectives.instance.enabled=false",
    "objectives.cookie.enabled=true",
]
ALTERNATIVE = "objectives.cookie.pairs=[[image,text,1],[image,image_tower,1],[text,text_tower,1]]"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny towers saved as weight files: the 'pretrained' towers the teachers copy."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(123)
    model = build_model(load_preset("tiny"))
    for side in ("image", "text"):
        state = getattr(model, f"{side}_tower").state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, root / f"{side}.safetensors")
    return [
        f"model.options.image_weights={root / 'image.safetensors'}",
        f"model.options.text_weights={root / 'text.safetensors'}",
    ]


def naive_block(block, x: torch.Tensor) -> torch.Tensor:
    """One pre-norm block on one unpadded sequence x (N, C), head by head."""
    attn, width = block.attn, x.shape[1]
    heads, size = attn.heads, width // attn.heads
    h = block.norm1(x)
    q, k, v = attn.qkv(h).split(width, dim=-1)
    outs = []
    for head in range(heads):
        cols = slice(head * size, (head + 1) * size)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(size)  # (N, N)
        outs.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    x = x + attn.proj(torch.cat(outs, dim=-1))
    return x + block.mlp(block.norm2(x))


def naive_shared(shared: SharedTransformer, tokens: torch.Tensor, mask: torch.Tensor | None):
    """Each sample alone, its padding cut off, through every block, then pooled."""
    pooled = []
    for b in range(tokens.shape[0]):
        x = tokens[b] if mask is None else tokens[b][mask[b].bool()]  # (n, C)
        if shared.pooling == "cls":
            x = torch.cat([shared.cls_token[0], x])
        for block in shared.blocks:
            x = naive_block(block, x)
        x = shared.norm(x)
        pooled.append(x[0] if shared.pooling == "cls" else x.mean(0))
    return torch.stack(pooled)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_shared_transformer_matches_naive_per_sample_loop(pooling):
    torch.manual_seed(0)
    shared = SharedTransformer(16, layers=2, heads=4, pooling=pooling).eval()
    tokens = torch.randn(3, 6, 16)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    with torch.no_grad():
        torch.testing.assert_close(shared(tokens, mask), naive_shared(shared, tokens, mask))
        torch.testing.assert_close(shared(tokens), naive_shared(shared, tokens, None))
        # what sits in the padding never matters
        noisy = tokens + 100.0 * (1 - mask)[:, :, None]
        torch.testing.assert_close(shared(noisy, mask), shared(tokens, mask))


def test_one_shared_stack_runs_each_stream_alone():
    torch.manual_seed(0)
    config = ModelConfig.from_dict(
        {**load_preset("tiny").to_dict(), "shared_layers": 2, "shared_width": 16, "shared_heads": 2}
    )
    model = build_model(config).eval()
    names = [n for n, _ in model.named_parameters() if ".blocks.0.attn.qkv.weight" in n]
    assert names == ["image_tower.blocks.0.attn.qkv.weight", "shared.blocks.0.attn.qkv.weight"]
    pixels = torch.randn(3, 3, 64, 64)
    ids = torch.randint(1000, 2000, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids, mask)
        tokens = model.image_features(pixels)["tokens"]
        expected = F.normalize(
            model.image_proj(naive_shared(model.shared, model.image_map(tokens), None)), dim=-1
        )
        torch.testing.assert_close(image, expected)
        words = model.text_features(ids, mask)["tokens"]
        pooled = naive_shared(model.shared, model.text_map(words), mask)
        torch.testing.assert_close(text, F.normalize(model.text_proj(pooled), dim=-1))
        # two streams: no sample's embedding depends on another sample or on the other stream
        torch.testing.assert_close(model.encode_image(pixels[[2, 0]]), image[[2, 0]])
        torch.testing.assert_close(model.encode_text(ids[1:], mask[1:]), text[1:])


def naive_ce(scores: list[float], target: int) -> float:
    top = max(scores)
    return -(scores[target] - top - math.log(sum(math.exp(s - top) for s in scores)))


def naive_infonce(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """Symmetric in-batch InfoNCE of two aligned (B, D) normalised batches, by loops."""
    rows = a.shape[0]
    total = 0.0
    for i in range(rows):
        total += naive_ce([float(a[i] @ b[j]) / tau for j in range(rows)], i)
        total += naive_ce([float(b[i] @ a[j]) / tau for j in range(rows)], i)
    return total / (2 * rows)


def step_context(cfg, gallery, tmp_path):
    trainer = prepare(cfg, gallery, tmp_path / "run")
    batch = next(iter(trainer._loader(0, 0)))
    objectives = trainer.objectives
    return objectives, batch, StepContext(batch, objectives.model, objectives.temperature, None)


@pytest.mark.parametrize("reading", ["default", "alternative"])
def test_each_knowledge_loss_matches_naive_infonce(gallery, tmp_path, pretrained, reading):
    extra = [ALTERNATIVE] if reading == "alternative" else []  # the one config change
    overrides = [*TINY_OVERRIDES, *SHARED, *pretrained, *extra, "objectives.cookie.weight=0.5"]
    cfg = load_config("cots", overrides)
    objectives, batch, ctx = step_context(cfg, gallery, tmp_path)
    unit, model = objectives.units["cookie"], objectives.model
    with torch.no_grad():
        for param in [*model.image_tower.parameters(), *model.text_tower.parameters()]:
            param.add_(0.05 * torch.randn_like(param))  # as if trained: towers leave teachers
        out = objectives(batch)
        pixels, ids, mask = batch["pixels"], batch["input_ids"], batch["attention_mask"]
        features = {
            "image": model.encode_image(pixels),
            "text": model.encode_text(ids, mask),
            "image_tower": model.image_tower(pixels)["pooled"],
            "text_tower": model.text_tower(ids, mask)["pooled"],
        }
        if reading == "default":  # frozen copies of the pretrained towers, not the online ones
            fresh = build_model(model.config)
            features["image_teacher"] = fresh.image_tower.eval()(pixels)["pooled"]
            features["text_teacher"] = fresh.text_tower.eval()(ids, mask)["pooled"]
            assert not torch.allclose(features["image_teacher"], features["image_tower"])
    tau = float(objectives.temperature().detach())
    total = 0.0
    for source, target, weight in cfg.objectives.cookie.pairs:
        name = f"{source}-{target}"
        sides = []
        for role, feature in (("source", source), ("target", target)):
            value = features[feature]
            proj = unit.projections[f"{name}-{role}"] if value.shape[1] != 24 else None
            sides.append(
                F.normalize(value if proj is None else value @ proj.weight.detach().T, dim=-1)
            )
        expected = naive_infonce(*sides, tau)
        assert float(out[f"loss/{name}"]) == pytest.approx(expected, rel=1e-4)
        total += 0.5 * weight * expected
    assert float(out["loss"]) == pytest.approx(total, rel=1e-4)
    expected_pairs = (
        COOKIE_PAIRS
        if reading == "default"
        else (("image", "text", 1.0), ("image", "image_tower", 1.0), ("text", "text_tower", 1.0))
    )
    assert [tuple(p) for p in cfg.objectives.cookie.pairs] == list(expected_pairs)


def test_teachers_stay_frozen_and_out_of_checkpoints(gallery, tmp_path, pretrained):
    cfg = load_config("cots", [*TINY_OVERRIDES, *SHARED, *pretrained, "train.max_steps=2"])
    trainer = prepare(cfg, gallery, tmp_path / "run")
    teacher = trainer.objectives.units["cookie"].teachers["image"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    online = trainer.model.image_tower.blocks[0].attn.qkv.weight.detach().clone()
    trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(online, trainer.model.image_tower.blocks[0].attn.qkv.weight)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    saved = trainer.objectives.extra_state()["modules"]
    assert not [k for k in saved if "teachers" in k]
    resumed = prepare(cfg, gallery, tmp_path / "run", resume=True)  # rebuilt from the weights
    for k, v in resumed.objectives.units["cookie"].teachers["image"].state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_towers_are_their_own_teachers(gallery, tmp_path, pretrained):
    frozen = ["model.options.image_trainable_blocks=0", "model.options.text_trainable_blocks=0"]
    cfg = load_config("cots", [*TINY_OVERRIDES, *SHARED, *pretrained, *frozen])
    objectives, batch, ctx = step_context(cfg, gallery, tmp_path)
    unit = objectives.units["cookie"]
    assert len(unit.teachers) == 0
    teacher = unit.feature(ctx, "image_teacher")
    assert torch.equal(teacher, unit.feature(ctx, "image_tower")) and not teacher.requires_grad


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["objectives.cookie.pairs=[[image,txt,1]]"],
            r"pairs\[0\] \(image, txt\): unknown feature 'txt' \(known: " + ", ".join(FEATURES),
        ),
        (["objectives.cookie.pairs=[[image,image,1]]"], "a feature against itself"),
        (
            ["objectives.cookie.pairs=[[image,text,1],[text,image,2]]"],
            r"pairs\[1\] \(text, image\): this pair is named twice",
        ),
        (["objectives.cookie.pairs=[[image,text,-1]]"], "weight must be >= 0"),
        (["objectives.cookie.pairs=[]"], "objectives.cookie.pairs is empty"),
        (
            [],
            r"pairs\[1\] \(image, image_teacher\): image_teacher is a frozen copy of the "
            r"pretrained image tower, but the model has no pretrained image weights "
            r"\(model.options.image_weights\)",
        ),
        (["model.options.shared_heads=3"], "shared_width 16 is not divisible by shared_heads 3"),
        (["model.options.shared_pooling=max"], "shared_pooling must be one of mean, cls"),
    ],
)
def test_bad_input_fails_before_any_model_is_built(
    gallery, tmp_path, monkeypatch, overrides, message
):
    import training.run

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(training.run, "build_model", no_model)
    cfg = load_config("cots", [*TINY_OVERRIDES, *SHARED, *overrides])
    with pytest.raises(ValueError, match=message):
        prepare(cfg, gallery, tmp_path / "run")


def test_shared_transformer_without_cookie_losses_trains_with_clip(gallery, tmp_path):
    cfg = load_config(
        "cots",
        [
            *TINY_OVERRIDES,
            *SHARED[:4],
            "objectives.instance.enabled=false",
            "objectives.clip.enabled=true",
            "train.max_steps=1",
        ],
    )
    trainer = prepare(cfg, gallery, tmp_path / "run")
    before = trainer.model.shared.blocks[0].attn.qkv.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.model.shared.blocks[0].attn.qkv.weight)
