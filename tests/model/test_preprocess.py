"""The CLIP pixel pipeline: transformers' ``CLIPImageProcessorPil`` against the steps spec §2.5 lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from model.preprocess import ClipPreprocessor, expand_to_square

BUNDLED = Path(__file__).resolve().parents[2] / "model" / "processors"


def reference(image: np.ndarray, p: ClipPreprocessor) -> torch.Tensor:
    """transformers 4.31's CLIPImageProcessor, step by step: PIL bicubic resize of the short side to S
    (long side truncated), center crop, x / 255 in float64 stored as float32, (x - mean) / std in float32."""
    h, w = image.shape[:2]
    s = p.size
    new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    arr = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - p.crop_size) // 2, (new_w - p.crop_size) // 2
    arr = arr[top : top + p.crop_size, left : left + p.crop_size]
    x = torch.from_numpy((arr.astype(np.float64) * (1 / 255)).astype(np.float32))
    x = (x - torch.tensor(p.mean, dtype=torch.float32)) / torch.tensor(p.std, dtype=torch.float32)
    return x.permute(2, 0, 1)


@pytest.fixture(scope="module", params=["tiny", "clip-patch14-224", "clip-patch14-336"])
def processor_dir(request, tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint / "processor" if request.param == "tiny" else BUNDLED / request.param


@pytest.mark.parametrize("hw", [(60, 40), (37, 91), (300, 170), (224, 224), (20, 30), (401, 223), (1, 1), (3, 500)])
def test_pixels_are_the_4_31_pipelines(processor_dir: Path, hw: tuple[int, int]) -> None:
    ours = ClipPreprocessor.from_dir(processor_dir)
    images = np.random.default_rng(hw[0] * 1000 + hw[1]).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    got = ours(images)
    assert got.shape == (2, 3, ours.crop_size, ours.crop_size) and got.dtype == torch.float32
    assert torch.equal(got, torch.stack([reference(i, ours) for i in images]))


def test_is_the_library_processor_reading_the_same_json(processor_dir: Path) -> None:
    library = CLIPImageProcessorPil.from_pretrained(str(processor_dir))
    images = list(np.random.default_rng(2).integers(0, 256, (3, 97, 131, 3), dtype=np.uint8))
    expected = library(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(ClipPreprocessor.from_dir(processor_dir)(np.stack(images)), expected)


def test_rescale_factor_reaches_the_library() -> None:
    """The demo's training keeps the float32 rescale it was recorded with (``TRAINING_RESCALE``)."""
    image = np.random.default_rng(3).integers(0, 256, (1, 40, 60, 3), dtype=np.uint8)
    f32 = ClipPreprocessor(size=28, crop_size=28, rescale_factor=float(np.float32(1 / 255)))
    exact = ClipPreprocessor(size=28, crop_size=28)
    x = torch.from_numpy(np.array(Image.fromarray(image[0]).resize((42, 28), Image.BICUBIC))[:, 7:35])
    mean, std = torch.tensor(f32.mean), torch.tensor(f32.std)
    float32_rescale = ((x.float() * np.float32(1 / 255) - mean) / std).permute(2, 0, 1)[None]
    assert torch.equal(f32(image), float32_rescale)
    assert not torch.equal(exact(image), float32_rescale)
    assert (exact(image) - float32_rescale).abs().max() <= 1e-6


def test_reads_the_json(processor_dir: Path) -> None:
    raw = json.loads((processor_dir / "preprocessor_config.json").read_text())
    ours = ClipPreprocessor.from_dir(processor_dir)
    assert (ours.size, ours.crop_size) == (raw["size"], raw["crop_size"])
    assert ours.mean == tuple(raw["image_mean"]) and ours.std == tuple(raw["image_std"])


def test_pad_to_square_colour() -> None:
    ours = ClipPreprocessor.from_dir(BUNDLED / "clip-patch14-224")
    assert ours.pad_color == (122, 116, 104)
    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    square = expand_to_square(wide, ours.pad_color)
    assert square.size == (40, 40)
    arr = np.asarray(square)
    assert (arr[:10] == (122, 116, 104)).all() and (arr[30:] == (122, 116, 104)).all()
    assert (arr[10:30] == 0).all()  # the image sits in the middle
    tall = np.asarray(expand_to_square(Image.new("RGB", (10, 30), (255, 255, 255)), ours.pad_color))
    assert (tall[:, :10] == (122, 116, 104)).all() and (tall[:, 10:20] == 255).all()


def test_pad_to_square_pipeline(tiny_checkpoint: Path) -> None:
    folder = tiny_checkpoint / "processor"
    ours = ClipPreprocessor.from_dir(folder)
    image = np.random.default_rng(5).integers(0, 256, (30, 70, 3), dtype=np.uint8)
    padded = np.asarray(expand_to_square(Image.fromarray(image), ours.pad_color))
    got = ours(image[None], pad_to_square=True)
    assert torch.equal(got[0], reference(padded, ours))
    assert not torch.allclose(got, ours(image[None]))  # padding changes what EVA sees


def test_input_forms_agree(tiny_checkpoint: Path) -> None:
    ours = ClipPreprocessor.from_dir(tiny_checkpoint / "processor")
    images = np.random.default_rng(6).integers(0, 256, (2, 50, 64, 3), dtype=np.uint8)
    base = ours(images)
    assert torch.equal(ours(torch.from_numpy(images)), base)
    assert torch.equal(ours([Image.fromarray(i) for i in images]), base)
    assert torch.equal(ours(images[0]), base[:1])
    assert torch.equal(ours([Image.fromarray(images[0]).convert("RGBA")]), base[:1])


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8, 4), np.uint8), np.zeros((2, 8, 8, 3), np.float32),
                                 np.zeros((8, 8), np.uint8)])
def test_rejects_non_rgb_uint8(tiny_checkpoint: Path, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        ClipPreprocessor.from_dir(tiny_checkpoint / "processor")(bad)
