"""Assemble ``LlamaVid`` from a checkpoint folder exactly as released (or a hub id).

One pass over the shards: every tensor is routed by ``CHECKPOINT_RENAMES`` to the LLM, the
Q-Former or the visual head, with strict key checking; the vision tower comes from
``eva_vit_g.pth``. Modules are built with parameters on the meta device (buffers such as RoPE
frequencies are computed for real) so a 7B model is never initialised twice. Optional
bitsandbytes 4/8-bit quantisation of the LLM goes through transformers' own loader instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from accelerate import init_empty_weights

from .config import CheckpointError, LlamaVidConfig
from .eva import load_eva
from .frame_tokens import LlamaVidVisualHead
from .generate import GenerationDefaults
from .llama_vid import LlamaVid
from .preprocess import ClipPreprocessor
from .qformer import QFormerTokenizer, build_qformer
from .tokenizer import LlamaTextTokenizer
from .weights import load_checkpoint_state, load_strict, split_state

log = logging.getLogger(__name__)

Quantization = Literal["none", "4bit", "8bit"]
# Bumped whenever features can change in any bit for the same file and processor, so a cache never
# mixes them: 2 = pixels from transformers' CLIPImageProcessorPil (rounding differs by <= 5e-7).
FINGERPRINT_VERSION = "eva-lavis-2"


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (needs a network)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if "/" in str(model) and not str(model).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(model)))
        except Exception as exc:  # offline, unknown repo, auth ...
            raise CheckpointError(f"{model!r} is not a local folder and could not be downloaded: {exc}") from exc
    raise CheckpointError(f"model folder {model!r} does not exist")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs, as the official code ran; fp32 on CPU, where half precision is slow or missing."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_llamavid(
    model: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    vision_tower: str | os.PathLike | None = None,
    image_processor: str | os.PathLike | None = None,
    qformer_tokenizer: str | os.PathLike | None = None,
    quantization: Quantization = "none",
) -> LlamaVid:
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    model_dir = resolve_model_dir(model)
    config = LlamaVidConfig.from_dir(model_dir, vision_tower=vision_tower, image_processor=image_processor)
    processor = ClipPreprocessor.from_dir(config.image_processor_path)
    tokenizer = LlamaTextTokenizer(model_dir / "tokenizer.model")
    qtok = QFormerTokenizer(QFormerTokenizer.locate(model_dir, qformer_tokenizer))
    if len(qtok) != config.qformer.vocab_size:
        raise CheckpointError(
            f"Q-Former tokenizer has {len(qtok)} tokens (with [DEC]) but the Q-Former's vocabulary is "
            f"{config.qformer.vocab_size}: wrong vocab.txt?"
        )

    state = load_checkpoint_state(model_dir, skip_prefixes=("llm.",) if quantization != "none" else ())
    with init_empty_weights(include_buffers=False):
        qformer = build_qformer(config.qformer, config.mm_hidden_size)
        visual = LlamaVidVisualHead(config)
    load_strict(qformer, split_state(state, "qformer."), dtype=dtype, device=device)
    load_strict(visual, split_state(state, "visual."), dtype=dtype, device=device)
    if quantization == "none":
        from transformers import LlamaForCausalLM

        with init_empty_weights(include_buffers=False):
            llm = LlamaForCausalLM(config.llama_config())
        load_strict(llm, split_state(state, "llm."), dtype=dtype, device=device)
        llm = llm.to(device)  # the buffers (RoPE frequencies) were built on the host
    else:
        llm = _load_quantized_llm(model_dir, config, device, dtype, quantization)
    del state
    llm.eval()

    vision = load_eva(config.vision_tower_path, processor.crop_size, dtype=dtype, device=device)
    fingerprint = encoder_fingerprint(config.vision_tower_path, processor, dtype)
    model = LlamaVid(
        config,
        vision.to(device),
        qformer.to(device).eval(),
        visual.to(device).eval(),
        llm,
        tokenizer,
        qtok,
        processor,
        GenerationDefaults.from_dir(model_dir),
        fingerprint,
    )
    model.requires_grad_(False)  # serving never needs autograd; nothing may build a graph by accident
    log.info("loaded LLaMA-VID from %s on %s (%s, llm %s)", model_dir, device, dtype, quantization)
    return model


def encoder_fingerprint(vision_tower: Path, processor: ClipPreprocessor, dtype: torch.dtype) -> str:
    """What makes two feature tensors comparable: tower weights, pixel pipeline, compute dtype."""
    h = hashlib.sha256()
    with open(vision_tower, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    h.update(repr((FINGERPRINT_VERSION, processor, str(dtype))).encode())
    return h.hexdigest()[:32]


def _load_quantized_llm(model_dir: Path, config: LlamaVidConfig, device: torch.device, dtype, quantization: str):
    if device.type != "cuda":
        raise CheckpointError(f"bitsandbytes {quantization} quantization needs a CUDA device, not {device}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig, LlamaForCausalLM
    except ImportError as exc:
        raise CheckpointError(f"{quantization} quantization needs bitsandbytes and accelerate: {exc}") from exc
    if quantization == "4bit":
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        )
    else:
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    # The checkpoint's LLM keys are transformers' own; the vision/Q-Former/projector keys are
    # reported as unused and skipped, exactly as the official loader skipped them.
    return LlamaForCausalLM.from_pretrained(
        model_dir,
        config=config.llama_config(),
        quantization_config=qconfig,
        dtype=dtype,
        device_map={"": device.index or 0},
    )
