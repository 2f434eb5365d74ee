"""Several visual inputs in one prompt (``model.multimedia``): labelled blocks, in order, in their turns."""

from __future__ import annotations

import pytest
import torch

from model.conversation import IMAGE_PLACEHOLDER, Message
from model.llama_vid import VisualInput
from model.multimedia import MediaSlot, blocks_prompt_text, blocks_prompt_tokens, labels, prepare_blocks
from model.tokenizer import IMAGE_TOKEN_INDEX


def features(model, frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((frames, *model.frame_feature_shape), generator=generator)


def test_labels_are_numbered_per_kind_in_order() -> None:
    assert labels(["video", "image", "video", "image"]) == ["Video 1:", "Image 1:", "Video 2:", "Image 2:"]


def test_two_videos_in_one_turn_each_get_a_labelled_block_of_their_own_tokens(tiny_model) -> None:
    first, second = features(tiny_model, 3, 0), features(tiny_model, 2, 1)
    messages = [Message("user", "Which video has the red circle?")]
    slots = [MediaSlot("video", 0), MediaSlot("video", 0)]
    prepared, relevance = prepare_blocks(tiny_model, messages, [VisualInput(first), VisualInput(second)], slots,
                                         with_relevance=True)
    assert "USER: Video 1: <image>\nVideo 2: <image>\nWhich video has the red circle? ASSISTANT:" in prepared.prompt
    per_frame = tiny_model.tokens_per_frame()
    assert prepared.num_visual_tokens == 5 * per_frame
    assert prepared.input_ids.count(IMAGE_TOKEN_INDEX) == 2  # one placeholder per block
    assert [r.shape[0] for r in relevance] == [3, 2]
    # each block is that video's own tokens, built with the question: the first block equals the
    # single-video tokens of the first video
    alone = tiny_model.frame_tokens(first, messages[-1].content).tokens
    slot = prepared.input_ids.index(IMAGE_TOKEN_INDEX)
    torch.testing.assert_close(prepared.inputs_embeds[0, slot : slot + 3 * per_frame], alone)
    # the counting path (no visual head) agrees with the prepared prompt, token for token
    assert blocks_prompt_tokens(tiny_model, messages, slots, [3, 2]) == prepared.num_prompt_tokens


def test_blocks_go_in_the_turns_they_came_with_and_the_question_is_the_last(tiny_model) -> None:
    messages = [Message("user", "What is in this one?"), Message("assistant", "a cat"),
                Message("user", "And this picture?")]
    slots = [MediaSlot("video", 0), MediaSlot("image", 2)]
    text = blocks_prompt_text(tiny_model, messages, slots, [2, 1])
    first, rest = text.split("ASSISTANT: a cat")
    assert "USER: Video 1: " in first and "Image 1: " in rest
    assert first.count(IMAGE_PLACEHOLDER) == 2 * tiny_model.tokens_per_frame()
    image = tiny_model.preprocess(torch.zeros((1, 224, 224, 3), dtype=torch.uint8).numpy())
    inputs = [VisualInput(features(tiny_model, 2, 2)), VisualInput(tiny_model.encode_frames(image), "image")]
    prepared, _ = prepare_blocks(tiny_model, messages, inputs, slots)
    assert prepared.num_prompt_tokens == blocks_prompt_tokens(tiny_model, messages, slots, [2, 1])


def test_a_block_must_sit_in_a_user_turn(tiny_model) -> None:
    messages = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    with pytest.raises(ValueError, match="not a user message"):
        blocks_prompt_text(tiny_model, messages, [MediaSlot("video", 1), MediaSlot("video", 2)], [1, 1])
