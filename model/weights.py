"""Reading released LLaMA-VID checkpoints and routing every tensor to the module that owns it.

All renames live in ``CHECKPOINT_RENAMES``: (official prefix, our prefix) pairs, where ``None``
means "drop on purpose". Loading is strict: a tensor no rule claims, or a parameter no tensor
fills, raises an error that names it. This replaces the official loader's substring filters
over the shard index and its silent ``strict=False``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .config import CheckpointError

# Order matters: the first matching prefix wins.
CHECKPOINT_RENAMES: tuple[tuple[str, str | None], ...] = (
    # The training run saved the vision tower too; the official loader ignores that copy and
    # loads eva_vit_g.pth instead (spec §1.5-1.6), so parity requires dropping it.
    ("model.vision_tower.", None),
    # transformers 4.31 persisted RoPE inverse frequencies; they are recomputed at init.
    ("model.layers.{}.self_attn.rotary_emb.inv_freq", None),
    # A non-persistent buffer in transformers' Q-Former.
    ("model.vlm_att_encoder.bert.embeddings.position_ids", None),
    ("model.vlm_att_encoder.bert.embeddings.LayerNorm.", "qformer.embeddings.layernorm."),
    ("model.vlm_att_encoder.bert.", "qformer."),
    ("model.vlm_att_query", "visual.query"),
    ("model.vlm_att_ln.", "visual.qformer_ln."),
    ("model.vlm_att_projector.", "visual.query_projector."),
    ("model.vlm_att_key_projector.", "visual.key_projector."),
    ("model.vlm_att_val_projector.", "visual.context_projector."),
    ("model.mm_projector.", "visual.content_projector."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)

# Infix renames applied after the prefix rule (transformers' Q-Former names vs LAVIS BERT).
_INFIX_RENAMES = ((".attention.self.", ".attention.attention."), (".crossattention.self.", ".crossattention.attention."))


def rename_key(key: str) -> str | None:
    """Official checkpoint name -> our module path, or None for tensors dropped on purpose."""
    for official, ours in CHECKPOINT_RENAMES:
        if "{}" in official:
            head, tail = official.split("{}")
            if key.startswith(head) and key.endswith(tail) and key[len(head) : -len(tail)].isdigit():
                return None
            continue
        if key == official or (official.endswith(".") and key.startswith(official)):
            if ours is None:
                return None
            new = ours + key[len(official) :]
            for old, rep in _INFIX_RENAMES:
                new = new.replace(old, rep)
            return new
    raise CheckpointError(f"checkpoint tensor {key!r} matches no rule in CHECKPOINT_RENAMES")


def official_key(key: str) -> str:
    """Inverse of ``rename_key``: our module path -> the official checkpoint name (for writers)."""
    for official, ours in CHECKPOINT_RENAMES:
        if ours is None:
            continue
        if key == ours or (ours.endswith(".") and key.startswith(ours)):
            new = official + key[len(ours) :]
            for old, rep in _INFIX_RENAMES:
                new = new.replace(rep, old)
            return new
    raise KeyError(f"no checkpoint name for module path {key!r}")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: sharded or single, .safetensors preferred over .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({model_dir / name for name in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise CheckpointError(
        f"no weights in {model_dir}: expected model.safetensors[.index.json] or pytorch_model.bin[.index.json]"
    )


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (official name, tensor) from every shard, memory-mapped where the format allows."""
    for path in checkpoint_files(model_dir):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            yield from load_torch_file(path).items()


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, memory-mapped so only the tensors actually used are read."""
    # weights_only: a pickle from the internet must not execute code on load.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zipfile) pickles cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_state(model_dir: Path, *, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every kept tensor of the checkpoint under our module names."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in iter_checkpoint(model_dir):
        new = rename_key(key)
        if new is None or new.startswith(skip_prefixes):
            continue
        if new in state:
            raise CheckpointError(f"tensor {key!r} appears in more than one shard")
        state[new] = tensor
    return state


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None,
                device: torch.device | str | None = None) -> None:
    """``load_state_dict(assign=True)`` that names every missing or unexpected key.

    ``module`` may live on the meta device: assigned tensors replace the placeholders, and any
    parameter still on meta afterwards is reported rather than silently left uninitialised. Each
    tensor is converted on its way to ``device``, one at a time, from the memory-mapped checkpoint,
    so a 7B model is never copied whole in host memory on its way to the GPU.
    """
    expected = dict(module.state_dict())
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the model: "
            + (f"missing {_summarise(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {_summarise(unexpected)}" if unexpected else "")
        )
    converted = {}
    for key, tensor in state.items():
        ref = expected[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(ref.shape)}")
        target = dtype if (dtype is not None and tensor.is_floating_point()) else ref.dtype
        converted[key] = tensor.to(device=device or tensor.device, dtype=target)
    module.load_state_dict(converted, strict=True, assign=True)
    on_meta = [name for name, p in module.named_parameters() if p.is_meta]
    if on_meta:
        raise CheckpointError(f"parameters left uninitialised: {_summarise(on_meta)}")


def split_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
