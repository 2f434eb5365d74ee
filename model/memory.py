"""How a LLaMA-VID checkpoint fits on a device, worked out before a byte of weights is read.

Every part is built on the meta device from ``config.json`` (and the shapes, not the data, of
``eva_vit_g.pth`` when it is there) and counted at the serving dtype, bitsandbytes 4/8-bit for the
LLM's linear layers when asked. What is left of ``utilization`` x device memory after the weights,
an activation reserve and the feature hot tier (when it lives on the device) is the KV cache, in
blocks of ``block_size`` positions. The service refuses to start on a plan that does not fit,
with the plan in the message, rather than failing on the first question.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .config import LlamaVidConfig
from .eva import EVA_G_DEPTH, EVA_G_WIDTH, EvaVisionTower, eva_config, lavis_dims
from .frame_tokens import LlamaVidVisualHead
from .qformer import build_qformer
from .weights import load_torch_file

GiB = 1 << 30
CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS workspaces, allocator slack
TEXT_TOKENS = 128  # a question's template and text, beside its visual tokens
# bitsandbytes bytes per quantized weight: NF4 packs two per byte, plus its absmax per 64 weights
# (8-bit, with double quantization) and a float32 per 256 of those; 8-bit is one byte plus a scale.
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}


@dataclass(frozen=True)
class MemoryPlan:
    device_bytes: int
    utilization: float
    dtype: str
    quantization: str
    parts: dict[str, int]  # weight bytes of llm, eva, qformer, head (and asr, when on the device)
    weights_bytes: int
    activation_bytes: int
    hot_tier_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    block_size: int
    num_blocks: int
    max_concurrent_tokens: int
    tokens_per_frame: int
    context_length: int
    max_new_tokens: int
    max_frames_per_question: int
    fits: bool
    reason: str | None

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
        rows = [
            ("device memory x utilization", f"{gib(self.device_bytes)} x {self.utilization:g}"),
            *((f"weights: {name}", gib(size)) for name, size in self.parts.items()),
            ("activation reserve", gib(self.activation_bytes)),
            ("feature hot tier on the device", gib(self.hot_tier_bytes)),
            ("KV cache",
             f"{gib(self.kv_cache_bytes)} = {self.num_blocks} blocks of {self.block_size} positions"),
            ("KV bytes per position", f"{self.kv_bytes_per_token / 1024:.0f} KiB"),
            ("positions held at once", f"{self.max_concurrent_tokens:,}"),
            ("frames per question", f"{self.max_frames_per_question:,} ({self.tokens_per_frame} tokens each, "
                                    f"context {self.context_length:,}, {self.max_new_tokens} new tokens)"),
            ("fits", "yes" if self.fits else f"no: {self.reason}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    def question_positions(self, frames: int) -> int:
        """Positions a question about ``frames`` frames holds at most: prompt and token budget, which
        the service clamps to the model's context."""
        return min(frames * self.tokens_per_frame + TEXT_TOKENS + self.max_new_tokens, self.context_length)

    def questions_at_once(self, frames: int) -> int:
        """How many questions about ``frames``-frame videos the KV cache holds at once."""
        blocks = -(-self.question_positions(frames) // self.block_size)
        return (self.num_blocks - 1) // blocks


def plan_memory(
    config: LlamaVidConfig,
    *,
    device_bytes: int,
    utilization: float = 0.90,
    dtype: torch.dtype = torch.float16,
    quantization: str = "none",
    kv_cache_bytes: int | None = None,
    hot_tier_bytes: int = 0,
    asr_bytes: int = 0,
    encode_batch: int = 32,
    prefill_chunk: int = 512,
    max_running: int = 8,
    max_new_tokens: int = 512,
    block_size: int = 16,
    eva_dims: tuple[int, int, int, int] | None = None,
) -> MemoryPlan:
    """``eva_dims`` (width, depth, MLP width, patch size) stands in for the tower file's shapes;
    ``asr_bytes``: a speech-to-text model's weights on the same device."""
    image_size = _crop_size(config)
    eva = _eva_tower(config, image_size, eva_dims)
    element = torch.tensor([], dtype=dtype).element_size()
    parts = {
        "llm": _llm_bytes(config, dtype, quantization),
        "eva": _module_bytes(eva, dtype),
        "qformer": _module_bytes(_on_meta(lambda: build_qformer(config.qformer, config.mm_hidden_size)),
                                 dtype),
        "head": _module_bytes(_on_meta(lambda: LlamaVidVisualHead(config)), dtype),
        **({"asr": asr_bytes} if asr_bytes else {}),
    }
    weights = sum(parts.values())
    llama = config.llama_config()
    layers = llama.num_hidden_layers
    kv_per_token = kv_bytes_per_token(llama, dtype)
    tokens = 1 + eva.num_patches
    v = eva.config
    activations = (
        CUDA_CONTEXT_BYTES
        + encode_batch * tokens * (6 * v.hidden_size + v.intermediate_size) * element  # one EVA batch
        + prefill_chunk * (4 * llama.hidden_size + 2 * llama.intermediate_size) * element  # one prefill chunk
        + 2 * config.max_token * kv_per_token // layers  # one layer's keys and values gathered for attention
        + max_running * llama.vocab_size * 4  # float32 logits of a decode step
    )
    free = int(utilization * device_bytes) - weights - activations - hot_tier_bytes
    if kv_cache_bytes is None:
        # a decode step also gathers one layer's worth of every live position: 1/layers of the cache
        kv_cache_bytes = max(0, free * layers // (layers + 1))
    num_blocks = kv_cache_bytes // (block_size * kv_per_token)
    max_tokens = max(0, num_blocks - 1) * block_size  # block 0 is the padding block
    tpf = config.tokens_per_frame(eva.num_patches)
    # the longest prompt a question may have: within the context and the cache, one token to generate
    max_frames = max(0, (min(config.max_token, max_tokens) - TEXT_TOKENS - 1) // tpf)
    one_frame = min(tpf + TEXT_TOKENS + max_new_tokens, config.max_token)
    reason = None
    if weights + activations + hot_tier_bytes > utilization * device_bytes:
        reason = (f"the weights ({weights / GiB:.1f} GiB) and the activation reserve "
                  f"({activations / GiB:.1f} GiB) "
                  f"need more than {utilization:g} x {device_bytes / GiB:.1f} GiB")
    elif kv_cache_bytes + kv_cache_bytes // layers > free:
        reason = f"a KV cache of {kv_cache_bytes / GiB:.1f} GiB does not fit beside the weights"
    elif max_tokens < one_frame:
        reason = (f"the KV cache holds {max_tokens} positions: not even a one-frame question with "
                  f"{max_new_tokens} new tokens ({one_frame} positions) fits")
    return MemoryPlan(
        device_bytes=device_bytes, utilization=utilization, dtype=str(dtype).removeprefix("torch."),
        quantization=quantization, parts=parts, weights_bytes=weights, activation_bytes=activations,
        hot_tier_bytes=hot_tier_bytes, kv_bytes_per_token=kv_per_token, kv_cache_bytes=kv_cache_bytes,
        block_size=block_size, num_blocks=num_blocks, max_concurrent_tokens=max_tokens, tokens_per_frame=tpf,
        context_length=config.max_token, max_new_tokens=max_new_tokens, max_frames_per_question=max_frames,
        fits=reason is None, reason=reason,
    )


def kv_bytes_per_token(llama: LlamaConfig, dtype: torch.dtype) -> int:
    """Keys and values of one position, every layer."""
    head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads
    return (2 * llama.num_hidden_layers * llama.num_key_value_heads * head_dim
            * torch.tensor([], dtype=dtype).element_size())


def _on_meta(build) -> nn.Module:
    with torch.device("meta"):
        return build()


def _module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in module.parameters())


def _llm_bytes(config: LlamaVidConfig, dtype: torch.dtype, quantization: str) -> int:
    llm = _on_meta(lambda: LlamaForCausalLM(config.llama_config()))
    if quantization == "none":
        return _module_bytes(llm, dtype)
    # bitsandbytes quantizes the decoder layers' linear weights; embeddings, norms and lm_head stay.
    per_weight = QUANTIZED_BYTES[quantization]
    quantized = sum(m.weight.numel() for m in llm.model.layers.modules() if isinstance(m, nn.Linear))
    return (int(quantized * per_weight) + _module_bytes(llm, dtype)
            - quantized * torch.tensor([], dtype=dtype).element_size())


def _eva_tower(config: LlamaVidConfig, image_size: int,
               dims: tuple[int, int, int, int] | None) -> EvaVisionTower:
    """EVA's shape: from the tower file's tensor shapes (memory-mapped, not read) or, without the
    file, LAVIS' EVA-G for a 1408-wide checkpoint."""
    path = config.vision_tower_path
    if dims is not None:
        width, depth, mlp, patch = dims
    elif path.is_file():
        width, depth, mlp, patch = lavis_dims(load_torch_file(path), str(path))
    elif config.mm_hidden_size == EVA_G_WIDTH:
        width, depth, mlp, patch = EVA_G_WIDTH, EVA_G_DEPTH, 6144, 14
    else:
        raise FileNotFoundError(f"{path} is missing and a {config.mm_hidden_size}-wide tower is not EVA-G: "
                                "its size is unknown (pass the tower's path)")
    return _on_meta(lambda: EvaVisionTower(eva_config(width, depth, mlp, image_size, patch)))


def _crop_size(config: LlamaVidConfig) -> int:
    from .preprocess import ClipPreprocessor

    try:
        return ClipPreprocessor.from_dir(config.image_processor_path).crop_size
    except (OSError, ValueError):
        return 224


def host_memory_bytes() -> int:
    """This machine's RAM (the "device" of a CPU deployment)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_bytes(text: str) -> int:
    """``24GiB``, ``24GB`` (read as GiB, as GPU vendors print it), ``512MiB`` or a plain number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(float(value))


