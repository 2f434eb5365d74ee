"""The CLIP pixel pipeline against transformers' own ``CLIPImageProcessor`` built from the same JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from model.preprocess import ClipPreprocessor, expand_to_square

BUNDLED = Path(__file__).resolve().parents[2] / "model" / "processors"


def reference(folder: Path) -> CLIPImageProcessor:
    logging.getLogger("transformers").setLevel(logging.ERROR)  # "torchvision missing: PIL backend" notice
    return CLIPImageProcessor.from_pretrained(str(folder))


@pytest.fixture(scope="module", params=["tiny", "clip-patch14-224", "clip-patch14-336"])
def processor_dir(request, tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint / "processor" if request.param == "tiny" else BUNDLED / request.param


@pytest.mark.parametrize("hw", [(60, 40), (37, 91), (300, 170), (224, 224), (20, 30), (401, 223)])
def test_matches_clip_image_processor(processor_dir: Path, hw: tuple[int, int]) -> None:
    ours = ClipPreprocessor.from_dir(processor_dir)
    ref = reference(processor_dir)
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    images = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    expected = ref(images=list(images), return_tensors="pt")["pixel_values"]
    got = ours(images)
    assert got.shape == expected.shape == (2, 3, ours.crop_size, ours.crop_size)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-6


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
    padded = expand_to_square(Image.fromarray(image), ours.pad_color)
    expected = reference(folder)(images=[padded], return_tensors="pt")["pixel_values"]
    got = ours(image[None], pad_to_square=True)
    assert (got - expected).abs().max() <= 1e-6
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
