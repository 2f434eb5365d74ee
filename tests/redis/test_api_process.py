"""``llamavid api``, the front end of a split deployment, runs without torch.

The process is started for real and used (an upload probed with decord, an image decoded with
PIL, a question, the model list), then its memory map is read from ``/proc``: no torch or
transformers library may be mapped, and it stays small, so API replicas are cheap to run.
"""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path

import httpx
from PIL import Image

from tests.serving import free_port, spawn, wait_ready

from .conftest import REDIS_URL, delete_namespace

# The API probes every upload (PyAV for streams, rotation and subtitle tracks; decord for the frame
# index): two FFmpeg builds, ~140-150 MB resident after a probe. torch alone would add over 300 MB,
# so this bound still catches it even where the memory maps above would not say so.
RSS_LIMIT_MB = 220


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def test_the_api_process_never_loads_torch(redis_available, make_video, tmp_path: Path) -> None:
    import redis

    namespace = f"test-{uuid.uuid4().hex}"
    env = {"LLAMAVID_REDIS_URL": REDIS_URL, "LLAMAVID_REDIS_NAMESPACE": namespace}
    api = spawn("api", env, tmp_path / "api.log", free_port())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        wait_ready(api, path="/health")
        with httpx.Client(base_url=api.url, timeout=30) as http:
            upload = http.post("/v1/videos", files={"file": ("clip.mp4", make_video(), "video/mp4")})
            assert upload.status_code == 202, upload.text  # probed, registered and queued
            png = io.BytesIO()
            Image.new("RGB", (32, 24), (200, 30, 30)).save(png, format="PNG")
            image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
            asked = http.post("/v1/ask", json={"question": "What colour?", "image_url": image})
            assert asked.status_code == 503 and asked.json()["error"]["code"] == "no_worker", asked.text
            assert http.get("/v1/videos/" + upload.json()["id"]).json()["status"] == "queued"
        maps = Path(f"/proc/{api.proc.pid}/maps").read_text()
        loaded = sorted({line.split()[-1] for line in maps.splitlines()
                         if "/torch/" in line or "libtorch" in line or "/transformers/" in line})
        assert loaded == [], f"the API process mapped {loaded[:5]}"
        rss = _rss_mb(api.proc.pid)
        assert rss < RSS_LIMIT_MB, f"the API process holds {rss:.0f} MB resident"
    finally:
        api.kill()
        delete_namespace(client, namespace)
        client.close()
