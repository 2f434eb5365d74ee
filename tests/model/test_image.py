"""Image uploads, and the media leaves the torch-free HTTP process imports."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from model.image import ImageDecodeError, decode_image, looks_like_image
from tests.videos import write_video

ROOT = Path(__file__).resolve().parents[2]


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (9, 7), (200, 30, 60, 128)[: len(mode)]).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_formats_are_recognised_and_decoded(fmt: str) -> None:
    data = _encoded(fmt)
    assert looks_like_image(data)
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (9, 7)


def test_alpha_is_dropped_not_composited() -> None:
    """As transformers 4.31 converted RGBA: the colour stays, whatever its alpha."""
    assert decode_image(_encoded("PNG", "RGBA")).getpixel((0, 0)) == (200, 30, 60)


def test_paths_and_failures(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_encoded("PNG"))
    assert decode_image(tmp_path / "a.png").size == (9, 7)
    assert not looks_like_image(b"") and not looks_like_image(b"not an image at all")
    truncated = _encoded("PNG")[:30]
    assert looks_like_image(truncated)  # the magic bytes are there; decoding finds the rest missing
    for bad in (b"", b"not an image at all", truncated, tmp_path / "missing.png"):
        with pytest.raises(ImageDecodeError):
            decode_image(bad)


def test_media_leaves_run_without_torch(tmp_path: Path) -> None:
    """The HTTP process validates uploads and builds prompts with these three and must not load torch."""
    video = write_video(tmp_path / "v.mp4", seconds=1.0, fps=5.0)
    (tmp_path / "a.png").write_bytes(_encoded("PNG"))
    script = (
        "import sys\n"
        "from model.conversation import Message, build_prompt, get_template\n"
        "from model.image import decode_image, looks_like_image\n"
        "from model.video import FrameSampling, VideoFile, sample_indices\n"
        f"video = VideoFile({str(video)!r})\n"
        "frames = video.read(sample_indices(video.info, FrameSampling(fps=1.0)))\n"
        f"image = decode_image({str(tmp_path / 'a.png')!r})\n"
        "prompt = build_prompt(get_template('vicuna_v1'), [Message('user', 'hi')], image_text='')\n"
        "assert frames.ndim == 4 and image.size == (9, 7) and prompt\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
