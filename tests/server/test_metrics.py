import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import CACHE_TIERS, FINISHED_REASONS, STAGES, LlamaVidMetrics

EXPECTED_NAMES = [
    "llamavid_time_to_first_token_seconds_bucket",
    "llamavid_inter_token_latency_seconds_bucket",
    "llamavid_e2e_request_latency_seconds_bucket",
    "llamavid_request_queue_time_seconds_bucket",
    "llamavid_num_requests_running",
    "llamavid_num_requests_waiting",
    "llamavid_queue_depth",
    "llamavid_kv_cache_usage_perc",
    "llamavid_num_preemptions_total",
    "llamavid_prompt_tokens_total",
    "llamavid_visual_tokens_total",
    "llamavid_generation_tokens_total",
    "llamavid_prefill_positions_total",
    "llamavid_request_success_total",
    "llamavid_frames_decoded_total",
    "llamavid_frames_encoded_total",
    "llamavid_frames_recomputed_total",
    "llamavid_extraction_ranges_total",
    "llamavid_question_features_total",
    "llamavid_route_total",
    "llamavid_video_subtitles_total",
    "llamavid_audio_seconds_transcribed_total",
    "llamavid_stage_seconds_bucket",
    "llamavid_feature_cache_queries_total",
    "llamavid_feature_cache_hits_total",
    "llamavid_feature_cache_bytes_read_total",
    "llamavid_feature_cache_bytes",
    "llamavid_video_jobs_total",
    "llamavid_http_requests_total",
    "llamavid_batch_lines_total",
    "llamavid_batches_total",
    "llamavid_batches_running",
    "llamavid_model_info",
]


def value(metrics: LlamaVidMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_two_instances_do_not_collide_and_expose_every_name():
    first, second = LlamaVidMetrics(), LlamaVidMetrics()
    first.frames_decoded.inc(8)
    second.frames_decoded.inc(2)
    first.http_request("/v1/chat/completions", 200)
    first.set_model_info("llama-vid-7b", "float16", "cuda", demo=False)

    assert value(first, "llamavid_frames_decoded_total") == 8
    assert value(second, "llamavid_frames_decoded_total") == 2
    text = first.exposition()[0].decode()
    for name in EXPECTED_NAMES:
        assert f"\n{name}" in text, name
    # The text parses, holds no metric beyond the expected ones, and a fresh registry comes
    # with the process collectors (a registry passed in does not).
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {f for f in families if f.startswith("llamavid_") and not f.endswith("_created")} == {
        n.removesuffix("_bucket").removesuffix("_total") for n in EXPECTED_NAMES}
    assert "process_cpu_seconds" in families
    shared = CollectorRegistry()
    LlamaVidMetrics(shared)
    assert shared.get_sample_value("process_cpu_seconds_total") is None


def test_enumerated_series_start_at_zero():
    m = LlamaVidMetrics(process_metrics=False)
    for reason in FINISHED_REASONS:
        assert value(m, "llamavid_request_success_total", finished_reason=reason) == 0
    for stage in STAGES:
        assert value(m, "llamavid_stage_seconds_count", stage=stage) == 0
    for tier in CACHE_TIERS:
        assert value(m, "llamavid_feature_cache_hits_total", tier=tier) == 0
    assert value(m, "llamavid_queue_depth", queue="videos") == 0


def test_request_lifecycle():
    m = LlamaVidMetrics(process_metrics=False)
    with m.track_request(arrival_time=time.time() - 2.0) as req:
        assert value(m, "llamavid_num_requests_waiting") == 1
        req.start()
        assert value(m, "llamavid_num_requests_running") == 1
        assert value(m, "llamavid_num_requests_waiting") == 0
        req.prompt(text_tokens=30, visual_tokens=2 * 16)
        for _ in range(3):
            req.token()
        req.finish("length")
        req.finish("stop")  # ignored: a request finishes once
    assert value(m, "llamavid_num_requests_running") == 0
    assert value(m, "llamavid_request_queue_time_seconds_sum") >= 2.0
    assert value(m, "llamavid_time_to_first_token_seconds_count") == 1
    assert value(m, "llamavid_time_to_first_token_seconds_sum") >= 2.0
    assert value(m, "llamavid_inter_token_latency_seconds_count") == 2
    assert value(m, "llamavid_generation_tokens_total") == 3
    assert value(m, "llamavid_prompt_tokens_total") == 62
    assert value(m, "llamavid_visual_tokens_total") == 32
    assert value(m, "llamavid_request_success_total", finished_reason="length") == 1
    assert value(m, "llamavid_request_success_total", finished_reason="stop") == 0
    assert value(m, "llamavid_e2e_request_latency_seconds_count") == 1


def test_context_exit_picks_the_finish_reason():
    m = LlamaVidMetrics(process_metrics=False)
    with m.track_request():  # never started: leaves the waiting gauge
        pass
    with pytest.raises(RuntimeError), m.track_request() as req:
        req.start()
        raise RuntimeError("boom")
    with pytest.raises(asyncio.CancelledError), m.track_request() as req:
        req.start()
        raise asyncio.CancelledError
    for reason in ("stop", "error", "abort"):
        assert value(m, "llamavid_request_success_total", finished_reason=reason) == 1
    assert value(m, "llamavid_num_requests_waiting") == 0
    assert value(m, "llamavid_num_requests_running") == 0


def test_helpers_record_and_reject_unknown_labels():
    m = LlamaVidMetrics(process_metrics=False)
    with pytest.raises(KeyError), m.stage("decode"):
        raise KeyError("failed stages are timed too")
    m.cache_lookup("hot", hit=True, nbytes=4096)
    m.cache_lookup("hot", hit=False)
    m.set_cache_bytes("memory", 1 << 20)
    m.set_queue_depth("questions", 5)
    m.video_job_finished("done")
    m.set_model_info("a", "float16", "cuda", demo=False)
    m.set_model_info("b", "float32", "cpu", demo=True)

    assert value(m, "llamavid_stage_seconds_count", stage="decode") == 1
    assert value(m, "llamavid_feature_cache_queries_total", tier="hot") == 2
    assert value(m, "llamavid_feature_cache_hits_total", tier="hot") == 1
    assert value(m, "llamavid_feature_cache_bytes_read_total", tier="hot") == 4096
    assert value(m, "llamavid_feature_cache_bytes", tier="memory") == 1 << 20
    assert value(m, "llamavid_queue_depth", queue="questions") == 5
    assert value(m, "llamavid_video_jobs_total", status="done") == 1
    assert value(m, "llamavid_model_info", model="b", dtype="float32", device="cpu", demo="true") == 1
    assert value(m, "llamavid_model_info", model="a", dtype="float16", device="cuda", demo="false") is None
    for bad in (lambda: m.stage("decoding").__enter__(), lambda: m.cache_lookup("warm", True),
                lambda: m.set_queue_depth("answers", 1), lambda: m.video_job_finished("ok"),
                lambda: m.track_request().finish("timeout")):
        with pytest.raises(ValueError):
            bad()


def test_exposition_negotiates():
    m = LlamaVidMetrics(process_metrics=False)
    body, content_type = m.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    assert m.exposition()[1].startswith("text/plain")
