"""``llamavid batch INPUT OUTPUT``: a Batch API input file answered offline, by the bundled demo model
(whose answers about its clips can be checked), with local video files, a progress bar and an errors file."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from model.demo import data
from tests.serving import REPO


def _batch(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "batch", *map(str, args), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def _line(custom_id: str, content: list | str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": content}]}}


def test_a_batch_file_answered_offline_in_input_order(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    lines, expected = [], {}
    for v in range(3):
        example = data.make_example(40_000 + v, "binding")
        path = data.write_clip(example.scene, tmp_path / "clips" / f"clip-{v}.mp4")
        url = f"clips/{path.name}" if v < 2 else path.resolve().as_uri()  # relative to the input, or file://
        for qa in data.questions(example.scene, random.Random(v))[:3]:
            custom_id = f"clip{v}-{len(lines)}"
            expected[custom_id] = qa.answer
            lines.append(_line(custom_id, [{"type": "video_url", "video_url": {"url": url}},
                                           {"type": "text", "text": qa.question}]))
    lines.insert(4, _line("missing", [{"type": "video_url", "video_url": {"url": "clips/nope.mp4"}},
                                      {"type": "text", "text": "What?"}]))
    lines.append(_line("text", "Hello?"))
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(x) + "\n" for x in lines))

    done = _batch(source, tmp_path / "out.jsonl")

    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch: 100%" in done.stderr and f"{len(lines) - 1} of {len(lines)} answered" in done.stderr, done.stderr
    output = [json.loads(row) for row in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in output] == [x["custom_id"] for x in lines if x["custom_id"] != "missing"]
    answers = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in output}
    right = sum(answers[k].strip().rstrip(".").lower() == v for k, v in expected.items())
    assert right >= len(expected) - 2, (answers, expected)  # the demo model answers about the clips it read
    [error] = [json.loads(row) for row in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert error["custom_id"] == "missing" and error["response"]["status_code"] == 400
    assert "nope.mp4" in error["error"]["message"]


def test_an_input_that_is_not_a_batch_file_is_refused_naming_the_line(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(_line("a", "Hi")) + "\n" + json.dumps({**_line("b", "Hi"), "url": "/v1/embeddings"})
                      + "\n{not json\n")
    done = _batch(source, tmp_path / "out.jsonl", timeout=60)
    assert done.returncode == 2 and "line 3 is not valid JSON" in done.stderr, done.stderr
    source.write_text(json.dumps(_line("a", "Hi")) + "\n" + json.dumps({**_line("b", "Hi"), "url": "/v1/embeddings"}))
    done = _batch(source, tmp_path / "out.jsonl", timeout=60)
    assert done.returncode == 2 and "line 2: url '/v1/embeddings'" in done.stderr, done.stderr
    assert not (tmp_path / "out.jsonl").exists()
