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
        help="train the two towers (COTS or the CLIP baseline) on a gallery",
        description="Train with a run file or a named recipe plus dotted overrides; "
        "multi-GPU / multi-node through `torchrun ... -m index_builder.cli train ...`. "
        "`cots train tokenizer ...` trains the visual tokenizer (`cots tokenizer train`).",
    )
    parser.add_argument(
        "run", help="a YAML/JSON run file, or a recipe name from training/recipes (e.g. cots, clip)"
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
        help="recall@1/5/10 both ways and RSUM of a checkpoint on a split",
        description="Image-to-text counts a hit when any of the image's captions is in the top "
        "K; text-to-image when the caption's image is (Karpathy protocol).",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint directory (e.g. RUN/checkpoints/best)",
    )
    add_data_argument(parser)
    parser.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="split to score"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="encoding batch size")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the metrics as JSON here"
    )
    parser.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from index_builder.atomic import atomic_write_json
    from training.checkpoint import load_model, read_meta
    from training.distributed import pick_device
    from training.evaluate import SplitEvaluator

    read_meta(args.checkpoint)  # a bad checkpoint fails before the dataset is read
    evaluator = SplitEvaluator(args.data, args.split, args.batch_size)
    device = pick_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    metrics = {
        **evaluator.evaluate(model, device),
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "step": meta.get("step"),
    }
    if args.out:
        atomic_write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2))
    return 0
