"""Loading the model a worker serves, from settings: first its memory plan, then the weights, then its card.

The plan (``model.memory``) is worked out from the checkpoint's config before any weight is read;
one that does not fit the device stops the process there, with the plan in the message, rather
than on the first question.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model import demo
from model.config import LlamaVidConfig
from model.llama_vid import LlamaVid
from model.loader import default_dtype, load_llamavid, resolve_model_dir
from model.memory import GiB, MemoryPlan, host_memory_bytes, plan_memory

from ..engine.protocol import ModelCard
from ..settings import Settings

log = logging.getLogger(__name__)

BANNER = "=" * 78
CPU_KV_CACHE_BYTES = 1 * GiB  # a CPU's "device memory" is the host's: take a modest share unless told


class PlanError(RuntimeError):
    """The model does not fit the device as configured; the message holds the plan."""


def resolve_device(setting: str | None) -> torch.device:
    if setting:
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_for(settings: Settings, *, hot_tier: bool = False) -> MemoryPlan:
    """The memory plan of ``settings`` on its device (``hot_tier``: this process keeps the feature hot
    tier, which counts when it lives on the GPU)."""
    device = resolve_device(settings.device)
    model_dir = resolve_model_dir(settings.model or demo.default_model_dir())
    config = LlamaVidConfig.from_dir(model_dir, vision_tower=settings.vision_tower,
                                     image_processor=settings.image_processor)
    if device.type == "cuda":
        total, kv = torch.cuda.get_device_properties(device).total_memory, settings.kv_cache_bytes
    else:
        total, kv = host_memory_bytes(), settings.kv_cache_bytes or CPU_KV_CACHE_BYTES
    return plan_memory(
        config, device_bytes=total, utilization=settings.gpu_memory_utilization,
        dtype=getattr(torch, settings.dtype) if settings.dtype else default_dtype(device),
        quantization=settings.quantization, kv_cache_bytes=kv,
        hot_tier_bytes=(settings.cache_bytes
                        if hot_tier and settings.hot_tier_on_gpu and device.type == "cuda" else 0),
        asr_bytes=asr_weight_bytes(settings.asr_model) if device.type == "cuda" else 0,
        encode_batch=settings.encode_batch, prefill_chunk=settings.prefill_chunk,
        max_running=settings.max_running,
        max_new_tokens=settings.max_tokens_limit, block_size=settings.block_size,
    )


def asr_weight_bytes(model_dir: str | None) -> int:
    """What a Whisper folder's weights take on a GPU (fp16): half their size on disk if stored in
    fp32, as most are; the size itself for fp16 files, which is the larger, safe guess."""
    if not model_dir:
        return 0
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise PlanError(f"--asr-model {model_dir}: not a model folder (no config.json); give a local Whisper "
                        "folder in the Hugging Face layout")
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def check_plan(plan: MemoryPlan, model: str | None) -> None:
    if not plan.fits:
        raise PlanError(f"{model or 'the demo model'} does not fit this device as configured: {plan.reason}\n"
                        f"{plan.table()}\n(see `llamavid plan --help`: --quantization 4bit, "
                        "--max-tokens-limit, --kv-cache-bytes, --gpu-memory-utilization)")


def load_model(settings: Settings, *, hot_tier: bool = False) -> tuple[LlamaVid, ModelCard, MemoryPlan]:
    plan = plan_for(settings, hot_tier=hot_tier)
    check_plan(plan, settings.model)
    log.info("memory plan:\n%s", plan.table())
    model_dir = settings.model or str(demo.default_model_dir())
    device = resolve_device(settings.device)
    dtype = getattr(torch, settings.dtype) if settings.dtype else None
    model = load_llamavid(
        model_dir, device=device, dtype=dtype, vision_tower=settings.vision_tower,
        image_processor=settings.image_processor, qformer_tokenizer=settings.qformer_tokenizer,
        quantization=settings.quantization,
    )
    demo_kind = _demo_kind(model_dir)
    if demo_kind == "random":
        log.warning("\n%s\n  NO MODEL GIVEN: serving a tiny RANDOM LLaMA-VID (%s).\n  Its answers are noise. "
                    "Start with --model DIR (or LLAMAVID_MODEL) for real answers.\n%s",
                    BANNER, model_dir, BANNER)
    elif demo_kind == "trained":
        log.warning("\n%s\n  NO MODEL GIVEN: serving the bundled demo model (%s),\n  trained on synthetic "
                    "coloured-shape videos only. Use --model DIR for a real LLaMA-VID.\n%s",
                    BANNER, model_dir, BANNER)
    return model, describe(model, model_dir, plan, asr=settings.asr_model is not None), plan


def describe(model: LlamaVid, model_dir: str | Path, plan: MemoryPlan, *, asr: bool = False) -> ModelCard:
    """The card ``/v1/models`` shows and workers advertise."""
    demo_kind = _demo_kind(str(model_dir))
    return ModelCard(
        id=_model_id(str(model_dir), demo_kind), path=str(model_dir), demo=demo_kind,
        tokens_per_frame=model.tokens_per_frame(), context_length=model.context_length,
        device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
        kv_positions=(plan.num_blocks - 1) * plan.block_size, long_video=bool(model.config.long_video),
        asr=asr,
    )


def _model_id(model_dir: str, demo_kind: str | None) -> str:
    """The folder's name, except for the bundled demo, whose folder is just ``checkpoint``."""
    if demo_kind == "trained" and Path(model_dir).resolve() == demo.SHIPPED_DIR.resolve():
        return demo.TRAINED_DEMO_KIND
    return Path(model_dir).name or str(model_dir)


def _demo_kind(model_dir: str) -> str | None:
    """"random" for the generated noise model, "trained" for the bundled synthetic-shapes demo."""
    if demo.is_demo_model(model_dir):
        return "random"
    return "trained" if demo.is_trained_demo(model_dir) else None
