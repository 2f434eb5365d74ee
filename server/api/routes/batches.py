"""``/v1/batches``: create, get, cancel and list batch jobs, as OpenAI's Batch API (``server.api.batch``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..batch import BatchService, batch_object
from ..deps import Engine
from ..errors import APIError

router = APIRouter()


def _batches(request: Request, engine: Engine) -> BatchService:
    return request.app.state.batches


Batches = Annotated[BatchService, Depends(_batches)]


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict | None = None  # accepted; output files live as long as the server keeps files

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        return value


def page(items: list[dict], after: str | None, limit: int) -> dict:
    """An OpenAI cursor page: the ``limit`` items after the one with id ``after``."""
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"no object with id {after!r} to list after", code="invalid_cursor", param="after")
        items = items[ids.index(after) + 1:]
    data = items[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}


@router.post("/v1/batches")
async def create_batch(body: BatchCreate, request: Request, batches: Batches):
    record = await batches.create(body.input_file_id, body.endpoint, body.completion_window, body.metadata,
                                  base_url=str(request.base_url))
    return batch_object(record)


@router.get("/v1/batches")
async def list_batches(batches: Batches, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    records = list(reversed(await batches.store.list_batches()))  # newest first
    return page([batch_object(r) for r in records], after, limit)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, batches: Batches):
    return batch_object(await batches.get(batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, batches: Batches):
    return batch_object(await batches.cancel(batch_id))
