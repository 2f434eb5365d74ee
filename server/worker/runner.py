"""The GPU worker's job logic: extract a video's features, answer a question, emit its events.

The same class runs inside ``llamavid serve`` and inside each ``llamavid worker``; only where
jobs come from and where events go differs. A question's tokens come from ``Decoding`` and are
turned into text by the model's own ``Generation`` state (detokenizer, stop strings, EOS,
length: the loop ``LlamaVid.stream`` runs for the CLI and the evaluation). Every admitted
question ends with a ``done`` or an ``error`` event, unless the client went away.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from cache import FeatureStore
from model.batching import Sampled
from model.conversation import Message, get_template
from model.generate import GenerationParams, TokenLogprobs, with_budget
from model.generation import Generation
from model.llama_vid import LlamaVid, PreparedPrompt, VisualInput
from model.relevance import fit_frames, moments, select_frames, uniform_subset
from model.subtitles import frame_texts
from model.tokenizer import LlamaTextTokenizer

from ..engine.events import (
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    FrameRelevance,
    Moment,
    RelevanceEvent,
    TokenLogprob,
    TopLogprob,
)
from ..engine.jobs import JOB_VERSION, Grammar, QuestionJob, VideoJob
from ..engine.protocol import EngineUnavailable
from ..engine.storage import MediaStore, MemoryRangeBoard, RangeBoard, VideoRegistry
from ..metrics import LlamaVidMetrics, LlamaVidRequestMetrics
from .decoding import DecodeFailure, Scheduler
from .features import AskHelp, Emit, FeatureSource, JobError
from .model_thread import ModelThread
from .multimedia import ChosenMany, ManyVisuals, many_inputs, prepare_many
from .subtitles import NO_SUBTITLES, Subtitles, SubtitleSource

if TYPE_CHECKING:
    from model.structured import GrammarSpec

log = logging.getLogger(__name__)

CancelFlag = Callable[[], bool | Awaitable[bool]]  # a plain flag in-process, a Redis lookup when split
T = TypeVar("T")


class ModelRunner:
    def __init__(
        self,
        model: LlamaVid,
        store: FeatureStore,
        media: MediaStore,
        registry: VideoRegistry,
        metrics: LlamaVidMetrics,
        *,
        num_blocks: int,
        block_size: int = 16,
        prefill_chunk: int = 2048,
        max_running: int = 8,
        encode_batch: int = 32,
        range_frames: int = 128,
        boards: RangeBoard | None = None,
        ask_help: AskHelp | None = None,
        stall_timeout: float = 10.0,
        template: str = "vicuna_v1",
        on_cache_access: Callable[[], None] | None = None,
        asr_model: str | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.metrics = metrics
        self.template = template
        self.thread = ModelThread()
        self.features = FeatureSource(model, store, media, registry, metrics, self.thread,
                                      boards=boards or MemoryRangeBoard(), encode_batch=encode_batch,
                                      range_frames=range_frames, stall_timeout=stall_timeout,
                                      on_cache_access=on_cache_access or (lambda: None), ask_help=ask_help)
        self.subtitles = SubtitleSource(media, metrics, asr_model=asr_model, asr_device=str(model.device))
        self.scheduler = Scheduler(model, self.thread, metrics, num_blocks=num_blocks, block_size=block_size,
                                   prefill_chunk=prefill_chunk, max_running=max_running)

    async def start(self) -> None:
        """Warm up (so the first user does not pay for lazy initialisation) and allocate the KV cache."""
        await self.thread(warmup, self.model)
        await self.scheduler.start()

    def close(self) -> None:
        self.scheduler.close()
        self.subtitles.close()
        self.thread.close()

    async def extract(self, job: VideoJob) -> None:
        await self.features.extract(job)

    async def answer(self, job: QuestionJob, emit: Emit, cancelled: CancelFlag) -> None:
        """Answer one question, emitting progress, relevance, deltas and a final done or error event."""
        if job.version != JOB_VERSION:
            await emit(ErrorEvent(status=500, code="version_mismatch", message=(
                f"the job was written as version {job.version}; this worker reads version {JOB_VERSION}")))
            return
        tracker = self.metrics.track_request(job.arrival_time)
        try:
            with tracker:
                waiting = time.time()
                visual, subtitles = await self._inputs(job, emit)
                # The deadline bounds the answer, not the wait for an extraction or a transcription
                # that is making progress (a stalled one fails on its own).
                job = job.model_copy(update={"deadline": job.deadline + (time.time() - waiting)})
                reason = await self._generate(job, visual, subtitles, emit, cancelled, tracker)
                tracker.finish(reason)
        except JobError as exc:
            await emit(exc.event)
        except DecodeFailure as exc:
            await emit(ErrorEvent(status=exc.status, code=exc.code, message=exc.message))
        except EngineUnavailable as exc:  # the media, records or events backend went away mid-question
            await emit(ErrorEvent(status=503, code=exc.code, message=exc.message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s failed", job.request_id)
            await emit(ErrorEvent(status=500, code="internal_error",
                                  message=f"internal error: {type(exc).__name__}: {exc}"))

    async def _inputs(self, job: QuestionJob, emit: Emit) -> tuple[Visual | ManyVisuals | None, Subtitles]:
        """The question's visual features and subtitles, worked out side by side."""
        if len(job.media) > 1:  # each video with its own subtitles
            return await many_inputs(self.features, self.subtitles, job, emit), NO_SUBTITLES
        ref = job.media[0] if job.media else None
        if ref is None:
            return None, NO_SUBTITLES
        if ref.kind == "image":
            return Visual(VisualInput(await self.features.image(ref.digest), "image"), [0.0]), NO_SUBTITLES
        (frames, manifest), subtitles = await asyncio.gather(
            self.features.video(ref, emit),
            self.subtitles.for_question(job.subtitles, ref.digest, ref.video_id, emit))
        return Visual(VisualInput(frames, "video"), manifest.timestamps), subtitles

    def _choose_frames(self, job: QuestionJob, messages: list[Message], template, visual: Visual,
                       subtitles: Subtitles) -> Chosen:
        """The frames that fit the context (all, when they do), each with its subtitles.

        The answer keeps room for ``max_tokens``, up to a quarter of the context: a long answer
        does not starve a video of its frames (and is cut at the context, as the official workers
        cut it). Runs on the model thread: it tokenizes, and may score every frame.
        """
        frames, timestamps = visual.input.features, visual.timestamps
        total, question = len(frames), messages[-1].content
        room = min(self.model.context_length, self.scheduler.positions)
        budget = room - min(job.sampling.max_tokens, room // 4)
        tokens_per_frame = self.model.tokens_per_frame()
        texts = (lambda idx: frame_texts(subtitles.cues, [timestamps[i] for i in idx])) if subtitles.cues \
            else (lambda idx: None)
        scores: torch.Tensor | None = None

        def select(keep: int) -> list[int]:
            nonlocal scores
            if job.frame_selection == "relevant" and scores is None:
                scores = self.model.relevance(frames, question)
            return select_frames(total, keep, job.frame_selection, scores)

        def prompt_tokens(idx: list[int]) -> int:
            return self.model.num_prompt_tokens(messages, len(idx), subtitles=texts(idx), template=template)

        chosen = fit_frames(total, budget, tokens_per_frame, prompt_tokens, select)
        if not chosen:
            raise JobError(400, "context_length_exceeded", (
                f"not even one of the video's {total} frames fits: the conversation and subtitles take "
                f"{prompt_tokens(uniform_subset(total, 1)) - tokens_per_frame} tokens of the {budget} this "
                f"server's context ({room}) leaves after room for the answer; shorten the conversation or "
                "ask without subtitles"))
        if job.relevance and scores is None and len(chosen) < total:
            scores = self.model.relevance(frames, question)  # over every frame, for the moments
        return Chosen(chosen, texts(chosen), scores)

    async def _prepare(self, job: QuestionJob, visual: Visual | None,
                       subtitles: Subtitles) -> tuple[PreparedPrompt, GenerationParams, Chosen | None]:
        messages = [Message(turn.role, turn.content) for turn in job.messages]
        template = get_template(job.template or self.template)
        if job.system is not None:
            template = replace(template, system=job.system)
        s = job.sampling

        def prepare() -> tuple[PreparedPrompt, Chosen | ChosenMany | None]:
            if isinstance(visual, ManyVisuals):
                return prepare_many(self.model, self.scheduler.positions, job, messages, template, visual)
            if visual is None or visual.input.kind != "video":
                return self.model.prepare(messages, visual.input if visual else None, template=template,
                                          with_relevance=job.relevance), None
            chosen = self._choose_frames(job, messages, template, visual, subtitles)
            every = len(chosen.indices) == len(visual.input.features)
            frames = visual.input.features if every else [visual.input.features[i] for i in chosen.indices]
            prepared = self.model.prepare(messages, VisualInput(frames, "video"), template=template,
                                          subtitles=chosen.subtitles, with_relevance=job.relevance and every)
            if every and prepared.relevance is not None:
                chosen = replace(chosen, scores=prepared.relevance)
            return prepared, chosen

        try:
            with self.metrics.stage("tokens"):
                prepared, chosen = await self.thread(prepare)
            room = min(self.model.context_length, self.scheduler.positions)
            if prepared.num_prompt_tokens >= room:
                where = ("the model's context" if room == self.model.context_length
                         else "this server's KV cache")
                raise JobError(400, "context_length_exceeded", (
                    f"the prompt has {prepared.num_prompt_tokens} tokens and {where} holds {room} positions: no room "
                    "for an answer; shorten the conversation"))
            params = with_budget(
                self.model.params(prepared, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                  max_new_tokens=s.max_tokens, stop=s.stop, seed=s.seed, n=s.n,
                                  presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                                  repetition_penalty=s.repetition_penalty, logprobs=s.logprobs,
                                  grammar=grammar_spec(s.grammar)),
                prepared.num_prompt_tokens, room)
        except ValueError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else "invalid_request"
            raise JobError(400, code, str(exc)) from exc
        return prepared, params, chosen

    async def _generate(self, job: QuestionJob, visual: Visual | None, subtitles: Subtitles, emit: Emit,
                        cancelled: CancelFlag, tracker: LlamaVidRequestMetrics) -> str:
        prepared, params, chosen = await self._prepare(job, visual, subtitles)
        tracker.prompt(prepared.num_prompt_tokens - prepared.num_visual_tokens, prepared.num_visual_tokens)
        if isinstance(chosen, ChosenMany):
            for event in chosen.relevance_events():  # one per video (none unless asked for)
                await emit(event)
        elif job.relevance:
            scores = chosen.scores if chosen is not None else prepared.relevance
            if scores is not None:
                await emit(relevance_event(scores, visual.timestamps, chosen.indices if chosen else None))
        done = partial(_done, prepared=prepared, chosen=chosen, subtitles=subtitles,
                       total=0 if visual is None or isinstance(visual, ManyVisuals) else len(visual.input.features))
        try:
            tokens = self.scheduler.open(prepared, params)
        except ValueError as exc:  # a grammar the library cannot compile
            raise JobError(400, "invalid_response_format", str(exc)) from exc
        answers = [Answer(self.model.generation(params), self.model.tokenizer) for _ in range(params.n)]
        try:
            await _before(job.deadline, tokens.admitted(), "waiting for room in the KV cache")
            tracker.start()
            while True:
                if await _is_set(cancelled):
                    return "abort"
                first = not any(a.generation.num_tokens for a in answers)
                with self.metrics.stage("prefill" if first else "decode_step"):
                    sampled = await _before(job.deadline, tokens.next(), "generating")
                tracker.token()
                answer = answers[sampled.seq.index]
                if answer.generation.finish_reason is not None:
                    continue  # a token already in flight when the answer ended at a stop string
                event = answer.push(sampled)
                if event is not None:
                    await emit(event)
                if answer.generation.finish_reason is not None:
                    tokens.end(sampled.seq.index)
                    if all(a.generation.finish_reason is not None for a in answers):
                        await emit(done(answers[0].generation.finish_reason,
                                        completion=sum(a.generation.num_tokens for a in answers)))
                        return answers[0].generation.finish_reason
        finally:
            await tokens.close()


class Answer:
    """One of a request's answers on its way to events: text from ``Generation`` (which holds back
    partial characters and stop-string prefixes), log-probabilities of every token since the last
    delta, and the offsets a relay checks."""

    def __init__(self, generation: Generation, tokenizer: LlamaTextTokenizer) -> None:
        self.generation = generation
        self.tokenizer = tokenizer
        self.chars = self.tokens = 0  # characters and log-probability entries emitted so far
        self.pending: list[TokenLogprob] = []

    def push(self, sampled: Sampled) -> DeltaEvent | None:
        delta = self.generation.push(sampled.token)
        if sampled.logprobs is not None and sampled.token != self.generation.eos_id:
            self.pending.append(token_logprob(self.tokenizer, sampled.logprobs))
        if not delta.text and delta.finish_reason is None:
            return None
        event = DeltaEvent(text=delta.text, offset=self.chars, index=sampled.seq.index,
                           logprobs=self.pending if sampled.logprobs is not None else None,
                           token_offset=self.tokens, finish_reason=delta.finish_reason)
        self.chars += len(delta.text)
        self.tokens += len(self.pending)
        self.pending = []
        return event


def token_logprob(tokenizer: LlamaTextTokenizer, logprobs: TokenLogprobs) -> TokenLogprob:
    def text(token: int) -> tuple[str, list[int]]:
        raw = tokenizer.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    token, raw = text(logprobs.token)
    top = []
    for candidate, logprob in logprobs.top:
        candidate_text, candidate_raw = text(candidate)
        top.append(TopLogprob(token=candidate_text, logprob=max(logprob, -9999.0), bytes=candidate_raw))
    return TokenLogprob(token=token, logprob=max(logprobs.logprob, -9999.0), bytes=raw, top_logprobs=top)


def grammar_spec(grammar: Grammar | None) -> GrammarSpec | None:
    if grammar is None:
        return None
    from model.structured import GrammarSpec  # the grammar library loads only when a request needs it

    return GrammarSpec(kind=grammar.kind, value=grammar.value)


@dataclass(frozen=True)
class Visual:
    input: VisualInput
    timestamps: list[float]  # seconds of each frame of the input


@dataclass(frozen=True)
class Chosen:
    """The frames of a video the LLM sees, and what was worked out choosing them."""

    indices: list[int]  # into the video's sampled frames, in time order
    subtitles: list[list[str]] | None  # per chosen frame
    scores: torch.Tensor | None = None  # relevance of every sampled frame, when asked for or used


async def _before(deadline: float, step: Awaitable[T], doing: str) -> T:
    """``step``, unless the request's deadline passes first (then a 408 error event)."""
    try:
        return await asyncio.wait_for(step, timeout=max(0.0, deadline - time.time()))
    except asyncio.TimeoutError:
        raise JobError(408, "timeout", f"the request ran past its deadline while {doing}") from None


async def _is_set(flag: CancelFlag) -> bool:
    value = flag()
    return bool(await value) if inspect.isawaitable(value) else bool(value)


def _done(reason: str, *, completion: int, prepared: PreparedPrompt, chosen: Chosen | ChosenMany | None,
          subtitles: Subtitles, total: int) -> DoneEvent:
    video = {} if chosen is None else chosen.done_fields() if isinstance(chosen, ChosenMany) else {
        "frames_used": len(chosen.indices), "frames_total": total, "subtitles": subtitles.source,
        "subtitle_cues": len(subtitles.cues)}
    return DoneEvent(finish_reason=reason, prompt_tokens=prepared.num_prompt_tokens,
                     visual_tokens=prepared.num_visual_tokens, completion_tokens=completion, **video)


def relevance_event(scores: torch.Tensor, timestamps: list[float], used: list[int] | None) -> RelevanceEvent:
    """Per-frame relevance (the raw attention score, a softmax over frames, whether the LLM saw
    the frame) and the moments it adds up to."""
    raw = scores.float()
    weights = torch.softmax(raw, dim=0)
    seen = set(range(len(raw)) if used is None else used)
    frames = [FrameRelevance(index=i, time=round(timestamps[i], 3) if i < len(timestamps) else None,
                             score=round(float(raw[i]), 5), weight=round(float(weights[i]), 6), used=i in seen)
              for i in range(len(raw))]
    spans = moments(raw, timestamps) if len(timestamps) == len(raw) else []
    return RelevanceEvent(frames=frames, moments=[
        Moment(start=m.start, end=m.end, score=m.score, frame=m.peak) for m in spans])


@torch.inference_mode()
def warmup(model: LlamaVid) -> None:
    """One encode + prefill + decode step, so the first user does not pay for lazy initialisation."""
    size = model.processor.crop_size
    frames = np.zeros((2, size, size, 3), dtype=np.uint8)
    features = model.encode_frames(model.preprocess(frames))
    prepared = model.prepare([Message("user", "warm up")], VisualInput(features.cpu(), "video"))
    for _ in model.stream(prepared, model.params(prepared, max_new_tokens=2)):
        pass
