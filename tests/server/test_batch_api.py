"""The Batch API (``/v1/files``, ``/v1/batches``) through the unmodified openai client, on real servers.

The big batch runs on the trained demo model, whose answers depend on the clip and the question
(the random tiny model says nearly the same thing to everything, which would make "the same
answers as one by one" prove little). The other tests use the session's tiny server.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from model.demo import data
from tests.conftest import serve_demo
from tests.server.conftest import MediaHost, Videos
from tests.server.live import scrape, wait_for
from tests.serving import Process

VIDEOS, QUESTIONS = 20, 10
TERMINAL = ("completed", "failed", "cancelled", "expired")


def _line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _openai(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _wait_done(client, batch_id: str, timeout: float = 120) -> tuple[object, list[int]]:
    """Poll the batch until it is terminal: (the batch, its answered counts as seen on the way)."""
    seen: list[int] = []

    def finished():
        batch = client.batches.retrieve(batch_id)
        seen.append(batch.request_counts.completed + batch.request_counts.failed)
        return batch if batch.status in TERMINAL else None

    return wait_for(finished, timeout=timeout, interval=0.2, what=f"batch {batch_id} to finish"), seen



@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    """Its own: the test counts the extractions of its videos, which another test may have sent."""
    yield from serve_demo(tmp_path_factory.mktemp("batch-demo"))

def test_200_questions_over_20_videos_each_video_extracted_once(demo_server: Process, media_host: MediaHost,
                                                                tmp_path: Path) -> None:
    client = _openai(demo_server.url)
    urls, asked = [], []
    for v in range(VIDEOS):
        example = data.make_example(30_000 + v, "binding")
        urls.append(media_host.media(data.write_clip(example.scene, tmp_path / f"batch-clip-{v}.mp4")))
        asked.append(data.questions(example.scene, random.Random(v))[:QUESTIONS])
    # interleaved: line i asks about video i % 20, so only grouping by video keeps each one's questions together
    bodies = [{"model": "demo", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": urls[i % VIDEOS]}},
        {"type": "text", "text": asked[i % VIDEOS][i // VIDEOS].question}]}]} for i in range(VIDEOS * QUESTIONS)]
    lines = [_line(f"question-{i}", body) for i, body in enumerate(bodies)]

    before = scrape(demo_server.url)
    upload = client.files.create(file=("questions.jsonl", _jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(_jsonl(lines))
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"run": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == len(lines), batch
    batch, seen = _wait_done(client, batch.id)
    after = scrape(demo_server.url)

    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(lines), 0), batch
    assert batch.error_file_id is None and batch.metadata == {"run": "test"} and batch.completed_at is not None
    assert seen == sorted(seen)  # progress only moves forward
    output = [json.loads(row) for row in client.files.content(batch.output_file_id).text.splitlines()]
    assert [row["custom_id"] for row in output] == [line["custom_id"] for line in lines]
    assert all(row["response"]["status_code"] == 200 and row["error"] is None for row in output)
    answers = [row["response"]["body"]["choices"][0]["message"]["content"] for row in output]

    # each video decoded and encoded once: 20 extractions, each of its clip's frames
    assert before.delta(after, ("llamavid_video_jobs_total", {"status": "done"})) == VIDEOS
    assert before.delta(after, ("llamavid_frames_encoded_total", {})) == \
        before.delta(after, ("llamavid_frames_decoded_total", {}))
    assert before.delta(after, ("llamavid_batch_lines_total", {"status": "completed"})) == len(lines)
    assert before.delta(after, ("llamavid_batches_total", {"status": "completed"})) == 1

    # the same answers as the same requests one by one (the features are cached by now: nothing extracts)
    with ThreadPoolExecutor(4) as pool:
        single = list(pool.map(lambda body: client.chat.completions.create(**body), bodies))
    assert [c.choices[0].message.content for c in single] == answers
    assert scrape(demo_server.url)["llamavid_video_jobs_total", {"status": "done"}] == \
        after["llamavid_video_jobs_total", {"status": "done"}]
    right = sum(a.strip().rstrip(".").lower() == asked[i % VIDEOS][i // VIDEOS].answer for i, a in enumerate(answers))
    assert right >= 0.8 * len(lines), right  # the demo model knows its clips: real answers, not noise


def test_cancel_stops_the_lines_in_flight_and_keeps_what_completed(server: Process) -> None:
    """Long answers (the tiny model never stops before max_tokens): once one line is done, cancel."""
    client = _openai(server.url)
    lines = [_line(f"long-{i}", {"messages": [{"role": "user", "content": f"Tell story number {i}."}],
                                 "max_tokens": 150, "temperature": 0}) for i in range(24)]
    upload = client.files.create(file=("long.jsonl", _jsonl(lines)), purpose="batch")
    before = scrape(server.url)
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 1, timeout=60, interval=0.05,
             what="a first answered line")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled"), cancelling
    batch, _ = _wait_done(client, batch.id, timeout=60)

    def settled():  # the engine stops an aborted line at its next decode step, after the batch says so
        now = scrape(server.url)
        return now if now["llamavid_num_requests_running"] == 0 else None

    after = wait_for(settled, timeout=30, interval=0.05, what="the cancelled lines to stop")

    assert batch.status == "cancelled" and batch.cancelled_at is not None, batch
    done = batch.request_counts.completed
    assert 1 <= done < len(lines) and batch.request_counts.failed == 0, batch
    output = [json.loads(row) for row in client.files.content(batch.output_file_id).text.splitlines()]
    assert len(output) == done and {row["custom_id"] for row in output} <= {line["custom_id"] for line in lines}
    assert all(row["response"]["body"]["usage"]["completion_tokens"] == 150 for row in output)
    # the lines running at the cancel were stopped, not finished (one that ended in the same instant as the
    # cancel may have finished on the engine and still be left out of the output: at most the 8 running)
    assert before.delta(after, ("llamavid_request_success_total", {"finished_reason": "abort"})) >= 1
    finished = before.delta(after, ("llamavid_request_success_total", {"finished_reason": "length"}))
    assert done <= finished <= done + 8 and finished < len(lines), (done, finished)
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing


def _error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]


def test_bad_input_is_a_clear_4xx(http: httpx.Client) -> None:
    good = _jsonl([_line("a", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})])

    bad_json = good + b'{"custom_id": "b", "method": "POST",\n'
    reply = http.post("/v1/files", files={"file": ("bad.jsonl", bad_json)}, data={"purpose": "batch"})
    assert reply.status_code == 400 and "line 2" in _error(reply)["message"], reply.text
    assert _error(reply)["code"] == "invalid_jsonl"

    reply = http.post("/v1/files", files={"file": ("list.jsonl", good + b"[1, 2]\n")}, data={"purpose": "batch"})
    assert reply.status_code == 400 and "line 2 is not a JSON object" in _error(reply)["message"], reply.text

    reply = http.post("/v1/files", files={"file": ("a.jsonl", good)}, data={"purpose": "fine-tune"})
    assert reply.status_code == 400 and _error(reply)["code"] == "invalid_purpose", reply.text

    file_id = http.post("/v1/files", files={"file": ("a.jsonl", good)}, data={"purpose": "batch"}).json()["id"]
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}

    reply = http.post("/v1/batches", json={**create, "endpoint": "/v1/embeddings"})
    assert reply.status_code == 400 and _error(reply)["code"] == "unsupported_endpoint", reply.text
    assert "/v1/embeddings" in _error(reply)["message"]
    reply = http.post("/v1/batches", json={**create, "completion_window": "1h"})
    assert reply.status_code == 400 and _error(reply)["param"] == "completion_window", reply.text
    reply = http.post("/v1/batches", json={**create, "input_file_id": "file-000000000000000000000000"})
    assert reply.status_code == 404 and _error(reply)["code"] == "file_not_found", reply.text
    reply = http.get("/v1/batches/batch_000000000000000000000000")
    assert reply.status_code == 404 and _error(reply)["code"] == "batch_not_found", reply.text
    reply = http.get("/v1/files/file-000000000000000000000000/content")
    assert reply.status_code == 404 and _error(reply)["code"] == "file_not_found", reply.text


def test_lines_that_are_not_requests_fail_the_batch_naming_each(openai_client) -> None:
    lines = [
        _line("ok", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        _line("ok", {"messages": [{"role": "user", "content": "Hi again"}], "max_tokens": 2}),  # duplicate id
        _line("other-url", {"messages": [{"role": "user", "content": "Hi"}]}, url="/v1/completions"),
        _line("unknown-field", {"messages": [{"role": "user", "content": "Hi"}], "bogus": 1}),
        {"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": {}},
        _line("stream", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
    ]
    upload = openai_client.files.create(file=("mixed.jsonl", _jsonl(lines)), purpose="batch")
    batch = openai_client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")
    assert batch.status == "failed" and batch.failed_at is not None, batch
    errors = {e.line: e for e in batch.errors.data}
    assert sorted(errors) == [2, 3, 4, 5, 6], batch.errors
    assert errors[2].code == "duplicate_custom_id"
    assert errors[3].code == "mismatched_url" and "/v1/completions" in errors[3].message
    assert errors[4].param == "body.bogus" and "unknown field" in errors[4].message
    assert errors[5].code == "invalid_method"
    assert errors[6].param == "body.stream"


def test_a_failing_line_goes_to_the_error_file_and_the_rest_complete(openai_client, videos: Videos,
                                                                     media_host: MediaHost) -> None:
    url = media_host.media(videos.fresh("batch-errors.mp4", seconds=2, fps=5))
    lines = [
        _line("video", {"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]}],
            "max_tokens": 3}),
        _line("missing-video", {"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "vid-000000000000000000000000"}},
            {"type": "text", "text": "What happens?"}]}], "max_tokens": 3}),
        _line("too-many-tokens", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**6}),
        _line("text", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
    ]
    upload = openai_client.files.create(file=("some-fail.jsonl", _jsonl(lines)), purpose="batch")
    batch = openai_client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")
    batch, _ = _wait_done(openai_client, batch.id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    output = [json.loads(r) for r in openai_client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(r) for r in openai_client.files.content(batch.error_file_id).text.splitlines()]
    assert [r["custom_id"] for r in output] == ["video", "text"]
    assert [(r["custom_id"], r["response"]["status_code"], r["error"]["code"]) for r in errors] == [
        ("missing-video", 404, "video_not_found"), ("too-many-tokens", 400, "invalid_max_tokens")]
    assert errors[0]["response"]["body"]["error"]["code"] == "video_not_found"
    assert output[0]["response"]["body"]["llamavid"]["video_id"].startswith("vid-")


def test_files_and_batches_list_get_and_delete(openai_client) -> None:
    content = _jsonl([_line("a", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})])
    first = openai_client.files.create(file=("first.jsonl", content), purpose="batch")
    second = openai_client.files.create(file=("second.jsonl", content), purpose="batch")
    assert openai_client.files.retrieve(first.id).filename == "first.jsonl"
    assert openai_client.files.content(first.id).content == content
    listed = [f.id for f in openai_client.files.list(purpose="batch")]
    assert listed.index(second.id) < listed.index(first.id)  # newest first
    assert [f.id for f in openai_client.files.list(order="asc", limit=1, after=first.id)][:1] == [second.id]

    batches = [openai_client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h") for f in (first, second)]
    for batch in batches:
        assert _wait_done(openai_client, batch.id)[0].status == "completed"
    page = openai_client.batches.list(limit=1)
    assert [b.id for b in page.data] == [batches[1].id] and page.has_more
    assert [b.id for b in openai_client.batches.list(limit=1, after=batches[1].id).data] == [batches[0].id]

    deleted = openai_client.files.delete(second.id)
    assert deleted.deleted and deleted.id == second.id
    assert second.id not in [f.id for f in openai_client.files.list()]
    assert openai_client.files.content(first.id).content == content  # same bytes, still held for the other file
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        openai_client.files.retrieve(second.id)
