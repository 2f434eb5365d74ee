"""The two SSE encoders handle every event type, and cancel the stream when the client leaves."""

from __future__ import annotations

import json

from server.api.sse import ask_events, chat_chunks
from server.engine.protocol import EventStream
from tests.server.engine.test_events import EVENTS


async def _drain(gen) -> list[dict]:
    return [item async for item in gen]


async def _events():
    for event in EVENTS:
        yield event


async def test_chat_chunks_cover_every_event() -> None:
    stream = EventStream()
    out = await _drain(chat_chunks(_events(), stream, completion_id="chatcmpl-1", created=0, model="m",
                                   include_usage=True, extension={"video_id": "vid-1"},
                                   base_url="http://127.0.0.1:8000/"))
    bodies = [item["data"] for item in out]
    assert bodies[-1] == "[DONE]" and stream.cancelled
    chunks = [json.loads(b) for b in bodies[:-1]]
    kinds = [c.get("llamavid", {}).get("type") for c in chunks]
    assert kinds[:2] == ["progress", "relevance"] and chunks[0]["llamavid"]["video_id"] == "vid-1"
    assert chunks[1]["llamavid"]["moments"] == [{"start": 0.0, "end": 1.0, "score": 0.7, "frame": 0,
                                                 "thumbnail_url": "http://127.0.0.1:8000/v1/videos/vid-1/frames/0.jpg"}]
    assert chunks[2]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[3]["choices"][0]["delta"] == {"content": "héllo 🦙"}
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[4]["llamavid"] == {"video_id": "vid-1", "frames_used": 1, "frames_total": 2,
                                     "subtitles": {"source": "file", "cues": 3}}
    assert chunks[5]["usage"]["prompt_tokens_details"] == {"visual_tokens": 6}
    assert chunks[6]["error"]["code"] == "out_of_memory"


async def test_ask_events_cover_every_event() -> None:
    stream = EventStream()
    out = await _drain(ask_events(_events(), stream, "vid-1", "http://127.0.0.1:8000/"))
    assert [item["event"] for item in out] == ["progress", "relevance", "moments", "delta", "done", "error"]
    moments = json.loads(out[2]["data"])["moments"]
    assert moments[0]["thumbnail_url"] == "http://127.0.0.1:8000/v1/videos/vid-1/frames/0.jpg"
    done = json.loads(out[4]["data"])
    assert done["video_id"] == "vid-1" and done["usage"]["completion_tokens"] == 8
    assert (done["frames_used"], done["frames_total"]) == (1, 2)
    assert json.loads(out[5]["data"])["error"]["type"] == "server_error" and stream.cancelled


async def test_chat_chunks_of_several_answers_each_finish_once() -> None:
    """Answers interleave by index; each one's finish goes out when it ends, the last one's with the
    video usage once the request is done; log-probabilities ride on their deltas."""
    from server.engine.events import DeltaEvent, DoneEvent, TokenLogprob

    def lp(token: str) -> list[TokenLogprob]:
        return [TokenLogprob(token=token, logprob=-0.5, bytes=list(token.encode()))]

    events = [
        DeltaEvent(text="A", index=0, logprobs=lp("A")),
        DeltaEvent(text="B", index=1, logprobs=lp("B")),
        DeltaEvent(text="", offset=1, index=1, logprobs=[], token_offset=1, finish_reason="stop"),
        DeltaEvent(text="a", offset=1, index=0, logprobs=lp("a"), token_offset=1, finish_reason="length"),
        DoneEvent(finish_reason="length", prompt_tokens=10, visual_tokens=4, completion_tokens=4, frames_used=2,
                  frames_total=2),
    ]

    async def source():
        for event in events:
            yield event

    out = await _drain(chat_chunks(source(), EventStream(), completion_id="c", created=0, model="m",
                                   include_usage=False, extension={"video_id": "vid-1"}, base_url="http://h/", n=2))
    chunks = [json.loads(item["data"]) for item in out[:-1]]
    seen = [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert seen == [(0, {"role": "assistant", "content": ""}, None), (0, {"content": "A"}, None),
                    (1, {"role": "assistant", "content": ""}, None), (1, {"content": "B"}, None),
                    (1, {}, "stop"), (0, {"content": "a"}, None), (0, {}, "length")]
    assert chunks[1]["choices"][0]["logprobs"]["content"][0]["token"] == "A"
    assert "llamavid" not in chunks[4] and chunks[-1]["llamavid"]["frames_used"] == 2
