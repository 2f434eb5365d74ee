"""Load behaviour of a real ``llamavid serve``: concurrent requests, a full queue (429), and a
client that goes away (its generation stops and frees the worker)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEYS
from tests.server.live import scrape, wait_for, wait_idle

SLOW = 2000  # max_tokens: the tiny model never stops early, so this runs for seconds
ABORTED = ("llamavid_request_success_total", {"finished_reason": "abort"})
RUNNING = "llamavid_num_requests_running"


async def test_concurrent_requests_all_complete(server, short_video_id: str) -> None:
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": short_video_id}},
                                             {"type": "text", "text": "What happens?"}]}]
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        async def plain(i: int):
            completion = await client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=8 + i % 5)
            return completion.choices[0].finish_reason, completion.usage.model_extra["visual_tokens"]

        async def streamed(i: int):
            stream = await client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=8 + i % 5, stream=True,
                stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            return chunks[-2].choices[0].finish_reason, chunks[-1].usage.model_extra["visual_tokens"]

        results = await asyncio.wait_for(
            asyncio.gather(*(plain(i) if i % 2 else streamed(i) for i in range(16))), timeout=120)
    assert all(reason in ("stop", "length") and visual == 6 for reason, visual in results), results
    idle = wait_idle(server.url)
    assert idle["llamavid_num_requests_running"] == 0


async def test_full_queue_answers_429_with_retry_after(strict_server) -> None:
    """``queue_size=1 max_running=1``: one answering, one waiting, the third is refused."""
    url = strict_server.url
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    depth = ("llamavid_queue_depth", {"queue": "questions"})
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        async def slow() -> int:
            body = {"question": "Tell me everything.", "max_tokens": SLOW, "stream": True}
            async with client.stream("POST", "/v1/ask", json=body) as response:
                async for _ in response.aiter_lines():
                    pass
                return response.status_code

        holders = [asyncio.ensure_future(slow()) for _ in range(2)]
        try:
            await asyncio.to_thread(wait_for, lambda: scrape(url)[depth] == 2, 20,
                                    what="2 questions admitted")
            refused = await client.post("/v1/ask", json={"question": "Me too?", "max_tokens": 2})
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert (error["code"], error["type"]) == ("queue_full", "rate_limit_error")
            assert "queue is full" in error["message"]

            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEYS[0], max_retries=0) as oai:
                with pytest.raises(openai.RateLimitError):
                    await oai.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "Me too?"}], max_tokens=2)
        finally:
            for holder in holders:
                holder.cancel()  # disconnect: both generations are aborted
            await asyncio.gather(*holders, return_exceptions=True)
        await asyncio.to_thread(wait_idle, url)
        after = await client.post("/v1/ask", json={"question": "Now?", "max_tokens": 2})
        assert after.status_code == 200, after.text


def test_disconnect_mid_stream_frees_the_worker(server, openai_client) -> None:
    wait_idle(server.url)
    before = scrape(server.url)
    stream = openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me everything."}], max_tokens=SLOW,
        stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 5:
            break
    assert scrape(server.url)[RUNNING] == 1
    stream.close()  # the client goes away mid-answer

    after = wait_for(lambda: (s := scrape(server.url))[ABORTED] > before[ABORTED] and s, 10,
                     what="the aborted request to be counted")
    assert before.delta(after, ABORTED) == 1
    wait_for(lambda: scrape(server.url)[RUNNING] == 0, 5, what="the running gauge to drop")
    assert before.delta(scrape(server.url), "llamavid_generation_tokens_total") < SLOW

    started = time.monotonic()
    completion = openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Short one."}], max_tokens=4)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - started < 5  # not queued behind the abandoned generation


def test_disconnect_during_non_streaming_answer_frees_the_worker(server) -> None:
    wait_idle(server.url)
    before = scrape(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=httpx.Timeout(60, read=0.5),
                   json={"messages": [{"role": "user", "content": "Tell me everything."}],
                         "max_tokens": SLOW})
    after = wait_for(lambda: (s := scrape(server.url))[ABORTED] > before[ABORTED] and s, 10,
                     what="the abandoned non-streaming request to be aborted")
    assert before.delta(after, ("llamavid_request_success_total", {"finished_reason": "length"})) == 0
    wait_for(lambda: scrape(server.url)[RUNNING] == 0, 5, what="the running gauge to drop")
    assert before.delta(scrape(server.url), "llamavid_generation_tokens_total") < SLOW
