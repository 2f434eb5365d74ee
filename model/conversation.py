"""Conversation templates of the official code (``llamavid/conversation.py``, spec §5.1).

All released LLaMA-VID templates are the "TWO" separator style: ``system + " "``, then per
turn ``ROLE: message`` followed by ``" "`` after a user turn and ``"</s>"`` after an assistant
turn; the open assistant turn renders as ``ROLE:``.
"""

from __future__ import annotations

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


def get_template(name: str) -> ConversationTemplate:
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
    if not messages or messages[-1].role != "user":
        raise ValueError("the conversation must end with a user message")
    if image_turn not in ("first", "last"):
        raise ValueError(f"image_turn must be 'first' or 'last', not {image_turn!r}")
    image_at = 0 if image_turn == "first" else len(messages) - 1
    turns: list[tuple[str, str | None]] = []
    for i, (expected, message) in enumerate(zip(("user", "assistant") * len(messages), messages)):
        if message.role != expected:
            raise ValueError("messages must alternate user / assistant, starting with user")
        text = image_text + message.content if i == image_at else message.content
        turns.append((template.roles[0 if message.role == "user" else 1], text))
    turns.append((template.roles[1], None))
    return template.render(turns)


def long_video_text(num_frames: int, tokens_per_frame: int = 2) -> str:
    """The stage-3 movie framing: ``tokens_per_frame`` placeholders per frame (spec §6.2)."""
    return LONG_VIDEO_PREFIX + IMAGE_PLACEHOLDER * (num_frames * tokens_per_frame) + LONG_VIDEO_SUFFIX + "\n"
