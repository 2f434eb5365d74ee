"""EVA-ViT: transformers' InstructBLIP vision model against the LAVIS block, the key map, and
``pos_embed`` interpolation between input sizes (spec §2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import CheckpointError
from model.conversation import Message
from model.eva import eva_from_lavis, interpolate_pos_embed, lavis_parameters, lavis_state_dict, load_eva
from model.generate import GenerationParams
from model.llama_vid import VisualInput
from model.loader import load_llamavid
from model.tools.tiny import TinySpec, make_tiny, random_lavis_state
from tests.model.checkpoints import all_weights

# The order of LAVIS' module (its state_dict, eva_vit_g.pth): what the export and the demo's digests follow.
LAVIS_TOP = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
LAVIS_BLOCK = ["norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
               "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
               "mlp.fc2.bias"]


def lavis_forward(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The official LAVIS tower read straight off its state dict: q/v bias but no k bias, q scaled by
    88^-0.5 *before* q @ k^T, pre-norm blocks with LayerNorm eps 1e-6, exact GELU, no final norm."""
    width = state["cls_token"].shape[-1]
    heads = width // 88
    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                 stride=state["patch_embed.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((state["cls_token"].expand(len(x), -1, -1), x), 1) + state["pos_embed"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        b = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (width,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        bias = torch.cat((b["attn.q_bias"], torch.zeros_like(b["attn.v_bias"]), b["attn.v_bias"]))
        qkv = F.linear(h, b["attn.qkv.weight"], bias).reshape(len(x), -1, 3, heads, 88).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * 88**-0.5, qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        h = (att @ v).transpose(1, 2).reshape(len(x), -1, width)
        x = x + F.linear(h, b["attn.proj.weight"], b["attn.proj.bias"])
        h = F.layer_norm(x, (width,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, b["mlp.fc1.weight"], b["mlp.fc1.bias"])), b["mlp.fc2.weight"],
                         b["mlp.fc2.bias"])
    return x


def random_state(width: int = 176, depth: int = 2, mlp: int = 96, image_size: int = 56, seed: int = 0):
    """A random LAVIS state with non-zero biases and LayerNorm affines, so every term of the block counts."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state = random_lavis_state(TinySpec(eva_width=width, eva_depth=depth, eva_mlp=mlp, image_size=image_size))
        for key, tensor in state.items():
            if key.endswith(("bias", "norm1.weight", "norm2.weight")):
                state[key] = tensor + 0.1 * torch.randn_like(tensor)
    return state


def random_pixels(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_library_tower_is_the_lavis_block() -> None:
    state = random_state()
    tower = eva_from_lavis(state, 56, dtype=torch.float32)
    pixels = random_pixels(3, 56)
    with torch.inference_mode():
        ours = tower(pixel_values=pixels).last_hidden_state
        ref = lavis_forward(state, pixels)
    assert ours.shape == (3, 17, 176)
    # SDPA scales inside its kernel rather than q before q @ k^T: rounding-level differences only.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_loaded_model_runs_the_checkpoints_tower(tiny_model, tiny_checkpoint: Path, tiny_frames) -> None:
    pixels = tiny_model.preprocess(tiny_frames)
    state = torch.load(tiny_checkpoint / "eva_vit_g.pth", weights_only=True)
    with torch.inference_mode():
        ref = lavis_forward(state, pixels)
    torch.testing.assert_close(tiny_model.encode_frames(pixels), ref, rtol=1e-5, atol=1e-5)


def test_key_map_round_trip() -> None:
    state = random_state(depth=3)
    tower = eva_from_lavis(state, 56, dtype=torch.float32)
    back = lavis_state_dict(tower)
    assert list(back) == [*LAVIS_TOP, *(f"blocks.{i}.{k}" for i in range(3) for k in LAVIS_BLOCK)]
    assert set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key
    for layer in tower.encoder.layers:
        assert layer.self_attn.qkv.bias.shape == (3 * 176,)
        assert not layer.self_attn.qkv.bias.chunk(3)[1].any()  # keys get no bias


def test_export_writes_the_lavis_layout(tiny_checkpoint: Path, tiny_model) -> None:
    """``eva_vit_g.pth`` in fp32 and the shards' ignored copy in bf16, both under LAVIS' names and order."""
    eva = torch.load(tiny_checkpoint / "eva_vit_g.pth", weights_only=True)
    assert list(eva) == [*LAVIS_TOP, *(f"blocks.{i}.{k}" for i in range(2) for k in LAVIS_BLOCK)]
    assert {t.dtype for t in eva.values()} == {torch.float32}
    copy = {k.removeprefix("model.vision_tower.vision_tower."): v for k, v in all_weights(tiny_checkpoint).items()
            if k.startswith("model.vision_tower.vision_tower.")}
    assert list(copy) == list(eva)
    assert all(torch.equal(copy[k], eva[k].bfloat16()) for k in eva)
    assert all(torch.equal(t, eva[k]) for k, t in lavis_state_dict(tiny_model.vision).items())


def test_strict_load_names_unknown_and_missing_keys() -> None:
    state = random_state()
    with pytest.raises(CheckpointError, match="unexpected head.weight"):
        eva_from_lavis({**state, "head.weight": torch.zeros(2)}, 56, dtype=torch.float32)
    partial = {k: v for k, v in state.items() if k != "blocks.1.attn.v_bias"}
    with pytest.raises(CheckpointError, match="encoder.layers.1.self_attn.qkv.bias"):
        eva_from_lavis(partial, 56, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="head size 88"):
        eva_from_lavis(random_state(width=100), 56, dtype=torch.float32)


def test_legacy_pickles_load_without_mmap(tmp_path: Path) -> None:
    state = random_state()
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"model": state}, tmp_path / "nested.pth")  # LAVIS' own checkpoints nest the state dict
    for name in ("legacy.pth", "nested.pth"):
        back = lavis_state_dict(load_eva(tmp_path / name, 56))
        assert all(torch.equal(back[k], state[k]) for k in state), name


def test_dtype_is_applied_as_tensors_are_assigned() -> None:
    tower = eva_from_lavis(random_state(), 56, dtype=torch.bfloat16)
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in tower.parameters())


def hand_interpolate(pos_embed: torch.Tensor, new: int) -> torch.Tensor:
    old = int((pos_embed.shape[1] - 1) ** 0.5)
    c = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].float().reshape(old, old, c).permute(2, 0, 1)[None]  # row-major patches
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat((pos_embed[:, :1].float(), grid[0].permute(1, 2, 0).reshape(1, new * new, c)), 1)


def test_a_224_file_loads_at_336_with_its_pos_embed_interpolated_once(tmp_path: Path) -> None:
    """A 16x16-grid file (224 px) for a 336 px processor: bicubic fp32 to 24x24 at load, CLS row untouched."""
    state = random_state(width=88, depth=1, mlp=32, image_size=224)
    assert state["pos_embed"].shape == (1, 1 + 16 * 16, 88)
    torch.save(state, tmp_path / "eva_vit_g.pth")
    tower = load_eva(tmp_path / "eva_vit_g.pth", 336)
    pos = tower.embeddings.position_embedding
    assert pos.shape == (1, 1 + 24 * 24, 88) and tower.num_patches == 24 * 24
    assert torch.equal(pos.data, hand_interpolate(state["pos_embed"], 24))
    assert torch.equal(pos[:, 0], state["pos_embed"][:, 0])
    pixels = random_pixels(1, 336)
    with torch.inference_mode():  # no interpolation at run time: the stored table is used as is
        torch.testing.assert_close(tower(pixel_values=pixels).last_hidden_state,
                                   lavis_forward({**state, "pos_embed": pos.data}, pixels), rtol=1e-5, atol=1e-5)


def test_interpolation_keeps_a_constant_field_and_orientation() -> None:
    """Independent of F.interpolate: a constant grid stays constant, a column ramp stays a column ramp."""
    c = 3
    ramp = torch.arange(4.0).repeat(4)  # value = column index
    pos = torch.stack((torch.full((17,), 5.0), torch.cat((torch.tensor([9.0]), ramp)), torch.ones(17)), -1)[None]
    out = interpolate_pos_embed(pos, 6)
    assert out.shape == (1, 37, c) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0], torch.full((37,), 5.0))
    assert out[0, 0, 1] == 9.0
    grid = out[0, 1:, 1].reshape(6, 6)
    torch.testing.assert_close(grid, grid[:1].expand(6, 6))  # every row identical: columns vary, rows do not
    assert bool((grid[0, 1:] > grid[0, :-1]).all())
    assert interpolate_pos_embed(pos, 4) is pos  # same grid: untouched


def _stand_in(width: int, depth: int, mlp: int = 8) -> dict[str, torch.Tensor]:
    """Every tensor of a LAVIS file as a broadcast view of one number: full-width shapes, bytes of storage."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 17, width), "patch_embed.proj.weight": (width, 3, 14, 14),
              "patch_embed.proj.bias": (width,)}
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.q_bias": (width,), "attn.v_bias": (width,),
             "attn.qkv.weight": (3 * width, width), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
             "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (mlp, width), "mlp.fc1.bias": (mlp,),
             "mlp.fc2.weight": (width, mlp), "mlp.fc2.bias": (width,)}
    shapes |= {f"blocks.{i}.{k}": s for i in range(depth) for k, s in block.items()}
    return {k: torch.zeros(1).expand(s) for k, s in shapes.items()}


@pytest.mark.parametrize(("width", "blocks", "built"), [(1408, 40, 39), (1408, 39, 39), (88, 40, 40)])
def test_eva_g_builds_39_blocks(tmp_path: Path, width: int, blocks: int, built: int) -> None:
    """LAVIS builds 39 blocks of EVA-G and drops any further one in the file; other widths keep them all."""
    torch.save(_stand_in(width, blocks), tmp_path / "eva.pth")
    tower = load_eva(tmp_path / "eva.pth", 56)
    assert len(tower.encoder.layers) == built == tower.config.num_hidden_layers
    assert tower.config.num_attention_heads == width // 88 and tower.config.layer_norm_eps == 1e-6
    assert list(lavis_state_dict(tower))[-1] == f"blocks.{built - 1}.mlp.fc2.bias"


def test_lavis_parameters_train_q_and_v_bias_as_their_own_tensors() -> None:
    state = random_state()
    tower = eva_from_lavis(state, 56, dtype=torch.float32).train()
    pixels = random_pixels(2, 56)
    with lavis_parameters(tower) as params:
        assert len(params) == len(state) and all(p.requires_grad and p.is_leaf for p in params)
        order = [*LAVIS_TOP, *(f"blocks.{i}.{k}" for i in range(2) for k in LAVIS_BLOCK)]
        assert [tuple(p.shape) for p in params] == [tuple(state[k].shape) for k in order]
        tower(pixel_values=pixels).last_hidden_state.square().mean().backward()
        named = dict(zip(order, params))
        q_bias, v_bias = named["blocks.0.attn.q_bias"], named["blocks.0.attn.v_bias"]
        assert q_bias.grad is not None and v_bias.grad is not None
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
    # Back to a plain fused bias, holding the trained q and v bias and a k bias still exactly zero.
    bias = tower.encoder.layers[0].self_attn.qkv.bias
    assert isinstance(bias, torch.nn.Parameter) and not torch.nn.utils.parametrize.is_parametrized(tower)
    assert torch.equal(bias.chunk(3)[0], q_bias) and torch.equal(bias.chunk(3)[2], v_bias)
    assert not bias.chunk(3)[1].any() and not torch.equal(q_bias, state["blocks.0.attn.q_bias"])


def test_encode_frames_batching_is_exact(tiny_model, tiny_frames) -> None:
    pixels = tiny_model.preprocess(tiny_frames)
    torch.testing.assert_close(tiny_model.encode_frames(pixels, batch_size=1), tiny_model.encode_frames(pixels))
    assert tiny_model.encode_frames(pixels[:0]).shape == (0, 17, tiny_model.config.mm_hidden_size)


def test_wrong_input_size_is_rejected(tiny_model) -> None:
    with pytest.raises(ValueError, match="56"):
        tiny_model.encode_frames(torch.zeros(1, 3, 84, 84))


def _processor(folder: Path, size: int, template: Path) -> Path:
    folder.mkdir()
    cfg = json.loads((template / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**cfg, "size": size, "crop_size": size}))
    return folder


def test_pos_embed_interpolated_for_a_larger_processor(tiny_checkpoint: Path, tiny_frames, tmp_path: Path) -> None:
    """A 56 px (4x4) tower with an 84 px processor: bicubic fp32 to 6x6, CLS row untouched."""
    proc = _processor(tmp_path / "clip-84", 84, tiny_checkpoint / "processor")
    model = load_llamavid(tiny_checkpoint, image_processor=proc)
    file_pos = torch.load(tiny_checkpoint / "eva_vit_g.pth", weights_only=True)["pos_embed"]
    assert file_pos.shape[1] == 1 + 16
    pos = model.vision.embeddings.position_embedding
    assert pos.shape == (1, 1 + 36, file_pos.shape[-1])
    assert torch.equal(pos.data, hand_interpolate(file_pos, 6))
    features = model.encode_frames(model.preprocess(tiny_frames))
    assert features.shape == (3, 37, file_pos.shape[-1])
    # 36 patches + CLS = 37 is odd, so the visual head still drops CLS; mean -> 2 tokens per frame.
    assert model.frame_tokens(features, "what?").tokens.shape[0] == 6


def test_make_tiny_image_size_round_trip(tmp_path: Path) -> None:
    out = make_tiny(tmp_path / "tiny-84", "tiny", num_shards=1, compress="grid:2", image_size=84)
    assert json.loads((out / "processor" / "preprocessor_config.json").read_text())["crop_size"] == 84
    assert json.loads((out / "config.json").read_text())["compress_type"] == "grid:2"
    model = load_llamavid(out)
    file_pos = torch.load(out / "eva_vit_g.pth", weights_only=True)["pos_embed"]
    assert file_pos.shape[1] == 37 and torch.equal(model.vision.embeddings.position_embedding.data, file_pos)
    frames = np.random.default_rng(3).integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)
    features = model.encode_frames(model.preprocess(frames))
    assert features.shape[:2] == (2, 37)
    prepared = model.prepare([Message("user", "what is shown?")], VisualInput(features))
    assert prepared.num_visual_tokens == 2 * (1 + 4)  # grid:2 over 6x6 patches: stride 3, 2x2 blocks
    deltas = list(model.stream(prepared, GenerationParams(max_new_tokens=3)))
    assert deltas[-1].finish_reason is not None


def test_tower_from_a_smaller_processor(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Interpolation also goes down (84 px file, 56 px processor given by the caller)."""
    out = make_tiny(tmp_path / "tiny-84", "tiny", num_shards=1, image_size=84)
    shutil.rmtree(out / "processor")
    model = load_llamavid(out, image_processor=tiny_checkpoint / "processor")
    file_pos = torch.load(out / "eva_vit_g.pth", weights_only=True)["pos_embed"]
    assert torch.equal(model.vision.embeddings.position_embedding.data, hand_interpolate(file_pos, 4))
