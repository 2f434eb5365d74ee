"""Media -> cached features: one chunked extraction loop, float16 features on the CPU for every path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.pipeline import FEATURE_DTYPE, encode_image, encode_video, iter_video_features, plan_video
from model.video import FrameSampling, VideoFile, load_video
from tests.videos import write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s at 10 fps of random frames, so that every frame's features differ."""
    frames = np.random.default_rng(0).integers(0, 256, (30, 48, 80, 3), dtype=np.uint8)
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", fps=10.0, frames=frames)


class CountingVideo:
    """A ``VideoFile`` that counts the chunks handed out, to see how much a step decodes."""

    def __init__(self, video: VideoFile) -> None:
        self.video, self.chunks = video, 0

    def iter_frames(self, indices: list[int], chunk: int = 32) -> Iterator[np.ndarray]:
        for frames in self.video.iter_frames(indices, chunk=chunk):
            self.chunks += 1
            yield frames


def test_chunks_concatenate_to_encode_video(tiny_model, clip: Path) -> None:
    video, indices = plan_video(clip, FrameSampling(fps=5.0))
    assert indices == list(range(0, 30, 2))
    chunks = list(iter_video_features(tiny_model, video, indices, chunk=4))
    assert [c.indices for c in chunks] == [indices[i : i + 4] for i in range(0, 15, 4)]
    for c in chunks:
        assert c.features.shape == (len(c.indices), 17, tiny_model.config.mm_hidden_size)
        assert c.features.dtype == FEATURE_DTYPE and c.features.device.type == "cpu"
        assert c.decode_seconds >= 0 and c.encode_seconds > 0
    encoded = encode_video(tiny_model, video, indices, chunk=4)
    assert torch.equal(torch.cat([c.features for c in chunks]), encoded.features)
    # The chunking changes nothing: one pass over all frames gives the same bits.
    frames, _ = load_video(clip, FrameSampling(fps=5.0))
    assert torch.equal(encoded.features, tiny_model.encode_frames(tiny_model.preprocess(frames)).to(FEATURE_DTYPE))


def test_each_step_decodes_one_chunk(tiny_model, clip: Path) -> None:
    video, indices = plan_video(clip, FrameSampling(fps=10.0))
    counting = CountingVideo(video)
    steps = iter_video_features(tiny_model, counting, indices, chunk=8)
    assert counting.chunks == 0  # nothing happens before the first next()
    first = next(steps)
    assert counting.chunks == 1 and first.indices == indices[:8]
    assert sum(len(c.indices) for c in steps) == len(indices) - 8 and counting.chunks == 4


def test_encode_video_reports_progress(tiny_model, clip: Path) -> None:
    video, indices = plan_video(clip.read_bytes(), FrameSampling(fps=1.0))
    progress = []
    encoded = encode_video(tiny_model, video, indices, chunk=2, progress=lambda d, t: progress.append((d, t)))
    assert encoded.frame_indices == [0, 10, 20] and progress == [(2, 3), (3, 3)]
    assert encoded.timestamps == pytest.approx([0.0, 1.0, 2.0])
    assert encoded.features.shape == (3, 17, tiny_model.config.mm_hidden_size) and encoded.features.dtype == FEATURE_DTYPE


def test_encode_image_pads_as_the_config_says(tiny_model) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    assert tiny_model.config.image_aspect_ratio == "pad"
    features = encode_image(tiny_model, image)
    assert features.shape == (1, 17, tiny_model.config.mm_hidden_size)
    assert features.dtype == FEATURE_DTYPE and features.device.type == "cpu"
    assert torch.equal(features, encode_image(tiny_model, image, pad_to_square=True))
    assert not torch.equal(features, encode_image(tiny_model, image, pad_to_square=False))
