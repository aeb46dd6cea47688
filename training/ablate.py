"""Where the `cots ablate` entry point lived before it moved to `training.pipelines.ablate`.

An environment installed from an older pyproject.toml names this module until it is
reinstalled (`pip install -e .`); nothing else imports it.
"""

from training.pipelines.ablate import register

__all__ = ["register"]
