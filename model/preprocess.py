"""The CLIP pixel pipeline of the official code (spec §2.5), run by transformers' ``CLIPImageProcessorPil``.

PIL bicubic resize of the short side (long side truncated, not rounded), center crop at
``(H-S)//2, (W-S)//2``, rescale by 1/255 (in float64, stored as float32), then ``(x - mean) / std``
in float32: the library's PIL backend does all four as transformers 4.31's ``CLIPImageProcessor``
did, and gives the parity cases' ``pixel_values`` exactly.
``CLIPImageProcessorPil`` is named explicitly because ``CLIPImageProcessor`` switches to its
torchvision backend (not PIL's resize) whenever torchvision is installed. The processor
folder's JSON is honoured; the two processors the official repository ships
(``clip-patch14-224`` / ``-336``) are bundled so that a released checkpoint whose config points
at ``./llamavid/processor/...`` or ``./model_zoo/OpenAI/clip-vit-large-patch14`` loads as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from .config import CheckpointError

_BUNDLED = Path(__file__).parent / "processors"
_BUNDLED_ALIASES = {
    "clip-patch14-224": "clip-patch14-224",
    "clip-patch14-336": "clip-patch14-336",
    "clip-patch14-224-336": "clip-patch14-336",  # named by the official 336 script, never shipped
    "clip-vit-large-patch14": "clip-patch14-224",
    "clip-vit-large-patch14-336": "clip-patch14-336",
}


@dataclass(frozen=True)
class ClipPreprocessor:
    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: int = Image.BICUBIC
    rescale_factor: float = 1 / 255  # applied to uint8 values in float64, as transformers 4.31 did

    @classmethod
    def from_dir(cls, path: Path) -> "ClipPreprocessor":
        config = path / "preprocessor_config.json"
        if not config.is_file() and path.name in _BUNDLED_ALIASES:
            config = _BUNDLED / _BUNDLED_ALIASES[path.name] / "preprocessor_config.json"
        if not config.is_file():
            raise CheckpointError(
                f"image processor not found at {path} (no preprocessor_config.json); set image_processor "
                f"in config.json, pass --image-processor, or use one of {sorted(_BUNDLED_ALIASES)}"
            )
        raw = json.loads(config.read_text())
        size, crop = raw.get("size", 224), raw.get("crop_size", 224)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height"))
        if isinstance(crop, dict):
            crop = crop.get("height", crop.get("width"))
        return cls(
            size=int(size),
            crop_size=int(crop),
            mean=tuple(raw.get("image_mean", cls.mean)),
            std=tuple(raw.get("image_std", cls.std)),
            resample=int(raw.get("resample", Image.BICUBIC)),
        )

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The training-time square-padding fill: the mean colour, (122, 116, 104) for CLIP."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    @cached_property
    def _library(self) -> CLIPImageProcessorPil:
        return CLIPImageProcessorPil(
            size={"shortest_edge": self.size},
            crop_size={"height": self.crop_size, "width": self.crop_size},
            image_mean=list(self.mean),
            image_std=list(self.std),
            resample=self.resample,
            rescale_factor=self.rescale_factor,
            # Inputs are RGB already (``_as_rgb_list``): the library would composite transparency onto
            # white, where transformers 4.31 (and so the official code) simply dropped the alpha.
            do_convert_rgb=False,
        )

    def __call__(self, frames: np.ndarray | torch.Tensor | list[Image.Image], *, pad_to_square: bool = False) -> torch.Tensor:
        """uint8 RGB frames [T, H, W, 3] (or PIL images) -> float32 pixels [T, 3, S, S]."""
        images = _as_rgb_list(frames)
        if not images:
            return torch.empty((0, 3, self.crop_size, self.crop_size))
        if pad_to_square:
            pil = (i if isinstance(i, Image.Image) else Image.fromarray(i) for i in images)
            images = [expand_to_square(image, self.pad_color) for image in pil]
        out = self._library(images, return_tensors="pt", input_data_format="channels_last")
        return out["pixel_values"]


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _as_rgb_list(frames: np.ndarray | torch.Tensor | list[Image.Image]) -> list[np.ndarray | Image.Image]:
    if isinstance(frames, list):
        return [f.convert("RGB") if isinstance(f, Image.Image) else np.asarray(f) for f in frames]
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return list(frames)
