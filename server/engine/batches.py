"""The records of the Batch API (``/v1/files``, ``/v1/batches``) and where they are kept.

A file's bytes live in the engine's ``MediaStore`` under their digest; its ``FileRecord`` here. A
batch is a ``BatchRecord`` plus the results of its finished lines, each kept the moment it is
known (``record_result``, first write wins), so a batch taken over by another API process goes on
from where its last runner stopped without redoing a line. ``acquire``/``renew`` hand out a
lease on a batch: only its holder runs it. This module has the embedded store (``llamavid
serve``, ``llamavid batch``: one process, dicts); ``server.engine.redis.batches`` the shared one.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Protocol

from pydantic import BaseModel, Field

FilePurpose = Literal["batch", "batch_output"]
BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
TERMINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


def file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


class FileRecord(BaseModel):
    id: str = Field(default_factory=file_id)
    digest: str  # of the bytes, in the media store
    bytes: int
    filename: str
    purpose: FilePurpose
    lines: int = 0  # JSONL lines (requests, or results)
    created_at: float = Field(default_factory=time.time)


class LineError(BaseModel):
    """An input line that cannot run, as the batch object's ``errors.data`` lists it."""

    code: str
    message: str
    line: int | None = None  # 1-based
    param: str | None = None


class BatchRecord(BaseModel):
    id: str = Field(default_factory=batch_id)
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = "validating"
    model: str | None = None
    metadata: dict[str, str] | None = None
    total: int = 0
    base_url: str | None = None  # of the API the batch was created on (links in answers, e.g. thumbnails)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[LineError] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    expires_at: float | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    # not stored with the record: the counts of finished lines, read with it (``BatchStore.get_batch``)
    completed: int = 0
    failed: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


COUNTED = ("completed", "failed")


class BatchStore(Protocol):
    async def put_file(self, record: FileRecord) -> None: ...
    async def get_file(self, file_id: str) -> FileRecord | None: ...
    async def delete_file(self, file_id: str) -> FileRecord | None: ...
    async def list_files(self) -> list[FileRecord]: ...  # oldest first
    async def put_batch(self, record: BatchRecord) -> None: ...
    async def get_batch(self, batch_id: str) -> BatchRecord | None: ...
    async def update_batch(self, batch_id: str, **changes: object) -> BatchRecord | None: ...
    async def list_batches(self) -> list[BatchRecord]: ...  # oldest first
    async def active_batches(self) -> list[str]: ...  # ids of batches not yet terminal
    # line: 0-based index in the input; ``ok``: counted as completed, else failed. False when the
    # line already had a result (it is kept, and counted once).
    async def record_result(self, batch_id: str, line: int, ok: bool, data: str) -> bool: ...
    async def results(self, batch_id: str) -> dict[int, tuple[bool, str]]: ...
    async def drop_results(self, batch_id: str) -> None: ...
    async def acquire(self, batch_id: str, holder: str, lease: float) -> bool: ...  # free or expired: taken
    async def renew(self, batch_id: str, holder: str, lease: float) -> bool: ...  # False: not ours any more
    async def release(self, batch_id: str, holder: str) -> None: ...
    async def close(self) -> None: ...


class MemoryBatchStore:
    """One process's files and batches, in dicts."""

    def __init__(self) -> None:
        self._files: dict[str, FileRecord] = {}
        self._batches: dict[str, BatchRecord] = {}
        self._results: dict[str, dict[int, tuple[bool, str]]] = {}
        self._leases: dict[str, tuple[str, float]] = {}

    async def put_file(self, record: FileRecord) -> None:
        self._files[record.id] = record.model_copy()

    async def get_file(self, file_id: str) -> FileRecord | None:
        record = self._files.get(file_id)
        return record.model_copy() if record else None

    async def delete_file(self, file_id: str) -> FileRecord | None:
        return self._files.pop(file_id, None)

    async def list_files(self) -> list[FileRecord]:
        return sorted((r.model_copy() for r in self._files.values()), key=lambda r: r.created_at)

    async def put_batch(self, record: BatchRecord) -> None:
        self._batches[record.id] = record.model_copy(deep=True, update={k: 0 for k in COUNTED})
        self._results.setdefault(record.id, {})

    async def get_batch(self, batch_id: str) -> BatchRecord | None:
        record = self._batches.get(batch_id)
        if record is None:
            return None
        results = self._results.get(batch_id, {}).values()
        done = sum(1 for ok, _ in results if ok)
        return record.model_copy(deep=True, update={"completed": done, "failed": len(results) - done})

    async def update_batch(self, batch_id: str, **changes: object) -> BatchRecord | None:
        record = self._batches.get(batch_id)
        if record is None:
            return None
        for key, value in changes.items():
            if key in COUNTED:
                raise ValueError(f"{key} is counted from the results")
            setattr(record, key, value)
        return await self.get_batch(batch_id)

    async def list_batches(self) -> list[BatchRecord]:
        return [b for i in sorted(self._batches, key=lambda i: self._batches[i].created_at)
                if (b := await self.get_batch(i)) is not None]

    async def active_batches(self) -> list[str]:
        return [i for i, b in self._batches.items() if not b.terminal]

    async def record_result(self, batch_id: str, line: int, ok: bool, data: str) -> bool:
        results = self._results.setdefault(batch_id, {})
        if line in results:
            return False
        results[line] = (ok, data)
        return True

    async def results(self, batch_id: str) -> dict[int, tuple[bool, str]]:
        return dict(self._results.get(batch_id, {}))

    async def drop_results(self, batch_id: str) -> None:
        # the counts stay what they were: keep the flags, drop the bodies
        self._results[batch_id] = {i: (ok, "") for i, (ok, _) in self._results.get(batch_id, {}).items()}

    async def acquire(self, batch_id: str, holder: str, lease: float) -> bool:
        now = time.monotonic()
        current = self._leases.get(batch_id)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leases[batch_id] = (holder, now + lease)
        return True

    async def renew(self, batch_id: str, holder: str, lease: float) -> bool:
        current = self._leases.get(batch_id)
        if current is None or current[0] != holder:
            return False
        self._leases[batch_id] = (holder, time.monotonic() + lease)
        return True

    async def release(self, batch_id: str, holder: str) -> None:
        if self._leases.get(batch_id, ("",))[0] == holder:
            del self._leases[batch_id]

    async def close(self) -> None:
        pass
