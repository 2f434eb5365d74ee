"""Chaos benchmark: mixed load on a split deployment while workers, Redis and clients fail at random.

A private ``redis-server``, one ``llamavid api`` and two ``llamavid worker`` processes (the tiny
random model, so the CPU can keep up) serve clients that ask streamed questions (text only and
about uploaded videos, 16 to 400 tokens, some hanging up mid-answer) while a fault thread, every
few seconds, SIGKILLs or SIGTERMs a worker (and starts a new one) or restarts Redis for a second
(it comes back empty). Every answer is checked against the fault-free greedy answer to the same
question, computed first:

* completed: ``[DONE]`` with text equal to a prefix of the reference (greedy: a shorter budget
  gives a prefix of a longer one, but for a last character cut in half, flushed as U+FFFD);
* failed cleanly: an error event or a 4xx/5xx JSON error (e.g. 503 during an outage);
* hung: neither within 60 s of the last byte (must be 0);
* duplicated: text that is not a prefix of the reference (must be 0).

After each fault, a probe question measures the time until the service answers again.

    python bench/chaos.py [--minutes 10] -> bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.faults.conftest import stream_answer  # noqa: E402
from tests.redis.conftest import Deployment, PrivateRedis, Worker, start_deployment, wait_for  # noqa: E402
from tests.serving import free_port, spawn  # noqa: E402
from tests.videos import write_video  # noqa: E402

QUESTIONS = ["Tell me everything.", "What happens in the video?", "Describe the scene in detail.",
             "Who is there and what are they doing?"]
MAX_TOKENS = 400


class Chaos:
    def __init__(self, d: Deployment, private: PrivateRedis, tmp: Path, seed: int) -> None:
        self.d, self.private, self.tmp = d, private, tmp
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.recovery: list[float] = []
        self.examples: list[dict] = []
        self.stop = threading.Event()
        self.videos: list[Path] = []
        self.ids: dict[Path, str] = {}  # uploaded again after each Redis restart (it comes back empty)
        self.references: dict[tuple[str, Path | None], str] = {}

    # -- load -------------------------------------------------------------------------------------
    def body(self, question: str, video: str | None, max_tokens: int) -> dict:
        content: list | str = question
        if video is not None:
            content = [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": question}]
        return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0}

    def upload(self) -> None:
        def put(path: Path) -> str | None:
            reply = httpx.post(self.d.url + "/v1/videos", timeout=60,
                               files={"file": (path.name, path.read_bytes(), "video/mp4")})
            return reply.json()["id"] if reply.status_code == 202 else None

        for path in self.videos:
            self.ids[path] = wait_for(lambda: put(path), 60, f"the upload of {path.name}", interval=0.5)

    def prepare(self) -> None:
        self.videos = [write_video(self.tmp / f"clip{i}.mp4", seconds=3 + i, fps=10, size=(64 + 8 * i, 96))
                       for i in range(3)]
        self.upload()
        for question in QUESTIONS:
            for video in [None, *self.videos]:
                body = self.body(question, self.ids.get(video), MAX_TOKENS)
                reply = httpx.post(self.d.url + "/v1/chat/completions", json=body, timeout=120)
                reply.raise_for_status()
                self.references[(question, video)] = reply.json()["choices"][0]["message"]["content"]

    def client(self, index: int) -> None:
        rng = random.Random(index)
        while not self.stop.is_set():
            question, video = rng.choice(QUESTIONS), rng.choice([None, *self.videos])
            hang_up_after = rng.randrange(20, 200) if rng.random() < 0.2 else None
            expected = self.references[(question, video)]
            leave = (lambda text: len(text) >= hang_up_after) if hang_up_after else None
            body = self.body(question, self.ids.get(video), rng.randrange(16, MAX_TOKENS + 1))
            out = stream_answer(self.d.url, body, timeout=60, on_text=leave)
            self.record(out, expected)

    def record(self, out, expected: str) -> None:
        with self.lock:
            # An answer cut at its token budget may end in a character the detokenizer flushed
            # half-made (U+FFFD) where the longer reference goes on with the whole character.
            if not expected.startswith(out.text if out.end != "done" else out.text.rstrip("\ufffd")):
                kind = "duplicated"
            elif out.end == "hung_up":
                kind = "client_disconnected"
            elif out.end == "done":
                kind = "completed"
            elif out.end == "error":
                kind = "failed_cleanly"
                self.errors[(out.error or {}).get("code") or "?"] += 1
            else:
                kind = "hung"
            self.outcomes[kind] += 1
            unexpected = kind in ("duplicated", "hung") or (out.error or {}).get("code") == "internal_error"
            if unexpected and len(self.examples) < 10:
                self.examples.append({"kind": kind, "text": out.text[:200], "expected": expected[:200],
                                      "error": out.error})

    # -- faults -----------------------------------------------------------------------------------
    def inject(self, interval: float) -> None:
        while not self.stop.wait(self.rng.uniform(0.5 * interval, 1.5 * interval)):
            kind = self.rng.choice(["kill_worker", "term_worker", "restart_redis"])
            if kind == "restart_redis":
                self.private.stop()
                time.sleep(1.0)
                self.private.start()
                self.d.wait_workers(len(self.d.live_workers()))
                self.upload()
            else:
                victim = self.rng.choice(self.d.live_workers())
                victim.process.stop(signal.SIGKILL if kind == "kill_worker" else signal.SIGTERM, timeout=30)
                self.d.workers.remove(victim)
                self.d.workers.append(start_worker(self.d, len(self.d.workers) + int(time.time())))
            self.faults[kind] += 1
            self.recovery.append(self.probe())

    def probe(self) -> float:
        """Seconds until a short question is answered again."""
        started = time.monotonic()
        while time.monotonic() - started < 120:
            try:
                reply = httpx.post(self.d.url + "/v1/chat/completions", timeout=30,
                                   json={"messages": [{"role": "user", "content": "Still there?"}],
                                         "max_tokens": 4})
                if reply.status_code == 200:
                    return round(time.monotonic() - started, 2)
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return float("inf")


def start_worker(d: Deployment, index: int) -> Worker:
    port = free_port()
    env = {k: v for k, v in d.api.env.items() if k.startswith("LLAMAVID_") and k not in ("LLAMAVID_PORT",
                                                                                         "LLAMAVID_HOST")}
    process = spawn("worker", {**env, "LLAMAVID_WORKER_METRICS_PORT": str(port)},
                    d.tmp / f"worker-{index}.log")
    return Worker(process, port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--fault-every", type=float, default=20.0, help="mean seconds between faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    args = parser.parse_args()

    from model.tools.tiny import make_tiny

    with tempfile.TemporaryDirectory(prefix="llamavid-chaos-") as folder:
        tmp = Path(folder)
        checkpoint = make_tiny(tmp / "tiny", "tiny")
        private = PrivateRedis(free_port(), tmp / "redis.log")
        private.start()
        d = start_deployment(tmp, checkpoint, workers=2, redis_url=private.url, visibility_timeout=2,
                             max_tokens_limit=MAX_TOKENS, request_timeout=120, encode_batch=4)
        chaos = Chaos(d, private, tmp, args.seed)
        try:
            chaos.prepare()
            threads = [threading.Thread(target=_guarded, args=(chaos.client, i), daemon=True)
                       for i in range(args.clients)]
            threads.append(threading.Thread(target=chaos.inject, args=(args.fault_every,), daemon=True))
            started = time.monotonic()
            for thread in threads:
                thread.start()
            while time.monotonic() - started < 60 * args.minutes:
                time.sleep(5)
                print(f"{(time.monotonic() - started) / 60:.1f} min: {dict(chaos.outcomes)}, faults "
                      f"{dict(chaos.faults)}", flush=True)
            chaos.stop.set()
            for thread in threads:
                thread.join(180)
            settled = _settled(d)
        finally:
            d.stop()
            private.stop()
    result = {
        "minutes": args.minutes, "clients": args.clients, "seed": args.seed,
        "requests": sum(chaos.outcomes.values()), "outcomes": dict(chaos.outcomes),
        "error_codes": dict(chaos.errors),
        "faults": dict(chaos.faults), "faults_total": sum(chaos.faults.values()),
        "recovery_seconds": {"median": statistics.median(chaos.recovery) if chaos.recovery else None,
                             "max": max(chaos.recovery) if chaos.recovery else None, "all": chaos.recovery},
        "settled_after": settled, "examples": chaos.examples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    return 0 if not chaos.outcomes["hung"] and not chaos.outcomes["duplicated"] else 1


def _guarded(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - a crashed client thread is reported, not hidden
        print(f"client thread failed: {exc!r}", flush=True)


def _settled(d: Deployment) -> bool:
    try:
        wait_for(lambda: all(w.metric("llamavid_num_requests_running") == 0 for w in d.live_workers()), 60,
                 "the workers to go idle")
        return True
    except AssertionError:
        return False


if __name__ == "__main__":
    sys.exit(main())
