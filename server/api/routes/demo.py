"""``POST /v1/demo/clip``: a synthetic shapes clip registered as a video, for a first answer in one click.

Only while the trained demo model is served: it is the one model that answers about such clips,
and offering them beside a real checkpoint would only test it on footage it never saw. The clip
maker is injected by the composition root (``app.state.demo_clips``), so this room stays torch-free.
"""

from __future__ import annotations

import asyncio
import itertools

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..deps import Engine, Ingest, require_card
from ..errors import APIError
from .videos import video_object

router = APIRouter()
_turns = itertools.count()  # each click gets the next curated clip


@router.post("/v1/demo/clip", status_code=201)
async def demo_clip(request: Request, engine: Engine, ingest: Ingest):
    card = await require_card(engine)
    make = getattr(request.app.state, "demo_clips", None)
    if card.demo != "trained" or make is None:
        raise APIError(404, "demo clips are offered only while the trained demo model is served",
                       code="no_demo_clips")
    data, filename, questions = await asyncio.to_thread(make, next(_turns))
    record = await ingest.video(data, ingest.sampling(None), filename)
    return JSONResponse({**video_object(record), "questions": questions}, status_code=201)
