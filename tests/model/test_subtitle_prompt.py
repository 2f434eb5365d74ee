"""Subtitles interleaved per frame in the LLM prompt (spec §6.2, §6.3), ``prompt_text`` and ``llamavid prompt``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.conversation import Message, VisualLayout
from model.llama_vid import VisualInput, checkpoint_num_patches, checkpoint_prompt_text
from model.loader import load_llamavid
from model.subtitles import container_subtitles, frame_texts, parse_subtitles
from model.tokenizer import IMAGE_TOKEN_INDEX
from model.video import FrameSampling, VideoFile, sample_indices
from server.cli import main as cli
from tests.model.checkpoints import clone, edit_config
from tests.model.media import write_media
from tests.model.test_prompt import MOVIE_HEAD, MOVIE_TAIL, USER_SYSTEM
from tests.model.test_subtitles import ASS_EVENTS, SRT

QUESTION = "What does the man say?"
SUBS = [["Hello there."], [], ["I said", "hello."]]  # per frame of the three tiny_frames


@pytest.fixture(scope="module")
def long_model(tiny_checkpoint: Path, tmp_path_factory):
    """The tiny checkpoint as a long-video one: rope scaling marks the stage-3 model."""
    ckpt = clone(tiny_checkpoint, tmp_path_factory.mktemp("long") / "ckpt")
    edit_config(ckpt, rope_scaling={"type": "linear", "factor": 16.0}, max_token=65536)
    model = load_llamavid(ckpt)
    assert model.config.long_video
    return model


@pytest.fixture(scope="module")
def features(tiny_model, tiny_frames) -> torch.Tensor:
    return tiny_model.encode_frames(tiny_model.preprocess(tiny_frames))  # the same EVA in both checkpoints


def _embed(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.llm.get_input_embeddings()(torch.tensor(ids))


def _check_splice(model, prepared, tokens: torch.Tensor) -> None:
    """One visual token per placeholder, in order, and the text around them embedded as text."""
    ids = prepared.input_ids
    slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    e = prepared.inputs_embeds[0]
    assert len(slots) == tokens.shape[0] == prepared.num_visual_tokens
    assert e.shape[0] == len(ids)
    torch.testing.assert_close(e[slots], tokens)
    text = [i for i, t in enumerate(ids) if t != IMAGE_TOKEN_INDEX]
    torch.testing.assert_close(e[text], _embed(model, [ids[i] for i in text]))


def test_long_video_with_subtitles(long_model, features) -> None:
    prepared = long_model.prepare([Message("user", QUESTION)], VisualInput(features, "video"), subtitles=SUBS)
    frames = "<image><image>Hello there.<image><image><image><image>I said hello."
    assert prepared.prompt == f"{USER_SYSTEM} USER: {MOVIE_HEAD}{frames}{MOVIE_TAIL}\n{QUESTION} ASSISTANT:"
    # The Q-Former reads the question only: the tokens are the ones made without subtitles.
    _check_splice(long_model, prepared, long_model.frame_tokens(features[:, 1:], QUESTION).tokens)
    # Each chunk between placeholders is tokenized on its own, as tokenizer_image_token does.
    tok = long_model.tokenizer
    chunks = prepared.prompt.split("<image>")
    assert prepared.input_ids == [tok.bos_id, *tok.encode(chunks[0], add_bos=False), *[
        x for chunk in chunks[1:] for x in (IMAGE_TOKEN_INDEX, *tok.encode(chunk, add_bos=False))]]


def test_short_video_with_subtitles(tiny_model, features) -> None:
    prepared = tiny_model.prepare([Message("user", QUESTION)], VisualInput(features, "video"), subtitles=SUBS)
    frames = "<image><image>Hello there.<image><image><image><image>I said hello."
    assert prepared.prompt == f"{USER_SYSTEM} USER: {frames}\n{QUESTION} ASSISTANT:"
    _check_splice(tiny_model, prepared, tiny_model.frame_tokens(features, QUESTION).tokens)


def test_without_subtitles_nothing_changes(tiny_model, long_model, features) -> None:
    video = VisualInput(features, "video")
    short = tiny_model.prepare([Message("user", QUESTION)], video)
    assert short.prompt == f"{USER_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    assert short.input_ids.count(IMAGE_TOKEN_INDEX) == 1 and short.num_visual_tokens == 6
    movie = long_model.prepare([Message("user", QUESTION)], video)
    assert movie.prompt == f"{USER_SYSTEM} USER: {MOVIE_HEAD}{'<image>' * 6}{MOVIE_TAIL}\n{QUESTION} ASSISTANT:"
    # Frames without text give bare placeholders (spec §6.3 step 4): a movie's prompt is unchanged.
    silent = long_model.prepare([Message("user", QUESTION)], video, subtitles=[[], [], []])
    assert silent.prompt == movie.prompt and silent.input_ids == movie.input_ids
    torch.testing.assert_close(silent.inputs_embeds, movie.inputs_embeds)


def test_subtitles_that_do_not_fit(tiny_model, features) -> None:
    video = VisualInput(features, "video")
    calls = []
    handle = tiny_model.qformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="subtitles are given for 2 frames but the visual input has 3"):
            tiny_model.prepare([Message("user", "q")], video, subtitles=[["a"], ["b"]])
    finally:
        handle.remove()
    assert calls == []  # refused before any compute
    with pytest.raises(ValueError, match="not an image"):
        tiny_model.prepare([Message("user", "q")], VisualInput(features[:1], "image"), subtitles=[["a"]])
    with pytest.raises(ValueError, match="need a video"):
        tiny_model.prepare([Message("user", "q")], subtitles=[["a"]])
    with pytest.raises(ValueError, match="frame 1"):
        tiny_model.prepare([Message("user", "q")], video, subtitles=[[], ["<image>"], []])
    with pytest.raises(ValueError, match="frame 0"):
        tiny_model.prepare([Message("user", "q")], video, subtitles=["not a list", [], []])


def test_layout_text() -> None:
    assert VisualLayout(2, 3).text() == "<image>\n"
    assert VisualLayout(2, 3).text(every_token=True) == "<image>" * 6 + "\n"
    assert VisualLayout(2, 1, subtitles=[["a", "b"], ["c"]]).text() == "<image>a b<image>c\n"
    assert VisualLayout(2, 2, movie=True).text() == f"{MOVIE_HEAD}{'<image>' * 4}{MOVIE_TAIL}\n"


# -- prompt_text -----------------------------------------------------------------------------------
@pytest.mark.parametrize("subtitles", [None, SUBS], ids=["plain", "subtitles"])
@pytest.mark.parametrize("which", ["short", "long"])
def test_prompt_text_is_what_prepare_feeds(tiny_model, long_model, features, which: str, subtitles) -> None:
    model = tiny_model if which == "short" else long_model
    messages = [Message("user", "Where?"), Message("assistant", "Here."), Message("user", QUESTION)]
    prepared = model.prepare(messages, VisualInput(features, "video"), subtitles=subtitles)
    text = model.prompt_text(messages, len(features), subtitles=subtitles)
    ids = model.tokenizer.encode_with_images(text)
    assert text.count("<image>") == ids.count(IMAGE_TOKEN_INDEX) == prepared.num_visual_tokens
    if prepared.input_ids.count(IMAGE_TOKEN_INDEX) == prepared.num_visual_tokens:
        assert text == prepared.prompt and ids == prepared.input_ids
    else:  # a short video's single <image> is shown token by token: the same sequence once spliced
        assert text == prepared.prompt.replace("<image>", "<image>" * prepared.num_visual_tokens)
        assert [t for t in ids if t != IMAGE_TOKEN_INDEX] == [t for t in prepared.input_ids if t != IMAGE_TOKEN_INDEX]
    # What the CLI computes from the checkpoint folder alone is the same text.
    config = model.config
    assert checkpoint_num_patches(config) == model.vision.num_patches
    assert checkpoint_prompt_text(config, checkpoint_num_patches(config), messages, len(features),
                                  subtitles=subtitles) == text


def test_prompt_text_image_and_text_only(tiny_model, features) -> None:
    messages = [Message("user", "What is it?")]
    image = tiny_model.prepare(messages, VisualInput(features[:1], "image"))
    assert tiny_model.prompt_text(messages, 1, kind="image") == image.prompt.replace("<image>", "<image>" * 2)
    text_only = tiny_model.prepare(messages)
    assert tiny_model.prompt_text(messages, 0) == text_only.prompt
    with pytest.raises(ValueError, match="need a video"):
        tiny_model.prompt_text(messages, 0, subtitles=[])


def test_prompt_text_for_an_odd_patch_grid(tmp_path: Path) -> None:
    """98 px: 49 patches, where CLS + patches is even. The movie path drops CLS and the head sees 49
    tokens (odd, so it drops one more): prompt_text must count what prepare makes."""
    from model.tools.tiny import make_tiny

    ckpt = make_tiny(tmp_path / "tiny-98", "tiny", image_size=98, num_shards=1, compress=None)
    frames = torch.randint(0, 256, (2, 98, 98, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for mode in ("short", "long"):
        if mode == "long":
            edit_config(ckpt, rope_scaling={"type": "linear", "factor": 16.0})
        model = load_llamavid(ckpt)
        features = model.encode_frames(model.preprocess(frames))
        prepared = model.prepare([Message("user", "q")], VisualInput(features, "video"), subtitles=[["a"], ["b"]])
        text = model.prompt_text([Message("user", "q")], 2, subtitles=[["a"], ["b"]])
        assert text == prepared.prompt, mode
        assert checkpoint_prompt_text(model.config, checkpoint_num_patches(model.config), [Message("user", "q")], 2,
                                      subtitles=[["a"], ["b"]]) == text, mode


# -- llamavid prompt -------------------------------------------------------------------------------
def _expected(model, video: Path, cues, question: str, fps: float = 1.0, max_frames: int | None = None) -> str:
    file = VideoFile(video)
    indices = sample_indices(file.info, FrameSampling(fps, max_frames))
    texts = None if cues is None else frame_texts(cues, file.timestamps(indices))
    return model.prompt_text([Message("user", question)], len(indices), subtitles=texts) + "\n"


def test_cli_prompt(tiny_model, long_model, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    with_track = write_media(tmp_path / "clip.mp4", seconds=4.0, cues=ASS_EVENTS, subtitle_codec="mov_text")
    plain = write_media(tmp_path / "plain.mp4", seconds=4.0)
    srt = tmp_path / "subs.srt"
    srt.write_text(SRT.replace("Hello", "Howdy"), encoding="utf-8")
    cues = parse_subtitles(srt.read_text())
    q = "What is said?"

    # the container's own track: asked for on a short-video checkpoint, which is trained without
    assert cli(["prompt", "--model", str(tiny_checkpoint), str(with_track), q]) == 0
    assert "Hello" not in capsys.readouterr().out
    assert cli(["prompt", "--model", str(tiny_checkpoint), "--subtitles", "auto", str(with_track), q]) == 0
    out = capsys.readouterr().out
    assert out == _expected(tiny_model, with_track, container_subtitles(with_track), q)
    assert out == (f"{USER_SYSTEM} USER: <image><image><image><image>Hello & welcome<image><image><image><image>"
                   f"Two lines of text the end\n{q} ASSISTANT:\n")

    # a subtitle file wins over the track; fps and max-frames pick the frames
    assert cli(["prompt", "--model", str(tiny_checkpoint), "--subtitles", str(srt), "--fps", "2",
                "--max-frames", "5", str(with_track), q]) == 0
    out = capsys.readouterr().out
    assert out == _expected(tiny_model, with_track, cues, q, fps=2, max_frames=5)
    assert "Howdy & welcome" in out and out.count("<image>") == 10

    # no subtitles at all: one placeholder per visual token; a long-video checkpoint's movie framing
    assert cli(["prompt", "--model", str(tiny_checkpoint), str(plain), q]) == 0
    assert capsys.readouterr().out == f"{USER_SYSTEM} USER: {'<image>' * 8}\n{q} ASSISTANT:\n"
    assert cli(["prompt", "--model", str(long_model.config.model_dir), "--subtitles", str(srt), str(plain), q]) == 0
    out = capsys.readouterr().out
    assert out == _expected(long_model, plain, cues, q) and out.count(MOVIE_HEAD) == 1
    # a long-video checkpoint reads the track unasked, as the service does; 'none' turns it off
    assert cli(["prompt", "--model", str(long_model.config.model_dir), str(with_track), q]) == 0
    assert capsys.readouterr().out == _expected(long_model, with_track, container_subtitles(with_track), q)
    assert cli(["prompt", "--model", str(long_model.config.model_dir), "--subtitles", "none", str(with_track), q]) == 0
    assert capsys.readouterr().out == _expected(long_model, with_track, None, q)


def test_cli_prompt_errors(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    plain = write_media(tmp_path / "plain.mp4")
    bad = tmp_path / "bad.srt"
    bad.write_text("not subtitles\n")
    assert cli(["prompt", "--model", str(tiny_checkpoint), "--subtitles", str(bad), str(plain), "q"]) == 2
    assert "line 1: expected a cue number" in capsys.readouterr().err
    assert cli(["prompt", "--model", str(tiny_checkpoint), str(tmp_path / "missing.mp4"), "q"]) == 2
    assert "llamavid prompt:" in capsys.readouterr().err
