"""Bearer-key auth on a server started with ``api_keys``: the API needs a key; health, readiness
and metrics stay open."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import API_KEYS
from tests.server.live import assert_api_error

PROTECTED = [
    ("GET", "/v1/models", {}),
    ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}]}}),
    ("POST", "/v1/ask", {"json": {"question": "hi", "max_tokens": 2}}),
    ("POST", "/v1/videos", {"json": {"url": "http://127.0.0.1:9/v.mp4"}}),
    ("GET", "/v1/videos/vid-000000000000000000000000", {}),
    ("DELETE", "/v1/videos/vid-000000000000000000000000", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_api_needs_a_valid_key(method: str, path: str, kwargs: dict, strict_server) -> None:
    url = strict_server.url + path
    missing = httpx.request(method, url, **kwargs)
    assert_api_error(missing, 401, "missing API key", code="missing_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = (f"Bearer {API_KEYS[0]}x", f"Bearer {API_KEYS[1][:-1]}", f"Basic {API_KEYS[0]}", API_KEYS[0])
    for header in wrong:
        response = httpx.request(method, url, headers={"Authorization": header}, **kwargs)
        assert response.status_code == 401, (header, response.text)
        assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("key", API_KEYS)
def test_each_configured_key_works(key: str, strict_server) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{strict_server.url}/v1/models", headers=headers).status_code == 200
    answer = httpx.post(f"{strict_server.url}/v1/ask", headers=headers, timeout=30,
                        json={"question": "hi", "max_tokens": 2})
    assert answer.status_code == 200, answer.text


def test_open_endpoints_need_no_key(strict_server) -> None:
    assert httpx.get(f"{strict_server.url}/health").status_code == 200
    assert httpx.get(f"{strict_server.url}/ready").status_code == 200
    metrics = httpx.get(f"{strict_server.url}/metrics")
    assert metrics.status_code == 200 and "llamavid_http_requests_total" in metrics.text


def test_openai_client_with_and_without_the_key(strict_server) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=f"{strict_server.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    with openai.OpenAI(base_url=f"{strict_server.url}/v1", api_key=API_KEYS[1], max_retries=0) as client:
        assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices
        assert len(client.models.list().data) == 1
