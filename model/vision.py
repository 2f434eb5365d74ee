"""EVA-ViT-G, the vision tower of LLaMA-VID, in the LAVIS ``eva_vit_g.pth`` layout.

Hand-written on purpose: transformers' ``InstructBlipVisionModel`` has the same topology but is
not numerically the same module (it stores one fused qkv bias, scales after ``q @ k^T`` and
applies a final ``post_layernorm`` that LLaMA-VID does not use), and it cannot load the LAVIS
key names. The quirks kept here for parity (spec §2): 88-wide heads, a q/v bias but no k bias,
pre-norm blocks with LayerNorm eps 1e-6, exact GELU, no final norm, CLS kept in the output,
and the bicubic fp32 interpolation of ``pos_embed`` when the processor's size differs from the
file's grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import CheckpointError

EVA_HEAD_DIM = 88
EVA_G_WIDTH = 1408
EVA_G_DEPTH = 39  # LAVIS builds 39 blocks; any further block in the file is ignored (spec §2.2)


class EvaAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_heads = dim // EVA_HEAD_DIM
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, EVA_HEAD_DIM)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class EvaMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, dim: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = EvaMlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EvaVisionTower(nn.Module):
    """pixels [B, 3, S, S] -> features [B, 1 + (S/14)^2, width], CLS first."""

    def __init__(self, width: int, depth: int, mlp_hidden: int, image_size: int, patch_size: int = 14) -> None:
        super().__init__()
        if width % EVA_HEAD_DIM:
            raise CheckpointError(f"EVA width {width} is not a multiple of the head size {EVA_HEAD_DIM}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.patch_embed = PatchEmbed(width, patch_size)
        self.blocks = nn.ModuleList(EvaBlock(width, mlp_hidden) for _ in range(depth))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(f"EVA expects {self.image_size}px input, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    @classmethod
    def from_lavis(cls, path: Path, image_size: int, dtype: torch.dtype = torch.float32) -> "EvaVisionTower":
        """Build from ``eva_vit_g.pth``: width, depth and MLP size come from the tensors."""
        if not Path(path).is_file():
            raise CheckpointError(
                f"vision tower not found at {path}: LLaMA-VID needs LAVIS' eva_vit_g.pth "
                "(set mm_vision_tower in config.json or pass --vision-tower)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            width = state["cls_token"].shape[-1]
            patch_size = state["patch_embed.proj.weight"].shape[-1]
            mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        except KeyError as exc:
            raise CheckpointError(f"{path} is not in the LAVIS EVA-ViT layout: missing {exc}") from exc
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        if width == EVA_G_WIDTH:
            depth = min(depth, EVA_G_DEPTH)
        state = {k: v for k, v in state.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < depth}
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], image_size // patch_size)
        tower = cls(width, depth, mlp_hidden, image_size, patch_size)
        missing, unexpected = tower.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return tower.to(dtype).eval()


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
