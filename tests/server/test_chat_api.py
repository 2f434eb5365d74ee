"""``/health``, ``/ready``, ``/v1/models`` and ``/v1/chat/completions`` driven with the openai client
and raw httpx against a real ``llamavid serve`` (tiny random checkpoint: answers are noise, but
token counts, framing and determinism are real)."""

from __future__ import annotations

import base64
import io
import json

import httpx
from PIL import Image

from tests.server.live import scrape, sse_events

QUESTION = "What happens in the video?"


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def ask_about(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [video_part(url), {"type": "text", "text": text}]}]


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# -- health, readiness, models ------------------------------------------------------------------------
def test_health_ready_and_models(http: httpx.Client, openai_client) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": True, "cache": True}

    models = http.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    entry = models["data"][0]
    assert entry["object"] == "model" and entry["max_model_len"] == 2048
    assert entry["llamavid"]["tokens_per_frame"] == 2
    assert entry["llamavid"]["demo"] is None  # a user-given checkpoint is not the demo
    assert "warning" not in entry["llamavid"]
    assert [m.id for m in openai_client.models.list().data] == [entry["id"]]


def test_metrics_exposition_names(http: httpx.Client) -> None:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for name in ("llamavid_time_to_first_token_seconds_bucket", "llamavid_feature_cache_hits_total",
                 "llamavid_frames_decoded_total", 'llamavid_stage_seconds_count{stage="decode"}',
                 'llamavid_request_success_total{finished_reason="abort"}', "llamavid_num_requests_running",
                 "llamavid_model_info{"):
        assert name in response.text, name


# -- answers ------------------------------------------------------------------------------------------
def test_non_streaming_answer_counts_two_visual_tokens_per_frame(openai_client, short_video_id: str) -> None:
    completion = openai_client.chat.completions.create(
        model="tiny", messages=ask_about(short_video_id), max_tokens=8)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.model_extra["visual_tokens"] == 3 * 2  # 3 s at the default 1 fps, 2 tokens per frame
    assert usage.prompt_tokens_details.model_extra["visual_tokens"] == 6
    assert usage.prompt_tokens > 6 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.model_extra["llamavid"]["video_id"] == short_video_id


def test_streaming_answer_ends_with_usage_and_done(http: httpx.Client, openai_client,
                                                   short_video_id: str) -> None:
    chunks = list(openai_client.chat.completions.create(
        model="tiny", messages=ask_about(short_video_id), max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in content)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.model_extra["visual_tokens"] == 6

    # The raw stream: data-only SSE events, the last one is [DONE].
    body = {"messages": ask_about(short_video_id), "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = sse_events(raw)
    assert events[-1] == ("message", "[DONE]")
    assert all(name == "message" for name, _ in events)


def test_streamed_text_equals_non_streamed_text(openai_client, short_video_id: str) -> None:
    plain = openai_client.chat.completions.create(
        model="tiny", messages=ask_about(short_video_id), max_tokens=12)
    streamed = openai_client.chat.completions.create(
        model="tiny", messages=ask_about(short_video_id), max_tokens=12, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == plain.choices[0].message.content


def test_image_data_url_question(openai_client, http: httpx.Client) -> None:
    url = png_data_url()
    completion = openai_client.chat.completions.create(model="tiny", max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                     {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]}])
    assert completion.usage.model_extra["visual_tokens"] == 2  # one image = one frame
    answer = http.post("/v1/ask", json={"question": "What colour?", "image_url": url, "max_tokens": 4}).json()
    assert answer["usage"]["visual_tokens"] == 2 and answer["video_id"] is None


def test_video_as_data_url(openai_client, videos) -> None:
    url = "data:video/mp4;base64," + base64.b64encode(videos.short.read_bytes()).decode()
    completion = openai_client.chat.completions.create(model="tiny", messages=ask_about(url), max_tokens=2)
    assert completion.usage.model_extra["visual_tokens"] == 6
    assert completion.model_extra["llamavid"]["video_id"].startswith("vid-")


def test_multi_turn_chat_and_system_message(openai_client, short_video_id: str) -> None:
    single = openai_client.chat.completions.create(
        model="tiny", messages=ask_about(short_video_id), max_tokens=4)
    turns = [
        *ask_about(short_video_id),
        {"role": "assistant", "content": "A grey screen gets brighter."},
        {"role": "user", "content": "And at the end?"},
    ]
    multi = openai_client.chat.completions.create(model="tiny", messages=turns, max_tokens=4)
    assert multi.choices[0].message.content
    assert multi.usage.model_extra["visual_tokens"] == 6  # the video stays in the conversation
    assert multi.usage.prompt_tokens > single.usage.prompt_tokens

    # A system message replaces the template's (long) default system prompt.
    system = [{"role": "system", "content": "Be terse."}, *turns]
    terse = openai_client.chat.completions.create(model="tiny", messages=system, max_tokens=4)
    assert terse.usage.model_extra["visual_tokens"] == 6
    assert terse.usage.prompt_tokens < multi.usage.prompt_tokens


def test_stop_string_cuts_the_answer(openai_client) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=48)
    text = full.choices[0].message.content
    # A plain-ASCII piece from the middle of the greedy answer, then ask to stop there.
    pairs = [text[i : i + 2] for i in range(2, len(text) - 2)]
    stop = next(p for p in pairs if p.isascii() and p.isprintable() and p.strip() == p)
    cut = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=48, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    streamed = openai_client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=48, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_same_seed_same_sample(openai_client, short_video_id: str) -> None:
    def sample(seed: int) -> str:
        completion = openai_client.chat.completions.create(
            model="tiny", messages=ask_about(short_video_id), max_tokens=24, temperature=1.0, top_p=1.0,
            seed=seed)
        return completion.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))  # the seed matters: it is really sampling


def test_extra_body_fps_and_max_frames_change_the_frame_count(openai_client, short_video_id: str) -> None:
    def visual(**extra) -> int:
        completion = openai_client.chat.completions.create(
            model="tiny", messages=ask_about(short_video_id), max_tokens=2, extra_body=extra)
        return completion.usage.model_extra["visual_tokens"]

    assert visual() == 6  # 3 frames at 1 fps
    assert visual(fps=2) == 12  # 6 frames
    assert visual(fps=4, max_frames=5) == 10  # 12 frames capped at 5
    assert visual(start_time=1.0) == 4  # frames at 1 s and 2 s


def test_streamed_extraction_progress_then_answer(openai_client, media_host, videos, server) -> None:
    """A question whose video is still extracting waits, streaming progress chunks meanwhile."""
    url = media_host.media(videos.fresh("progress-chat.mp4", seconds=60, fps=8))
    before = scrape(server.url)
    chunks = list(openai_client.chat.completions.create(
        model="tiny", messages=ask_about(url), max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"fps": 8}))
    progress = [c.model_extra["llamavid"] for c in chunks if not c.choices and c.model_extra.get("llamavid")]
    assert progress, "no progress chunks while the video was extracting"
    assert all(p["type"] == "progress" and p["frames_total"] == 480 for p in progress)
    done = [p["frames_done"] for p in progress]
    assert done == sorted(done) and done[0] < 480
    first_content = next(i for i, c in enumerate(chunks) if c.choices)
    assert all(not c.choices for c in chunks[:first_content])  # progress comes before the answer
    assert chunks[-1].usage.model_extra["visual_tokens"] == 960
    after = scrape(server.url)
    assert before.delta(after, "llamavid_frames_decoded_total") == 480


def test_sse_chat_stream_snapshot(http: httpx.Client, short_video_id: str, snapshot) -> None:
    body = {"model": "tiny", "messages": ask_about(short_video_id), "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}, "relevance": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        raw = response.read().decode()
    snapshot("chat_stream.txt", normalise_chat_stream(raw))


def normalise_chat_stream(raw: str) -> str:
    """Keep the framing; replace ids, times, text and scores; merge runs of content deltas."""
    assert raw.endswith("\r\n\r\n") and "\n\n" not in raw.replace("\r\n", "")
    out: list[str] = []
    for name, data in sse_events(raw):
        assert name == "message"
        if data == "[DONE]":
            out.append("data: [DONE]")
            continue
        chunk = json.loads(data)
        assert chunk["id"].startswith("chatcmpl-") and isinstance(chunk["created"], int)
        chunk["id"], chunk["created"], chunk["model"] = "chatcmpl-ID", 0, "MODEL"
        for choice in chunk["choices"]:
            if choice["delta"].get("content"):
                choice["delta"]["content"] = "TEXT"
        extension = chunk.get("llamavid") or {}
        if "video_id" in extension:
            extension["video_id"] = "vid-ID"
        for frame in extension.get("frames", []):
            frame["score"], frame["weight"] = "S", "W"
        for moment in extension.get("moments", []):
            assert moment["thumbnail_url"].endswith(f"/frames/{moment['frame']}.jpg")
            moment["thumbnail_url"], moment["score"] = "URL", "S"
        if chunk.get("usage"):
            chunk["usage"]["prompt_tokens"] = chunk["usage"]["total_tokens"] = "N"
        line = "data: " + json.dumps(chunk, separators=(",", ":"))
        if out and line == out[-1] and '"content":"TEXT"' in line:
            continue
        out.append(line)
    return "\n".join(out) + "\n"

