"""Where the `cots tokenizer` entry point lived before `training.visual_tokenizer.commands`.

An environment installed from an older pyproject.toml names this module until it is
reinstalled (`pip install -e .`); nothing else imports it.
"""

from training.visual_tokenizer.commands import register

__all__ = ["register"]
