"""CLIP's byte-level BPE text tokenizer as a Hugging Face `tokenizers` tokenizer.json.

Generated (`python -m training.towers.clip_tokenizer MERGES_GZ`; shipped as
clip_vocab/tokenizer.json, MIT, see its LICENSE) from the merges file that OpenAI CLIP and
open_clip ship, exactly as their `SimpleTokenizer` reads it (openai/CLIP
`clip/simple_tokenizer.py`, open_clip `src/open_clip/tokenizer.py`): vocabulary = the 256
byte symbols, the same with `</w>`, one token per merge (the first 48,894 lines after the
header), then `<|startoftext|>` (49406) and
`<|endoftext|>` (49407). Text is lowercased with whitespace collapsed and split by CLIP's
regex; every text becomes `<|startoftext|> ids <|endoftext|>`, and `TextTokenizer` truncates
(keeping the end token) and pads with id 0, as open_clip does. Not reproduced: `ftfy`'s
mojibake repair and HTML unescaping (Hugging Face's fast CLIP tokenizer skips them too).
"""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path
from typing import Any

TOKENIZER_JSON = Path(__file__).resolve().parent / "clip_vocab" / "tokenizer.json"
MERGES = 49152 - 256 - 2  # SimpleTokenizer: merges[1 : 49152 - 256 - 2 + 1]
START, END = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
# CLIP's pre-tokenisation (special tokens are matched before it, as added tokens).
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (CLIP uses it too)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def clip_tokenizer_spec(vocab_gz: Path) -> dict[str, Any]:
    """The tokenizer.json document (a dict) for CLIP's merges file."""
    vocab, merges = read_vocab(vocab_gz)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special_token(token) for token in (START, END)],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"},
            ],
        },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": PATTERN},
                    "behavior": "Removed",
                    "invert": True,
                },
                byte_level(),
            ],
        },
        "post_processor": post_processor(),
        "decoder": byte_level(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": "</w>",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(vocab)},
            "merges": [" ".join(m) for m in merges],
        },
    }


def read_vocab(vocab_gz: Path) -> tuple[list[str], list[list[str]]]:
    """CLIP's vocabulary (bytes, bytes + `</w>`, one token per merge, start, end) and merges
    (pairs of symbols), read from its merges file as `SimpleTokenizer` reads it."""
    with gzip.open(vocab_gz) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [line.split() for line in lines[1 : MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += [START, END]
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise ValueError(f"{vocab_gz} is not CLIP's merges file ({len(vocab)} tokens)")
    return vocab, merges


def token_id(token: str) -> int:
    """The id of the start or end token: the last two of the vocabulary."""
    return VOCAB_SIZE - 2 + (START, END).index(token)


def special_token(token: str) -> dict[str, Any]:
    """An added token matched before normalisation and pre-tokenisation."""
    return {
        "id": token_id(token),
        "content": token,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def byte_level() -> dict[str, Any]:
    """The byte-level pre-tokenizer and decoder (the regex split comes before it)."""
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": False,
    }


def post_processor() -> dict[str, Any]:
    """`<|startoftext|> ids <|endoftext|>` around every text (and pair of texts)."""
    start, end = (
        {"SpecialToken": {"id": START, "type_id": 0}},
        {"SpecialToken": {"id": END, "type_id": 0}},
    )
    return {
        "type": "TemplateProcessing",
        "single": [start, {"Sequence": {"id": "A", "type_id": 0}}, end],
        "pair": [
            start,
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 0}},
            end,
        ],
        "special_tokens": {
            token: {"id": token, "ids": [token_id(token)], "tokens": [token]}
            for token in (START, END)
        },
    }


def write_clip_tokenizer(out: Path, vocab_gz: Path) -> Path:
    """Write CLIP's tokenizer.json to `out` (atomically: a temporary file, then replace)."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(clip_tokenizer_spec(vocab_gz), handle, ensure_ascii=False)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of the install
    os.replace(tmp, out)
    return out


def clip_tokenizer_json() -> Path:
    """The tokenizer.json shipped in the package (generated by `write_clip_tokenizer`)."""
    return TOKENIZER_JSON


def main(argv: list[str] | None = None) -> int:
    """Regenerate the shipped tokenizer.json from a merges file (e.g. the one in the
    open_clip_torch wheel: `pip download --no-deps open_clip_torch`, then unzip)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("merges", type=Path, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=TOKENIZER_JSON, help="tokenizer.json")
    args = parser.parse_args(argv)
    print(write_clip_tokenizer(args.out, args.merges))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
