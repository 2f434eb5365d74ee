"""``llamavid worker``: a GPU worker of the split deployment.

Loads the model, warms it up, then runs ``consumer.RedisWorker`` until SIGTERM. Features go
through a worker-local hot tier (host memory, or GPU memory when there is one) in front of the
shared Redis cache, so repeated questions about a video this worker has seen move no feature
bytes over the network.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from cache import MemoryFeatureStore, RedisFeatureStore, TieredFeatureStore

from ..engine.redis.outage import connect
from ..engine.redis.storage import RedisMediaStore, RedisVideoRegistry
from ..metrics import LlamaVidMetrics
from ..settings import Settings
from .cache_metrics import CacheMetrics
from .consumer import RedisWorker
from .loading import load_model, resolve_device
from .runner import ModelRunner

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> int:
    return asyncio.run(_main(settings))


async def _main(settings: Settings) -> int:
    metrics = LlamaVidMetrics()
    metrics.serve_http(settings.worker_metrics_port)
    redis = connect(settings.redis_url)
    model, card, plan = await asyncio.to_thread(load_model, settings, hot_tier=True)
    device = resolve_device(settings.device)
    on_gpu = settings.hot_tier_on_gpu and device.type == "cuda"  # the plan counted it there
    hot = MemoryFeatureStore(settings.cache_bytes, device=device if on_gpu else None)
    cold = RedisFeatureStore(redis, namespace=settings.redis_namespace,
                             ttl_seconds=settings.cache_ttl_seconds, fmt=settings.feature_format)
    store = TieredFeatureStore(hot, cold)
    cache_metrics = CacheMetrics(metrics, store)
    runner = ModelRunner(
        model, store, RedisMediaStore(redis, settings.redis_namespace, settings.cache_ttl_seconds),
        RedisVideoRegistry(redis, settings.redis_namespace, settings.cache_ttl_seconds), metrics,
        num_blocks=plan.num_blocks, block_size=plan.block_size, prefill_chunk=settings.prefill_chunk,
        max_running=settings.max_running, encode_batch=settings.encode_batch, template=settings.template,
        stall_timeout=settings.visibility_timeout, on_cache_access=cache_metrics.sync,
        asr_model=settings.asr_model,
    )
    await runner.start()
    metrics.set_model_info(card.id, card.dtype, card.device, card.demo is not None)
    worker = RedisWorker(settings, redis, runner, card)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    log.info("worker %s ready: %s on %s; consuming %s", worker.id, card.id, card.device, settings.redis_url)
    await worker.run()
    runner.close()
    try:
        await asyncio.wait_for(redis.aclose(), timeout=2.0)
    except Exception as exc:
        log.warning("closing the Redis connection: %s", exc)
    return 0
