"""`cots data ...`: build a gallery directory from a source."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from index_builder.manifest import SPLITS
from index_builder.paths import dataset_dir

if TYPE_CHECKING:  # the importers load with their subcommand (`cots --help` stays fast)
    from index_builder.data.common import ImportResult

EPILOG = """\
Every source writes a dataset directory (default ./cots-data/datasets/<name>, under
$COTS_HOME when set): manifest.jsonl (one image per line: id, image, captions, split),
dataset.json (counts, fingerprint) and images/ for sources that render or extract images.
A rerun with the same inputs and options reports "up to date" and does no work; an
interrupted run keeps the images it finished. See docs/data.md."""


def _out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else dataset_dir(args.name or args.source)


def _report(result: ImportResult) -> int:
    info = result.info
    counts = info.get("splits", {})
    splits = " / ".join(f"{k} {counts.get(k, 0):,}" for k in SPLITS)
    state = "up to date" if result.up_to_date else "built"
    items = "videos" if info.get("media") == "video" else "images"
    counted = {"skipped": result.skipped, "merged": result.merged}
    note = "".join(f", {sum(c.values()):,} {what}" for what, c in counted.items() if c)
    print(
        f"{info.get('source')}: {state}: {info.get('count', 0):,} {items} ({splits}), "
        f"{info.get('captions', 0):,} captions{note} -> {result.out}"
    )
    return 0


def _openclipart(args: argparse.Namespace) -> int:
    from index_builder.data.openclipart import OpenClipArtConfig, import_openclipart

    cfg = OpenClipArtConfig(args.root, args.size, args.workers, args.timeout, args.limit)
    return _report(import_openclipart(cfg, _out(args)))


def _emoji(args: argparse.Namespace) -> int:
    from index_builder.data.emojis import EmojiConfig, import_emoji

    return _report(
        import_emoji(EmojiConfig(args.font, args.size, args.workers, args.limit), _out(args))
    )


def _synthetic(args: argparse.Namespace) -> int:
    from index_builder.data.synthetic import SyntheticConfig, import_synthetic

    cfg = SyntheticConfig(args.count, args.seed, args.size, args.workers)
    return _report(import_synthetic(cfg, _out(args)))


def _coco(args: argparse.Namespace) -> int:
    from index_builder.data.coco import CocoConfig, import_coco

    return _report(import_coco(CocoConfig(args.annotations, args.images, args.split), _out(args)))


def _karpathy(args: argparse.Namespace) -> int:
    from index_builder.data.coco import KarpathyConfig, import_karpathy

    return _report(import_karpathy(KarpathyConfig(args.annotations, args.images), _out(args)))


def _csv(args: argparse.Namespace) -> int:
    from index_builder.data.tabular import TableConfig, import_table

    cfg = TableConfig(
        args.table,
        args.image_column,
        args.caption_column,
        args.split_column,
        args.format,
        args.images,
    )
    return _report(import_table(cfg, _out(args)))


def _folder(args: argparse.Namespace) -> int:
    from index_builder.data.folder import FolderConfig, import_folder

    return _report(import_folder(FolderConfig(args.folder), _out(args)))


def _synthetic_video(args: argparse.Namespace) -> int:
    from index_builder.data.synthetic_video import SyntheticVideoConfig, import_synthetic_video

    cfg = SyntheticVideoConfig(
        args.count, args.seed, args.size, args.frames, args.fps, args.workers
    )
    return _report(import_synthetic_video(cfg, _out(args)))


def _video_folder(args: argparse.Namespace) -> int:
    from index_builder.data.video_folder import VideoFolderConfig, import_video_folder

    return _report(import_video_folder(VideoFolderConfig(args.folder), _out(args)))


def _msrvtt(args: argparse.Namespace) -> int:
    from index_builder.data.msrvtt import MsrvttConfig, import_msrvtt

    cfg = MsrvttConfig(args.annotations, args.videos, args.test_list)
    return _report(import_msrvtt(cfg, _out(args)))


def _webdataset(args: argparse.Namespace) -> int:
    from index_builder.data.wds import ReadConfig, import_webdataset

    return _report(import_webdataset(ReadConfig(args.shards), _out(args)))


def _merge(args: argparse.Namespace) -> int:
    from index_builder.data.merge import MergeConfig, import_merge
    from index_builder.paths import named_path

    galleries = tuple(named_path(word) for word in args.galleries)
    return _report(import_merge(MergeConfig(galleries), _out(args)))


def _to_webdataset(args: argparse.Namespace) -> int:
    from index_builder.data.wds import WriteConfig, write_webdataset

    info = write_webdataset(WriteConfig(args.dataset, args.shard_size, args.split), args.out)
    state = "up to date" if info.get("up_to_date") else "written"
    print(
        f"webdataset: {state}: {info['count']:,} samples in {len(info['shards'])} shards "
        f"-> {Path(args.out) / info['pattern']}"
    )
    return 0


def _source(
    sources: argparse._SubParsersAction, name: str, help: str, func: Callable, example: str
) -> argparse.ArgumentParser:
    parser = sources.add_parser(
        name,
        help=help,
        description=f"{help}.\n\nexample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    if name != "to-webdataset":
        parser.add_argument("--out", help="dataset directory (default: cots-data/datasets/NAME)")
        parser.add_argument(
            "--name", help=f"dataset name for the default location (default: {name})"
        )
    return parser


def _render_flags(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    parser.add_argument("--size", type=int, default=256, help="square PNG side in pixels (256)")
    if workers:
        parser.add_argument("--workers", type=int, default=2, help="rendering processes (2)")


def _rendered_sources(sources: argparse._SubParsersAction) -> None:
    """Galleries drawn here: clip art, emoji glyphs, synthetic scenes."""
    p = _source(
        sources,
        "openclipart",
        "Open Clip Art SVGs (Debian openclipart-svg), the default gallery",
        _openclipart,
        "cots data openclipart --workers 2",
    )
    p.add_argument("--root", default="/usr/share/openclipart/svg", help="the package's SVG folder")
    _render_flags(p)
    p.add_argument(
        "--timeout", type=int, default=20, help="seconds per SVG before skipping it (20)"
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N files in path order")

    p = _source(
        sources,
        "emoji",
        "Noto Color Emoji glyphs captioned from the emoji package",
        _emoji,
        "cots data emoji",
    )
    p.add_argument(
        "--font",
        default="/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
        help="the colour emoji font (fonts-noto-color-emoji)",
    )
    _render_flags(p)
    p.add_argument("--limit", type=int, default=0, help="only the first N emoji")

    p = _source(
        sources,
        "synthetic",
        "scenes of coloured shapes with compositional captions",
        _synthetic,
        "cots data synthetic --count 10000 --seed 0",
    )
    p.add_argument("--count", type=int, default=1000, help="number of images, 10 to 1,000,000")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images and captions")
    _render_flags(p)


def _captioned_sources(sources: argparse._SubParsersAction) -> None:
    """Images on disk with their captions: COCO, Karpathy splits, tables, folders."""
    p = _source(
        sources,
        "coco",
        "COCO captions JSON and its image folder",
        _coco,
        "cots data coco captions_val2017.json --images val2017 --split test",
    )
    p.add_argument("annotations", help="captions_*.json (images[] + annotations[])")
    p.add_argument("--images", required=True, help="folder holding the images' file_name")
    p.add_argument(
        "--split",
        default="auto",
        choices=["auto", "train", "val", "test"],
        help="split of every image; auto: by a stable hash of the image id",
    )

    p = _source(
        sources,
        "karpathy",
        "Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json)",
        _karpathy,
        "cots data karpathy dataset_flickr30k.json --images flickr30k-images",
    )
    p.add_argument("annotations", help="dataset_*.json with images[].filename/split/sentences")
    p.add_argument("--images", required=True, help="root that filepath/filename are relative to")

    p = _source(
        sources,
        "csv",
        "CSV or TSV table of image path and caption",
        _csv,
        "cots data csv pairs.tsv --image-column filepath --caption-column title",
    )
    p.add_argument("table", help="the .csv or .tsv file (rows with the same image are merged)")
    p.add_argument("--image-column", default="image", help="column of image paths (image)")
    p.add_argument("--caption-column", default="caption", help="column of captions (caption)")
    p.add_argument(
        "--split-column",
        default="split",
        help="column of train/val/test, used when present (split)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "csv", "tsv"],
        help="delimiter; auto: from the file extension",
    )
    p.add_argument("--images", default="", help="base of relative image paths (the table's folder)")

    p = _source(
        sources,
        "folder",
        "folder of images with sidecar .txt captions (one per line)",
        _folder,
        "cots data folder ./photos --name photos",
    )
    p.add_argument("folder", help="searched recursively for images with <stem>.txt beside them")


def _video_sources(sources: argparse._SubParsersAction) -> None:
    """Video galleries: synthetic clips, folders of videos, MSR-VTT."""
    p = _source(
        sources,
        "synthetic-video",
        "short clips of two shape events in sequence, captioned in time order",
        _synthetic_video,
        "cots data synthetic-video --count 400 --seed 0",
    )
    p.add_argument("--count", type=int, default=400, help="number of clips (even), 10 to 100,000")
    p.add_argument("--seed", type=int, default=0, help="same seed, same clips and captions")
    p.add_argument("--size", type=int, default=96, help="square frame side in pixels, even (96)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (16)")
    p.add_argument("--fps", type=int, default=8, help="frames per second (8)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes (2)")

    p = _source(
        sources,
        "video-folder",
        "folder of videos with sidecar .txt captions (one per line)",
        _video_folder,
        "cots data video-folder ./clips --name clips",
    )
    p.add_argument("folder", help="searched recursively for videos with <stem>.txt beside them")

    p = _source(
        sources,
        "msrvtt",
        "MSR-VTT annotation JSON and its video folder (official or 1k-A split)",
        _msrvtt,
        "cots data msrvtt MSRVTT_data.json --videos MSRVTT/videos/all "
        "--test-list MSRVTT_JSFUSION_test.csv",
    )
    p.add_argument("annotations", help="MSRVTT_data.json (videos[] with split, sentences[])")
    p.add_argument("--videos", required=True, help="folder of <video_id>.mp4")
    p.add_argument(
        "--test-list",
        default="",
        help="MSRVTT_JSFUSION_test.csv: 1k-A test split (one caption each), the rest train (9k)",
    )


def _shard_sources(sources: argparse._SubParsersAction) -> None:
    """WebDataset shards in and out, and several galleries merged into one."""
    p = _source(
        sources,
        "webdataset",
        "WebDataset tar shards (key.jpg|png|webp|mp4 + key.txt|json)",
        _webdataset,
        "cots data webdataset 'shards/{00000..00009}.tar'",
    )
    p.add_argument(
        "shards", help="a shard or brace pattern such as shards-{000..009}.tar (quote it)"
    )

    p = _source(
        sources,
        "merge",
        "several galleries as one, each record tagged with its gallery (meta.gallery)",
        _merge,
        "cots data merge openclipart=cots-data/datasets/openclipart "
        "emoji=cots-data/datasets/emoji --name mixed",
    )
    p.add_argument(
        "galleries",
        nargs="+",
        metavar="NAME=DIR",
        help="dataset directories (NAME= optional: the folder's name by default)",
    )

    p = _source(
        sources,
        "to-webdataset",
        "write a dataset as WebDataset tar shards",
        _to_webdataset,
        "cots data to-webdataset cots-data/datasets/openclipart --out wds/",
    )
    p.add_argument("dataset", help="dataset directory (or its manifest.jsonl)")
    p.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and shards.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (1000)")
    p.add_argument(
        "--split",
        default="",
        choices=["", "train", "val", "test"],
        help="only this split (default: all)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        help="build a gallery (manifest + images) from a source",
        description="Build a gallery directory (manifest.jsonl, dataset.json, images/).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    _rendered_sources(sources)
    _captioned_sources(sources)
    _video_sources(sources)
    _shard_sources(sources)
