"""The split deployment for real: ``llamavid api`` and ``llamavid worker`` subprocesses on a real Redis.

Nothing here mocks Redis. The server is ``LLAMAVID_TEST_REDIS_URL`` (default
redis://127.0.0.1:6379/0); without one these tests skip locally and fail in CI (``CI`` set).
Every deployment lives in its own key namespace ``test-<uuid>``; its processes are killed and
its keys deleted (SCAN + DEL of ``<ns>:*``) at teardown, whatever the test did.

Processes start in parallel (the API and the workers load at the same time) and a deployment
counts as started once every worker has advertised itself in the ``<ns>:workers`` set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.cache.conftest import namespace_fixture, redis_client  # noqa: F401 (a real Redis, a namespace)
from tests.needs import missing
from tests.serving import Process, free_port, spawn, wait_ready
from tests.videos import write_video

REDIS_URL = os.environ.get("LLAMAVID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_TIMEOUT = 120.0


def require_redis(url: str = REDIS_URL) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        missing(f"no Redis at {url}: {error!r}")
    finally:
        client.close()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy; return its value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def delete_namespace(client: redis.Redis, namespace: str) -> None:
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


# -- metrics --------------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset], float]


def parse_metrics(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@dataclass
class Worker:
    process: Process
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    @property
    def alive(self) -> bool:
        return self.process.proc.poll() is None

    def metrics(self) -> Samples:
        reply = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        reply.raise_for_status()
        return parse_metrics(reply.text)

    def metric(self, name: str, **labels: str) -> float:
        return value(self.metrics(), name, **labels)


@dataclass
class Deployment:
    """An API and its workers sharing one Redis namespace."""

    namespace: str
    redis_url: str
    api: Process
    workers: list[Worker]
    tmp: Path
    redis: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.redis_url, socket_timeout=10)

    @property
    def url(self) -> str:
        assert self.api.url
        return self.api.url

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def job_streams(self, queue: str) -> list[str]:
        """The shared stream of ``queue`` ("questions", "videos") and every worker's own."""
        own = [k.decode() for k in self.redis.scan_iter(match=self.key("jobs", f"{queue}@*"), count=1000)]
        return [self.key("jobs", queue), *own]

    def queued(self, queue: str) -> int:
        """Jobs of ``queue`` waiting or running, on any stream."""
        return sum(self.redis.xlen(stream) for stream in self.job_streams(queue))

    def openai(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def ask_many(self, count: int, max_tokens: int) -> list:
        """``count`` different text questions at once through the openai client; their completions."""
        client = self.openai(timeout=120)

        def ask(i: int):
            return client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Question number {i}: what happens?"}],
                max_tokens=max_tokens, temperature=0)

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(ask, range(count)))

    def extraction_owner(self) -> Worker:
        """The worker whose consumer holds a video's extraction job (not a helper job)."""
        for stream in self.job_streams("videos"):
            for entry in self.redis.xpending_range(stream, "workers", "-", "+", 10):
                [(_, fields)] = self.redis.xrange(stream, entry["message_id"], entry["message_id"])
                if not json.loads(fields[b"job"]).get("helper"):
                    pid = entry["consumer"].decode().split("-")[-2]  # <host>-<pid>-<suffix>
                    return next(w for w in self.workers if str(w.pid) == pid)
        raise AssertionError("no worker holds an extraction job")

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def api_metric(self, name: str, **labels: str) -> float:
        """A metric of the API process (where jobs are routed)."""
        reply = httpx.get(f"{self.url}/metrics", timeout=5)
        reply.raise_for_status()
        return value(parse_metrics(reply.text), name, **labels)

    def total(self, name: str, **labels: str) -> float:
        """A metric summed over the live workers."""
        return sum(w.metric(name, **labels) for w in self.live_workers())

    def worker_cards(self) -> list[bytes]:
        """Ids of the workers whose advertisement (``<ns>:workers``, scored by expiry) is current."""
        return self.redis.zrangebyscore(self.key("workers"), time.time(), "+inf")

    def wait_workers(self, count: int, timeout: float = START_TIMEOUT) -> None:
        def advertised() -> bool:
            for w in self.workers:
                if not w.alive:
                    code, output = w.process.proc.returncode, w.process.output()[-4000:]
                    raise RuntimeError(f"worker exited with {code}:\n{output}")
            return len(self.worker_cards()) >= count

        wait_for(advertised, timeout, f"{count} worker(s) to advertise themselves", interval=0.2)

    def logs(self) -> str:
        parts = [f"--- api ---\n{self.api.output()[-3000:]}"]
        parts += [f"--- worker {i} (pid {w.pid}) ---\n{w.process.output()[-3000:]}"
                  for i, w in enumerate(self.workers)]
        return "\n".join(parts)

    def wait_started(self) -> None:
        """Until the API answers and every worker advertised itself (then ``/ready`` is 200)."""
        try:
            wait_ready(self.api, START_TIMEOUT, path="/health")
            if self.workers:
                self.wait_workers(len(self.workers))
                wait_ready(self.api, START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in [self.api, *(w.process for w in self.workers)]:
            process.kill()
        try:
            delete_namespace(self.redis, self.namespace)
        except (redis.RedisError, OSError):
            pass  # a private Redis the test has already stopped
        self.redis.close()


def start_deployment(tmp: Path, checkpoint: Path, *, workers: int = 2, redis_url: str = REDIS_URL,
                     wait: bool = True, worker_prefix: Callable[[int], list[str]] | None = None,
                     **settings: object) -> Deployment:
    """``llamavid api`` + ``workers`` × ``llamavid worker`` on a fresh namespace, all on the CPU.

    ``settings`` become ``LLAMAVID_<NAME>`` for every process; ``worker_prefix(i)`` wraps worker
    ``i``'s command (e.g. ``taskset -c i``). With ``wait``, returns once the
    API answers and every worker is advertised (``Deployment.wait_started``); without, at once,
    so that several deployments can load at the same time. Kills everything if starting fails.
    """
    namespace = f"test-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {"LLAMAVID_REDIS_URL": redis_url, "LLAMAVID_REDIS_NAMESPACE": namespace,
           "LLAMAVID_MODEL": str(checkpoint), "LLAMAVID_DEVICE": "cpu", "LLAMAVID_DTYPE": "float32",
           "LLAMAVID_ALLOWED_MEDIA_HOSTS": "127.0.0.1"}
    env.update({f"LLAMAVID_{k.upper()}": str(v) for k, v in settings.items()})
    api = spawn("api", env, tmp / f"api-{namespace}.log", free_port())
    deployment = Deployment(namespace, redis_url, api, [], tmp)
    try:
        for i in range(workers):
            port = free_port()
            process = spawn("worker", {**env, "LLAMAVID_WORKER_METRICS_PORT": str(port)},
                            tmp / f"worker{i}-{namespace}.log", prefix=worker_prefix(i) if worker_prefix else ())
            deployment.workers.append(Worker(process, port))
    except BaseException:
        deployment.stop()
        raise
    if wait:
        deployment.wait_started()
    return deployment


@pytest.fixture(scope="session")
def redis_available() -> None:
    require_redis()


@pytest.fixture(scope="module")
def deployment(redis_available, tiny_checkpoint: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One API + two workers shared by the tests of a module that leave it working."""
    d = start_deployment(tmp_path_factory.mktemp("deployment"), tiny_checkpoint, workers=2, encode_batch=4)
    try:
        yield d
    finally:
        d.stop()


# -- a private Redis server ------------------------------------------------------------------------
@dataclass
class PrivateRedis:
    """``redis-server`` on a free port, without persistence: a restart loses every key."""

    port: int
    log: Path
    args: tuple[str, ...] = ()  # more redis-server options, e.g. ("--maxmemory-policy", "allkeys-lru")
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        handle = open(self.log, "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--bind", "127.0.0.1", "--daemonize", "no", *self.args],
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            if self.proc.poll() is not None:
                output = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{output}")
            try:
                return bool(client.ping())
            except (redis.RedisError, OSError):
                return False

        try:
            wait_for(answers, 10, f"redis-server on port {self.port}")
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()
            handle.close()  # the child keeps its own copy

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(free_port(), tmp_path / "redis-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def make_video(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., bytes]:
    """Encoded test videos; every call makes different bytes (so a different cache key)."""
    folder = tmp_path_factory.mktemp("videos")
    counter = iter(range(1_000_000))

    def make(seconds: float = 4.0, fps: float = 10.0, size: tuple[int, int] = (64, 96)) -> bytes:
        n = next(counter)
        # Offset the size a little per call: same content, different bytes.
        size = (size[0] + 2 * n, size[1])
        path = write_video(folder / f"video-{n}.mp4", seconds=seconds, fps=fps, size=size)
        return path.read_bytes()

    return make
