"""EVA-ViT: the LAVIS block written out, and ``pos_embed`` interpolation between input sizes (spec §2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.conversation import Message
from model.generate import GenerationParams
from model.llama_vid import VisualInput
from model.loader import load_llamavid
from model.vision import EvaVisionTower
from server.cli import main as cli_main


def lavis_forward(tower: EvaVisionTower, pixels: torch.Tensor) -> torch.Tensor:
    """The official block: q/v bias but no k bias, q scaled by 88^-0.5 *before* q @ k^T, exact GELU."""
    x = F.conv2d(pixels, tower.patch_embed.proj.weight, tower.patch_embed.proj.bias, stride=tower.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((tower.cls_token.expand(len(x), -1, -1), x), 1) + tower.pos_embed
    heads = tower.width // 88
    for blk in tower.blocks:
        h = F.layer_norm(x, (tower.width,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
        a = blk.attn
        bias = torch.cat((a.q_bias, torch.zeros_like(a.v_bias), a.v_bias))
        qkv = (h @ a.qkv.weight.T + bias).reshape(len(x), -1, 3, heads, 88).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * 88**-0.5, qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        h = (att @ v).transpose(1, 2).reshape(len(x), -1, tower.width)
        x = x + a.proj(h)
        h = F.layer_norm(x, (tower.width,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
        x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))
    return x


def test_eva_matches_the_lavis_block(tiny_model, tiny_frames) -> None:
    pixels = tiny_model.preprocess(tiny_frames)
    ours = tiny_model.encode_frames(pixels)
    with torch.inference_mode():
        ref = lavis_forward(tiny_model.vision, pixels)
    assert ours.shape == (3, 17, tiny_model.vision.width)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_encode_frames_batching_is_exact(tiny_model, tiny_frames) -> None:
    pixels = tiny_model.preprocess(tiny_frames)
    torch.testing.assert_close(tiny_model.encode_frames(pixels, batch_size=1), tiny_model.encode_frames(pixels))
    assert tiny_model.encode_frames(pixels[:0]).shape == (0, 17, tiny_model.vision.width)


def test_wrong_input_size_is_rejected(tiny_model) -> None:
    with pytest.raises(ValueError, match="56"):
        tiny_model.encode_frames(torch.zeros(1, 3, 84, 84))


def _processor(folder: Path, size: int, template: Path) -> Path:
    folder.mkdir()
    cfg = json.loads((template / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**cfg, "size": size, "crop_size": size}))
    return folder


def hand_interpolate(pos_embed: torch.Tensor, new: int) -> torch.Tensor:
    old = int((pos_embed.shape[1] - 1) ** 0.5)
    c = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].float().reshape(old, old, c).permute(2, 0, 1)[None]  # row-major patches
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat((pos_embed[:, :1].float(), grid[0].permute(1, 2, 0).reshape(1, new * new, c)), 1)


def test_pos_embed_interpolated_for_a_larger_processor(tiny_checkpoint: Path, tiny_frames, tmp_path: Path) -> None:
    """A 56 px (4x4) tower with an 84 px processor: bicubic fp32 to 6x6, CLS row untouched."""
    proc = _processor(tmp_path / "clip-84", 84, tiny_checkpoint / "processor")
    model = load_llamavid(tiny_checkpoint, image_processor=proc)
    file_pos = torch.load(tiny_checkpoint / "eva_vit_g.pth", weights_only=True)["pos_embed"]
    assert file_pos.shape[1] == 1 + 16
    assert model.vision.pos_embed.shape == (1, 1 + 36, file_pos.shape[-1])
    torch.testing.assert_close(model.vision.pos_embed.data, hand_interpolate(file_pos, 6), rtol=0, atol=0)
    assert torch.equal(model.vision.pos_embed[:, 0], file_pos[:, 0])
    features = model.encode_frames(model.preprocess(tiny_frames))
    assert features.shape == (3, 37, file_pos.shape[-1])
    # 36 patches + CLS = 37 is odd, so the visual head still drops CLS; mean -> 2 tokens per frame.
    assert model.frame_tokens(features, "what?").tokens.shape[0] == 6


def test_interpolation_keeps_a_constant_field_and_orientation() -> None:
    """Independent of F.interpolate: a constant grid stays constant, a column ramp stays a column ramp."""
    from model.vision import interpolate_pos_embed

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


def test_make_tiny_image_size_round_trip(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny-84"
    assert cli_main(["make-tiny", str(out), "--image-size", "84", "--compress", "grid:2", "--shards", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "processor" / "preprocessor_config.json").read_text())["crop_size"] == 84
    assert json.loads((out / "config.json").read_text())["compress_type"] == "grid:2"
    model = load_llamavid(out)
    file_pos = torch.load(out / "eva_vit_g.pth", weights_only=True)["pos_embed"]
    assert file_pos.shape[1] == 37 and torch.equal(model.vision.pos_embed.data, file_pos)  # no interpolation
    frames = np.random.default_rng(3).integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)
    features = model.encode_frames(model.preprocess(frames))
    assert features.shape[:2] == (2, 37)
    prepared = model.prepare([Message("user", "what is shown?")], VisualInput(features))
    assert prepared.num_visual_tokens == 2 * (1 + 4)  # grid:2 over 6x6 patches: stride 3, 2x2 blocks
    deltas = list(model.stream(prepared, GenerationParams(max_new_tokens=3)))
    assert deltas[-1].finish_reason is not None


def test_tower_from_a_smaller_processor(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Interpolation also goes down (84 px file, 56 px processor given by the caller)."""
    out = tmp_path / "tiny-84"
    cli_main(["make-tiny", str(out), "--image-size", "84", "--shards", "1"])
    shutil.rmtree(out / "processor")
    model = load_llamavid(out, image_processor=tiny_checkpoint / "processor")
    file_pos = torch.load(out / "eva_vit_g.pth", weights_only=True)["pos_embed"]
    torch.testing.assert_close(model.vision.pos_embed.data, hand_interpolate(file_pos, 4), rtol=0, atol=0)
