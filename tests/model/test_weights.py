"""``CHECKPOINT_RENAMES``: official checkpoint names <-> our module paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import CheckpointError
from model.weights import official_key, rename_key
from tests.model.checkpoints import all_weights

DROPPED_ON_PURPOSE = (
    "model.vision_tower.vision_tower.cls_token",
    "model.vision_tower.vision_tower.blocks.0.attn.qkv.weight",
    "model.layers.0.self_attn.rotary_emb.inv_freq",
    "model.layers.31.self_attn.rotary_emb.inv_freq",
    "model.vlm_att_encoder.bert.embeddings.position_ids",
)


def test_round_trip_over_every_checkpoint_key(tiny_checkpoint: Path) -> None:
    keys = list(all_weights(tiny_checkpoint))
    assert any(k.startswith("model.vision_tower.") for k in keys), "the generator writes the tower copy"
    kept = 0
    for key in keys:
        ours = rename_key(key)
        if ours is None:
            dropped = ("rotary_emb.inv_freq", "embeddings.position_ids")
            assert key.startswith("model.vision_tower.") or key.endswith(dropped)
            continue
        assert official_key(ours) == key
        kept += 1
    assert kept > 0.5 * len(keys)


def test_round_trip_over_every_module_path(tiny_model) -> None:
    for prefix, module in (("qformer.", tiny_model.qformer), ("visual.", tiny_model.visual), ("llm.", tiny_model.llm)):
        for name in module.state_dict():
            assert rename_key(official_key(prefix + name)) == prefix + name


@pytest.mark.parametrize("key", DROPPED_ON_PURPOSE)
def test_dropped_keys(key: str) -> None:
    assert rename_key(key) is None


@pytest.mark.parametrize(
    ("official", "ours"),
    [
        # Q-Former: LAVIS BERT names -> transformers' InstructBLIP Q-Former names (spec §3.4).
        ("model.vlm_att_encoder.bert.embeddings.LayerNorm.weight", "qformer.embeddings.layernorm.weight"),
        ("model.vlm_att_encoder.bert.encoder.layer.3.attention.self.query.weight",
         "qformer.encoder.layer.3.attention.attention.query.weight"),
        ("model.vlm_att_encoder.bert.encoder.layer.2.crossattention.self.key.bias",
         "qformer.encoder.layer.2.crossattention.attention.key.bias"),
        ("model.vlm_att_encoder.bert.encoder.layer.2.crossattention.output.LayerNorm.bias",
         "qformer.encoder.layer.2.crossattention.output.LayerNorm.bias"),
        ("model.vlm_att_encoder.bert.encoder.layer.0.output_query.dense.weight",
         "qformer.encoder.layer.0.output_query.dense.weight"),
        ("model.vlm_att_query", "visual.query"),
        ("model.vlm_att_ln.bias", "visual.qformer_ln.bias"),
        ("model.vlm_att_projector.weight", "visual.query_projector.weight"),
        ("model.vlm_att_key_projector.weight", "visual.key_projector.weight"),
        ("model.vlm_att_val_projector.bias", "visual.context_projector.bias"),
        ("model.mm_projector.2.weight", "visual.content_projector.2.weight"),
        ("model.layers.7.self_attn.q_proj.weight", "llm.model.layers.7.self_attn.q_proj.weight"),
        ("model.embed_tokens.weight", "llm.model.embed_tokens.weight"),
        ("lm_head.weight", "llm.lm_head.weight"),
    ],
)
def test_known_names(official: str, ours: str) -> None:
    assert rename_key(official) == ours
    assert official_key(ours) == official


def test_unknown_key_is_named() -> None:
    with pytest.raises(CheckpointError, match="vision_model.encoder.weight"):
        rename_key("vision_model.encoder.weight")
    # A prefix match must be a whole name component: "model.vlm_att_query_extra" is not the query.
    assert rename_key("model.vlm_att_query_extra") != "visual.query"
