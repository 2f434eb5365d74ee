"""vLLM's media fields on a chat request: ``uuid`` on media parts, ``media_io_kwargs``, ``mm_processor_kwargs``.

* A part's ``uuid`` names the media it carries (the video record, or the image's digest) in the
  engine's media store, where both deployments see it, for as long as media is kept. A later
  request may send the part with the uuid and no URL (``"video_url": null``) to reuse it without
  resending; a uuid that names nothing (never sent, or forgotten) is a 404 naming it. A part with
  both reuses what the uuid names when it is still held, as vLLM uses the uuid in place of the
  content's hash, and otherwise fetches the URL and names the result.
* ``media_io_kwargs.video.{fps, num_frames}`` and ``mm_processor_kwargs.{fps, max_frames,
  num_frames}`` are our ``fps`` / ``max_frames`` under other names (``num_frames`` caps the
  sampled frames, as ``max_frames`` does), under the same server caps; two values for one option
  that differ are a 400.
"""

from __future__ import annotations

import json

from ..engine.jobs import MediaRef, VideoRecord
from .errors import APIError
from .ingest import MediaIngest
from .protocol import ChatCompletionRequest, FrameOptions, ImagePart, VideoPart


def frame_options(req: ChatCompletionRequest) -> FrameOptions:
    """The request's frame options with vLLM's aliases folded in."""
    io = req.media_io_kwargs.video if req.media_io_kwargs and req.media_io_kwargs.video else None
    mm = req.mm_processor_kwargs
    given: dict[str, list[tuple[str, float | int]]] = {"fps": [], "max_frames": []}
    for target, param, value in (
        ("fps", "fps", req.fps),
        ("fps", "media_io_kwargs.video.fps", io.fps if io else None),
        ("fps", "mm_processor_kwargs.fps", mm.fps if mm else None),
        ("max_frames", "max_frames", req.max_frames),
        ("max_frames", "media_io_kwargs.video.num_frames", io.num_frames if io else None),
        ("max_frames", "mm_processor_kwargs.max_frames", mm.max_frames if mm else None),
        ("max_frames", "mm_processor_kwargs.num_frames", mm.num_frames if mm else None),
    ):
        if value is not None:
            given[target].append((param, value))
    values = {}
    for target, found in given.items():
        if len({value for _, value in found}) > 1:
            names = ", ".join(f"{param}={value:g}" for param, value in found)
            raise APIError(400, f"conflicting values for {target}: {names}; give one, or the same in each",
                           code="conflicting_fields", param=found[1][0])
        if found:
            values[target] = found[0][1]
    return FrameOptions(fps=values.get("fps"), max_frames=values.get("max_frames"), start_time=req.start_time,
                        end_time=req.end_time)


def _not_found(uuid: str, param: str) -> APIError:
    return APIError(404, f"no media with uuid {uuid!r} is held (never sent, or no longer kept): send the part "
                         "with its url again", code="media_uuid_not_found", param=param)


async def _named(ingest: MediaIngest, part: ImagePart | VideoPart, options: FrameOptions,
                 where: str) -> tuple[MediaRef, VideoRecord | None] | None:
    """What the part's uuid names, when it is still held; None when nothing (or nothing held)."""
    raw = await ingest.engine.media.named(part.uuid)
    if raw is None:
        return None
    named = json.loads(raw)
    kind = "video" if isinstance(part, VideoPart) else "image"
    if named.get("kind") != kind:
        raise APIError(400, f"uuid {part.uuid!r} names {'an' if named.get('kind') == 'image' else 'a'} "
                            f"{named.get('kind')}, not {'an' if kind == 'image' else 'a'} {kind}",
                       code="media_uuid_mismatch", param=f"{where}.uuid")
    if kind == "image":
        return (MediaRef(kind="image", digest=named["digest"]), None) if await ingest.engine.media.has(
            named["digest"]) else None
    if await ingest.engine.registry.get(named["video_id"]) is None:
        return None
    record = await ingest.video_by_id(named["video_id"], options)
    return record.ref(), record


async def chat_media(ingest: MediaIngest, part: ImagePart | VideoPart, options: FrameOptions,
                     where: str) -> tuple[MediaRef, VideoRecord | None]:
    """A media part's media, registered (and named by its uuid, when it has one)."""
    ref = part.ref()
    field = f"{where}.{part.type}"
    if part.uuid is not None:
        found = await _named(ingest, part, options, where)
        if found is not None:
            return found
        if ref is None:
            raise _not_found(part.uuid, f"{where}.uuid")
    if isinstance(part, VideoPart):
        record = await ingest.video_from_url(ref.url, options, field=field)
        media, value = record.ref(), {"kind": "video", "video_id": record.id, "digest": record.digest}
    else:
        media, record = await ingest.image_from_url(ref.url, field=field), None
        value = {"kind": "image", "digest": media.digest}
    if part.uuid is not None:
        await ingest.engine.media.name(part.uuid, json.dumps(value))
    return media, record
