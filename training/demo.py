"""Where the `cots demo` entry point lived before it moved to `training.pipelines.demo`.

An environment installed from an older pyproject.toml names this module until it is
reinstalled (`pip install -e .`); nothing else imports it.
"""

from training.pipelines.demo import register

__all__ = ["register"]
