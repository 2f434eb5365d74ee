"""Decoding an uploaded image. PIL only, no torch: the HTTP process validates uploads with it."""

from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can read."""


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode the image: {exc}") from exc
    return image.convert("RGB")


def looks_like_image(data: bytes) -> bool:
    """PNG, JPEG, GIF, WebP or BMP magic bytes: how an upload is told from a video without decoding it."""
    head = data[:16]
    return (
        head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a"))
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    )
