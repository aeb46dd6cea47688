"""`cots train` and `cots eval`: registered lazily so that --help needs no torch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from index_builder import paths
from training.config import add_data_argument, add_override_argument


def register_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train the two towers (COTS, COOKIE or the CLIP baseline) on a gallery",
        description="Train with a run file or a named recipe plus dotted overrides; "
        "multi-GPU / multi-node through `torchrun ... -m index_builder.cli train ...`. "
        "`cots train tokenizer ...` trains the visual tokenizer (`cots tokenizer train`).",
    )
    parser.add_argument(
        "run",
        help="a YAML/JSON run file, or a recipe name from training/recipes "
        "(e.g. cots, cookie, clip)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. optim.lr=1e-4, anywhere on the line (or --set K=V)",
    )
    add_override_argument(parser, "a config override (repeatable), e.g. --set data.batch_size=32")
    add_data_argument(parser)
    parser.add_argument(
        "--out", type=Path, default=None, help="run directory (default: $COTS_HOME/runs/<recipe>)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from checkpoints/last"
    )
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from training import distributed
    from training.config import load_config
    from training.run import prepare

    cfg = load_config(args.run, [*args.overrides, *args.sets])
    data = args.data
    out = args.out or paths.run_dir(cfg.name)
    trainer = prepare(cfg, data, out, args.resume)
    try:
        trainer.fit()
    finally:
        distributed.destroy()
    if trainer.dist.is_main:
        print(f"run: {out}")
        if trainer.best is None:
            print(
                f"no {cfg.data.val_split!r} split in {data}: the best checkpoint is the last step"
            )
        else:
            print(f"best validation {cfg.train.best_metric}: {trainer.best}")
        print(f"checkpoints: {out / 'checkpoints' / 'best'} {out / 'checkpoints' / 'last'}")
    return 0


def register_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="recall@1/5/10 both ways and RSUM of a checkpoint on a split, and unimodal "
        "retrieval (image-to-image, text-to-text) as mAP and R@K",
        description="Image-to-text counts a hit when any of the image's captions is in the top "
        "K; text-to-image when the caption's image is (Karpathy protocol). Image-to-image: "
        "images of the query's category are relevant (Open Clip Art folders, emoji groups; "
        "absent for galleries without categories). Text-to-text: the other captions of the "
        "query's image are relevant. A video checkpoint scores videos the same way (i2t = "
        "video-to-text, t2i = text-to-video) and adds the median rank each way (i2t_medr, "
        "t2i_medr).",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint directory (e.g. RUN/checkpoints/best)",
    )
    add_data_argument(parser)
    parser.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test", "all"),
        help="split to score (all: every record, for a gallery the model never saw)",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="encoding batch size")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the metrics as JSON here"
    )
    parser.add_argument(
        "--feature-cache",
        type=Path,
        default=None,
        help="where tower outputs of frozen-tower checkpoints are cached "
        "(default: $COTS_HOME/cache/features)",
    )
    parser.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="run the towers on every image and caption even when their outputs are cached",
    )
    parser.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from index_builder.atomic import atomic_write_json
    from training.checkpoint import load_model, read_meta
    from training.distributed import pick_device
    from training.evaluate import score_split, split_pairs
    from training.feature_cache import FeatureStore, default_root

    meta = read_meta(args.checkpoint)  # a bad checkpoint fails before the dataset is read
    video = bool(meta["model"].get("video_frames"))
    if not video:
        split_pairs(args.data, args.split)  # and so does an empty split
    device = pick_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    config = model.config
    frozen = config.image_trainable_blocks == 0 and config.text_trainable_blocks == 0
    store = None
    if frozen and not args.no_feature_cache:  # pretrained towers: outputs shared by many runs
        store = FeatureStore(args.feature_cache or default_root())
    if video:
        from training.video_evaluate import VideoSplitEvaluator

        scores = VideoSplitEvaluator(args.data, args.split, args.batch_size).evaluate(model, device)
    else:
        scores = score_split(model, args.data, args.split, device, args.batch_size, store)
    metrics = {
        **scores,
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "step": meta.get("step"),
    }
    if args.out:
        atomic_write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2))
    return 0
