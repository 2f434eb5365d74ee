"""Split deployment: a client that hangs up stops its generation on the worker within a decode step.

The API turns the ASGI disconnect into the request's cancel flag in Redis, which the worker reads
before every decode step; counted in tokens as in ``tests/server/test_disconnect.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.test_disconnect import MAX_AFTER_HANGUP, open_request, tokens_after_hangup

from .conftest import Deployment, start_deployment


@pytest.fixture(scope="module")
def slow_deployment(redis_available, slow_checkpoint: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = start_deployment(tmp_path_factory.mktemp("slow-split"), slow_checkpoint, workers=1,
                         max_tokens_limit=4000)
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_hangup_stops_the_workers_generation_within_a_step(slow_deployment: Deployment,
                                                             stream: bool) -> None:
    d = slow_deployment
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 4000,
            "stream": stream}
    sock = open_request(d.url, "/v1/chat/completions", body)
    after = tokens_after_hangup(lambda: d.total("llamavid_generation_tokens_total"),
                                lambda: d.total("llamavid_request_success_total", finished_reason="abort"),
                                lambda: d.total("llamavid_num_requests_running") == 0, sock)
    assert after <= MAX_AFTER_HANGUP, f"{after:.0f} tokens were generated after the client hung up"
