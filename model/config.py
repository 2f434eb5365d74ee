"""LLaMA-VID configuration, parsed from a released checkpoint's ``config.json``.

The released configs say ``model_type: "llava"``, which modern transformers resolves to its own,
unrelated LLaVA class, so ``AutoConfig`` cannot be used. They were also written by an internal
version of the official code (``num_qformer`` instead of ``num_query``, ``mean_concat``, ...).
This module turns that JSON into frozen dataclasses with every implicit default made explicit,
so nothing downstream branches on substrings of ``bert_type`` or ``compress_type``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import InstructBlipQFormerConfig, LlamaConfig

CompressionKind = Literal["none", "mean", "grid"]


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or holds something we cannot interpret."""


@dataclass(frozen=True)
class Compression:
    """How a frame's patch features become its content token(s) (spec §4.2 step 9)."""

    kind: CompressionKind = "none"
    grid: int = 0  # only for kind == "grid"

    @classmethod
    def parse(cls, value: str | None) -> "Compression":
        # The official code matches substrings: "grid" wins over "mean"; "mean_concat" is "mean".
        if value is None or value == "":
            return cls("none")
        if "grid" in value:
            try:
                return cls("grid", int(value.split(":")[-1]))
            except ValueError as exc:
                raise CheckpointError(f"compress_type {value!r}: expected 'grid:N'") from exc
        if "mean" in value:
            return cls("mean")
        raise CheckpointError(f"unknown compress_type {value!r} (expected none, mean* or grid:N)")

    def num_tokens(self, num_patches: int) -> int:
        """Content tokens per frame for a square grid of ``num_patches`` patches."""
        if self.kind == "none":
            return num_patches
        if self.kind == "mean":
            return 1
        side = int(math.sqrt(num_patches))
        return (side // grid_stride(side, self.grid)) ** 2


def grid_stride(side: int, grid: int) -> int:
    """Pooling stride of ``grid:g`` on a ``side x side`` patch grid (the official ``side // g``)."""
    if not 1 <= grid <= side:
        raise CheckpointError(f"compress_type grid:{grid} needs 1 <= {grid} <= {side}, the patch grid's side")
    return side // grid


@dataclass(frozen=True)
class QFormerDims:
    """Q-Former size. Released checkpoints use bert-base; ``qformer_config`` overrides (tiny models)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2

    def to_hf(self, encoder_hidden_size: int) -> InstructBlipQFormerConfig:
        return InstructBlipQFormerConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=self.layer_norm_eps,
            cross_attention_frequency=self.cross_attention_frequency,
            encoder_hidden_size=encoder_hidden_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )


@dataclass(frozen=True)
class LlamaVidConfig:
    """Everything needed to build LLaMA-VID, with the checkpoint's quirks resolved."""

    model_dir: Path
    llama: dict[str, Any]  # keyword arguments for transformers.LlamaConfig
    mm_hidden_size: int = 1408
    projector_type: str = "mlp2x_gelu"
    num_query: int = 32
    compression: Compression = field(default_factory=Compression)
    select_feature: str = "patch"
    bert_type: str = "qformer_pretrain"
    qformer: QFormerDims = field(default_factory=QFormerDims)
    vision_tower_path: Path = Path("eva_vit_g.pth")
    image_processor_path: Path = Path("processor")
    image_aspect_ratio: str | None = "pad"
    max_token: int = 4096
    video_mode: str = "auto"  # "auto" | "short" | "long"

    @property
    def hidden_size(self) -> int:
        return int(self.llama["hidden_size"])

    @property
    def long_video(self) -> bool:
        """Checkpoints trained on movies (stage 3) use the "Below is a movie" framing and no CLS.

        Stage 3 is the only training that set ``rope_scaling`` (its 64K context exceeds LLaMA's
        4K), so that key identifies the long-video checkpoint; ``video_mode`` overrides it.
        """
        if self.video_mode != "auto":
            return self.video_mode == "long"
        return self.llama["rope_parameters"].get("rope_type", "default") != "default"

    def tokens_per_frame(self, num_patches: int) -> int:
        """Visual tokens per frame: the context token plus the content tokens of the pooled patches."""
        tokens = 1 + num_patches  # EVA keeps CLS
        drops_cls = self.select_feature == "patch" and tokens % 2 == 1
        return 1 + self.compression.num_tokens(tokens - 1 if drops_cls else tokens)

    def to_official_dict(self, *, vision_tower: str = "./eva_vit_g.pth", image_processor: str = "./processor") -> dict:
        """``config.json`` in the released layout (plus our ``qformer_config`` for non-bert-base sizes)."""
        rope = self.llama["rope_parameters"]
        kind = self.compression.kind
        out = {
            "architectures": ["LlavaLlamaAttForCausalLM"],
            "model_type": "llava",
            **{k: v for k, v in self.llama.items() if k != "rope_parameters"},
            "rope_theta": rope.get("rope_theta", 10000.0),
            "rope_scaling": None if rope.get("rope_type") == "default" else {"type": rope["rope_type"], "factor": rope["factor"]},
            "mm_hidden_size": self.mm_hidden_size,
            "mm_projector_type": self.projector_type,
            "mm_vision_tower": vision_tower,
            "image_processor": image_processor,
            "mm_vision_select_feature": self.select_feature,
            "mm_vision_select_layer": -2,
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "use_mm_proj": True,
            "bert_type": self.bert_type,
            "num_query": self.num_query,
            "compress_type": None if kind == "none" else ("mean" if kind == "mean" else f"grid:{self.compression.grid}"),
            "image_aspect_ratio": self.image_aspect_ratio,
            "max_token": self.max_token,
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }
        if self.qformer != QFormerDims():
            out["qformer_config"] = dict(self.qformer.__dict__)
        return out

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(**self.llama)

    @classmethod
    def from_dir(
        cls,
        model_dir: str | os.PathLike,
        *,
        vision_tower: str | os.PathLike | None = None,
        image_processor: str | os.PathLike | None = None,
    ) -> "LlamaVidConfig":
        """Parse ``<model_dir>/config.json``; relative tower/processor paths resolve against the folder."""
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir} is not a LLaMA-VID checkpoint: no config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
        return cls.from_dict(raw, model_dir, vision_tower=vision_tower, image_processor=image_processor)

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        model_dir: Path,
        *,
        vision_tower: str | os.PathLike | None = None,
        image_processor: str | os.PathLike | None = None,
    ) -> "LlamaVidConfig":
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in raw:
                raise CheckpointError(f"{model_dir}/config.json lacks {key!r}")
        bert_type = raw.get("bert_type", "qformer_pretrain")
        if "qformer" not in bert_type or "pretrain" not in bert_type:
            # Only the qformer+pretrain variant was released; the "raw" variants add a
            # vlm_att_bert_proj and no vlm_att_ln, which no released checkpoint uses.
            raise CheckpointError(f"unsupported bert_type {bert_type!r}: only 'qformer_pretrain*' is released")
        llama = _llama_kwargs(raw)
        qraw = raw.get("qformer_config") or {}
        qdims = QFormerDims(**{k: qraw[k] for k in QFormerDims.__dataclass_fields__ if k in qraw})
        return cls(
            model_dir=model_dir,
            llama=llama,
            mm_hidden_size=int(raw.get("mm_hidden_size", 1408)),
            projector_type=raw.get("mm_projector_type", "linear"),
            num_query=int(raw.get("num_query", raw.get("num_qformer", 32))),
            compression=Compression.parse(raw.get("compress_type")),
            select_feature=raw.get("mm_vision_select_feature", "patch"),
            bert_type=bert_type,
            qformer=qdims,
            vision_tower_path=_resolve(model_dir, vision_tower or raw.get("mm_vision_tower") or "eva_vit_g.pth"),
            image_processor_path=_resolve(model_dir, image_processor or raw.get("image_processor") or "processor"),
            image_aspect_ratio=raw.get("image_aspect_ratio"),
            max_token=int(raw.get("max_token", raw.get("max_position_embeddings", 4096))),
        )


def _llama_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "vocab_size": raw["vocab_size"],
        "hidden_size": raw["hidden_size"],
        "intermediate_size": raw.get("intermediate_size", 11008),
        "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": raw["num_attention_heads"],
        "num_key_value_heads": raw.get("num_key_value_heads", raw["num_attention_heads"]),
        "hidden_act": raw.get("hidden_act", "silu"),
        "max_position_embeddings": raw.get("max_position_embeddings", 4096),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        "bos_token_id": raw.get("bos_token_id", 1),
        "eos_token_id": raw.get("eos_token_id", 2),
        "pad_token_id": raw.get("pad_token_id", 0),
        "tie_word_embeddings": raw.get("tie_word_embeddings", False),
        "attention_bias": raw.get("attention_bias", False),
    }
    theta = float(raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in ("linear", "dynamic"):
            raise CheckpointError(f"unsupported rope_scaling {scaling!r}")
        kwargs["rope_parameters"] = {"rope_type": rope_type, "factor": float(scaling["factor"]), "rope_theta": theta}
    else:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return kwargs


def _resolve(model_dir: Path, value: str | os.PathLike) -> Path:
    path = Path(value)
    if path.is_absolute():
        return path
    # Official configs hold paths relative to the training repo (./model_zoo/LAVIS/eva_vit_g.pth);
    # the checkpoint folder is the only anchor a user can rely on, then its basename inside it.
    candidate = model_dir / path
    if candidate.exists():
        return candidate
    by_name = model_dir / path.name
    return by_name if by_name.exists() else candidate
