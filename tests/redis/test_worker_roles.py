"""Workers side by side on one host, and the two Redis roles, with real processes on the real Redis.

* Two ``llamavid worker`` processes with default settings (no metrics port given) both start, each
  on its own system-chosen metrics port that it logs and advertises in its card, and both answer.
* An explicit metrics port that is taken stops the worker with one clear line and exit code 2.
* With ``LLAMAVID_CACHE_REDIS_URL`` set, feature blobs go to that Redis and queue / job state to
  ``LLAMAVID_REDIS_URL`` (two logical databases of the local server here, cleaned up after).
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from tests.serving import free_port, spawn

from .conftest import REDIS_URL, Deployment, Worker, delete_namespace, start_deployment, wait_for
from .test_scale_out import per_worker, upload, video_question, wait_idle, wait_video_ready

QUEUE_DB, CACHE_DB = 14, 15


def db_url(db: int) -> str:
    base = REDIS_URL.rsplit("/", 1)[0] if REDIS_URL.count("/") > 2 else REDIS_URL
    return f"{base}/{db}"


def worker_env(checkpoint: Path, namespace: str, redis_url: str = REDIS_URL) -> dict[str, str]:
    env = {"LLAMAVID_REDIS_URL": redis_url, "LLAMAVID_REDIS_NAMESPACE": namespace,
           "LLAMAVID_MODEL": str(checkpoint), "LLAMAVID_DEVICE": "cpu", "LLAMAVID_DTYPE": "float32"}
    assert "LLAMAVID_WORKER_METRICS_PORT" not in os.environ, "the test needs the default metrics port"
    return env


def test_two_workers_with_default_settings_both_start_and_serve(redis_available, tiny_checkpoint: Path,
                                                                tmp_path: Path) -> None:
    namespace = f"test-{uuid.uuid4().hex}"
    env = worker_env(tiny_checkpoint, namespace)
    api = spawn("api", env, tmp_path / "api.log", free_port())
    processes = [spawn("worker", env, tmp_path / f"worker{i}.log") for i in range(2)]
    d = Deployment(namespace, REDIS_URL, api, [], tmp_path)
    try:
        d.workers = [Worker(p, 0) for p in processes]
        d.wait_started()  # every worker advertised itself: none crashed on a port
        cards = [json.loads(raw) for raw in d.redis.hvals(d.key("worker-cards"))]
        assert len(cards) == 2, cards
        by_pid = {}
        for card in cards:
            pid = int(card["worker_id"].split("-")[-2])
            port = card["metrics_port"]
            assert card["metrics_url"] == f"http://{socket.gethostname()}:{port}/metrics"
            by_pid[pid] = port
        for worker in d.workers:
            worker.metrics_port = by_pid[worker.pid]
            assert worker.metrics_port > 0
            assert f"worker metrics on 0.0.0.0:{worker.metrics_port}" in worker.process.output()
            for path in ("/metrics", "/ready"):  # /ready: the readiness probe (docker/k8s)
                assert httpx.get(f"http://127.0.0.1:{worker.metrics_port}{path}", timeout=5).status_code == 200
        assert len(set(by_pid.values())) == 2, "two workers, two metrics ports"
        # Prometheus finds them through the API (HTTP service discovery), whatever ports they took.
        targets = httpx.get(d.url + "/metrics/workers", timeout=5).json()
        assert sorted(t["targets"] for t in targets) == sorted(
            [[f"{socket.gethostname()}:{port}"] for port in by_pid.values()])
        assert {t["labels"]["worker_id"] for t in targets} == {c["worker_id"] for c in cards}

        before = per_worker(d, "llamavid_request_success_total")
        replies = d.ask_many(20, max_tokens=32)
        assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
        wait_idle(d)
        served = [a - b for a, b in zip(per_worker(d, "llamavid_request_success_total"), before)]
        assert sum(served) == 20 and all(n > 0 for n in served), f"both workers serve: {served}"
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.stop()


def test_a_taken_metrics_port_is_one_clear_line(redis_available, tiny_checkpoint: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**worker_env(tiny_checkpoint, f"test-{uuid.uuid4().hex}"), "LLAMAVID_WORKER_METRICS_PORT": str(port)}
        worker = spawn("worker", env, tmp_path / "worker.log")
        try:
            assert worker.proc.wait(120) == 2
        finally:
            worker.kill()
    output = worker.output()
    assert f"the worker metrics port 0.0.0.0:{port} is already in use" in output, output
    assert "Traceback" not in output, output


@pytest.fixture
def two_databases(redis_available):
    clients = {db: redis.Redis.from_url(db_url(db)) for db in (QUEUE_DB, CACHE_DB)}
    namespaces: list[str] = []
    yield clients, namespaces
    for client in clients.values():
        for namespace in namespaces:
            delete_namespace(client, namespace)
        client.close()


def test_features_go_to_the_cache_redis_and_jobs_to_the_queue_redis(two_databases, tiny_checkpoint: Path,
                                                                   tmp_path: Path, make_video) -> None:
    clients, namespaces = two_databases
    d = start_deployment(tmp_path, tiny_checkpoint, workers=1, redis_url=db_url(QUEUE_DB),
                         cache_redis_url=db_url(CACHE_DB), encode_batch=4)
    namespaces.append(d.namespace)
    try:
        record = upload(d, make_video(seconds=3, fps=10), fps=2)
        wait_video_ready(d, record["id"])
        reply = d.openai(timeout=60).chat.completions.create(
            model="tiny", messages=video_question(record["id"]), max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")

        def keys(db: int) -> set[str]:
            return {k.decode() for k in clients[db].scan_iter(match=f"{d.namespace}:*", count=1000)}

        feature = re.compile(re.escape(d.namespace) + r":v\d+:")  # cache.keys.FeatureKeys: <ns>:v<schema>:...
        cache_keys = wait_for(lambda: keys(CACHE_DB), 10, "feature keys in the cache Redis")
        queue_keys = keys(QUEUE_DB)
        assert any(":f:" in k for k in cache_keys) and any(":m:" in k for k in cache_keys), cache_keys
        assert all(feature.match(k) for k in cache_keys), cache_keys
        assert not [k for k in queue_keys if feature.match(k)], "features in the queue Redis"
        for expected in ("jobs:questions", "jobs:videos", "workers", "worker-cards", f"video:{record['id']}"):
            assert d.key(expected) in queue_keys, (expected, sorted(queue_keys))
        worker_log = d.workers[0].process.output()
        assert f"features in {db_url(CACHE_DB)}" in worker_log
        assert "evicts keys" not in worker_log  # the local Redis runs with noeviction

        # Forgetting a video deletes its features where they are.
        assert httpx.delete(f"{d.url}/v1/videos/{record['id']}", timeout=10).status_code in (200, 204)
        wait_for(lambda: not any(":f:" in k for k in keys(CACHE_DB)), 10, "the features to be deleted")
    except BaseException:
        print(d.logs())
        raise
    finally:
        d.stop()
