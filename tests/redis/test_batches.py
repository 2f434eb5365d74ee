"""Batches in a split deployment: state in Redis, one runner per batch (a lease), and an API restart
mid-batch that loses no line and answers none twice.

The store's contract is checked on Redis and in memory alike; the restart for real, with
``llamavid api`` killed (SIGKILL) while the batch runs and a new API process taking it over.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from server.engine.batches import BatchRecord, BatchStore, FileRecord, MemoryBatchStore
from server.engine.redis.batches import RedisBatchStore
from tests.serving import free_port, spawn, wait_ready

from .conftest import start_deployment, wait_for

LEASE = 1.0


@pytest.fixture(params=["redis", "memory"])
def store(request, redis_client: aioredis.Redis, namespace: str) -> BatchStore:
    if request.param == "memory":
        return MemoryBatchStore()
    return RedisBatchStore(redis_client, namespace, ttl=600)


async def test_one_holder_at_a_time_and_a_dead_holders_batch_is_taken_over(store: BatchStore) -> None:
    await store.put_batch(BatchRecord(id="batch_1", endpoint="/v1/chat/completions", input_file_id="file-1",
                                      status="in_progress", total=3))
    assert await store.active_batches() == ["batch_1"]
    assert await store.acquire("batch_1", "api-a", LEASE)
    assert not await store.acquire("batch_1", "api-b", LEASE)  # a live holder keeps it
    assert await store.renew("batch_1", "api-a", LEASE) and not await store.renew("batch_1", "api-b", LEASE)
    await asyncio.sleep(LEASE * 1.5)  # api-a died: its lease runs out
    assert await store.acquire("batch_1", "api-b", LEASE)
    assert not await store.renew("batch_1", "api-a", LEASE)  # the old holder learns it lost the batch
    await store.release("batch_1", "api-a")  # not its lease: nothing happens
    assert not await store.acquire("batch_1", "api-c", LEASE)
    await store.release("batch_1", "api-b")
    assert await store.acquire("batch_1", "api-c", LEASE)


async def test_a_line_is_counted_once_whoever_reports_it(store: BatchStore) -> None:
    await store.put_batch(BatchRecord(id="batch_2", endpoint="/v1/chat/completions", input_file_id="file-1",
                                      status="in_progress", total=3))
    assert await store.record_result("batch_2", 0, True, '{"custom_id": "a"}')
    assert not await store.record_result("batch_2", 0, False, '{"custom_id": "a", "again": 1}')
    assert await store.record_result("batch_2", 2, False, '{"custom_id": "c"}')
    record = await store.get_batch("batch_2")
    assert (record.completed, record.failed) == (1, 1)
    assert await store.results("batch_2") == {0: (True, '{"custom_id": "a"}'), 2: (False, '{"custom_id": "c"}')}
    await store.update_batch("batch_2", status="completed", output_file_id="file-9")
    await store.drop_results("batch_2")
    record = await store.get_batch("batch_2")
    assert (record.status, record.output_file_id, record.completed, record.failed) == ("completed", "file-9", 1, 1)
    assert await store.active_batches() == []
    await store.put_file(FileRecord(id="file-1", digest="ab12", bytes=3, filename="in.jsonl", purpose="batch"))
    assert (await store.get_file("file-1")).digest == "ab12"
    assert [f.id for f in await store.list_files()] == ["file-1"]
    assert (await store.delete_file("file-1")).id == "file-1" and await store.get_file("file-1") is None


def _lines(video_ids: list[str], per_video: int) -> list[dict]:
    return [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_ids[i % len(video_ids)]}},
            {"type": "text", "text": f"Question {i}: what happens?"}]}]}}
        for i in range(per_video * len(video_ids))]


def test_an_api_restart_resumes_the_batch_without_redoing_a_line(redis_available, tiny_checkpoint: Path,
                                                                  make_video, tmp_path: Path) -> None:
    d = start_deployment(tmp_path, tiny_checkpoint, workers=1, batch_lease_seconds=2, batch_concurrency=2)
    try:
        with httpx.Client(base_url=d.url, timeout=60) as http:
            ids = [http.post("/v1/videos", files={"file": (f"v{i}.mp4", make_video(seconds=2, fps=5), "video/mp4")})
                   .json()["id"] for i in range(3)]
        lines = _lines(ids, per_video=6)
        client = d.openai(timeout=60)
        upload = client.files.create(file=("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
                                     purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        results_key = d.key("batch-results", batch.id)
        wait_for(lambda: d.redis.hlen(results_key) >= 6, 60, "6 lines answered")
        d.api.kill()  # SIGKILL mid-batch: no goodbye, its lease just stops being renewed
        kept = {int(k): v for k, v in d.redis.hgetall(results_key).items()}
        assert 6 <= len(kept) < len(lines), len(kept)

        d.api = spawn("api", d.api.env, tmp_path / "api-2.log", free_port())  # a new API process
        wait_ready(d.api, path="/health")
        client = d.openai(timeout=60)
        batch = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b, 90,
                         "the batch to complete on the new API")

        assert (batch.request_counts.completed, batch.request_counts.failed) == (len(lines), 0), batch
        output = [json.loads(row) for row in client.files.content(batch.output_file_id).text.splitlines()]
        assert [row["custom_id"] for row in output] == [x["custom_id"] for x in lines]  # each once, in order
        for index, value in kept.items():  # what the first API finished is what the output says: not redone
            assert json.loads(value[1:]) == output[index], index
        # every line reached the worker once, plus at most the lines in flight at the kill
        answered = d.total("llamavid_request_success_total", finished_reason="length")
        assert len(lines) <= answered <= len(lines) + 2, answered
        assert "Traceback" not in d.api.output(), d.api.output()[-3000:]
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.stop()
