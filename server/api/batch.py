"""Batch jobs: many ``/v1/chat/completions`` requests from a JSONL file, answered with nobody connected.

``parse_jsonl`` checks an upload line by line; ``parse_requests`` turns a batch's input into
``BatchLine``s (or the ``LineError``s that fail the batch). ``LineRunner`` answers lines through
``complete_chat``, the code of the HTTP route, grouped by video: the groups are taken in order of
first appearance, a few at a time; a group's first pending question runs alone (it registers the
video and waits for its one extraction), then the others run together, bounded. Both the server
(``BatchService``) and ``llamavid batch`` use it.

``BatchService`` runs the batches of one API process. Every finished line is stored at once
(``BatchStore.record_result``); a runner holds the batch's lease and renews it; every few seconds
each API process takes over the active batches whose lease ran out, and goes on with the lines
that have no result yet. Cancelling sets the batch's status; its runner sees it at the next renewal
and stops its in-flight lines through their ``gone`` waiter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import ValidationError

from cache.keys import digest_bytes

from ..engine.batches import BatchRecord, BatchStore, FileRecord, LineError
from ..engine.protocol import EngineClient, EngineUnavailable, QueueFull
from ..fetch.netguard import MediaError
from ..metrics import LlamaVidMetrics
from ..settings import Settings
from .completions import complete_chat
from .errors import APIError, error_body
from .ingest import MediaIngest
from .protocol import ChatCompletionRequest, ImagePart, VideoPart

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions",)
COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_LISTED_ERRORS = 100
RETRY_SECONDS = 1.0  # a full queue or no worker: the line waits and tries again


# -- input -----------------------------------------------------------------------------------------
def parse_jsonl(data: bytes, max_lines: int) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line; 400 naming the first bad one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise APIError(400, f"line {line} is not UTF-8 text", code="invalid_jsonl", param="file") from None
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"line {number} is not valid JSON: {exc.msg} (column {exc.colno})",
                           code="invalid_jsonl", param="file") from None
        if not isinstance(value, dict):
            raise APIError(400, f"line {number} is not a JSON object", code="invalid_jsonl", param="file")
        out.append((number, value))
        if len(out) > max_lines:
            raise APIError(400, f"the file has more than {max_lines} requests, this server's limit per batch",
                           code="too_many_lines", param="file")
    if not out:
        raise APIError(400, "the file has no lines", code="empty_file", param="file")
    return out


@dataclass
class BatchLine:
    index: int  # position among the requests, 0-based (the output's order)
    number: int  # line number in the file, 1-based
    custom_id: str
    request: ChatCompletionRequest

    @property
    def media(self) -> str | None:
        """The first video or image of the conversation (URL or video id): its group."""
        for message in self.request.messages:
            for part in message.content if isinstance(message.content, list) else ():
                if isinstance(part, VideoPart | ImagePart):
                    ref = part.ref()
                    return f"{part.type}:" + (ref.url if ref is not None else "uuid:" + str(part.uuid))
        return None


def _pydantic_error(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ()))
    msg = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid")
    return (f"body.{where}: {msg}" if where else f"body: {msg}"), (f"body.{where}" if where else "body")


def parse_requests(objects: list[tuple[int, dict]], endpoint: str) -> tuple[list[BatchLine], list[LineError]]:
    """Every line as a request for ``endpoint``, or the errors of those that are not."""
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    for number, obj in objects:
        def bad(code: str, message: str, param: str | None = None, number: int = number) -> None:
            errors.append(LineError(code=code, message=f"line {number}: {message}", line=number, param=param))

        extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        custom_id = obj.get("custom_id")
        if extra:
            bad("invalid_request", f"unknown field {extra[0]!r}", extra[0])
        elif not isinstance(custom_id, str) or not custom_id:
            bad("missing_custom_id", "custom_id must be a non-empty string", "custom_id")
        elif custom_id in seen:
            bad("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line", "custom_id")
        elif obj.get("method") != "POST":
            bad("invalid_method", f"method must be \"POST\", not {obj.get('method')!r}", "method")
        elif obj.get("url") != endpoint:
            bad("mismatched_url", f"url {obj.get('url')!r} is not the batch's endpoint {endpoint}", "url")
        elif not isinstance(obj.get("body"), dict):
            bad("invalid_body", "body must be a JSON object", "body")
        else:
            seen.add(custom_id)
            try:
                request = ChatCompletionRequest.model_validate(obj["body"])
            except ValidationError as exc:
                bad("invalid_body", *_pydantic_error(exc))
                continue
            if request.stream:
                bad("invalid_body", "stream is not supported in a batch", "body.stream")
                continue
            lines.append(BatchLine(len(lines), number, custom_id, request))
    return lines, errors


def group_by_media(lines: list[BatchLine]) -> list[list[BatchLine]]:
    """Lines about the same video (or image) together, groups in order of first appearance."""
    groups: dict[str | None, list[BatchLine]] = {}
    for line in lines:
        groups.setdefault(line.media, []).append(line)
    return list(groups.values())


# -- output ----------------------------------------------------------------------------------------
def success_line(line: BatchLine, body: dict) -> dict:
    request_id = "req-" + body["id"].split("-", 1)[-1]
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_line(line: BatchLine, status: int, message: str, code: str | None, param: str | None = None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": None, "body": error_body(status, message, code, param)},
            "error": {"code": code, "message": message}}


# -- running ---------------------------------------------------------------------------------------
OnResult = Callable[[BatchLine, bool, dict], Awaitable[None]]
Prepare = Callable[[BatchLine], Awaitable[ChatCompletionRequest]]


class LineRunner:
    """Answers lines through ``complete_chat`` until they are all answered or ``stop`` is set.

    ``on_result(line, ok, result_line)`` is called once per answered line; a line stopped by
    ``stop`` has no result. A full queue or a missing worker is waited out, not a failure.
    """

    def __init__(self, engine: EngineClient, ingest: MediaIngest, settings: Settings, *, base_url: str,
                 prepare: Prepare | None = None) -> None:
        self.engine, self.ingest, self.settings, self.base_url = engine, ingest, settings, base_url
        self.prepare = prepare

    async def run(self, lines: list[BatchLine], on_result: OnResult, stop: asyncio.Event) -> None:
        groups = group_by_media(lines)
        slots = asyncio.Semaphore(self.settings.batch_concurrency)
        queue: asyncio.Queue[list[BatchLine]] = asyncio.Queue()
        for group in groups:
            queue.put_nowait(group)

        async def take_groups() -> None:
            while not stop.is_set() and not queue.empty():
                group = queue.get_nowait()
                await self._one(group[0], slots, on_result, stop)  # alone: the video is registered once
                rest = iter(group[1:])

                async def take_lines(rest=rest) -> None:  # several takers share one iterator
                    for line in rest:
                        if stop.is_set():
                            return
                        await self._one(line, slots, on_result, stop)

                await asyncio.gather(*(take_lines() for _ in range(min(self.settings.batch_concurrency,
                                                                        len(group) - 1))))

        await asyncio.gather(*(take_groups() for _ in range(min(self.settings.batch_video_groups, len(groups)))))

    async def _one(self, line: BatchLine, slots: asyncio.Semaphore, on_result: OnResult,
                   stop: asyncio.Event) -> None:
        async def gone() -> None:
            await stop.wait()

        while not stop.is_set():
            async with slots:
                if stop.is_set():
                    return
                try:
                    request = await self.prepare(line) if self.prepare else line.request
                    card = await self.engine.model_card()
                    if card is None:
                        raise EngineUnavailable("no GPU worker is running", code="no_worker")
                    body = await complete_chat(request, self.engine, self.ingest, self.settings, card, gone,
                                               base_url=self.base_url)
                except (QueueFull, EngineUnavailable) as exc:
                    wait = max(RETRY_SECONDS, min(getattr(exc, "retry_after", 1), 5))
                except APIError as exc:
                    if stop.is_set():
                        return  # cancelled in flight (499): no result
                    if exc.status in (429, 503):
                        wait = RETRY_SECONDS
                    else:
                        await on_result(line, False, error_line(line, exc.status, exc.message, exc.code, exc.param))
                        return
                except MediaError as exc:
                    await on_result(line, False, error_line(line, exc.status_code, exc.message, exc.code))
                    return
                except Exception as exc:  # a bug: the line fails, the batch goes on
                    log.exception("batch line %s (%s) failed", line.number, line.custom_id)
                    await on_result(line, False, error_line(line, 500, f"internal error: {type(exc).__name__}",
                                                            "internal_error"))
                    return
                else:
                    await on_result(line, True, success_line(line, body))
                    return
            try:  # outside the slot: let other lines use it meanwhile
                await asyncio.wait_for(stop.wait(), wait)
            except asyncio.TimeoutError:
                pass


# -- the service -----------------------------------------------------------------------------------
def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


class BatchService:
    """The batches of one API process: create, cancel, run (holding each one's lease), take over."""

    def __init__(self, store: BatchStore, engine: EngineClient, ingest: MediaIngest, settings: Settings,
                 metrics: LlamaVidMetrics) -> None:
        self.store, self.engine, self.ingest, self.settings, self.metrics = store, engine, ingest, settings, metrics
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease = settings.batch_lease_seconds
        self._running: dict[str, asyncio.Task] = {}
        self._stops: dict[str, asyncio.Event] = {}  # of the batches running here: set to stop them
        self._supervisor: asyncio.Task | None = None

    # -- files -------------------------------------------------------------------------------------
    async def file_bytes(self, record: FileRecord) -> bytes:
        data = await self.engine.media.get(record.digest)
        if data is None:
            raise APIError(410, f"the content of file {record.id} is no longer stored", code="file_gone")
        return data

    async def put_file(self, data: bytes, filename: str, purpose: str, lines: int) -> FileRecord:
        digest = digest_bytes(data)
        await self.engine.media.put(digest, data)
        record = FileRecord(digest=digest, bytes=len(data), filename=filename, purpose=purpose, lines=lines)
        await self.store.put_file(record)
        return record

    # -- batches -----------------------------------------------------------------------------------
    async def create(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None, base_url: str) -> BatchRecord:
        if endpoint not in ENDPOINTS:
            raise APIError(400, f"endpoint {endpoint!r} is not supported; batches run {', '.join(ENDPOINTS)}",
                           code="unsupported_endpoint", param="endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise APIError(400, f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}",
                           code="invalid_completion_window", param="completion_window")
        source = await self.store.get_file(input_file_id)
        if source is None:
            raise APIError(404, f"no file with id {input_file_id!r}", code="file_not_found", param="input_file_id")
        if source.purpose != "batch":
            raise APIError(400, f"file {input_file_id} has purpose {source.purpose!r}; a batch reads a file "
                                "uploaded with purpose \"batch\"", code="invalid_file_purpose", param="input_file_id")
        objects = await asyncio.to_thread(parse_jsonl, await self.file_bytes(source), self.settings.max_batch_lines)
        _, errors = await asyncio.to_thread(parse_requests, objects, endpoint)
        card = await self.engine.model_card()
        now = time.time()
        record = BatchRecord(endpoint=endpoint, input_file_id=input_file_id, completion_window=completion_window,
                             metadata=metadata, model=card.id if card else None, base_url=base_url,
                             total=len(objects), created_at=now, expires_at=now + COMPLETION_WINDOWS[completion_window])
        if errors:
            record.status, record.failed_at = "failed", now
            record.errors = errors[:MAX_LISTED_ERRORS]
            self.metrics.batch_finished("failed")
        else:
            record.status, record.in_progress_at = "in_progress", now
        await self.store.put_batch(record)
        if not errors:
            await self._take(record.id)
        return await self.store.get_batch(record.id) or record

    async def cancel(self, batch_id: str) -> BatchRecord:
        record = await self.get(batch_id)
        if record.status in ("cancelling", "cancelled"):
            return record
        if record.terminal:
            raise APIError(409, f"batch {batch_id} is already {record.status}", code="batch_finished")
        updated = await self.store.update_batch(batch_id, status="cancelling", cancelling_at=time.time())
        if batch_id in self._stops:
            self._stops[batch_id].set()  # running here: stop now (elsewhere, its runner sees the status soon)
        else:
            await self._take(batch_id)  # finalize it now, if nobody runs it anywhere
        return updated or record

    async def get(self, batch_id: str) -> BatchRecord:
        record = await self.store.get_batch(batch_id)
        if record is None:
            raise APIError(404, f"no batch with id {batch_id!r}", code="batch_not_found")
        return record

    # -- running -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Take over the active batches nobody runs, now and every half lease."""
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def close(self) -> None:
        tasks = [t for t in (self._supervisor, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervise(self) -> None:
        while True:
            try:
                for batch_id in await self.store.active_batches():
                    await self._take(batch_id)
            except Exception as exc:  # Redis away: try again later
                log.warning("could not look for batches to run: %s", exc)
            await asyncio.sleep(self.lease / 2)

    async def _take(self, batch_id: str) -> None:
        if batch_id in self._running or not await self.store.acquire(batch_id, self.holder, self.lease):
            return
        task = asyncio.ensure_future(self._run(batch_id))
        self._running[batch_id] = task
        self.metrics.batches_running.set(len(self._running))
        task.add_done_callback(lambda _: self._ran(batch_id))

    def _ran(self, batch_id: str) -> None:
        self._running.pop(batch_id, None)
        self.metrics.batches_running.set(len(self._running))

    async def _run(self, batch_id: str) -> None:
        stop, lost = asyncio.Event(), asyncio.Event()
        self._stops[batch_id] = stop
        keeper = asyncio.ensure_future(self._keep_lease(batch_id, stop, lost))
        try:
            record = await self.store.get_batch(batch_id)
            if record is None or record.terminal:
                return
            if record.status == "in_progress":
                log.info("running batch %s (%d of %d lines answered)", batch_id, record.completed + record.failed,
                         record.total)
                try:
                    await self._answer(record, stop)
                except APIError as exc:  # its input is gone: nothing can run
                    await self.store.update_batch(batch_id, status="failed", failed_at=time.time(),
                                                  errors=[LineError(code=exc.code or "failed", message=exc.message)])
                    self.metrics.batch_finished("failed")
                    return
            if lost.is_set():
                return
            record = await self.store.get_batch(batch_id)
            if record is not None and not record.terminal:
                await self._finalize(record)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s stopped; another runner will take it over", batch_id)
            return
        finally:
            keeper.cancel()
            self._stops.pop(batch_id, None)
            if not lost.is_set():
                try:
                    await self.store.release(batch_id, self.holder)
                except Exception:
                    pass

    async def _keep_lease(self, batch_id: str, stop: asyncio.Event, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                if not await self.store.renew(batch_id, self.holder, self.lease):
                    log.warning("lost the lease of batch %s: another process runs it", batch_id)
                    lost.set()
                    stop.set()
                    return
                record = await self.store.get_batch(batch_id)
            except Exception as exc:
                log.warning("could not renew the lease of batch %s: %s", batch_id, exc)
                continue
            if record is None or record.status == "cancelling" or \
                    (record.expires_at is not None and time.time() > record.expires_at):
                stop.set()

    async def _answer(self, record: BatchRecord, stop: asyncio.Event) -> None:
        source = await self.store.get_file(record.input_file_id)
        if source is None:
            raise APIError(410, "the batch's input file was deleted", code="file_gone")
        objects = await asyncio.to_thread(parse_jsonl, await self.file_bytes(source), self.settings.max_batch_lines)
        lines, _ = await asyncio.to_thread(parse_requests, objects, record.endpoint)
        done = await self.store.results(record.id)
        pending = [line for line in lines if line.index not in done]

        async def on_result(line: BatchLine, ok: bool, result: dict) -> None:
            if await self.store.record_result(record.id, line.index, ok, json.dumps(result, ensure_ascii=False)):
                self.metrics.batch_line("completed" if ok else "failed")

        runner = LineRunner(self.engine, self.ingest, self.settings, base_url=record.base_url or "/")
        await runner.run(pending, on_result, stop)

    async def _finalize(self, record: BatchRecord) -> None:
        """Write the output and error files from the stored results, in input order, and finish."""
        now = time.time()
        if record.status == "cancelling":
            final = "cancelled"
        elif record.expires_at is not None and now > record.expires_at:
            final = "expired"
        else:
            final = "completed"
            await self.store.update_batch(record.id, status="finalizing", finalizing_at=now)
        results = await self.store.results(record.id)
        outputs = [data for _, (ok, data) in sorted(results.items()) if ok]
        failures = [data for _, (ok, data) in sorted(results.items()) if not ok]
        changes: dict[str, object] = {}
        for kind, rows in (("output_file_id", outputs), ("error_file_id", failures)):
            if rows:
                data = "".join(row + "\n" for row in rows).encode("utf-8")
                name = f"{record.id}_{'output' if kind == 'output_file_id' else 'error'}.jsonl"
                changes[kind] = (await self.put_file(data, name, "batch_output", len(rows))).id
        changes["status"], changes[f"{final}_at"] = final, time.time()
        await self.store.update_batch(record.id, **changes)
        await self.store.drop_results(record.id)
        self.metrics.batch_finished(final)
        log.info("batch %s %s: %d answered, %d failed", record.id, final, len(outputs), len(failures))


def batch_object(record: BatchRecord) -> dict:
    """The batch as OpenAI's ``Batch`` type reads it."""
    def stamp(value: float | None) -> int | None:
        return None if value is None else int(value)

    return {
        "id": record.id, "object": "batch", "endpoint": record.endpoint, "model": record.model,
        "errors": {"object": "list", "data": [e.model_dump() for e in record.errors]} if record.errors else None,
        "input_file_id": record.input_file_id, "completion_window": record.completion_window,
        "status": record.status, "output_file_id": record.output_file_id, "error_file_id": record.error_file_id,
        "created_at": int(record.created_at), "in_progress_at": stamp(record.in_progress_at),
        "expires_at": stamp(record.expires_at), "finalizing_at": stamp(record.finalizing_at),
        "completed_at": stamp(record.completed_at), "failed_at": stamp(record.failed_at),
        "expired_at": stamp(record.expired_at), "cancelling_at": stamp(record.cancelling_at),
        "cancelled_at": stamp(record.cancelled_at),
        "request_counts": {"total": record.total, "completed": record.completed, "failed": record.failed},
        "metadata": record.metadata,
    }


def file_object(record: FileRecord) -> dict:
    return {"id": record.id, "object": "file", "bytes": record.bytes, "created_at": int(record.created_at),
            "filename": record.filename, "purpose": record.purpose, "status": "processed", "expires_at": None,
            "status_details": None}
