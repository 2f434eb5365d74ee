"""Parsing ``config.json`` as the released checkpoints wrote it (spec §1.3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import CheckpointError, Compression, LlamaVidConfig
from model.loader import load_llamavid
from tests.model.checkpoints import clone, edit_config, read_config

BASE = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 400,
    "bert_type": "qformer_pretrain_freeze",
    "mm_hidden_size": 176,
    "mm_projector_type": "mlp2x_gelu",
}


def parse(**changes) -> LlamaVidConfig:
    raw = {**BASE, **changes}
    return LlamaVidConfig.from_dict({k: v for k, v in raw.items() if v is not ...}, Path("/nonexistent"))


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"num_query": 16}, 16),
        ({"num_qformer": 24}, 24),  # the internal key the released long-video config uses
        ({"num_query": 16, "num_qformer": 24}, 16),  # the public code reads num_query
        ({}, 32),
    ],
)
def test_query_count(keys: dict, expected: int) -> None:
    assert parse(**keys).num_query == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mean", Compression("mean")),
        ("mean_concat", Compression("mean")),  # released long-video config
        ("grid:4", Compression("grid", 4)),
        ("grid:2", Compression("grid", 2)),
        ("mean_grid:3", Compression("grid", 3)),  # "grid" wins over "mean"
        (None, Compression("none")),
    ],
)
def test_compress_type_substring_rules(value, expected: Compression) -> None:
    assert parse(compress_type=value).compression == expected
    assert parse(compress_type=...).compression == Compression("none")  # key absent


@pytest.mark.parametrize("value", ["max", "grid:x"])
def test_compress_type_rejected(value: str) -> None:
    with pytest.raises(CheckpointError, match="compress_type"):
        parse(compress_type=value)


@pytest.mark.parametrize("bert_type", ["raw_bert_layer:2", "qformer", "bert_pretrain"])
def test_bert_type_rejected(bert_type: str) -> None:
    with pytest.raises(CheckpointError, match=bert_type):
        parse(bert_type=bert_type)


@pytest.mark.parametrize("bert_type", ["qformer_pretrain", "qformer_pretrain_freeze", "qformer_pretrain_freeze_all"])
def test_bert_type_accepted(bert_type: str) -> None:
    assert parse(bert_type=bert_type).bert_type == bert_type


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"])
def test_required_llm_keys(key: str) -> None:
    with pytest.raises(CheckpointError, match=key):
        parse(**{key: ...})


def test_released_long_video_config() -> None:
    """The verified released long-video config (spec §1.3), LLM sizes shrunk."""
    cfg = parse(
        compress_type="mean_concat", num_qformer=32, rope_scaling={"factor": 16.0, "type": "linear"},
        max_token=65536, max_position_embeddings=4096, mm_vision_tower="./model_zoo/LAVIS/eva_vit_g.pth",
        image_processor="./model_zoo/OpenAI/clip-vit-large-patch14", fusion_type="attention_concat_all_query",
        cross_att_freq=2, position_type=None, use_raw_query_trans=False, model_type="llava",
    )
    assert cfg.long_video
    assert cfg.num_query == 32 and cfg.compression == Compression("mean") and cfg.max_token == 65536
    rope = cfg.llama_config().rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == 16.0
    assert not parse().long_video and not parse(rope_scaling=None).long_video


def test_unsupported_rope_scaling() -> None:
    with pytest.raises(CheckpointError, match="rope_scaling"):
        parse(rope_scaling={"type": "yarn", "factor": 4.0})


def test_no_config_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        LlamaVidConfig.from_dir(tmp_path)


def test_rope_scaling_is_honoured(tiny_checkpoint: Path, tiny_model, tmp_path: Path) -> None:
    """Same weights, linear x4 RoPE: position 0 is unchanged, every later position differs."""
    scaled_dir = clone(tiny_checkpoint, tmp_path / "scaled")
    edit_config(scaled_dir, rope_scaling={"type": "linear", "factor": 4.0})
    assert read_config(tiny_checkpoint).get("rope_scaling") is None
    scaled = load_llamavid(scaled_dir)
    assert scaled.config.long_video and not tiny_model.config.long_video
    ids = torch.tensor([tiny_model.tokenizer.encode("the man is cooking in the kitchen with a red ball")])
    with torch.inference_mode():
        plain = tiny_model.llm(input_ids=ids).logits[0]
        stretched = scaled.llm(input_ids=ids).logits[0]
    torch.testing.assert_close(stretched[0], plain[0], rtol=1e-5, atol=1e-5)  # rotation angle 0
    gaps = (stretched[1:] - plain[1:]).abs().amax(-1)
    assert bool((gaps > 1e-4).all()), gaps
