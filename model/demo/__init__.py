"""The model the service and CLI use when none is given.

A tiny random checkpoint, generated once into the user's cache folder: its answers are noise,
which the service says loudly. (A trained demo checkpoint replaces it once one ships.)
"""

from __future__ import annotations

import os
from pathlib import Path

RANDOM_TINY_NAME = "tiny-random-v1"


def cache_root() -> Path:
    return Path(os.environ.get("LLAMAVID_CACHE_DIR", Path.home() / ".cache" / "llamavid"))


def random_tiny_dir() -> Path:
    """Generate (once) and return a tiny random checkpoint in the official layout."""
    from ..tiny import make_tiny

    out = cache_root() / RANDOM_TINY_NAME
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        make_tiny(tmp, "tiny", seed=0)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir() -> Path:
    return random_tiny_dir()


def is_demo_model(model_dir: str | os.PathLike) -> bool:
    return Path(model_dir).resolve() == random_tiny_dir().resolve()
