"""EVA-ViT-G, LLaMA-VID's vision tower: transformers' ``InstructBlipVisionModel`` fed LAVIS' ``eva_vit_g.pth``.

The two towers share the topology (spec §2.6): 88-wide heads, one qkv projection with a q and a
v bias but no k bias, pre-norm blocks with LayerNorm eps 1e-6, exact GELU, CLS first. What
differs is settled here, once:

* key names: ``lavis_to_eva`` / ``lavis_state_dict`` map the file's layout to the module's and
  back; the module keeps q, k and v bias as one fused bias ``cat(q_bias, 0, v_bias)``;
* ``post_layernorm``: LLaMA-VID reads the last block's output without a final norm;
* position embeddings: interpolated once at load (bicubic, fp32, CLS kept, as LAVIS'
  ``interpolate_pos_embed``) to the processor's size, so nothing interpolates at run time.

SDPA scales q inside its kernel where LAVIS scaled q before ``q @ k^T``: about 3e-7 relative error
against the official features, and bit for bit what this project's earlier hand-written LAVIS module
computed (measured in fp32 and bf16 on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

from .config import CheckpointError
from .weights import load_strict, load_torch_file

EVA_HEAD_DIM = 88
EVA_G_WIDTH = 1408
EVA_G_DEPTH = 39  # LAVIS builds 39 blocks; any further block in the file is ignored (spec §2.2)

# (LAVIS name, our name, third of the fused qkv bias or None), in the order LAVIS' module holds them.
_TOP_KEYS = (
    ("cls_token", "embeddings.class_embedding", None),
    ("pos_embed", "embeddings.position_embedding", None),
    ("patch_embed.proj.weight", "embeddings.patch_embedding.weight", None),
    ("patch_embed.proj.bias", "embeddings.patch_embedding.bias", None),
)
_BLOCK_KEYS = (
    ("norm1.weight", "layer_norm1.weight", None),
    ("norm1.bias", "layer_norm1.bias", None),
    ("attn.q_bias", "self_attn.qkv.bias", 0),
    ("attn.v_bias", "self_attn.qkv.bias", 2),
    ("attn.qkv.weight", "self_attn.qkv.weight", None),
    ("attn.proj.weight", "self_attn.projection.weight", None),
    ("attn.proj.bias", "self_attn.projection.bias", None),
    ("norm2.weight", "layer_norm2.weight", None),
    ("norm2.bias", "layer_norm2.bias", None),
    ("mlp.fc1.weight", "mlp.fc1.weight", None),
    ("mlp.fc1.bias", "mlp.fc1.bias", None),
    ("mlp.fc2.weight", "mlp.fc2.weight", None),
    ("mlp.fc2.bias", "mlp.fc2.bias", None),
)


class EvaVisionTower(InstructBlipVisionModel):
    """InstructBLIP's vision model as LLaMA-VID runs it: ``last_hidden_state`` is [B, 1+P, C], CLS first."""

    def __init__(self, config: InstructBlipVisionConfig) -> None:
        super().__init__(config)
        # LLaMA-VID hands the last block's output to its head as is (spec §2.1, §8 #4): InstructBLIP's
        # final LayerNorm would change every feature the Q-Former and the content tokens read.
        self.post_layernorm = nn.Identity()

    @property
    def num_patches(self) -> int:
        return self.embeddings.num_patches


def load_eva(path: Path, image_size: int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> EvaVisionTower:
    """``eva_vit_g.pth`` -> the tower for ``image_size`` px input (the processor's crop size)."""
    if not Path(path).is_file():
        raise CheckpointError(
            f"vision tower not found at {path}: LLaMA-VID needs LAVIS' eva_vit_g.pth "
            "(set mm_vision_tower in config.json or pass --vision-tower)"
        )
    state = load_torch_file(path)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return eva_from_lavis(state, image_size, dtype=dtype, device=device, source=str(path))


def eva_from_lavis(
    state: Mapping[str, torch.Tensor], image_size: int, *, dtype: torch.dtype, device: torch.device | str | None = None,
    source: str = "EVA state",
) -> EvaVisionTower:
    """Build on the meta device, then assign the LAVIS tensors (converted to ``dtype``) with a strict load."""
    width, depth, mlp_hidden, patch_size = lavis_dims(state, source)
    kept = {k: v for k, v in state.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < depth}
    kept["pos_embed"] = interpolate_pos_embed(kept["pos_embed"], image_size // patch_size)
    with torch.device("meta"):
        tower = EvaVisionTower(eva_config(width, depth, mlp_hidden, image_size, patch_size))
    load_strict(tower, lavis_to_eva(kept, depth), dtype=dtype, device=device)
    return tower.eval()


def lavis_dims(state: Mapping[str, torch.Tensor], source: str) -> tuple[int, int, int, int]:
    """(width, depth, MLP width, patch size) of a LAVIS state dict; depth is what LAVIS would build."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise CheckpointError(f"{source} is not in the LAVIS EVA-ViT layout: missing {key!r}")
    width = state["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if width == EVA_G_WIDTH:
        depth = min(depth, EVA_G_DEPTH)
    return width, depth, state["blocks.0.mlp.fc1.weight"].shape[0], state["patch_embed.proj.weight"].shape[-1]


def eva_config(
    width: int, depth: int, mlp_hidden: int, image_size: int, patch_size: int = 14
) -> InstructBlipVisionConfig:
    """LAVIS' EVA as an InstructBLIP vision config: heads are always 88 wide."""
    if width % EVA_HEAD_DIM:
        raise CheckpointError(f"EVA width {width} is not a multiple of the head size {EVA_HEAD_DIM}")
    config = InstructBlipVisionConfig(
        hidden_size=width,
        intermediate_size=mlp_hidden,
        num_hidden_layers=depth,
        num_attention_heads=width // EVA_HEAD_DIM,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu",  # exact erf GELU, as LAVIS' nn.GELU()
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    config._attn_implementation = "sdpa"
    return config


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize the patch part of ``pos_embed`` to ``grid x grid`` (bicubic, fp32, CLS kept)."""
    num_extra = 1
    old = int(math.sqrt(pos_embed.shape[1] - num_extra))
    if old == grid:
        return pos_embed
    extra, patches = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    patches = patches.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra.float(), patches), dim=1)


def lavis_to_eva(state: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """LAVIS names -> the module's; a block's q and v bias become one fused bias.

    Keys the map does not know pass through under their LAVIS names, so the strict load names them.
    """
    rest = dict(state)
    out: dict[str, torch.Tensor] = {}
    for lavis, ours, third in _layout(depth):
        if third is None and lavis in rest:
            out[ours] = rest.pop(lavis)
    for i in range(depth):
        q, v = f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias"
        if q in rest and v in rest:
            out[f"encoder.layers.{i}.self_attn.qkv.bias"] = fuse_qv_bias(rest.pop(q), rest.pop(v))
    out.update(rest)
    return out


def lavis_state_dict(tower: EvaVisionTower) -> dict[str, torch.Tensor]:
    """The tower in ``eva_vit_g.pth``'s names and order; q and v bias come back out as tensors of their own."""
    ours = tower.state_dict()
    out: dict[str, torch.Tensor] = {}
    for lavis, name, third in _layout(len(tower.encoder.layers)):
        # clone: a view would make torch.save write the whole fused bias for each third
        out[lavis] = ours[name] if third is None else ours[name].chunk(3)[third].clone()
    return out


def fuse_qv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """LAVIS' attention bias: keys get none (spec §2.1)."""
    return torch.cat((q_bias, torch.zeros_like(v_bias), v_bias))


class _QvBias(nn.Module):
    """The fused bias as a function of LAVIS' q and v bias, which become the trained tensors."""

    def forward(self, q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
        return fuse_qv_bias(q_bias, v_bias)

    def right_inverse(self, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_bias, _, v_bias = bias.chunk(3)
        return q_bias.clone(), v_bias.clone()


@contextmanager
def lavis_parameters(tower: EvaVisionTower) -> Iterator[list[nn.Parameter]]:
    """Train the tower with LAVIS' parameters: q and v bias as tensors of their own, in LAVIS' order.

    The k bias stays exactly zero, and the gradient clipping's global norm is rounded exactly as
    over LAVIS' module (it depends on how the tensors are split and ordered), so a seeded run
    reproduces one made with that module (the demo checkpoint's recorded digests). On exit the
    trained q and v bias are fused back into a plain parameter.
    """
    projections = [layer.self_attn.qkv for layer in tower.encoder.layers]
    for qkv in projections:
        parametrize.register_parametrization(qkv, "bias", _QvBias())
    try:
        params = dict(tower.named_parameters())
        # a parametrized bias keeps its tensors as parametrizations.bias.original0 (q) and original1 (v)
        leaf = {0: "parametrizations.bias.original0", 2: "parametrizations.bias.original1"}
        yield [
            params[name if third is None else name.removesuffix("bias") + leaf[third]]
            for _, name, third in _layout(len(projections))
        ]
    finally:
        for qkv in projections:
            parametrize.remove_parametrizations(qkv, "bias", leave_parametrized=True)


def _layout(depth: int) -> Iterator[tuple[str, str, int | None]]:
    yield from _TOP_KEYS
    for i in range(depth):
        for lavis, ours, third in _BLOCK_KEYS:
            yield f"blocks.{i}.{lavis}", f"encoder.layers.{i}.{ours}", third
