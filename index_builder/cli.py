"""The `cots` command line: one parser whose subcommands each stage registers itself."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

# Which extra brings a missing module, for the hint printed when a stage cannot import it.
EXTRA_OF = {
    **dict.fromkeys(["torch", "safetensors", "onnx", "onnxscript", "matplotlib"], "train"),
    **dict.fromkeys(["cairosvg", "emoji", "defusedxml"], "data"),
    "av": "serve",
    **dict.fromkeys(["skimage", "sklearn"], "eval"),
    "ray": "ray",
}
# Other spellings of a command: `cots train tokenizer ...` runs `cots tokenizer train ...`.
ALIASES: dict[tuple[str, ...], tuple[str, ...]] = {("train", "tokenizer"): ("tokenizer", "train")}
# Libraries whose INFO lines say nothing a user acts on (faiss.loader: eight lines about AVX
# variants on every import of faiss); their warnings still show.
QUIET_LOGGERS = ("faiss.loader",)
COMMAND_ORDER = (
    "data",
    "train",
    "eval",
    "eval-zero-shot",
    "export",
    "index",
    "serve",
    "milvus",
    "demo",
    "ablate",
)

DESCRIPTION = """\
cots: cross-modal retrieval (search images with text, text with images) on the
COTS two-stream vision-language model.

The pipeline runs as stages, each a subcommand:
  data    build a gallery (image or video + captions manifest) from Open Clip Art, emoji,
          synthetic scenes or clips, COCO/Karpathy, MSR-VTT, CSV/TSV, folders or WebDataset
  train   train the two towers (COTS or the CLIP baseline) on a gallery
  eval    recall@1/5/10 both ways on a split; `eval-zero-shot` scores exported bundles
          on collections they never trained on
  export  turn a checkpoint into an ONNX bundle of the two towers
  index   embed a gallery with a bundle and build FAISS indexes
  serve   run the search API and web page
  milvus  start, check or stop a local Milvus server for `--backend milvus`
Run `cots COMMAND --help` for each one."""


def _stage_registrations() -> list:
    found = {ep.name: ep for ep in entry_points(group="cots.commands")}
    order = {name: i for i, name in enumerate(COMMAND_ORDER)}
    return [found[name] for name in sorted(found, key=lambda n: (order.get(n, 99), n))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cots", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in _stage_registrations():
        ep.load()(sub)
    return parser


def expand_aliases(argv: Sequence[str]) -> list[str]:
    """Rewrite an alias spelling of the command (the first two positional words)."""
    argv = list(argv)
    first = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    target = ALIASES.get(tuple(argv[first : first + 2]))
    if target:
        argv[first : first + 2] = target
    return argv


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; a command with an `overrides` list (KEY=VALUE words after its first
    positional) also collects such words found anywhere else, e.g. after its flags."""
    args, extra = parser.parse_known_args(expand_aliases(argv))
    overrides = getattr(args, "overrides", None)
    if extra and isinstance(overrides, list) and all(_is_override(word) for word in extra):
        overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _is_override(word: str) -> bool:
    key, sep, _ = word.partition("=")
    return bool(sep and key) and not word.startswith("-")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").split(".")[0], "serve")
        print(
            f"cots {args.command}: error: this stage needs the package {exc.name!r}; "
            f"install it with: pip install 'cots[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"cots {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, LookupError) as exc:
        # User mistakes (a missing file, a malformed config, an unknown preset) end
        # as one readable line; the library raises built-in exceptions with exact messages.
        if args.verbose:
            raise
        print(f"cots {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """An error as one line; a permission error names the user id the process runs as (in a
    container, often not the owner of the mounted files), a folder that is a link to nowhere
    (mkdir says only "File exists") names where the link points."""
    text = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0] if exc.args else exc)
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    if isinstance(exc, PermissionError):
        text = f"{text} (running as user id {os.getuid()})"
    link = Path(str(exc.filename)) if isinstance(exc, FileExistsError) and exc.filename else None
    if link is not None and link.is_symlink() and not link.exists():
        target = os.readlink(link)
        text = f"{link} is a link to {target}, which does not exist: create it or remove the link"
    return " ".join(text.split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
