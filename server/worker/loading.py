"""Loading the model a worker serves, from settings, and describing it (the model card)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model import demo
from model.llama_vid import LlamaVid
from model.loader import load_llamavid

from ..engine.protocol import ModelCard
from ..settings import Settings

log = logging.getLogger(__name__)

BANNER = "=" * 78


def resolve_device(setting: str | None) -> torch.device:
    if setting:
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(settings: Settings) -> tuple[LlamaVid, ModelCard]:
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
                    "Start with --model DIR (or LLAMAVID_MODEL) for real answers.\n%s", BANNER, model_dir, BANNER)
    elif demo_kind == "trained":
        log.warning("\n%s\n  NO MODEL GIVEN: serving the bundled demo model (%s),\n  trained on synthetic "
                    "coloured-shape videos only. Use --model DIR for a real LLaMA-VID.\n%s", BANNER, model_dir, BANNER)
    return model, describe(model, model_dir)


def describe(model: LlamaVid, model_dir: str | Path) -> ModelCard:
    """The card ``/v1/models`` shows and workers advertise."""
    demo_kind = _demo_kind(str(model_dir))
    return ModelCard(
        id=_model_id(str(model_dir), demo_kind), path=str(model_dir), demo=demo_kind,
        tokens_per_frame=model.tokens_per_frame(), context_length=model.context_length,
        device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
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
