"""Helpers for tests that need a modified copy of a generated checkpoint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def clone(src: Path, dst: Path) -> Path:
    """Copy a checkpoint folder (plain file copies, so the copy is writable)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def edit_config(model_dir: Path, *, drop: tuple[str, ...] = (), **changes) -> dict:
    """Rewrite ``config.json`` with ``changes`` applied and ``drop`` keys removed."""
    raw = read_config(model_dir)
    raw.update(changes)
    for key in drop:
        raw.pop(key, None)
    (model_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return raw


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.suffix in (".bin", ".safetensors"))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)


def edit_weights(
    model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None], *, holding: str | None = None
) -> Path:
    """Apply ``edit`` in place to the shard that holds ``holding`` (or the first shard); return it."""
    for path in weight_files(model_dir):
        state = load_weights(path)
        if holding is None or holding in state:
            edit(state)
            save_weights(path, state)
            return path
    raise KeyError(f"no shard of {model_dir} holds {holding!r}")


def all_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        out.update(load_weights(path))
    return out
