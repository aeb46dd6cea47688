"""`cots tokenizer train|eval`: the visual tokenizer MVM predicts (registered lazily: no torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from index_builder import paths
from training.config import add_data_argument


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tokenizer",
        help="train or evaluate the visual tokenizer (VQ-VAE) used by masked vision modelling",
        description="The tokenizer's grid follows the image tower of --preset: one code per ViT "
        "patch or per last-stage EfficientNet cell (stride 32).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train",
        help="train on a gallery's train split, then evaluate",
        description="Train the visual tokenizer on a gallery's train split, then evaluate it on "
        "the validation split. Also spelled `cots train tokenizer`.",
    )
    add_data_argument(train)
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="tokenizer directory to write (default: $COTS_HOME/tokenizers/<preset>)",
    )
    train.add_argument("--preset", default="lite", help="model preset whose image tower it serves")
    train.add_argument(
        "--size", type=int, default=0, help="training image size (default: the preset's)"
    )
    train.add_argument("--codebook-size", type=int, default=512, help="number of codes")
    train.add_argument("--code-dim", type=int, default=64, help="width of each code vector")
    train.add_argument("--width", type=int, default=32, help="channels of the first stage")
    train.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    train.add_argument("--batch-size", type=int, default=16, help="images per step")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--max-images", type=int, default=4000, help="images cached per split")
    train.add_argument("--seed", type=int, default=0, help="random seed")
    train.set_defaults(func=_train)
    evaluate = actions.add_parser("eval", help="reconstruction and codebook usage on a split")
    add_data_argument(evaluate)
    evaluate.add_argument(
        "--tokenizer", type=Path, required=True, help="tokenizer directory to evaluate"
    )
    evaluate.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="split to score"
    )
    evaluate.add_argument("--max-images", type=int, default=4000, help="images to score")
    evaluate.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from training.model import load_preset
    from training.visual_tokenizer.model import TokenizerConfig
    from training.visual_tokenizer.training import TokenizerTraining, run_tokenizer_training

    model = load_preset(args.preset)
    spec = model.image_spec()
    if args.size:
        spec = dataclasses.replace(spec, size=args.size, resize=args.size)
    config = TokenizerConfig(
        stride=model.image_stride,
        codebook_size=args.codebook_size,
        code_dim=args.code_dim,
        width=args.width,
    )
    settings = TokenizerTraining(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=min(100, args.steps // 10),
        max_images=args.max_images,
        seed=args.seed,
    )
    out = args.out or paths.home() / "tokenizers" / args.preset
    data = args.data
    metrics = run_tokenizer_training(data, out, config, spec, settings)
    print(json.dumps(metrics, indent=2))
    print(f"tokenizer: {out} (use objectives.mvlm.tokenizer={out})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from index_builder.preprocess import ImageSpec
    from training.visual_tokenizer.model import load_tokenizer
    from training.visual_tokenizer.training import (
        evaluate_tokenizer,
        load_pixels,
        save_reconstructions,
    )

    tokenizer, meta = load_tokenizer(args.tokenizer)
    spec = ImageSpec.from_dict(meta["image_spec"])
    data = args.data
    images = load_pixels(data, args.split, spec, args.max_images)
    metrics = {**evaluate_tokenizer(tokenizer, images, spec), "split": args.split}
    picture = save_reconstructions(
        tokenizer, images[:8], spec, args.tokenizer / f"recon-{args.split}.png"
    )
    print(json.dumps(metrics, indent=2))
    print(f"reconstructions: {picture}")
    return 0
