"""A worker's startup choices that need no model: its GPU (``--device cuda:N``) and its metrics port."""

from __future__ import annotations

import socket

import httpx
import pytest

from server.metrics import LlamaVidMetrics
from server.settings import Settings
from server.worker.startup import StartupError, pin_device, serve_metrics


@pytest.mark.parametrize("visible, device, gpu", [
    (None, "cuda:3", "3"),  # a bare host: GPU 3
    ("", "cuda:0", "0"),
    ("4,5,6,7", "cuda:1", "5"),  # a host (or container) that already narrowed the GPUs: the second of them
    ("GPU-1a2b,GPU-3c4d", "cuda:1", "GPU-3c4d"),  # UUIDs pass through
])
def test_cuda_n_makes_gpu_n_the_only_visible_one(visible: str | None, device: str, gpu: str) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    pinned = pin_device(Settings(device=device), env)
    assert env["CUDA_VISIBLE_DEVICES"] == gpu
    assert pinned.device == "cuda:0"


@pytest.mark.parametrize("device", [None, "cpu", "cuda", "mps"])
def test_other_devices_are_left_alone(device: str | None) -> None:
    env: dict[str, str] = {}
    assert pin_device(Settings(device=device), env).device == device
    assert env == {}


def test_a_gpu_that_is_not_visible_is_a_clear_error() -> None:
    with pytest.raises(StartupError, match=r"CUDA_VISIBLE_DEVICES=0,1 makes only 2 GPU\(s\) visible"):
        pin_device(Settings(device="cuda:2"), {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_metrics_port_defaults_to_one_chosen_by_the_system() -> None:
    settings = Settings(worker_metrics_host="127.0.0.1")
    assert Settings().worker_metrics_port == 0
    first, second = (serve_metrics(LlamaVidMetrics(process_metrics=False), settings) for _ in range(2))
    assert first.port > 0 and second.port > 0 and first.port != second.port
    assert first.url == f"http://127.0.0.1:{first.port}/metrics"
    assert first.card_fields() == {"metrics_port": first.port, "metrics_url": first.url}
    base = f"http://127.0.0.1:{first.port}"
    assert "llamavid_" in httpx.get(base + "/metrics", timeout=5).text
    assert httpx.get(base + "/health", timeout=5).status_code == 200
    assert httpx.get(base + "/ready", timeout=5).status_code == 503
    first.ready = True
    assert httpx.get(base + "/ready", timeout=5).status_code == 200
    for endpoint in (first, second):
        endpoint.close()


def test_a_taken_metrics_port_is_a_startup_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(worker_metrics_host="127.0.0.1", worker_metrics_port=port)
        with pytest.raises(StartupError, match=f"127.0.0.1:{port} is already in use") as error:
            serve_metrics(LlamaVidMetrics(process_metrics=False), settings)
    assert error.value.code == 2
