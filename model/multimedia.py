"""Several videos and images in one conversation (experimental).

No released LLaMA-VID checkpoint was trained with more than one visual input, so this is an
extension, not the official layout: each input becomes its own block of frame tokens (two per
frame for a video model), written after a text label naming it ("Video 1:", "Video 2:",
"Image 1:", numbered per kind in the order given), in front of the text of the user turn it was
sent with. Every block's context tokens are read with the same Q-Former question, the last user
message, as a single input's are. One visual input keeps the official prompt
(``LlamaVid.prepare``): unlabelled, in the last turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .conversation import ConversationTemplate, Message, VisualBlock, blocks_prompt, get_template
from .llama_vid import DEFAULT_TEMPLATE, LlamaVid, PreparedPrompt, VisualInput, VisualKind, visual_layout


@dataclass(frozen=True)
class MediaSlot:
    """Where one visual input stands: its kind, the user turn it came with, its frames' subtitles."""

    kind: VisualKind
    turn: int  # index into the messages; a user turn
    subtitles: Sequence[Sequence[str]] | None = None


def labels(kinds: Sequence[VisualKind]) -> list[str]:
    """"Video 1:", "Image 1:", "Video 2:"... numbered per kind, in order."""
    seen: dict[str, int] = {}
    out = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        out.append(f"{kind.capitalize()} {seen[kind]}:")
    return out


def _blocks(model: LlamaVid, slots: Sequence[MediaSlot], frames: Sequence[int]) -> list[VisualBlock]:
    if len(slots) != len(frames):
        raise ValueError(f"{len(slots)} media slots but frame counts for {len(frames)}")
    names = labels([slot.kind for slot in slots])
    return [VisualBlock(visual_layout(model.config, model.vision.num_patches, count, kind=slot.kind,
                                      subtitles=slot.subtitles), name, slot.turn)
            for slot, count, name in zip(slots, frames, names)]


def blocks_prompt_text(model: LlamaVid, messages: list[Message], slots: Sequence[MediaSlot],
                       frames: Sequence[int], *, template: str | ConversationTemplate = DEFAULT_TEMPLATE) -> str:
    """The text prompt for these inputs with ``frames[i]`` frames each, every visual token an ``<image>``."""
    return blocks_prompt(get_template(template), messages, _blocks(model, slots, frames), every_token=True)


def blocks_prompt_tokens(model: LlamaVid, messages: list[Message], slots: Sequence[MediaSlot],
                         frames: Sequence[int], *, template: str | ConversationTemplate = DEFAULT_TEMPLATE) -> int:
    """The length ``prepare_blocks`` would give the prompt, without running the visual head."""
    text = blocks_prompt_text(model, messages, slots, frames, template=template)
    return len(model.tokenizer.encode_with_images(text))


def prepare_blocks(
    model: LlamaVid,
    messages: list[Message],
    visuals: Sequence[VisualInput],
    slots: Sequence[MediaSlot],
    *,
    template: str | ConversationTemplate = DEFAULT_TEMPLATE,
    with_relevance: bool = False,
) -> tuple[PreparedPrompt, list[torch.Tensor | None]]:
    """Render the chat with every input's labelled block, build each block's tokens for the last
    question, splice them in order; with each block's relevance (per frame) when asked for."""
    if len(visuals) != len(slots):
        raise ValueError(f"{len(visuals)} visual inputs but {len(slots)} media slots")
    if any(v.kind != s.kind for v, s in zip(visuals, slots)):
        raise ValueError("each visual input's kind must match its slot's")
    question = messages[-1].content
    blocks = _blocks(model, slots, [len(v.features) for v in visuals])
    pieces: list[torch.Tensor] = []
    relevance: list[torch.Tensor | None] = []
    made: list[VisualBlock] = []
    visual_tokens = 0
    for visual, block in zip(visuals, blocks):
        features = model._without_cls(visual.features) if block.layout.movie else visual.features
        frame = model.frame_tokens(features, question, with_relevance=with_relevance)
        layout = replace(block.layout, tokens_per_frame=frame.tokens_per_frame)
        made.append(replace(block, layout=layout))
        pieces.extend(frame.tokens.split(1) if layout.per_token else [frame.tokens])
        relevance.append(frame.relevance)
        visual_tokens += frame.tokens.shape[0]
    prompt = blocks_prompt(get_template(template), messages, made)
    ids = model.tokenizer.encode_with_images(prompt)
    return PreparedPrompt(prompt, ids, model.splice_embeddings(ids, pieces), visual_tokens), relevance
