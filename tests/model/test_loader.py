"""Loading checkpoints: every weight layout, path resolution, and errors that name the culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import CheckpointError
from model.conversation import Message
from model.generate import GenerationParams
from model.llama_vid import VisualInput
from model.loader import load_llamavid
from model.tools.tiny import make_tiny
from tests.model.checkpoints import all_weights, clone, edit_config, edit_weights, weight_files


def fingerprint(model, frames: np.ndarray) -> dict[str, torch.Tensor]:
    """Outputs that depend on every part of the model: EVA features, visual tokens, LLM logits."""
    features = model.encode_frames(model.preprocess(frames))
    prepared = model.prepare([Message("user", "What is the man doing?")], VisualInput(features))
    with torch.inference_mode():
        logits = model.llm(inputs_embeds=prepared.inputs_embeds).logits[0, -1]
    return {"features": features, "embeds": prepared.inputs_embeds, "logits": logits}


def assert_same_model(a, b) -> None:
    for name, module_a, module_b in (("vision", a.vision, b.vision), ("qformer", a.qformer, b.qformer),
                                     ("visual", a.visual, b.visual), ("llm", a.llm, b.llm)):
        sa, sb = module_a.state_dict(), module_b.state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


# -- weight layouts --------------------------------------------------------------------------------
LAYOUTS = {
    "bin-sharded": ("bin", 3, ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00003.bin",
                               "pytorch_model-00003-of-00003.bin"]),
    "bin-single": ("bin", 1, ["pytorch_model.bin"]),
    "safetensors-single": ("safetensors", 1, ["model.safetensors"]),
    "safetensors-sharded": ("safetensors", 3, ["model.safetensors.index.json", "model-00001-of-00003.safetensors",
                                               "model-00003-of-00003.safetensors"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_weight_layout_loads_the_same_model(layout: str, tiny_checkpoint: Path, tiny_model, tiny_frames,
                                                  tmp_path: Path) -> None:
    fmt, shards, expected_files = LAYOUTS[layout]
    out = make_tiny(tmp_path / layout, "tiny", fmt=fmt, num_shards=shards)
    names = {p.name for p in out.iterdir()}
    assert set(expected_files) <= names
    other = "safetensors" if fmt == "bin" else "bin"
    assert not any(n.endswith("." + other) for n in names)
    if shards > 1:
        index = json.loads((out / expected_files[0]).read_text())
        assert len(set(index["weight_map"].values())) == shards
    model = load_llamavid(out)
    # Same seed, same bf16 tensors: every layout gives exactly the model of the reference fixture.
    assert_same_model(model, tiny_model)
    ours, ref = fingerprint(model, tiny_frames), fingerprint(tiny_model, tiny_frames)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


def test_loaded_weights_are_the_checkpoint_tensors(tiny_checkpoint: Path, tiny_model) -> None:
    """Spot-check the routing: checkpoint bf16 values end up in the module that owns them."""
    w = all_weights(tiny_checkpoint)
    pairs = {
        "model.vlm_att_query": tiny_model.visual.query,
        "model.vlm_att_val_projector.weight": tiny_model.visual.context_projector.weight,
        "model.mm_projector.0.weight": tiny_model.visual.content_projector[0].weight,
        "model.vlm_att_encoder.bert.embeddings.LayerNorm.weight": tiny_model.qformer.embeddings.layernorm.weight,
        "model.layers.1.mlp.down_proj.weight": tiny_model.llm.model.layers[1].mlp.down_proj.weight,
        "lm_head.weight": tiny_model.llm.lm_head.weight,
    }
    for key, param in pairs.items():
        assert torch.equal(param, w[key].float()), key
    # The vision tower comes from eva_vit_g.pth (fp32), not from the bf16 copy inside the shards.
    eva = torch.load(tiny_checkpoint / "eva_vit_g.pth", weights_only=True)
    assert torch.equal(tiny_model.vision.encoder.layers[0].self_attn.qkv.weight, eva["blocks.0.attn.qkv.weight"])
    assert not torch.equal(eva["blocks.0.attn.qkv.weight"],
                           w["model.vision_tower.vision_tower.blocks.0.attn.qkv.weight"].float())


def test_copied_vision_tower_is_ignored(tiny_checkpoint: Path, tiny_model, tmp_path: Path) -> None:
    """Garbage in the checkpoint's vision-tower copy changes nothing (the official loader ignores it)."""
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    key = "model.vision_tower.vision_tower.pos_embed"
    edit_weights(ckpt, lambda s: s.__setitem__(key, torch.full_like(s[key], 7.0)), holding=key)
    pos = tiny_model.vision.embeddings.position_embedding
    assert torch.equal(load_llamavid(ckpt).vision.embeddings.position_embedding, pos)


def test_persisted_rotary_inv_freq_is_dropped(tiny_checkpoint: Path, tiny_model, tiny_frames, tmp_path: Path) -> None:
    """transformers 4.31 saved ``rotary_emb.inv_freq``; the loader must accept and ignore it."""
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")

    def add(state):
        for i in range(2):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.full((8,), 3.0, dtype=torch.bfloat16)

    edit_weights(ckpt, add)
    model = load_llamavid(ckpt)
    ours, ref = fingerprint(model, tiny_frames), fingerprint(tiny_model, tiny_frames)
    assert torch.equal(ours["logits"], ref["logits"])


# -- paths -----------------------------------------------------------------------------------------
def test_relative_paths_resolve_against_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["mm_vision_tower"] == "./eva_vit_g.pth" and raw["image_processor"] == "./processor"
    monkeypatch.chdir(tmp_path)  # not the working directory, as the official loader did
    model = load_llamavid(tiny_checkpoint)
    assert model.config.vision_tower_path == tiny_checkpoint / "eva_vit_g.pth"
    assert model.config.image_processor_path == tiny_checkpoint / "processor"


def test_official_relative_paths_fall_back_to_the_basename(tiny_checkpoint: Path, tiny_model, tmp_path: Path,
                                                           monkeypatch) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "towers").mkdir()
    shutil.move(ckpt / "eva_vit_g.pth", ckpt / "towers" / "eva_vit_g.pth")
    # A relative path that exists inside the folder is used as is; a training-repo path such as
    # ./model_zoo/LAVIS/eva_vit_g.pth falls back to the file's basename in the folder.
    edit_config(ckpt, mm_vision_tower="./towers/eva_vit_g.pth", image_processor="./model_zoo/OpenAI/processor")
    monkeypatch.chdir(tmp_path)
    model = load_llamavid(ckpt)
    assert model.config.vision_tower_path == ckpt / "towers" / "eva_vit_g.pth"
    assert model.config.image_processor_path == ckpt / "processor"
    assert torch.equal(model.vision.embeddings.position_embedding, tiny_model.vision.embeddings.position_embedding)


def test_absolute_paths(tiny_checkpoint: Path, tiny_model, tiny_frames, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    elsewhere = tmp_path / "zoo"
    elsewhere.mkdir()
    shutil.move(ckpt / "eva_vit_g.pth", elsewhere / "eva.pth")
    shutil.move(ckpt / "processor", elsewhere / "clip")
    edit_config(ckpt, mm_vision_tower=str(elsewhere / "eva.pth"), image_processor=str(elsewhere / "clip"))
    model = load_llamavid(ckpt)
    assert model.config.vision_tower_path == elsewhere / "eva.pth"
    ours, ref = fingerprint(model, tiny_frames), fingerprint(tiny_model, tiny_frames)
    assert torch.equal(ours["logits"], ref["logits"])


def test_caller_overrides_win(tiny_checkpoint: Path, tiny_model, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    elsewhere = tmp_path / "zoo"
    elsewhere.mkdir()
    shutil.move(ckpt / "eva_vit_g.pth", elsewhere / "eva.pth")
    shutil.copytree(ckpt / "processor", elsewhere / "clip-84", copy_function=shutil.copyfile)
    cfg = json.loads((elsewhere / "clip-84" / "preprocessor_config.json").read_text())
    (elsewhere / "clip-84" / "preprocessor_config.json").write_text(json.dumps({**cfg, "size": 84, "crop_size": 84}))
    # config.json still points at the (now missing) ./eva_vit_g.pth and the 56 px ./processor.
    with pytest.raises(CheckpointError, match="eva_vit_g.pth"):
        load_llamavid(ckpt)
    model = load_llamavid(ckpt, vision_tower=elsewhere / "eva.pth", image_processor=elsewhere / "clip-84")
    assert model.config.vision_tower_path == elsewhere / "eva.pth"
    assert model.processor.crop_size == 84 and model.vision.config.image_size == 84
    # As strings too (what the CLI passes).
    model = load_llamavid(ckpt, vision_tower=str(elsewhere / "eva.pth"))
    assert model.processor.crop_size == 56
    assert torch.equal(model.vision.embeddings.position_embedding, tiny_model.vision.embeddings.position_embedding)


def test_bundled_processor_aliases(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Released configs name processors of the training repo; the two official ones are bundled."""
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    shutil.rmtree(ckpt / "processor")
    edit_config(ckpt, image_processor="./llamavid/processor/clip-patch14-336")
    model = load_llamavid(ckpt)
    assert (model.processor.size, model.processor.crop_size) == (336, 336)
    assert model.vision.embeddings.position_embedding.shape[1] == 1 + 24 * 24  # 56 px tower interpolated to the 336 grid


# -- missing files ---------------------------------------------------------------------------------
def _remove(ckpt: Path, name: str) -> None:
    path = ckpt / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("config.json", "config.json"),
        ("pytorch_model-00002-of-00002.bin", "pytorch_model-00002-of-00002.bin"),
        ("eva_vit_g.pth", "eva_vit_g.pth"),
        ("tokenizer.model", "tokenizer.model"),
        ("processor", "processor"),
    ],
)
def test_missing_file_is_named(missing: str, named: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    _remove(ckpt, missing)
    with pytest.raises(CheckpointError) as info:
        load_llamavid(ckpt)
    assert named in str(info.value)


def test_no_weights_at_all(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    for path in weight_files(ckpt):
        path.unlink()
    (ckpt / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_llamavid(ckpt)


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope"):
        load_llamavid(tmp_path / "nope")


# -- tensors that do not fit -----------------------------------------------------------------------
def test_unexpected_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    edit_weights(ckpt, lambda s: s.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(4, 4)))
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.0\.mlp\.extra_proj\.weight"):
        load_llamavid(ckpt)


def test_tensor_no_rule_claims_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    edit_weights(ckpt, lambda s: s.__setitem__("text_projection.weight", torch.zeros(4, 4)))
    with pytest.raises(CheckpointError, match="text_projection.weight"):
        load_llamavid(ckpt)


@pytest.mark.parametrize(
    ("official", "named"),
    [
        ("model.vlm_att_key_projector.weight", "key_projector.weight"),
        ("model.vlm_att_encoder.bert.encoder.layer.1.output_query.dense.bias", "layer.1.output_query.dense.bias"),
        ("model.layers.1.post_attention_layernorm.weight", "layers.1.post_attention_layernorm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_missing_tensor_is_named(official: str, named: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    edit_weights(ckpt, lambda s: s.pop(official), holding=official)
    with pytest.raises(CheckpointError, match=r"missing.*" + named.replace(".", r"\.")):
        load_llamavid(ckpt)


def test_wrong_shape_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    key = "model.mm_projector.0.weight"
    edit_weights(ckpt, lambda s: s.__setitem__(key, s[key][:, :-1].clone()), holding=key)
    with pytest.raises(CheckpointError, match=r"content_projector\.0\.weight.*shape"):
        load_llamavid(ckpt)


def test_tensor_in_two_shards_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    first, second = weight_files(ckpt)
    key = next(iter(torch.load(first, weights_only=True)))
    other = next(iter(torch.load(second, weights_only=True)))
    edit_weights(ckpt, lambda s: s.__setitem__(key, torch.zeros(1)), holding=other)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_llamavid(ckpt)


def test_wrong_qformer_vocabulary(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = clone(tiny_checkpoint, tmp_path / "ckpt")
    vocab = ckpt / "qformer_tokenizer" / "vocab.txt"
    vocab.write_text(vocab.read_text() + "extraword\n")
    with pytest.raises(CheckpointError, match="Q-Former tokenizer"):
        load_llamavid(ckpt)


def test_nothing_left_on_meta(tiny_model) -> None:
    for name, tensor in list(tiny_model.named_parameters()) + list(tiny_model.named_buffers()):
        assert not tensor.is_meta, name
        assert tensor.dtype == torch.float32 or not tensor.is_floating_point(), name


# -- the generator's presets ----------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_preset_round_trip(preset: str, tmp_path: Path) -> None:
    out = make_tiny(tmp_path / preset, preset, fmt="safetensors", num_shards=2)
    model = load_llamavid(out)
    size = model.processor.crop_size
    frames = np.random.default_rng(0).integers(0, 256, (2, size + 10, size + 30, 3), dtype=np.uint8)
    features = model.encode_frames(model.preprocess(frames))
    assert features.shape == (2, 1 + (size // 14) ** 2, model.config.mm_hidden_size)
    prepared = model.prepare([Message("user", "What happens in the video?")], VisualInput(features))
    assert prepared.num_visual_tokens == 2 * 2
    deltas = list(model.stream(prepared, GenerationParams(max_new_tokens=4)))
    assert deltas[-1].finish_reason in ("stop", "length") and 1 <= len(deltas) <= 4
