"""``/v1/files``: JSONL files for the Batch API (upload, list, get, content, delete), as OpenAI's.

An upload is read up to ``max_batch_file_bytes`` and checked line by line (each a JSON object;
a bad one is a 400 naming it); its bytes go to the engine's media store under their digest, its
record to the batch store, so every API process of a split deployment serves it.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..batch import BatchService, file_object, parse_jsonl
from ..errors import APIError
from .batches import Batches, page

router = APIRouter()


@router.post("/v1/files")
async def upload_file(request: Request, batches: Batches):
    settings = batches.settings
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(415, "upload the file as multipart/form-data with a 'file' part and purpose=batch",
                       code="unsupported_content_type")
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "multipart upload needs a 'file' part with the JSONL", code="missing_file",
                           param="file")
        if purpose != "batch":
            raise APIError(400, f"purpose {purpose!r} is not supported; this server takes files with purpose "
                                "\"batch\"", code="invalid_purpose", param="purpose")
        data = await _read(upload, settings.max_batch_file_bytes)
        filename = upload.filename or "batch.jsonl"
    finally:
        await form.close()
    objects = await asyncio.to_thread(parse_jsonl, data, settings.max_batch_lines)
    record = await batches.put_file(data, filename[:255], "batch", len(objects))
    return file_object(record)


async def _read(upload, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(min(1 << 20, limit + 1 - total)):
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"the file is larger than this server's {limit}-byte limit for batch files "
                                "(LLAMAVID_MAX_BATCH_FILE_BYTES)", code="file_too_large", param="file")
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/v1/files")
async def list_files(batches: Batches, after: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
                     order: Literal["asc", "desc"] = "desc", purpose: str | None = None):
    records = [r for r in await batches.store.list_files() if purpose is None or r.purpose == purpose]
    if order == "desc":
        records.reverse()
    return page([file_object(r) for r in records], after, limit)


async def _file(batches: BatchService, file_id: str):
    record = await batches.store.get_file(file_id)
    if record is None:
        raise APIError(404, f"no file with id {file_id!r}", code="file_not_found")
    return record


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, batches: Batches):
    return file_object(await _file(batches, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, batches: Batches):
    record = await _file(batches, file_id)
    return Response(await batches.file_bytes(record), media_type="application/jsonl",
                    headers={"Content-Disposition": f'attachment; filename="{record.filename}"'})


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, batches: Batches):
    record = await _file(batches, file_id)
    for batch_id in await batches.store.active_batches():
        batch = await batches.store.get_batch(batch_id)
        if batch is not None and batch.input_file_id == file_id:
            raise APIError(409, f"file {file_id} is the input of batch {batch_id}, which is still running; "
                                "cancel it first", code="file_in_use")
    await batches.store.delete_file(file_id)
    if not any(r.digest == record.digest for r in await batches.store.list_files()):
        await batches.engine.media.delete(record.digest)
    return {"id": file_id, "object": "file", "deleted": True}
