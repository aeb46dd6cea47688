"""The visual tokenizer: grid alignment with the towers, VQ, checkpoint, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from index_builder.preprocess import ImageSpec
from training.model import build_model, load_preset
from training.visual_tokenizer.model import (
    EPS,
    TokenizerConfig,
    VectorQuantizer,
    VisualTokenizer,
    initial_codes,
    load_tokenizer,
    save_tokenizer,
    stride_factors,
)
from training.visual_tokenizer.training import (
    TokenizerTraining,
    evaluate_tokenizer,
    save_reconstructions,
    train_tokenizer,
)

SMALL = {"width": 8, "max_width": 16, "code_dim": 8, "codebook_size": 16, "res_blocks": 1}


def _tokens_of_tower(preset: str, size: int) -> tuple[int, tuple[int, int]]:
    config = dataclasses.replace(load_preset(preset), image_size=size)
    model = build_model(config, load_weights=False).eval()
    with torch.no_grad():
        tokens = model.image_features(torch.zeros(1, 3, size, size))["tokens"]
    return tokens.shape[1], model.image_grid


@pytest.mark.parametrize(
    ("preset", "stride", "sizes"), [("tiny", 8, (64, 32)), ("lite", 32, (224, 128))]
)
def test_code_grid_lines_up_with_tower_patches(preset, stride, sizes):
    tokenizer = VisualTokenizer(TokenizerConfig(stride=stride, **SMALL)).eval()
    for size in sizes:
        count, grid = _tokens_of_tower(preset, size)
        assert tokenizer.grid(size, size) == grid
        codes = tokenizer.encode(torch.randn(2, 3, size, size))
        assert codes.shape == (2, count)


def test_code_i_j_depends_only_on_its_own_cell():
    """Row-major order and locality: changing one stride x stride cell changes its code only
    through the receptive field, so the cell's own code is the one that moves most often."""
    torch.manual_seed(0)
    tokenizer = VisualTokenizer(
        TokenizerConfig(
            stride=8, res_blocks=0, **{k: v for k, v in SMALL.items() if k != "res_blocks"}
        )
    ).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = tokenizer.encoder(pixels)
        changed = pixels.clone()
        changed[..., 8:16, 16:24] += 5.0  # cell (row 1, col 2)
        diff = (tokenizer.encoder(changed) - base).abs().sum(1)[0]  # (4, 4)
    assert divmod(int(diff.flatten().argmax()), 4) == (1, 2)


def test_encode_forces_the_tower_grid_when_asked():
    tokenizer = VisualTokenizer(TokenizerConfig(stride=8, **SMALL)).eval()
    assert tokenizer.encode(torch.randn(2, 3, 40, 40), grid=(4, 4)).shape == (2, 16)


def test_stride_factors_cover_odd_patch_sizes():
    assert stride_factors(32) == [2, 2, 2, 2, 2]
    assert stride_factors(14) == [2, 7]
    tokenizer = VisualTokenizer(TokenizerConfig(stride=14, **SMALL))
    out = tokenizer(torch.randn(1, 3, 30, 30))
    assert tokenizer.grid(30, 30) == (3, 3) == tuple(out["codes"].shape[1:])
    assert out["recon"].shape == (1, 3, 30, 30)


def test_quantiser_picks_nearest_code_and_passes_gradients_straight_through():
    tokenizer = VisualTokenizer(TokenizerConfig(stride=4, **SMALL))
    vq = tokenizer.quantizer.eval()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    quantised, codes, _ = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    naive = torch.stack([((vq.embed - row) ** 2).sum(1).argmin() for row in flat])
    assert torch.equal(codes.flatten(), naive)
    assert torch.allclose(quantised.permute(0, 2, 3, 1).reshape(-1, 8), vq.embed[naive], atol=1e-6)
    quantised.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))


def _quantizer(embed: list[list[float]], **kwargs) -> VectorQuantizer:
    """A training-mode quantiser holding `embed`, each code counted once, already initialised."""
    vq = VectorQuantizer(len(embed), len(embed[0]), init="random", **kwargs).train()
    vq.embed.copy_(torch.tensor(embed))
    vq.embed_sum.copy_(vq.embed)
    vq.initialised.fill_(True)
    return vq


def _as_map(rows: list[list[float]]) -> torch.Tensor:
    """Vectors (M, D) as a (1, D, 1, M) map, the quantiser's input layout."""
    return torch.tensor(rows).T[None, :, None, :]


def test_ema_update_matches_a_hand_computation():
    vq = _quantizer([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], decay=0.5)
    _, codes, _ = vq(_as_map([[0.2, 0.0], [0.0, 0.2], [1.2, 1.0]]))
    # counts (2, 1, 0); sums ((0.2, 0.2), (1.2, 1.0), (0, 0)); N <- 0.5 N + 0.5 counts
    size = torch.tensor([1.5, 1.0, 0.5])
    embed_sum = torch.tensor([[0.1, 0.1], [1.1, 1.0], [2.5, 2.5]])
    total = 3.0  # sum of the cluster sizes; Laplace smoothing: (N + eps) / (n + K eps) * n
    smoothed = (size + EPS) / (total + 3 * EPS) * total
    assert torch.allclose(vq.cluster_size, size)
    assert torch.allclose(vq.embed_sum, embed_sum)
    assert torch.allclose(vq.embed, embed_sum / smoothed[:, None])
    assert torch.allclose(vq.embed[0], torch.tensor([0.1, 0.1]) / 1.5, atol=1e-4)
    assert codes.flatten().tolist() == [0, 0, 1]


def test_a_code_unused_for_n_steps_restarts_onto_an_encoder_output():
    torch.manual_seed(0)
    vq = _quantizer([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [100.0, 100.0]], restart_after=2)
    near = [[0.1, 0.0], [1.0, 0.9], [2.1, 2.0]]  # uses codes 0, 1 and 2, never 3
    vq(_as_map(near))
    assert torch.allclose(vq.embed[3], torch.tensor(100.0)) and vq.restarts == 0  # kept
    batch = [[0.0, 0.1], [0.9, 1.0], [2.0, 2.1]]
    vq(_as_map(batch))
    assert vq.restarts == 1
    assert any(torch.equal(vq.embed[3], torch.tensor(row)) for row in batch)
    assert vq.unused.tolist() == [0, 0, 0, 0]
    assert vq.embed[:3].sub(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])).abs().max() < 0.2


def test_kmeans_start_finds_separated_clusters():
    torch.manual_seed(0)
    points = torch.cat([torch.randn(20, 2) * 0.01, torch.randn(20, 2) * 0.01 + 10.0])
    for seed in range(5):  # whichever two rows it starts from
        torch.manual_seed(seed)
        centres = initial_codes(points, 2, "kmeans")
        centres = centres[centres[:, 0].argsort()]
        assert torch.allclose(centres, torch.stack([points[:20].mean(0), points[20:].mean(0)]))
        start = initial_codes(points, 2, "batch")  # two distinct rows, no iterations
        assert (start[:, None] == points[None]).all(2).sum(1).tolist() == [1, 1]
        assert not torch.equal(start[0], start[1])


def test_cosine_lookup_picks_the_most_similar_direction():
    vq = VectorQuantizer(4, 3, cosine=True).eval()
    z = torch.randn(2, 3, 2, 2) * 5
    _, codes, _ = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    naive = torch.stack([F.cosine_similarity(vq.embed, row[None]).argmax() for row in flat])
    assert torch.equal(codes.flatten(), naive)


def test_codebook_loss_trains_the_codes_by_gradient(tmp_path):
    tokenizer = VisualTokenizer(TokenizerConfig(stride=4, codebook="loss", init="random", **SMALL))
    assert any(p is tokenizer.quantizer.embed for p in tokenizer.parameters())
    tokenizer(torch.randn(2, 3, 8, 8))["loss"].backward()
    assert tokenizer.quantizer.embed.grad.abs().sum() > 0
    save_tokenizer(tmp_path, tokenizer.eval(), {})
    loaded, meta = load_tokenizer(tmp_path)
    assert meta["config"]["codebook"] == "loss" and loaded.config == tokenizer.config
    pixels = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded.encode(pixels), tokenizer.encode(pixels))


def _cell_images(count: int) -> torch.Tensor:
    """uint8 (count, 3, 16, 16): every 4 x 4 cell one random colour, so codes have much to say."""
    cells = torch.randint(0, 256, (count, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    return cells.repeat_interleave(4, 2).repeat_interleave(4, 3).to(torch.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fixes_use_far_more_of_the_codebook_than_plain_vq(seed):
    images = _cell_images(32)
    spec = ImageSpec(size=16, resize=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    settings = TokenizerTraining(steps=40, batch_size=8, lr=3e-3, warmup=5, seed=seed)
    small = {**SMALL, "codebook_size": 64}
    plain = {"codebook": "loss", "init": "random", "restart_after": 0}
    usage = {}
    for name, options in [("plain", plain), ("fixed", {}), ("cosine", {"cosine": True})]:
        config = TokenizerConfig(stride=4, **small, **options)
        usage[name] = evaluate_tokenizer(
            train_tokenizer(images, config, spec, settings), images, spec
        )
    # measured over seeds 0-7: plain perplexity 1-10 (2-31% of codes), fixed 16-32 (67-84%)
    for name in ("fixed", "cosine"):
        assert usage[name]["perplexity"] > 1.5 * usage["plain"]["perplexity"]
        assert usage[name]["codes_used"] > usage["plain"]["codes_used"] + 0.3


def test_a_checkpoint_from_before_the_fixes_loads_as_it_was_trained(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    tokenizer = VisualTokenizer(TokenizerConfig(stride=4, init="batch", restart_after=0, **SMALL))
    save_tokenizer(tmp_path, tokenizer.eval(), {"metrics": {}})
    path = tmp_path / "tokenizer.safetensors"
    old = {**json.loads(_metadata(path)), "config": {"stride": 4, **SMALL, "restart_below": 0.1}}
    save_file(load_file(str(path)), str(path), metadata={"cots_tokenizer": json.dumps(old)})
    loaded, _ = load_tokenizer(tmp_path)
    assert loaded.config == tokenizer.config  # ema, batch start, no step restarts, Euclidean
    pixels = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded.encode(pixels), tokenizer.encode(pixels))


def _metadata(path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["cots_tokenizer"]


def test_config_rejects_unknown_codebook_options():
    with pytest.raises(ValueError, match="codebook must be one of"):
        TokenizerConfig(codebook="gumbel")
    with pytest.raises(ValueError, match="tokenizer init must be one of"):
        TokenizerConfig(init="zeros")
    with pytest.raises(ValueError, match="restart_after must be >= 0"):
        TokenizerConfig(restart_after=-1)


def test_training_learns_and_restarts_dead_codes(tmp_path):
    torch.manual_seed(0)
    images = (torch.rand(24, 3, 16, 16) * 255).to(torch.uint8)
    images[:12] = images[:12] // 8  # two kinds of image: dark and bright
    spec = ImageSpec(size=16, resize=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    config = TokenizerConfig(stride=4, decay=0.9, **SMALL)
    settings = TokenizerTraining(steps=60, batch_size=8, lr=3e-3, warmup=5)
    untrained = evaluate_tokenizer(VisualTokenizer(config), images, spec)
    tokenizer = train_tokenizer(images, config, spec, settings)
    metrics = evaluate_tokenizer(tokenizer, images, spec)
    assert metrics["mse"] < untrained["mse"]
    assert metrics["codes_used"] > 0.5 and metrics["perplexity"] > 4
    assert 0 < metrics["psnr"] < 100 and metrics["cell_mean_psnr"] > 0
    save_tokenizer(tmp_path, tokenizer, {"image_spec": spec.to_dict(), "metrics": metrics})
    loaded, meta = load_tokenizer(tmp_path)
    assert meta["config"]["stride"] == 4 and meta["metrics"]["mse"] == metrics["mse"]
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    pixels = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded.encode(pixels), tokenizer.encode(pixels))
    picture = save_reconstructions(loaded, images[:4], spec, tmp_path / "recon.png")
    from PIL import Image

    assert Image.open(picture).size == (4 * 16, 2 * 16)


def test_load_rejects_missing_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no visual tokenizer checkpoint"):
        load_tokenizer(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "tokenizer.safetensors"))
    with pytest.raises(ValueError, match="is not a cots visual tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer config keys"):
        TokenizerConfig.from_dict({"stride": 8, "colour": 1})


def test_tokenizer_commands_train_then_eval(gallery, tmp_path, capsys):
    import argparse
    import json

    from training.visual_tokenizer.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "tok"
    args = parser.parse_args(
        ["tokenizer", "train", "--preset", "tiny", "--data", str(gallery), "--out", str(out)]
        + ["--steps", "3", "--batch-size", "4", "--codebook-size", "16", "--width", "8"]
    )
    assert args.func(args) == 0
    meta = load_tokenizer(out)[1]
    assert meta["config"]["stride"] == 8 and meta["image_spec"]["size"] == 64
    assert {"psnr", "perplexity", "codes_used"} <= set(
        json.loads((out / "metrics.json").read_text())
    )
    assert (out / "reconstructions.png").is_file()
    args = parser.parse_args(["tokenizer", "eval", "--tokenizer", str(out), "--data", str(gallery)])
    assert args.func(args) == 0
    assert '"split": "test"' in capsys.readouterr().out and (out / "recon-test.png").is_file()
