"""Write docs/cli.md: the help text of every `cots` command and subcommand, from the parser.

Run `python docs/make_cli_reference.py`; tests/test_cli.py fails when the file is stale.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

OUT = Path(__file__).with_name("cli.md")


def sections(parser: argparse.ArgumentParser, name: str = "cots") -> list[tuple[str, str]]:
    """(command, help text) for the parser and, depth first, each of its subcommands."""
    found = [(name, parser.format_help())]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += sections(sub, f"{name} {sub_name}")
    return found


def render() -> str:
    from index_builder.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix it for a stable file
    parts = [
        "# Command reference\n",
        "Generated from the parser by `python docs/make_cli_reference.py`; every section is "
        "also `cots ... --help`.\n",
    ]
    for command, text in sections(build_parser()):
        parts.append(f"## `{command}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
