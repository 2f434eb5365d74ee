"""The CLIP pixel pipeline exactly as transformers 4.31's ``CLIPImageProcessor`` ran it (spec §2.5).

PIL bicubic resize of the short side (long side truncated, not rounded), center crop at
``(H-S)//2, (W-S)//2``, ``x * float32(1/255)``, then ``(x - mean) / std`` in float32. The
processor folder's JSON is honoured; the two processors the official repository ships
(``clip-patch14-224`` / ``-336``) are bundled so that a released checkpoint whose config points
at ``./llamavid/processor/...`` or ``./model_zoo/OpenAI/clip-vit-large-patch14`` loads as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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

    def __call__(self, frames: np.ndarray | torch.Tensor | list[Image.Image], *, pad_to_square: bool = False) -> torch.Tensor:
        """uint8 RGB frames [T, H, W, 3] (or PIL images) -> float32 pixels [T, 3, S, S]."""
        images = _as_pil_list(frames)
        out = np.empty((len(images), self.crop_size, self.crop_size, 3), dtype=np.float32)
        for i, image in enumerate(images):
            if pad_to_square:
                image = expand_to_square(image, self.pad_color)
            out[i] = self._resize_crop(image)
        pixels = torch.from_numpy(out) * np.float32(1 / 255)
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        return ((pixels - mean) / std).permute(0, 3, 1, 2).contiguous()

    def _resize_crop(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        arr = np.asarray(image)
        top, left = (new_h - self.crop_size) // 2, (new_w - self.crop_size) // 2
        if top < 0 or left < 0:  # smaller than the crop: CLIP pads with zeros around the image
            padded = np.zeros((max(new_h, self.crop_size), max(new_w, self.crop_size), 3), dtype=arr.dtype)
            py, px = max(-top, 0), max(-left, 0)
            padded[py : py + new_h, px : px + new_w] = arr
            arr, top, left = padded, max(top, 0), max(left, 0)
        return arr[top : top + self.crop_size, left : left + self.crop_size]


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _as_pil_list(frames: np.ndarray | torch.Tensor | list[Image.Image]) -> list[Image.Image]:
    if isinstance(frames, list):
        return [f.convert("RGB") if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in frames]
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return [Image.fromarray(f) for f in frames]
