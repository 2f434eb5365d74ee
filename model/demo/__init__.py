"""The model the service and CLI use when none is given.

The shipped demo checkpoint (``model/demo/checkpoint/``), a tiny LLaMA-VID trained on synthetic
coloured-shape videos by ``llamavid train-demo`` (see ``checkpoint/TRAINING.md``): it answers
questions about such videos correctly, and nothing else. Where it is missing, a tiny *random*
checkpoint is generated once into the user's cache folder; its answers are noise, which the
service says loudly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RANDOM_TINY_NAME = "tiny-random-v1"
SHIPPED_DIR = Path(__file__).parent / "checkpoint"
TRAINING_RECORD = "training.json"  # written next to a checkpoint by ``llamavid train-demo``
TRAINED_DEMO_KIND = "llamavid-demo-shapes"


def cache_root() -> Path:
    return Path(os.environ.get("LLAMAVID_CACHE_DIR", Path.home() / ".cache" / "llamavid"))


def random_tiny_dir() -> Path:
    """Generate (once) and return a tiny random checkpoint in the official layout."""
    from ..tools.tiny import make_tiny

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


def shipped_dir() -> Path | None:
    """The trained demo checkpoint bundled with the package, if this install has it."""
    return SHIPPED_DIR if (SHIPPED_DIR / "config.json").is_file() else None


def default_model_dir() -> Path:
    return shipped_dir() or random_tiny_dir()


def is_demo_model(model_dir: str | os.PathLike) -> bool:
    """True for the generated *random* model (answers are noise)."""
    return Path(model_dir).resolve() == (cache_root() / RANDOM_TINY_NAME).resolve()


def is_trained_demo(model_dir: str | os.PathLike) -> bool:
    """True for a checkpoint written by ``llamavid train-demo`` (the shipped one or a retrained one)."""
    record = Path(model_dir) / TRAINING_RECORD
    try:
        return json.loads(record.read_text()).get("kind") == TRAINED_DEMO_KIND
    except (OSError, ValueError, AttributeError):
        return False
