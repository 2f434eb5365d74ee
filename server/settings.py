"""All service configuration, in one object read from ``LLAMAVID_*`` environment variables.

Flags of ``llamavid serve|api|worker`` override the environment. Built by ``get_settings()`` or
by the CLI and passed down explicitly; nothing reads the environment at import time.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMAVID_", extra="forbid", populate_by_name=True)

    # -- model ---------------------------------------------------------------------------------
    model: str | None = Field(None, description="checkpoint folder or hub id; unset: the bundled demo model")
    vision_tower: str | None = Field(None, description="eva_vit_g.pth, overriding config.json's mm_vision_tower")
    image_processor: str | None = Field(None, description="CLIP processor folder, overriding config.json")
    qformer_tokenizer: str | None = Field(None, description="bert-base-uncased folder or hub id")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; unset: cuda when available")
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(None, description="unset: fp16 on GPU, fp32 on CPU")
    quantization: Literal["none", "4bit", "8bit"] = "none"
    asr_model: str | None = Field(None, description="local Whisper folder (transformers layout) that transcribes "
                                  "videos without subtitles when a question wants them; unset: no speech-to-text")
    template: str = Field("vicuna_v1", description="conversation template")

    # -- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer tokens; empty: no auth"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # -- limits --------------------------------------------------------------------------------
    fps: float = Field(1.0, gt=0, description="default frame sampling rate (the official rule: 1 fps)")
    max_fps: float = Field(8.0, gt=0)
    max_frames: int = Field(3600, ge=1, description="cap on sampled frames per video (an hour at 1 fps; longer "
                            "videos are sampled evenly down to it, and a question thins them to fit its context)")
    max_video_bytes: int = Field(1024 * MiB, ge=1)
    max_image_bytes: int = Field(32 * MiB, ge=1)
    max_subtitle_bytes: int = Field(8 * MiB, ge=1, description="SRT/WebVTT files, uploaded or fetched")
    max_video_seconds: float = Field(4 * 3600.0, gt=0)
    max_question_chars: int = Field(16_000, ge=1)
    max_media: int = Field(4, ge=1, description="videos and images one conversation may carry (experimental above "
                           "1: each gets its own labelled block of frame tokens)")
    max_total_frames: int = Field(7200, ge=1, description="sampled frames one question may carry over all its "
                                  "videos (then 400; frames that do not fit the context are thinned anyway)")
    max_messages: int = Field(64, ge=1)
    max_tokens_limit: int = Field(2048, ge=1, description="upper bound on max_tokens per request")
    default_max_tokens: int = Field(512, ge=1)
    queue_size: int = Field(64, ge=1, description="question requests waiting beyond the running ones; then 429")
    max_running: int = Field(8, ge=1, description="questions generating at once (interleaved per token)")
    video_queue_size: int = Field(16, ge=1, description="video extractions waiting; then 429")
    request_timeout: float = Field(900.0, gt=0, description="seconds from arrival to the last token")
    encode_batch: int = Field(32, ge=1, description="frames decoded and encoded per step")
    extract_range_frames: int = Field(
        128, ge=1, description="sampled frames per range when the workers of a split deployment extract one "
        "video together (an hour at 1 fps: 29 ranges); the embedded server extracts a video as one range")

    # -- batch jobs (/v1/files, /v1/batches, `llamavid batch`) --------------------------------------
    max_batch_file_bytes: int = Field(200 * MiB, ge=1, description="largest JSONL file /v1/files accepts "
                                      "(OpenAI's limit: 200 MB)")
    max_batch_lines: int = Field(50_000, ge=1, description="requests per batch input file (OpenAI's limit)")
    batch_concurrency: int = Field(
        8, ge=1, description="questions of one batch running at once (grouped by video: a video's first "
        "question runs alone, so it is decoded and encoded once, then its other questions together)")
    batch_video_groups: int = Field(2, ge=1, description="videos of one batch worked on at once")
    batch_lease_seconds: float = Field(
        30.0, gt=0, description="a batch's runner renews its lease every third of this; a batch whose lease ran "
        "out (its API process died) is taken over by another API process, which goes on from its last "
        "finished line")

    # -- memory (see `llamavid plan`) ------------------------------------------------------------
    gpu_memory_utilization: float = Field(
        0.90, gt=0, le=1, description="share of the GPU's memory the service may use; the KV cache gets what the "
        "weights, the activation reserve and a GPU hot tier leave")
    kv_cache_bytes: int | None = Field(
        None, ge=0, description="KV cache size, overriding the plan; unset: what the plan leaves on a GPU, 1 GiB "
        "on a CPU")
    block_size: int = Field(16, ge=1, description="positions per KV cache block")
    prefill_chunk: int = Field(2048, ge=16, description="prompt positions prefilled per forward (longer prompts "
                               "take several, interleaved with decode steps)")
    hot_tier_on_gpu: bool = Field(False, description="keep a worker's feature hot tier (cache_bytes) in GPU "
                                  "memory rather than host memory; the plan counts it")

    # -- media fetching --------------------------------------------------------------------------
    allowed_media_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts/CIDRs fetched even though private (e.g. 127.0.0.1)"
    )
    allow_private_media: bool = False
    fetch_connect_timeout: float = 10.0
    fetch_read_timeout: float = 30.0
    fetch_total_timeout: float = 600.0
    url_memo_size: int = Field(4096, ge=0, description="media URLs whose digest the API remembers (LRU), as their "
                               "cache headers allow, so a repeated URL is not downloaded and hashed again; 0: off")

    # -- cache and storage ---------------------------------------------------------------------
    cache_bytes: int = Field(4096 * MiB, ge=0, description="in-process feature cache (embedded) / hot tier")
    feature_format: Literal["float16", "int8"] = "float16"
    media_dir: str | None = Field(None, description="where uploaded videos are kept (embedded); unset: a temp dir")
    media_bytes: int = Field(8192 * MiB, ge=0, description="bound on kept uploads (LRU)")
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("redis_url", "LLAMAVID_REDIS_URL", "REDIS_URL"),
        description="the Redis of a split deployment's queues and job state (run it with maxmemory-policy "
        "noeviction, AOF recommended); also the feature cache unless cache_redis_url is set",
    )
    cache_redis_url: str | None = Field(
        None, description="a separate Redis for the feature blobs (run it with maxmemory-policy allkeys-lru); "
        "unset: redis_url holds them too")
    redis_namespace: str = "llamavid"
    cache_ttl_seconds: int = Field(7 * 24 * 3600, ge=1)
    visibility_timeout: float = Field(
        10.0, gt=0, description="seconds without a heartbeat (every 2 s) before a worker's jobs are reclaimed; a "
        "slow but live worker keeps its jobs however long they take")
    routing: Literal["affine", "shared"] = Field(
        "affine", description="affine: jobs about a video go to the worker that holds its features (rendezvous "
        "hashing over the live workers); shared: to whichever worker reads the queue first")
    affinity_queue_depth: int = Field(
        8, ge=1, description="questions waiting or running on a video's owner before more go to any free worker")
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="port of a worker's /metrics; 0: a free port chosen by the system (logged "
        "and advertised in the worker's card in Redis), so any number of workers run on one host")
    worker_metrics_host: str = Field("0.0.0.0", description="address a worker's /metrics listens on")

    @field_validator("api_keys", "cors_origins", "allowed_media_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)
