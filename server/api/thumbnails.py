"""Small JPEG thumbnails of a video's sampled frames, for the web page's frame strip.

Made in one pass over the video the first time any of them is asked for (decoding chunk by
chunk, never the whole video at once) and kept in a small LRU of videos.
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict

from PIL import Image

from model.video import VideoFile

THUMB_WIDTH = 192


def make_thumbnails(data: bytes, timestamps: list[float], width: int = THUMB_WIDTH) -> list[bytes | None]:
    """One JPEG per timestamp, upright (``VideoFile`` applies rotation), None where the frame
    shown at that time does not decode (the frame strip shows a gap, not a neighbour's picture)."""
    with VideoFile(data) as video:
        wanted = video.indices_at(timestamps)
        pictures: dict[int, bytes] = {}
        for frames in video.iter_frames(sorted(set(wanted)), chunk=16):
            for index, frame in zip(frames.indices, frames):
                pictures[index] = _jpeg(frame, width)
    return [pictures.get(i) for i in wanted]


def _jpeg(frame, width: int) -> bytes:
    image = Image.fromarray(frame)
    height = max(1, round(image.height * width / image.width))
    buf = io.BytesIO()
    image.resize((width, height), Image.BILINEAR).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class ThumbnailCache:
    def __init__(self, max_videos: int = 32) -> None:
        self.max_videos = max_videos
        self._videos: OrderedDict[str, list[bytes | None]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, key: str, load_bytes, timestamps: list[float]) -> list[bytes | None] | None:
        if key in self._videos:
            self._videos.move_to_end(key)
            return self._videos[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._videos:
                data = await load_bytes()
                if data is None:
                    return None
                self._videos[key] = await asyncio.to_thread(make_thumbnails, data, timestamps)
                while len(self._videos) > self.max_videos:
                    self._videos.popitem(last=False)
        self._locks.pop(key, None)
        return self._videos.get(key)
