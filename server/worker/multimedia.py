"""A question about several videos and images (experimental): their inputs, the frames that fit.

``model.multimedia`` lays the inputs out (one labelled block each, in the turn each came with).
Here the worker gathers every input's features (and each video's subtitles), then fits the frames
to the context: when they do not all fit, the frame budget is split across the videos in
proportion to their frame counts (each keeps at least one frame), and each video is thinned as a
single one is (``uniform`` or ``relevant``). Relevance is reported per video.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from dataclasses import dataclass

import torch

from model.conversation import ConversationTemplate, Message
from model.llama_vid import PreparedPrompt, VisualInput
from model.multimedia import MediaSlot, blocks_prompt_tokens, prepare_blocks
from model.relevance import fit_frames, select_frames
from model.subtitles import frame_texts

from ..engine.events import MediaUsage, RelevanceEvent
from ..engine.jobs import MediaRef, QuestionJob
from .features import Emit, JobError
from .subtitles import NO_SUBTITLES, Subtitles


@dataclass(frozen=True)
class Medium:
    ref: MediaRef
    input: VisualInput
    timestamps: list[float]
    subtitles: Subtitles


@dataclass(frozen=True)
class ManyVisuals:
    """Every input of a question with several media, in the order given."""

    media: list[Medium]

    @property
    def frames_total(self) -> int:
        return sum(len(m.input.features) for m in self.media if m.input.kind == "video")


@dataclass(frozen=True)
class ChosenMany:
    """The frames of each input the LLM sees (None for an image) and each video's relevance."""

    visuals: ManyVisuals
    indices: list[list[int] | None]
    scores: list[torch.Tensor | None]

    def relevance_events(self) -> list[RelevanceEvent]:
        from .runner import relevance_event  # the runner imports this module

        out = []
        for i, (medium, used, scores) in enumerate(zip(self.visuals.media, self.indices, self.scores)):
            if scores is not None and medium.input.kind == "video":
                event = relevance_event(scores, medium.timestamps, used)
                out.append(event.model_copy(update={"media_index": i, "video_id": medium.ref.video_id}))
        return out

    def done_fields(self) -> dict:
        """``DoneEvent`` fields: frames summed over the videos, and what each input used."""
        usage = [MediaUsage(index=i, kind=m.input.kind, video_id=m.ref.video_id,
                            frames_used=len(used) if used is not None else 1,
                            frames_total=len(m.input.features))
                 for i, (m, used) in enumerate(zip(self.visuals.media, self.indices))]
        videos = [u for u in usage if u.kind == "video"]
        sources = [m.subtitles.source for m in self.visuals.media if m.subtitles.source]
        return {"frames_used": sum(u.frames_used for u in videos), "frames_total": sum(u.frames_total for u in videos),
                "subtitles": sources[0] if sources else None,
                "subtitle_cues": sum(len(m.subtitles.cues) for m in self.visuals.media), "media": usage}


async def many_inputs(features, subtitles, job: QuestionJob, emit: Emit) -> ManyVisuals:
    """Every input's features side by side (``features``: the runner's ``FeatureSource``,
    ``subtitles``: its ``SubtitleSource``)."""

    async def one(ref: MediaRef) -> Medium:
        if ref.kind == "image":
            return Medium(ref, VisualInput(await features.image(ref.digest), "image"), [0.0], NO_SUBTITLES)
        (frames, manifest), subs = await asyncio.gather(
            features.video(ref, emit),
            subtitles.for_question(ref.subtitles or job.subtitles, ref.digest, ref.video_id, emit))
        return Medium(ref, VisualInput(frames, "video"), manifest.timestamps, subs)

    return ManyVisuals(list(await asyncio.gather(*(one(ref) for ref in job.media))))


def allocate(keep: int, counts: list[int]) -> list[int]:
    """``keep`` frames split over videos of ``counts`` frames in proportion (largest remainder),
    each keeping at least one and at most all of its own."""
    total = sum(counts)
    if keep >= total:
        return list(counts)
    exact = [keep * c / total for c in counts]
    shares = [max(1, min(c, int(e))) for c, e in zip(counts, exact)]
    while sum(shares) > keep and max(shares) > 1:  # the floor of one each took more than its share
        shares[max((i for i in range(len(counts)) if shares[i] > 1), key=lambda i: shares[i] - exact[i])] -= 1
    order = sorted(range(len(counts)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    while sum(shares) < keep and any(s < c for s, c in zip(shares, counts)):
        for i in order:
            if sum(shares) >= keep:
                break
            if shares[i] < counts[i]:
                shares[i] += 1
    return shares


def prepare_many(model, positions: int, job: QuestionJob, messages: list[Message],
                 template: ConversationTemplate, visuals: ManyVisuals) -> tuple[PreparedPrompt, ChosenMany]:
    """Fit every input's frames to the context and build the prompt (runs on the model thread)."""
    media = visuals.media
    videos = [i for i, m in enumerate(media) if m.input.kind == "video"]
    counts = [len(media[i].input.features) for i in videos]
    offsets = [sum(counts[:k]) for k in range(len(counts))]
    question = messages[-1].content
    room = min(model.context_length, positions)
    budget = room - min(job.sampling.max_tokens, room // 4)
    scores: dict[int, torch.Tensor] = {}

    def video_scores(i: int) -> torch.Tensor:
        if i not in scores:
            scores[i] = model.relevance(media[i].input.features, question)
        return scores[i]

    def split(chosen: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {i: [] for i in videos}
        for g in chosen:
            k = bisect_right(offsets, g) - 1
            out[videos[k]].append(g - offsets[k])
        return out

    def texts(i: int, idx: list[int]):
        cues = media[i].subtitles.cues
        return frame_texts(cues, [media[i].timestamps[t] for t in idx]) if cues else None

    def slots(per_video: dict[int, list[int]]) -> list[MediaSlot]:
        return [MediaSlot(m.input.kind, m.ref.turn if m.ref.turn is not None else len(messages) - 1,
                          texts(i, per_video[i]) if i in per_video else None) for i, m in enumerate(media)]

    def frame_counts(per_video: dict[int, list[int]]) -> list[int]:
        return [len(per_video[i]) if i in per_video else len(m.input.features) for i, m in enumerate(media)]

    def select(keep: int) -> list[int]:
        out = []
        for k, share in enumerate(allocate(keep, counts)):
            i = videos[k]
            pick = select_frames(counts[k], share, job.frame_selection,
                                 video_scores(i) if job.frame_selection == "relevant" else None)
            out.extend(offsets[k] + t for t in pick)
        return out

    def prompt_tokens(chosen: list[int]) -> int:
        per_video = split(chosen)
        return blocks_prompt_tokens(model, messages, slots(per_video), frame_counts(per_video), template=template)

    total = sum(counts)
    chosen = fit_frames(total, budget, model.tokens_per_frame(), prompt_tokens, select) if videos else []
    if videos and not chosen:
        raise JobError(400, "context_length_exceeded", (
            f"not even one frame of each of the {len(videos)} videos fits: the conversation, labels and any "
            f"images take more of the {budget} tokens this server's context ({room}) leaves after room for "
            "the answer; shorten the conversation or send fewer media"))
    per_video = split(chosen)
    inputs = []
    for i, m in enumerate(media):
        if i in per_video and len(per_video[i]) < len(m.input.features):
            inputs.append(VisualInput([m.input.features[t] for t in per_video[i]], "video"))
        else:
            inputs.append(m.input)
    prepared, block_scores = prepare_blocks(model, messages, inputs, slots(per_video), template=template,
                                            with_relevance=job.relevance)
    found: list[torch.Tensor | None] = []
    for i, m in enumerate(media):
        if not job.relevance or m.input.kind != "video":
            found.append(None)
        elif len(per_video[i]) == len(m.input.features):
            found.append(block_scores[i])  # every frame was seen: the prompt's own scores
        else:
            found.append(video_scores(i))  # over every sampled frame, for the moments
    indices = [per_video.get(i) for i in range(len(media))]
    return prepared, ChosenMany(visuals, indices, found)
