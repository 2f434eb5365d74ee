"""``/v1/videos`` (upload or URL, status, delete) and ``/v1/ask``, the plain REST question.

A video is registered at once (202 with its id) and extracted in the background; its status
reports frames done / total. A question about a video that is still extracting waits for it,
streaming progress events meanwhile.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from model.subtitles import container_subtitles, load_subtitles, to_webvtt

from ...engine.jobs import SubtitleRef, VideoRecord
from ..deps import Engine, Ingest, ServerSettings, require_card
from ..errors import APIError
from ..ingest import VIDEO_ID, question_subtitles
from ..protocol import AskRequest, FrameOptions, VideoFromURL, VideoObject, usage
from ..serving import (
    Conversation,
    build_job,
    check_context,
    client_gone,
    collect,
    no_video_fields,
    normalise_turns,
    start,
)
from ..sse import ask_events, moments_body, video_usage

router = APIRouter()


def video_object(record: VideoRecord) -> dict:
    total = record.frames_total or 0
    progress = 1.0 if record.status == "ready" else (record.frames_done / total if total else 0.0)
    return VideoObject(
        id=record.id, status=record.status, frames_done=record.frames_done, frames_total=record.frames_total,
        progress=round(progress, 4), duration=record.duration, fps=record.fps, source_fps=record.source_fps,
        width=record.width, height=record.height, bytes=record.bytes, filename=record.filename,
        timestamps=record.timestamps, frames_skipped=record.frames_skipped, rotation=record.rotation,
        subtitles=record.subtitles is not None,
        error={"code": record.error_code or "failed", "message": record.error} if record.error else None,
        created_at=int(record.created_at),
    ).model_dump()


@router.post("/v1/videos", status_code=202)
async def create_video(request: Request, ingest: Ingest):
    """Multipart upload (``file`` + optional ``subtitles`` file or text, ``fps``, ``max_frames``,
    ``start_time``, ``end_time``) or JSON ``{"url": ..., "subtitles": ..., "fps": ...}``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=8)
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "multipart upload needs a 'file' part with the video", code="missing_file",
                               param="file")
            options = _form_options(form)
            fetched = await ingest.upload(upload, "video")
            subtitles = await _form_subtitles(form, ingest)
            record = await ingest.video(fetched.data, ingest.sampling(options), upload.filename, subtitles=subtitles)
        finally:
            await form.close()
    elif content_type.startswith("application/json"):
        try:
            body = VideoFromURL.model_validate_json(await request.body())
        except ValidationError as exc:
            raise APIError(400, _pydantic_message(exc), code="invalid_request") from exc
        subtitles = await ingest.subtitles(body.subtitles)
        record = await ingest.video_from_url(body.url, body, field="url", subtitles=subtitles)
    else:
        raise APIError(415, "send the video as multipart/form-data ('file') or JSON {\"url\": ...}",
                       code="unsupported_content_type")
    return JSONResponse(video_object(record), status_code=202)


@router.get("/v1/videos/{video_id}")
async def get_video(video_id: str, engine: Engine):
    return video_object(await _record(engine, video_id))


async def _record(engine, video_id: str) -> VideoRecord:
    record = await engine.registry.get(video_id) if VIDEO_ID.match(video_id) else None
    if record is None:
        raise APIError(404, f"no video with id {video_id!r}", code="video_not_found")
    return record


@router.get("/v1/videos/{video_id}/content")
async def video_content(video_id: str, request: Request, engine: Engine):
    """The video's bytes, with HTTP range support so a <video> element can seek."""
    record = await _record(engine, video_id)
    data = await engine.media.get(record.digest)
    if data is None:
        raise APIError(410, "the video's bytes are no longer stored", code="media_gone")
    return ranged_response(data, record.content_type or "application/octet-stream", request.headers.get("range"))


@router.get("/v1/videos/{video_id}/subtitles.vtt")
async def video_subtitles(video_id: str, engine: Engine):
    """The video's subtitles as WebVTT, for the player: the file uploaded with it, else its own text
    track; 404 when it has neither. (A speech-to-text transcript is made per question, by a worker.)"""
    record = await _record(engine, video_id)
    cues = None
    if record.subtitles is not None and (data := await engine.media.get(record.subtitles)) is not None:
        cues = await asyncio.to_thread(load_subtitles, data)
    elif (data := await engine.media.get(record.digest)) is not None:
        try:
            cues = await asyncio.to_thread(container_subtitles, data)
        except (OSError, ValueError):  # an unreadable track is no track, here as for the model
            cues = None
    if not cues:
        raise APIError(404, f"video {video_id} has no subtitles (none uploaded, no text track)",
                       code="no_subtitles")
    return Response(to_webvtt(cues), media_type="text/vtt; charset=utf-8",
                    headers={"Cache-Control": "private, max-age=3600"})


@router.get("/v1/videos/{video_id}/frames/{index}.jpg")
async def video_frame(video_id: str, index: int, request: Request, engine: Engine):
    """A thumbnail of the index-th sampled frame."""
    record = await _record(engine, video_id)
    times = record.timestamps or []
    if not 0 <= index < len(times):
        raise APIError(404, f"video {video_id} has {len(times)} sampled frames; no frame {index}", code="frame_not_found")
    thumbs = await request.app.state.thumbnails.get(
        # Keyed by the times too: they change once extraction has left out frames that do not decode.
        f"{record.digest}:{record.id}:{hash(tuple(times))}", lambda: engine.media.get(record.digest), times)
    if thumbs is None or index >= len(thumbs):
        raise APIError(410, "the video's bytes are no longer stored", code="media_gone")
    if thumbs[index] is None:
        raise APIError(404, f"frame {index} of video {video_id} does not decode", code="frame_not_decodable")
    return Response(thumbs[index], media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def ranged_response(data: bytes, media_type: str, range_header: str | None) -> Response:
    size = len(data)
    headers = {"Accept-Ranges": "bytes"}
    if range_header and range_header.startswith("bytes="):
        first, _, last = range_header[6:].split(",")[0].strip().partition("-")
        try:
            start = int(first) if first else max(0, size - int(last))
            end = min(int(last), size - 1) if (first and last) else size - 1
        except ValueError:
            start, end = 0, -1
        if 0 <= start <= end < size:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return Response(data[start : end + 1], status_code=206, media_type=media_type, headers=headers)
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    return Response(data, media_type=media_type, headers=headers)


@router.delete("/v1/videos/{video_id}")
async def delete_video(video_id: str, engine: Engine):
    """Forget the video: its record(s), its stored bytes and its cached features."""
    record = await _record(engine, video_id)
    for sibling in await engine.registry.by_digest(record.digest):
        await engine.registry.delete(sibling.id)
    await engine.media.delete(record.digest)
    await engine.forget_features(record.digest)
    return {"id": video_id, "object": "video", "deleted": True}


@router.post("/v1/ask")
async def ask(req: AskRequest, request: Request, engine: Engine, ingest: Ingest, settings: ServerSettings):
    card = await require_card(engine)
    turns = [(t.role, t.content) for t in req.history] + [("user", req.question)]
    conversation = Conversation(normalise_turns(turns, settings), frame_selection=req.frame_selection)
    if not (req.video_url or req.video_id):
        no_video_fields(req)
    subtitles = await ingest.subtitles(req.subtitles)
    if req.video_url or req.video_id:
        record = (await ingest.video_by_id(req.video_id, req) if req.video_id
                  else await ingest.video_from_url(req.video_url, req, field="video_url"))
        conversation.media, conversation.video_id = [record.ref()], record.id
        conversation.frames = record.frames_total or 0
        conversation.subtitles = question_subtitles(subtitles, record, long_video=card.long_video)
    elif req.image_url:
        conversation.media = [await ingest.image_from_url(req.image_url, field="image_url")]
        conversation.frames = 1
    job = build_job(conversation, req, settings, max_tokens=req.max_tokens, template=req.template)
    check_context(conversation, card)
    events, stream = await start(engine, job, client_gone(request))
    base_url = str(request.base_url)
    if req.stream:
        return EventSourceResponse(ask_events(events, stream, conversation.video_id, base_url), ping=15)
    result = await collect(events, stream, client_gone(request))
    done = result.done
    relevance = result.relevance
    return {
        "id": job.request_id, "object": "answer", "model": card.id, "answer": result.text,
        "finish_reason": done.finish_reason if done else None, "video_id": conversation.video_id,
        "usage": usage(done.prompt_tokens, done.completion_tokens, done.visual_tokens) if done else usage(0, 0, 0),
        **(video_usage(done) if done else {}),
        "relevance": {"frames": [f.model_dump() for f in relevance.frames]} if relevance else None,
        "moments": moments_body(relevance, conversation.video_id, base_url) if relevance else None,
    }


async def _form_subtitles(form, ingest) -> SubtitleRef | None:
    """The ``subtitles`` part: an SRT/WebVTT file, or text (which may also be a URL, "auto"...)."""
    part = form.get("subtitles")
    if part is None or part == "":
        return None
    if isinstance(part, str):
        return await ingest.subtitles(part)
    fetched = await ingest.upload(part, "subtitles", field="subtitles")
    return await ingest.keep_subtitles(fetched.data, "subtitles")


def _form_options(form) -> FrameOptions:
    values = {}
    for key in ("fps", "max_frames", "start_time", "end_time"):
        value = form.get(key)
        if value not in (None, ""):
            values[key] = value
    try:
        return FrameOptions.model_validate(values)
    except ValidationError as exc:
        raise APIError(400, _pydantic_message(exc), code="invalid_request") from exc


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{where}: {'unknown field' if err['type'] == 'extra_forbidden' else err['msg']}")
    return "; ".join(parts)
