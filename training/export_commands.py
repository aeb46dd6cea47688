"""`cots export`: registered without importing torch (the work is in training.export)."""

from __future__ import annotations

import argparse

from index_builder.bundle import PRECISIONS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="export a checkpoint to an ONNX bundle",
        description="Export the two towers of a checkpoint to an ONNX bundle, checked against "
        "torch (refused above a tolerance).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory")
    source.add_argument(
        "--recipe",
        help="a recipe's model before any training (its pretrained towers; with the semantic "
        "branch, ConSE): its step-0 checkpoint is written to $COTS_HOME/runs/RECIPE-step0 "
        "(-HASH with --set)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --recipe: override a recipe value (e.g. model.options.embed_dim=384)",
    )
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="fp32, fp16 (GPU), int8 (CPU)"
    )
    parser.add_argument(
        "--tolerance", type=float, help="max |ONNX - torch| (default per precision)"
    )
    parser.add_argument("--data", help="dataset to measure the fp16/int8 retrieval effect on")
    parser.add_argument("--split", default="test", help="split of --data to use (default test)")
    parser.add_argument("--samples", type=int, default=500, help="images of --data to use")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from training.export import export_bundle, step_zero_checkpoint

    checkpoint = args.checkpoint
    if args.recipe:
        checkpoint = step_zero_checkpoint(args.recipe, args.sets)
        print(f"step-0 checkpoint of {args.recipe}: {checkpoint}")
    elif args.sets:
        raise ValueError("--set applies to --recipe only")
    bundle = export_bundle(
        checkpoint,
        args.out,
        args.precision,
        args.tolerance,
        args.data,
        args.split,
        args.samples,
    )
    parity_error = bundle.info["parity"]["max_abs_error"]
    print(f"bundle {bundle.bundle_id} ({bundle.precision}, d={bundle.embed_dim}) -> {bundle.path}")
    print(f"  ONNX vs torch max abs error: {parity_error}")
    if "retrieval_effect" in bundle.info:
        print(f"  retrieval effect vs fp32: {bundle.info['retrieval_effect']}")
    return 0
