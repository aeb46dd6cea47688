"""The `cots` command: help for every stage, one-line errors, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from index_builder.cli import _stage_registrations, build_parser, expand_aliases, main, parse

ROOT = Path(__file__).resolve().parents[1]


def run_cots(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "index_builder.cli", *args], capture_output=True, text=True
    )


def test_help_lists_every_stage():
    out = run_cots("--help")
    assert out.returncode == 0
    for stage in ("data", "train", "eval", "export", "index", "serve"):
        assert f"    {stage}" in out.stdout


def test_every_subcommand_has_help():
    parser = build_parser()
    names = [ep.name for ep in _stage_registrations()]
    assert {"data", "train", "eval", "export", "index", "serve"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0


def test_train_tokenizer_is_the_tokenizer_train_command():
    assert expand_aliases(["-v", "train", "tokenizer", "--steps", "5"]) == [
        "-v",
        "tokenizer",
        "train",
        "--steps",
        "5",
    ]
    assert expand_aliases(["train", "cots", "tokenizer"]) == ["train", "cots", "tokenizer"]
    out = run_cots("train", "tokenizer", "--help")
    assert out.returncode == 0
    assert "usage: cots tokenizer train" in out.stdout and "--codebook-size" in out.stdout


def test_training_overrides_anywhere_on_the_line(capsys):
    parser = build_parser()
    argv = ["train", "cots-cpu", "a.b=1", "--data", "D", "train.max_steps=3", "--out", "R", "c=d"]
    args = parse(parser, argv)
    assert args.overrides == ["a.b=1", "train.max_steps=3", "c=d"]
    assert (str(args.data), str(args.out)) == ("D", "R")
    for stray in (["stray"], ["--bogus"], ["=x"]):
        with pytest.raises(SystemExit) as exc:
            parse(parser, ["train", "cots", "--data", "D", *stray])
        assert exc.value.code == 2
        assert f"unrecognized arguments: {stray[0]}" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # commands without overrides take no KEY=VALUE words
        parse(parser, ["eval", "--checkpoint", "C", "x=1"])


def test_unknown_command_is_a_usage_error():
    out = run_cots("frobnicate")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
    assert "Traceback" not in out.stderr


def test_user_error_is_one_line(monkeypatch, capsys):
    def boom(args):
        raise FileNotFoundError("no dataset manifest at /nowhere/manifest.jsonl")

    parser = build_parser()
    monkeypatch.setattr("index_builder.cli.build_parser", lambda: parser)
    args = parser.parse_args(["serve"])
    args.func = boom
    monkeypatch.setattr(parser, "parse_known_args", lambda argv=None: (args, []))
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "cots serve: error: no dataset manifest at /nowhere/manifest.jsonl"


def test_a_dangling_link_for_a_folder_is_named_with_its_target(tmp_path, monkeypatch, capsys):
    """$COTS_HOME (or any folder cots creates) that is a link to a missing folder: mkdir
    says only "File exists"; the error says which link and where it points."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cots-data").symlink_to(tmp_path / "gone")
    monkeypatch.delenv("COTS_HOME", raising=False)
    assert main(["data", "synthetic", "--count", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"cots data: error: cots-data is a link to {tmp_path / 'gone'}, which does not exist: "
        "create it or remove the link"
    )


def test_permission_error_names_the_user_id(monkeypatch, capsys):
    """A container user that cannot read a mounted file sees which user it runs as."""

    def boom(args):
        raise PermissionError(13, "Permission denied", "/data/bundles/default/bundle.json")

    args = build_parser().parse_args(["serve"])
    args.func = boom
    monkeypatch.setattr("index_builder.cli.parse", lambda parser, argv: args)
    assert main([]) == 2
    assert capsys.readouterr().err.strip() == (
        "cots serve: error: [Errno 13] Permission denied: '/data/bundles/default/bundle.json' "
        f"(running as user id {os.getuid()})"
    )


def test_cli_reference_is_current():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "make_cli_reference.py"
    spec = importlib.util.spec_from_file_location("make_cli_reference", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.read_text() == module.render(), "run python docs/make_cli_reference.py"


def test_faiss_loader_lines_do_not_reach_the_output(tmp_path):
    """Importing faiss logs eight INFO lines about AVX variants; the CLI silences them (a
    fresh interpreter, so faiss is imported after the CLI's logging setup)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = ["index", "build", str(tmp_path / "index"), "--bundle", str(tmp_path / "none")]
    out = subprocess.run(
        [sys.executable, "-m", "index_builder.cli", *argv, "--images", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "no bundle at" in out.stderr  # faiss was imported first
    assert "faiss.loader" not in out.stdout + out.stderr
