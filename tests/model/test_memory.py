"""The memory plan: worked out from ``config.json`` alone, and right about what loading will take."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.config import LlamaVidConfig
from model.loader import load_llamavid
from model.memory import GiB, parse_bytes, plan_memory
from server.cli import main as cli_main

VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "vocab_size": 32000, "max_token": 4096, "compress_type": "mean",
             "mm_hidden_size": 1408, "mm_projector_type": "mlp2x_gelu", "bert_type": "qformer_pretrain",
             "num_query": 32}
VICUNA_13B = {**VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40}
LONG_VIDEO_7B = {**VICUNA_7B, "max_token": 65536, "rope_scaling": {"type": "linear", "factor": 16.0}}


def released(raw: dict, folder: Path) -> LlamaVidConfig:
    """A released checkpoint's config.json, alone: no weights, no EVA file, no processor."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "llava"}))
    return LlamaVidConfig.from_dir(folder)


def test_a_7b_video_model_fits_a_24_gb_card_with_room_for_eight_questions(tmp_path: Path) -> None:
    plan = plan_memory(released(VICUNA_7B, tmp_path), device_bytes=24 * GiB, max_new_tokens=512)
    assert plan.fits, plan.table()
    assert plan.parts["llm"] / GiB == pytest.approx(12.55, abs=0.01)  # Vicuna-7B in fp16
    assert plan.parts["eva"] / GiB == pytest.approx(1.84, abs=0.01)  # EVA-G, 39 blocks
    assert plan.kv_bytes_per_token == 2 * 32 * 4096 * 2
    assert 4 * GiB < plan.kv_cache_bytes < 8 * GiB
    assert plan.questions_at_once(300) >= 8


def test_a_13b_model_is_refused_on_24_gb_and_fits_in_4bit(tmp_path: Path) -> None:
    config = released(VICUNA_13B, tmp_path)
    full = plan_memory(config, device_bytes=24 * GiB)
    assert not full.fits and "weights" in full.reason and full.kv_cache_bytes == 0
    quantized = plan_memory(config, device_bytes=24 * GiB, quantization="4bit")
    assert quantized.fits and quantized.weights_bytes < full.weights_bytes / 2.5
    assert quantized.questions_at_once(300) >= 8


def test_the_long_video_model_reserves_for_its_context(tmp_path: Path) -> None:
    short = plan_memory(released(VICUNA_7B, tmp_path / "short"), device_bytes=80 * GiB)
    long = plan_memory(released(LONG_VIDEO_7B, tmp_path / "long"), device_bytes=80 * GiB)
    assert long.context_length == 65536 and long.activation_bytes > short.activation_bytes + GiB
    assert long.max_frames_per_question > 10 * short.max_frames_per_question


def test_a_given_kv_size_is_used_or_refused(tmp_path: Path) -> None:
    config = released(VICUNA_7B, tmp_path)
    assert plan_memory(config, device_bytes=80 * GiB, kv_cache_bytes=2 * GiB).kv_cache_bytes == 2 * GiB
    too_big = plan_memory(config, device_bytes=24 * GiB, kv_cache_bytes=20 * GiB)
    assert not too_big.fits and "does not fit beside the weights" in too_big.reason
    too_small = plan_memory(config, device_bytes=80 * GiB, kv_cache_bytes=1 << 20)
    assert not too_small.fits and "not even a one-frame question" in too_small.reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_weights_are_what_loading_takes(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    plan = plan_memory(LlamaVidConfig.from_dir(tiny_checkpoint), device_bytes=8 * GiB, dtype=dtype,
                       kv_cache_bytes=1 << 24)
    model = load_llamavid(tiny_checkpoint, device="cpu", dtype=dtype)
    loaded = {name: sum(p.numel() * p.element_size() for p in part.parameters())
              for name, part in (("llm", model.llm), ("eva", model.vision), ("qformer", model.qformer),
                                 ("head", model.visual))}
    assert plan.parts == loaded
    assert plan.tokens_per_frame == model.tokens_per_frame()


def test_the_plan_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "llama-vid-7b"
    released(VICUNA_7B, folder)
    assert cli_main(["plan", "--model", str(folder), "--gpu-memory", "24GiB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("weights_bytes", "kv_cache_bytes", "kv_bytes_per_token", "max_concurrent_tokens",
                "max_frames_per_question", "fits"):
        assert key in plan
    assert plan["fits"] is True and plan["max_concurrent_tokens"] > 8 * 1200
    shutil.rmtree(folder)
    released(VICUNA_13B, folder)
    assert cli_main(["plan", "--model", str(folder), "--gpu-memory", "24GB", "--text"]) == 1
    assert "fits" in capsys.readouterr().out


def test_sizes_parse_as_people_write_them() -> None:
    assert parse_bytes("24GiB") == parse_bytes("24GB") == parse_bytes("24g") == 24 * GiB
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("1048576") == 1 << 20
