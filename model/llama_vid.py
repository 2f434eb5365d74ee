"""LLaMA-VID: frames -> cached features -> two tokens per frame -> streamed answer.

The work is split along the line the feature cache needs:

* ``encode_frames`` is question-independent (EVA only) and is what the service caches;
* ``frame_tokens`` turns cached features plus a question into the visual tokens;
* ``prepare`` renders the conversation (with per-frame subtitles interleaved, if any) and splices
  the visual tokens into the LLM's input; ``prompt_text`` shows that prompt without running anything;
* ``stream`` generates, yielding text deltas.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from transformers import InstructBlipQFormerModel, LlamaForCausalLM

from .batching import PagedDecoder
from .config import LlamaVidConfig
from .conversation import ConversationTemplate, Message, VisualLayout, get_template, visual_prompt
from .eva import EvaVisionTower, lavis_dims
from .frame_tokens import FrameTokens, LlamaVidVisualHead
from .generate import GenerationDefaults, GenerationParams, generate_tokens, with_budget
from .generation import Generation, TextDelta
from .kv_cache import BlockPool
from .preprocess import ClipPreprocessor
from .qformer import QFormerTokenizer
from .tokenizer import IMAGE_TOKEN_INDEX, LlamaTextTokenizer
from .weights import load_torch_file

if TYPE_CHECKING:
    from .structured import GrammarCompiler

VisualKind = Literal["video", "image"]

DEFAULT_TEMPLATE = "vicuna_v1"
EVA_G_PATCH = 14  # the patch size of LAVIS' EVA-G, the tower of every released checkpoint
FRAME_BLOCK = 64  # frames per Q-Former block: bounds memory for hour-long videos (spec §4.3)


def visual_layout(
    config: LlamaVidConfig,
    num_patches: int,
    num_frames: int,
    *,
    kind: VisualKind = "video",
    subtitles: Sequence[Sequence[str]] | None = None,
) -> VisualLayout:
    """How ``num_frames`` frames of ``kind`` stand in this checkpoint's prompt (``num_patches``: EVA's).

    A long-video checkpoint frames a video as a movie, whose features reach the visual head
    without CLS (``num_patches`` tokens where others have ``1 + num_patches``). Subtitles go with
    videos only: an image has no timeline to put them on.
    """
    if subtitles is not None and kind != "video":
        raise ValueError(f"subtitles go with a video, not an {kind}")
    movie = kind == "video" and config.long_video
    tokens_per_frame = config.tokens_per_frame(num_patches - 1 if movie else num_patches)
    return VisualLayout(num_frames, tokens_per_frame, movie=movie, subtitles=subtitles)


def checkpoint_num_patches(config: LlamaVidConfig) -> int:
    """EVA's patch count for a checkpoint without loading it: the processor's crop size over the
    tower's patch size (its tensors memory-mapped, not read). Without the files it falls back to
    what every released checkpoint uses, 224 px and EVA-G's 14 px patches."""
    try:
        crop = ClipPreprocessor.from_dir(config.image_processor_path).crop_size
    except (OSError, ValueError):
        crop = 224
    path = config.vision_tower_path
    patch = lavis_dims(load_torch_file(path), str(path))[3] if path.is_file() else EVA_G_PATCH
    return (crop // patch) ** 2


def checkpoint_prompt_text(
    config: LlamaVidConfig,
    num_patches: int,
    messages: list[Message],
    num_frames: int,
    *,
    subtitles: Sequence[Sequence[str]] | None = None,
    template: str | ConversationTemplate = DEFAULT_TEMPLATE,
    image_turn: str = "last",
    kind: VisualKind = "video",
) -> str:
    """The text prompt the LLM receives for ``num_frames`` frames (0: text only), each visual token
    written as ``<image>``, so users can check what the model sees without loading it.

    It is ``LlamaVid.prepare(...).prompt`` except that where the model's prompt has one ``<image>``
    for all visual tokens (a short video or an image without subtitles) it shows one per token;
    both tokenize to the same sequence.
    """
    if not num_frames and subtitles is not None:
        raise ValueError("subtitles need a video to go with")
    layout = visual_layout(config, num_patches, num_frames, kind=kind, subtitles=subtitles) if num_frames else None
    return visual_prompt(get_template(template), messages, layout, image_turn=image_turn, every_token=True)


@dataclass
class VisualInput:
    """Cached EVA features of one video or image: [T, 1+P, C] (or T tensors [1+P, C]), CLS first."""

    features: torch.Tensor | Sequence[torch.Tensor]
    kind: VisualKind = "video"


@dataclass
class PreparedPrompt:
    prompt: str
    input_ids: list[int]  # with IMAGE_TOKEN_INDEX placeholders
    inputs_embeds: torch.Tensor  # [1, L', H]
    num_visual_tokens: int
    relevance: torch.Tensor | None = None  # [T]

    @property
    def num_prompt_tokens(self) -> int:
        return self.inputs_embeds.shape[1]


class LlamaVid(nn.Module):
    def __init__(
        self,
        config: LlamaVidConfig,
        vision: EvaVisionTower,
        qformer: InstructBlipQFormerModel,
        visual: LlamaVidVisualHead,
        llm: LlamaForCausalLM,
        tokenizer: LlamaTextTokenizer,
        qformer_tokenizer: QFormerTokenizer,
        processor: ClipPreprocessor,
        generation_defaults: GenerationDefaults,
        encoder_fingerprint: str,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.qformer = qformer
        self.visual = visual
        self.llm = llm
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.processor = processor
        self.generation_defaults = generation_defaults
        self.encoder_fingerprint = encoder_fingerprint
        self._grammars: GrammarCompiler | None = None

    @property
    def device(self) -> torch.device:
        return self.visual.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.query.dtype

    @property
    def context_length(self) -> int:
        return self.config.max_token

    def tokens_per_frame(self) -> int:
        return self.config.tokens_per_frame(self.vision.num_patches)

    @property
    def frame_feature_shape(self) -> tuple[int, int]:
        """One frame's EVA features: CLS + patches, by the tower's width."""
        return 1 + self.vision.num_patches, self.config.mm_hidden_size

    # -- vision ------------------------------------------------------------------------------
    def preprocess(self, frames, *, pad_to_square: bool = False) -> torch.Tensor:
        return self.processor(frames, pad_to_square=pad_to_square)

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
        """pixels [T, 3, S, S] -> EVA features [T, 1+P, C] in the tower's dtype, on its device."""
        size = self.vision.config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"EVA expects {size}px input, got {tuple(pixels.shape[-2:])}")
        device = self.vision.device
        out = [
            self.vision(pixel_values=pixels[i : i + batch_size].to(device)).last_hidden_state
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(out) if out else pixels.new_zeros((0, *self.frame_feature_shape))

    # -- visual tokens -----------------------------------------------------------------------
    @torch.inference_mode()
    def frame_tokens(
        self,
        features: torch.Tensor | Sequence[torch.Tensor],
        question: str,
        *,
        with_relevance: bool = False,
        block_size: int = FRAME_BLOCK,
    ) -> FrameTokens:
        """features [T, N, C] + question -> tokens [T * (1 + n), H], context token first per frame.

        ``features`` may also be a sequence of per-frame [N, C] tensors (as a feature cache returns
        them): they are stacked one block at a time, so an hour of frames is never copied into one
        tensor.
        """
        count = len(features)
        frame_ndim = features.ndim - 1 if isinstance(features, torch.Tensor) else (features[0].ndim if count else 0)
        if count == 0 or frame_ndim != 2 or features[0].shape[-1] != self.config.mm_hidden_size:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else f"{count} frames"
            raise ValueError(f"expected features [T >= 1, N, {self.config.mm_hidden_size}], got {shape}")
        text = self.qformer_tokenizer([question])
        ids, mask = text.input_ids.to(self.device), text.attention_mask.to(self.device)
        tokens, scores = [], []
        for start in range(0, count, block_size):
            block = features[start : start + block_size]
            block = block if isinstance(block, torch.Tensor) else torch.stack(list(block))
            out = self.visual(block.to(self.device), self.qformer, ids, mask, with_relevance=with_relevance)
            tokens.append(out.tokens)
            if out.relevance is not None:
                scores.append(out.relevance)
        stacked = torch.cat(tokens)
        return FrameTokens(
            tokens=stacked.flatten(0, 1),
            tokens_per_frame=stacked.shape[1],
            relevance=torch.cat(scores) if scores else None,
        )

    # -- prompt ------------------------------------------------------------------------------
    def prepare(
        self,
        messages: list[Message],
        visual: VisualInput | None = None,
        *,
        template: str | ConversationTemplate = DEFAULT_TEMPLATE,
        image_turn: str = "last",
        with_relevance: bool = False,
        subtitles: Sequence[Sequence[str]] | None = None,
    ) -> PreparedPrompt:
        """Render the chat, build the visual tokens for the question, splice them into embeddings.

        ``subtitles`` holds, per frame of ``visual``, the texts said over it
        (``model.subtitles.frame_texts``); they are interleaved after each frame's tokens as the
        long-video model was trained (spec §6.3). The Q-Former still reads only the question.
        """
        template = get_template(template)
        if visual is None:
            if subtitles is not None:
                raise ValueError("subtitles need a video to go with")
            prompt = visual_prompt(template, messages, None)
            ids = self.tokenizer.encode(prompt)
            return PreparedPrompt(prompt, ids, self.splice_embeddings(ids, []), 0)

        question = messages[-1].content if image_turn == "last" else messages[0].content
        features = visual.features
        # validated before any compute: a wrong frame count fails fast
        layout = visual_layout(self.config, self.vision.num_patches, len(features), kind=visual.kind,
                               subtitles=subtitles)
        if layout.movie:
            features = self._without_cls(features)
        frame = self.frame_tokens(features, question, with_relevance=with_relevance)
        layout = replace(layout, tokens_per_frame=frame.tokens_per_frame)  # what the head made, to the token
        pieces = list(frame.tokens.split(1)) if layout.per_token else [frame.tokens]
        prompt = visual_prompt(template, messages, layout, image_turn=image_turn)
        ids = self.tokenizer.encode_with_images(prompt)
        return PreparedPrompt(prompt, ids, self.splice_embeddings(ids, pieces), frame.tokens.shape[0], frame.relevance)

    def prompt_text(self, messages: list[Message], num_frames: int, **options: object) -> str:
        """The text prompt the LLM receives for ``num_frames`` frames (``options``: subtitles,
        template, image_turn, kind): see ``checkpoint_prompt_text``."""
        return checkpoint_prompt_text(self.config, self.vision.num_patches, messages, num_frames, **options)

    def num_prompt_tokens(self, messages: list[Message], num_frames: int, **options: object) -> int:
        """The length ``prepare`` would give the prompt (``options`` as for ``prompt_text``), visual
        tokens included, without running the visual head: what fitting frames to the context counts."""
        return len(self.tokenizer.encode_with_images(self.prompt_text(messages, num_frames, **options)))

    @torch.inference_mode()
    def relevance(self, features: torch.Tensor | Sequence[torch.Tensor], question: str) -> torch.Tensor:
        """Each frame's relevance to the question [T] (the context attention's score, as
        ``prepare(with_relevance=True)`` reports it), for choosing frames before the prompt is built."""
        if self.config.long_video:
            features = self._without_cls(features)
        return self.frame_tokens(features, question, with_relevance=True).relevance

    def _without_cls(self, features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | Sequence[torch.Tensor]:
        """Stage-3 (long-video) checkpoints read patches only (``feats[:, 1:]``), whatever the token
        count's parity; features already without CLS are left as they are."""
        if features[0].shape[0] != 1 + self.vision.num_patches:
            return features
        return features[:, 1:] if isinstance(features, torch.Tensor) else [f[1:] for f in features]

    def splice_embeddings(self, ids: list[int], visual: list[torch.Tensor]) -> torch.Tensor:
        """Text embeddings with ``visual[k]`` spliced in at the k-th placeholder (spec §5.4)."""
        slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
        if len(slots) != len(visual):
            raise ValueError(f"prompt has {len(slots)} image placeholders but {len(visual)} visual inputs")
        embed = self.llm.get_input_embeddings()
        pieces, start = [], 0
        for slot, tokens in zip(slots + [len(ids)], visual + [None]):
            if slot > start:
                pieces.append(embed(torch.tensor(ids[start:slot], device=embed.weight.device)))
            if tokens is not None:
                pieces.append(tokens.to(embed.weight.device, embed.weight.dtype))
            start = slot + 1
        return torch.cat(pieces)[None]

    # -- generation --------------------------------------------------------------------------
    def params(self, prepared: PreparedPrompt | None = None, **request) -> GenerationParams:
        """Request values over ``generation_config.json`` defaults (None = use the default), with
        ``max_new_tokens`` clamped to the context left after ``prepared`` (the official workers do);
        a prompt that leaves no room is a ``ValueError`` that names the context."""
        params = self.generation_defaults.apply(**request)
        if prepared is None:
            return params
        return with_budget(params, prepared.num_prompt_tokens, self.context_length)

    def generation(self, params: GenerationParams) -> Generation:
        """The text state one request's tokens are pushed through, whichever decoder makes them."""
        return Generation(self.tokenizer, params, self.tokenizer.eos_id)

    def tokens(self, prepared: PreparedPrompt, params: GenerationParams) -> Iterator[int]:
        """Token ids of one request decoded on its own (prefill, then one step per ``next``)."""
        return generate_tokens(self.llm, prepared.inputs_embeds, params, eos_id=self.tokenizer.eos_id,
                               prompt_ids=prepared.input_ids)

    def paged_decoder(self, num_blocks: int, *, block_size: int = 16, prefill_chunk: int = 2048) -> PagedDecoder:
        """A decoder that batches every running request in one forward over a paged KV cache of
        ``num_blocks`` blocks (``model.batching``, ``model.kv_cache``), allocated here."""
        llama = self.llm.config
        head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads
        embed = self.llm.get_input_embeddings().weight  # never quantized: the KV cache's dtype and device
        pool = BlockPool(llama.num_hidden_layers, num_blocks, block_size, llama.num_key_value_heads, head_dim,
                         embed.dtype, embed.device)
        return PagedDecoder(self.llm, pool, eos_id=self.tokenizer.eos_id, prefill_chunk=prefill_chunk,
                            grammars=self.grammar_compiler)

    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles structured-output grammars against this vocabulary (built once, on first use)."""
        if self._grammars is None:
            from .structured import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.llm.config.vocab_size, self.tokenizer.eos_id)
        return self._grammars

    def stream(self, prepared: PreparedPrompt, params: GenerationParams) -> Iterator[TextDelta]:
        """Yield text deltas; the last one carries ``finish_reason``. Stop iterating to cancel."""
        params = with_budget(params, prepared.num_prompt_tokens, self.context_length)
        generation = self.generation(params)
        for token in self.tokens(prepared, params):
            delta = generation.push(token)
            yield delta
            if delta.finish_reason is not None:
                return
