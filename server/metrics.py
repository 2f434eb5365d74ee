"""Every Prometheus metric of the service, defined once and named ``llamavid_*`` (vLLM's style).

Units sit in the name (``_seconds``, ``_bytes``) and in the help text. Nothing is registered at
import time: each process (or app under test) builds one :class:`LlamaVidMetrics`, which owns a
fresh ``CollectorRegistry`` unless given one, so several apps in one process never collide.

Who records what: whoever runs a request (the worker, or the in-process engine of ``serve``)
wraps it in :meth:`~LlamaVidMetrics.track_request` and times its stages with
:meth:`~LlamaVidMetrics.stage`; the server code around the feature cache calls
:meth:`~LlamaVidMetrics.cache_lookup` (``cache/`` does not import ``server/``); the API counts
responses with :meth:`~LlamaVidMetrics.http_request`, reports queue lengths and serves
:meth:`~LlamaVidMetrics.exposition` on ``/metrics``; the worker serves its registry on its own
metrics port (``server.worker.startup.serve_metrics``). Gauges are per process:
``num_requests_*`` add up across processes, ``queue_depth`` is a shared queue's length as one
process saw it (aggregate it with ``max``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

FINISHED_REASONS: Final = ("stop", "length", "abort", "error")
STAGES: Final = ("fetch", "decode", "encode", "transcribe", "tokens", "prefill", "decode_step")
CACHE_TIERS: Final = ("hot", "cold", "memory")
QUEUES: Final = ("questions", "videos")
VIDEO_JOB_STATUSES: Final = ("done", "failed", "cancelled")
ROUTE_REASONS: Final = ("affine", "owner_busy", "owner_gone", "no_media", "shared")
QUESTION_SOURCES: Final = ("hot", "cold", "extracted")
RANGE_KINDS: Final = ("fresh", "resumed")
SUBTITLE_SOURCES: Final = ("container", "asr", "none")
BATCH_LINE_STATUSES: Final = ("completed", "failed")
BATCH_STATUSES: Final = ("completed", "failed", "cancelled", "expired")

# Buckets, in seconds. TTFT includes fetching, decoding and encoding the video when its features
# are not cached, so it reaches minutes for long videos; one decode step is milliseconds.
TTFT_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                       15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS: Final = (0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                      0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
                      60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0)
QUEUE_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        30.0, 60.0, 120.0, 300.0, 600.0)
STAGE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0, 120.0, 300.0)


def _checked(value: str, allowed: Iterable[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {tuple(allowed)}")
    return value


class LlamaVidMetrics:
    """All metrics of one process, registered on ``registry`` (a fresh one by default).

    ``process_metrics`` adds the ``process_*``, ``python_gc_*`` and ``python_info`` collectors;
    by default they are added only to a registry created here, since the global
    ``prometheus_client.REGISTRY`` already has them.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 process_metrics: bool | None = None) -> None:
        if process_metrics is None:
            process_metrics = registry is None
        self.registry = r = registry if registry is not None else CollectorRegistry()
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        # Latency, per request.
        self.time_to_first_token = Histogram(
            "llamavid_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token, queueing included.",
            buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "llamavid_inter_token_latency_seconds",
            "Seconds between two consecutive generated tokens of one request.",
            buckets=ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "llamavid_e2e_request_latency_seconds",
            "Seconds from a request's arrival to its finish, whatever the finish reason.",
            buckets=E2E_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            "llamavid_request_queue_time_seconds",
            "Seconds a request waited between arrival and the start of its processing.",
            buckets=QUEUE_BUCKETS, registry=r)

        # Load.
        self.num_requests_running = Gauge(
            "llamavid_num_requests_running", "Requests being processed by this process.",
            registry=r)
        self.num_requests_waiting = Gauge(
            "llamavid_num_requests_waiting",
            "Requests admitted by this process and not yet started.", registry=r)
        self.kv_cache_usage = Gauge(
            "llamavid_kv_cache_usage_perc",
            "Fraction of the KV cache's blocks held by requests (1 = full), as vLLM names it.", registry=r)
        self.num_preemptions = Counter(
            "llamavid_num_preemptions",
            "Requests preempted to free KV cache blocks (their keys and values wait in host memory).",
            registry=r)
        self.routes = Counter(
            "llamavid_route",
            "Jobs queued, by queue and by where they went: affine (the owner of their video's features), "
            "owner_busy / owner_gone (the owner's queue was full / it had just died: the shared queue), no_media "
            "(text only: the shared queue), shared (routing=shared).", ["queue", "reason"], registry=r)
        self.queue_depth = Gauge(
            "llamavid_queue_depth",
            "Jobs waiting in a shared queue, as last seen by this process (aggregate with max).",
            ["queue"], registry=r)

        # Tokens and frames.
        self.prompt_tokens = Counter(
            "llamavid_prompt_tokens",
            "Prompt positions prefilled: text tokens plus visual tokens.", registry=r)
        self.visual_tokens = Counter(
            "llamavid_visual_tokens",
            "Visual tokens prefilled (the visual subset of prompt tokens; 2 per frame).",
            registry=r)
        self.generation_tokens = Counter(
            "llamavid_generation_tokens", "Tokens generated.", registry=r)
        self.prefill_positions = Counter(
            "llamavid_prefill_positions",
            "Prompt positions run through the LLM (once per request, whatever its n; again after a "
            "failed prefill is retried by another worker).", registry=r)
        self.request_success = Counter(
            "llamavid_request_success",
            "Finished requests by finish reason (stop, length, abort, error).",
            ["finished_reason"], registry=r)
        self.frames_decoded = Counter(
            "llamavid_frames_decoded", "Video frames decoded and sampled.", registry=r)
        self.frames_encoded = Counter(
            "llamavid_frames_encoded", "Video frames run through the vision encoder.", registry=r)
        self.frames_recomputed = Counter(
            "llamavid_frames_recomputed",
            "Frames encoded whose features the shared cache already held: work done twice (a range taken "
            "over from a worker that was slow, not dead). 0 when dead workers' ranges are resumed.", registry=r)
        self.extraction_ranges = Counter(
            "llamavid_extraction_ranges",
            "Frame ranges of a video's extraction this worker took: fresh, or resumed from a worker that "
            "stopped (from its last cached chunk).", ["how"], registry=r)
        self.question_sources = Counter(
            "llamavid_question_features",
            "Video questions by where their features came from: hot (this worker's memory), cold (the shared "
            "cache), extracted (made for the question). Per worker, hot / all is the hot-tier hit ratio that "
            "cache-affine routing raises.", ["source"], registry=r)
        self.subtitles_worked_out = Counter(
            "llamavid_video_subtitles",
            "Videos whose own subtitles were worked out (once per video; later questions read them back), by "
            "where they came from: container (a subtitle track), asr (speech-to-text), none.",
            ["source"], registry=r)
        self.audio_seconds_transcribed = Counter(
            "llamavid_audio_seconds_transcribed", "Seconds of audio run through speech-to-text.", registry=r)
        self.stage_seconds = Histogram(
            "llamavid_stage_seconds",
            "Seconds spent per processing stage: fetch (read video bytes), decode (decode and "
            "sample frames), encode (vision encoder and Q-Former), transcribe (a video's subtitle track or "
            "speech-to-text), tokens (build prompt inputs), "
            "prefill, decode_step (one generation step).",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)

        # Feature cache.
        self.feature_cache_queries = Counter(
            "llamavid_feature_cache_queries", "Feature-cache lookups by tier.", ["tier"],
            registry=r)
        self.feature_cache_hits = Counter(
            "llamavid_feature_cache_hits", "Feature-cache lookups that found an entry, by tier.",
            ["tier"], registry=r)
        self.feature_cache_bytes_read = Counter(
            "llamavid_feature_cache_bytes_read", "Bytes read from the feature cache, by tier.",
            ["tier"], registry=r)
        self.feature_cache_bytes = Gauge(
            "llamavid_feature_cache_bytes", "Bytes held by the feature cache, by tier.", ["tier"],
            registry=r)

        # Jobs, HTTP and the model.
        self.video_jobs = Counter(
            "llamavid_video_jobs", "Video-ingest jobs finished, by status (done, failed, cancelled).",
            ["status"], registry=r)
        self.http_requests = Counter(
            "llamavid_http_requests",
            "HTTP responses by route template (never the raw path) and status code.",
            ["route", "status"], registry=r)
        self.batch_lines = Counter(
            "llamavid_batch_lines",
            "Batch input lines answered by this process, by status: completed (a 200 in the batch's output "
            "file), failed (an error in its error file).", ["status"], registry=r)
        self.batches = Counter(
            "llamavid_batches", "Batches this process finished, by final status (completed, failed, cancelled, "
            "expired).", ["status"], registry=r)
        self.batches_running = Gauge(
            "llamavid_batches_running", "Batches this process is running now (it holds their lease).", registry=r)
        self.model_info = Gauge(
            "llamavid_model_info", "The loaded model; always 1.",
            ["model", "dtype", "device", "demo"], registry=r)

        # Export every enumerated series at 0, so dashboards show zeros rather than "no data".
        for reason in FINISHED_REASONS:
            self.request_success.labels(finished_reason=reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for tier in CACHE_TIERS:
            for family in (self.feature_cache_queries, self.feature_cache_hits,
                           self.feature_cache_bytes_read, self.feature_cache_bytes):
                family.labels(tier=tier)
        for queue in QUEUES:
            self.queue_depth.labels(queue=queue)
            for reason in ROUTE_REASONS:
                self.routes.labels(queue=queue, reason=reason)
        for status in VIDEO_JOB_STATUSES:
            self.video_jobs.labels(status=status)
        for source in SUBTITLE_SOURCES:
            self.subtitles_worked_out.labels(source=source)
        for source in QUESTION_SOURCES:
            self.question_sources.labels(source=source)
        for how in RANGE_KINDS:
            self.extraction_ranges.labels(how=how)
        for status in BATCH_LINE_STATUSES:
            self.batch_lines.labels(status=status)
        for status in BATCH_STATUSES:
            self.batches.labels(status=status)

    # Helpers for short call sites.

    def track_request(self, arrival_time: float | None = None) -> LlamaVidRequestMetrics:
        """Start tracking one request; ``arrival_time`` is its ``time.time()`` at arrival.

        Pass the arrival stamp when the request arrived in another process (the API stamps the
        job); leave it out to count from now.
        """
        return LlamaVidRequestMetrics(self, arrival_time)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as one stage (see ``STAGES``), failures included."""
        child = self.stage_seconds.labels(stage=_checked(name, STAGES, "stage"))
        start = time.perf_counter()
        try:
            yield
        finally:
            child.observe(time.perf_counter() - start)

    def observe_stage(self, name: str, seconds: float) -> None:
        """Record a stage timed elsewhere (e.g. on the model thread, inside one step)."""
        self.stage_seconds.labels(stage=_checked(name, STAGES, "stage")).observe(seconds)

    def cache_lookup(self, tier: str, hit: bool, nbytes: int = 0) -> None:
        """Count one feature-cache lookup in ``tier``; ``nbytes`` is what a hit read."""
        tier = _checked(tier, CACHE_TIERS, "cache tier")
        self.feature_cache_queries.labels(tier=tier).inc()
        if hit:
            self.feature_cache_hits.labels(tier=tier).inc()
            self.feature_cache_bytes_read.labels(tier=tier).inc(nbytes)

    def set_cache_bytes(self, tier: str, nbytes: int) -> None:
        self.feature_cache_bytes.labels(tier=_checked(tier, CACHE_TIERS, "cache tier")).set(nbytes)

    def question_features(self, source: str) -> None:
        self.question_sources.labels(source=_checked(source, QUESTION_SOURCES, "feature source")).inc()

    def extraction_range(self, how: str) -> None:
        self.extraction_ranges.labels(how=_checked(how, RANGE_KINDS, "range")).inc()

    def routed(self, queue: str, reason: str) -> None:
        self.routes.labels(queue=_checked(queue, QUEUES, "queue"), reason=_checked(reason, ROUTE_REASONS, "route")).inc()

    def set_queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth.labels(queue=_checked(queue, QUEUES, "queue")).set(depth)

    def video_job_finished(self, status: str) -> None:
        self.video_jobs.labels(status=_checked(status, VIDEO_JOB_STATUSES, "job status")).inc()

    def batch_line(self, status: str) -> None:
        self.batch_lines.labels(status=_checked(status, BATCH_LINE_STATUSES, "batch line status")).inc()

    def batch_finished(self, status: str) -> None:
        self.batches.labels(status=_checked(status, BATCH_STATUSES, "batch status")).inc()

    def http_request(self, route: str, status: int) -> None:
        """Count one HTTP response; ``route`` is the route template, e.g. ``/v1/videos/{id}``."""
        self.http_requests.labels(route=route, status=str(status)).inc()

    def set_model_info(self, model: str, dtype: str, device: str, demo: bool) -> None:
        """Publish the loaded model (replacing any earlier one) as ``llamavid_model_info``."""
        self.model_info.clear()
        self.model_info.labels(model=model, dtype=dtype, device=device,
                               demo="true" if demo else "false").set(1)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated from the ``Accept`` header."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class LlamaVidRequestMetrics:
    """Records one request's life: ``start()``, ``prompt()``, ``token()`` per token, ``finish()``.

    As a context manager it finishes the request on exit if the body did not: ``"stop"`` on a
    clean exit, ``"abort"`` on cancellation (client gone), ``"error"`` on any other exception.
    Durations use the monotonic clock; only the arrival stamp, which may come from another
    process, is wall-clock time.
    """

    def __init__(self, metrics: LlamaVidMetrics, arrival_time: float | None = None) -> None:
        self._m = metrics
        now = time.perf_counter()
        waited = 0.0 if arrival_time is None else max(0.0, time.time() - arrival_time)
        self._arrival = now - waited
        self._last_token: float | None = None
        self.started = False
        self.finished_reason: str | None = None
        metrics.num_requests_waiting.inc()

    def start(self) -> None:
        """The request leaves the queue and begins processing."""
        if self.started or self.finished_reason is not None:
            return
        self.started = True
        self._m.request_queue_time.observe(time.perf_counter() - self._arrival)
        self._m.num_requests_waiting.dec()
        self._m.num_requests_running.inc()

    def prompt(self, text_tokens: int, visual_tokens: int = 0) -> None:
        """Count the prefilled prompt: its text tokens and its visual tokens."""
        self._m.prompt_tokens.inc(text_tokens + visual_tokens)
        self._m.visual_tokens.inc(visual_tokens)

    def token(self) -> None:
        """One token was generated: the first observes TTFT, later ones inter-token latency."""
        now = time.perf_counter()
        if self._last_token is None:
            self._m.time_to_first_token.observe(now - self._arrival)
        else:
            self._m.inter_token_latency.observe(now - self._last_token)
        self._last_token = now
        self._m.generation_tokens.inc()

    def finish(self, reason: str) -> None:
        """Record the finish (see ``FINISHED_REASONS``); later calls are ignored."""
        _checked(reason, FINISHED_REASONS, "finished_reason")
        if self.finished_reason is not None:
            return
        self.finished_reason = reason
        if self.started:
            self._m.num_requests_running.dec()
        else:
            self._m.num_requests_waiting.dec()
        self._m.e2e_request_latency.observe(time.perf_counter() - self._arrival)
        self._m.request_success.labels(finished_reason=reason).inc()

    def __enter__(self) -> LlamaVidRequestMetrics:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.finished_reason is not None:
            return
        if exc_type is None:
            self.finish("stop")
        elif issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            self.finish("abort")
        else:
            self.finish("error")
