"""``llamavid worker``: a GPU worker of the split deployment.

Loads the model, warms it up, then runs ``consumer.RedisWorker`` until SIGTERM. Features go
through a worker-local hot tier (host memory, or GPU memory when there is one) in front of the
shared Redis cache, so repeated questions about a video this worker has seen move no feature
bytes over the network.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from cache import MemoryFeatureStore, RedisFeatureStore, TieredFeatureStore

from ..engine.redis.queue import RedisJobQueue
from ..engine.redis.roles import close_roles, connect_roles, display_url, warn_if_evicting
from ..engine.redis.storage import RedisMediaStore, RedisRangeBoard, RedisVideoRegistry
from ..metrics import LlamaVidMetrics
from ..settings import Settings
from .cache_metrics import CacheMetrics
from .consumer import HelpRequests, RedisWorker
from .loading import load_model, resolve_device
from .runner import ModelRunner
from .startup import StartupError, serve_metrics

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> int:
    try:
        return asyncio.run(_main(settings))
    except StartupError as exc:
        log.error("%s", exc)
        return exc.code


async def _main(settings: Settings) -> int:
    metrics = LlamaVidMetrics()
    endpoint = serve_metrics(metrics, settings)
    redis, cache_redis = connect_roles(settings)
    await warn_if_evicting(redis)
    model, card, plan = await asyncio.to_thread(load_model, settings, hot_tier=True)
    device = resolve_device(settings.device)
    on_gpu = settings.hot_tier_on_gpu and device.type == "cuda"  # the plan counted it there
    hot = MemoryFeatureStore(settings.cache_bytes, device=device if on_gpu else None)
    cold = RedisFeatureStore(cache_redis, namespace=settings.redis_namespace,
                             ttl_seconds=settings.cache_ttl_seconds, fmt=settings.feature_format)
    store = TieredFeatureStore(hot, cold)
    cache_metrics = CacheMetrics(metrics, store)
    runner = ModelRunner(
        model, store, RedisMediaStore(redis, settings.redis_namespace, settings.cache_ttl_seconds),
        RedisVideoRegistry(redis, settings.redis_namespace, settings.cache_ttl_seconds), metrics,
        num_blocks=plan.num_blocks, block_size=plan.block_size, prefill_chunk=settings.prefill_chunk,
        max_running=settings.max_running, encode_batch=settings.encode_batch, template=settings.template,
        range_frames=settings.extract_range_frames,
        boards=RedisRangeBoard(redis, settings.redis_namespace, settings.cache_ttl_seconds),
        ask_help=HelpRequests(RedisJobQueue(redis, settings.redis_namespace), settings),
        stall_timeout=settings.visibility_timeout, on_cache_access=cache_metrics.sync,
        asr_model=settings.asr_model,
    )
    await runner.start()
    metrics.set_model_info(card.id, card.dtype, card.device, card.demo is not None)
    advertised = endpoint.card_fields()
    if device.type == "cuda":  # the physical GPU (``--device cuda:N`` pinned it), for dashboards
        advertised["gpu"] = os.environ.get("CUDA_VISIBLE_DEVICES", str(device.index or 0))
    worker = RedisWorker(settings, redis, runner, card, advertised=advertised)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    endpoint.ready = True
    log.info("worker %s ready: %s on %s; consuming %s; features in %s; metrics %s", worker.id, card.id,
             card.device, display_url(settings.redis_url),
             display_url(settings.cache_redis_url or settings.redis_url), endpoint.url)
    await worker.run()
    endpoint.ready = False
    runner.close()
    try:
        await asyncio.wait_for(close_roles(redis, cache_redis), timeout=2.0)
    except Exception as exc:
        log.warning("closing the Redis connection: %s", exc)
    return 0
