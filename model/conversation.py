"""Conversation templates of the official code (``llamavid/conversation.py``, spec §5.1).

All released LLaMA-VID templates are the "TWO" separator style: ``system + " "``, then per
turn ``ROLE: message`` followed by ``" "`` after a user turn and ``"</s>"`` after an assistant
turn; the open assistant turn renders as ``ROLE:``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"

_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

LONG_VIDEO_PREFIX = "Below is a movie. Memorize the content and answer my question after watching this movie."
LONG_VIDEO_SUFFIX = "Now the movie end."


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def render(self, turns: list[tuple[str, str | None]]) -> str:
        """``turns`` alternate user/assistant messages; a trailing ``None`` opens the answer."""
        out = self.system + self.sep
        for i, (role, message) in enumerate(turns):
            if message is None:
                out += role + ":"
            else:
                out += role + ": " + message + (self.sep if i % 2 == 0 else self.sep2)
        return out


TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna_v1": ConversationTemplate("vicuna_v1", _USER_SYSTEM),
    "imgsp_v1": ConversationTemplate("imgsp_v1", _USER_SYSTEM),
    "llava_v1": ConversationTemplate("llava_v1", _HUMAN_SYSTEM),
}


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    if isinstance(name, ConversationTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}") from None


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str


def build_prompt(
    template: ConversationTemplate,
    messages: list[Message],
    *,
    image_text: str = IMAGE_PLACEHOLDER + "\n",
    image_turn: str = "last",
) -> str:
    """Render a chat with the visual input in front of one user turn's text.

    ``image_turn="last"`` is the official CLI's layout: the visual input moves to the newest
    question, whose text also conditions the Q-Former, so each answer looks at the video through
    the question being asked. ``"first"`` is the gradio demo's layout. ``image_text`` stands for
    the visual input: ``<image>\\n`` for an image or a short video, the movie framing for a long one.
    """
    if image_turn not in ("first", "last"):
        raise ValueError(f"image_turn must be 'first' or 'last', not {image_turn!r}")
    return _render(template, messages, {0 if image_turn == "first" else len(messages) - 1: image_text})


def _render(template: ConversationTemplate, messages: list[Message], before: dict[int, str]) -> str:
    """The chat with ``before[i]`` in front of message i's text."""
    if not messages or messages[-1].role != "user":
        raise ValueError("the conversation must end with a user message")
    turns: list[tuple[str, str | None]] = []
    for i, (expected, message) in enumerate(zip(("user", "assistant") * len(messages), messages)):
        if message.role != expected:
            raise ValueError("messages must alternate user / assistant, starting with user")
        turns.append((template.roles[0 if message.role == "user" else 1], before.get(i, "") + message.content))
    turns.append((template.roles[1], None))
    return template.render(turns)


@dataclass(frozen=True)
class VisualLayout:
    """How the visual input stands in the prompt: its ``<image>`` placeholders and the text between.

    ``movie`` is the stage-3 framing of a long-video checkpoint (spec §6.2); ``subtitles`` holds,
    per frame, the texts said over it (``model.subtitles.frame_texts``). Both need one placeholder
    per visual token, since text sits between the frames' tokens; otherwise a single ``<image>``
    stands for all of them, as in the official short-video and image prompts.
    """

    num_frames: int
    tokens_per_frame: int
    movie: bool = False
    subtitles: Sequence[Sequence[str]] | None = None

    def __post_init__(self) -> None:
        if self.subtitles is None:
            return
        if len(self.subtitles) != self.num_frames:
            raise ValueError(f"subtitles are given for {len(self.subtitles)} frames but the visual input has "
                             f"{self.num_frames}")
        for i, texts in enumerate(self.subtitles):
            if isinstance(texts, str) or any(IMAGE_PLACEHOLDER in text for text in texts):
                raise ValueError(f"subtitles of frame {i}: expected a list of texts without {IMAGE_PLACEHOLDER!r}")

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def per_token(self) -> bool:
        """Whether each visual token has its own placeholder (else one placeholder takes them all)."""
        return self.movie or self.subtitles is not None

    def frames_text(self) -> str:
        """The official interleaving (spec §6.3 step 4): per frame, its placeholders then its texts
        joined by a space, with no separator between frames."""
        per_frame = self.subtitles if self.subtitles is not None else [()] * self.num_frames
        return "".join(IMAGE_PLACEHOLDER * self.tokens_per_frame + " ".join(texts) for texts in per_frame)

    def text(self, *, every_token: bool = False) -> str:
        """The text that stands for the visual input in front of the question.

        ``every_token`` writes one placeholder per visual token even where the model's prompt has
        a single one for all: the token sequence is the same (placeholders with nothing between
        them tokenize to nothing), but a reader sees how many visual tokens there are.
        """
        if self.movie:
            return LONG_VIDEO_PREFIX + self.frames_text() + LONG_VIDEO_SUFFIX + "\n"
        if self.per_token or every_token:
            # A short-video model's frames and subtitles stand where "<image>" stands; the "\n"
            # before the question stays, as training's feature-file branch keeps it (spec §6.3).
            return self.frames_text() + "\n"
        return IMAGE_PLACEHOLDER + "\n"


def visual_prompt(
    template: ConversationTemplate,
    messages: list[Message],
    layout: VisualLayout | None,
    *,
    image_turn: str = "last",
    every_token: bool = False,
) -> str:
    """The chat with the visual input (``None``: text only) in front of one user turn's text."""
    image_text = "" if layout is None else layout.text(every_token=every_token)
    return build_prompt(template, messages, image_text=image_text, image_turn=image_turn)


@dataclass(frozen=True)
class VisualBlock:
    """One of several videos or images in a conversation (experimental: no released checkpoint was
    trained on more than one): its frames, a text label naming it ("Video 2:"), and the user turn
    (an index into the messages) it was sent with."""

    layout: VisualLayout
    label: str
    turn: int


def blocks_prompt(
    template: ConversationTemplate,
    messages: list[Message],
    blocks: Sequence[VisualBlock],
    *,
    every_token: bool = False,
) -> str:
    """The chat with each block, after its label, in front of the text of the turn it came with, in
    the order given. One visual input is ``visual_prompt``'s layout (unlabelled, in the last turn)."""
    before: dict[int, str] = {}
    for block in blocks:
        if not 0 <= block.turn < len(messages) or messages[block.turn].role != "user":
            raise ValueError(f"{block.label} is placed at message {block.turn}, which is not a user message")
        before[block.turn] = before.get(block.turn, "") + block.label + " " + block.layout.text(every_token=every_token)
    return _render(template, messages, before)
